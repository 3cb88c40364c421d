"""The jitted regrouping of HMoE experts during training.

The train step folds each batch's routing statistics into the clustering statistics of the `RoutingState`
(`hmoe.routing.state.update_routing_state`); every `recluster_every` steps the loop calls
`recluster(params, opt_state, routing_state, step) -> (params, opt_state, routing_state)`, its own compiled function.

Regrouping one layer (the steps of `hmoe.clustering.pipeline`):
1. reconstruct every expert `W_e = B_c + U_e V_e` (gate, up, down) in cluster-major order;
2. features `z_e` (`pipeline.grouping_features`: fused parameter sketch + EMA activation centroid, or the centred
   router row); balanced spherical k-means on `z`;
3. adopt the new grouping only if the mean intra-cluster similarity rises by more than `min_gain`;
4. if adopted: permute experts into the new cluster-major order; new base = mean of the members' reconstructed
   weights; new factors = rank-R truncated SVD of `W_e - B_c`; permute router rows, EMA centroids, balancing biases
   and router moments; reset the moments of bases and factors (they are re-initialised). If not adopted, everything is
   left unchanged, so a regroup that keeps the assignment is exactly the identity.
Axis alphabet: Lh HMoE layers, E experts, G clusters, M members, D width.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from hmoe.clustering import kmeans, pipeline
from hmoe.config import ModelConfig
from hmoe.routing.state import RoutingState


def _changed_fraction(perm_E: jax.Array, num_clusters: int) -> jax.Array:
  """Fraction of experts whose set of cluster-mates differs after moving position perm[p] to position p."""
  num_experts = perm_E.shape[0]
  members = num_experts // num_clusters
  old_cluster = jnp.arange(num_experts) // members  # Cluster of each expert (by current position) before.
  new_cluster = kmeans.inverse_permutation(perm_E) // members
  same_old = old_cluster[:, None] == old_cluster[None, :]
  same_new = new_cluster[:, None] == new_cluster[None, :]
  return jnp.mean(jnp.any(same_old != same_new, axis=-1).astype(jnp.float32))


def recluster(params: Any, opt_state: Any, routing_state: RoutingState, step: jax.Array, *, config: ModelConfig,
              optimizer: optax.GradientTransformation) -> tuple[Any, Any, RoutingState]:
  """Regroups every HMoE layer's experts (see the module docstring). Pure; jit with `config`/`optimizer` static."""
  cfg = config.hmoe
  num_clusters = cfg.num_clusters
  clusters = routing_state.clusters
  new_params = dict(params)
  moment_fns = jax.tree.map(lambda _: (lambda moment: moment), params)
  stability, gains, adopted = [], [], []
  centroid, expert_id, selection_bias = clusters.centroid, clusters.expert_id, routing_state.selection_bias
  layer_names = [f"block_{i}" for i in config.routed_layers]
  keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(cfg.kmeans_seed), step), len(layer_names))
  for layer, block in enumerate(layer_names):
    layer_params = params[block]["hmoe"]
    weights = pipeline.reconstruct_experts(layer_params)
    router_ExD = layer_params["router"]["kernel"].reshape(-1, cfg.num_experts).T
    features = pipeline.grouping_features(weights, centroid[layer], router_ExD, cfg)
    similarity = features @ features.T
    current = jnp.arange(cfg.num_experts, dtype=jnp.int32) // cfg.experts_per_cluster
    candidate, candidate_perm = pipeline.propose_grouping(features, cfg, keys[layer])
    old_score = kmeans.intra_cluster_similarity(similarity, current, num_clusters)
    new_score = kmeans.intra_cluster_similarity(similarity, candidate, num_clusters)
    adopt = kmeans.should_adopt(old_score, new_score, cfg.min_gain)
    perm = jnp.where(adopt, candidate_perm, jnp.arange(cfg.num_experts, dtype=jnp.int32))
    regrouped = pipeline.regrouped_layer(weights, layer_params["router"]["kernel"], perm, num_clusters, cfg.rank)
    new_params[block] = {**params[block], "hmoe": jax.tree.map(lambda new, old: jnp.where(adopt, new, old),
                                                               regrouped, dict(layer_params))}
    # Optimizer moments: router rows follow their experts; re-initialised bases and factors start fresh.
    router_shape = layer_params["router"]["kernel"].shape
    # Default arguments bind this layer's values: the lambdas run after the loop.
    layer_fns = {name: (lambda moment, adopt=adopt: jnp.where(adopt, jnp.zeros_like(moment), moment))
                 for name in regrouped if name != "router"}
    layer_fns["router"] = {"kernel": lambda moment, perm=perm, adopt=adopt, shape=router_shape: jnp.where(
        adopt, moment.reshape(shape[0], -1)[:, perm].reshape(shape), moment)}
    moment_fns[block] = {**moment_fns[block], "hmoe": {**moment_fns[block]["hmoe"], **layer_fns}}
    # Per-expert statistics follow their experts too.
    centroid, expert_id = (stat.at[layer].set(stat[layer][perm]) for stat in (centroid, expert_id))
    if selection_bias is not None:
      selection_bias = selection_bias.at[layer].set(selection_bias[layer][perm])
    stability.append(_changed_fraction(perm, num_clusters))
    gains.append(new_score - old_score)
    adopted.append(adopt)

  new_opt_state = optax.tree_utils.tree_map_params(optimizer, lambda moment, fn: fn(moment), opt_state, moment_fns)
  new_clusters = clusters.replace(
      centroid=centroid, expert_id=expert_id, token_count=jnp.zeros_like(clusters.token_count),
      last_regroup_step=jnp.asarray(step, jnp.int32), num_regroups=clusters.num_regroups + 1,
      stability=jnp.stack(stability), similarity_gain=jnp.stack(gains), adopted=jnp.stack(adopted))
  return new_params, new_opt_state, routing_state.replace(selection_bias=selection_bias, clusters=new_clusters)
