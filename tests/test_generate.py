"""Generation: KV-cache decoding equals the full forward pass, sampling rules, bad input, and using a trained run."""

import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import tiny
from hmoe.config import HMoEConfig, MoEConfig, from_config_dict
from hmoe.inference import generate as generate_lib
from hmoe.inference.run import evaluate_splits, load_run
from hmoe.inference.sampling import Sampler
from hmoe.model.transformer import TransformerLM
from hmoe.routing.state import init_routing_state
from hmoe.testing import init_params, tiny_config
from hmoe.train.loop import train_and_evaluate

_CONFIGS = {
    "dense": tiny_config(ffn_pattern="dense"),
    # Balancing biases on: decoding must select experts with them, like the full pass.
    "moe": tiny_config(moe=MoEConfig(num_experts=4, top_k=2, expert_ff=32, bias_update_rate=0.01, num_groups=2)),
    "hmoe": tiny_config(ffn_pattern="dense,hmoe", hmoe=HMoEConfig(num_experts=8, num_clusters=2, rank=4,
                                                                  expert_ff=16, block_size=8, top_k_clusters=2)),
}


def _model(kind):
  config = _CONFIGS[kind].model
  model = TransformerLM(config)
  tokens = np.zeros((2, 8), np.int32)
  params = init_params(model, tokens, train=False)
  routing = init_routing_state(config)
  if routing.selection_bias is not None:
    routing = routing.replace(selection_bias=0.05 * jax.random.normal(jax.random.PRNGKey(1),
                                                                      routing.selection_bias.shape))
  return config, model, params, routing


@pytest.mark.parametrize("kind", ["dense", "moe", "hmoe"])
def test_cached_decoding_gives_the_full_forward_logits_position_by_position(kind, monkeypatch):
  # The decode step must compile once for all steps.
  chex.clear_trace_counter()
  monkeypatch.setattr(generate_lib, "_decode_step", chex.assert_max_traces(generate_lib._decode_step, n=1))
  config, model, params, routing = _model(kind)
  tokens = np.random.default_rng(0).integers(1, config.vocab_size, (2, 14)).astype(np.int32)
  full = jax.jit(lambda p: model.apply({"params": p}, tokens, train=False, selection_bias=routing.selection_bias)[0])(
      params)
  generator = generate_lib.Generator(config, params, routing)
  lengths = np.array([6, 3], np.int32)  # Prompts of different lengths, right-padded in one batch.
  padded = np.where(np.arange(6)[None] < lengths[:, None], tokens[:, :6], 0)
  logits, cache = generator.prefill(params, routing, padded, lengths)
  errors = [np.abs(np.asarray(logits) - np.asarray(full)[[0, 1], lengths - 1]).max()]
  positions = jnp.asarray(lengths)
  for _ in range(5):  # Teacher forcing: feed the true next tokens.
    logits, cache = generator.decode_step(params, routing, cache, tokens[[0, 1], np.asarray(positions)], positions)
    errors.append(np.abs(np.asarray(logits) - np.asarray(full)[[0, 1], np.asarray(positions)]).max())
    positions = positions + 1
  assert max(errors) < 2e-5, errors


def test_generate_streams_greedy_tokens_that_match_argmax_of_the_full_pass():
  config, model, params, routing = _model("moe")
  generator = generate_lib.Generator(config, params, routing)
  model = TransformerLM(generate_lib.decoding_config(config))  # One routing group: any number of tokens.
  prompts = [[5, 6, 7], [9]]
  steps = list(generator.generate(prompts, 4, jax.random.PRNGKey(0)))
  assert len(steps) == 4 and all(step.shape == (2,) for step in steps)
  # Causal: right padding to one length leaves the logits at each sequence's last real position unchanged.
  full = jax.jit(lambda tokens: model.apply({"params": params}, tokens, train=False,
                                            selection_bias=routing.selection_bias)[0])
  for row, prompt in enumerate(prompts):
    sequence = list(prompt)
    for step in steps:
      logits = full(np.asarray([sequence + [0] * (8 - len(sequence))], np.int32))
      assert int(step[row]) == int(jnp.argmax(logits[0, len(sequence) - 1]))
      sequence.append(int(step[row]))


def test_sampling_rules():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 512))
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  greedy = Sampler()
  np.testing.assert_array_equal(greedy(logits, keys[0]), greedy(logits, keys[1]))  # Greedy ignores the rng.
  assert np.all(np.asarray(greedy(logits, keys[0])) == 0)
  hot = Sampler(temperature=1.0)
  np.testing.assert_array_equal(hot(logits, keys[0]), hot(logits, keys[0]))  # Same rng, same tokens.
  drawn = np.asarray(hot(logits, keys[0]))
  assert set(drawn.tolist()) == {0, 1, 2, 3}
  np.testing.assert_allclose(np.bincount(drawn, minlength=4) / 512, [0.5, 0.3, 0.15, 0.05], atol=0.07)
  assert set(np.asarray(Sampler(1.0, top_k=2)(logits, keys[0])).tolist()) == {0, 1}  # Never outside the top 2.
  # Nucleus 0.7: 0.5 alone is short of it, 0.5 + 0.3 reaches it: tokens {0, 1}.
  assert set(np.asarray(Sampler(1.0, top_p=0.7)(logits, keys[0])).tolist()) == {0, 1}
  # A temperature near 0 concentrates on the argmax.
  assert np.all(np.asarray(Sampler(1e-4)(logits, keys[2])) == 0)
  for bad, message in ((dict(temperature=-1.0), "temperature"), (dict(top_k=-1), "top_k"),
                       (dict(top_p=0.0), "top_p")):
    with pytest.raises(ValueError, match=message):
      Sampler(**bad)


def test_bad_prompts_are_named():
  config, _, params, routing = _model("dense")
  generator = generate_lib.Generator(config, params, routing)
  for prompts, count, message in (([[]], 2, "prompt 0 is empty"), ([[1] * 10], 7, "exceeds the model's context of "
                                  "max_len=16"), ([[1, 99]], 2, r"ids in \[0, 64\)"), ([], 2, "at least one prompt"),
                                  ([[1]], 0, "max_new_tokens must be >= 1")):
    with pytest.raises(ValueError, match=message):
      next(generator.generate(prompts, count, jax.random.PRNGKey(0)))


@pytest.fixture(scope="module")
def run(wikitext_dir, tmp_path_factory):
  raw = tiny.get_config().to_dict()
  raw["data"]["data_dir"] = str(wikitext_dir)
  raw["data"]["eval_splits"] = ("valid",)
  raw["model"]["moe"]["bias_update_rate"] = 0.01
  raw["train"].update(num_steps=3, warmup_steps=1, checkpoint_every=3, eval_every=100)  # Odd: biases cannot cancel.
  workdir = tmp_path_factory.mktemp("run")
  results = train_and_evaluate(from_config_dict(raw), workdir)
  return workdir, results


def _snapshot(workdir: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}


def test_a_trained_run_loads_scores_generates_and_evaluates_without_writing(run, wikitext_dir):
  workdir, train_results = run
  before = _snapshot(workdir)
  loaded = load_run(workdir)
  assert loaded.step == 3 and float(jnp.max(jnp.abs(loaded.routing_state.selection_bias))) > 0
  text = loaded.generate("the cat", max_new_tokens=5)
  assert isinstance(text, str)
  score = loaded.score("the cat sat on a mat")
  assert score["num_tokens"] == len(loaded.tokenizer.encode("the cat sat on a mat")) and score["loss"] > 0
  results = evaluate_splits(loaded, ["valid"])
  np.testing.assert_allclose(results["valid"]["loss"], train_results["valid/loss"], rtol=1e-6)
  assert results["valid"]["num_tokens"] == train_results["valid/num_tokens"]
  assert _snapshot(workdir) == before  # Loading, generating and evaluating wrote nothing.


def test_a_directory_that_is_not_a_run_is_named(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({}))
  with pytest.raises(FileNotFoundError, match=r"is not a run directory: it has no tokenizer.json, checkpoints"):
    load_run(tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
