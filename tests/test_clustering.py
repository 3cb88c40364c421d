"""Clustering math: features, balanced k-means against a naive greedy oracle, re-mapping and low-rank re-init."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmoe.clustering import kmeans as clustering
from hmoe.clustering.kmeans import (
  balanced_kmeans,
  cluster_bases,
  cluster_major_permutation,
  fused_features,
  intra_cluster_similarity,
  inverse_permutation,
  low_rank_residuals,
  make_sketch_projections,
  should_adopt,
  sketch_expert,
  sketch_weights,
)


def _cosine_matrix(x):
  x = np.asarray(x, np.float64)
  unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
  return unit @ unit.T


def _partition(assignment):
  """Co-membership matrix: label-free view of a clustering."""
  assignment = np.asarray(assignment)
  return assignment[:, None] == assignment[None, :]


def _dead_expert_features(num_experts, num_dead, seed=0):
  rng = np.random.default_rng(seed)
  centroid = rng.normal(size=(num_experts, 8))
  centroid[:num_dead] = 0.0  # no tokens in the window
  return fused_features(jnp.asarray(rng.normal(size=(num_experts, 16)), jnp.float32),
                        jnp.asarray(centroid, jnp.float32))


# ----------------------------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.6, 0.25, 1.0])
def test_fused_features_dot_is_fused_cosine(alpha):
  rng = np.random.default_rng(0)
  sketch, centroid = rng.normal(size=(6, 32)), rng.normal(size=(6, 16))
  z = fused_features(jnp.asarray(sketch, jnp.float32), jnp.asarray(centroid, jnp.float32), alpha)
  chex.assert_shape(z, (6, 48))
  expected = alpha * _cosine_matrix(sketch) + (1 - alpha) * _cosine_matrix(centroid)
  np.testing.assert_allclose(np.asarray(z @ z.T), expected, atol=1e-5)


def test_fused_features_zero_centroid_is_finite_with_zero_activation_similarity():
  rng = np.random.default_rng(1)
  sketch, centroid = rng.normal(size=(4, 32)), rng.normal(size=(4, 16))
  centroid[2] = 0.0
  z = fused_features(jnp.asarray(sketch, jnp.float32), jnp.asarray(centroid, jnp.float32), 0.6)
  assert bool(jnp.all(jnp.isfinite(z)))
  np.testing.assert_allclose(np.asarray(z[2, 32:]), 0.0, atol=0)
  np.testing.assert_allclose(np.asarray(z @ z.T)[2], 0.6 * _cosine_matrix(sketch)[2], atol=1e-5)


def test_fused_features_rejects_bad_arguments():
  with pytest.raises(ValueError, match="alpha"):
    fused_features(jnp.ones((4, 8)), jnp.ones((4, 2)), alpha=1.5)
  with pytest.raises(ValueError, match="same E"):
    fused_features(jnp.ones((4, 8)), jnp.ones((3, 2)))


def test_router_features_are_unit_centred_rows_blind_to_a_common_row():
  rows = jax.random.normal(jax.random.PRNGKey(0), (6, 5))
  features = clustering.router_features(rows)
  np.testing.assert_allclose(np.linalg.norm(features, axis=-1), 1.0, rtol=1e-6)
  centred = np.asarray(rows) - np.asarray(rows).mean(0)
  np.testing.assert_allclose(features, centred / np.linalg.norm(centred, axis=-1, keepdims=True), rtol=1e-5)
  shifted = clustering.router_features(rows + 100.0 * jnp.arange(5.0)[None, :])  # A logit shift every expert gets.
  np.testing.assert_allclose(shifted, features, atol=1e-4)
  with pytest.raises(ValueError, match="router rows"):
    clustering.router_features(rows[None])


def _planted_cosine_pairs(cosines, in_dim, out_dim, seed=0):
  """Pairs (W, c W + sqrt(1 - c^2) N) of Gaussian matrices, stacked [2 * len(cosines), I, O]."""
  rng = np.random.default_rng(seed)
  weights = []
  for cos in cosines:
    w, noise = rng.normal(size=(in_dim, out_dim)), rng.normal(size=(in_dim, out_dim))
    weights += [w, cos * w + np.sqrt(1 - cos**2) * noise]
  return np.stack(weights)


def test_sketch_preserves_cosine_similarity():
  in_dim, out_dim = 64, 96
  w = _planted_cosine_pairs([0.0, 0.3, 0.6, 0.9, -0.5, 0.0, 0.3, 0.6], in_dim, out_dim)
  p, q = make_sketch_projections(jax.random.PRNGKey(0), in_dim, out_dim, 16, 16)  # S = 256
  sketch = sketch_weights(jnp.asarray(w, jnp.float32), p, q)
  chex.assert_shape(sketch, (16, 256))
  true_cos = np.diag(_cosine_matrix(w.reshape(16, -1)), 1)[::2]
  sketch_cos = np.diag(_cosine_matrix(sketch), 1)[::2]
  error = np.abs(sketch_cos - true_cos)
  assert error.max() < 0.15 and error.mean() < 0.08, f"true {true_cos}, sketch {sketch_cos}"


def test_sketch_is_unbiased_in_squared_norm_and_exact_for_scaled_copies():
  in_dim, out_dim = 32, 48
  w = jnp.asarray(np.random.default_rng(1).normal(size=(1, in_dim, out_dim)), jnp.float32)

  @jax.jit
  def sketch_sq_norm(key):
    return jnp.sum(jnp.square(sketch_weights(w, *make_sketch_projections(key, in_dim, out_dim, 8, 8))))

  sq_norm = jax.lax.map(sketch_sq_norm, jax.random.split(jax.random.PRNGKey(2), 64))
  ratio = float(jnp.mean(sq_norm) / jnp.sum(jnp.square(w)))
  assert abs(ratio - 1.0) < 0.1, ratio
  # A linear map keeps identical and positively scaled matrices at cosine 1.
  sketch = sketch_weights(jnp.concatenate([w, w, 2.0 * w]), *make_sketch_projections(jax.random.PRNGKey(2), in_dim,
                                                                                     out_dim, 8, 8))
  np.testing.assert_allclose(_cosine_matrix(sketch), 1.0, atol=1e-5)


def test_sketch_projections_are_deterministic_and_both_contraction_orders_agree():
  p1, q1 = make_sketch_projections(jax.random.PRNGKey(3), 12, 40, 4, 6)
  p2, q2 = make_sketch_projections(jax.random.PRNGKey(3), 12, 40, 4, 6)
  chex.assert_trees_all_equal((p1, q1), (p2, q2))
  chex.assert_shape((p1, q1), ((12, 4), (40, 6)))
  w = jnp.asarray(np.random.default_rng(4).normal(size=(3, 12, 40)), jnp.float32)
  expected = np.einsum("eio,ia,ob->eab", np.asarray(w, np.float64), p1, q1).reshape(3, 24)
  np.testing.assert_allclose(np.asarray(sketch_weights(w, p1, q1)), expected, atol=1e-4)
  # Transposed shapes take the other contraction order.
  expected_t = np.einsum("eio,ia,ob->eab", np.asarray(w, np.float64).transpose(0, 2, 1), q1, p1).reshape(3, 24)
  np.testing.assert_allclose(np.asarray(sketch_weights(w.transpose(0, 2, 1), q1, p1)), expected_t, atol=1e-4)


def test_sketch_expert_concatenates_per_matrix_sketches():
  rng = np.random.default_rng(5)
  gate = jnp.asarray(rng.normal(size=(4, 8, 16)), jnp.float32)
  down = jnp.asarray(rng.normal(size=(4, 16, 8)), jnp.float32)
  proj_gate = make_sketch_projections(jax.random.PRNGKey(6), 8, 16, 4, 4)
  proj_down = make_sketch_projections(jax.random.PRNGKey(7), 16, 8, 2, 4)
  sketch = sketch_expert([gate, down], [proj_gate, proj_down])
  chex.assert_shape(sketch, (4, 24))
  chex.assert_trees_all_close(sketch[:, :16], sketch_weights(gate, *proj_gate), atol=1e-6)
  chex.assert_trees_all_close(sketch[:, 16:], sketch_weights(down, *proj_down), atol=1e-6)
  with pytest.raises(ValueError, match="projections"):
    sketch_expert([gate, down], [proj_gate])
  with pytest.raises(ValueError, match="do not match"):
    sketch_weights(gate, *proj_down)


# ----------------------------------------------------------------------------------------------------------------------
# Balanced k-means
# ----------------------------------------------------------------------------------------------------------------------


def _naive_greedy(sim, experts_per_cluster):
  """The specification: scan (expert, cluster) pairs by similarity descending, take when free and room is left."""
  num_experts, num_clusters = sim.shape
  assignment, count = -np.ones(num_experts, int), np.zeros(num_clusters, int)
  for flat in np.argsort(-sim.reshape(-1), kind="stable"):
    e, g = divmod(int(flat), num_clusters)
    if assignment[e] < 0 and count[g] < experts_per_cluster:
      assignment[e], count[g] = g, count[g] + 1
  return assignment


@pytest.mark.parametrize("num_experts,num_clusters,quantize", [(12, 3, False), (16, 4, True), (10, 10, False)])
def test_greedy_rounds_match_sequential_scan(num_experts, num_clusters, quantize):
  sim = np.random.default_rng(num_experts).normal(size=(num_experts, num_clusters)).astype(np.float32)
  if quantize:
    sim = np.round(sim * 2) / 2  # many ties: exercises the tie-breaking order
  got = clustering._greedy_balanced_assignment(jnp.asarray(sim), num_experts // num_clusters)
  np.testing.assert_array_equal(np.asarray(got), _naive_greedy(sim, num_experts // num_clusters))


def test_swap_refinement_keeps_sizes_and_leaves_no_improving_swap():
  num_experts, num_clusters = 12, 3
  sim = np.random.default_rng(7).normal(size=(num_experts, num_clusters)).astype(np.float32)
  greedy = clustering._greedy_balanced_assignment(jnp.asarray(sim), 4)
  refined = np.asarray(clustering._refine_by_swaps(jnp.asarray(sim), greedy, max_swaps=num_experts))
  np.testing.assert_array_equal(np.bincount(refined, minlength=num_clusters), [4, 4, 4])
  objective = lambda a: sim[np.arange(num_experts), a].sum()  # noqa: E731
  # On this draw the greedy is visibly suboptimal (0.82 -> 1.38), so the check below is not vacuous.
  assert objective(refined) > objective(np.asarray(greedy)) + 0.1
  for i, j in itertools.combinations(range(num_experts), 2):
    swapped = refined.copy()
    swapped[[i, j]] = refined[[j, i]]
    assert objective(swapped) <= objective(refined) + 1e-5, (i, j)


@pytest.mark.parametrize("num_experts,num_clusters,num_dead", [(12, 3, 0), (16, 4, 5), (6, 1, 2), (8, 8, 4)])
def test_balanced_kmeans_gives_exactly_m_members_with_dead_experts(num_experts, num_clusters, num_dead):
  z = _dead_expert_features(num_experts, num_dead)
  assignment = balanced_kmeans(z, num_clusters, jax.random.PRNGKey(0))
  assert assignment.dtype == jnp.int32
  counts = np.bincount(np.asarray(assignment), minlength=num_clusters)
  np.testing.assert_array_equal(counts, np.full(num_clusters, num_experts // num_clusters))
  # Canonical labels: clusters numbered by their lowest-index member.
  first_member = [int(np.flatnonzero(np.asarray(assignment) == g)[0]) for g in range(num_clusters)]
  assert first_member == sorted(first_member) and first_member[0] == 0


def _planted_groups(seed, num_clusters, per_cluster, dim, noise):
  """Unit rows around `num_clusters` Gaussian centres, in shuffled order; returns (z [E, dim], planted labels [E])."""
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(num_clusters, dim))
  planted = rng.permutation(np.repeat(np.arange(num_clusters), per_cluster))
  points = centers[planted] + noise * rng.normal(size=(num_clusters * per_cluster, dim))
  return jnp.asarray(points / np.linalg.norm(points, axis=-1, keepdims=True), jnp.float32), planted


def test_balanced_kmeans_key_matters_only_where_the_data_is_ambiguous():
  keys = [jax.random.PRNGKey(k) for k in range(8)]
  # Structureless features (dead experts included): the seeds decide, and different keys find different groupings.
  ambiguous = _dead_expert_features(16, 3, seed=2)
  partitions = {_partition(balanced_kmeans(ambiguous, 4, key)).tobytes() for key in keys}
  assert len(partitions) >= 2, "the seeding ignores its key"
  # Well-separated groups: every key finds the planted optimum, and permuting the experts permutes the grouping.
  z, planted = _planted_groups(0, 4, 4, 24, noise=0.1)
  for k, key in enumerate(keys):
    perm = np.random.default_rng(k).permutation(16)
    np.testing.assert_array_equal(_partition(balanced_kmeans(z, 4, key)), _partition(planted))
    permuted = np.asarray(balanced_kmeans(z[perm], 4, key))
    np.testing.assert_array_equal(_partition(permuted), _partition(planted[perm]))
    assert permuted[0] == 0  # Labels stay canonical in the permuted order.


def test_balanced_kmeans_traces_under_an_outer_jit():
  z = _dead_expert_features(16, 3, seed=2)
  jitted = jax.jit(balanced_kmeans, static_argnames=("num_clusters", "num_iters"))
  chex.assert_trees_all_equal(jitted(z, num_clusters=4, key=jax.random.PRNGKey(11)),
                              balanced_kmeans(z, 4, jax.random.PRNGKey(11)))


def test_lloyd_iterations_recover_overlapping_groups_that_seeding_alone_misses():
  # Two groups of 8 with noise close to the separation of their centres: the k-means++ seeds are single noisy
  # experts, so the assignment to them misplaces some experts for some keys; the Lloyd centroids (member means)
  # average the noise out. The planted grouping is the best one found from any of the 16 keys.
  z, planted = _planted_groups(0, 2, 8, 24, noise=0.8)
  keys = [jax.random.PRNGKey(k) for k in range(16)]
  seeded_only = [bool(np.all(_partition(balanced_kmeans(z, 2, key, num_iters=0)) == _partition(planted)))
                 for key in keys]
  with_lloyd = [bool(np.all(_partition(balanced_kmeans(z, 2, key, num_iters=10)) == _partition(planted)))
                for key in keys]
  assert not all(seeded_only), "data too easy: seeding alone recovers the groups"
  assert all(with_lloyd), with_lloyd


def _all_balanced_assignments(num_experts, num_clusters):
  per_cluster = num_experts // num_clusters
  return np.array([a for a in itertools.product(range(num_clusters), repeat=num_experts)
                   if all(a.count(g) == per_cluster for g in range(num_clusters))])


@pytest.mark.parametrize("num_clusters,min_optimal", [(2, 1.0), (3, 0.9)])
def test_balanced_assignment_against_brute_force_optimum(num_clusters, min_optimal):
  # Every balanced assignment of 6 experts: 20 for G=2, 90 for G=3; 100 random similarity draws.
  candidates_AxE = _all_balanced_assignments(6, num_clusters)
  sims = np.random.default_rng(0).normal(size=(100, 6, num_clusters)).astype(np.float32)
  got = np.asarray(jax.vmap(clustering._balanced_assignment, in_axes=(0, None))(jnp.asarray(sims), 6 // num_clusters))
  for assignment in got:
    np.testing.assert_array_equal(np.bincount(assignment, minlength=num_clusters), 6 // num_clusters)
  objective = lambda sim, a: sim[np.arange(6), a].sum(-1)  # noqa: E731
  optimum = np.array([objective(sim, candidates_AxE).max() for sim in sims])
  gap = optimum - np.array([objective(sim, a) for sim, a in zip(sims, got)])
  assert gap.min() > -1e-5  # Nothing beats the optimum: the objective is computed on the same similarities.
  # With two clusters a swap-free assignment is optimal (it holds the M experts of largest sim[:, 1] - sim[:, 0]).
  # With three, pairwise swaps miss improvements that need a 3-cycle (2 draws of 100 here; greedy alone misses 50).
  assert np.mean(gap < 1e-5) >= min_optimal, np.flatnonzero(gap > 1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_kmeans_recovers_planted_groups(seed):
  # The shapes of `_dead_expert_features(16, ...)`: one compilation.
  z, planted = _planted_groups(seed, num_clusters=4, per_cluster=4, dim=24, noise=0.1)
  assignment = balanced_kmeans(z, 4, jax.random.PRNGKey(seed))
  np.testing.assert_array_equal(_partition(assignment), _partition(planted))


def test_balanced_kmeans_rejects_bad_cluster_counts():
  with pytest.raises(ValueError, match="num_clusters=3"):
    balanced_kmeans(jnp.ones((8, 4)), 3, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="num_clusters=0"):
    balanced_kmeans(jnp.ones((8, 4)), 0, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="num_iters"):
    balanced_kmeans(jnp.ones((8, 4)), 2, jax.random.PRNGKey(0), num_iters=-1)


def test_intra_cluster_similarity_golden():
  sim = jnp.array([[1.0, 0.5, 0.2, 0.1],
                   [0.5, 1.0, 0.3, 0.4],
                   [0.2, 0.3, 1.0, 0.8],
                   [0.1, 0.4, 0.8, 1.0]])
  chex.assert_trees_all_close(intra_cluster_similarity(sim, jnp.array([0, 0, 1, 1]), 2), 0.65, atol=1e-6)
  chex.assert_trees_all_close(intra_cluster_similarity(sim, jnp.array([0, 1, 0, 1]), 2), 0.3, atol=1e-6)
  chex.assert_trees_all_close(intra_cluster_similarity(sim, jnp.array([0, 1, 2, 3]), 4), 0.0, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Re-mapping
# ----------------------------------------------------------------------------------------------------------------------


def test_cluster_major_permutation_hand_case_and_round_trip():
  assignment = jnp.array([1, 0, 1, 0, 2, 2])
  perm = cluster_major_permutation(assignment, 3)
  assert perm.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(perm), [1, 3, 0, 2, 4, 5])
  np.testing.assert_array_equal(np.asarray(assignment[perm].reshape(3, 2)), [[0, 0], [1, 1], [2, 2]])
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3, 2)), jnp.float32)
  chex.assert_trees_all_equal(x[perm][inverse_permutation(perm)], x)
  chex.assert_trees_all_equal(perm[inverse_permutation(perm)], jnp.arange(6, dtype=jnp.int32))
  with pytest.raises(ValueError, match="num_clusters=4"):
    cluster_major_permutation(assignment, 4)


def test_cluster_bases_are_member_means():
  w = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3, 5)), jnp.float32)
  bases = cluster_bases(w, jnp.array([1, 0, 0, 1]), 2)
  chex.assert_shape(bases, (2, 3, 5))
  chex.assert_trees_all_close(bases[0], (w[1] + w[2]) / 2, atol=1e-6)
  chex.assert_trees_all_close(bases[1], (w[0] + w[3]) / 2, atol=1e-6)


def _random_experts(num_experts, in_dim, out_dim, seed):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(num_experts, in_dim, out_dim)), jnp.float32),
          jnp.asarray(rng.normal(size=(in_dim, out_dim)), jnp.float32))


def test_low_rank_residuals_full_rank_is_exact_and_factors_are_balanced():
  w, base = _random_experts(3, 6, 9, seed=0)
  u, v = low_rank_residuals(w, base, rank=6)
  chex.assert_shape((u, v), ((3, 6, 6), (3, 6, 9)))
  chex.assert_trees_all_close(base[None] + u @ v, w, atol=1e-4)
  chex.assert_trees_all_close(jnp.linalg.norm(u, axis=1), jnp.linalg.norm(v, axis=2), atol=1e-4)


def test_low_rank_residuals_error_is_eckart_young():
  w, base = _random_experts(3, 8, 12, seed=1)
  rank = 3
  u, v = low_rank_residuals(w, base, rank)
  singular = np.linalg.svd(np.asarray(w - base[None], np.float64), compute_uv=False)
  error = np.sum(np.square(np.asarray(w - base[None] - u @ v, np.float64)), axis=(1, 2))
  np.testing.assert_allclose(error, np.sum(np.square(singular[:, rank:]), axis=-1), rtol=1e-4)


def test_low_rank_residuals_recover_an_exact_rank_r_residual():
  rank = 2
  rng = np.random.default_rng(2)
  residual = jnp.asarray(rng.normal(size=(4, 10, rank)) @ rng.normal(size=(4, rank, 7)), jnp.float32)
  base = jnp.asarray(rng.normal(size=(10, 7)), jnp.float32)
  u, v = low_rank_residuals(base[None] + residual, base, rank)
  chex.assert_trees_all_close(u @ v, residual, atol=1e-4)


def test_low_rank_residuals_reject_bad_rank():
  w, base = _random_experts(2, 4, 6, seed=3)
  with pytest.raises(ValueError, match="rank=5"):
    low_rank_residuals(w, base, 5)
  with pytest.raises(ValueError, match="rank=0"):
    low_rank_residuals(w, base, 0)


def test_should_adopt_boundaries():
  # Binary fractions, so the differences are exact in float32.
  assert not bool(should_adopt(0.5, 0.75, 0.25))  # gain equal to min_gain is not enough
  assert bool(should_adopt(0.5, 0.875, 0.25))
  assert not bool(should_adopt(0.5, 0.625, 0.25))
  assert not bool(should_adopt(0.5, 0.5, 0.0))
  assert not bool(should_adopt(0.5, 0.25, 0.0))
  assert bool(should_adopt(0.5, 0.25, -0.5))  # a negative margin tolerates small losses
  assert should_adopt(jnp.float32(0.0), jnp.float32(1.0), 0.5).shape == ()
