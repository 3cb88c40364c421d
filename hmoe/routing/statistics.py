"""What a routed layer reports besides its output: auxiliary losses and load statistics, as one pytree.

Both routed FFN kinds return a `RoutingStats`; the model stacks them over its routed layers (leading axis Lr), the
train step adds `auxiliary_loss` to the language-model loss and logs `metrics()`, and the routing state folds the
per-expert token statistics into its balancing biases and clustering statistics. Fields a kind does not have (the
cluster terms of a standard MoE) are None, so nothing downstream needs to know which kind produced the stats.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class RoutingStats:
  """Statistics of one routed layer (or, stacked, of all of them with a leading layer axis).

  Attributes:
    balance_loss: float32 [] Switch load-balancing loss over experts (mean over routing groups).
    z_loss: float32 [] router z-loss.
    expert_load: float32 [E] fraction of (token, expert) assignments each expert received, before capacity drops.
    num_dropped: int32 [] assignments dropped for lack of capacity, summed over groups (exact count).
    num_assignments: int32 [] all assignments that capacity applies to, the denominator of the dropped fraction.
    expert_token_count: float32 [E] tokens routed to each expert (kept or not).
    expert_token_sum: float32 [E, D] sum of the router inputs of those tokens (activation centroids).
    cluster_balance_loss: float32 [] Switch loss over clusters; None without clusters.
    cluster_load: float32 [G] fraction of (token, cluster) assignments per cluster; None without clusters.
  """

  balance_loss: jax.Array
  z_loss: jax.Array
  expert_load: jax.Array
  num_dropped: jax.Array
  num_assignments: jax.Array
  expert_token_count: jax.Array
  expert_token_sum: jax.Array
  cluster_balance_loss: jax.Array | None = None
  cluster_load: jax.Array | None = None

  def auxiliary_loss(self, weights: Mapping[str, float]) -> jax.Array:
    """`sum_name weights[name] * sum over layers of field name`: each layer weighted as in Switch / ST-MoE."""
    total = jnp.zeros((), jnp.float32)
    for name, weight in weights.items():
      value = getattr(self, name)
      if value is not None and weight:
        total = total + weight * jnp.sum(value)
    return total

  def metrics(self) -> dict[str, jax.Array]:
    """Per-step metrics of stacked stats: mean losses, per-layer loads and the drop counts (summed)."""
    out: dict[str, Any] = {"balance_loss": jnp.mean(self.balance_loss), "z_loss": jnp.mean(self.z_loss),
                           "expert_load": self.expert_load, "num_dropped": jnp.sum(self.num_dropped),
                           "num_assignments": jnp.sum(self.num_assignments)}
    if self.cluster_balance_loss is not None:
      out["cluster_balance_loss"] = jnp.mean(self.cluster_balance_loss)
    if self.cluster_load is not None:
      out["cluster_load"] = self.cluster_load
    return out


def layer_stats(route: Any, kept: jax.Array, x_GxTxD: jax.Array, num_experts: int,
                cluster_index: jax.Array | None = None, num_clusters: int | None = None) -> RoutingStats:
  """`RoutingStats` of one layer from its routing decisions (leading group axis G) and capacity mask.

  Args:
    route: a `RouterOutput` or `HierarchicalRouterOutput`: its `expert_index` [G, T, A] (global expert ids of every
      token's A assignments) and the losses named by its `loss_fields`.
    kept: bool, any shape: which capacity-limited assignments got a slot.
    x_GxTxD: the router inputs, for the per-expert token sums.
    num_experts: E.
    cluster_index: int32 [G, T, Kc] chosen clusters, for the cluster load; None without clusters.
    num_clusters: G of the cluster load.
  """
  assignments_GxTxAxE = jax.nn.one_hot(route.expert_index, num_experts, dtype=jnp.float32)
  tokens_per_expert_GxTxE = jnp.sum(assignments_GxTxAxE, axis=2)
  cluster_load = None
  if cluster_index is not None:
    cluster_load = jnp.mean(jax.nn.one_hot(cluster_index, num_clusters, dtype=jnp.float32), axis=(0, 1, 2))
  return RoutingStats(
      expert_load=jnp.mean(assignments_GxTxAxE, axis=(0, 1, 2)),
      num_dropped=jnp.sum(~kept).astype(jnp.int32),
      num_assignments=jnp.asarray(kept.size, jnp.int32),
      expert_token_count=jnp.sum(tokens_per_expert_GxTxE, axis=(0, 1)),
      expert_token_sum=jnp.einsum("gte,gtd->ed", tokens_per_expert_GxTxE, x_GxTxD.astype(jnp.float32)),
      cluster_load=cluster_load,
      **{name: jnp.mean(getattr(route, name)) for name in route.loss_fields},
  )
