"""Moving tokens to experts and back, for one routing group of T tokens.

Three interchangeable paths, all with static shapes and no Python loop over tokens or experts:

* `capacity` ("sort"): sort the T*K assignments by expert, give each a slot `expert * C + position`, gather tokens into
  `[E, C, D]` buffers and run the experts as one batched matmul. Assignments past capacity are dropped. O(T*K*D) data
  movement, so it costs about as much as the dense FFN with the same active FLOPs.
* `einsum` (GShard, Lepikhin et al. 2020): one-hot `[T, E, C]` dispatch/combine tensors contracted with einsums. It
  does O(T*E*C*D) work, about 10x slower than `capacity` on CPU at 8k tokens, and is kept as the reference formulation
  and for TPUs, where its dense einsums shard trivially over the expert axis.
* `dropless` (MegaBlocks-style block-sparse, Gale et al. 2022): assignments sorted by expert are padded per expert to a
  multiple of a row block, each block is multiplied with its expert's weights. Nothing is ever dropped; padding costs at
  most `E * (block - 1)` extra rows. `jax.lax.ragged_dot` does the same grouped matmul but measured ~10x slower on CPU.

Priority when capacity is short follows GShard: every token's first choice is served before any second choice, and
earlier tokens before later ones within the same choice rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp


def map_groups(fn: Callable[..., Any], in_axes: Sequence[int | None], *args: Any) -> Any:
  """`jax.vmap(fn, in_axes)(*args)` over the leading routing-group axis, calling `fn` directly for a single group.

  A vmapped gather/scatter becomes a batched gather that XLA:CPU runs much slower than the plain one: the HMoE layer
  at 8,192 tokens (E=32, G=8) took 532 ms vmapped over one group and 361 ms called directly (standard MoE: 5% less).
  `args` with axis None are passed through unchanged; outputs get the group axis back.
  """
  mapped = [arg for arg, axis in zip(args, in_axes) if axis == 0]
  if not mapped:
    raise ValueError("map_groups needs at least one argument mapped over axis 0")
  if jax.tree.leaves(mapped[0])[0].shape[0] != 1:
    return jax.vmap(fn, in_axes=tuple(in_axes))(*args)
  squeezed = [jax.tree.map(lambda leaf: leaf[0], arg) if axis == 0 else arg for arg, axis in zip(args, in_axes)]
  return jax.tree.map(lambda leaf: leaf[None], fn(*squeezed))


def split_groups(x_BxLxD: jax.Array, num_groups: int) -> jax.Array:
  """[B, L, D] -> [G, T, D] routing groups of T = B * L / G consecutive tokens, groups sharded over `data`."""
  batch, length, width = x_BxLxD.shape
  x_GxTxD = x_BxLxD.reshape(num_groups, batch * length // num_groups, width)
  return nn.with_logical_constraint(x_GxTxD, ("batch", None, "embed"))


def parallel_capacity_factor(config: Any, num_shards: int, train: bool) -> float:
  """Capacity factor of the expert-parallel send buffers; dropless reserves every row for any one shard."""
  if config.dropless or (not train and config.eval_dropless):
    return float(num_shards)
  return config.capacity_factor if train else config.eval_capacity_factor


def layer_capacity(config: Any, num_tokens: int, num_owners: int, picks_per_token: int, train: bool) -> int | None:
  """Slots per owner (expert or cluster) of a routed layer, or None when it runs dropless.

  Args:
    config: a `hmoe.config.RoutedConfig` (`dropless`, `eval_dropless`, `capacity_factor`, `eval_capacity_factor`).
    num_tokens: T, tokens of one routing group.
    num_owners: E experts (standard MoE) or G clusters (HMoE).
    picks_per_token: owners each token picks (top-k experts or top-k clusters).
    train: training uses `capacity_factor`, evaluation `eval_capacity_factor` unless `eval_dropless`.
  """
  if config.dropless or (not train and config.eval_dropless):
    return None
  factor = config.capacity_factor if train else config.eval_capacity_factor
  return expert_capacity(num_tokens, num_owners, picks_per_token, factor)


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
  """Slots per expert: `ceil(capacity_factor * T * K / E)`, at least 1 and at most T (a token uses an expert once)."""
  return int(min(num_tokens, max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))))


@flax.struct.dataclass
class DispatchPlan:
  """Where every assignment goes. Assignments are flattened k-major: index `k * T + t`.

  Attributes:
    row: int32 [K*T] buffer row of each assignment; `num_rows` (one past the end) for dropped ones.
    kept: bool [K*T] whether the assignment got a slot.
    row_token: int32 [num_rows] token held by each buffer row; T for empty rows (gathers a zero row).
    block_expert: int32 [num_rows // block] expert of each row block (dropless only; [E] otherwise).
  """

  row: jax.Array
  kept: jax.Array
  row_token: jax.Array
  block_expert: jax.Array

  @property
  def num_rows(self) -> int:
    return self.row_token.shape[0]

  @property
  def num_dropped(self) -> jax.Array:
    return jnp.sum(~self.kept)


def _sorted_positions(expert_flat: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
  """Rank of each assignment among those of its expert (in priority order), and per-expert counts."""
  order = jnp.argsort(expert_flat, stable=True)
  counts_E = jnp.bincount(expert_flat, length=num_experts)
  starts_E = jnp.cumsum(counts_E) - counts_E
  rank_sorted = jnp.arange(expert_flat.shape[0], dtype=jnp.int32) - starts_E[expert_flat[order]]
  rank = jnp.zeros_like(rank_sorted).at[order].set(rank_sorted)
  return rank, counts_E


def _row_tokens(row: jax.Array, num_rows: int, num_tokens: int, top_k: int) -> jax.Array:
  token_of_assignment = jnp.tile(jnp.arange(num_tokens, dtype=jnp.int32), top_k)
  # One spare row absorbs dropped assignments so the scatter never needs a mask.
  return jnp.full((num_rows + 1,), num_tokens, jnp.int32).at[row].set(token_of_assignment)[:num_rows]


def plan_capacity(expert_index_TxK: jax.Array, num_experts: int, capacity: int) -> DispatchPlan:
  """Slots `expert * C + rank` for the first C assignments of each expert; the rest are dropped."""
  num_tokens, top_k = expert_index_TxK.shape
  expert_flat = expert_index_TxK.T.reshape(-1)
  rank, _ = _sorted_positions(expert_flat, num_experts)
  kept = rank < capacity
  num_rows = num_experts * capacity
  row = jnp.where(kept, expert_flat * capacity + rank, num_rows)
  return DispatchPlan(row=row, kept=kept, row_token=_row_tokens(row, num_rows, num_tokens, top_k),
                      block_expert=jnp.arange(num_experts, dtype=jnp.int32))


def dropless_num_blocks(num_tokens: int, num_experts: int, top_k: int, block_size: int,
                        max_rows: int | None = None) -> int:
  """Static block count that fits any routing of `num_tokens * top_k` rows (or of at most `max_rows` of them).

  Only experts that got rows are padded, each by at most `block_size - 1` rows, and at most min(E, rows) experts get
  any: sum_e ceil(c_e / S) <= (rows + min(E, rows) (S - 1)) / S. At decode (a few rows) this is a block or two
  instead of E + 1 (with the bound `rows / S + E`, one decoded token at E=32 multiplied 33 blocks of 128 rows).
  """
  rows = num_tokens * top_k if max_rows is None else min(max_rows, num_tokens * top_k)
  return math.ceil((rows + min(num_experts, rows) * (block_size - 1)) / block_size)


def plan_dropless(expert_index_TxK: jax.Array, num_experts: int, block_size: int,
                  max_rows: int | None = None) -> DispatchPlan:
  """Rows sorted by expert, each expert's segment padded to a multiple of `block_size`; nothing dropped.

  An index equal to `num_experts` marks an assignment that needs no row (the HMoE's empty cluster slots): it is
  reported as not kept, and `max_rows`, a static bound on the other assignments, sizes the buffer.
  """
  num_tokens, top_k = expert_index_TxK.shape
  expert_flat = expert_index_TxK.T.reshape(-1)
  rank, counts = _sorted_positions(expert_flat, num_experts + 1)
  counts_E = counts[:num_experts]
  padded_E = -(-counts_E // block_size) * block_size
  padded_end_E = jnp.cumsum(padded_E)
  num_blocks = dropless_num_blocks(num_tokens, num_experts, top_k, block_size, max_rows)
  num_rows = num_blocks * block_size
  kept = expert_flat < num_experts
  row = jnp.where(kept, jnp.concatenate([padded_end_E - padded_E, jnp.zeros((1,), padded_E.dtype)])[expert_flat]
                  + rank, num_rows)
  block_start = jnp.arange(num_blocks, dtype=jnp.int32) * block_size
  # Trailing blocks past the last expert hold only empty rows; clamping gives them a valid (unused) expert.
  block_expert = jnp.minimum(jnp.searchsorted(padded_end_E, block_start, side="right"), num_experts - 1)
  return DispatchPlan(row=row, kept=kept, row_token=_row_tokens(row, num_rows, num_tokens, top_k),
                      block_expert=block_expert.astype(jnp.int32))


# Both moves between tokens and buffer rows are gathers, and so are their transposes: a buffer row holds at most one
# assignment, so the cotangent of `gather_rows` is `combine_rows` with unit weights, and that of `combine_rows` is a
# weighted `gather_rows`. Autodiff would transpose each gather into a scatter-add instead, which XLA runs serially on
# CPU (the backward of the sort path was 2-3x its forward); the custom VJPs below keep the backward gather-only.


def _rows_or_zero(x_NxD: jax.Array, index: jax.Array) -> jax.Array:
  """`x_NxD[index]` with index N (one past the end: empty rows, dropped assignments) reading a zero row.

  A filling gather rather than a gather from `concatenate([x, zeros])`: XLA:CPU wrote the padded copy out whenever
  `x` had several consumers (the HMoE's F-wide stage-2 combines: three [18433, 1024] copies, 13-20 ms each), while
  the filling gather's bounds check fuses into its consumer. HMoE layer (E=32, M=4 / M=8, F=1024, T=8192, fwd + bwd,
  round-robin, median of 11) 912 -> 891 / 923 -> 890 ms; the MoE 1147 -> 1148 ms; gradients identical.
  """
  return x_NxD.at[index].get(mode="fill", fill_value=0)


def _combine(y_RxD: jax.Array, row_KT: jax.Array, weights_KxT: jax.Array) -> jax.Array:
  top_k, num_tokens = weights_KxT.shape
  y_KxTxD = _rows_or_zero(y_RxD, row_KT).reshape(top_k, num_tokens, -1)
  # Unrolled over the (small, static) K: each term fuses gather and scale into one loop. Measured at 10k tokens,
  # F=512, K=2 (forward / forward+backward): 37 / 156 ms; einsum("ktd,kt->td") 47 / 169 ms (a transpose copy plus a
  # batched matrix-vector product); broadcast multiply + sum over K 66 / 347 ms.
  combined_TxD = y_KxTxD[0] * weights_KxT[0, :, None]
  for k in range(1, top_k):
    combined_TxD = combined_TxD + y_KxTxD[k] * weights_KxT[k, :, None]
  return combined_TxD


@jax.custom_vjp
def _gather(x_TxD: jax.Array, row_token_R: jax.Array, row_KT: jax.Array, kept_KT: jax.Array) -> jax.Array:
  del row_KT, kept_KT
  return _rows_or_zero(x_TxD, row_token_R)


def _gather_fwd(x_TxD, row_token_R, row_KT, kept_KT):
  return _gather(x_TxD, row_token_R, row_KT, kept_KT), (row_KT, kept_KT, x_TxD.shape[0])


def _gather_bwd(residuals, d_rows_RxD):
  row_KT, kept_KT, num_tokens = residuals
  weights_KxT = kept_KT.reshape(-1, num_tokens).astype(d_rows_RxD.dtype)
  return _combine(d_rows_RxD, row_KT, weights_KxT), None, None, None


_gather.defvjp(_gather_fwd, _gather_bwd)


@jax.custom_vjp
def _combine_rows(y_RxD: jax.Array, row_KT: jax.Array, row_token_R: jax.Array, weights_KxT: jax.Array) -> jax.Array:
  del row_token_R
  return _combine(y_RxD, row_KT, weights_KxT)


def _combine_fwd(y_RxD, row_KT, row_token_R, weights_KxT):
  return _combine(y_RxD, row_KT, weights_KxT), (y_RxD, row_KT, row_token_R, weights_KxT)


def _combine_bwd(residuals, d_out_TxD):
  y_RxD, row_KT, row_token_R, weights_KxT = residuals
  num_rows = y_RxD.shape[0]
  # The weight of the assignment in each row (0 for empty rows): a scatter of K * T scalars, not of rows.
  weight_R = jnp.zeros((num_rows + 1,), weights_KxT.dtype).at[row_KT].set(weights_KxT.reshape(-1))[:num_rows]
  # A clamped gather, not `_rows_or_zero`: an empty row (token index T) reads token T - 1, which its zero weight
  # cancels in d_y (unless that gradient is already non-finite) and whose gate-gradient entry below is never read.
  # The fill gather's mask could not fuse into the gate-gradient reduction (a YNNPACK dot), so XLA:CPU wrote a
  # masked copy of the gathered rows: [18432, 1024] for the HMoE's hidden combine, [20480, 256] for the MoE's.
  # Gradients identical; HMoE layer (E=32, F=1024, T=8192) 899 -> 889 (M=4), 883 -> 879 ms (M=8), A/B median of 7.
  d_out_RxD = jnp.take(d_out_TxD, row_token_R, axis=0, mode="clip")
  d_y_RxD = d_out_RxD * weight_R[:, None].astype(d_out_TxD.dtype)
  top_k, num_tokens = weights_KxT.shape
  # The gate gradient <y_row, d_out_token> is reduced in row order, from the rows just gathered for d_y, and only
  # the scalars move to (k, t) order (dropped assignments read the zero pad). Gathering y into [K, T, D] for an
  # einsum("ktd,td->kt") made XLA:CPU run a batched matrix-vector product over T after a transpose copy: the HMoE
  # layer (E=32, M=8, F=1024, T=8192, fwd + bwd, round-robin, median of 7) 591 -> 529 ms; the MoE 628 -> 626 ms.
  d_weight_R = jnp.sum(y_RxD * d_out_RxD, axis=-1)
  d_weights_KxT = _rows_or_zero(d_weight_R[:, None], row_KT).reshape(top_k, num_tokens).astype(weights_KxT.dtype)
  return d_y_RxD, None, None, d_weights_KxT


_combine_rows.defvjp(_combine_fwd, _combine_bwd)


def gather_rows(x_TxD: jax.Array, plan: DispatchPlan) -> jax.Array:
  """[T, D] -> [num_rows, D]; empty rows are zeros."""
  return _gather(x_TxD, plan.row_token, plan.row, plan.kept)


def combine_rows(y_RxD: jax.Array, plan: DispatchPlan, gates_TxK: jax.Array) -> jax.Array:
  """[num_rows, D] expert outputs -> [T, D] gate-weighted sum over each token's kept assignments."""
  num_tokens, top_k = gates_TxK.shape
  weights_KxT = (gates_TxK.T * plan.kept.reshape(top_k, num_tokens)).astype(y_RxD.dtype)
  return _combine_rows(y_RxD, plan.row, plan.row_token, weights_KxT)


def einsum_masks(expert_index_TxK: jax.Array, gates_TxK: jax.Array, num_experts: int,
                 capacity: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """GShard dispatch/combine tensors. Returns (dispatch [T, E, C] 0/1, combine [T, E, C] gates, kept [K*T])."""
  num_tokens, top_k = expert_index_TxK.shape
  one_hot_KxTxE = jax.nn.one_hot(expert_index_TxK.T, num_experts, dtype=jnp.int32)
  # Position of each assignment in its expert's queue, counting k-major as in `plan_capacity`.
  position_KxTxE = (jnp.cumsum(one_hot_KxTxE.reshape(top_k * num_tokens, num_experts), axis=0)
                    .reshape(top_k, num_tokens, num_experts) - 1) * one_hot_KxTxE
  position_KxT = jnp.sum(position_KxTxE, axis=-1)
  kept_KxT = position_KxT < capacity
  expert_KxTxE = (one_hot_KxTxE * kept_KxT[..., None]).astype(jnp.float32)
  slot_KxTxC = jax.nn.one_hot(position_KxT, capacity, dtype=jnp.float32)
  # Contract k inside the einsum so the [K, T, E, C] product is never materialised.
  dispatch_TxExC = jnp.einsum("kte,ktc->tec", expert_KxTxE, slot_KxTxC)
  combine_TxExC = jnp.einsum("kte,ktc,tk->tec", expert_KxTxE, slot_KxTxC, gates_TxK)
  return dispatch_TxExC, combine_TxExC, kept_KxT.reshape(-1)
