"""Top-k token-choice routing with its auxiliary losses, returned as values.

Axis alphabet (used in every einsum of the package): B batch, L length, T tokens of one routing group, D model width,
F expert hidden width, E experts, K top-k, C capacity, V vocabulary; G clusters, M experts per cluster, Kc and Ke the
clusters and experts chosen per token.

Both router modules (`Router`, `HierarchicalRouter`) share their input handling (`_route`): float32 inputs,
multiplicative jitter while training, and `detach_aux_input`.

The router always runs in float32: small logit differences decide discrete expert choices, and bf16 rounding there
flips assignments and destabilises training (Switch Transformer, Sec. 2.4 "selective precision").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar, TypeVar

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from hmoe.model.layers import flat_dot
from hmoe.routing.losses import load_balancing_loss, router_z_loss


@flax.struct.dataclass
class RouterOutput:
  """Routing decisions for T tokens of one group.

  Attributes:
    expert_index: int32 [T, K] chosen experts, best first (distinct per token).
    gates: float32 [T, K] combine weights, renormalised to sum to 1 over the chosen K (the raw probability if K = 1).
    probs: float32 [T, E] full softmax router probabilities.
    balance_loss: float32 [] Switch load-balancing loss, 1.0 under perfectly uniform routing.
    z_loss: float32 [] router z-loss.
  """

  expert_index: jax.Array
  gates: jax.Array
  probs: jax.Array
  balance_loss: jax.Array
  z_loss: jax.Array

  # Auxiliary losses, by the name of their `hmoe.routing.RoutingStats` field.
  loss_fields: ClassVar[tuple[str, ...]] = ("balance_loss", "z_loss")


def renormalise_gates(gates: jax.Array, axis: int | tuple[int, ...]) -> jax.Array:
  """Gates divided by their sum over a token's choices (`axis`); a single choice keeps its raw probability.

  Renormalising one gate would make it exactly 1 and leave the router without any gradient from the model's loss,
  only from the auxiliary losses, so top-1 routing gates by the probability itself (Switch Transformer).
  """
  axes = (axis,) if isinstance(axis, int) else axis
  if math.prod(gates.shape[a] for a in axes) == 1:
    return gates
  return gates / jnp.sum(gates, axis=axes, keepdims=True)


_Output = TypeVar("_Output", "RouterOutput", "HierarchicalRouterOutput")


def _route(module: nn.Module, x_GxTxD: jax.Array, kernel_shape: tuple[int, ...], kernel_axes: tuple[str, ...],
           routing_fn: Callable[[jax.Array], _Output], *, jitter: float, detach_aux_input: bool, train: bool
           ) -> _Output:
  """Logits `x . kernel` per group, routed by `routing_fn` (vmapped over groups), with jitter and detached losses.

  `detach_aux_input`: the auxiliary losses are recomputed from the logits of `stop_gradient(x)`, so they move the
  router kernel but not the representations feeding it (the gates still pass the language-model gradient into `x`).
  The decisions of both passes are the same (same forward values), so the losses keep their values.
  """
  x_GxTxD = x_GxTxD.astype(jnp.float32)
  if train and jitter > 0:
    # Switch Transformer jitter: multiply inputs by U(1 - eps, 1 + eps) to explore routing early in training.
    noise = jax.random.uniform(module.make_rng("jitter"), x_GxTxD.shape, jnp.float32, 1.0 - jitter, 1.0 + jitter)
    x_GxTxD = x_GxTxD * noise
  kernel = module.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), kernel_axes),
                        kernel_shape, jnp.float32)
  flat_kernel_DxE = kernel.reshape(kernel.shape[0], -1)
  logits = lambda x: flat_dot(x, flat_kernel_DxE).reshape(*x.shape[:2], *kernel.shape[1:])
  route = jax.vmap(routing_fn)(logits(x_GxTxD))
  if not detach_aux_input:
    return route
  detached = jax.vmap(routing_fn)(logits(jax.lax.stop_gradient(x_GxTxD)))
  return route.replace(**{name: getattr(detached, name) for name in route.loss_fields})


class Router(nn.Module):
  """Linear float32 top-k router over `num_experts`: `[G, T, D]` -> `RouterOutput` with a leading group axis."""

  num_experts: int
  top_k: int
  jitter: float = 0.0
  detach_aux_input: bool = False

  @nn.compact
  def __call__(self, x_GxTxD: jax.Array, *, train: bool, selection_bias_E: jax.Array | None = None) -> RouterOutput:
    return _route(self, x_GxTxD, (x_GxTxD.shape[-1], self.num_experts), ("embed", "expert"),
                  lambda logits: top_k_routing(logits, self.top_k, selection_bias_E),
                  jitter=self.jitter, detach_aux_input=self.detach_aux_input, train=train)


def top_k_routing(logits_TxE: jax.Array, top_k: int, selection_bias_E: jax.Array | None = None) -> RouterOutput:
  """Softmax over experts, top-k selection and gate renormalisation over the chosen k (float32).

  `selection_bias_E` (auxiliary-loss-free balancing, DeepSeek-V3 Sec. 2.1.2) is added to the probabilities only to
  pick the experts; the gates are the unbiased probabilities of the picked experts.
  """
  logits_TxE = logits_TxE.astype(jnp.float32)
  probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
  scores_TxE = probs_TxE if selection_bias_E is None else probs_TxE + selection_bias_E.astype(jnp.float32)[None, :]
  _, expert_index_TxK = jax.lax.top_k(scores_TxE, top_k)
  top_probs_TxK = jnp.take_along_axis(probs_TxE, expert_index_TxK, axis=-1)
  gates_TxK = renormalise_gates(top_probs_TxK, axis=-1)
  return RouterOutput(
      expert_index=expert_index_TxK.astype(jnp.int32),
      gates=gates_TxK,
      probs=probs_TxE,
      balance_loss=load_balancing_loss(probs_TxE, expert_index_TxK),
      z_loss=router_z_loss(logits_TxE),
  )


@flax.struct.dataclass
class HierarchicalRouterOutput:
  """Two-stage routing of T tokens over G clusters of M experts (experts indexed cluster-major, e = g * M + m).

  Attributes:
    cluster_index: int32 [T, Kc] chosen clusters, best first.
    member_index: int32 [T, Kc, Ke] chosen experts inside each chosen cluster (0..M-1).
    gates: float32 [T, Kc, Ke] `p(cluster) * p(expert | cluster)`, renormalised over all Kc * Ke choices
      (the raw joint probability if Kc * Ke = 1).
    cluster_probs: float32 [T, G] stage-1 probabilities.
    expert_probs: float32 [T, G, M] joint probabilities `p(cluster) * p(expert | cluster)` (sum to 1 per token).
    cluster_balance_loss: float32 [] Switch loss over clusters (1 under uniform routing).
    balance_loss: float32 [] Switch loss over all E experts, on the joint probabilities.
    z_loss: float32 [] z-loss of the expert logits.
  """

  cluster_index: jax.Array
  member_index: jax.Array
  gates: jax.Array
  cluster_probs: jax.Array
  expert_probs: jax.Array
  cluster_balance_loss: jax.Array
  balance_loss: jax.Array
  z_loss: jax.Array

  loss_fields: ClassVar[tuple[str, ...]] = ("balance_loss", "z_loss", "cluster_balance_loss")

  @property
  def expert_index(self) -> jax.Array:
    """int32 [..., T, Kc * Ke] global (cluster-major) expert ids of all choices."""
    num_members = self.expert_probs.shape[-1]
    global_index = self.cluster_index[..., None] * num_members + self.member_index
    return global_index.reshape(*global_index.shape[:-2], -1)


def hierarchical_routing(expert_logits_TxGxM: jax.Array, top_k_clusters: int, top_k_experts: int,
                         selection_bias_GxM: jax.Array | None = None) -> HierarchicalRouterOutput:
  """Picks top clusters, then top experts inside each; float32 throughout.

  A cluster's logit is the mean of its members' logits, i.e. the token's score against the centroid of the members'
  router embeddings. Unlike a separate cluster router, this needs no re-initialisation when experts are regrouped: the
  centroid follows the permuted router rows, so routing right after a regroup is consistent with routing before it.

  `selection_bias_GxM` (auxiliary-loss-free balancing, DeepSeek-V3 Sec. 2.1.2) shifts which experts and clusters are
  *selected* but never the gate values.
  """
  logits = expert_logits_TxGxM.astype(jnp.float32)
  num_tokens, num_clusters, num_members = logits.shape
  bias = jnp.zeros((num_clusters, num_members), jnp.float32) if selection_bias_GxM is None else selection_bias_GxM
  cluster_logits_TxG = jnp.mean(logits, axis=-1)
  cluster_probs_TxG = jax.nn.softmax(cluster_logits_TxG, axis=-1)
  conditional_TxGxM = jax.nn.softmax(logits, axis=-1)

  _, cluster_index_TxKc = jax.lax.top_k(cluster_probs_TxG + jnp.mean(bias, axis=-1)[None, :], top_k_clusters)
  chosen_conditional_TxKcxM = jnp.take_along_axis(conditional_TxGxM, cluster_index_TxKc[..., None], axis=1)
  chosen_bias_TxKcxM = bias[cluster_index_TxKc]
  _, member_index_TxKcxKe = jax.lax.top_k(chosen_conditional_TxKcxM + chosen_bias_TxKcxM, top_k_experts)
  member_probs = jnp.take_along_axis(chosen_conditional_TxKcxM, member_index_TxKcxKe, axis=-1)
  cluster_probs_chosen = jnp.take_along_axis(cluster_probs_TxG, cluster_index_TxKc, axis=-1)
  gates = cluster_probs_chosen[..., None] * member_probs
  gates = renormalise_gates(gates, axis=(1, 2))

  joint_TxGxM = cluster_probs_TxG[..., None] * conditional_TxGxM
  output = HierarchicalRouterOutput(
      cluster_index=cluster_index_TxKc.astype(jnp.int32),
      member_index=member_index_TxKcxKe.astype(jnp.int32),
      gates=gates,
      cluster_probs=cluster_probs_TxG,
      expert_probs=joint_TxGxM,
      cluster_balance_loss=load_balancing_loss(cluster_probs_TxG, cluster_index_TxKc),
      balance_loss=jnp.zeros((), jnp.float32),
      z_loss=router_z_loss(logits.reshape(num_tokens, -1)),
  )
  expert_balance = load_balancing_loss(joint_TxGxM.reshape(num_tokens, -1), output.expert_index)
  return output.replace(balance_loss=expert_balance)


class HierarchicalRouter(nn.Module):
  """Two-stage float32 router over `num_clusters` x `experts_per_cluster` (kernel [D, G, M], cluster-major).

  `[G, T, D]` -> `HierarchicalRouterOutput` with a leading group axis; jitter and `detach_aux_input` as `Router`.
  """

  num_clusters: int
  experts_per_cluster: int
  top_k_clusters: int
  top_k_experts: int
  jitter: float = 0.0
  detach_aux_input: bool = False

  @nn.compact
  def __call__(self, x_GxTxD: jax.Array, *, train: bool, selection_bias_GxM: jax.Array | None = None
               ) -> HierarchicalRouterOutput:
    return _route(self, x_GxTxD, (x_GxTxD.shape[-1], self.num_clusters, self.experts_per_cluster),
                  ("embed", "cluster", "member"),
                  lambda logits: hierarchical_routing(logits, self.top_k_clusters, self.top_k_experts,
                                                      selection_bias_GxM),
                  jitter=self.jitter, detach_aux_input=self.detach_aux_input, train=train)
