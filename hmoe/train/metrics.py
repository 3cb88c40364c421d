"""In-loop metrics: load-balance statistics, perplexity, and the JSON-lines metrics file of a run."""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np


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


def perplexity(nll_sum: float, count: float) -> float:
  return math.exp(min(nll_sum / count, 700.0))


class MetricsWriter:
  """Appends one JSON object per line (`{"step": s, ...}`) to `path`; safe to reopen when a run resumes.

  Every scalar also goes to TensorBoard event files in `<run>/tensorboard/` (`tensorboard --logdir runs/`), written by
  tensorboardX: it needs only numpy and protobuf, where TensorBoard's own writers need TensorFlow or PyTorch. Each
  process writes its own event file; after a resume TensorBoard shows the re-logged steps from the newest file.
  Arrays (per-expert load) stay in metrics.jsonl only.
  """

  def __init__(self, path: str | pathlib.Path, tensorboard: bool = True):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._tensorboard_dir = self.path.parent / "tensorboard" if tensorboard else None
    self._tensorboard = None

  def write(self, step: int, values: Mapping[str, Any]) -> None:
    record = {"step": int(step)}
    for key, value in values.items():
      value = np.asarray(value)
      record[key] = value.tolist() if value.ndim else value.item()
    with self.path.open("a") as stream:
      stream.write(json.dumps(record) + "\n")
    if self._tensorboard_dir is not None:
      self._write_tensorboard(int(step), record)

  def _write_tensorboard(self, step: int, record: Mapping[str, Any]) -> None:
    if self._tensorboard is None:
      import tensorboardX  # Imported on first use: readers of metrics (summaries, tests) never need it.
      self._tensorboard = tensorboardX.SummaryWriter(logdir=str(self._tensorboard_dir), flush_secs=30)
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        self._tensorboard.add_scalar(key, value, step)
    self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None


def read_metrics(path: str | pathlib.Path) -> list[dict[str, Any]]:
  with pathlib.Path(path).open() as stream:
    return [json.loads(line) for line in stream if line.strip()]
