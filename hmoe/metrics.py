"""Load-balance statistics, parameter counts, regroup recovery and a JSON-lines metrics writer."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from hmoe.config import ModelConfig


def load_balance(load_LxE: np.ndarray) -> dict[str, float]:
  """Coefficient of variation (std / mean) and max/mean of per-expert load, averaged over MoE layers.

  `load_LxE` holds per-layer fractions of assignments (rows sum to 1). CV is 0 for perfect balance and sqrt(E - 1) when
  one expert gets everything.
  """
  load_LxE = np.asarray(load_LxE, np.float64)
  mean = load_LxE.mean(axis=-1)
  cv = load_LxE.std(axis=-1) / mean
  max_over_mean = load_LxE.max(axis=-1) / mean
  return {"load_cv": float(cv.mean()), "load_max_over_mean": float(max_over_mean.mean())}


def parameter_counts(params: Any, config: ModelConfig) -> dict[str, int]:
  """Total, expert and active-per-token parameter counts of a param tree, and bytes of total/expert at float32.

  Expert parameters are the routed matrices: `w_*` of standard MoE layers; bases `base_*` and residual factors
  `u_*`/`v_*` of hierarchical layers. A token activates top_k / E of the standard experts, and Kc / G of the bases
  plus Kc * Ke / E of the factors in a hierarchical layer.
  """
  total = dense_expert = bases = factors = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    size = int(np.prod(leaf.shape))
    total += size
    names = [getattr(key, "key", "") for key in path]
    if "moe" in names and names[-1] in ("w_gate", "w_up", "w_down"):
      dense_expert += size
    elif "hmoe" in names and names[-1].startswith("base_"):
      bases += size
    elif "hmoe" in names and names[-1][:2] in ("u_", "v_"):
      factors += size
  expert = dense_expert + bases + factors
  active = total - expert
  if dense_expert:
    active += dense_expert * config.moe.top_k // config.moe.num_experts
  if bases:
    cfg = config.hmoe
    active += bases * cfg.top_k_clusters // cfg.num_clusters
    active += factors * cfg.top_k_clusters * cfg.top_k_experts // cfg.num_experts
  return {"params_total": total, "params_expert": expert, "params_active": active,
          "bytes_total_f32": 4 * total, "bytes_expert_f32": 4 * expert}


def regroup_recovery(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Per regroup in a run's metrics rows: loss jump on the next batch, and steps until the train loss recovers.

  The jump is `regroup/loss_after - regroup/loss_before` (the same batch, just before and after regrouping). The
  pre-regroup level is the mean training loss of the logging window that ends at the regroup step; recovery is the
  number of steps to the end of the first later window whose mean is at or below it (None if training ended first).
  """
  train = sorted((row["step"], row["train/ce_loss"]) for row in rows if "train/ce_loss" in row)
  events = []
  for row in rows:
    if "regroup/loss_before" not in row:
      continue
    step = row["step"]
    before = [loss for s, loss in train if s <= step]
    level = before[-1] if before else float("inf")
    recovered = next((s - step for s, loss in train if s > step and loss <= level), None)
    events.append({"step": step, "jump": row["regroup/loss_after"] - row["regroup/loss_before"],
                   "adopted": float(np.mean(row["regroup/adopted"])),
                   "stability": float(np.mean(row["regroup/stability"])), "recovery_steps": recovered})
  return events


def perplexity(nll_sum: float, count: float) -> float:
  return math.exp(min(nll_sum / count, 700.0))


class MetricsWriter:
  """Appends one JSON object per line (`{"step": s, ...}`) to `path`; safe to reopen when a run resumes."""

  def __init__(self, path: str | pathlib.Path):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)

  def write(self, step: int, values: Mapping[str, Any]) -> None:
    record = {"step": int(step)}
    for key, value in values.items():
      value = np.asarray(value)
      record[key] = value.tolist() if value.ndim else value.item()
    with self.path.open("a") as stream:
      stream.write(json.dumps(record) + "\n")


def final_word_perplexities(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """`{split: the last logged word-level perplexity}` of a run's metrics rows; splits never evaluated are left out."""
  suffix = "/word_perplexity"
  return {key[:-len(suffix)]: value for row in rows for key, value in row.items() if key.endswith(suffix)}


def read_metrics(path: str | pathlib.Path) -> list[dict[str, Any]]:
  with pathlib.Path(path).open() as stream:
    return [json.loads(line) for line in stream if line.strip()]
