"""Offline analysis of finished runs' metrics files (used by `compare` and `summarize`)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


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


def final_word_perplexities(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """`{split: the last logged word-level perplexity}` of a run's metrics rows; splits never evaluated are left out."""
  suffix = "/word_perplexity"
  return {key[:-len(suffix)]: value for row in rows for key, value in row.items() if key.endswith(suffix)}


_SEED_SUFFIX = re.compile(r"_s(\d+)$")


def split_seed(name: str) -> tuple[str, int]:
  """`"dense_d01_s2"` -> `("dense_d01", 2)`; a name without a seed suffix is seed 0."""
  match = _SEED_SUFFIX.search(name)
  return (name[:match.start()], int(match.group(1))) if match else (name, 0)
