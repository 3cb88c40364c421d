"""Top-k token-choice routing with its auxiliary losses, returned as values.

Axis alphabet (used in every einsum of the package): B batch, L length, T tokens of one routing group, D model width,
F expert hidden width, E experts, K top-k, C capacity, V vocabulary.

The router always runs in float32: small logit differences decide discrete expert choices, and bf16 rounding there
flips assignments and destabilises training (Switch Transformer, Sec. 2.4 "selective precision").
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class RouterOutput:
  """Routing decisions for T tokens of one group.

  Attributes:
    expert_index: int32 [T, K] chosen experts, best first (distinct per token).
    gates: float32 [T, K] combine weights, renormalised to sum to 1 over the chosen K.
    probs: float32 [T, E] full softmax router probabilities.
    balance_loss: float32 [] Switch load-balancing loss, 1.0 under perfectly uniform routing.
    z_loss: float32 [] router z-loss.
  """

  expert_index: jax.Array
  gates: jax.Array
  probs: jax.Array
  balance_loss: jax.Array
  z_loss: jax.Array


def load_balancing_loss(probs_TxE: jax.Array, expert_index_TxK: jax.Array) -> jax.Array:
  """Switch Transformer load-balancing loss `E * sum_i f_i * P_i` (Fedus et al. 2021, Eq. 4-6).

  `f_i` is the fraction of the T*K token->expert assignments sent to expert i (so `sum_i f_i = 1` for any K) and `P_i`
  the mean router probability of expert i. The loss is 1 under uniform routing and grows as load concentrates.
  """
  num_experts = probs_TxE.shape[-1]
  assignments_TxKxE = jax.nn.one_hot(expert_index_TxK, num_experts, dtype=jnp.float32)
  fraction_E = jnp.mean(assignments_TxKxE, axis=(0, 1))
  mean_prob_E = jnp.mean(probs_TxE, axis=0)
  return num_experts * jnp.sum(fraction_E * mean_prob_E)


def router_z_loss(logits_TxE: jax.Array) -> jax.Array:
  """ST-MoE router z-loss `mean_t logsumexp(logits_t)^2` (Zoph et al. 2022, Eq. 5): keeps logits small."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_TxE, axis=-1)))


def top_k_routing(logits_TxE: jax.Array, top_k: int) -> RouterOutput:
  """Softmax over experts, top-k selection and gate renormalisation over the chosen k (float32)."""
  logits_TxE = logits_TxE.astype(jnp.float32)
  probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
  top_probs_TxK, expert_index_TxK = jax.lax.top_k(probs_TxE, top_k)
  gates_TxK = top_probs_TxK / jnp.sum(top_probs_TxK, axis=-1, keepdims=True)
  return RouterOutput(
      expert_index=expert_index_TxK.astype(jnp.int32),
      gates=gates_TxK,
      probs=probs_TxE,
      balance_loss=load_balancing_loss(probs_TxE, expert_index_TxK),
      z_loss=router_z_loss(logits_TxE),
  )


class Router(nn.Module):
  """Linear float32 router over `num_experts`, with optional multiplicative input jitter during training."""

  num_experts: int
  top_k: int
  jitter: float = 0.0

  @nn.compact
  def __call__(self, x_GxTxD: jax.Array, *, train: bool) -> RouterOutput:
    x_GxTxD = x_GxTxD.astype(jnp.float32)
    if train and self.jitter > 0:
      # Switch Transformer jitter: multiply inputs by U(1 - eps, 1 + eps) to explore routing early in training.
      noise = jax.random.uniform(self.make_rng("jitter"), x_GxTxD.shape, jnp.float32,
                                 1.0 - self.jitter, 1.0 + self.jitter)
      x_GxTxD = x_GxTxD * noise
    kernel_DxE = self.param(
        "kernel",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("embed", "expert")),
        (x_GxTxD.shape[-1], self.num_experts),
        jnp.float32,
    )
    logits_GxTxE = jnp.einsum("gtd,de->gte", x_GxTxD, kernel_DxE)
    return jax.vmap(top_k_routing, in_axes=(0, None))(logits_GxTxE, self.top_k)
