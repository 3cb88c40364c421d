"""`RoutingState`: everything routing carries from step to step, one explicit pytree beside the parameters.

It holds the auxiliary-loss-free balancing biases of every routed layer (either kind) and, for kinds that regroup
their experts, the clustering statistics. The train step updates it from the layers' `RoutingStats`
(`update_routing_state`); evaluation and inference read it (`evaluate(params, routing_state, ...)`), so a model
balanced by biases is always scored with them.
"""

from __future__ import annotations

import flax
import jax

from hmoe.clustering.state import ClusterState, init_cluster_state, update_statistics
from hmoe.config import ModelConfig
from hmoe.routing.losses import update_balancing_bias
from hmoe.routing.statistics import RoutingStats


@flax.struct.dataclass
class RoutingState:
  """Attributes:
    selection_bias: float32 [Lr, E] balancing biases of the Lr routed layers (cluster-major for an HMoE), used to
      *select* experts only; None when `bias_update_rate` is 0.
    clusters: the HMoE clustering statistics; None for kinds that do not regroup.
  """

  selection_bias: jax.Array | None = None
  clusters: ClusterState | None = None


def init_routing_state(config: ModelConfig) -> RoutingState:
  """The state of a fresh model: zero biases (if on), empty clustering statistics (if the kind regroups)."""
  routed = config.routed
  if routed is None:
    return RoutingState()
  bias = None
  if routed.bias_update_rate > 0:
    bias = jax.numpy.zeros((config.num_routed_layers, routed.num_experts), jax.numpy.float32)
  clusters = None
  if routed.clusters_experts:
    clusters = init_cluster_state(config.num_routed_layers, routed.num_experts, config.d_model)
  return RoutingState(selection_bias=bias, clusters=clusters)


def update_routing_state(state: RoutingState, stats: RoutingStats | None, config: ModelConfig) -> RoutingState:
  """Folds one step's stacked layer statistics into the biases and the clustering statistics."""
  if stats is None:
    return state
  routed = config.routed
  if state.selection_bias is not None:
    state = state.replace(selection_bias=update_balancing_bias(state.selection_bias, stats.expert_load,
                                                               routed.bias_update_rate))
  if state.clusters is not None:
    state = state.replace(clusters=update_statistics(state.clusters, stats.expert_token_count,
                                                     stats.expert_token_sum, routed.centroid_ema))
  return state
