"""Auxiliary routing losses and the auxiliary-loss-free balancing update, on float32 router outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def load_balancing_loss(probs_TxE: jax.Array, expert_index_TxK: jax.Array) -> jax.Array:
  """Switch Transformer load-balancing loss `E * sum_i f_i * P_i` (Fedus et al. 2021, Eq. 4-6).

  `f_i` is the fraction of the T*K token->expert assignments sent to expert i (so `sum_i f_i = 1` for any K) and `P_i`
  the mean router probability of expert i. The loss is 1 under uniform routing and grows as load concentrates. `f` is
  piecewise constant, so the gradient reaches the router only through `P`: `d loss / d P_i = E f_i / T` per token.
  """
  num_experts = probs_TxE.shape[-1]
  assignments_TxKxE = jax.nn.one_hot(expert_index_TxK, num_experts, dtype=jnp.float32)
  fraction_E = jnp.mean(assignments_TxKxE, axis=(0, 1))
  mean_prob_E = jnp.mean(probs_TxE, axis=0)
  return num_experts * jnp.sum(fraction_E * mean_prob_E)


def router_z_loss(logits_TxE: jax.Array) -> jax.Array:
  """ST-MoE router z-loss `mean_t logsumexp(logits_t)^2` (Zoph et al. 2022, Eq. 5): keeps logits small."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_TxE, axis=-1)))


def update_balancing_bias(bias_xE: jax.Array, load_xE: jax.Array, rate: float) -> jax.Array:
  """`b_e += rate * sign(mean load - load_e)` over the last axis (DeepSeek-V3 Sec. 2.1.2).

  Overloaded experts become less likely to be selected, underloaded ones more. `load_xE` may be token counts or load
  fractions: only the sign of each expert's error is used.
  """
  error_xE = jnp.mean(load_xE, axis=-1, keepdims=True) - load_xE
  return bias_xE + rate * jnp.sign(error_xE).astype(bias_xE.dtype)
