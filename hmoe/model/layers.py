"""Transformer building blocks: RMSNorm, rotary positions, causal attention, dense SwiGLU.

Every parameter carries logical axis names (`embed`, `vocab`, `heads`, `kv`, `mlp`, `expert`) that
`hmoe.parallel.sharding.LOGICAL_AXIS_RULES` maps onto mesh axes. Parameters are float32; `dtype` is the compute dtype.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# The three matrices of a SwiGLU FFN, in the order every expert-parameter loop uses.
SWIGLU_MATRICES = ("gate", "up", "down")

_DEFAULT_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def flat_dot(x: jax.Array, w: jax.Array, num_contracting: int = 1) -> jax.Array:
  """`jnp.tensordot(x, w, num_contracting)` as one 2-D matmul: x's last and w's first `num_contracting` axes are
  contracted, every other axis of x is flattened into the rows.

  The weight gradient of `einsum("bld,df->blf")` contracts over both b and l, which XLA:CPU runs about 2x slower
  than the `[rows, D]^T x [rows, F]` product of the flattened form (see `swiglu` for the measurements).
  """
  contracted = math.prod(x.shape[x.ndim - num_contracting:])
  out = x.reshape(-1, contracted) @ w.reshape(contracted, -1)
  return out.reshape(*x.shape[:x.ndim - num_contracting], *w.shape[num_contracting:])


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
  """SwiGLU `(silu(x W_gate) * (x W_up)) W_down` (Shazeer 2020) in one of two canonical layouts.

  * weights [D, F] / [F, D]: x [..., D]; the leading axes are flattened into one `[rows, D]` matmul.
  * weights [N, D, F] / [N, F, D] (stacked experts or per-block weights): x [N, S, D], one batched matmul.

  Every product then has exactly one contracting axis, in the backward too. XLA:CPU runs a dot whose weight gradient
  contracts over two axes (e.g. "bld,df->blf" summing over b and l) about 2x slower: `experiments/bench_layout.py`
  measured forward + backward of a dense SwiGLU at T=8192, D=256, F=2048 at 937 ms on [1, T, D] inputs and 489 ms on
  [T, D]; the stacked experts at E=16, C=1280, F=1024 1,027 ms as "gnsd,ndf" with g=1 and 690 ms as "nsd,ndf".
  """
  if w_gate.ndim == 2:
    return flat_dot(jax.nn.silu(flat_dot(x, w_gate)) * flat_dot(x, w_up), w_down)
  if w_gate.ndim != 3 or x.ndim != 3 or x.shape[0] != w_gate.shape[0]:
    raise ValueError(f"swiglu takes x [N, S, D] with weights [N, D, F], got x {x.shape} and weights {w_gate.shape}")
  hidden = jax.nn.silu(jnp.einsum("nsd,ndf->nsf", x, w_gate)) * jnp.einsum("nsd,ndf->nsf", x, w_up)
  return jnp.einsum("nsf,nfd->nsd", hidden, w_down)


class RMSNorm(nn.Module):
  """Root-mean-square norm (Zhang & Sennrich 2019), statistics in float32 whatever the compute dtype."""

  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],),
                       jnp.float32)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return (normed * scale.reshape((1,) * (x.ndim - 1) + (-1,))).astype(self.dtype)


def apply_rotary(x_BxLxNxH: jax.Array, base: float, positions_BxL: jax.Array | None = None) -> jax.Array:
  """Rotary position embedding (Su et al. 2021) on the last axis, computed in float32.

  `positions_BxL`: int position of every token; None means 0..L-1 for every sequence (training and scoring).
  """
  batch, length, head_dim = x_BxLxNxH.shape[0], x_BxLxNxH.shape[1], x_BxLxNxH.shape[-1]
  if positions_BxL is None:
    positions_BxL = jnp.broadcast_to(jnp.arange(length), (batch, length))
  inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles_BxLxH2 = positions_BxL.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
  sin, cos = jnp.sin(angles_BxLxH2)[:, :, None, :], jnp.cos(angles_BxLxH2)[:, :, None, :]
  x32 = x_BxLxNxH.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)
  return rotated.astype(x_BxLxNxH.dtype)


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention with rotary positions.

  With `positions_BxL` given (generation), the layer also keeps a key/value cache of `cache_len` positions per
  sequence in the mutable "cache" collection: the new keys and values are written at their positions, and every
  query attends to the cached keys at positions <= its own. A batch of prompts of different lengths is right-padded:
  pad positions are overwritten by the generated tokens before any query can see them.
  """

  num_heads: int
  rope_base: float = 10_000.0
  dtype: jnp.dtype = jnp.float32
  cache_len: int = 0  # Positions of the key/value cache (the model's max_len); used only with positions.

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array | None = None) -> jax.Array:
    width = x_BxLxD.shape[-1]
    head_dim = width // self.num_heads
    qkv_init = nn.with_logical_partitioning(_DEFAULT_INIT, ("embed", "qkv", "heads", "kv"))
    w_qkv = self.param("w_qkv", qkv_init, (width, 3, self.num_heads, head_dim), jnp.float32)
    out_init = nn.with_logical_partitioning(
        nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2),
        ("heads", "kv", "embed"))
    w_out = self.param("w_out", out_init, (self.num_heads, head_dim, width), jnp.float32)
    qkv_BxLx3xNxH = flat_dot(x_BxLxD, w_qkv.astype(self.dtype))
    query, key, value = (qkv_BxLx3xNxH[:, :, i] for i in range(3))
    query, key = apply_rotary(query, self.rope_base, positions_BxL), apply_rotary(key, self.rope_base, positions_BxL)
    if positions_BxL is None:
      attended_BxLxNxH = jax.nn.dot_product_attention(query, key, value, is_causal=True)
    else:
      attended_BxLxNxH = self._attend_cached(query, key, value, positions_BxL)
    return flat_dot(attended_BxLxNxH, w_out.astype(self.dtype), num_contracting=2)

  def _attend_cached(self, query, key, value, positions_BxL):
    batch, _, heads, head_dim = key.shape
    shape = (batch, self.cache_len, heads, head_dim)
    cached_key = self.variable("cache", "key", jnp.zeros, shape, key.dtype)
    cached_value = self.variable("cache", "value", jnp.zeros, shape, value.dtype)
    rows = jnp.arange(batch)[:, None]
    cached_key.value = cached_key.value.at[rows, positions_BxL].set(key)
    cached_value.value = cached_value.value.at[rows, positions_BxL].set(value)
    # Query at position p sees the cached keys at positions <= p: its prompt and everything generated so far.
    visible_BxLxS = jnp.arange(self.cache_len)[None, None, :] <= positions_BxL[:, :, None]
    return jax.nn.dot_product_attention(query, cached_key.value, cached_value.value, mask=visible_BxLxS[:, None])


class DenseFeedForward(nn.Module):
  """SwiGLU FFN `(silu(x W_gate) * x W_up) W_down` (Shazeer 2020)."""

  d_ff: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    width = x_BxLxD.shape[-1]
    in_init = nn.with_logical_partitioning(_DEFAULT_INIT, ("embed", "mlp"))
    out_init = nn.with_logical_partitioning(_DEFAULT_INIT, ("mlp", "embed"))
    w_gate = self.param("w_gate", in_init, (width, self.d_ff), jnp.float32)
    w_up = self.param("w_up", in_init, (width, self.d_ff), jnp.float32)
    w_down = self.param("w_down", out_init, (self.d_ff, width), jnp.float32)
    return swiglu(x_BxLxD, *(w.astype(self.dtype) for w in (w_gate, w_up, w_down)))
