"""Transformer LM: shapes, causality, logical axes, dtypes, and a golden one-step regression."""

import dataclasses
import functools
import math

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmoe.model.layers import CausalSelfAttention, DenseFeedForward, RMSNorm
from hmoe.model.param_counts import parameter_counts
from hmoe.model.transformer import Block, TransformerLM, cross_entropy
from hmoe.testing import dummy_batch, init_params, init_train_state, tiny_config
from hmoe.train import optimizer as optimizer_lib, step as step_lib


@functools.lru_cache
def _init(config):
  """Model and variables of a (frozen, hashable) config, initialised once for all its tests."""
  model = TransformerLM(config.model)
  tokens = jnp.zeros((2, config.data.seq_len), jnp.int32)
  return model, jax.jit(model.init)(jax.random.PRNGKey(0), tokens)  # Compiled: op-by-op init is slow.


@pytest.mark.parametrize("ffn_pattern", ["dense", "moe", "dense,moe"])
def test_causality_through_gradients(ffn_pattern):
  # Untied, so the table rows fed as inputs do not also act as output weights. Eval mode routes dropless: with
  # capacity drops, priority is k-major and a later token could evict an earlier token's second choice.
  config = tiny_config(ffn_pattern=ffn_pattern, tie_embeddings=False)
  model, variables = _init(config)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 16), 0, 64)
  embedded_LxD = variables["params"]["embedding"].value[tokens[0]]
  position = 7

  def output_at(embedded_LxD):
    # Feed embeddings directly: a table with one row per position, indexed by position.
    table_VxD = nn.meta.unbox(variables["params"])["embedding"].at[:16].set(embedded_LxD)
    params = {**nn.meta.unbox(variables["params"]), "embedding": table_VxD}
    logits, _ = model.apply({"params": params}, jnp.arange(16)[None])
    return jnp.sum(logits[0, position])

  per_position = jnp.sum(jnp.abs(jax.jit(jax.grad(output_at))(embedded_LxD)), axis=-1)
  assert bool(jnp.all(per_position[position + 1:] == 0)), per_position
  assert bool(jnp.all(per_position[: position + 1] > 0)), per_position


def test_every_parameter_has_logical_axes():
  config = tiny_config(tie_embeddings=False)
  _, variables = _init(config)
  leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_shapes_and_initial_loss_near_uniform(tie_embeddings):
  config = tiny_config(tie_embeddings=tie_embeddings)
  model, variables = _init(config)
  batch = dummy_batch(config)
  logits, stats = model.apply(variables, batch["inputs"])
  chex.assert_shape(logits, (8, 16, 64))
  chex.assert_shape(stats.expert_load, (1, 4))
  # By design the initial logits have std ~1 (unit-norm rows after the final norm against N(0, 1/D) output
  # weights), and Gaussian logits of std s cost log(V) + s^2 / 2 nats on random targets: half a nat above uniform,
  # 2 nats with twice the logit scale, 1/8 with half. Averaged over three batches to keep the noise below 0.1.
  assert 0.9 < float(jnp.std(logits)) < 1.1
  excess = []
  for seed in range(3):
    batch = dummy_batch(config, seed)
    nll, count = cross_entropy(model.apply(variables, batch["inputs"])[0], batch["targets"])
    assert float(count) == 8 * 16
    excess.append(float(nll / count) - math.log(64.0))
  assert abs(np.mean(excess) - 0.5) < 0.15, excess


@pytest.mark.parametrize("ffn_pattern", ["dense", "dense,moe"])
def test_bfloat16_compute_keeps_float32_params_and_tracks_float32_logits(ffn_pattern):
  config = tiny_config(dtype="bfloat16", ffn_pattern=ffn_pattern)
  model, variables = _init(config)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nn.meta.unbox(variables)))
  # Norm scales start at 1, where a bf16 path that skipped them would look right: draw them around 1.
  rng = np.random.default_rng(0)
  variables = {"params": jax.tree_util.tree_map_with_path(
      lambda path, p: 1.0 + 0.3 * jnp.asarray(rng.normal(size=p.shape), jnp.float32)
      if path[-1].key == "scale" else p, nn.meta.unbox(variables["params"]))}
  inputs = dummy_batch(config)["inputs"]
  logits, _ = model.apply(variables, inputs)
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
  # The same parameters in float32: logits of std ~1 through two bf16 blocks differ by ~1e-2 (measured: max 0.08,
  # mean 0.008). A routed layer may flip a near-tied top-k choice (3 tokens of 128 here), so for the MoE model only
  # almost every token has to agree.
  reference, _ = TransformerLM(dataclasses.replace(config.model, dtype="float32")).apply(variables, inputs)
  error_BxL = np.max(np.abs(np.asarray(logits) - np.asarray(reference)), axis=-1)
  assert float(np.mean(np.abs(np.asarray(logits) - np.asarray(reference)))) < 0.02
  if ffn_pattern == "dense":
    assert float(error_BxL.max()) < 0.15
  else:
    assert float(np.mean(error_BxL < 0.15)) >= 0.95, np.sort(error_BxL.ravel())[-8:]


def test_cross_entropy_with_weights_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3.0
  targets = rng.integers(0, 7, (2, 5)).astype(np.int32)
  weights = np.array([[1, 1, 0, 1, 0], [0.5, 1, 1, 0, 2]], np.float32)
  nll_sum, count = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
  logits64 = logits.astype(np.float64)
  log_z = np.log(np.sum(np.exp(logits64 - logits64.max(-1, keepdims=True)), -1)) + logits64.max(-1)
  nll = log_z - np.take_along_axis(logits64, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(nll_sum), np.sum(nll * weights), rtol=1e-5)
  assert float(count) == 7.5  # The summed weight, not the number of positions (10) or of nonzero weights (7).
  plain_sum, plain_count = cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
  np.testing.assert_allclose(float(plain_sum), np.sum(nll), rtol=1e-5)
  assert float(plain_count) == 10
  # bf16 logits are scored in float32.
  bf16_sum, _ = cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets), jnp.asarray(weights))
  assert bf16_sum.dtype == jnp.float32


# Golden values of the tiny config (seed 0, dummy batch 0), recorded on CPU with jax 0.10.2.
_GOLDEN_LOSS_BEFORE = 4.715415
_GOLDEN_GRAD_NORM = 2.444733
_GOLDEN_LOSS_AFTER = 3.840160  # After two updates on the same batch.


def test_one_step_golden_regression():
  config = tiny_config()
  model, optimizer = TransformerLM(config.model), optimizer_lib.make_optimizer(config.train)
  state = init_train_state(model, optimizer, config)
  batch = dummy_batch(config)
  train_fn = jax.jit(functools.partial(step_lib.train_step, model=model, optimizer=optimizer, config=config))
  losses, grad_norms = [], []
  for _ in range(3):  # The warmup schedule starts at learning rate 0, so the first update is a no-op.
    state, step_metrics = train_fn(state, batch)
    losses.append(float(step_metrics["loss"]))
    grad_norms.append(float(step_metrics["grad_norm"]))
  chex.assert_trees_all_close(losses[0], _GOLDEN_LOSS_BEFORE, rtol=1e-4)
  chex.assert_trees_all_close(grad_norms[0], _GOLDEN_GRAD_NORM, rtol=1e-3)
  chex.assert_trees_all_close(losses[2], _GOLDEN_LOSS_AFTER, rtol=1e-3)
  assert losses[2] < losses[0]


def test_shared_expert_adds_a_dense_ffn_beside_the_routed_one_and_counts_as_active():
  config = tiny_config(shared_expert_ff=24)
  batch = dummy_batch(config)
  params = init_params(TransformerLM(config.model), batch["inputs"])
  assert "shared_expert" in params["block_1"] and "shared_expert" not in params["block_0"]  # block_0 is dense.
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, config.model.d_model))
  block_params = params["block_1"]
  with_shared, _ = Block(config.model, "moe").apply({"params": block_params}, x, train=False)
  without = {key: value for key, value in block_params.items() if key != "shared_expert"}
  routed_only, _ = Block(dataclasses.replace(config.model, shared_expert_ff=0), "moe").apply(
      {"params": without}, x, train=False)
  # The FFN input is the post-attention residual, normalised; recompute it to add the shared expert's output.
  attended = CausalSelfAttention(config.model.num_heads, config.model.rope_base).apply(
      {"params": block_params["attention"]}, RMSNorm().apply({"params": block_params["attention_norm"]}, x))
  normed = RMSNorm().apply({"params": block_params["ffn_norm"]}, x + attended)
  shared = DenseFeedForward(24).apply({"params": block_params["shared_expert"]}, normed)
  chex.assert_trees_all_close(with_shared, routed_only + shared, atol=1e-5)
  counts = parameter_counts(params, config.model)
  plain = parameter_counts(init_params(TransformerLM(tiny_config().model), batch["inputs"]), tiny_config().model)
  shared_size = 3 * config.model.d_model * 24
  assert counts["params_expert"] == plain["params_expert"]
  assert counts["params_active"] == plain["params_active"] + shared_size


def test_dropout_is_training_only_and_keyed_by_the_step_rng():
  config = tiny_config(dropout_rate=0.3)
  model, variables = _init(config)
  plain_model = TransformerLM(tiny_config().model)  # Same parameter tree, dropout off.
  batch = dummy_batch(config)
  evaluated, _ = model.apply(variables, batch["inputs"], train=False)
  chex.assert_trees_all_close(evaluated, plain_model.apply(variables, batch["inputs"], train=False)[0])
  train_logits = [model.apply(variables, batch["inputs"], train=True, rngs={"dropout": jax.random.PRNGKey(seed)})[0]
                  for seed in (0, 0, 1)]
  chex.assert_trees_all_close(train_logits[0], train_logits[1])  # Same key, same mask.
  assert float(jnp.max(jnp.abs(train_logits[0] - train_logits[2]))) > 1e-3  # Another key, another mask.
  assert float(jnp.max(jnp.abs(train_logits[0] - evaluated))) > 1e-3
  # Without the rng, a training apply with dropout on must fail loudly rather than silently skip dropout.
  with pytest.raises(flax.errors.InvalidRngError, match='needs PRNG for "dropout"'):
    model.apply(variables, batch["inputs"], train=True)

  # Through the train step: the loss differs from the dropout-free model's and repeats exactly from the same state.
  def first_losses(cfg):
    lm, optimizer = TransformerLM(cfg.model), optimizer_lib.make_optimizer(cfg.train)
    state = init_train_state(lm, optimizer, cfg)
    train_fn = jax.jit(functools.partial(step_lib.train_step, model=lm, optimizer=optimizer, config=cfg))
    return [float(train_fn(state, batch)[1]["ce_loss"]) for _ in range(2)]

  with_dropout, without = first_losses(config), first_losses(tiny_config())
  chex.assert_trees_all_close(with_dropout[0], with_dropout[1], rtol=1e-6)
  assert abs(with_dropout[0] - without[0]) > 1e-4
