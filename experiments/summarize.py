"""Final word-level perplexities of finished runs, with seed repeats pooled into mean and spread.

  python -m experiments.summarize --runs='runs/gpu/*'

Reads every `<workdir>/metrics.jsonl` the globs match and takes the last logged valid/test word-level perplexity. Runs
whose workdir names differ only in a seed suffix (`_s1`, `_s2`; no suffix counts as seed 0, as in
`experiments/jobs/*.txt`) form one group, printed as mean, sample standard deviation and the per-seed values, so a
difference between two groups can be read against the seed-to-seed spread.
"""

from __future__ import annotations

import glob
import pathlib
import re
import statistics
from typing import Mapping, Sequence

from absl import app, flags

from hmoe import metrics

_RUNS = flags.DEFINE_list("runs", ["runs/*"], "Globs of run workdirs (each holding metrics.jsonl).")
_SPLITS = ("valid", "test")
_SEED_SUFFIX = re.compile(r"_s(\d+)$")


def final_perplexities(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
  """The last logged word-level perplexity of each split; splits never evaluated are left out."""
  finals = {}
  for row in rows:
    for split in _SPLITS:
      if f"{split}/word_perplexity" in row:
        finals[split] = row[f"{split}/word_perplexity"]
  return finals


def split_seed(name: str) -> tuple[str, int]:
  """`"dense_d01_s2"` -> `("dense_d01", 2)`; a name without a seed suffix is seed 0."""
  match = _SEED_SUFFIX.search(name)
  return (name[:match.start()], int(match.group(1))) if match else (name, 0)


def pool_seeds(finals_by_run: Mapping[str, Mapping[str, float]]) -> list[dict]:
  """One row per group of seed repeats: seeds, and mean / std / per-seed values of each split, sorted by name."""
  groups: dict[str, dict[int, Mapping[str, float]]] = {}
  for name, finals in finals_by_run.items():
    group, seed = split_seed(name)
    if seed in groups.setdefault(group, {}):
      raise ValueError(f"run {name!r} repeats seed {seed} of group {group!r}")
    groups[group][seed] = finals
  rows = []
  for group, by_seed in sorted(groups.items()):
    row = {"group": group, "seeds": sorted(by_seed)}
    for split in _SPLITS:
      values = [by_seed[seed][split] for seed in row["seeds"] if split in by_seed[seed]]
      if values:
        row[split] = {"mean": statistics.fmean(values), "values": values,
                      "std": statistics.stdev(values) if len(values) > 1 else float("nan")}
    rows.append(row)
  return rows


def format_rows(rows: Sequence[Mapping]) -> str:
  lines = ["| group | seeds | valid ppl (mean ± std) | test ppl (mean ± std) | valid per seed |", "|---|---|---|---|---|"]
  for row in rows:
    cells = [("-" if s not in row else f"{row[s]['mean']:.2f}" if len(row[s]["values"]) == 1
              else f"{row[s]['mean']:.2f} ± {row[s]['std']:.2f}") for s in _SPLITS]
    per_seed = ", ".join(f"{v:.2f}" for v in row["valid"]["values"]) if "valid" in row else "-"
    lines.append(f"| {row['group']} | {','.join(map(str, row['seeds']))} | {cells[0]} | {cells[1]} | {per_seed} |")
  return "\n".join(lines)


def main(argv):
  del argv
  workdirs = sorted({path for pattern in _RUNS.value for path in glob.glob(pattern)})
  finals_by_run = {}
  for workdir in map(pathlib.Path, workdirs):
    metrics_path = workdir / "metrics.jsonl"
    if metrics_path.exists():
      finals = final_perplexities(metrics.read_metrics(metrics_path))
      if finals:
        if workdir.name in finals_by_run:
          raise app.UsageError(f"two matched workdirs are named {workdir.name!r}; narrow --runs")
        finals_by_run[workdir.name] = finals
  if not finals_by_run:
    raise app.UsageError(f"no evaluated runs (metrics.jsonl with word perplexities) under {_RUNS.value}")
  print(format_rows(pool_seeds(finals_by_run)))


if __name__ == "__main__":
  app.run(main)
