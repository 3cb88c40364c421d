"""`ClusterState`: the per-expert statistics that regrouping needs, an explicit pytree beside the parameters."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class ClusterState:
  """Clustering statistics of all HMoE layers, stacked over layers (cluster-major expert order).

  Axis alphabet: Lh HMoE layers, E experts, D model width.

  Attributes:
    centroid: float32 [Lh, E, D] EMA of the mean router input of tokens routed to each expert.
    token_count: float32 [Lh, E] tokens routed to each expert since the last regroup.
    expert_id: int32 [Lh, E] identity (index at initialisation) of the expert at each position.
    last_regroup_step: int32 [] step of the last regroup (-1 before the first).
    num_regroups: int32 [] regroups run so far (adopted or not).
    stability: float32 [Lh] fraction of experts whose cluster-mates changed at the last regroup.
    similarity_gain: float32 [Lh] intra-cluster similarity gain of the last regroup's candidate grouping.
    adopted: bool [Lh] whether the last regroup adopted its candidate.
  """

  centroid: jax.Array
  token_count: jax.Array
  expert_id: jax.Array
  last_regroup_step: jax.Array
  num_regroups: jax.Array
  stability: jax.Array
  similarity_gain: jax.Array
  adopted: jax.Array


def init_cluster_state(num_layers: int, num_experts: int, width: int) -> ClusterState:
  """Empty statistics of `num_layers` HMoE layers of `num_experts` experts on `width`-dimensional inputs."""
  return ClusterState(
      centroid=jnp.zeros((num_layers, num_experts, width), jnp.float32),
      token_count=jnp.zeros((num_layers, num_experts), jnp.float32),
      expert_id=jnp.tile(jnp.arange(num_experts, dtype=jnp.int32), (num_layers, 1)),
      last_regroup_step=jnp.full((), -1, jnp.int32),
      num_regroups=jnp.zeros((), jnp.int32),
      stability=jnp.zeros((num_layers,), jnp.float32),
      similarity_gain=jnp.zeros((num_layers,), jnp.float32),
      adopted=jnp.zeros((num_layers,), bool),
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
