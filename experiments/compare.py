"""The dense / MoE / HMoE comparison table, from finished runs plus throughput measured here in one process.

  for v in dense moe hmoe8x4 hmoe4x8; do
    python -m experiments.train --config=experiments/configs/compare.py:$v --workdir=runs/compare/$v
  done
  python -m experiments.compare --runs_dir=runs/compare

Quality and balance come from each run's metrics.jsonl: final valid/test word-level perplexity; expert-load CV and
dropped-token fraction averaged over the logging windows of the second half of training (the first half is dominated
by the routers' start-up); for HMoE also the cluster-load CV and, per regroup, the loss jump on the next batch and the
steps until the training loss (10-step window means) is back at its last pre-regroup window. Parameter counts come
from the configs. Speed is measured now: the FFN layer's forward (routed layer plus shared expert, if any) at
--layer_tokens tokens and the full train step, every variant in this process (warm-up excluded, median of
--repeats), as ratios to the standard MoE. An `<variant>_adopt` run is also compared with its `<variant>` twin
(`twin_gaps`). Writes <runs_dir>/table.md and <runs_dir>/table.json.
"""

import functools
import json
import pathlib

import jax
import numpy as np
from absl import app, flags

from experiments import analysis
from experiments.benchmark import format_table, layer_seconds, load_variant_config, train_step_seconds
from hmoe.model.ffn import FeedForward
from hmoe.model.param_counts import parameter_counts
from hmoe.model.transformer import TransformerLM
from hmoe.train import metrics
from hmoe.train.optimizer import make_optimizer
from hmoe.train.state import init_train_state

_RUNS_DIR = flags.DEFINE_string("runs_dir", "runs/compare", "Directory holding one workdir per variant.")
_CONFIG = flags.DEFINE_string("config", "experiments/configs/compare.py", "Config file with get_config(variant).")
_VARIANTS = flags.DEFINE_list("variants", ["dense", "moe", "hmoe8x4", "hmoe4x8"], "Variants (workdir names).")
_LAYER_TOKENS = flags.DEFINE_integer("layer_tokens", 8192, "Tokens of the FFN-layer benchmark.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement (median reported).")
_REFERENCE = "moe"


def _read_run(workdir: pathlib.Path) -> list[dict]:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    raise FileNotFoundError(f"{path} is missing: train this variant first (see this module's docstring)")
  return metrics.read_metrics(path)


def _summarise_run(rows: list[dict], num_steps: int) -> dict:
  late = [row for row in rows if "train/ce_loss" in row and row["step"] > num_steps // 2]
  final = analysis.final_word_perplexities(rows)
  summary = {"valid ppl": final.get("valid"), "test ppl": final.get("test")}
  for key, name in (("train/load_cv", "load CV"), ("train/dropped_fraction", "dropped"),
                    ("train/cluster_load_cv", "cluster CV")):
    values = [row[key] for row in late if key in row]
    summary[name] = float(np.mean(values)) if values else None
  events = analysis.regroup_recovery(rows)
  if events:
    summary["regroups"] = events
    adopted = [event for event in events if event["adopted"] > 0]  # A kept grouping changes nothing to recover from.
    summary["regroups adopted"] = f"{len(adopted)}/{len(events)}"
    if adopted:
      summary["max jump"] = max(event["jump"] for event in adopted)
      recoveries = [event["recovery_steps"] for event in adopted]
      summary["max recovery"] = None if None in recoveries else max(recoveries)
  return summary


def twin_gaps(rows: list[dict], twin_rows: list[dict], horizon: int = 50) -> list[dict]:
  """Per adopted regroup of a run: its training-loss excess over a twin run that kept its grouping.

  `<variant>_adopt` differs from `<variant>` only in adopting every regroup, so until the first regroup the two runs
  are identical and afterwards the gap of their logged window means isolates what regrouping costs. Reported at the
  first window after the regroup, at `horizon` steps after it, and the largest gap in between.
  """
  loss = {row["step"]: row["train/ce_loss"] for row in rows if "train/ce_loss" in row}
  twin = {row["step"]: row["train/ce_loss"] for row in twin_rows if "train/ce_loss" in row}
  gaps = []
  for event in analysis.regroup_recovery(rows):
    if not event["adopted"]:
      continue
    steps = sorted(s for s in loss if s in twin and event["step"] < s <= event["step"] + horizon)
    if steps:
      window = [loss[s] - twin[s] for s in steps]
      gaps.append({"regroup step": event["step"], "jump on next batch": event["jump"],
                   "experts moved": event["stability"], "gap first window": window[0],
                   f"gap at +{steps[-1] - event['step']}": window[-1], "max gap": max(window),
                   "recovery steps": event["recovery_steps"]})
  return gaps


def _parameter_counts(config) -> dict:
  model, optimizer = TransformerLM(config.model), make_optimizer(config.train)
  state = jax.eval_shape(functools.partial(init_train_state, model, optimizer, config))
  return parameter_counts(state.params, config.model)


def main(argv):
  del argv
  runs_dir = pathlib.Path(_RUNS_DIR.value)
  rows = []
  for variant in _VARIANTS.value:
    config = load_variant_config(_CONFIG.value, variant)
    row = {"variant": variant, **_summarise_run(_read_run(runs_dir / variant), config.train.num_steps)}
    counts = _parameter_counts(config)
    row.update({"total params (M)": counts["params_total"] / 1e6, "expert params (M)": counts["params_expert"] / 1e6,
                "active params (M)": counts["params_active"] / 1e6,
                "MB at f32": counts["params_total"] * 4 / 2**20})
    x = jax.random.normal(jax.random.PRNGKey(1), (1, _LAYER_TOKENS.value, config.model.d_model))
    kind = config.model.routed_kind or "dense"
    layer_s = layer_seconds(FeedForward(config.model, kind), x, repeats=_REPEATS.value, train=True)
    step_s = train_step_seconds(config, repeats=_REPEATS.value)
    row["layer tokens/s"] = _LAYER_TOKENS.value / layer_s
    row["step tokens/s"] = config.data.batch_size * config.data.seq_len / step_s
    rows.append(row)
  reference = next((row for row in rows if row["variant"] == _REFERENCE), rows[0])
  for row in rows:
    row["layer speed-up"] = row["layer tokens/s"] / reference["layer tokens/s"]
    row["step speed-up"] = row["step tokens/s"] / reference["step tokens/s"]
    row["params vs MoE"] = row["total params (M)"] / reference["total params (M)"]
    row["expert params vs MoE"] = (row["expert params (M)"] / reference["expert params (M)"]
                                   if reference["expert params (M)"] else None)
  columns = ["variant", "valid ppl", "test ppl", "total params (M)", "expert params (M)", "active params (M)",
             "params vs MoE", "expert params vs MoE", "step tokens/s", "step speed-up", "layer tokens/s",
             "layer speed-up", "load CV", "cluster CV", "dropped", "regroups adopted", "max jump", "max recovery"]
  header = (f"WikiText-2, {_CONFIG.value}; throughput on {jax.devices()[0].platform} "
            f"({jax.device_count()} device), layer forward at {_LAYER_TOKENS.value} tokens, median of {_REPEATS.value}")
  table = header + "\n\n" + format_table(rows, columns)
  for row in rows:
    twin = row["variant"].removesuffix("_adopt")
    if twin != row["variant"] and (runs_dir / twin / "metrics.jsonl").exists():
      gaps = twin_gaps(_read_run(runs_dir / row["variant"]), _read_run(runs_dir / twin))
      row["twin gaps"] = gaps
      if gaps:
        table += (f"\n\nRegroups of {row['variant']} against {twin} (which kept its grouping), train loss in nats:\n\n"
                  + format_table(gaps, list(gaps[0])))
  print(table)
  (runs_dir / "table.md").write_text(table + "\n")
  (runs_dir / "table.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
  app.run(main)
