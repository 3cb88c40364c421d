"""Figures from run directories: training curves, load balance, regroups, and the quality-vs-parameters front.

  python -m experiments.plot --run_dirs='runs/narrow/*' --out=experiments/figures --prefix=narrow_

Reads each `<workdir>/metrics.jsonl` the globs match (workdirs without one are skipped, with a line saying so) and
writes PNGs into --out:
  <prefix>curves.png   train cross-entropy and valid word perplexity against step, one line per run;
  <prefix>load.png     expert-load CV against step (routed runs), regroup events as markers (filled: adopted in at
                       least one layer; open: proposed, kept by every layer);
  <prefix>front.png    final valid word perplexity against total parameters, one point per run (seed repeats, `_sN`,
                       as mean with min-max bars), the lower-left staircase drawn as the Pareto front.
matplotlib is the `plots` extra (`pip install -e ".[plots]"`); the library never imports it.
"""

from __future__ import annotations

import glob
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from absl import app, flags

from experiments import analysis
from hmoe.train import metrics

_RUNS = flags.DEFINE_list("run_dirs", ["runs/*"], "Globs of run workdirs.")
_OUT = flags.DEFINE_string("out", "experiments/figures", "Folder for the PNGs.")
_PREFIX = flags.DEFINE_string("prefix", "", "File name prefix of the figures.")


def series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of every row logging scalar `key`, in step order."""
  points = sorted((row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float)))
  return [step for step, _ in points], [value for _, value in points]


def regroup_events(rows: Sequence[Mapping[str, Any]]) -> list[tuple[int, bool]]:
  """(step, adopted in any layer) of every regroup the run logged."""
  return [(row["step"], any(row["regroup/adopted"])) for row in rows if "regroup/adopted" in row]


def front_points(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
  """One point per run group (seeds pooled): total parameters, mean/min/max final valid word perplexity.

  Only finished runs count: those that logged the test split, which the loop scores only at the end (an unfinished
  run's last valid score is an intermediate one).
  """
  groups: dict[str, list[tuple[float, float]]] = {}
  for name, rows in runs.items():
    params = [row["model/params_total"] for row in rows if "model/params_total" in row]
    final = analysis.final_word_perplexities(rows)
    valid = final.get("valid") if "test" in final else None
    if params and valid is not None:
      groups.setdefault(analysis.split_seed(name)[0], []).append((params[0], valid))
  points = []
  for group, values in sorted(groups.items()):
    perplexities = [valid for _, valid in values]
    points.append({"name": group, "params_total": values[0][0], "valid": sum(perplexities) / len(perplexities),
                   "low": min(perplexities), "high": max(perplexities), "seeds": len(values)})
  return points


def pareto(points: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
  """The points no other point beats on both size and perplexity, by size."""
  front, best = [], float("inf")
  for point in sorted(points, key=lambda p: (p["params_total"], p["valid"])):
    if point["valid"] < best:
      front.append(point)
      best = point["valid"]
  return front


def load_runs(patterns: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
  runs = {}
  for pattern in patterns:
    for path in sorted(glob.glob(pattern)):
      workdir = pathlib.Path(path)
      if (workdir / "metrics.jsonl").is_file():
        runs[workdir.name] = metrics.read_metrics(workdir / "metrics.jsonl")
      elif workdir.is_dir():
        print(f"skipping {workdir}: no metrics.jsonl")
  return runs


def plot_all(runs: Mapping[str, Sequence[Mapping[str, Any]]], out: pathlib.Path,
             prefix: str = "") -> list[pathlib.Path]:
  """Writes the three figures (those with data) and returns their paths."""
  import matplotlib
  matplotlib.use("Agg")  # Files only: no display needed (CI, SSH, Colab).
  import matplotlib.pyplot as plt

  out.mkdir(parents=True, exist_ok=True)
  written = []

  figure, (train_axis, valid_axis) = plt.subplots(1, 2, figsize=(11, 4))
  for name, rows in runs.items():
    train_axis.plot(*series(rows, "train/ce_loss"), label=name, linewidth=1)
    steps, values = series(rows, "valid/word_perplexity")
    if steps:
      valid_axis.plot(steps, values, marker="o", label=name, linewidth=1)
  train_axis.set(xlabel="step", ylabel="train cross-entropy (nats/token)", title="training loss")
  valid_axis.set(xlabel="step", ylabel="valid word perplexity", yscale="log", title="validation")
  valid_axis.legend(fontsize=7)
  written.append(_save(figure, out / f"{prefix}curves.png"))

  routed = {name: rows for name, rows in runs.items() if series(rows, "train/load_cv")[0]}
  if routed:
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, rows in routed.items():
      steps, values = series(rows, "train/load_cv")
      (line,) = axis.plot(steps, values, label=name, linewidth=1)
      for step, adopted in regroup_events(rows):
        value = values[min(range(len(steps)), key=lambda i: abs(steps[i] - step))]
        axis.plot(step, value, "o", color=line.get_color(), fillstyle="full" if adopted else "none")
    axis.set(xlabel="step", ylabel="expert-load CV (mean over layers)",
             title="load balance; markers: regroups (filled = adopted)")
    axis.legend(fontsize=7)
    written.append(_save(figure, out / f"{prefix}load.png"))

  points = front_points(runs)
  if points:
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for point in points:
      axis.errorbar(point["params_total"] / 1e6, point["valid"],
                    yerr=[[point["valid"] - point["low"]], [point["high"] - point["valid"]]], fmt="o", capsize=3)
      axis.annotate(f"{point['name']} (n={point['seeds']})", (point["params_total"] / 1e6, point["valid"]),
                    fontsize=7, xytext=(4, 4), textcoords="offset points")
    front = pareto(points)
    axis.step([p["params_total"] / 1e6 for p in front], [p["valid"] for p in front], where="post", color="gray",
              linestyle="--", label="Pareto front")
    axis.set(xlabel="total parameters (M)", ylabel="final valid word perplexity",
             title="quality vs size (lower left is better)")
    axis.legend(fontsize=7)
    written.append(_save(figure, out / f"{prefix}front.png"))
  return written


def _save(figure, path: pathlib.Path) -> pathlib.Path:
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  import matplotlib.pyplot as plt
  plt.close(figure)
  return path


def main(argv):
  del argv
  runs = load_runs(_RUNS.value)
  if not runs:
    raise SystemExit(f"error: no run directory with a metrics.jsonl matches {_RUNS.value}")
  for path in plot_all(runs, pathlib.Path(_OUT.value), _PREFIX.value):
    print(path)


if __name__ == "__main__":
  app.run(main)
