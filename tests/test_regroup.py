"""Regrouping: identity when not adopted, consistent permutation of params/moments/stats, SVD re-init error."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmoe import regroup, step as step_lib
from hmoe.config import HMoEConfig
from hmoe.model import TransformerLM
from hmoe.testing import dummy_batch, tiny_config


@functools.lru_cache(maxsize=None)
def _setup(rank=3, min_gain=0.01):
  hmoe_cfg = HMoEConfig(num_experts=8, num_clusters=2, rank=rank, top_k_clusters=1, top_k_experts=2, expert_ff=16,
                        block_size=4, min_gain=min_gain, recluster_every=1, kmeans_iters=5)
  config = tiny_config(d_model=8, num_heads=2, ffn_pattern="dense,hmoe", hmoe=hmoe_cfg)
  model, optimizer = TransformerLM(config.model), step_lib.make_optimizer(config.train)
  state = step_lib.init_train_state(model, optimizer, config)
  train_fn = jax.jit(functools.partial(step_lib.train_step, model=model, optimizer=optimizer, config=config))
  for i in range(2):  # Non-trivial moments, then non-zero learning rate updates.
    state, _ = train_fn(state, dummy_batch(config, i))
  cluster_state = regroup.init_cluster_state(config.model)
  # Plant activation centroids that pair even and odd experts, across the initial clusters {0..3} and {4..7}.
  direction = jax.random.normal(jax.random.PRNGKey(0), (8,))
  parity = jnp.where(jnp.arange(8) % 2 == 0, 1.0, -1.0)
  noise = 0.1 * jax.random.normal(jax.random.PRNGKey(1), cluster_state.centroid.shape)
  centroids = parity[None, :, None] * direction[None, None, :] + noise
  bias = jax.random.normal(jax.random.PRNGKey(2), cluster_state.selection_bias.shape)
  cluster_state = cluster_state.replace(centroid=centroids, token_count=jnp.ones_like(cluster_state.token_count),
                                        selection_bias=bias)
  fn = jax.jit(functools.partial(regroup.recluster, config=config.model, optimizer=optimizer))
  return config, state, cluster_state, fn


def _adam_moments(opt_state):
  return opt_state[1][0].mu, opt_state[1][0].nu


def test_not_adopted_is_identity():
  _, state, cluster_state, fn = _setup(min_gain=1e9)
  params, opt_state, new_cluster = fn(state.params, state.opt_state, cluster_state, jnp.asarray(7))
  chex.assert_trees_all_close(params, state.params, atol=0, rtol=0)
  chex.assert_trees_all_close(opt_state, state.opt_state, atol=0, rtol=0)
  assert not bool(new_cluster.adopted[0]) and float(new_cluster.stability[0]) == 0.0
  chex.assert_trees_all_close(new_cluster.centroid, cluster_state.centroid, atol=0, rtol=0)
  assert int(new_cluster.last_regroup_step) == 7 and int(new_cluster.num_regroups) == 1
  assert float(jnp.sum(new_cluster.token_count)) == 0.0  # A new statistics window starts.


@pytest.mark.parametrize("rank", [8, 3])
def test_adopted_regroup_permutes_consistently_and_preserves_experts(rank):
  config, state, cluster_state, fn = _setup(rank=rank, min_gain=-1.0)  # Always adopt.
  old = state.params["block_1"]["hmoe"]
  old_weights = regroup.reconstruct_experts(old)
  params, opt_state, new_cluster = fn(state.params, state.opt_state, cluster_state, jnp.asarray(3))
  new = params["block_1"]["hmoe"]
  new_weights = regroup.reconstruct_experts(new)
  assert bool(new_cluster.adopted[0])
  perm = np.asarray(new_cluster.expert_id[0])  # Initial ids = old positions here (first regroup).
  np.testing.assert_array_equal(np.sort(perm), np.arange(8))
  assert float(new_cluster.stability[0]) == 1.0  # The planted parity grouping replaced the initial one.
  np.testing.assert_array_equal(np.sort(perm[:4] % 2), [0, 0, 0, 0])

  # Router columns, centroids and router moments follow their experts.
  np.testing.assert_allclose(np.asarray(new["router"]).reshape(8, 8), np.asarray(old["router"]).reshape(8, 8)[:, perm])
  np.testing.assert_allclose(new_cluster.centroid[0], cluster_state.centroid[0][perm])
  np.testing.assert_allclose(new_cluster.selection_bias[0], cluster_state.selection_bias[0][perm])
  for new_moments, old_moments in zip(_adam_moments(opt_state), _adam_moments(state.opt_state)):
    new_m, old_m = new_moments["block_1"]["hmoe"], old_moments["block_1"]["hmoe"]
    np.testing.assert_allclose(np.asarray(new_m["router"]).reshape(8, 8),
                               np.asarray(old_m["router"]).reshape(8, 8)[:, perm])
    for name in ("base_gate", "u_up", "v_down"):
      assert float(jnp.max(jnp.abs(new_m[name]))) == 0.0  # Re-initialised tensors restart their moments.
    chex.assert_trees_all_close(new_moments["block_0"], old_moments["block_0"])  # Other layers untouched.
  chex.assert_trees_all_close(params["block_0"], state.params["block_0"])

  for name in ("gate", "up", "down"):
    moved = np.asarray(old_weights[name])[perm]  # Each expert's weights, in its new position.
    base = np.asarray(new[f"base_{name}"])
    np.testing.assert_allclose(base, moved.reshape(2, 4, *moved.shape[1:]).mean(1), atol=1e-5)
    error = np.sum((np.asarray(new_weights[name]) - moved) ** 2, axis=(1, 2))
    residual = moved - np.repeat(base, 4, axis=0)
    singular = np.linalg.svd(residual, compute_uv=False)
    expected = np.sum(singular[:, rank:] ** 2, axis=-1)  # Eckart-Young: the discarded spectrum.
    np.testing.assert_allclose(error, expected, atol=1e-4, rtol=1e-3)


def test_recluster_is_deterministic_and_compiles_once():
  config, state, cluster_state, _ = _setup(min_gain=-1.0)
  optimizer = step_lib.make_optimizer(config.train)
  traced = chex.assert_max_traces(regroup.recluster, n=1)
  fn = jax.jit(functools.partial(traced, config=config.model, optimizer=optimizer))
  first = fn(state.params, state.opt_state, cluster_state, jnp.asarray(5))
  second = fn(state.params, state.opt_state, cluster_state, jnp.asarray(5))
  chex.assert_trees_all_close(first, second, atol=0, rtol=0)
  fn(first[0], first[1], first[2], jnp.asarray(10))  # A later regroup reuses the compiled function.


def test_statistics_update_is_an_ema_that_ignores_idle_experts():
  config = tiny_config(ffn_pattern="hmoe", hmoe=HMoEConfig(num_experts=4, num_clusters=2, expert_ff=16, rank=2))
  state = regroup.init_cluster_state(config.model)
  counts = jnp.array([[2.0, 0.0, 1.0, 1.0]] * 2)
  sums = jnp.ones((2, 4, 32)) * counts[..., None] * 3.0  # Mean input 3.0 for experts that got tokens.
  state = regroup.update_statistics(state, counts, sums, beta=0.5)
  np.testing.assert_allclose(state.centroid[:, 0], 3.0)  # First batch initialises.
  np.testing.assert_allclose(state.centroid[:, 1], 0.0)  # Idle expert: unchanged.
  state = regroup.update_statistics(state, counts, sums * 0.0, beta=0.5)
  np.testing.assert_allclose(state.centroid[:, 0], 1.5)  # Then (1 - beta) * 3 + beta * 0.
  np.testing.assert_allclose(state.token_count[0], [4.0, 0.0, 2.0, 2.0])
  assert dataclasses.is_dataclass(state)


def test_selection_bias_moves_against_load_error():
  config = tiny_config(ffn_pattern="hmoe", hmoe=HMoEConfig(num_experts=4, num_clusters=2, expert_ff=16, rank=2))
  state = regroup.init_cluster_state(config.model)
  counts = jnp.array([[10.0, 2.0, 2.0, 2.0]] * 2)  # Two HMoE layers; expert 0 is overloaded (mean load 4).
  state = regroup.update_selection_bias(state, counts, rate=0.1)
  np.testing.assert_allclose(state.selection_bias[0], [-0.1, 0.1, 0.1, 0.1], atol=1e-7)
  chex.assert_shape(state.selection_bias_LxGxM(2), (2, 2, 2))
