"""End to end: the training loop on a small WikiText-like corpus, exact resume (MoE and HMoE with regroups, jitter
and dropout on), NaN stop, checkpoint corruption, auxiliary-loss weighting and the NaN guard.

Each kind trains one straight run per module (`_straight`), shared by the tests that only read it.
"""

import functools
import logging
import pathlib
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import tiny
from hmoe.config import HMoEConfig, MoEConfig, from_config_dict
from hmoe.data import batching, wikitext as data
from hmoe.model.transformer import TransformerLM
from hmoe.routing.losses import update_balancing_bias
from hmoe.testing import dummy_batch, init_train_state, tiny_config
from hmoe.train import checkpoint, metrics, optimizer as optimizer_lib, run_dir, state as state_lib, step as step_lib
from hmoe.train.loop import train_and_evaluate

_HMOE = dict(num_experts=8, num_clusters=2, rank=4, expert_ff=32, block_size=8, recluster_every=2,
             min_gain=-1.0,  # Always adopt, so every regroup really moves experts.
             bias_update_rate=0.01, router_jitter=0.1)


def _config(data_dir, kind="moe", moe_overrides=None, **train_overrides):
  raw = tiny.get_config().to_dict()
  raw["data"]["data_dir"] = str(data_dir)
  raw["data"]["eval_splits"] = ("valid", "test")
  raw["model"]["dropout_rate"] = 0.1
  if kind == "hmoe":
    raw["model"]["ffn_pattern"] = "dense,hmoe"
    raw["model"]["hmoe"] = dict(_HMOE)
  else:
    raw["model"]["moe"].update(bias_update_rate=0.01, router_jitter=0.1, **(moe_overrides or {}))
  raw["train"].update(dict(num_steps=6, checkpoint_every=2, keep_checkpoints=3), **train_overrides)
  return from_config_dict(raw)


def _restore_final(workdir: pathlib.Path, config):
  model, optimizer = TransformerLM(config.model), optimizer_lib.make_optimizer(config.train)
  abstract = jax.eval_shape(functools.partial(state_lib.init_train_state, model, optimizer, config))
  return checkpoint.Checkpointer(workdir / "checkpoints").restore(abstract)


@pytest.fixture(scope="module")
def straight(wikitext_dir, tmp_path_factory):
  """kind -> (config, workdir, results) of one uninterrupted 6-step run, trained on first use."""
  runs = {}

  def run(kind):
    if kind not in runs:
      config, workdir = _config(wikitext_dir, kind), tmp_path_factory.mktemp(f"straight_{kind}")
      runs[kind] = (config, workdir, train_and_evaluate(config, workdir))
    return runs[kind]

  return run


def test_train_step_compiles_once():
  config = tiny_config()
  model, optimizer = TransformerLM(config.model), optimizer_lib.make_optimizer(config.train)
  state = init_train_state(model, optimizer, config)
  traced = chex.assert_max_traces(step_lib.train_step, n=1)
  train_fn = jax.jit(functools.partial(traced, model=model, optimizer=optimizer, config=config), donate_argnums=0)
  losses = []
  for seed in range(3):
    state, step_metrics = train_fn(state, dummy_batch(config, seed))
    losses.append(float(step_metrics["loss"]))
  assert int(state.step) == 3 and all(np.isfinite(losses))


def test_run_logs_metrics_and_reports_word_perplexity(straight, wikitext_dir):
  config, workdir, results = straight("moe")
  assert results["step"] == config.train.num_steps
  records = metrics.read_metrics(workdir / "metrics.jsonl")
  train_records = [r for r in records if "train/loss" in r]
  assert [r["step"] for r in train_records] == [2, 4, 6]
  (model_record,) = [r for r in records if "model/params_total" in r]
  assert model_record["model/params_total"] == results["params_total"] > 0
  assert model_record["model/bytes_total_f32"] == 4 * results["params_total"]
  for key in ("train/ce_loss", "train/perplexity", "train/tokens_per_second", "train/learning_rate",
              "train/load_cv", "train/load_max_over_mean", "train/dropped_fraction", "train/expert_load"):
    assert key in train_records[-1], key
  assert len(train_records[-1]["train/expert_load"]) == 1  # One MoE layer...
  assert len(train_records[-1]["train/expert_load"][0]) == 4  # ...of 4 experts.
  for split in ("valid", "test"):
    path = wikitext_dir / "wikitext-2" / f"wiki.{split}.tokens"
    words = data.count_words(path)
    assert results[f"{split}/num_words"] == words
    # Every token of the split is scored once: as many as the tokenizer makes of it (+1 eos per line).
    encoded = data.load_split(_tokenizer(workdir), path)
    assert results[f"{split}/num_tokens"] == len(encoded.tokens)
    expected = np.exp(results[f"{split}/loss"] * len(encoded.tokens) / words)
    np.testing.assert_allclose(results[f"{split}/word_perplexity"], expected, rtol=1e-5)


def _tokenizer(workdir):
  from hmoe.data.tokenizer import Tokenizer
  return Tokenizer.load(workdir / "tokenizer.json")


@pytest.mark.parametrize("kind, crash_step", [("moe", 5), ("hmoe", 3)])
def test_interrupted_run_resumes_exactly(straight, tmp_path, monkeypatch, caplog, kind, crash_step):
  # Jitter, dropout and balancing biases on (and for the HMoE a regroup before and after the crash), so the per-step
  # rng streams and the routing state outside params must resume exactly: compared at atol 0 on CPU.
  config, straight_dir, _ = straight(kind)
  real_train_batch = batching.train_batch

  def crash(tokens, step, *args):
    if step == crash_step:
      raise KeyboardInterrupt("simulated kill")
    return real_train_batch(tokens, step, *args)

  monkeypatch.setattr(batching, "train_batch", crash)
  with pytest.raises(KeyboardInterrupt):
    train_and_evaluate(config, tmp_path)
  monkeypatch.setattr(batching, "train_batch", real_train_batch)
  assert checkpoint.Checkpointer(tmp_path / "checkpoints").latest_step() == crash_step - 1
  with caplog.at_level(logging.INFO):
    train_and_evaluate(config, tmp_path)
  # Without a terminal: one line per logged step with an ETA, and one per regroup.
  lines = [record.getMessage() for record in caplog.records]
  assert any(line.startswith("step 6/6: loss") and "ETA" in line for line in lines), lines
  if kind == "hmoe":
    assert any(line.startswith("step 4: regroup adopted in 1/1 layers") for line in lines), lines

  step_a, state_a = _restore_final(straight_dir, config)
  step_b, state_b = _restore_final(tmp_path, config)
  assert step_a == step_b == 6
  chex.assert_trees_all_close(state_a, state_b, atol=0, rtol=0)
  assert float(jnp.max(jnp.abs(state_a.routing_state.selection_bias))) > 0
  if kind == "hmoe":
    assert int(state_a.routing_state.clusters.num_regroups) == 2
  rows_a = [r for r in metrics.read_metrics(straight_dir / "metrics.jsonl") if "test/loss" in r]
  rows_b = [r for r in metrics.read_metrics(tmp_path / "metrics.jsonl") if "test/loss" in r]
  assert rows_a[-1]["test/loss"] == rows_b[-1]["test/loss"]


def test_nan_stop_saves_the_last_good_state_and_resumes_with_a_saner_learning_rate(wikitext_dir, tmp_path):
  # Warmup starts at learning rate 0, so step 0 is a healthy no-op; step 1's absurd update overflows.
  config = _config(wikitext_dir, learning_rate=1e30, warmup_steps=2)
  with pytest.raises(FloatingPointError, match=r"the (loss|gradient norm|parameter update) became non-finite at "
                                               r"step 1.*--allow_config_change=train.learning_rate"):
    train_and_evaluate(config, tmp_path)
  step, state = _restore_final(tmp_path, config)
  assert step == 1 and int(state.step) == 1 and int(state.nan_step) == -1  # Saved without the stop marker.
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(state.params))
  rows = metrics.read_metrics(tmp_path / "metrics.jsonl")
  assert [r["diverged/step"] for r in rows if "diverged/step" in r] == [1]
  assert [r["step"] for r in rows if "train/ce_loss" in r] == [1]  # The good step before the NaN is logged.
  sane = _config(wikitext_dir, warmup_steps=2)
  with pytest.raises(run_dir.RunDirectoryError, match="train.learning_rate: 1e"):
    train_and_evaluate(sane, tmp_path)
  results = train_and_evaluate(sane, tmp_path, allow_config_change=["train.learning_rate"])
  assert results["step"] == 6 and np.isfinite(results["valid/loss"])


def test_moe_selection_bias_steers_routing_and_moves_against_load():
  config = tiny_config(moe=MoEConfig(num_experts=4, top_k=2, expert_ff=32, bias_update_rate=0.01))
  model, optimizer = TransformerLM(config.model), optimizer_lib.make_optimizer(config.train)
  state = init_train_state(model, optimizer, config)
  chex.assert_shape(state.routing_state.selection_bias, (1, 4))  # One standard MoE layer ("dense,moe").
  # A large bias on expert 3 puts it among every token's two choices: the bias reaches the router.
  state = state.replace(routing_state=state.routing_state.replace(selection_bias=jnp.array([[0.0, 0.0, 0.0, 10.0]])))
  train_fn = jax.jit(functools.partial(step_lib.train_step, model=model, optimizer=optimizer, config=config))
  new_state, step_metrics = train_fn(state, dummy_batch(config))
  load = step_metrics["expert_load"]
  np.testing.assert_allclose(load[0, 3], 0.5, atol=1e-6)
  # Expert 3 is overloaded, so its bias goes down; each other expert's moves against its own load error.
  expected = update_balancing_bias(state.routing_state.selection_bias, load, 0.01)
  chex.assert_trees_all_close(new_state.routing_state.selection_bias, expected, atol=1e-7)
  assert float(new_state.routing_state.selection_bias[0, 3]) == pytest.approx(10.0 - 0.01)
  # Off by default: no state to carry.
  plain = tiny_config()
  assert init_train_state(TransformerLM(plain.model), optimizer, plain).routing_state.selection_bias is None


def test_auxiliary_losses_enter_the_loss_with_their_weights_summed_over_layers():
  hmoe = HMoEConfig(num_experts=4, num_clusters=2, rank=2, expert_ff=16, block_size=8, balance_loss_weight=0.5,
                    cluster_balance_loss_weight=0.25, z_loss_weight=0.125)
  config = tiny_config(ffn_pattern="hmoe", hmoe=hmoe)  # Two routed layers: a sum, not a mean, over layers.
  model, optimizer = TransformerLM(config.model), optimizer_lib.make_optimizer(config.train)
  state = init_train_state(model, optimizer, config)
  batch = dummy_batch(config)
  _, step_metrics = jax.jit(functools.partial(step_lib.train_step, model=model, optimizer=optimizer,
                                              config=config))(state, batch)
  _, stats = model.apply({"params": state.params}, batch["inputs"], train=True, rngs=step_lib.step_rngs(state))
  chex.assert_shape(stats.balance_loss, (2,))
  expected = (0.5 * np.sum(stats.balance_loss) + 0.25 * np.sum(stats.cluster_balance_loss)
              + 0.125 * np.sum(stats.z_loss))
  assert expected > 0.5
  np.testing.assert_allclose(step_metrics["loss"] - step_metrics["ce_loss"], expected, rtol=1e-5)
  np.testing.assert_allclose(step_metrics["balance_loss"], np.mean(stats.balance_loss), rtol=1e-6)


def test_nan_guard_freezes_state_including_the_routing_state():
  hmoe = HMoEConfig(num_experts=4, num_clusters=2, rank=2, expert_ff=16, block_size=8, bias_update_rate=0.01)
  config = tiny_config(ffn_pattern="dense,hmoe", hmoe=hmoe)
  model, optimizer = TransformerLM(config.model), optimizer_lib.make_optimizer(config.train)
  state = init_train_state(model, optimizer, config)
  train_fn = jax.jit(functools.partial(step_lib.train_step, model=model, optimizer=optimizer, config=config))
  state, _ = train_fn(state, dummy_batch(config))
  assert float(jnp.max(jnp.abs(state.routing_state.clusters.centroid))) > 0  # Statistics were being gathered.
  poisoned = state.replace(opt_state=jax.tree.map(lambda x: x * jnp.nan if x.dtype == jnp.float32 else x,
                                                  state.opt_state))
  after, _ = train_fn(poisoned, dummy_batch(config, 1))
  assert int(after.nan_step) == 1 and int(after.step) == 1
  chex.assert_trees_all_close(after.params, state.params, atol=0, rtol=0)
  # The skipped step's statistics and bias updates are discarded too.
  chex.assert_trees_all_close(after.routing_state, state.routing_state, atol=0, rtol=0)
  # Later healthy-looking steps do not unfreeze it.
  later, _ = train_fn(after, dummy_batch(config, 2))
  assert int(later.step) == 1 and int(later.nan_step) == 1
  chex.assert_trees_all_close(later.routing_state, state.routing_state, atol=0, rtol=0)


def test_corrupt_latest_checkpoint_falls_back_to_older(straight, tmp_path):
  config, straight_dir, _ = straight("moe")
  shutil.copytree(straight_dir / "checkpoints", tmp_path / "checkpoints")
  checkpointer = checkpoint.Checkpointer(tmp_path / "checkpoints")
  assert checkpointer.all_steps() == [2, 4, 6]
  for path in (tmp_path / "checkpoints" / "6").rglob("*"):
    if path.is_file():
      path.write_bytes(b"garbage")
  step, state = _restore_final(tmp_path, config)
  assert step == 4 and int(state.step) == 4
  for step_dir in ("2", "4"):
    for path in (tmp_path / "checkpoints" / step_dir).rglob("*"):
      if path.is_file():
        path.write_bytes(b"garbage")
  with pytest.raises(checkpoint.CheckpointError, match=r"no readable checkpoint(.|\n)*/6 is unreadable"):
    _restore_final(tmp_path, config)


def test_missing_data_fails_before_compiling(tmp_path):
  (tmp_path / "wikitext-2").mkdir()
  config = _config(tmp_path)
  with pytest.raises(FileNotFoundError, match="wiki.train.tokens"):
    train_and_evaluate(config, tmp_path / "run")


def test_hmoe_run_regroups_on_schedule_and_checkpoints_cluster_state(straight):
  config, workdir, results = straight("hmoe")
  records = metrics.read_metrics(workdir / "metrics.jsonl")
  regroups = [r for r in records if "regroup/loss_before" in r]
  assert [r["step"] for r in regroups] == [2, 4]
  assert all(r["regroup/adopted"] == [True] for r in regroups)
  assert all(np.isfinite(r["regroup/loss_after"]) for r in regroups)
  train_records = [r for r in records if "train/cluster_load_cv" in r]
  assert train_records and len(train_records[-1]["train/cluster_load"][0]) == 2
  for key in ("train/cluster_load_cv", "train/cluster_load_max_over_mean", "train/load_cv", "regroup/stability"):
    assert any(key in r for r in records), key
  assert results["params_expert"] > 0 and np.isfinite(results["valid/word_perplexity"])
  _, state = _restore_final(workdir, config)
  clusters = state.routing_state.clusters
  assert int(clusters.num_regroups) == 2 and int(clusters.last_regroup_step) == 4
  assert float(jnp.max(jnp.abs(state.routing_state.selection_bias))) > 0  # Balancing biases were updated.
