"""The one expert-grouping pipeline, shared by in-training regrouping (`regroup`) and post-hoc conversion (`convert`).

1. `grouping_features`: per expert, by `HMoEConfig.similarity_signal`, either ("fused") a fixed Kronecker sketch of
   its (reconstructed) gate, up and down matrices fused with an activation direction (`expert_features`), or
   ("router") its centred router row (`kmeans.router_features`);
2. `propose_grouping`: balanced spherical k-means on those features -> the cluster-major permutation of the experts;
3. `regrouped_layer`: bases = mean of each new cluster's members, residual factors = rank-R truncated SVD of
   `W_e - B_c`, router rows permuted with their experts.
The callers differ only in where the weights and activations come from and in what they do with the proposal (the
regroup adopts it only if the similarity gain clears `min_gain`).

Axis alphabet: E experts, G clusters, M members, D width, I/O a matrix's in/out dims, Z fused feature dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hmoe.clustering import kmeans
from hmoe.config import HMoEConfig
from hmoe.model.layers import SWIGLU_MATRICES

_SKETCH_SEED = 1234  # The sketch must be the same projection at every regroup, so it has its own fixed key.


def reconstruct_experts(layer_params: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """`W_e = B_c + U_e V_e` for every expert of an HMoE layer.

  Returns {"gate": [E, D, F], "up": [E, D, F], "down": [E, F, D]} in cluster-major expert order.
  """
  weights = {}
  for name in SWIGLU_MATRICES:
    base_GxIxO = layer_params[f"base_{name}"]
    residual_GxMxIxO = jnp.einsum("gmir,gmro->gmio", layer_params[f"u_{name}"], layer_params[f"v_{name}"],
                                  precision=jax.lax.Precision.HIGHEST)
    full = base_GxIxO[:, None] + residual_GxMxIxO
    weights[name] = full.reshape(-1, *full.shape[2:])
  return weights


def expert_features(weights: dict[str, jax.Array], activation_ExD: jax.Array, config: HMoEConfig) -> jax.Array:
  """Fused features z [E, Z] of experts with full weights `weights` (as `reconstruct_experts` returns) whose
  activation term is `activation_ExD` (EMA centroids in training, router rows after conversion)."""
  keys = jax.random.split(jax.random.PRNGKey(_SKETCH_SEED), len(SWIGLU_MATRICES))
  projections = [kmeans.make_sketch_projections(key, weights[name].shape[1], weights[name].shape[2],
                                                config.sketch_rows, config.sketch_cols)
                 for key, name in zip(keys, SWIGLU_MATRICES)]
  sketch = kmeans.sketch_expert([weights[name] for name in SWIGLU_MATRICES], projections)
  return kmeans.fused_features(sketch, activation_ExD, config.similarity_alpha)


def grouping_features(weights: dict[str, jax.Array], activation_ExD: jax.Array, router_ExD: jax.Array,
                      config: HMoEConfig) -> jax.Array:
  """The features [E, Z] that `config.similarity_signal` clusters experts by (see the module docstring)."""
  if config.similarity_signal == "router":
    return kmeans.router_features(router_ExD)
  return expert_features(weights, activation_ExD, config)


def propose_grouping(features_ExZ: jax.Array, config: HMoEConfig, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Balanced k-means on the features: (cluster of each expert [E], cluster-major permutation [E])."""
  assignment_E = kmeans.balanced_kmeans(features_ExZ, config.num_clusters, key, config.kmeans_iters)
  return assignment_E, kmeans.cluster_major_permutation(assignment_E, config.num_clusters)


def regrouped_layer(weights: dict[str, jax.Array], router_DxGxM: jax.Array, perm_E: jax.Array, num_clusters: int,
                    rank: int) -> dict[str, jax.Array]:
  """New HMoE layer params for experts reordered by `perm_E` into clusters of consecutive positions.

  Returns the layer's parameter dict: `base_*` [G, I, O], `u_*` [G, M, I, R], `v_*` [G, M, R, O] and
  `router` {"kernel": [D, G, M]}.
  """
  num_experts = perm_E.shape[0]
  members = num_experts // num_clusters
  new_params = {}
  for name in SWIGLU_MATRICES:
    permuted_ExIxO = weights[name][perm_E]
    grouped_GxMxIxO = permuted_ExIxO.reshape(num_clusters, members, *permuted_ExIxO.shape[1:])
    bases_GxIxO = jnp.mean(grouped_GxMxIxO, axis=1)
    u_GxMxIxR, v_GxMxRxO = jax.vmap(kmeans.low_rank_residuals, in_axes=(0, 0, None))(
        grouped_GxMxIxO, bases_GxIxO, rank)
    new_params.update({f"base_{name}": bases_GxIxO, f"u_{name}": u_GxMxIxR, f"v_{name}": v_GxMxRxO})
  width = router_DxGxM.shape[0]
  new_params["router"] = {"kernel": router_DxGxM.reshape(width, num_experts)[:, perm_E].reshape(router_DxGxM.shape)}
  return new_params
