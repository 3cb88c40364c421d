"""Offloaded inference: same tokens and logits as the resident model at every policy, budget and mode; the budget
bounds the real cache arrays; replaying the engine's trace reproduces its counts; bad budgets are named."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from hmoe.config import HMoEConfig, MoEConfig
from hmoe.inference import generate as generate_lib, offload, storage
from hmoe.inference.residency import replay
from hmoe.model.transformer import TransformerLM
from hmoe.routing.state import init_routing_state
from hmoe.testing import init_params, tiny_config

# Two routed layers, so prefetch has a next layer to predict.
_CONFIGS = {
    "moe": tiny_config(ffn_pattern="moe", shared_expert_ff=8,
                       moe=MoEConfig(num_experts=4, top_k=2, expert_ff=32, bias_update_rate=0.01)).model,
    "hmoe": tiny_config(ffn_pattern="hmoe", hmoe=HMoEConfig(num_experts=8, num_clusters=4, rank=4, expert_ff=16,
                                                            block_size=8, top_k_clusters=1, top_k_experts=2)).model,
}
_PROMPTS = [[5, 6, 7, 8], [9, 3]]
_STEPS = 5


@functools.cache
def _model(kind):
  config = _CONFIGS[kind]
  params = init_params(TransformerLM(config), np.zeros((2, 8), np.int32), train=False)
  routing = init_routing_state(config)
  if routing.selection_bias is not None:  # Decisions must use the biases, as in the resident model.
    routing = routing.replace(selection_bias=0.05 * jax.random.normal(jax.random.PRNGKey(1),
                                                                      routing.selection_bias.shape))
  return config, params, routing


def _greedy(generator):
  """Greedy tokens [steps, B] and the logits [steps, B, V] they were picked from."""
  tokens, lengths = generator._pad(_PROMPTS, _STEPS)
  logits, cache = generator.run_prefill(tokens, lengths)
  positions, all_tokens, all_logits = np.asarray(lengths), [], []
  for _ in range(_STEPS):
    all_logits.append(np.asarray(logits))
    next_tokens = np.argmax(all_logits[-1], axis=-1).astype(np.int32)
    all_tokens.append(next_tokens)
    logits, cache = generator.run_decode_step(cache, next_tokens, positions)
    positions = positions + 1
  return np.stack(all_tokens), np.stack(all_logits)


@functools.cache
def _reference(kind, compressed=False):
  config, params, routing = _model(kind)
  params = storage.compress(params, config) if compressed else params
  return _greedy(generate_lib.Generator(config, params, routing))


def _check(kind, settings, compressed=False):
  """Runs the offloaded model; asserts outputs, budget and trace replay; returns the engine."""
  config, params, routing = _model(kind)
  params = storage.compress(params, config) if compressed else params
  engine = offload.OffloadedModel(config, params, routing, settings)
  tokens, logits = _greedy(offload.OffloadedGenerator(engine))
  ref_tokens, ref_logits = _reference(kind, compressed)
  np.testing.assert_array_equal(tokens, ref_tokens)
  np.testing.assert_allclose(logits, ref_logits, atol=2e-5, rtol=1e-5)
  budget = settings.budget_bytes or int(settings.budget_fraction * engine.expert_bytes)
  cache_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(engine.slots))
  assert engine.resident_expert_bytes == cache_bytes + engine.resident_base_bytes <= budget
  assert cache_bytes == engine.residency.num_slots * engine.unit_bytes
  replayed = replay(engine.trace, num_layers=2, units_per_layer=engine.units_per_layer,
                    num_slots=engine.residency.num_slots, policy=settings.policy, scope=settings.scope,
                    prefetch=settings.prefetch)
  assert replayed == engine.residency.stats
  return engine


def _smallest_budget(kind, mode, scope="global"):
  engine = offload.OffloadedModel(*_model(kind), offload.OffloadConfig(mode=mode))
  return engine.resident_base_bytes + engine.unit_bytes * (2 if scope == "per_layer" else 1)


@pytest.mark.parametrize("kind,mode", [("moe", "expert"), ("hmoe", "cluster"), ("hmoe", "residual")])
def test_offloaded_generation_equals_resident_at_every_policy_and_budget(kind, mode):
  smallest = _smallest_budget(kind, mode)
  middle = 0.75 if mode == "residual" else 0.5  # Resident bases take 57% of this tiny HMoE's expert bytes.
  budgets = [{"budget_fraction": 1.0}, {"budget_fraction": middle}, {"budget_fraction": None, "budget_bytes": smallest}]
  engines = [_check(kind, offload.OffloadConfig(mode=mode, policy="all"))]
  for policy, prefetch in (("lru", False), ("lru", True), ("lfu", True)):
    for budget in budgets:
      engines.append(_check(kind, offload.OffloadConfig(mode=mode, policy=policy, prefetch=prefetch, **budget)))
  assert engines[0].residency.stats.loads == 0  # "all": nothing moves after the preload.
  smallest_engine = engines[-1]
  assert smallest_engine.residency.num_slots == 1 and smallest_engine.residency.stats.waves > 2 * (_STEPS + 1)
  assert any(engine.residency.stats.prefetch_loads > 0 for engine in engines)  # Prefetch did act somewhere.
  assert engines[1].residency.stats.hit_rate > smallest_engine.residency.stats.hit_rate


def test_per_layer_budget_and_compressed_weights():
  for mode in ("cluster", "residual"):
    settings = offload.OffloadConfig(mode=mode, scope="per_layer", budget_fraction=None,
                                     budget_bytes=_smallest_budget("hmoe", mode, "per_layer"), prefetch=True)
    engine = _check("hmoe", settings)
    assert engine.residency.slots_per_pool == [1, 1]
  engine = _check("moe", offload.OffloadConfig(budget_fraction=0.5, policy="lfu", prefetch=True), compressed=True)
  assert engine.unit_bytes < 3 * 32 * 32 * 4 / 4  # INT4 experts move, not float32 ones.


def test_host_units_and_cache_live_in_their_memory_kinds():
  engine = offload.OffloadedModel(*_model("hmoe"), offload.OffloadConfig(budget_fraction=0.75, mode="residual"))
  kinds = {memory.kind for memory in jax.devices()[0].addressable_memories()}
  host_kind = "pinned_host" if "pinned_host" in kinds else None
  if host_kind is None:
    pytest.fail(f"this JAX CPU client has no pinned_host memory ({kinds}): units would stay in device memory")
  for leaf in jax.tree.leaves(engine._host_units[0][0]):
    assert leaf.sharding.memory_kind == host_kind
  for leaf in jax.tree.leaves((engine.slots, engine.resident_bases)):
    assert leaf.sharding.memory_kind == "device"


@pytest.mark.parametrize("settings,message", [
    (dict(budget_fraction=0.0), r"budget_fraction=0.0 must be in \(0, 1\]"),
    (dict(budget_fraction=1.5), r"budget_fraction=1.5 must be in \(0, 1\]"),
    (dict(budget_fraction=None, budget_bytes=-5), "budget_bytes=-5 must be > 0"),
    (dict(budget_fraction=None, budget_bytes=0), "budget_bytes=0 must be > 0"),
    (dict(budget_fraction=0.5, budget_bytes=100), "exactly one of"),
    (dict(mode="expert"), "mode='expert' does not apply to a hmoe model"),
    (dict(policy="random"), "policy='random'"),
])
def test_bad_settings_are_named(settings, message):
  with pytest.raises(ValueError, match=message):
    offload.OffloadedModel(*_model("hmoe"), offload.OffloadConfig(**settings))


@pytest.mark.parametrize("mode,unit", [("cluster", "one cluster"), ("residual", "one expert's residual factors")])
def test_a_budget_below_one_unit_is_named(mode, unit):
  smallest = _smallest_budget("hmoe", mode)
  with pytest.raises(ValueError, match=f"smaller than the smallest legal one: 1 x {unit}"):
    offload.OffloadedModel(*_model("hmoe"), offload.OffloadConfig(mode=mode, budget_fraction=None,
                                                                  budget_bytes=smallest - 1))


def test_a_dense_model_has_nothing_to_offload():
  config = dataclasses.replace(_CONFIGS["moe"], ffn_pattern="dense")
  params = init_params(TransformerLM(config), np.zeros((1, 4), np.int32))
  with pytest.raises(ValueError, match="no experts to offload"):
    offload.OffloadedModel(config, params, init_routing_state(config), offload.OffloadConfig())
