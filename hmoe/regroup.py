"""Clustering state and the jitted regrouping of HMoE experts (SPEC parts 1-2, "Re-mapping after regrouping").

`ClusterState` is an explicit pytree beside params and optimizer state. The train step folds each batch's routing
statistics into it (`update_statistics`); every `recluster_every` steps the loop calls
`recluster(params, opt_state, cluster_state, step) -> (params, opt_state, cluster_state)`, its own compiled function.

Regrouping one layer:
1. reconstruct every expert `W_e = B_c + U_e V_e` (gate, up, down) in cluster-major order;
2. features `z_e` = fused parameter sketch + EMA activation centroid; balanced spherical k-means on `z`;
3. adopt the new grouping only if the mean intra-cluster similarity rises by more than `min_gain`;
4. if adopted: permute experts into the new cluster-major order; new base = mean of the members' reconstructed
   weights; new factors = rank-R truncated SVD of `W_e - B_c`; permute router rows, EMA centroids and router moments;
   reset the moments of bases and factors (they are re-initialised). If not adopted, everything is left unchanged, so
   a regroup that keeps the assignment is exactly the identity.
Axis alphabet: Lh HMoE layers, E experts, G clusters, M members, D width, I/O a matrix's in/out dims.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from hmoe import clustering
from hmoe.config import ModelConfig
from hmoe.routing import update_balancing_bias

_MATRICES = ("gate", "up", "down")
_SKETCH_SEED = 1234  # The sketch must be the same projection at every regroup, so it has its own fixed key.


@flax.struct.dataclass
class ClusterState:
  """Clustering statistics of all HMoE layers, stacked over layers (cluster-major expert order).

  Attributes:
    centroid: float32 [Lh, E, D] EMA of the mean router input of tokens routed to each expert.
    token_count: float32 [Lh, E] tokens routed to each expert since the last regroup.
    expert_id: int32 [Lh, E] identity (index at initialisation) of the expert at each position.
    last_regroup_step: int32 [] step of the last regroup (-1 before the first).
    num_regroups: int32 [] regroups run so far (adopted or not).
    stability: float32 [Lh] fraction of experts whose cluster-mates changed at the last regroup.
    similarity_gain: float32 [Lh] intra-cluster similarity gain of the last regroup's candidate grouping.
    adopted: bool [Lh] whether the last regroup adopted its candidate.
    selection_bias: float32 [Lh, E] auxiliary-loss-free balancing biases (used for selection only).
  """

  centroid: jax.Array
  token_count: jax.Array
  expert_id: jax.Array
  last_regroup_step: jax.Array
  num_regroups: jax.Array
  stability: jax.Array
  similarity_gain: jax.Array
  adopted: jax.Array
  selection_bias: jax.Array

  def selection_bias_LxGxM(self, num_clusters: int) -> jax.Array:
    num_layers, num_experts = self.selection_bias.shape
    return self.selection_bias.reshape(num_layers, num_clusters, num_experts // num_clusters)


def hmoe_layer_names(config: ModelConfig) -> list[str]:
  return [f"block_{i}" for i, kind in enumerate(config.ffn_kinds) if kind == "hmoe"]


def init_cluster_state(config: ModelConfig) -> ClusterState | None:
  """Empty statistics; None for models without HMoE layers."""
  num_layers = len(hmoe_layer_names(config))
  if not num_layers:
    return None
  num_experts = config.hmoe.num_experts
  return ClusterState(
      centroid=jnp.zeros((num_layers, num_experts, config.d_model), jnp.float32),
      token_count=jnp.zeros((num_layers, num_experts), jnp.float32),
      expert_id=jnp.tile(jnp.arange(num_experts, dtype=jnp.int32), (num_layers, 1)),
      last_regroup_step=jnp.full((), -1, jnp.int32),
      num_regroups=jnp.zeros((), jnp.int32),
      stability=jnp.zeros((num_layers,), jnp.float32),
      similarity_gain=jnp.zeros((num_layers,), jnp.float32),
      adopted=jnp.zeros((num_layers,), bool),
      selection_bias=jnp.zeros((num_layers, num_experts), jnp.float32),
  )


def update_statistics(state: ClusterState, token_count_LxE: jax.Array, token_sum_LxExD: jax.Array,
                      beta: float) -> ClusterState:
  """Folds one batch into the EMA centroids (`c <- (1 - beta) c + beta * batch mean`) and the window counts.

  Experts that got no tokens keep their centroid; an expert's first batch initialises it (no decay towards zero).
  """
  batch_mean = token_sum_LxExD / jnp.maximum(token_count_LxE, 1.0)[..., None]
  seen_before = jnp.any(state.centroid != 0, axis=-1, keepdims=True)
  has_tokens = (token_count_LxE > 0)[..., None]
  updated = jnp.where(seen_before, (1.0 - beta) * state.centroid + beta * batch_mean, batch_mean)
  return state.replace(centroid=jnp.where(has_tokens, updated, state.centroid),
                       token_count=state.token_count + token_count_LxE)


def update_selection_bias(state: ClusterState, token_count_LxE: jax.Array, rate: float) -> ClusterState:
  """`b_e += rate * sign(mean load - load_e)` per layer (DeepSeek-V3 Sec. 2.1.2): overloaded experts get picked less."""
  return state.replace(selection_bias=update_balancing_bias(state.selection_bias, token_count_LxE, rate))


def reconstruct_experts(layer_params: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """`W_e = B_c + U_e V_e` for every expert: {"gate": [E, D, F], "up": [E, D, F], "down": [E, F, D]}."""
  weights = {}
  for name in _MATRICES:
    base_GxIxO = layer_params[f"base_{name}"]
    residual_GxMxIxO = jnp.einsum("gmir,gmro->gmio", layer_params[f"u_{name}"], layer_params[f"v_{name}"],
                                  precision=jax.lax.Precision.HIGHEST)
    full = base_GxIxO[:, None] + residual_GxMxIxO
    weights[name] = full.reshape(-1, *full.shape[2:])
  return weights


def sketch_projections(weights: dict[str, jax.Array], rows: int, cols: int):
  keys = jax.random.split(jax.random.PRNGKey(_SKETCH_SEED), len(_MATRICES))
  return [clustering.make_sketch_projections(key, weights[name].shape[1], weights[name].shape[2], rows, cols)
          for key, name in zip(keys, _MATRICES)]


def regrouped_layer(weights: dict[str, jax.Array], router_DxGxM: jax.Array, perm_E: jax.Array, num_clusters: int,
                     rank: int) -> dict[str, jax.Array]:
  """New bases, factors and router for experts reordered by `perm_E` into clusters of consecutive positions."""
  num_experts = perm_E.shape[0]
  members = num_experts // num_clusters
  new_params = {}
  for name in _MATRICES:
    permuted_ExIxO = weights[name][perm_E]
    grouped_GxMxIxO = permuted_ExIxO.reshape(num_clusters, members, *permuted_ExIxO.shape[1:])
    bases_GxIxO = jnp.mean(grouped_GxMxIxO, axis=1)
    u_GxMxIxR, v_GxMxRxO = jax.vmap(clustering.low_rank_residuals, in_axes=(0, 0, None))(
        grouped_GxMxIxO, bases_GxIxO, rank)
    new_params.update({f"base_{name}": bases_GxIxO, f"u_{name}": u_GxMxIxR, f"v_{name}": v_GxMxRxO})
  width = router_DxGxM.shape[0]
  new_params["router"] = router_DxGxM.reshape(width, num_experts)[:, perm_E].reshape(router_DxGxM.shape)
  return new_params


def _changed_fraction(perm_E: jax.Array, num_clusters: int) -> jax.Array:
  """Fraction of experts whose set of cluster-mates differs after moving position perm[p] to position p."""
  num_experts = perm_E.shape[0]
  members = num_experts // num_clusters
  old_cluster = jnp.arange(num_experts) // members  # Cluster of each expert (by current position) before.
  new_cluster = clustering.inverse_permutation(perm_E) // members
  same_old = old_cluster[:, None] == old_cluster[None, :]
  same_new = new_cluster[:, None] == new_cluster[None, :]
  return jnp.mean(jnp.any(same_old != same_new, axis=-1).astype(jnp.float32))


def recluster(params: Any, opt_state: Any, cluster_state: ClusterState, step: jax.Array, *, config: ModelConfig,
              optimizer: optax.GradientTransformation) -> tuple[Any, Any, ClusterState]:
  """Regroups every HMoE layer's experts (see the module docstring). Pure; jit with `config`/`optimizer` static."""
  cfg = config.hmoe
  num_clusters = cfg.num_clusters
  new_params = dict(params)
  moment_fns = jax.tree.map(lambda _: (lambda moment: moment), params)
  stability, gains, adopted = [], [], []
  centroid, expert_id, selection_bias = cluster_state.centroid, cluster_state.expert_id, cluster_state.selection_bias
  layer_names = hmoe_layer_names(config)
  keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(cfg.kmeans_seed), step), len(layer_names))
  for layer, block in enumerate(layer_names):
    layer_params = params[block]["hmoe"]
    weights = reconstruct_experts(layer_params)
    sketch = clustering.sketch_expert([weights[name] for name in _MATRICES],
                                      sketch_projections(weights, cfg.sketch_rows, cfg.sketch_cols))
    features = clustering.fused_features(sketch, centroid[layer], cfg.similarity_alpha)
    similarity = features @ features.T
    current = jnp.arange(cfg.num_experts, dtype=jnp.int32) // cfg.experts_per_cluster
    candidate = clustering.balanced_kmeans(features, num_clusters, keys[layer], cfg.kmeans_iters)
    old_score = clustering.intra_cluster_similarity(similarity, current, num_clusters)
    new_score = clustering.intra_cluster_similarity(similarity, candidate, num_clusters)
    adopt = clustering.should_adopt(old_score, new_score, cfg.min_gain)
    perm = jnp.where(adopt, clustering.cluster_major_permutation(candidate, num_clusters),
                     jnp.arange(cfg.num_experts, dtype=jnp.int32))
    regrouped = regrouped_layer(weights, layer_params["router"], perm, num_clusters, cfg.rank)
    new_params[block] = {**params[block], "hmoe": jax.tree.map(lambda new, old: jnp.where(adopt, new, old),
                                                               regrouped, dict(layer_params))}
    # Optimizer moments: router rows follow their experts; re-initialised bases and factors start fresh.
    router_shape = layer_params["router"].shape
    # Default arguments bind this layer's values: the lambdas run after the loop.
    layer_fns = {name: (lambda moment, adopt=adopt: jnp.where(adopt, jnp.zeros_like(moment), moment))
                 for name in regrouped}
    layer_fns["router"] = lambda moment, perm=perm, adopt=adopt, shape=router_shape: jnp.where(
        adopt, moment.reshape(shape[0], -1)[:, perm].reshape(shape), moment)
    moment_fns[block] = {**moment_fns[block], "hmoe": {**moment_fns[block]["hmoe"], **layer_fns}}
    # Per-expert statistics follow their experts too.
    centroid, selection_bias, expert_id = (stat.at[layer].set(stat[layer][perm])
                                           for stat in (centroid, selection_bias, expert_id))
    stability.append(_changed_fraction(perm, num_clusters))
    gains.append(new_score - old_score)
    adopted.append(adopt)

  new_opt_state = optax.tree_utils.tree_map_params(optimizer, lambda moment, fn: fn(moment), opt_state, moment_fns)
  new_cluster_state = cluster_state.replace(
      centroid=centroid, expert_id=expert_id, selection_bias=selection_bias,
      token_count=jnp.zeros_like(cluster_state.token_count),
      last_regroup_step=jnp.asarray(step, jnp.int32), num_regroups=cluster_state.num_regroups + 1,
      stability=jnp.stack(stability), similarity_gain=jnp.stack(gains), adopted=jnp.stack(adopted))
  return new_params, new_opt_state, new_cluster_state
