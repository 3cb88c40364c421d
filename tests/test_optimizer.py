"""The optimizer: fan-in learning-rate scaling (muP for Adam), the schedule, the weight-decay mask, clipping."""

import dataclasses
import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hmoe.config import HMoEConfig
from hmoe.model.transformer import TransformerLM, cross_entropy
from hmoe.testing import dummy_batch, tiny_config
from hmoe.train import optimizer as optimizer_lib

_BASE = 128  # The "dense width the lr was tuned at" in these tests.


@functools.lru_cache
def _model_and_params(config):
  """Shared by the tests of one config (frozen, hashable); a jitted init compiles once instead of op by op."""
  model = TransformerLM(config.model)
  init = jax.jit(functools.partial(model.init, train=False))
  params = init(jax.random.PRNGKey(0), jnp.asarray(dummy_batch(config)["inputs"]))["params"]
  return model, nn.meta.unbox(params)


@functools.lru_cache
def _optimizer_and_update(config):
  """The optimizer of a (frozen, hashable) TrainConfig and its jitted update, compiled once per config and tree."""
  optimizer = optimizer_lib.make_optimizer(config)
  return optimizer, jax.jit(optimizer.update)


def test_multipliers_follow_the_fan_in_of_each_output_projection():
  # Layer 0 dense (d_ff=64), layer 1 a shared expert (width 16) beside 4 routed experts (width 32).
  config = tiny_config(shared_expert_ff=16)
  _, params = _model_and_params(config)
  multipliers = optimizer_lib.fan_in_lr_multipliers(params, _BASE)
  assert multipliers["block_0"]["ffn"]["w_down"] == pytest.approx(_BASE / 64)
  assert multipliers["block_1"]["moe"]["w_down"] == pytest.approx(_BASE / 32)
  assert multipliers["block_1"]["shared_expert"]["w_down"] == pytest.approx(_BASE / 16)
  scaled = {jax.tree_util.keystr(path) for path, m in jax.tree_util.tree_leaves_with_path(multipliers) if m != 1.0}
  assert scaled == {"['block_0']['ffn']['w_down']", "['block_1']['moe']['w_down']",
                    "['block_1']['shared_expert']['w_down']"}


def test_hmoe_bases_get_the_fan_in_multiplier_and_low_rank_factors_do_not():
  config = tiny_config(ffn_pattern="dense,hmoe",
                       hmoe=HMoEConfig(num_experts=4, num_clusters=2, rank=4, top_k_experts=2, expert_ff=32))
  _, params = _model_and_params(config)
  multipliers = optimizer_lib.fan_in_lr_multipliers(params, _BASE)
  scaled = {jax.tree_util.keystr(path): m for path, m in jax.tree_util.tree_leaves_with_path(multipliers) if m != 1.0}
  assert scaled == {"['block_0']['ffn']['w_down']": pytest.approx(_BASE / config.model.d_ff),
                    "['block_1']['hmoe']['base_down']": pytest.approx(_BASE / config.model.hmoe.expert_ff)}


def test_scaled_update_equals_plain_adamw_times_multiplier():
  config = tiny_config(shared_expert_ff=16)
  model, params = _model_and_params(config)
  batch = dummy_batch(config)

  def loss(p):
    logits, _ = model.apply({"params": p}, batch["inputs"], train=True, rngs={"jitter": jax.random.PRNGKey(1)})
    nll_sum, count = cross_entropy(logits, batch["targets"])
    return nll_sum / count

  grads = jax.jit(jax.grad(loss))(params)
  plain_opt, plain_update = _optimizer_and_update(config.train)
  scaled_opt, scaled_update = _optimizer_and_update(dataclasses.replace(config.train, fan_in_lr_base=_BASE))
  # Two updates so Adam's moments and the weight decay both enter the comparison.
  plain, scaled = plain_opt.init(params), scaled_opt.init(params)
  for _ in range(2):
    plain_updates, plain = plain_update(grads, plain, params)
    scaled_updates, scaled = scaled_update(grads, scaled, params)
  multipliers = optimizer_lib.fan_in_lr_multipliers(params, _BASE)
  expected = jax.tree.map(lambda u, m: u * m, plain_updates, multipliers)
  chex.assert_trees_all_close(scaled_updates, expected, rtol=1e-6, atol=1e-9)
  # The dense FFN at the base width is untouched: fan_in_lr_base=d_ff leaves a dense model's training unchanged.
  dense_multipliers = optimizer_lib.fan_in_lr_multipliers(params, 64)
  assert dense_multipliers["block_0"]["ffn"]["w_down"] == 1.0


# ----------------------------------------------------------------------------------------------------------------------
# Schedule, weight-decay mask, gradient clipping
# ----------------------------------------------------------------------------------------------------------------------


def _train_config(**overrides):
  config = dataclasses.replace(tiny_config().train, **overrides)
  config.validate()
  return config


def test_learning_rate_schedule_is_linear_warmup_then_cosine_to_the_floor():
  config = _train_config(num_steps=110, warmup_steps=10, learning_rate=2e-3, min_lr_ratio=0.1)
  schedule = optimizer_lib.learning_rate_schedule(config)
  peak, floor = 2e-3, 2e-4

  def expected(step):
    if step < 10:
      return peak * step / 10
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (min(step, 110) - 10) / 100))

  for step in (0, 5, 10, 35, 60, 85, 110, 200):
    assert float(schedule(step)) == pytest.approx(expected(step), rel=1e-5, abs=1e-12), step
  # The points of the formula the steps above stand for: 0, half the peak mid-warmup, the peak, the middle of the
  # cosine halfway between peak and floor, the floor at num_steps and after.
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose([float(schedule(s)) for s in (5, 10, 60, 110, 200)],
                             [peak / 2, peak, (peak + floor) / 2, floor, floor], rtol=1e-5)


def _named_params():
  """A parameter tree with the model's leaf kinds: norm scales (1-D), matrices, embedding, router kernels."""
  rng = np.random.default_rng(0)
  leaf = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  return {
      "embedding": leaf(16, 4),
      "final_norm": {"scale": leaf(4)},
      "block_0": {"attention_norm": {"scale": leaf(4)},
                  "attention": {"w_qkv": leaf(4, 3, 2, 2), "w_out": leaf(2, 2, 4)},
                  "ffn_norm": {"scale": leaf(4)},
                  "ffn": {"w_gate": leaf(4, 8), "w_up": leaf(4, 8), "w_down": leaf(8, 4)}},
      "block_1": {"moe": {"router": {"kernel": leaf(4, 3)}, "w_down": leaf(3, 8, 4)},
                  "hmoe": {"router": {"kernel": leaf(4, 2, 2)}, "base_gate": leaf(2, 4, 8)}},
  }


def test_weight_decay_skips_1d_leaves_and_decays_matrices_embeddings_and_routers():
  params = _named_params()
  mask = optimizer_lib.decay_mask(params)
  decayed = {jax.tree_util.keystr(path) for path, m in jax.tree_util.tree_leaves_with_path(mask) if m}
  assert {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)} - decayed == {
      "['final_norm']['scale']", "['block_0']['attention_norm']['scale']", "['block_0']['ffn_norm']['scale']"}
  # By value: with a zero gradient Adam's step is 0, so the update is the decoupled decay -lr * wd * p alone.
  config = _train_config(warmup_steps=0, weight_decay=0.25, learning_rate=1e-2)
  lr = float(optimizer_lib.learning_rate_schedule(config)(0))
  assert lr == pytest.approx(1e-2)
  optimizer, update = _optimizer_and_update(config)
  updates, _ = update(jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params)
  expected = jax.tree.map(lambda p: -lr * 0.25 * p if p.ndim > 1 else jnp.zeros_like(p), params)
  chex.assert_trees_all_close(updates, expected, rtol=1e-6, atol=1e-12)
  assert float(jnp.abs(updates["block_1"]["moe"]["router"]["kernel"]).min()) > 0  # Routers are decayed.


def _first_moment(opt_state):
  return optax.tree_utils.tree_get(opt_state, "mu")


@pytest.mark.parametrize("grad_norm", [8.0, 0.5])
def test_gradients_above_the_clip_norm_are_rescaled_to_it_before_adam(grad_norm):
  params = _named_params()
  config = _train_config(grad_clip_norm=2.0, b1=0.8)
  raw = jax.tree.map(lambda p: jnp.ones_like(p) * jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape), params)
  grads = jax.tree.map(lambda g: g * grad_norm / float(optax.tree.norm(raw)), raw)
  assert float(optax.tree.norm(grads)) == pytest.approx(grad_norm, rel=1e-6)
  optimizer, update = _optimizer_and_update(config)
  _, opt_state = update(grads, optimizer.init(params), params)
  clipped = jax.tree.map(lambda g: g * min(1.0, 2.0 / grad_norm), grads)
  mu = _first_moment(opt_state)
  chex.assert_trees_all_close(mu, jax.tree.map(lambda g: (1 - 0.8) * g, clipped), rtol=1e-5, atol=1e-9)
  # Clipped gradients have exactly the clip norm; smaller ones are untouched.
  assert float(optax.tree.norm(mu)) / (1 - 0.8) == pytest.approx(min(grad_norm, 2.0), rel=1e-5)
