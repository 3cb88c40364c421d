"""Regrouping: identity when not adopted, consistent permutation of params/moments/stats, SVD re-init error,
several layers with mixed adoption, and expert identities composed over two regroups."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmoe.clustering import pipeline, regroup
from hmoe.clustering.state import init_cluster_state, update_statistics
from hmoe.config import HMoEConfig
from hmoe.model.transformer import TransformerLM
from hmoe.testing import dummy_batch, init_train_state, tiny_config
from hmoe.train import optimizer as optimizer_lib, step as step_lib

_E, _D = 8, 8
_RESET = [f"{kind}_{name}" for kind in ("base", "u", "v") for name in ("gate", "up", "down")]


def _config(rank, min_gain=0.01, alpha=0.6):
  hmoe_cfg = HMoEConfig(num_experts=_E, num_clusters=2, rank=rank, top_k_clusters=1, top_k_experts=2, expert_ff=16,
                        block_size=4, min_gain=min_gain, recluster_every=1, kmeans_iters=5, similarity_alpha=alpha,
                        bias_update_rate=0.01)
  return tiny_config(d_model=_D, num_heads=2, ffn_pattern="hmoe", hmoe=hmoe_cfg)


@functools.cache
def _trained(rank):
  """Two real train steps per rank (non-trivial moments, then non-zero learning rate updates). The regroup settings
  (min_gain, alpha) do not enter the forward pass, so the tests share one compiled train step per rank."""
  config = _config(rank)
  model, optimizer = TransformerLM(config.model), optimizer_lib.make_optimizer(config.train)
  state = init_train_state(model, optimizer, config)
  train_fn = jax.jit(functools.partial(step_lib.train_step, model=model, optimizer=optimizer, config=config))
  for i in range(2):
    state, _ = train_fn(state, dummy_batch(config, i))
  return state, optimizer


@functools.cache
def _setup(rank=3, min_gain=0.01, alpha=0.6):
  """Two HMoE layers (G=2 x M=4) after two real train steps, with planted activation centroids.

  Layer 0's centroids pair even and odd experts (across the initial clusters {0..3}, {4..7}); layer 1's repeat the
  initial grouping, so with activation-only similarity layer 0 gains and layer 1 does not.
  """
  config = _config(rank, min_gain, alpha)
  state, optimizer = _trained(rank)
  direction = jax.random.normal(jax.random.PRNGKey(0), (_D,))
  parity = jnp.where(jnp.arange(_E) % 2 == 0, 1.0, -1.0)
  halves = jnp.where(jnp.arange(_E) < _E // 2, 1.0, -1.0)
  noise = 0.1 * jax.random.normal(jax.random.PRNGKey(1), (2, _E, _D))
  centroids = jnp.stack([parity, halves])[:, :, None] * direction[None, None, :] + noise
  clusters = init_cluster_state(2, _E, _D).replace(centroid=centroids, token_count=jnp.ones((2, _E)))
  routing = state.routing_state.replace(clusters=clusters,
                                        selection_bias=jax.random.normal(jax.random.PRNGKey(2), (2, _E)))
  fn = jax.jit(functools.partial(regroup.recluster, config=config.model, optimizer=optimizer))
  return config, state, routing, fn


def _adam_moments(opt_state):
  return opt_state[1][0].mu, opt_state[1][0].nu


def _router(tree):
  return np.asarray(tree["router"]["kernel"]).reshape(_D, _E)


def test_not_adopted_is_identity():
  _, state, routing, fn = _setup(min_gain=1e9)
  params, opt_state, new_routing = fn(state.params, state.opt_state, routing, jnp.asarray(7))
  chex.assert_trees_all_close(params, state.params, atol=0, rtol=0)
  chex.assert_trees_all_close(opt_state, state.opt_state, atol=0, rtol=0)
  new_cluster = new_routing.clusters
  assert not np.any(new_cluster.adopted) and np.all(new_cluster.stability == 0.0)
  chex.assert_trees_all_close(new_cluster.centroid, routing.clusters.centroid, atol=0, rtol=0)
  chex.assert_trees_all_close(new_routing.selection_bias, routing.selection_bias, atol=0, rtol=0)
  assert int(new_cluster.last_regroup_step) == 7 and int(new_cluster.num_regroups) == 1
  assert float(jnp.sum(new_cluster.token_count)) == 0.0  # A new statistics window starts.


@pytest.mark.parametrize("rank", [8, 3])
def test_adopted_regroup_permutes_consistently_and_preserves_experts(rank):
  _, state, routing, fn = _setup(rank=rank, min_gain=-1.0)  # Always adopt, both layers.
  params, opt_state, new_routing = fn(state.params, state.opt_state, routing, jnp.asarray(3))
  new_cluster = new_routing.clusters
  assert np.all(new_cluster.adopted)
  perm = np.asarray(new_cluster.expert_id[0])  # Initial ids = old positions here (first regroup).
  np.testing.assert_array_equal(np.sort(perm), np.arange(_E))
  assert float(new_cluster.stability[0]) == 1.0  # The planted parity grouping replaced the initial one.
  np.testing.assert_array_equal(np.sort(perm[:4] % 2), [0, 0, 0, 0])

  old, new = state.params["block_0"]["hmoe"], params["block_0"]["hmoe"]
  # Router columns, centroids, balancing biases and router moments follow their experts.
  np.testing.assert_allclose(_router(new), _router(old)[:, perm])
  np.testing.assert_allclose(new_cluster.centroid[0], routing.clusters.centroid[0][perm])
  np.testing.assert_allclose(new_routing.selection_bias[0], routing.selection_bias[0][perm])
  for new_moments, old_moments in zip(_adam_moments(opt_state), _adam_moments(state.opt_state)):
    new_m, old_m = new_moments["block_0"]["hmoe"], old_moments["block_0"]["hmoe"]
    np.testing.assert_allclose(_router(new_m), _router(old_m)[:, perm])
    assert float(jnp.max(jnp.abs(old_m["u_gate"]))) > 0  # There was something to reset.
    for name in _RESET:  # All nine re-initialised tensors restart their moments.
      assert float(jnp.max(jnp.abs(new_m[name]))) == 0.0, name
    chex.assert_trees_all_close(new_moments["block_0"]["attention"], old_moments["block_0"]["attention"])
  chex.assert_trees_all_close(params["block_0"]["attention"], state.params["block_0"]["attention"])

  old_weights, new_weights = pipeline.reconstruct_experts(old), pipeline.reconstruct_experts(new)
  for name in ("gate", "up", "down"):
    moved = np.asarray(old_weights[name])[perm]  # Each expert's weights, in its new position.
    base = np.asarray(new[f"base_{name}"])
    np.testing.assert_allclose(base, moved.reshape(2, 4, *moved.shape[1:]).mean(1), atol=1e-5)
    error = np.sum((np.asarray(new_weights[name]) - moved) ** 2, axis=(1, 2))
    residual = moved - np.repeat(base, 4, axis=0)
    singular = np.linalg.svd(residual, compute_uv=False)
    expected = np.sum(singular[:, rank:] ** 2, axis=-1)  # Eckart-Young: the discarded spectrum.
    np.testing.assert_allclose(error, expected, atol=1e-4, rtol=1e-3)


def test_layers_decide_separately_and_identities_compose_over_two_regroups():
  _, state, routing, fn = _setup(min_gain=0.1, alpha=0.0)  # Activation similarity only.
  params, opt_state, first = fn(state.params, state.opt_state, routing, jnp.asarray(4))
  # Layer 0's planted parity grouping is a real gain; layer 1's planted grouping is the current one.
  np.testing.assert_array_equal(np.asarray(first.clusters.adopted), [True, False])
  assert float(first.clusters.similarity_gain[0]) > 0.1 >= float(first.clusters.similarity_gain[1])
  chex.assert_trees_all_close(params["block_1"], state.params["block_1"], atol=0, rtol=0)
  perm1 = np.asarray(first.clusters.expert_id[0])
  np.testing.assert_array_equal(first.clusters.expert_id[1], np.arange(_E))
  assert not np.array_equal(perm1, np.arange(_E))

  # Second regroup: plant, in the new positions, a grouping that pairs positions {0, 1, 4, 5} and {2, 3, 6, 7}.
  direction = jax.random.normal(jax.random.PRNGKey(5), (_D,))
  sign = jnp.where((jnp.arange(_E) // 2) % 2 == 0, 1.0, -1.0)
  distinct = 0.05 * jax.random.normal(jax.random.PRNGKey(6), (_E, _D))  # Tells the rows apart after the move.
  planted = first.clusters.centroid.at[0].set(sign[:, None] * direction[None, :] + distinct)
  second_in = first.replace(clusters=first.clusters.replace(centroid=planted, token_count=jnp.ones((2, _E))))
  _, _, second = fn(params, opt_state, second_in, jnp.asarray(8))
  assert bool(second.clusters.adopted[0]) and int(second.clusters.num_regroups) == 2
  perm2 = np.asarray(second.clusters.centroid[0] @ direction > 0)  # Which new positions hold the "+" experts.
  np.testing.assert_array_equal(perm2, [True] * 4 + [False] * 4)
  # Identities compose: position p now holds what position perm2[p] held, which was expert perm1[perm2[p]].
  moved_from = np.asarray([int(np.flatnonzero(np.all(np.isclose(planted[0], row), axis=-1))[0])
                           for row in np.asarray(second.clusters.centroid[0])])
  np.testing.assert_array_equal(second.clusters.expert_id[0], perm1[moved_from])
  np.testing.assert_allclose(second.selection_bias[0], first.selection_bias[0][moved_from])


def test_router_signal_groups_by_centred_router_rows_and_permutes_consistently():
  config, state, routing, _ = _setup()
  model_config = dataclasses.replace(config.model, hmoe=dataclasses.replace(
      config.model.hmoe, similarity_signal="router", min_gain=0.1))
  fn = jax.jit(functools.partial(regroup.recluster, config=model_config,
                                 optimizer=optimizer_lib.make_optimizer(config.train)))
  # Router rows planted opposite to `_setup`'s centroids: layer 0's repeat the current grouping, layer 1's pair even
  # and odd experts. A large row common to all experts (no softmax sees it) would hide the pattern without centring.
  direction, common = (jax.random.normal(jax.random.PRNGKey(k), (_D,)) for k in (10, 11))
  halves, parity = jnp.where(jnp.arange(_E) < _E // 2, 1.0, -1.0), jnp.where(jnp.arange(_E) % 2 == 0, 1.0, -1.0)
  rows_LxExD = (jnp.stack([halves, parity])[..., None] * direction[None, None, :] + 10.0 * common[None, None, :]
                + 0.1 * jax.random.normal(jax.random.PRNGKey(12), (2, _E, _D)))
  params = dict(state.params)
  for layer in range(2):
    block = f"block_{layer}"
    kernel = rows_LxExD[layer].T.reshape(_D, 2, _E // 2)
    params[block] = {**params[block], "hmoe": {**params[block]["hmoe"], "router": {"kernel": kernel}}}
  new_params, _, new_routing = fn(params, state.opt_state, routing, jnp.asarray(3))
  clusters = new_routing.clusters
  np.testing.assert_array_equal(np.asarray(clusters.adopted), [False, True])
  assert float(clusters.similarity_gain[1]) > 0.1 >= float(clusters.similarity_gain[0])
  chex.assert_trees_all_close(new_params["block_0"], params["block_0"], atol=0, rtol=0)
  perm = np.asarray(clusters.expert_id[1])
  np.testing.assert_array_equal(np.sort(perm[:4] % 2), [perm[0] % 2] * 4)  # One cluster of evens, one of odds.
  np.testing.assert_allclose(_router(new_params["block_1"]["hmoe"]), _router(params["block_1"]["hmoe"])[:, perm])
  np.testing.assert_allclose(clusters.centroid[1], routing.clusters.centroid[1][perm])
  np.testing.assert_allclose(new_routing.selection_bias[1], routing.selection_bias[1][perm])


def test_recluster_compiles_once_and_its_seed_follows_the_step():
  config, state, routing, _ = _setup(min_gain=-1.0)
  optimizer = optimizer_lib.make_optimizer(config.train)
  traced = chex.assert_max_traces(regroup.recluster, n=1)
  fn = jax.jit(functools.partial(traced, config=config.model, optimizer=optimizer))
  first = fn(state.params, state.opt_state, routing, jnp.asarray(5))
  fn(first[0], first[1], first[2], jnp.asarray(10))  # A later regroup reuses the compiled function.
  # The k-means seeding key is fold_in(kmeans_seed, step): on near-random features, steps give different groupings.
  flat = routing.replace(clusters=routing.clusters.replace(
      centroid=jax.random.normal(jax.random.PRNGKey(9), routing.clusters.centroid.shape)))
  groupings = {tuple(np.asarray(fn(state.params, state.opt_state, flat, jnp.asarray(s))[2].clusters.expert_id[0]))
               for s in range(6)}
  assert len(groupings) > 1


def test_statistics_update_is_an_ema_that_ignores_idle_experts():
  state = init_cluster_state(2, 4, 32)
  counts = jnp.array([[2.0, 0.0, 1.0, 1.0]] * 2)
  sums = jnp.ones((2, 4, 32)) * counts[..., None] * 3.0  # Mean input 3.0 for experts that got tokens.
  state = update_statistics(state, counts, sums, beta=0.5)
  np.testing.assert_allclose(state.centroid[:, 0], 3.0)  # First batch initialises.
  np.testing.assert_allclose(state.centroid[:, 1], 0.0)  # Idle expert: unchanged.
  state = update_statistics(state, counts, sums * 0.0, beta=0.5)
  np.testing.assert_allclose(state.centroid[:, 0], 1.5)  # Then (1 - beta) * 3 + beta * 0.
  np.testing.assert_allclose(state.token_count[0], [4.0, 0.0, 2.0, 2.0])
