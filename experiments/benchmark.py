"""Timing helpers for benchmarks: warm-up excluded, `block_until_ready`, median of repeats.

Benchmarks compare variants inside one process and report ratios, because absolute times on a shared machine drift.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
import statistics
import time
from collections.abc import Callable, Collection
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hmoe.config import ExperimentConfig, from_config_dict
from hmoe.model.transformer import TransformerLM
from hmoe.train.optimizer import make_optimizer
from hmoe.train.state import init_train_state
from hmoe.train.step import train_step


def median_seconds(fn: Callable[..., Any], *args: Any, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall time of `fn(*args)` over `repeats` calls, after `warmup` calls (which include compilation)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def interleaved_medians(calls: dict[Any, Callable[[], Any]], repeats: int = 5, warmup: int = 1,
                        rewarm: Collection[Any] = ()) -> dict[Any, float]:
  """Median wall time of each zero-argument call, timed round-robin: repeat r times every call once, in turn.

  On a shared machine the speed drifts by tens of percent over minutes; timing the variants one after another puts
  that drift into their ratios, interleaving spreads it over all of them alike. Calls named in `rewarm` run once more,
  untimed, right before each timed call: a 48 ms reference matmul timed straight after a large layer measured
  100-111 GFLOP/s instead of its steady 150-185 (its 64 MiB output lands on freshly mapped pages), and the reference
  must be the machine's steady rate, not a slowed one that flatters every ratio against it.
  """
  for call in calls.values():
    for _ in range(warmup):
      jax.block_until_ready(call())
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      if name in rewarm:
        jax.block_until_ready(call())
      start = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(values) for name, values in times.items()}


def malloc_setting() -> str:
  """The glibc malloc tuning this process started with, for the benchmarks' footers.

  XLA:CPU allocates its large buffers afresh at every execution and glibc maps each one anew, so every run
  page-faults through them: 2.2M minor faults in five MoE + HMoE fwd+bwd calls at E=32, F=1024, T=8192.
  `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35) maps them as transparent huge pages: 0.2-0.35M faults.
  Under it, at 8,192 tokens, the reference matmul ran 1.27-1.35x faster, the MoE 1.12-1.19x and the HMoE 1.26-1.34x,
  and `experiments.train` 11-15% faster (2026-12-04); one earlier 14-variant `bench_layer` run under it was slower on
  every variant (docs/speed.md). The setting moves every "of matmul" ratio, so each footer names it; it is read at
  process start, so a benchmark cannot set it for itself.
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  return f"GLIBC_TUNABLES={tunables}" if tunables else "glibc malloc defaults (GLIBC_TUNABLES unset)"


def ffn_flops(num_tokens: int, width: int, hidden: int, rows_per_token: float = 1.0) -> float:
  """Forward FLOPs of SwiGLU FFN matmuls over `rows_per_token * T` rows: 2 * rows * 3 * D * F (gate, up, down).

  The useful FLOPs of a dense FFN of width F are `ffn_flops(T, D, F)`; of a top-k MoE `ffn_flops(T, D, F_e, k)`
  (what capacity padding adds is not useful work); a capacity-C MoE executes `ffn_flops(E * C, D, F_e)`.
  """
  return 2.0 * rows_per_token * num_tokens * 3 * width * hidden


def hmoe_flops(num_tokens: int, width: int, hidden: int, rank: int, clusters_per_token: int,
               experts_per_cluster_pick: int) -> float:
  """Forward FLOPs of the HMoE layer's useful matmuls: one base product per (token, cluster) slot, plus the rank-R
  factors of each chosen expert (`(x U) V` costs 2 R (I + O) per matrix)."""
  slots = num_tokens * clusters_per_token
  return ffn_flops(slots, width, hidden) + 2.0 * slots * experts_per_cluster_pick * 3 * rank * (width + hidden)


def train_flops_per_token(params_active: int, config: Any) -> float:
  """Model FLOPs of one training token: 6 per active parameter (forward + backward of its matmul; the tied embedding
  counts once, as the output projection) plus causal attention's 6 L D S (scores and values, forward + backward,
  half the S x S square: the PaLM appendix-B count with its 12 L D S halved for causality)."""
  return 6.0 * params_active + 6.0 * config.num_layers * config.d_model * config.max_len


def matmul_call(rows: int, inner: int, cols: int) -> Callable[[], jax.Array]:
  """A jitted float32 `[rows, inner] x [inner, cols]` matmul as a zero-argument call (for `interleaved_medians`)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (rows, inner))
  b = jax.random.normal(jax.random.PRNGKey(1), (inner, cols))
  matmul = jax.jit(jnp.dot)
  return lambda: matmul(a, b)


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
  """Markdown table of `rows` restricted to `columns` (floats with 3 significant decimals)."""
  def cell(value: Any) -> str:
    if value is None:
      return "-"
    if isinstance(value, float):
      return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(row.get(column, "")) for column in columns) + " |" for row in rows]
  return "\n".join(lines)


def load_variant_config(path: str, variant: str) -> ExperimentConfig:
  """The validated `ExperimentConfig` of `get_config(variant)` in a config file (the files the trainer reads)."""
  spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return from_config_dict(module.get_config(variant))


def layer_call(module: Any, x: jax.Array, *, backward: bool = False, **kwargs: Any) -> Callable[[], Any]:
  """A linen FFN layer's jitted forward (or forward + backward w.r.t. params and input) on `x`, as a zero-argument
  call."""
  params = module.init(jax.random.PRNGKey(0), x, **kwargs)

  def forward(params, x):
    out = module.apply(params, x, **kwargs)
    return out[0] if isinstance(out, tuple) else out

  if backward:
    fn = jax.jit(jax.grad(lambda p, x: jnp.sum(forward(p, x)), argnums=(0, 1)))
  else:
    fn = jax.jit(forward)
  return lambda: fn(params, x)


def layer_seconds(module: Any, x: jax.Array, *, backward: bool = False, repeats: int = 5, **kwargs: Any) -> float:
  """Median time of a linen FFN layer's forward (or forward + backward w.r.t. params and input) on `x`."""
  return median_seconds(layer_call(module, x, backward=backward, **kwargs), repeats=repeats)


def train_step_call(config: ExperimentConfig) -> Callable[[], Any]:
  """One jitted train step (forward, backward, AdamW) of `config` on synthetic tokens, as a zero-argument call."""
  model, optimizer = TransformerLM(config.model), make_optimizer(config.train)
  state = jax.jit(functools.partial(init_train_state, model, optimizer, config))()
  rng = np.random.default_rng(0)
  shape = (config.data.batch_size, config.data.seq_len)
  batch = {"inputs": rng.integers(0, config.model.vocab_size, shape, dtype=np.int32),
           "targets": rng.integers(0, config.model.vocab_size, shape, dtype=np.int32)}
  step_fn = jax.jit(functools.partial(train_step, model=model, optimizer=optimizer, config=config))
  # The state is not donated, so every timed call starts from the same state.
  return lambda: step_fn(state, batch)[1]["loss"]


def train_step_seconds(config: ExperimentConfig, *, repeats: int = 5) -> float:
  """Median time of one jitted train step (forward, backward, AdamW) of `config` on synthetic tokens."""
  return median_seconds(train_step_call(config), repeats=repeats)
