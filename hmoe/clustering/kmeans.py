"""Pure math of expert regrouping: expert features, balanced clustering, cluster-major layout, base/residual re-init.

Axis alphabet: E experts, G clusters, M experts per cluster (= E / G), D model width, F expert hidden width, R rank,
S sketch dim. For one generic expert matrix: I its input dim and O its output dim (D or F), A and B the row and column
sketch dims (S = A * B per matrix); Z the fused feature dim (S + D).

Every function is jittable with static E, G, M, R (they are shapes or Python ints); nothing loops over experts in
Python. Argument errors raise `ValueError` before anything is traced. Clustering runs in float32 at the highest matmul
precision: it turns small similarity differences into discrete groupings, and its matmuls are tiny next to a train step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

# On GPU/TPU the default precision (TF32 / one bf16 pass) would perturb similarities enough to flip assignments.
_HIGHEST = jax.lax.Precision.HIGHEST

# A swap must raise the assignment objective by more than this: float rounding in the gain of a neutral swap must not
# make the local search cycle.
_SWAP_TOL = 1e-6


def _experts_per_cluster(num_experts: int, num_clusters: int) -> int:
  if not isinstance(num_clusters, int) or num_clusters < 1 or num_experts % num_clusters:
    raise ValueError(f"num_clusters={num_clusters!r} must be a positive int dividing num_experts={num_experts}")
  return num_experts // num_clusters


def _check_positive_ints(**values: int) -> None:
  for name, value in values.items():
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r} must be a positive int")


def _normalize_rows(x_ExN: jax.Array) -> jax.Array:
  """Unit rows; an all-zero row stays zero (a dead expert has cosine 0 with everything, not NaN)."""
  norm_Ex1 = jnp.linalg.norm(x_ExN, axis=-1, keepdims=True)
  return x_ExN / jnp.where(norm_Ex1 > 0, norm_Ex1, 1.0)


# ----------------------------------------------------------------------------------------------------------------------
# Expert features
# ----------------------------------------------------------------------------------------------------------------------


def make_sketch_projections(key: jax.Array, in_dim: int, out_dim: int, sketch_rows: int,
                            sketch_cols: int) -> tuple[jax.Array, jax.Array]:
  """Gaussian factors of a Kronecker Johnson-Lindenstrauss sketch for `[in_dim, out_dim]` matrices.

  Entries are N(0, 1/A) for P and N(0, 1/B) for Q, so for any W1, W2:
  `E[<P^T W1 Q, P^T W2 Q>_F] = sum_ij W1_ij W2_ij E[P_ia^2] E[Q_jb^2] * A * B = <W1, W2>_F`.

  Returns:
    (P float32 [in_dim, sketch_rows], Q float32 [out_dim, sketch_cols]), a deterministic function of `key`.
  """
  _check_positive_ints(in_dim=in_dim, out_dim=out_dim, sketch_rows=sketch_rows, sketch_cols=sketch_cols)
  key_p, key_q = jax.random.split(key)
  p_IxA = jax.random.normal(key_p, (in_dim, sketch_rows), jnp.float32) / math.sqrt(sketch_rows)
  q_OxB = jax.random.normal(key_q, (out_dim, sketch_cols), jnp.float32) / math.sqrt(sketch_cols)
  return p_IxA, q_OxB


def sketch_weights(w_ExIxO: jax.Array, p_IxA: jax.Array, q_OxB: jax.Array) -> jax.Array:
  """Kronecker sketch `vec(P^T W_e Q)` of every expert matrix: float32 [E, A*B].

  A dense JL projection of the flattened D*F weights would need a [D*F, S] matrix (hundreds of MB at real widths);
  `P^T W Q = (Q kron P)^T vec(W)` is a JL map with the same expectation whose factors take (I*A + O*B) floats, and it
  costs O(E I O min(A, B)) flops (the two contractions are ordered to contract the larger dim with the smaller sketch).
  """
  if w_ExIxO.ndim != 3 or p_IxA.ndim != 2 or q_OxB.ndim != 2:
    raise ValueError(f"need w [E, I, O], p [I, A], q [O, B]; got {w_ExIxO.shape}, {p_IxA.shape}, {q_OxB.shape}")
  num_experts, in_dim, out_dim = w_ExIxO.shape
  (p_in, rows), (q_out, cols) = p_IxA.shape, q_OxB.shape
  if p_in != in_dim or q_out != out_dim:
    raise ValueError(f"projections p {p_IxA.shape}, q {q_OxB.shape} do not match weights {w_ExIxO.shape}")
  w_ExIxO = w_ExIxO.astype(jnp.float32)
  if in_dim * out_dim * rows + rows * out_dim * cols <= in_dim * out_dim * cols + in_dim * rows * cols:
    sketch_ExAxO = jnp.einsum("eio,ia->eao", w_ExIxO, p_IxA, precision=_HIGHEST)
    sketch_ExAxB = jnp.einsum("eao,ob->eab", sketch_ExAxO, q_OxB, precision=_HIGHEST)
  else:
    sketch_ExIxB = jnp.einsum("eio,ob->eib", w_ExIxO, q_OxB, precision=_HIGHEST)
    sketch_ExAxB = jnp.einsum("eib,ia->eab", sketch_ExIxB, p_IxA, precision=_HIGHEST)
  return sketch_ExAxB.reshape(num_experts, rows * cols)


def sketch_expert(weights: Sequence[jax.Array], projections: Sequence[tuple[jax.Array, jax.Array]]) -> jax.Array:
  """Concatenated sketches of several matrices per expert (e.g. gate, up, down): float32 [E, S_total].

  Args:
    weights: per matrix j, the reconstructed weights [E, I_j, O_j] of all experts.
    projections: per matrix j, its `(P [I_j, A_j], Q [O_j, B_j])` from `make_sketch_projections`.

  Each piece preserves Frobenius inner products in expectation, so the concatenation preserves their sum: the inner
  product of whole experts. Scale the pieces beforehand if one matrix should weigh more.
  """
  if len(weights) != len(projections) or not weights:
    raise ValueError(f"need as many projections ({len(projections)}) as weight matrices ({len(weights)}), at least 1")
  num_experts = {w.shape[0] for w in weights}
  if len(num_experts) != 1:
    raise ValueError(f"weight matrices disagree on the number of experts: {sorted(num_experts)}")
  return jnp.concatenate([sketch_weights(w, p, q) for w, (p, q) in zip(weights, projections)], axis=-1)


def fused_features(param_sketch_ExS: jax.Array, centroid_ExD: jax.Array, alpha: float = 0.6) -> jax.Array:
  """`z_e = [sqrt(alpha) p_e/|p_e|, sqrt(1-alpha) a_e/|a_e|]`: float32 [E, S + D].

  Then `z_i . z_j = alpha cos(p_i, p_j) + (1 - alpha) cos(a_i, a_j)` exactly, so Euclidean k-means on z clusters the
  fused similarity. A zero row (a dead expert without activation statistics) normalises to zero, not NaN: its
  activation similarity to every expert is 0 and its row norm drops to sqrt(alpha).

  Args:
    param_sketch_ExS: parameter sketches, e.g. from `sketch_expert`.
    centroid_ExD: EMA of the mean hidden state of the tokens routed to each expert.
    alpha: static Python float in [0, 1], weight of the parameter similarity.
  """
  if param_sketch_ExS.ndim != 2 or centroid_ExD.ndim != 2 or param_sketch_ExS.shape[0] != centroid_ExD.shape[0]:
    raise ValueError(f"need param_sketch [E, S] and centroid [E, D] with the same E; got "
                     f"{param_sketch_ExS.shape} and {centroid_ExD.shape}")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha={alpha!r} must lie in [0, 1]")
  param_ExS = math.sqrt(alpha) * _normalize_rows(param_sketch_ExS.astype(jnp.float32))
  activation_ExD = math.sqrt(1.0 - alpha) * _normalize_rows(centroid_ExD.astype(jnp.float32))
  return jnp.concatenate([param_ExS, activation_ExD], axis=-1)


def router_features(router_ExD: jax.Array) -> jax.Array:
  """Unit rows of the router embeddings after removing their mean over experts: float32 [E, D].

  The mean row adds the same logit to every expert, which no softmax over experts sees, so only the centred rows say
  which tokens an expert wins against the others. Grouping experts whose centred rows agree makes the hierarchical
  router's cluster logit (the mean of its members' logits) a faithful stand-in for each member's. Unlike reconstructed
  weights `B_c + U_e V_e`, the rows hold no shared per-cluster term that would make the current grouping look optimal.
  """
  if router_ExD.ndim != 2:
    raise ValueError(f"need router rows [E, D], got shape {router_ExD.shape}")
  rows = router_ExD.astype(jnp.float32)
  return _normalize_rows(rows - jnp.mean(rows, axis=0, keepdims=True))


# ----------------------------------------------------------------------------------------------------------------------
# Balanced spherical k-means
# ----------------------------------------------------------------------------------------------------------------------


def _similarity(z_ExZ: jax.Array, centroid_GxZ: jax.Array) -> jax.Array:
  return jnp.einsum("ez,gz->eg", z_ExZ, centroid_GxZ, precision=_HIGHEST)


def _cluster_centroids(z_ExZ: jax.Array, assignment_E: jax.Array, num_clusters: int) -> jax.Array:
  """Spherical k-means centroid: the normalised mean (equivalently sum) of the members' features."""
  member_ExG = jax.nn.one_hot(assignment_E, num_clusters, dtype=jnp.float32)
  return _normalize_rows(jnp.einsum("eg,ez->gz", member_ExG, z_ExZ, precision=_HIGHEST))


def _kmeans_plus_plus(z_ExZ: jax.Array, num_clusters: int, key: jax.Array) -> jax.Array:
  """k-means++ seeds (Arthur & Vassilvitskii 2007) as unit centroids [G, Z].

  Sampling weight is the squared Euclidean distance to the nearest seed: the D^2 weighting that carries the
  O(log G) guarantee. On unit rows it equals 2 (1 - cos), i.e. the spherical choice; it stays a proper squared
  distance for dead experts, whose rows have norm sqrt(alpha) rather than 1.
  """
  num_experts = z_ExZ.shape[0]
  first_key, rest_key = jax.random.split(key)
  first = jax.random.randint(first_key, (), 0, num_experts)

  def sq_dist_to(index: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(z_ExZ - z_ExZ[index][None, :]), axis=-1)

  def add_seed(g, carry):
    seed_G, min_dist_E = carry
    # Chosen seeds have distance 0 and log(0) = -inf, so they are never drawn twice unless every point coincides
    # with a seed; then all weights are 0 and the draw falls back to uniform.
    logits_E = jnp.where(jnp.sum(min_dist_E) > 0, jnp.log(min_dist_E), 0.0)
    index = jax.random.categorical(jax.random.fold_in(rest_key, g), logits_E)
    return seed_G.at[g].set(index), jnp.minimum(min_dist_E, sq_dist_to(index))

  seed_G = jnp.zeros((num_clusters,), jnp.int32).at[0].set(first)
  seed_G, _ = jax.lax.fori_loop(1, num_clusters, add_seed, (seed_G, sq_dist_to(first)))
  return _normalize_rows(z_ExZ[seed_G])


def _greedy_balanced_assignment(sim_ExG: jax.Array, experts_per_cluster: int) -> jax.Array:
  """Greedy equal-size assignment, int32 [E]: the result of scanning all (expert, cluster) pairs by similarity
  descending (ties: lower expert, then lower cluster), taking a pair when the expert is free and the cluster has room.

  Computed in at most G vectorised rounds instead of E*G sequential steps. While no cluster fills, the scan takes
  exactly each free expert's best open cluster, in order of that best similarity; so a round lets every free expert
  propose its best open cluster and accepts proposals in that order up to and including the one that fills the first
  cluster. Pairs skipped by the scan never become valid later (rooms only shrink), so the next round is the scan
  restarted on what is left. Every round fills a cluster or places everyone: G rounds always suffice.
  """
  num_experts, num_clusters = sim_ExG.shape
  position_E = jnp.arange(num_experts)

  def one_round(_, carry):
    assignment_E, count_G = carry
    free_E = assignment_E < 0
    open_sim_ExG = jnp.where((count_G < experts_per_cluster)[None, :], sim_ExG, -jnp.inf)
    choice_E = jnp.argmax(open_sim_ExG, axis=-1).astype(jnp.int32)  # lowest cluster on ties, as in the scan
    value_E = jnp.max(open_sim_ExG, axis=-1)
    order_E = jnp.argsort(jnp.where(free_E, -value_E, jnp.inf), stable=True)  # free experts first, best first
    choice_sorted_E, free_sorted_E = choice_E[order_E], free_E[order_E]
    take_ExG = jax.nn.one_hot(choice_sorted_E, num_clusters, dtype=jnp.int32) * free_sorted_E[:, None]
    fill_ExG = jnp.cumsum(take_ExG, axis=0) + count_G[None, :]
    fill_E = jnp.take_along_axis(fill_ExG, choice_sorted_E[:, None], axis=-1)[:, 0]
    first_fill = jnp.min(jnp.where(free_sorted_E & (fill_E == experts_per_cluster), position_E, num_experts))
    accept_E = free_sorted_E & (position_E <= first_fill)
    assignment_E = assignment_E.at[order_E].set(jnp.where(accept_E, choice_sorted_E, assignment_E[order_E]))
    return assignment_E, count_G + jnp.sum(take_ExG * accept_E[:, None], axis=0)

  init = (jnp.full((num_experts,), -1, jnp.int32), jnp.zeros((num_clusters,), jnp.int32))
  assignment_E, _ = jax.lax.fori_loop(0, num_clusters, one_round, init)
  return assignment_E


def _refine_by_swaps(sim_ExG: jax.Array, assignment_E: jax.Array, max_swaps: int) -> jax.Array:
  """Best-improvement pairwise swaps of experts between clusters, until none raises `sum_e sim[e, a_e]`.

  The greedy fixes its early picks for good, so its last experts land wherever room is left; exchanging two experts
  keeps the sizes equal and repairs those. Each swap costs O(E^2) vectorised work; `max_swaps` bounds the loop.
  """
  num_experts = sim_ExG.shape[0]

  def best_swap(assignment_E):
    own_E = jnp.take_along_axis(sim_ExG, assignment_E[:, None], axis=-1)[:, 0]
    cross_ExE = sim_ExG[:, assignment_E]  # [i, j] = sim of expert i to the cluster of expert j
    gain_ExE = cross_ExE + cross_ExE.T - own_E[:, None] - own_E[None, :]
    gain_ExE = jnp.where(assignment_E[:, None] == assignment_E[None, :], -jnp.inf, gain_ExE)
    flat = jnp.argmax(gain_ExE)
    return flat // num_experts, flat % num_experts, gain_ExE.reshape(-1)[flat]

  def improves(carry):
    count, _, _, _, gain = carry
    return (count < max_swaps) & (gain > _SWAP_TOL)

  def swap(carry):
    count, assignment_E, i, j, _ = carry
    assignment_E = assignment_E.at[i].set(assignment_E[j]).at[j].set(assignment_E[i])
    return (count + 1, assignment_E, *best_swap(assignment_E))

  _, assignment_E, _, _, _ = jax.lax.while_loop(improves, swap, (0, assignment_E, *best_swap(assignment_E)))
  return assignment_E


def _balanced_assignment(sim_ExG: jax.Array, experts_per_cluster: int) -> jax.Array:
  greedy_E = _greedy_balanced_assignment(sim_ExG, experts_per_cluster)
  return _refine_by_swaps(sim_ExG, greedy_E, max_swaps=sim_ExG.shape[0])


def _canonical_labels(assignment_E: jax.Array, num_clusters: int) -> jax.Array:
  """Renumber clusters by their lowest-index member, so the same partition always gets the same labels and layout."""
  num_experts = assignment_E.shape[0]
  first_member_G = jax.ops.segment_min(jnp.arange(num_experts), assignment_E, num_segments=num_clusters)
  rank_G = jnp.argsort(jnp.argsort(first_member_G)).astype(jnp.int32)
  return rank_G[assignment_E]


@functools.partial(jax.jit, static_argnames=("num_clusters", "num_iters"))
def _balanced_kmeans(z_ExZ: jax.Array, key: jax.Array, *, num_clusters: int, num_iters: int) -> jax.Array:
  experts_per_cluster = z_ExZ.shape[0] // num_clusters

  def lloyd_step(_, assignment_E):
    centroid_GxZ = _cluster_centroids(z_ExZ, assignment_E, num_clusters)
    return _balanced_assignment(_similarity(z_ExZ, centroid_GxZ), experts_per_cluster)

  seed_GxZ = _kmeans_plus_plus(z_ExZ, num_clusters, key)
  assignment_E = _balanced_assignment(_similarity(z_ExZ, seed_GxZ), experts_per_cluster)
  assignment_E = jax.lax.fori_loop(0, num_iters, lloyd_step, assignment_E)
  return _canonical_labels(assignment_E, num_clusters)


def balanced_kmeans(z_ExZ: jax.Array, num_clusters: int, key: jax.Array, num_iters: int = 10) -> jax.Array:
  """Balanced spherical k-means: cluster of each expert, int32 [E], exactly M = E / G experts per cluster.

  k-means++ seeding, then `num_iters` Lloyd iterations (centroid = normalised mean of members; assignment maximises
  `z_e . c_g`), each with an equal-size assignment: the greedy of `_greedy_balanced_assignment` refined by pairwise
  swaps. Rows are used as given: `fused_features` rows have unit norm except dead experts (norm sqrt(alpha)), whose
  smaller similarities let live experts pick first while the dead ones still fill the remaining slots. Labels are
  canonical (clusters numbered by their lowest-index member; expert 0 is in cluster 0). Deterministic given `key`.

  Args:
    z_ExZ: expert features, e.g. from `fused_features`.
    num_clusters: static G; must divide E.
    key: PRNG key for the seeding.
    num_iters: static number of Lloyd iterations (0 keeps the balanced assignment to the seeds).
  """
  if z_ExZ.ndim != 2:
    raise ValueError(f"z_ExZ must be [E, Z]; got shape {z_ExZ.shape}")
  _experts_per_cluster(z_ExZ.shape[0], num_clusters)
  if not isinstance(num_iters, int) or num_iters < 0:
    raise ValueError(f"num_iters={num_iters!r} must be a non-negative int")
  return _balanced_kmeans(z_ExZ.astype(jnp.float32), key, num_clusters=num_clusters, num_iters=num_iters)


def intra_cluster_similarity(similarity_ExE: jax.Array, assignment_E: jax.Array, num_clusters: int) -> jax.Array:
  """Mean of `S_ij` over ordered pairs i != j in the same cluster: float32 []. 0 when no such pair exists (M = 1).

  With `similarity = z @ z.T` from `fused_features` this is the mean fused similarity inside clusters.
  """
  num_experts = assignment_E.shape[0]
  if similarity_ExE.shape != (num_experts, num_experts):
    raise ValueError(f"similarity_ExE {similarity_ExE.shape} must be [E, E] with E = {num_experts} from assignment_E")
  _check_positive_ints(num_clusters=num_clusters)
  member_ExG = jax.nn.one_hot(assignment_E, num_clusters, dtype=jnp.float32)
  pair_ExE = (member_ExG @ member_ExG.T) * (1.0 - jnp.eye(num_experts, dtype=jnp.float32))
  num_pairs = jnp.sum(pair_ExE)
  total = jnp.sum(similarity_ExE.astype(jnp.float32) * pair_ExE)
  return jnp.where(num_pairs > 0, total / jnp.maximum(num_pairs, 1.0), 0.0)


# ----------------------------------------------------------------------------------------------------------------------
# Re-mapping after regrouping
# ----------------------------------------------------------------------------------------------------------------------


def cluster_major_permutation(assignment_E: jax.Array, num_clusters: int) -> jax.Array:
  """`perm` int32 [E] with `perm[g*M + m]` = original index of the m-th member (by index) of cluster g.

  `x_E[perm].reshape(G, M, ...)` is the cluster-major layout. Assumes a balanced assignment (as from
  `balanced_kmeans`); values cannot be checked under jit.
  """
  _experts_per_cluster(assignment_E.shape[0], num_clusters)
  # A stable sort by cluster keeps members in increasing original index.
  return jnp.argsort(assignment_E, stable=True).astype(jnp.int32)


def inverse_permutation(perm_E: jax.Array) -> jax.Array:
  """`inv` int32 [E] with `inv[perm[i]] = i`, so `x[perm][inv] == x`."""
  num_experts = perm_E.shape[0]
  return jnp.zeros((num_experts,), jnp.int32).at[perm_E].set(jnp.arange(num_experts, dtype=jnp.int32))


def low_rank_residuals(w_ExIxO: jax.Array, base_IxO: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
  """Rank-R truncated SVD of each residual `W_e - B`: (U float32 [E, I, R], V float32 [E, R, O]).

  `U_e V_e` is the best rank-R approximation of `W_e - B` in Frobenius norm (Eckart-Young). The singular values are
  split as sqrt into both factors, so column r of U and row r of V have the same norm: a balanced scale that is better
  conditioned for Adam than putting all of it on one side. Pass one cluster's base; for many clusters, gather
  `bases_GxIxO[assignment_E]` and `vmap` over experts, or call per cluster.
  """
  if w_ExIxO.ndim != 3 or base_IxO.shape != w_ExIxO.shape[1:]:
    raise ValueError(f"need w [E, I, O] and base [I, O]; got {w_ExIxO.shape} and {base_IxO.shape}")
  max_rank = min(w_ExIxO.shape[1:])
  if not isinstance(rank, int) or not 1 <= rank <= max_rank:
    raise ValueError(f"rank={rank!r} must be an int in [1, min(I, O) = {max_rank}]")
  residual_ExIxO = w_ExIxO.astype(jnp.float32) - base_IxO.astype(jnp.float32)[None]
  u_ExIxK, s_ExK, vt_ExKxO = jnp.linalg.svd(residual_ExIxO, full_matrices=False)
  sqrt_s_ExR = jnp.sqrt(s_ExK[:, :rank])
  return u_ExIxK[:, :, :rank] * sqrt_s_ExR[:, None, :], sqrt_s_ExR[:, :, None] * vt_ExKxO[:, :rank, :]


def cluster_bases(w_ExIxO: jax.Array, assignment_E: jax.Array, num_clusters: int) -> jax.Array:
  """Mean of each cluster's member weights: float32 [G, I, O]. Assumes a balanced assignment (M members each)."""
  if w_ExIxO.ndim != 3 or assignment_E.shape != w_ExIxO.shape[:1]:
    raise ValueError(f"need w [E, I, O] and assignment [E]; got {w_ExIxO.shape} and {assignment_E.shape}")
  experts_per_cluster = _experts_per_cluster(w_ExIxO.shape[0], num_clusters)
  member_ExG = jax.nn.one_hot(assignment_E, num_clusters, dtype=jnp.float32) / experts_per_cluster
  return jnp.einsum("eg,eio->gio", member_ExG, w_ExIxO.astype(jnp.float32), precision=_HIGHEST)


def should_adopt(old_score: jax.typing.ArrayLike, new_score: jax.typing.ArrayLike,
                 min_gain: jax.typing.ArrayLike) -> jax.Array:
  """Hysteresis against churn: bool [], true only if `new_score - old_score > min_gain` (strictly)."""
  gain = jnp.asarray(new_score, jnp.float32) - jnp.asarray(old_score, jnp.float32)
  return gain > jnp.asarray(min_gain, jnp.float32)
