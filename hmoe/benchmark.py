"""Timing helpers for benchmarks: warm-up excluded, `block_until_ready`, median of repeats.

Benchmarks compare variants inside one process and report ratios, because absolute times on a shared machine drift.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax


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


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
  """Markdown table of `rows` restricted to `columns` (floats with 3 significant decimals)."""
  def cell(value: Any) -> str:
    if isinstance(value, float):
      return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(row.get(column, "")) for column in columns) + " |" for row in rows]
  return "\n".join(lines)
