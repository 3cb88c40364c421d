"""The optimizer: per-parameter fan-in learning-rate scaling of FFN output projections (muP for Adam)."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from hmoe.model.transformer import TransformerLM, cross_entropy
from hmoe.testing import dummy_batch, tiny_config
from hmoe.train import optimizer as optimizer_lib

_BASE = 128  # The "dense width the lr was tuned at" in these tests.


def _model_and_params(config):
  model = TransformerLM(config.model)
  params = model.init(jax.random.PRNGKey(0), jnp.asarray(dummy_batch(config)["inputs"]), train=False)["params"]
  return model, nn.meta.unbox(params)


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


def test_scaled_update_equals_plain_adamw_times_multiplier():
  config = tiny_config(shared_expert_ff=16)
  model, params = _model_and_params(config)
  batch = dummy_batch(config)

  def loss(p):
    logits, _ = model.apply({"params": p}, batch["inputs"], train=True, rngs={"jitter": jax.random.PRNGKey(1)})
    nll_sum, count = cross_entropy(logits, batch["targets"])
    return nll_sum / count

  grads = jax.grad(loss)(params)
  plain_opt = optimizer_lib.make_optimizer(config.train)
  scaled_opt = optimizer_lib.make_optimizer(dataclasses.replace(config.train, fan_in_lr_base=_BASE))
  # Two updates so Adam's moments and the weight decay both enter the comparison.
  plain, scaled = plain_opt.init(params), scaled_opt.init(params)
  for _ in range(2):
    plain_updates, plain = plain_opt.update(grads, plain, params)
    scaled_updates, scaled = scaled_opt.update(grads, scaled, params)
  multipliers = optimizer_lib.fan_in_lr_multipliers(params, _BASE)
  expected = jax.tree.map(lambda u, m: u * m, plain_updates, multipliers)
  chex.assert_trees_all_close(scaled_updates, expected, rtol=1e-6, atol=1e-9)
  # The dense FFN at the base width is untouched: fan_in_lr_base=d_ff leaves a dense model's training unchanged.
  dense_multipliers = optimizer_lib.fan_in_lr_multipliers(params, 64)
  assert dense_multipliers["block_0"]["ffn"]["w_down"] == 1.0
