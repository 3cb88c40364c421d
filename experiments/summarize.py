"""Final word-level perplexities of finished runs, with seed repeats pooled into mean and spread.

  python -m experiments.summarize --runs='runs/gpu/*'

Reads every `<workdir>/metrics.jsonl` the globs match: the last logged valid/test word-level perplexity, and the mean
training cross-entropy and expert-load CV over the last --tail_logs logged training windows (how well a run fits its
training text at the end, and how evenly its routers spread the load). Runs whose workdir names differ only in a seed
suffix (`_s1`, `_s2`; no suffix counts as seed 0, as in `experiments/jobs/*.txt`) form one group, printed as mean,
sample standard deviation and the per-seed validation values, so a difference between two groups can be read against
the seed-to-seed spread. Further columns: the model's total / expert / active-per-token parameters (from the run's
config.json), layer regroups adopted of those tried, and per routed layer the experts with more than 1% of its load at
the end of training (`experts_used`).
"""

from __future__ import annotations

import glob
import json
import pathlib
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from absl import app, flags

from experiments import analysis
from hmoe.config import ExperimentConfig, from_config_dict
from hmoe.model.param_counts import model_parameter_counts
from hmoe.train import metrics

_RUNS = flags.DEFINE_list("runs", ["runs/*"], "Globs of run workdirs (each holding metrics.jsonl).")
_TAIL_LOGS = flags.DEFINE_integer("tail_logs", 6, "Logged training windows averaged for train CE and load CV.")
# Column key, metrics.jsonl key of the columns averaged over the last logged windows (None: computed per run), header.
_COLUMNS = (("valid", None, "valid ppl"), ("test", None, "test ppl"),
            ("train_ce", "train/ce_loss", "final train CE"), ("load_cv", "train/load_cv", "final load CV"),
            ("train_minutes", None, "train minutes"))
_DIGITS = {"valid": 2, "test": 2, "train_minutes": 1}


# An expert "is used" by a layer when it gets more than this share of the layer's assignments in the last window.
USED_EXPERT_SHARE = 0.01


def experts_used(rows: Sequence[Mapping[str, Any]]) -> list[int] | None:
  """Per routed layer, the experts with more than `USED_EXPERT_SHARE` of its load in the last logged window (None for
  runs without routed layers): how many experts each layer really uses, which a load CV alone does not show."""
  loads = [row["train/expert_load"] for row in rows if "train/expert_load" in row]
  if not loads:
    return None
  return [sum(share > USED_EXPERT_SHARE for share in layer) for layer in loads[-1]]


def regroups_adopted(rows: Sequence[Mapping[str, Any]]) -> tuple[int, int] | None:
  """(layer regroups adopted, layer regroups tried) over a run's regroup events; None if it never regrouped."""
  events = [row["regroup/adopted"] for row in rows if "regroup/adopted" in row]
  if not events:
    return None
  return sum(map(sum, events)), sum(map(len, events))


def parameter_columns(config: ExperimentConfig | None) -> dict[str, int]:
  """Total, expert and active-per-token parameters of a run's model ({} for a run without config.json)."""
  if config is None:
    return {}
  counts = model_parameter_counts(config.model)
  return {name: counts[name] for name in ("params_total", "params_expert", "params_active")}


def finished(rows: Sequence[Mapping[str, Any]], config: ExperimentConfig | None) -> bool:
  """Whether a run evaluated at its config's last step (runs without config.json count as finished): an evaluation
  at step 1000 of a 3000-step run is not a final perplexity."""
  if config is None:
    return True
  return any(row.get("step", -1) >= config.train.num_steps and any(key.endswith("/word_perplexity") for key in row)
             for row in rows)


def train_minutes(rows: Sequence[Mapping[str, Any]], config: ExperimentConfig | None) -> float | None:
  """Time spent in training steps (evaluations excluded), from each logged window's tokens/s: the wall time a run
  took on its machine, including any sharing of the cores."""
  if config is None:
    return None
  tokens_per_step = config.data.batch_size * config.data.seq_len
  seconds, last_step = 0.0, 0
  for row in rows:
    if "train/tokens_per_second" in row:
      # A window is at most log_every steps: an upcycled run's first one starts at its hand-over step, not at 0.
      steps = min(row["step"] - last_step, config.train.log_every)
      seconds += steps * tokens_per_step / row["train/tokens_per_second"]
      last_step = row["step"]
  return seconds / 60 if seconds else None


def read_config(workdir: pathlib.Path) -> ExperimentConfig | None:
  config_path = workdir / "config.json"
  return from_config_dict(json.loads(config_path.read_text())) if config_path.exists() else None


def run_summary(rows: Sequence[Mapping[str, Any]], tail_logs: int) -> dict[str, Any]:
  """Final perplexities plus the training columns averaged over the last `tail_logs` rows logging them, and the
  experts each layer uses at the end (`experts_used`)."""
  summary = analysis.final_word_perplexities(rows)
  for column, key, _ in _COLUMNS:
    values = [row[key] for row in rows if key is not None and key in row][-tail_logs:]
    if values:
      summary[column] = statistics.fmean(values)
  used = experts_used(rows)
  if used is not None:
    summary["experts_used"] = used
  adopted = regroups_adopted(rows)
  if adopted is not None:
    summary["regroups"] = adopted
  return summary


def pool_seeds(summaries_by_run: Mapping[str, Mapping[str, float]]) -> list[dict]:
  """One row per group of seed repeats: seeds, and mean / std / per-seed values of each column, sorted by name."""
  groups: dict[str, dict[int, Mapping[str, float]]] = {}
  for name, summary in summaries_by_run.items():
    group, seed = analysis.split_seed(name)
    if seed in groups.setdefault(group, {}):
      raise ValueError(f"run {name!r} repeats seed {seed} of group {group!r}")
    groups[group][seed] = summary
  rows = []
  for group, by_seed in sorted(groups.items()):
    row = {"group": group, "seeds": sorted(by_seed)}
    for column, _, _ in _COLUMNS:
      values = [by_seed[seed][column] for seed in row["seeds"] if column in by_seed[seed]]
      if values:
        row[column] = {"mean": statistics.fmean(values), "values": values,
                       "std": statistics.stdev(values) if len(values) > 1 else float("nan")}
    for per_seed in ("experts_used", "regroups"):
      values = [by_seed[seed][per_seed] for seed in row["seeds"] if per_seed in by_seed[seed]]
      if values:
        row[per_seed] = values
    for name in ("params_total", "params_expert", "params_active"):  # The same model at every seed.
      if name in by_seed[row["seeds"][0]]:
        row[name] = by_seed[row["seeds"][0]][name]
    rows.append(row)
  return rows


def _cell(row: Mapping, column: str, digits: int) -> str:
  if column not in row:
    return "-"
  pooled = row[column]
  mean = f"{pooled['mean']:.{digits}f}"
  return mean if len(pooled["values"]) == 1 else f"{mean} ± {pooled['std']:.{digits}f}"


def _millions(row: Mapping, name: str) -> str:
  return f"{row[name] / 1e6:.2f}M" if name in row else "-"


def format_rows(rows: Sequence[Mapping]) -> str:
  headers = [header + (" (mean ± std)" if column in ("valid", "test") else "") for column, _, header in _COLUMNS]
  lines = ["| group | seeds | params total / expert / active | " + " | ".join(headers)
           + " | valid per seed | regroups adopted (per seed) | experts used per layer (per seed) |",
           "|---" * (len(_COLUMNS) + 6) + "|"]
  for row in rows:
    cells = [_cell(row, column, _DIGITS.get(column, 3)) for column, _, _ in _COLUMNS]
    params = " / ".join(_millions(row, name) for name in ("params_total", "params_expert", "params_active"))
    per_seed = ", ".join(f"{v:.2f}" for v in row["valid"]["values"]) if "valid" in row else "-"
    regroups = "; ".join(f"{adopted}/{tried}" for adopted, tried in row.get("regroups", [])) or "-"
    used = "; ".join("/".join(map(str, layers)) for layers in row.get("experts_used", [])) or "-"
    lines.append(f"| {row['group']} | {','.join(map(str, row['seeds']))} | {params} | {' | '.join(cells)} "
                 f"| {per_seed} | {regroups} | {used} |")
  return "\n".join(lines)


def main(argv):
  del argv
  workdirs = sorted({path for pattern in _RUNS.value for path in glob.glob(pattern)})
  summaries_by_run = {}
  for workdir in map(pathlib.Path, workdirs):
    metrics_path = workdir / "metrics.jsonl"
    if not metrics_path.exists():
      continue
    rows, config = metrics.read_metrics(metrics_path), read_config(workdir)
    if not finished(rows, config):
      print(f"skipping {workdir}: not trained to its config's train.num_steps yet")
      continue
    summary = {**run_summary(rows, _TAIL_LOGS.value), **parameter_columns(config)}
    minutes = train_minutes(rows, config)
    if minutes is not None:
      summary["train_minutes"] = minutes
    if "valid" in summary or "test" in summary:
      if workdir.name in summaries_by_run:
        raise app.UsageError(f"two matched workdirs are named {workdir.name!r}; narrow --runs")
      summaries_by_run[workdir.name] = summary
  if not summaries_by_run:
    raise app.UsageError(f"no evaluated runs (metrics.jsonl with word perplexities) under {_RUNS.value}")
  print(format_rows(pool_seeds(summaries_by_run)))


if __name__ == "__main__":
  app.run(main)
