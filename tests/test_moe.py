"""Oracle tests: every fast MoE dispatch path against an independent numpy router and per-token, per-expert loop."""

import dataclasses
import math
from functools import partial

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmoe.config import MoEConfig
from hmoe.model.moe import MoEFeedForward
from hmoe.routing import dispatch
from hmoe.testing import assert_close, layer_outputs_and_grads, random_layer_params

_D, _F = 8, 16


def _np_softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _np_silu(x: np.ndarray) -> np.ndarray:
  return x / (1.0 + np.exp(-x))


def _capacity(cfg: MoEConfig, num_tokens: int, train: bool) -> int | None:
  """Slots per expert, written out here: ceil(cf * T * K / E) clipped to [1, T]; None when the run is dropless."""
  if cfg.dropless or (not train and cfg.eval_dropless):
    return None
  factor = cfg.capacity_factor if train else cfg.eval_capacity_factor
  return min(num_tokens, max(1, math.ceil(factor * num_tokens * cfg.top_k / cfg.num_experts)))


@dataclasses.dataclass
class _Decisions:
  expert_index: np.ndarray  # int [G, T, K], best first.
  gates: np.ndarray  # float64 [G, T, K], unbiased probabilities renormalised over the K (raw if K = 1).
  kept: np.ndarray  # bool [G, T, K].
  probs: np.ndarray  # float64 [G, T, E].


def _np_decisions(kernel_DxE, x_GxTxD, cfg: MoEConfig, capacity: int | None, bias_E=None) -> _Decisions:
  """Softmax, biased top-k selection, renormalised unbiased gates and k-major GShard capacity, all in numpy."""
  x = np.asarray(x_GxTxD, np.float64)
  probs = _np_softmax(x @ np.asarray(kernel_DxE, np.float64))
  scores = probs if bias_E is None else probs + np.asarray(bias_E, np.float64)
  order = np.argsort(-scores, axis=-1, kind="stable")
  index = order[..., :cfg.top_k]
  # Decisive choices: the k-th and (k+1)-th scores are far apart, so float32 rounding cannot flip a pick.
  if cfg.top_k < cfg.num_experts:
    sorted_scores = np.take_along_axis(scores, order, axis=-1)
    assert np.min(sorted_scores[..., cfg.top_k - 1] - sorted_scores[..., cfg.top_k]) > 1e-4
  top = np.take_along_axis(probs, index, axis=-1)
  gates = top / top.sum(-1, keepdims=True) if cfg.top_k > 1 else top
  kept = np.zeros(index.shape, bool)
  for g in range(index.shape[0]):
    used = np.zeros(cfg.num_experts, int)
    for k in range(cfg.top_k):  # All first choices in token order, then all second choices, ...
      for t in range(index.shape[1]):
        e = index[g, t, k]
        if capacity is None or used[e] < capacity:
          kept[g, t, k], used[e] = True, used[e] + 1
  return _Decisions(index, gates, kept, probs)


def _np_forward(p, x_GxTxD, cfg: MoEConfig, dec: _Decisions) -> np.ndarray:
  """Per token, per kept choice: gate * SwiGLU of that expert, times routed_scale (float64 numpy)."""
  w = {name: np.asarray(p[name], np.float64) for name in ("w_gate", "w_up", "w_down")}
  x = np.asarray(x_GxTxD, np.float64)
  y = np.zeros_like(x)
  for g, t in np.ndindex(*x.shape[:2]):
    for k in range(cfg.top_k):
      if dec.kept[g, t, k]:
        e = dec.expert_index[g, t, k]
        hidden = _np_silu(x[g, t] @ w["w_gate"][e]) * (x[g, t] @ w["w_up"][e])
        y[g, t] += dec.gates[g, t, k] * (hidden @ w["w_down"][e])
  return cfg.routed_scale * y


def _jnp_oracle(p, x_GxTxD, expert_index, kept, routed_scale):
  """The oracle as a jnp function of (params, x) with the numpy decisions as constants, for gradients."""
  probs = jax.nn.softmax(jnp.einsum("gtd,de->gte", x_GxTxD, p["router"]["kernel"]), axis=-1)
  top = jnp.take_along_axis(probs, expert_index, axis=-1)
  gates = top / jnp.sum(top, axis=-1, keepdims=True) if expert_index.shape[-1] > 1 else top
  w = {name: p[name][expert_index] for name in ("w_gate", "w_up", "w_down")}  # [G, T, K, ...]
  hidden = jax.nn.silu(jnp.einsum("gtd,gtkdf->gtkf", x_GxTxD, w["w_gate"])) * jnp.einsum(
      "gtd,gtkdf->gtkf", x_GxTxD, w["w_up"])
  out = jnp.einsum("gtkf,gtkfd->gtkd", hidden, w["w_down"])
  return routed_scale * jnp.einsum("gtk,gtkd->gtd", gates * kept, out)


_oracle_loss = lambda p, x, index, kept, scale: jnp.sum(jnp.sin(_jnp_oracle(p, x, index, kept, scale)))
_oracle_grad = jax.jit(jax.grad(_oracle_loss, argnums=(0, 1)))


def _random_params(layer: nn.Module, x_BxLxD: jax.Array, seed: int) -> dict:
  """Fan-in scaled normals; the router kernel has std 1 (logits of std ~3): routing is decisive, gates far from
  uniform."""
  return random_layer_params(layer, x_BxLxD, seed, lambda name, shape: 1.0 if name == "kernel" else shape[-2] ** -0.5)


# (config overrides, train, num_groups, selection bias). Drops: train cf 0.5, eval eval_capacity_factor 0.5 while
# capacity_factor is large (so eval must use eval_capacity_factor); dropless cases set capacity_factor tiny so any
# capacity used by mistake would drop.
_CASES = {
    "sort-train-drops-g2-scaled": (dict(dispatch="sort", capacity_factor=0.5, routed_scale=1.5), True, 2, False),
    "sort-train-g1-bias": (dict(dispatch="sort", capacity_factor=0.75), True, 1, True),
    "einsum-train-drops-g2": (dict(dispatch="einsum", capacity_factor=0.5), True, 2, False),
    "einsum-eval-capacity-g1": (dict(dispatch="einsum", capacity_factor=4.0, eval_dropless=False,
                                     eval_capacity_factor=0.5, routed_scale=2.0), False, 1, False),
    "dropless-train-g2-bias": (dict(dispatch="sort", dropless=True, dropless_block_size=4, capacity_factor=0.25),
                               True, 2, True),
    "dropless-train-g1": (dict(dispatch="sort", dropless=True, dropless_block_size=4, capacity_factor=0.25),
                          True, 1, False),
    "sort-eval-dropless-g1": (dict(dispatch="sort", capacity_factor=0.25), False, 1, False),
    "sort-eval-capacity-g2-bias": (dict(dispatch="sort", capacity_factor=4.0, eval_dropless=False,
                                        eval_capacity_factor=0.5), False, 2, True),
    "einsum-eval-dropless-g2": (dict(dispatch="einsum", capacity_factor=0.25), False, 2, False),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_layer_matches_numpy_router_and_per_expert_loop(case):
  overrides, train, num_groups, with_bias = _CASES[case]
  cfg = MoEConfig(num_experts=4, top_k=2, expert_ff=_F, num_groups=num_groups, **overrides)
  layer = MoEFeedForward(cfg)
  x_BxLxD = jax.random.normal(jax.random.PRNGKey(0), (2, 8, _D))
  params = _random_params(layer, x_BxLxD, seed=1)
  bias = jnp.array([0.0, 0.3, -0.2, 0.1]) if with_bias else None
  num_tokens = 16 // num_groups
  x_GxTxD = np.asarray(x_BxLxD).reshape(num_groups, num_tokens, _D)
  p = params["params"]
  capacity = _capacity(cfg, num_tokens, train)
  dec = _np_decisions(p["router"]["kernel"], x_GxTxD, cfg, capacity, bias)
  if with_bias:  # The bias moves some choices; the gates stay the unbiased renormalised probabilities.
    assert np.any(dec.expert_index != _np_decisions(p["router"]["kernel"], x_GxTxD, cfg, capacity).expert_index)

  y, stats, grads = layer_outputs_and_grads(layer, params, x_BxLxD, train=train, selection_bias=bias)
  assert_close("output", np.asarray(y).reshape(x_GxTxD.shape), _np_forward(p, x_GxTxD, cfg, dec), 1e-5, 1e-5)
  dropped = int((~dec.kept).sum())
  assert int(stats.num_dropped) == dropped
  assert int(stats.num_assignments) == 16 * cfg.top_k
  assert (dropped > 0) == (capacity is not None), (dropped, capacity)  # Capacity cases really drop.

  # Statistics against numpy: loads, the activation-centroid sums and counts, and the losses (mean over groups).
  one_hot = np.eye(cfg.num_experts)[dec.expert_index]  # [G, T, K, E]
  assert_close("expert_load", stats.expert_load, one_hot.mean(axis=(0, 1, 2)), 1e-6, 1e-6)
  per_token = one_hot.sum(axis=2)  # [G, T, E]: kept or not.
  assert_close("expert_token_count", stats.expert_token_count, per_token.sum(axis=(0, 1)), 1e-6, 1e-6)
  assert_close("expert_token_sum", stats.expert_token_sum, np.einsum("gte,gtd->ed", per_token, x_GxTxD), 1e-5, 1e-5)
  f = one_hot.mean(axis=(1, 2))  # [G, E]
  balance = cfg.num_experts * np.sum(f * dec.probs.mean(axis=1), axis=-1).mean()
  assert_close("balance_loss", stats.balance_loss, balance, 1e-5, 1e-5)
  logits = x_GxTxD @ np.asarray(p["router"]["kernel"], np.float64)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  assert_close("z_loss", stats.z_loss, np.mean(lse**2), 1e-5, 1e-5)

  grads_oracle = _oracle_grad(p, jnp.asarray(x_GxTxD), jnp.asarray(dec.expert_index, jnp.int32),
                              jnp.asarray(dec.kept, jnp.float32), cfg.routed_scale)
  for name in ("w_gate", "w_up", "w_down"):
    assert_close(f"d/d {name}", grads[0]["params"][name], grads_oracle[0][name], 1e-5, 1e-4)
  assert_close("d/d router kernel", grads[0]["params"]["router"]["kernel"], grads_oracle[0]["router"]["kernel"],
                1e-5, 1e-4)
  assert_close("d/d x", np.asarray(grads[1]).reshape(x_GxTxD.shape), grads_oracle[1], 1e-5, 1e-4)


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


@pytest.mark.parametrize("num_tokens,top_k,num_experts,block_size", [(1, 2, 32, 128), (3, 2, 4, 8), (50, 2, 5, 8),
                                                                     (7, 1, 64, 4), (16, 2, 8, 1)])
def test_dropless_block_bound_fits_the_worst_routing_and_is_tight_at_decode(num_tokens, top_k, num_experts,
                                                                             block_size):
  rows = num_tokens * top_k
  bound = dispatch.dropless_num_blocks(num_tokens, num_experts, top_k, block_size)
  # Worst case: as many experts as possible get a remainder of one row past a whole number of blocks.
  rng = np.random.default_rng(0)
  worst = 0
  for _ in range(200):
    counts = np.bincount(rng.integers(0, num_experts, rows), minlength=num_experts)
    worst = max(worst, int(np.sum(-(-counts // block_size))))
  busy = min(num_experts, rows)
  ones = np.ones(busy, int)
  ones[0] += rows - busy  # busy - 1 experts with one row, the rest on one expert.
  worst = max(worst, int(np.sum(-(-ones // block_size))))
  assert worst <= bound
  if rows <= num_experts:  # Decode-shaped: at most one block per routed row.
    assert bound <= rows


def test_dropless_never_drops_and_padding_is_bounded():
  expert_index = jax.random.randint(jax.random.PRNGKey(0), (50, 2), 0, 5)
  expert_index = expert_index.at[:, 1].set((expert_index[:, 0] + 1) % 5)
  plan = jax.jit(dispatch.plan_dropless, static_argnums=(1, 2))(expert_index, 5, 8)
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

  expected = jax.jit(jax.vmap(partial(dispatch_and_gather, capacity=3)))(expert_index, x)
  mapped = lambda index, x: dispatch.map_groups(dispatch_and_gather, (0, 0, None), index, x, 3)
  actual = jax.jit(mapped)(expert_index, x)
  chex.assert_trees_all_close(actual, expected)
  with pytest.raises(ValueError, match="at least one"):
    dispatch.map_groups(dispatch_and_gather, (None, None, None), expert_index, x, 3)



def test_dropless_plan_gives_no_row_to_the_sentinel_index_and_sizes_the_buffer_by_max_rows():
  num_experts, block_size = 4, 4
  expert_index = jax.random.randint(jax.random.PRNGKey(2), (30, 2), 0, num_experts)
  # The last 10 tokens need no rows (as the HMoE's empty cluster slots): index num_experts.
  expert_index = expert_index.at[20:].set(num_experts)
  plan = dispatch.plan_dropless(expert_index, num_experts, block_size, max_rows=40)
  assert plan.num_rows == dispatch.dropless_num_blocks(30, num_experts, 2, block_size, max_rows=40) * block_size
  assert plan.num_rows < dispatch.dropless_num_blocks(30, num_experts, 2, block_size) * block_size
  expert_flat = np.asarray(expert_index.T.reshape(-1))
  kept, rows = np.asarray(plan.kept), np.asarray(plan.row)
  np.testing.assert_array_equal(kept, expert_flat < num_experts)
  assert np.all(rows[~kept] == plan.num_rows) and len(np.unique(rows[kept])) == kept.sum()
  assert rows[kept].max() < plan.num_rows
  np.testing.assert_array_equal(np.asarray(plan.block_expert)[rows[kept] // block_size], expert_flat[kept])
  x = jax.random.normal(jax.random.PRNGKey(3), (30, 3))
  gates = jnp.ones((30, 2))
  out = dispatch.combine_rows(dispatch.gather_rows(x, plan), plan, gates)
  np.testing.assert_allclose(np.asarray(out), np.concatenate([2 * np.asarray(x[:20]), np.zeros((10, 3))]), atol=1e-6)
