"""Fine-tunes several pretrained models on GLUE tasks over seeds, then writes the results table (JSON and markdown).

  python -m experiments.glue_suite --models=dense=runs/narrow/dense_s0,moe=runs/narrow/moe_s0,hmoe=runs/narrow/hmoe_s0 \
      --tasks=cola,sst2,mrpc,stsb,rte,wnli --seeds=0,1,2 --seeds_for=sst2:0 --workroot=runs/glue --parallel=2

Each (model, task, seed) is one `experiments.glue` run in WORKROOT/<model>_<task>_s<seed> (its log beside it); a run
whose results.json exists is not run again, and an interrupted one resumes, so the suite can be restarted. Runs share
JAX's persistent compilation cache (WORKROOT/.jax_cache): seeds after the first skip compilation. Then, from every
results.json under WORKROOT: `glue_results.json` (all runs) and `glue_results.md` with two tables, the last-epoch dev
score (mean +- std over seeds, the number to compare) and, labelled, the best-epoch dev score, each beside the
majority-class baseline; plus the wall time per model and task.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import queue
import shutil
import subprocess
import sys

import numpy as np
from absl import app, flags

from hmoe.glue.tasks import dev_splits, get_task

_MODELS = flags.DEFINE_list("models", None, "name=pretraining_workdir pairs.")
_TASKS = flags.DEFINE_list("tasks", ["cola", "sst2", "mrpc", "stsb", "rte", "wnli"], "GLUE tasks.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Fine-tuning seeds.")
_SEEDS_FOR = flags.DEFINE_list("seeds_for", [], "task:seed/seed/... for tasks that use other seeds (e.g. sst2:0).")
_OVERRIDES = flags.DEFINE_list("overrides", [], "task:--config.finetune.field=value, passed to that task's runs.")
_EXTRA = flags.DEFINE_list("extra", [], "Flags passed to every run, e.g. --config.finetune.pooling=mean.")
_WORKROOT = flags.DEFINE_string("workroot", "runs/glue", "Where the runs and the tables go.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Runs at a time (each pinned to one core when taskset exists).")
_TABLE_ONLY = flags.DEFINE_bool("table_only", False, "Only rebuild the tables from the runs' results.json.")
flags.mark_flags_as_required(["models"])


def _jobs() -> list[tuple[str, str, str, int]]:
  seeds_for = {entry.split(":")[0]: [int(s) for s in entry.split(":")[1].split("/")] for entry in _SEEDS_FOR.value}
  models = [entry.split("=", 1) for entry in _MODELS.value]
  return [(name, path, task, seed) for name, path in models for task in _TASKS.value
          for seed in seeds_for.get(task, [int(s) for s in _SEEDS.value])]


def _run(job: tuple[str, str, str, int], cores: queue.Queue | None) -> str:
  name, path, task, seed = job
  workdir = pathlib.Path(_WORKROOT.value) / f"{name}_{task}_s{seed}"
  if (workdir / "results.json").exists():
    return f"{workdir.name}: done before"
  overrides = [entry.split(":", 1)[1] for entry in _OVERRIDES.value if entry.split(":", 1)[0] == task]
  command = [sys.executable, "-m", "experiments.glue", f"--task={task}", f"--init_from={path}", f"--seed={seed}",
             f"--workdir={workdir}", *overrides, *_EXTRA.value]
  core = cores.get() if cores is not None else None  # A free core: no two runs share one.
  try:
    if core is not None:
      command = ["taskset", "-c", str(core), *command]
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(pathlib.Path(_WORKROOT.value) / ".jax_cache")}
    with open(f"{workdir}.log", "w") as log:
      code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
  finally:
    if core is not None:
      cores.put(core)
  return f"{workdir.name}: exit {code}"


def _mean_std(values: list[float]) -> str:
  values = 100 * np.asarray(values)
  return f"{values.mean():.1f}" if len(values) == 1 else f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"


def write_tables(workroot: pathlib.Path) -> str:
  """Reads every WORKROOT/*/results.json; writes glue_results.json and glue_results.md; returns the markdown."""
  runs = {}
  for path in sorted(workroot.glob("*/results.json")):
    name = path.parent.name.rsplit("_", 2)[0]
    runs.setdefault((name, json.loads(path.read_text())["task"]), []).append(json.loads(path.read_text()))
  (workroot / "glue_results.json").write_text(json.dumps(
      [{"model": name, **result} for (name, _), results in sorted(runs.items()) for result in results], indent=1))
  given = [entry.split("=")[0] for entry in _MODELS.value or []]
  models = [name for name in given if any(name == m for m, _ in runs)] or sorted({name for name, _ in runs})
  tasks = [task for task in ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
           if any(task == t for _, t in runs)]
  lines = []
  for which, title in (("last", "Last-epoch dev score (mean ± std over seeds; n = seeds)"),
                       ("best", "Best-epoch dev score (the maximum over epochs, an optimistic number)")):
    lines += [f"**{title}**", "", "| task | metric | majority | " + " | ".join(models) + " |",
              "|---|---|---|" + "---|" * len(models)]
    for task_name in tasks:
      task = get_task(task_name)
      for split in dev_splits(task):
        for metric in task.metrics:
          row = [f"{task_name}" + (f" {split}" if split != "dev" else ""), metric]
          any_run = next(results for (_, t), results in runs.items() if t == task_name)
          row.append(f"{100 * any_run[0]['majority'][split][metric]:.1f}")
          for model in models:
            results = runs.get((model, task_name), [])
            row.append(f"{_mean_std([r[which][split][metric] for r in results])} (n={len(results)})"
                       if results else "—")
          lines.append("| " + " | ".join(row) + " |")
    lines.append("")
  lines += ["**Wall time per run (s, mean over seeds; 1 CPU core each)**", "",
            "| task | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
  for task_name in tasks:
    cells = [f"{np.mean([r['wall_seconds'] for r in runs[(m, task_name)]]):.0f}" if (m, task_name) in runs else "—"
             for m in models]
    lines.append(f"| {task_name} | " + " | ".join(cells) + " |")
  markdown = "\n".join(lines) + "\n"
  (workroot / "glue_results.md").write_text(markdown)
  return markdown


def main(argv):
  del argv
  workroot = pathlib.Path(_WORKROOT.value)
  workroot.mkdir(parents=True, exist_ok=True)
  if not _TABLE_ONLY.value:
    jobs = _jobs()
    cores = None
    if _PARALLEL.value > 1 and shutil.which("taskset"):
      cores = queue.Queue()
      for core in range(min(_PARALLEL.value, os.cpu_count() or 1)):
        cores.put(core)
    with concurrent.futures.ThreadPoolExecutor(_PARALLEL.value) as pool:
      futures = [pool.submit(_run, job, cores) for job in jobs]
      for future in concurrent.futures.as_completed(futures):
        print(future.result(), flush=True)
  print(write_tables(workroot))


if __name__ == "__main__":
  app.run(main)
