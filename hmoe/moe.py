"""Standard top-k Mixture-of-Experts SwiGLU feed-forward layer.

Tokens `[B, L, D]` are split into `num_groups` routing groups `[G, T, D]` (one per data shard on a pod, so routing,
capacity and sorting stay local to a device), routed by a float32 `Router`, moved to experts by one of the paths in
`hmoe.dispatch`, and combined back with their gates. Routing statistics come back as a `MoEStats` value.
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from hmoe import dispatch
from hmoe.config import MoEConfig
from hmoe.routing import Router


@flax.struct.dataclass
class MoEStats:
  """Per-layer routing statistics (averaged over routing groups where that makes sense).

  Attributes:
    balance_loss: float32 [] Switch load-balancing loss.
    z_loss: float32 [] router z-loss.
    expert_load: float32 [E] fraction of token->expert assignments each expert received (before capacity drops).
    num_dropped: int32 [] assignments dropped for lack of capacity, summed over groups (exact count).
    num_assignments: int32 [] total assignments (tokens * top_k), the denominator of the dropped fraction.
  """

  balance_loss: jax.Array
  z_loss: jax.Array
  expert_load: jax.Array
  num_dropped: jax.Array
  num_assignments: jax.Array


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, pattern: str) -> jax.Array:
  """SwiGLU `(silu(x W_gate) * (x W_up)) W_down` for any batch layout.

  `pattern` is the einsum of the input projection, e.g. "gecd,edf->gecf"; the output projection uses the same letters
  with `d` and `f` swapped.
  """
  inputs, output = pattern.split("->")
  x_spec, w_spec = inputs.split(",")
  down_pattern = f"{output},{w_spec.replace('d', '#').replace('f', 'd').replace('#', 'f')}->{x_spec}"
  hidden = jax.nn.silu(jnp.einsum(pattern, x, w_gate)) * jnp.einsum(pattern, x, w_up)
  return jnp.einsum(down_pattern, hidden, w_down)


def _expert_param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> jax.Array:
  # Fan-in scaled init per expert. batch_axis keeps the stacked expert axis out of the fan-in; without it every
  # expert starts sqrt(E) too small.
  init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=1, out_axis=2, batch_axis=(0,))
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


class MoEFeedForward(nn.Module):
  """Top-k token-choice MoE of SwiGLU experts. Returns (output [B, L, D], MoEStats)."""

  config: MoEConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, *, train: bool, selection_bias_E: jax.Array | None = None
               ) -> tuple[jax.Array, MoEStats]:
    """`selection_bias_E`: float32 [E] auxiliary-loss-free balancing biases (change which experts are chosen only)."""
    cfg = self.config
    batch, length, width = x_BxLxD.shape
    num_groups = cfg.num_groups
    num_tokens = batch * length // num_groups
    num_experts, top_k = cfg.num_experts, cfg.top_k
    x_GxTxD = nn.with_logical_constraint(x_BxLxD.reshape(num_groups, num_tokens, width), ("batch", None, "embed"))

    route = Router(num_experts, top_k, jitter=cfg.router_jitter, detach_aux_input=cfg.detach_aux_input,
                   name="router")(x_GxTxD, train=train, selection_bias_E=selection_bias_E)

    w_gate_ExDxF = _expert_param(self, "w_gate", (num_experts, width, cfg.expert_ff), ("expert", "embed", "mlp"))
    w_up_ExDxF = _expert_param(self, "w_up", (num_experts, width, cfg.expert_ff), ("expert", "embed", "mlp"))
    w_down_ExFxD = _expert_param(self, "w_down", (num_experts, cfg.expert_ff, width), ("expert", "mlp", "embed"))
    weights = [w.astype(self.dtype) for w in (w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)]
    x_GxTxD = x_GxTxD.astype(self.dtype)

    if cfg.dispatch == "einsum":
      y_GxTxD, kept = self._einsum_path(x_GxTxD, route, weights, train)
    else:
      y_GxTxD, kept = self._sort_path(x_GxTxD, route, weights, train)
    if cfg.routed_scale != 1.0:
      y_GxTxD = y_GxTxD * cfg.routed_scale

    stats = MoEStats(
        balance_loss=jnp.mean(route.balance_loss),
        z_loss=jnp.mean(route.z_loss),
        expert_load=jnp.mean(jax.nn.one_hot(route.expert_index, num_experts, dtype=jnp.float32), axis=(0, 1, 2)),
        num_dropped=jnp.sum(~kept).astype(jnp.int32),
        num_assignments=jnp.asarray(kept.size, jnp.int32),
    )
    return y_GxTxD.reshape(batch, length, width), stats

  def _dropless(self, train: bool) -> bool:
    return self.config.dropless or (not train and self.config.eval_dropless)

  def _capacity(self, num_tokens: int, train: bool) -> int:
    if self._dropless(train):
      return num_tokens  # A token uses an expert at most once, so T slots per expert never drop.
    factor = self.config.capacity_factor if train else self.config.eval_capacity_factor
    return dispatch.expert_capacity(num_tokens, self.config.num_experts, self.config.top_k, factor)

  def _sort_path(self, x_GxTxD, route, weights, train):
    cfg = self.config
    num_tokens = x_GxTxD.shape[1]
    dropless = self._dropless(train)
    if dropless:
      plan = dispatch.map_groups(dispatch.plan_dropless, (0, None, None), route.expert_index, cfg.num_experts,
                                 cfg.dropless_block_size)
    else:
      plan = dispatch.map_groups(dispatch.plan_capacity, (0, None, None), route.expert_index, cfg.num_experts,
                                 self._capacity(num_tokens, train))
    with jax.named_scope("dispatch"):
      rows_GxRxD = dispatch.map_groups(dispatch.gather_rows, (0, 0), x_GxTxD, plan)
    num_blocks = plan.block_expert.shape[-1]
    rows_GxNxSxD = rows_GxRxD.reshape(rows_GxRxD.shape[0], num_blocks, -1, rows_GxRxD.shape[-1])
    with jax.named_scope("experts"):
      if dropless:
        # Each row block multiplies its own expert's weights: gather them per block.
        block_weights = [w[plan.block_expert] for w in weights]
        y_GxNxSxD = swiglu(rows_GxNxSxD, *block_weights, pattern="gnsd,gndf->gnsf")
      else:
        rows_GxNxSxD = nn.with_logical_constraint(rows_GxNxSxD, ("batch", "expert", None, "embed"))
        y_GxNxSxD = swiglu(rows_GxNxSxD, *weights, pattern="gnsd,ndf->gnsf")
    with jax.named_scope("combine"):
      y_GxRxD = y_GxNxSxD.reshape(rows_GxRxD.shape)
      y_GxTxD = dispatch.map_groups(dispatch.combine_rows, (0, 0, 0), y_GxRxD, plan, route.gates)
    return y_GxTxD, plan.kept

  def _einsum_path(self, x_GxTxD, route, weights, train):
    capacity = self._capacity(x_GxTxD.shape[1], train)
    dispatch_GxTxExC, combine_GxTxExC, kept = jax.vmap(dispatch.einsum_masks, in_axes=(0, 0, None, None))(
        route.expert_index, route.gates, self.config.num_experts, capacity)
    x_GxExCxD = jnp.einsum("gtec,gtd->gecd", dispatch_GxTxExC.astype(self.dtype), x_GxTxD)
    x_GxExCxD = nn.with_logical_constraint(x_GxExCxD, ("batch", "expert", None, "embed"))
    y_GxExCxD = swiglu(x_GxExCxD, *weights, pattern="gecd,edf->gecf")
    y_GxTxD = jnp.einsum("gtec,gecd->gtd", combine_GxTxExC.astype(self.dtype), y_GxExCxD)
    return y_GxTxD, kept
