"""The benchmarks' FLOP formulas against XLA's own count (`cost_analysis()`), on the CPU backend."""

import jax
import pytest

from experiments.benchmark import ffn_flops, hmoe_flops, interleaved_medians, malloc_setting, train_flops_per_token
from hmoe.config import MoEConfig
from hmoe.model.layers import DenseFeedForward
from hmoe.model.moe import MoEFeedForward
from hmoe.routing import dispatch
from hmoe.testing import init_params, tiny_config


def _xla_flops(module, x, **kwargs) -> float:
  params = init_params(module, x, **kwargs)
  compiled = jax.jit(lambda p, x: module.apply({"params": p}, x, **kwargs)).lower(params, x).compile()
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  if not analysis or "flops" not in analysis:
    pytest.fail(f"cost_analysis() reports no flops on {jax.devices()[0].platform}: {analysis}")
  return float(analysis["flops"])


def test_dense_ffn_flops_match_xla_up_to_the_elementwise_ops():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 256, 64))
  counted = _xla_flops(DenseFeedForward(128), x)
  matmuls = ffn_flops(256, 64, 128)
  # XLA also counts silu and the gating product: a few FLOPs per hidden unit, far below 2 D per unit.
  assert matmuls <= counted <= matmuls * 1.05


def test_capacity_moe_executes_the_padded_rows_and_useful_flops_are_t_k():
  # F = 2 D, so that the expert matmuls dominate as they do at real shapes; at F = D / 2 the per-element work that
  # cost_analysis() also counts (softmax, silu, the filling gathers' bounds checks) was ~7% of the total.
  num_tokens, width, hidden, experts, top_k = 256, 64, 128, 8, 2
  config = MoEConfig(num_experts=experts, top_k=top_k, expert_ff=hidden, capacity_factor=1.25)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, num_tokens, width))
  counted = _xla_flops(MoEFeedForward(config), x, train=True)
  capacity = dispatch.expert_capacity(num_tokens, experts, top_k, 1.25)
  executed = ffn_flops(experts * capacity, width, hidden)
  router = 2 * num_tokens * width * experts
  # Only the per-element ops on top of the expert matmuls and the router: executing just the T K useful rows would
  # count ~15% below the lower bound.
  assert executed + router <= counted <= (executed + router) * 1.05
  assert ffn_flops(num_tokens, width, hidden, top_k) == pytest.approx(executed / 1.25)


def test_hmoe_flops_count_one_base_product_per_slot_plus_the_factors():
  # 10 tokens, one cluster each, two experts in it, rank 4, D=8, F=16.
  assert hmoe_flops(10, 8, 16, 4, 1, 2) == 2 * 10 * 3 * 8 * 16 + 2 * 10 * 2 * 3 * 4 * (8 + 16)


def test_train_flops_per_token_is_six_per_active_parameter_plus_causal_attention():
  config = tiny_config().model  # 2 layers, D=32, max_len=16.
  assert train_flops_per_token(1000, config) == 6 * 1000 + 6 * 2 * 32 * 16


def test_interleaved_medians_times_every_call_round_robin_after_its_warmup():
  order = []
  calls = {name: (lambda name=name: order.append(name) or jax.numpy.zeros(())) for name in ("a", "b")}
  medians = interleaved_medians(calls, repeats=3, warmup=1)
  assert order == ["a", "b"] + ["a", "b"] * 3  # Warm-up of each, then alternating timed calls.
  assert set(medians) == {"a", "b"} and all(seconds >= 0 for seconds in medians.values())
  order.clear()
  interleaved_medians(calls, repeats=2, warmup=1, rewarm=["b"])
  assert order == ["a", "b"] + ["a", "b", "b"] * 2  # "b" runs once untimed before each timed call.


def test_malloc_setting_names_the_tunables_or_says_they_are_unset(monkeypatch):
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
  assert malloc_setting() == "GLIBC_TUNABLES=glibc.malloc.hugetlb=1"
  monkeypatch.delenv("GLIBC_TUNABLES")
  assert "unset" in malloc_setting()
