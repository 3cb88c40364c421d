"""GLUE's official dev metrics, computed by scikit-learn and scipy, and the majority-class baseline.

scikit-learn (`matthews_corrcoef`, `f1_score`, `accuracy_score`) and scipy (`pearsonr`, `spearmanr`) are what GLUE's
own scoring and the public baselines use; writing them again would only add a place for bugs (e.g. Matthews'
degenerate all-one-class case, which scikit-learn defines as 0). Scores are reported as fractions (0.853), not
percentages; tables multiply by 100.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats
from sklearn import metrics as sk_metrics

from hmoe.glue.tasks import Task


def _metric(name: str, predictions: np.ndarray, labels: np.ndarray) -> float:
  if name == "accuracy":
    return float(sk_metrics.accuracy_score(labels, predictions))
  if name == "f1":  # Of the positive class (1 = paraphrase / duplicate), as GLUE reports it.
    return float(sk_metrics.f1_score(labels, predictions, pos_label=1, zero_division=0.0))
  if name == "matthews_corr":
    return float(sk_metrics.matthews_corrcoef(labels, predictions))
  if name in ("pearson", "spearman"):
    if np.ptp(predictions) == 0:  # A constant prediction has no correlation; scipy would warn and return nan.
      return 0.0
    correlation = stats.pearsonr if name == "pearson" else stats.spearmanr
    return float(correlation(predictions, labels)[0])
  raise ValueError(f"unknown GLUE metric {name!r}")


def compute(task: Task, predictions: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray
            ) -> dict[str, float]:
  """`{metric: score}` for `task`: predicted class indices (or scores for STS-B) against the gold labels."""
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  if predictions.shape != labels.shape or predictions.ndim != 1 or not len(labels):
    raise ValueError(f"need two equal-length 1-d arrays, got {predictions.shape} and {labels.shape}")
  return {name: _metric(name, predictions, labels) for name in task.metrics}


def majority_predictions(task: Task, train_labels: np.ndarray, num_examples: int) -> np.ndarray:
  """The constant baseline: the most frequent training class (ties: the lower index), or STS-B's mean score."""
  train_labels = np.asarray(train_labels)
  if task.is_regression:
    return np.full(num_examples, float(train_labels.mean()), np.float32)
  counts = np.bincount(train_labels.astype(np.int64), minlength=task.num_outputs)
  return np.full(num_examples, int(np.argmax(counts)), np.int32)
