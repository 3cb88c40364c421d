"""GLUE fine-tuning end to end: the classifier head on every FFN kind, a fine-tune that beats the majority class on a
separable task, exact resume, HMoE regrouping off by default, and inputs checked before the workdir is written."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import tiny
from hmoe.config import from_config_dict
from hmoe.glue import data as glue_data, finetune as finetune_lib
from hmoe.glue.config import FinetuneConfig
from hmoe.glue.model import SequenceClassifier
from hmoe.model.transformer import TransformerLM
from hmoe.testing import init_params
from hmoe.train import checkpoint
from hmoe.train.loop import train_and_evaluate


def _tiny(kind, data_dir=None):
  raw = tiny.get_config(kind).to_dict()
  raw["data"]["data_dir"] = str(data_dir) if data_dir else None
  return from_config_dict(raw)


@pytest.mark.parametrize("kind", ["dense", "moe", "hmoe"])
def test_head_shapes_parameters_and_pooling_for_every_ffn_kind(kind):
  config = _tiny(kind).model
  tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 16), 3, config.vocab_size)
  lengths = jnp.asarray([5, 16, 9])
  lm_params = init_params(TransformerLM(config), tokens)
  # Each example twice: as drawn, and with everything after its length replaced by padding.
  padded = jnp.where(jnp.arange(16)[None] < lengths[:, None], tokens, 0)
  both_tokens, both_lengths = jnp.concatenate([tokens, padded]), jnp.concatenate([lengths, lengths])
  for pooling, num_outputs in (("last", 3), ("mean", 1)):
    model = SequenceClassifier(config, num_outputs, pooling)
    params = init_params(model, tokens, lengths)
    assert set(params) == set(lm_params) | {"classifier"}  # The LM's own tree: pretrained params load as they are.
    trunk = {k: v for k, v in params.items() if k != "classifier"}
    chex.assert_trees_all_equal_shapes(trunk, lm_params)
    outputs, stats = jax.jit(lambda p: model.apply({"params": p}, both_tokens, both_lengths))(params)
    chex.assert_shape(outputs, (6, num_outputs))
    assert (stats is None) == (kind == "dense")
    # Causal trunk, pooled over real tokens only: what follows the text does not change the output.
    chex.assert_trees_all_close(outputs[:3], outputs[3:], atol=1e-5)
    # The pooled state is the trunk's at position length - 1, or its mean over the real tokens.
    hidden, _ = jax.jit(lambda p: TransformerLM(config).apply({"params": p}, tokens, features_only=True))(trunk)
    mask = (jnp.arange(16)[None] < lengths[:, None]).astype(jnp.float32)
    pooled = (hidden[jnp.arange(3), lengths - 1] if pooling == "last"
              else jnp.einsum("bld,bl->bd", hidden, mask) / lengths[:, None].astype(jnp.float32))
    expected = pooled @ params["classifier"]["kernel"] + params["classifier"]["bias"][None]
    chex.assert_trees_all_close(outputs[:3], expected, atol=1e-5)


def _separable_glue(root, num_train=240, num_dev=60):
  """An SST-2-shaped task: label 1 iff the sentence names a cat (60% of them), words from the test corpus."""
  rng = np.random.default_rng(0)
  filler = "the sat on a mat and ran to house river stone of in was is it".split()

  def rows(count):
    labels = (rng.random(count) < 0.6).astype(int)
    return [" ".join([*rng.choice(filler, 3), "cat" if label else "dog", *rng.choice(filler, 3)]) + f" \t{label}"
            for label in labels]

  (root / "SST-2").mkdir(parents=True)
  for split, count in (("train", num_train), ("dev", num_dev)):
    (root / "SST-2" / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows(count)) + "\n")
  return root


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
  return _separable_glue(tmp_path_factory.mktemp("glue"))


@pytest.fixture(scope="module")
def pretrained(wikitext_dir, tmp_path_factory):
  """kind -> workdir of a 6-step tiny pretraining run, trained on first use."""
  runs = {}

  def run(kind):
    if kind not in runs:
      runs[kind] = tmp_path_factory.mktemp(f"pretrained_{kind}")
      train_and_evaluate(_tiny(kind, wikitext_dir), runs[kind])
    return runs[kind]

  return run


def _recipe(glue_dir, **overrides):
  values = dict(task="sst2", glue_dir=str(glue_dir), batch_size=16, eval_batch_size=32, num_epochs=4,
                learning_rate=3e-3, log_every=5, checkpoint_every=5, dropout_rate=0.0, max_len=32)
  return FinetuneConfig(**{**values, **overrides})


def test_a_model_from_scratch_learns_a_separable_task_far_above_the_majority_class(glue_dir, wikitext_dir,
                                                                                   tmp_path):
  config = _recipe(glue_dir, scratch_config="tiny.py:moe", num_epochs=6)
  results = finetune_lib.finetune(config, tmp_path, scratch_experiment=_tiny("moe", wikitext_dir))
  majority = results["majority"]["dev"]["accuracy"]
  assert 0.5 < majority < 0.75
  assert results["last"]["dev"]["accuracy"] >= 0.95, results
  assert results["best"]["dev"]["accuracy"] >= results["last"]["dev"]["accuracy"]
  assert results["epochs"] == 6.0 and results["steps"] == 6 * (240 // 16)
  assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "results.json").exists()


@pytest.mark.parametrize("crash_step", [7])
def test_an_interrupted_fine_tune_resumes_exactly(glue_dir, pretrained, tmp_path, monkeypatch, crash_step):
  # Dropout on (trunk and head) and balancing biases from pretraining, so rng streams and routing state must resume.
  config = _recipe(glue_dir, init_from=str(pretrained("moe")), num_epochs=1, dropout_rate=0.1, max_steps=12)
  straight = finetune_lib.finetune(config, tmp_path / "straight")
  real_batch = glue_data.train_batch

  def crash(split, step, *args):
    if step == crash_step:
      raise KeyboardInterrupt("simulated kill")
    return real_batch(split, step, *args)

  monkeypatch.setattr(glue_data, "train_batch", crash)
  with pytest.raises(KeyboardInterrupt):
    finetune_lib.finetune(config, tmp_path / "resumed")
  monkeypatch.setattr(glue_data, "train_batch", real_batch)
  assert checkpoint.Checkpointer(tmp_path / "resumed" / "checkpoints").latest_step() == 5
  resumed = finetune_lib.finetune(config, tmp_path / "resumed")
  assert resumed["last"] == straight["last"] and resumed["steps"] == straight["steps"] == 12
  states = [_restore(tmp_path / name) for name in ("straight", "resumed")]
  chex.assert_trees_all_close(states[0], states[1], atol=0, rtol=0)


def _restore(workdir):
  """The newest checkpoint's raw tree (no target structure needed: both runs wrote the same one)."""
  manager = checkpoint.Checkpointer(workdir / "checkpoints")
  step = manager.latest_step()
  restored = manager._manager.restore(step)  # noqa: SLF001 -- a test reads the stored tree as written.
  return restored["state"]


def test_hmoe_keeps_its_clusters_unless_regrouping_is_asked_for(glue_dir, pretrained, tmp_path):
  workdir = pretrained("hmoe")  # tiny.py:hmoe regroups every 3 steps while pretraining.
  before = int(_restore(workdir)["routing_state"]["clusters"]["num_regroups"])
  assert before == 1
  for regroup, expected in ((False, before), (True, before + 1)):  # A regroup after step 3 of 4.
    config = _recipe(glue_dir, init_from=str(workdir), num_epochs=1, max_steps=4, regroup=regroup)
    finetune_lib.finetune(config, tmp_path / str(regroup))
    clusters = _restore(tmp_path / str(regroup))["routing_state"]["clusters"]
    assert int(clusters["num_regroups"]) == expected, regroup


def test_inputs_are_checked_before_the_workdir_is_written(glue_dir, pretrained, tmp_path):
  workdir = tmp_path / "run"
  cases = [
      (_recipe(tmp_path / "no_glue", init_from=str(pretrained("moe"))), FileNotFoundError, "SST-2"),
      (_recipe(glue_dir, init_from=str(tmp_path / "nothing")), FileNotFoundError, "not a run directory"),
      (_recipe(glue_dir, task="rte", init_from=str(pretrained("moe"))), FileNotFoundError, "RTE"),
      (_recipe(glue_dir, init_from=str(pretrained("moe")), scratch_config="tiny.py:moe"), ValueError, "exactly one"),
      (_recipe(glue_dir, init_from=str(pretrained("moe")), pooling="max"), ValueError, "finetune.pooling='max'"),
      (_recipe(glue_dir, init_from=str(pretrained("moe")), batch_size=1000), ValueError, "exceeds the 240"),
  ]
  for config, error, message in cases:
    with pytest.raises(error, match=message):
      finetune_lib.finetune(config, workdir)
    assert not (workdir / "config.json").exists() and not (workdir / "checkpoints").exists(), message
