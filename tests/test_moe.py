"""Oracle tests: every fast MoE dispatch path against a naive per-token, per-expert loop."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmoe.config import MoEConfig
from hmoe.model.moe import MoEFeedForward
from hmoe.routing import dispatch
from hmoe.routing.routers import top_k_routing

_D, _F = 8, 16


def _swiglu_one(x_D, w_gate, w_up, w_down):
  return (jax.nn.silu(x_D @ w_gate) * (x_D @ w_up)) @ w_down


def _kept_mask(expert_index_TxK: np.ndarray, num_experts: int, capacity: int | None) -> np.ndarray:
  """GShard priority with explicit counters: all first choices in token order, then all second choices, ..."""
  num_tokens, top_k = expert_index_TxK.shape
  used = np.zeros(num_experts, int)
  kept = np.zeros((num_tokens, top_k), bool)
  for k in range(top_k):
    for t in range(num_tokens):
      e = expert_index_TxK[t, k]
      if capacity is None or used[e] < capacity:
        kept[t, k] = True
        used[e] += 1
  return kept


def _oracle(params, x_GxTxD, cfg: MoEConfig, capacity: int | None):
  """Loops over groups, tokens and their chosen experts; returns (y [G, T, D], dropped count)."""
  p = params["params"]
  outputs, dropped = [], 0
  for x_TxD in x_GxTxD:
    route = top_k_routing(x_TxD @ p["router"]["kernel"], cfg.top_k)
    kept = _kept_mask(np.asarray(route.expert_index), cfg.num_experts, capacity)
    dropped += int((~kept).sum())
    rows = []
    for t in range(x_TxD.shape[0]):
      y_D = jnp.zeros(x_TxD.shape[-1])
      for k in range(cfg.top_k):
        if kept[t, k]:
          e = int(route.expert_index[t, k])
          y_D = y_D + route.gates[t, k] * _swiglu_one(x_TxD[t], p["w_gate"][e], p["w_up"][e], p["w_down"][e])
      rows.append(y_D)
    outputs.append(cfg.routed_scale * jnp.stack(rows))
  return jnp.stack(outputs), dropped


_PATHS = {
    "sort": dict(dispatch="sort"),
    "einsum": dict(dispatch="einsum"),
    "dropless": dict(dispatch="sort", dropless=True, dropless_block_size=4),
}


@pytest.mark.parametrize("path", list(_PATHS))
@pytest.mark.parametrize("capacity_factor", [0.5, 1.25])
def test_fast_paths_match_per_expert_loop(path, capacity_factor):
  # routed_scale != 1 so the oracle also checks where the routed scaling factor enters (forward and gradients).
  cfg = MoEConfig(num_experts=4, top_k=2, expert_ff=_F, capacity_factor=capacity_factor, num_groups=2,
                  routed_scale=1.5, **_PATHS[path])
  layer = MoEFeedForward(cfg)
  x_BxLxD = jax.random.normal(jax.random.PRNGKey(0), (2, 12, _D))
  params = layer.init(jax.random.PRNGKey(1), x_BxLxD, train=True)
  params = nn.meta.unbox(params)
  # Scale the router so routing is decisive and ties cannot flip between paths.
  params["params"]["router"]["kernel"] = params["params"]["router"]["kernel"] * 50.0

  num_tokens = 12  # (2 * 12) tokens / 2 groups.
  capacity = None if cfg.dropless else dispatch.expert_capacity(num_tokens, 4, 2, capacity_factor)

  y_fast, stats = layer.apply(params, x_BxLxD, train=True)
  y_oracle, dropped = _oracle(params, x_BxLxD.reshape(2, num_tokens, _D), cfg, capacity)
  chex.assert_trees_all_close(y_fast.reshape(2, num_tokens, _D), y_oracle, atol=1e-5, rtol=1e-5)
  assert int(stats.num_dropped) == dropped
  if capacity_factor == 0.5 and not cfg.dropless:
    assert dropped > 0  # The case really exercises dropping.

  def fast_loss(params, x):
    return jnp.sum(jnp.sin(layer.apply(params, x, train=True)[0]))

  def oracle_loss(params, x):
    return jnp.sum(jnp.sin(_oracle(params, x.reshape(2, num_tokens, _D), cfg, capacity)[0]))

  grads_fast = jax.grad(fast_loss, argnums=(0, 1))(params, x_BxLxD)
  grads_oracle = jax.grad(oracle_loss, argnums=(0, 1))(params, x_BxLxD)
  chex.assert_trees_all_close(grads_fast, grads_oracle, atol=1e-5, rtol=1e-4)


def test_capacity_drops_on_hand_made_case():
  # 6 tokens, 3 experts, top-1, capacity 2: expert 0 is chosen by tokens 0, 1, 2, 4 -> tokens 2 and 4 dropped.
  expert_index = jnp.array([[0], [0], [0], [1], [0], [2]], jnp.int32)
  plan = dispatch.plan_capacity(expert_index, num_experts=3, capacity=2)
  np.testing.assert_array_equal(np.asarray(plan.kept), [True, True, False, True, False, True])
  assert int(plan.num_dropped) == 2
  # Rows: expert 0 -> tokens 0, 1; expert 1 -> token 3 and an empty row (token index 6 = padding).
  np.testing.assert_array_equal(np.asarray(plan.row_token), [0, 1, 3, 6, 5, 6])


def test_second_choices_yield_to_first_choices():
  # Token 0's second choice and token 1's first choice both want expert 1 with capacity 1: the first choice wins.
  expert_index = jnp.array([[0, 1], [1, 0]], jnp.int32)
  plan = dispatch.plan_capacity(expert_index, num_experts=2, capacity=1)
  # k-major order: (t0,k0)=e0 kept, (t1,k0)=e1 kept, (t0,k1)=e1 dropped, (t1,k1)=e0 dropped.
  np.testing.assert_array_equal(np.asarray(plan.kept), [True, True, False, False])


def test_dropless_never_drops_and_padding_is_bounded():
  expert_index = jax.random.randint(jax.random.PRNGKey(0), (50, 2), 0, 5)
  expert_index = expert_index.at[:, 1].set((expert_index[:, 0] + 1) % 5)
  plan = dispatch.plan_dropless(expert_index, num_experts=5, block_size=8)
  assert bool(jnp.all(plan.kept))
  assert plan.num_rows == dispatch.dropless_num_blocks(50, 5, 2, 8) * 8
  rows = np.asarray(plan.row)
  assert len(np.unique(rows)) == rows.size and rows.max() < plan.num_rows
  # Every row block holds tokens of a single expert, the one recorded for the block.
  expert_flat = np.asarray(expert_index.T.reshape(-1))
  np.testing.assert_array_equal(np.asarray(plan.block_expert)[rows // 8], expert_flat)


def test_expert_capacity_bounds():
  assert dispatch.expert_capacity(100, 4, 2, 1.0) == 50
  assert dispatch.expert_capacity(100, 4, 2, 10.0) == 100  # Never more slots than tokens.
  assert dispatch.expert_capacity(3, 64, 1, 0.01) == 1


@pytest.mark.parametrize("num_groups", [1, 3])
def test_map_groups_matches_vmap_for_one_and_several_groups(num_groups):
  expert_index = jax.random.randint(jax.random.PRNGKey(0), (num_groups, 10, 2), 0, 4)
  x = jax.random.normal(jax.random.PRNGKey(1), (num_groups, 10, 6))

  def dispatch_and_gather(index_TxK, x_TxD, capacity):
    plan = dispatch.plan_capacity(index_TxK, 4, capacity)
    return dispatch.gather_rows(x_TxD, plan), plan.kept

  expected = jax.vmap(dispatch_and_gather, in_axes=(0, 0, None))(expert_index, x, 3)
  actual = dispatch.map_groups(dispatch_and_gather, (0, 0, None), expert_index, x, 3)
  chex.assert_trees_all_close(actual, expected)
  with pytest.raises(ValueError, match="at least one"):
    dispatch.map_groups(dispatch_and_gather, (None, None, None), expert_index, x, 3)

