"""Symmetric INT4 with per-group scales along the input dimension, two values packed per byte.

For a weight `w [..., I, O]` (a matmul `x @ w` contracts I), every group of `group_size` consecutive input rows of one
output column shares a scale `s = max|w_group| / 7`, stored in 16 bits and rounded *up* to the next representable
value so that `|w / s| <= 7`: the stored value `q = round(w / s)` in [-7, 7] (the INT4 range is [-8, 7]; -8 is kept
free so the grid is symmetric) is then at most half a scale step from `w / s`. Rows are padded with zeros to a whole
number of groups; packing puts even input rows in the low nibble and odd rows in the high nibble of one uint8
(two's complement), so the packed tensor is `[..., ceil(I / group_size) * group_size / 2, O]`.

Why not qwix: qwix quantizes the weight operands of `dot_general` / `einsum` calls it intercepts inside a model,
keeping int4 as the native (unpacked in memory) `jnp.int4`. Our expert factors are first gathered per row block
(`u[plan.block_expert]`) and the storage format is the point here (bytes on disk and in host memory, moved whole by
the offloading engine), so the packing and the per-group scales are written out explicitly in this small module.
`fake_quantize` gives quantization-aware training its straight-through forward.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

_QMAX = 7
SCALE_DTYPES = ("float16", "bfloat16")


@flax.struct.dataclass
class QuantizedTensor:
  """A packed INT4 tensor.

  Attributes:
    packed: uint8 [..., Ip / 2, O] two 4-bit values per byte along the (padded) input dimension Ip.
    scale: float16/bfloat16 [..., Ip / group_size, O] per-group scales.
    in_dim: the original input dimension I (static).
    group_size: rows per scale group (static, even).
  """

  packed: jax.Array
  scale: jax.Array
  in_dim: int = flax.struct.field(pytree_node=False)
  group_size: int = flax.struct.field(pytree_node=False)

  @property
  def nbytes(self) -> int:
    return int(self.packed.size * self.packed.dtype.itemsize + self.scale.size * self.scale.dtype.itemsize)


def group_for(in_dim: int, group_size: int) -> int:
  """The group actually used for an input dimension: at most `group_size`, at most `in_dim` rounded up to even (a
  rank-16 factor is not padded to groups of 64)."""
  return min(group_size, in_dim + in_dim % 2)


def pack_int4(q: jax.Array) -> jax.Array:
  """int [..., 2n, O] values in [-8, 7] -> uint8 [..., n, O]: row 2i in the low nibble, row 2i + 1 in the high."""
  if q.shape[-2] % 2:
    raise ValueError(f"pack_int4 needs an even number of rows, got shape {q.shape}")
  nibbles = jnp.asarray(q).astype(jnp.int32) & 0xF
  pairs = nibbles.reshape(*q.shape[:-2], q.shape[-2] // 2, 2, q.shape[-1])
  return (pairs[..., 0, :] | (pairs[..., 1, :] << 4)).astype(jnp.uint8)


def unpack_int4(packed: jax.Array) -> jax.Array:
  """uint8 [..., n, O] -> int8 [..., 2n, O], the inverse of `pack_int4` (sign-extended two's complement)."""
  packed = jnp.asarray(packed).astype(jnp.int32)
  low, high = packed & 0xF, packed >> 4
  pairs = jnp.stack([low, high], axis=-2)  # [..., n, 2, O]
  values = (pairs ^ 8) - 8
  return values.reshape(*packed.shape[:-2], 2 * packed.shape[-2], packed.shape[-1]).astype(jnp.int8)


def _round_up_to(scale: np.ndarray | jax.Array, dtype: jnp.dtype) -> jax.Array:
  """The smallest `dtype` value >= scale (float32 in, `dtype` out), so the stored scale never undershoots."""
  stored = scale.astype(dtype)
  too_small = stored.astype(jnp.float32) < scale
  return jnp.where(too_small, jnp.nextafter(stored, jnp.asarray(jnp.inf, dtype)), stored)


def _grouped(w: jax.Array, group_size: int) -> jax.Array:
  """[..., I, O] -> [..., Ip / g, g, O] zero-padded to whole groups."""
  in_dim = w.shape[-2]
  padded = -(-in_dim // group_size) * group_size
  pad = [(0, 0)] * (w.ndim - 2) + [(0, padded - in_dim), (0, 0)]
  return jnp.pad(w, pad).reshape(*w.shape[:-2], padded // group_size, group_size, w.shape[-1])


def quantize(w: jax.Array, group_size: int = 64, scale_dtype: str = "float16") -> QuantizedTensor:
  """Symmetric per-group INT4 of `w [..., I, O]` along I (see the module docstring)."""
  if group_size < 2 or group_size % 2:
    raise ValueError(f"group_size={group_size} must be an even number >= 2")
  if scale_dtype not in SCALE_DTYPES:
    raise ValueError(f"scale_dtype={scale_dtype!r} not in {SCALE_DTYPES}")
  if w.ndim < 2:
    raise ValueError(f"need a matrix [..., I, O], got shape {w.shape}")
  groups = _grouped(jnp.asarray(w, jnp.float32), group_size)
  scale = _round_up_to(jnp.max(jnp.abs(groups), axis=-2) / _QMAX, jnp.dtype(scale_dtype))
  safe = jnp.where(scale > 0, scale.astype(jnp.float32), 1.0)
  q = jnp.clip(jnp.round(groups / safe[..., None, :]), -_QMAX, _QMAX).astype(jnp.int8)
  q = q.reshape(*w.shape[:-2], -1, w.shape[-1])
  return QuantizedTensor(packed=pack_int4(q), scale=scale, in_dim=w.shape[-2], group_size=group_size)


def dequantize(tensor: QuantizedTensor, dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """The `[..., I, O]` weights a `QuantizedTensor` stands for, in `dtype` (jittable: use it per layer)."""
  q = unpack_int4(tensor.packed)
  groups = q.reshape(*q.shape[:-2], -1, tensor.group_size, q.shape[-1]).astype(jnp.float32)
  w = groups * tensor.scale.astype(jnp.float32)[..., None, :]
  return w.reshape(*q.shape[:-2], -1, q.shape[-1])[..., :tensor.in_dim, :].astype(dtype)


def fake_quantize(w: jax.Array, group_size: int = 64, scale_dtype: str = "float16") -> jax.Array:
  """Quantize-dequantize in the forward pass, identity in the backward (straight-through estimator)."""
  quantized = dequantize(quantize(jax.lax.stop_gradient(w), group_size, scale_dtype), w.dtype)
  return w + jax.lax.stop_gradient(quantized - w)
