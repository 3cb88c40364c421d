"""Hierarchical MoE layer: clustered experts with shared bases and low-rank residuals, routed in two stages.

Axis alphabet as in `hmoe.routing`, plus G clusters, M experts per cluster (E = G * M, cluster-major: e = g * M + m),
R residual rank, Kc clusters and Ke experts chosen per token, N row blocks, S rows per block.

Every expert matrix is `W_e = B_c + U_e V_e`. The forward pass reuses the base products:

1. Stage-1 dispatch: each (token, chosen cluster) pair gets a slot in its cluster's `[C, D]` buffer (sort/gather, as
   `hmoe.routing.dispatch.plan_capacity`; capacity is per cluster and drops are counted exactly). Dropless runs sort
   the slots into per-cluster row blocks instead (`plan_dropless`), each block multiplied with its cluster's bases.
2. `x B_c^gate` and `x B_c^up` are computed once per slot, not once per expert.
3. Stage-2: the slot's Ke chosen experts become rows of a block-sparse grouped matmul (`plan_dropless` over the E
   experts), so only the *selected* experts' F-wide factors are applied: `(x U_e) V_e` costs R F per row after
   `x U` is computed per slot for all M members at once (M R D, one dense matmul per cluster), and no
   `[tokens, M, F]` tensor for all members is ever formed.
4. Down projection by linearity:
   `sum_e g_e h_e W_e^down = (sum_e g_e h_e) B_c^down + sum_e g_e (h_e U_e^down) V_e^down`,
   so the base down product is also computed once per slot, and so is the residual's widening product: the gated
   R-wide `h_e U_e^down` of a slot's experts are laid out by member and multiplied with the cluster's stacked
   `V^down`s in one `[C, M R] x [M R, D]` matmul.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from hmoe.config import HMoEConfig
from hmoe.inference.quantize import fake_quantize, group_for
from hmoe.model import low_rank as low_rank_ops
from hmoe.model.layers import SWIGLU_MATRICES
from hmoe.parallel import expert_parallel
from hmoe.routing import dispatch
from hmoe.routing.routers import HierarchicalRouter, HierarchicalRouterOutput
from hmoe.routing.statistics import RoutingStats, layer_stats


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], stddev: float) -> jax.Array:
  init = nn.initializers.truncated_normal(stddev=stddev)
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def hmoe_group_forward(x_TxD: jax.Array, route: HierarchicalRouterOutput, bases: dict[str, jax.Array],
                       factors: dict[str, tuple[jax.Array, jax.Array]], capacity: int | None, block_size: int,
                       factor_row_E: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Output [T, D] of one routing group and the kept mask [Kc * T] of its (token, cluster) assignments.

  Args:
    x_TxD: token inputs.
    route: two-stage routing decisions for these tokens.
    bases: {"gate": [G, D, F], "up": [G, D, F], "down": [G, F, D]}.
    factors: {"gate": (U [E, D, R], V [E, R, F]), "up": (...), "down": (U [E, F, R], V [E, R, D])}, cluster-major.
    capacity: slots per cluster, C; None = dropless: slots sorted by cluster into row blocks of `block_size`, each
      block multiplied with its cluster's bases (a `[G, T, ...]` buffer would do G times the base work).
    block_size: rows per block of the grouped matmuls.
    factor_row_E: optional int32 [E]: the row of `factors` that holds each (cluster-major) expert; default: row e.
      The offloading engine passes its cache slots here (bases resident, factors cached). `route.cluster_index`
      indexes the leading axis of `bases`, so a cache of whole clusters passes slot indices there.
  """
  num_tokens, width = x_TxD.shape
  num_clusters = bases["gate"].shape[0]
  num_factor_rows = factors["gate"][0].shape[0]
  num_members = route.expert_probs.shape[-1]
  top_kc, top_ke = route.member_index.shape[1:]

  with jax.named_scope("cluster_dispatch"):
    if capacity is None:
      plan1 = dispatch.plan_dropless(route.cluster_index, num_clusters, block_size)
      slot_cluster = jnp.repeat(plan1.block_expert, block_size)
    else:
      plan1 = dispatch.plan_capacity(route.cluster_index, num_clusters, capacity)
      slot_cluster = jnp.arange(plan1.num_rows, dtype=jnp.int32) // capacity
    slots_SxD = dispatch.gather_rows(x_TxD, plan1)

  def base_product(rows_SxI, name_or_weight):
    """Rows times their own cluster's base: one batched matmul over clusters or over row blocks."""
    base_GxIxO = bases[name_or_weight] if isinstance(name_or_weight, str) else name_or_weight
    if capacity is None:
      rows_NxBxI = rows_SxI.reshape(-1, block_size, rows_SxI.shape[-1])
      out = jnp.einsum("nbi,nio->nbo", rows_NxBxI, base_GxIxO[plan1.block_expert])
    else:
      out = jnp.einsum("gci,gio->gco", rows_SxI.reshape(num_clusters, capacity, -1), base_GxIxO)
    return out.reshape(plan1.num_rows, -1)

  with jax.named_scope("base_products"):
    base_gate_SxF = base_product(slots_SxD, "gate")
    base_up_SxF = base_product(slots_SxD, "up")

  with jax.named_scope("expert_dispatch"):
    # Which (cluster choice, token) assignment fills each slot; empty slots point one past the end.
    num_assignments = top_kc * num_tokens
    slot_assignment = jnp.full((plan1.num_rows + 1,), num_assignments, jnp.int32).at[plan1.row].set(
        jnp.arange(num_assignments, dtype=jnp.int32))[:plan1.num_rows]
    members_AxKe = jnp.concatenate([jnp.swapaxes(route.member_index, 0, 1).reshape(num_assignments, top_ke),
                                    jnp.zeros((1, top_ke), jnp.int32)])
    gates_AxKe = jnp.concatenate([jnp.swapaxes(route.gates, 0, 1).reshape(num_assignments, top_ke),
                                  jnp.zeros((1, top_ke), route.gates.dtype)])
    slot_experts_SxKe = slot_cluster[:, None] * num_members + members_AxKe[slot_assignment]
    slot_gates_SxKe = gates_AxKe[slot_assignment]
    if factor_row_E is not None:
      slot_experts_SxKe = factor_row_E[slot_experts_SxKe]
    # Empty slots (capacity slack, block padding) take no stage-2 rows: at most Kc * T slots are filled, so the
    # buffer is sized for Kc * T * Ke rows. At T=8192, G=4, M=8, capacity 1.25: 22,528 -> 18,432 rows per F-wide op.
    filled_S = (slot_assignment < num_assignments)[:, None]
    plan2 = dispatch.plan_dropless(jnp.where(filled_S, slot_experts_SxKe, num_factor_rows), num_factor_rows,
                                   block_size, max_rows=num_assignments * top_ke)
    # The gate and up factors' narrowing products x U_e for all M members of each slot's cluster at once, one dense
    # matmul per cluster ([C, D] x [D, M 2R]; M times the FLOPs of the chosen experts' products, which are tiny);
    # each stage-2 row then gathers its expert's 2R values. Against per-row [S, D] x U_e products of gathered x rows
    # (a D-wide gather, two narrow batched dots, and in the backward their widening input gradients and a D-wide
    # combine): 0.2-2.5% faster over four A/Bs (E=32, M=4 and 8, F=1024, T=8192, median of 9; docs/speed.md).
    rows_GxM = jnp.arange(num_clusters * num_members, dtype=jnp.int32)
    if factor_row_E is not None:
      rows_GxM = factor_row_E[rows_GxM]
    u_ExDx2R = jnp.concatenate([factors["gate"][0], factors["up"][0]], axis=-1)
    rank = factors["gate"][0].shape[-1]
    u_GxDxK = jnp.swapaxes(u_ExDx2R[rows_GxM].reshape(num_clusters, num_members, width, 2 * rank), 1, 2)
    projected_PxR2 = base_product(slots_SxD, u_GxDxK.reshape(num_clusters, width, num_members * 2 * rank))
    # One (slot, member) pair per row of `projected_PxR2`; a pair is used by at most one stage-2 row (a slot's Ke
    # experts are distinct), so this gather's transpose is again a gather (`dispatch.gather_rows`).
    num_pairs = plan1.num_rows * num_members
    projected_PxR2 = projected_PxR2.reshape(num_pairs, 2 * rank)
    pair_KS = (jnp.arange(plan1.num_rows, dtype=jnp.int32)[:, None] * num_members
               + members_AxKe[slot_assignment]).T.reshape(-1)
    pair_row = jnp.full((num_pairs,), plan2.num_rows, jnp.int32).at[pair_KS].set(plan2.row)
    row_pair = jnp.full((plan2.num_rows + 1,), num_pairs, jnp.int32).at[plan2.row].set(pair_KS)[:plan2.num_rows]
    pairs = dispatch.DispatchPlan(row=pair_row, kept=pair_row < plan2.num_rows, row_token=row_pair,
                                  block_expert=plan2.block_expert)
    rows_projected = dispatch.gather_rows(projected_PxR2, pairs)
    rows_base_gate = dispatch.gather_rows(base_gate_SxF, plan2)
    rows_base_up = dispatch.gather_rows(base_up_SxF, plan2)

  blocks = plan2.block_expert
  num_blocks = blocks.shape[0]

  def widened(projected_NxSxR, name, base_NxSxO):
    """Each block's R-wide rows times its expert's `V`, plus `base_NxSxO` (the rows' base products)."""
    # No `optimization_barrier` to force the sum to be written out once: here the compiled program is identical with
    # and without one (a barrier blocks transpose folding, `low_rank._per_block_outer`, not this fusion), so XLA
    # alone decides where the R multiply-adds fuse.
    return low_rank_ops.widen(projected_NxSxR, factors[name][1], blocks) + base_NxSxO

  with jax.named_scope("low_rank_experts"):
    to_blocks = lambda rows: rows.reshape(num_blocks, block_size, rows.shape[-1])
    projected_NxSxR2 = to_blocks(rows_projected)
    gate_NxSxF = widened(projected_NxSxR2[..., :rank], "gate", to_blocks(rows_base_gate))
    up_NxSxF = widened(projected_NxSxR2[..., rank:], "up", to_blocks(rows_base_up))
    hidden_NxSxF = jax.nn.silu(gate_NxSxF) * up_NxSxF
    down_narrowed_NxSxR = low_rank_ops.narrow(hidden_NxSxF, factors["down"][0], blocks)

  with jax.named_scope("combine"):
    hidden_RxF = hidden_NxSxF.reshape(-1, hidden_NxSxF.shape[-1])
    weighted_hidden_SxF = dispatch.combine_rows(hidden_RxF, plan2, slot_gates_SxKe)
    # The down residual `sum_k g_k (h_k U_k) V_k` is widened per slot, not per stage-2 row: each row's gated R-wide
    # `h U` moves back to its (slot, member) pair (zeros for members not chosen), and one dense matmul per cluster
    # `[C, M R] x [M R, D]` with the members' stacked `V`s sums the Ke chosen experts' residuals. That is M / Ke times
    # the FLOPs of the per-row product (K = M R = 64-128), but it drops the D-wide [rows, D] residual buffer, its
    # combine and, in the backward, the D-wide gather, scale and gate-gradient reduction over every stage-2 row,
    # padding included (a third of the rows at T=2048). Round-robin A/B against the per-row form in one process
    # (E=32, R=16, Ke=2, fwd + bwd; gradients equal to 5e-7 relative), M=4 / M=8: T=2048, F=512 (median of 25, two
    # runs) 197 -> 178 / 180 -> 176 and 156 -> 146 / 155 -> 155 ms; T=8192, F=512 (median of 7) 539 -> 497 / 540 ->
    # 523 ms; T=8192, F=1024 879 -> 885 / 911 -> 894 ms (docs/speed.md).
    pair_gates_P = jnp.zeros((num_pairs,), slot_gates_SxKe.dtype).at[pair_KS].set(slot_gates_SxKe.T.reshape(-1))
    gated_PxR = dispatch.combine_rows(down_narrowed_NxSxR.reshape(-1, rank), pairs, pair_gates_P[:, None])
    v_down_GxKxD = factors["down"][1][rows_GxM].reshape(num_clusters, num_members * rank, width)
    residual_SxD = base_product(gated_PxR.reshape(plan1.num_rows, num_members * rank), v_down_GxKxD)
    slots_out_SxD = base_product(weighted_hidden_SxF, "down") + residual_SxD
    # Gates were applied per expert above, so stage-1 combine only sums a token's kept cluster slots.
    ones_TxKc = jnp.ones((num_tokens, top_kc), slots_out_SxD.dtype)
    y_TxD = dispatch.combine_rows(slots_out_SxD, plan1, ones_TxKc)
  return y_TxD, plan1.kept


class HMoEFeedForward(nn.Module):
  """Hierarchical MoE of SwiGLU experts in cluster-major layout. Returns (output [B, L, D], RoutingStats)."""

  config: HMoEConfig
  dtype: jnp.dtype = jnp.float32

  def _parameters(self, width: int):
    cfg = self.config
    g, m, f, r = cfg.num_clusters, cfg.experts_per_cluster, cfg.expert_ff, cfg.rank
    shapes = {"gate": (width, f), "up": (width, f), "down": (f, width)}
    axes = {"gate": ("embed", "mlp"), "up": ("embed", "mlp"), "down": ("mlp", "embed")}
    bases, factors = {}, {}
    for name in SWIGLU_MATRICES:
      fan_in, fan_out = shapes[name]
      in_axis, out_axis = axes[name]
      bases[name] = _param(self, f"base_{name}", (g, fan_in, fan_out), ("cluster", in_axis, out_axis),
                           fan_in**-0.5)
      # |U V| entries have std sqrt(R) * std_U * std_V = residual_init_scale * std_B.
      u = _param(self, f"u_{name}", (g, m, fan_in, r), ("cluster", "member", in_axis, "rank"), fan_in**-0.5)
      v = _param(self, f"v_{name}", (g, m, r, fan_out), ("cluster", "member", "rank", out_axis),
                 cfg.residual_init_scale * r**-0.5)
      if cfg.qat_group_size:  # Train for the INT4 storage format (straight-through gradient).
        u = fake_quantize(u, group_for(fan_in, cfg.qat_group_size))
        v = fake_quantize(v, group_for(r, cfg.qat_group_size))
      factors[name] = (u.reshape(g * m, fan_in, r), v.reshape(g * m, r, fan_out))
    return bases, factors

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, *, train: bool, selection_bias: jax.Array | None = None
               ) -> tuple[jax.Array, RoutingStats]:
    """`selection_bias`: float32 [E] cluster-major auxiliary-loss-free balancing biases (selection only)."""
    cfg = self.config
    g, m = cfg.num_clusters, cfg.experts_per_cluster
    x_GxTxD = dispatch.split_groups(x_BxLxD, cfg.num_groups)
    bias_GxM = None if selection_bias is None else selection_bias.reshape(g, m)
    route = HierarchicalRouter(g, m, cfg.top_k_clusters, cfg.top_k_experts, jitter=cfg.router_jitter,
                               detach_aux_input=cfg.detach_aux_input, name="router")(
                                   x_GxTxD, train=train, selection_bias_GxM=bias_GxM)
    bases, factors = self._parameters(x_BxLxD.shape[-1])
    cast = lambda tree: jax.tree.map(lambda w: w.astype(self.dtype), tree)
    capacity = dispatch.layer_capacity(cfg, x_GxTxD.shape[1], g, cfg.top_k_clusters, train)
    shards = expert_parallel.expert_axis_size() if cfg.expert_parallel else 1
    if shards > 1:
      y_GxTxD, kept = expert_parallel.hmoe_forward(x_GxTxD.astype(self.dtype), route, cast(bases), cast(factors),
                                                   dispatch.parallel_capacity_factor(cfg, shards, train),
                                                   cfg.block_size)
    else:
      y_GxTxD, kept = dispatch.map_groups(hmoe_group_forward, (0, 0, None, None, None, None),
                                          x_GxTxD.astype(self.dtype), route, cast(bases), cast(factors), capacity,
                                          cfg.block_size)
    if cfg.routed_scale != 1.0:
      y_GxTxD = y_GxTxD * cfg.routed_scale
    stats = layer_stats(route, kept, x_GxTxD, cfg.num_experts, cluster_index=route.cluster_index, num_clusters=g)
    return y_GxTxD.reshape(x_BxLxD.shape), stats
