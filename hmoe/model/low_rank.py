"""The low-rank factor products of the HMoE's stage-2 rows, written for XLA:CPU.

Rows come in blocks of one expert each (`dispatch.plan_dropless`): block n belongs to expert `blocks[n]`, and every
product multiplies a block's rows with that expert's factor. The residual rank R is small (4-32), which makes these
products memory-bound: the whole HMoE layer's forward + backward (E=32, M=8, F=1024, T=8192) took 438 ms at rank 1
and 603 ms at rank 16, before this module (`python -m experiments.bench_layer --backward --experts=32
--paths=sort,hmoe8 --rank=1`, and without --rank; two runs the same day; docs/speed.md).

`widen(p, v, blocks)` computes `[N, S, R] x v[blocks] [N, R, F] -> [N, S, F]` as R unrolled multiply-adds: an
elementwise loop that XLA fuses with the base product added to it. `python -m experiments.bench_low_rank` (288
blocks of 64 rows, R=16, F=1024, with that add, median of 7): forward 29 ms against the batched dot's 49 ms (12
GFLOP/s; one F-wide elementwise pass: 22 ms), forward + backward 56 against 75 ms. In the layer it gains less (3-5%,
`hierarchical.py`).

The VJP is custom: autodiff of the unrolled loop materialises R F-wide partial sums (forward + backward 186 ms in
the same run). The input gradient is the batched dot over F (a narrowing product, which XLA:CPU runs well), and the
weight gradient sums each block's `[R, F]` outer product into its expert with a one-hot matmul over the N blocks
instead of the scatter-add that the gather's transpose would be (XLA runs those serially on CPU).

Both VJPs compute their per-block weight gradients with `_per_block_outer` (YNNPACK's layout, 1.5-2x faster).

`narrow(rows, u, blocks)` is the down factor's `[N, S, F] x u[blocks] [N, F, R] -> [N, S, R]`, a batched dot, with
a custom VJP for its weight gradient's layout (see `_narrow_bwd`): the HMoE layer 772-867 -> 704-801 ms in three
A/Bs (docs/speed.md). Tried and left out: its input gradient as `widen`'s unrolled loop (slower in the layer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _widen(p_NxSxR: jax.Array, v_NxRxO: jax.Array) -> jax.Array:
  """`einsum("nsr,nro->nso")` unrolled over the small R, so it stays one elementwise loop."""
  out = p_NxSxR[..., 0:1] * v_NxRxO[:, None, 0]
  for r in range(1, p_NxSxR.shape[-1]):
    out = out + p_NxSxR[..., r:r + 1] * v_NxRxO[:, None, r]
  return out


def _per_block_outer(narrow_NxSxR: jax.Array, wide_NxSxO: jax.Array) -> jax.Array:
  """`einsum("nsr,nso->nro")`, each block's `[R, O]` weight gradient, with the narrow operand transposed first.

  Contracting the S rows of both operands (the left one transposed) is a dot that XLA:CPU leaves to its generic
  emitter; with the left operand as `[N, R, S]` it goes to YNNPACK. XLA folds a plain transpose back into the dot's
  dimension numbers; the barrier stops that fold (it is itself gone from the compiled program), so the small `[N, R,
  S]` copy is written and the dot runs on it: `[288, 64, 16]`^T x `[288, 64, 1024]` 38.7 -> 26.5 ms (median of 9),
  38 -> 14-19 ms each in the layer's profile; the HMoE layer (E=32, F=1024, T=8192, fwd + bwd) 1,016 -> 980 ms (M=4)
  and 978 -> 907 ms (M=8), round-robin A/B, median of 7 (docs/speed.md).
  """
  narrow_NxRxS = jax.lax.optimization_barrier(jnp.swapaxes(narrow_NxSxR, 1, 2))
  return jnp.einsum("nrs,nso->nro", narrow_NxRxS, wide_NxSxO)


def _sum_blocks_into_experts(per_block_NxAxB: jax.Array, blocks_N: jax.Array, num_experts: int) -> jax.Array:
  """`segment_sum` over blocks of the same expert, as a `[E, N] x [N, A B]` one-hot matmul (a dot, not a scatter)."""
  one_hot_NxE = jax.nn.one_hot(blocks_N, num_experts, dtype=per_block_NxAxB.dtype)
  num_blocks = per_block_NxAxB.shape[0]
  return (one_hot_NxE.T @ per_block_NxAxB.reshape(num_blocks, -1)).reshape(num_experts, *per_block_NxAxB.shape[1:])


def _varying_axes(x: jax.Array) -> frozenset:
  """The manual mesh axes x varies over inside `shard_map` (none outside); the attribute moved between JAX versions."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)
  return frozenset(manual.varying) if manual is not None else frozenset(getattr(aval, "vma", ()))


def _sum_to_type_of(grad: jax.Array, primal: jax.Array) -> jax.Array:
  """Inside `shard_map` a cotangent can vary over more mesh axes than its primal (the output gradient varies over
  data and expert, the factors over expert only): the primal's gradient is then the sum over the extra axes."""
  extra = tuple(sorted(_varying_axes(grad) - _varying_axes(primal)))
  return jax.lax.psum(grad, extra) if extra else grad


@jax.custom_vjp
def widen(p_NxSxR: jax.Array, v_ExRxO: jax.Array, blocks_N: jax.Array) -> jax.Array:
  """Rows [N, S, R] of block n times `v_ExRxO[blocks_N[n]]`: [N, S, O], as R unrolled multiply-adds.

  Meant for a product that something is added to (the HMoE's gate and up residuals plus their base products), with
  which the loop fuses. XLA:CPU re-runs the loop inside each consumer, so a product with several consumers and
  nothing added is better a batched dot: the D-wide down residual, when it was widened per row, ran 5-12% faster
  that way (it is now one matmul per cluster, `hierarchical.py`).
  """
  return _widen(p_NxSxR, v_ExRxO[blocks_N])


def _widen_fwd(p_NxSxR, v_ExRxO, blocks_N):
  return widen(p_NxSxR, v_ExRxO, blocks_N), (p_NxSxR, v_ExRxO, blocks_N)


def _widen_bwd(residuals, d_out_NxSxO):
  p_NxSxR, v_ExRxO, blocks_N = residuals
  d_p = jnp.einsum("nso,nro->nsr", d_out_NxSxO, v_ExRxO[blocks_N])
  d_v_per_block = _per_block_outer(p_NxSxR, d_out_NxSxO)
  d_v = _sum_blocks_into_experts(d_v_per_block, blocks_N, v_ExRxO.shape[0])
  return _sum_to_type_of(d_p, p_NxSxR), _sum_to_type_of(d_v, v_ExRxO), None


widen.defvjp(_widen_fwd, _widen_bwd)


@jax.custom_vjp
def narrow(rows_NxSxI: jax.Array, u_ExIxR: jax.Array, blocks_N: jax.Array) -> jax.Array:
  """Rows [N, S, I] of block n times `u_ExIxR[blocks_N[n]]`: [N, S, R] (a batched dot; XLA:CPU runs it well)."""
  return jnp.einsum("nsi,nir->nsr", rows_NxSxI, u_ExIxR[blocks_N])


def _narrow_fwd(rows_NxSxI, u_ExIxR, blocks_N):
  return narrow(rows_NxSxI, u_ExIxR, blocks_N), (rows_NxSxI, u_ExIxR, blocks_N)


def _narrow_bwd(residuals, d_out_NxSxR):
  rows_NxSxI, u_ExIxR, blocks_N = residuals
  # The input gradient is a widening product (K = R) like `widen`'s forward, but here the batched dot measured faster
  # than the unrolled loop (whose result feeds two fusions, each redoing it): layer 747 vs 774 and 704 vs 724 ms (A/B,
  # median of 7-9). Its factor is gathered as [N, R, I] (I minor): 741 vs 762 ms against autodiff's [N, I, R].
  d_rows = jnp.einsum("nsr,nri->nsi", d_out_NxSxR, jnp.swapaxes(u_ExIxR, 1, 2)[blocks_N])
  # Per-block weight gradients as [N, R, I] (R outer, I minor): autodiff's [N, I, R] puts the 16-wide R minor, and
  # XLA:CPU ran that batched dot 3-4x slower than this layout (the down factor's [288, 1024, 16]: 70-78 ms).
  d_u_per_block = _per_block_outer(d_out_NxSxR, rows_NxSxI)
  d_u = jnp.swapaxes(_sum_blocks_into_experts(d_u_per_block, blocks_N, u_ExIxR.shape[0]), 1, 2)
  return _sum_to_type_of(d_rows, rows_NxSxI), _sum_to_type_of(d_u, u_ExIxR), None


narrow.defvjp(_narrow_fwd, _narrow_bwd)
