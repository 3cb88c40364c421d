"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus), with an explicit rng."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How to pick tokens. `temperature=0` is greedy (argmax); otherwise softmax(logits / temperature) restricted to the
  `top_k` most likely tokens (0 = all) and then to the smallest set whose probability reaches `top_p` (1 = all)."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

  def __call__(self, logits_BxV: jax.Array, rng: jax.Array) -> jax.Array:
    """int32 [B] next tokens."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    if self.temperature == 0:
      return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV / self.temperature
    if self.top_k:
      kth_BxV = jax.lax.top_k(logits_BxV, min(self.top_k, logits_BxV.shape[-1]))[0][:, -1:]
      logits_BxV = jnp.where(logits_BxV < kth_BxV, -jnp.inf, logits_BxV)
    if self.top_p < 1:
      sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
      cumulative_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
      # Keep a token if the tokens more likely than it hold less than top_p: the most likely one always stays.
      keep_BxV = (cumulative_BxV - jax.nn.softmax(sorted_BxV, axis=-1)) < self.top_p
      threshold_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
      logits_BxV = jnp.where(logits_BxV < threshold_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)
