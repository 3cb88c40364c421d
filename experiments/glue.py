"""Fine-tunes a pretrained (or fresh) language model on one GLUE task and reports its dev scores.

  python -m experiments.glue --task=rte --init_from=runs/narrow/moe_s0 --workdir=runs/glue/moe_rte_s0
  python -m experiments.glue --task=stsb --init_from=runs/narrow/hmoe_s0 --workdir=runs/glue/hmoe_stsb_s1 --seed=1

The run resumes from its newest checkpoint when --workdir holds one (same config only). `results.json` in the workdir
has the last epoch's dev scores, the best epoch's (labelled), and the majority-class baseline. `--task`, `--init_from`
and `--seed` are shorthands for the `--config.finetune.*` fields of experiments/configs/glue.py. Errors a user can fix
(unknown task, missing files, a malformed row, a foreign workdir) end with one line on stderr and exit status 1.
"""

import importlib
import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from hmoe.config import from_config_dict
from hmoe.glue.config import from_dict
from hmoe.glue.finetune import finetune
from hmoe.glue.tasks import GlueFormatError
from hmoe.train.loop import USER_ERRORS, quiet_library_logging

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/glue.py", "Fine-tuning config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.json.")
_TASK = flags.DEFINE_string("task", None, "GLUE task: cola, sst2, mrpc, stsb, rte, wnli, qqp, mnli, qnli.")
_INIT_FROM = flags.DEFINE_string("init_from", None, "Pretraining run directory to start from.")
_SEED = flags.DEFINE_integer("seed", None, "Fine-tuning seed (head init, dropout, data order).")
flags.mark_flags_as_required(["workdir"])


def resolve_config_spec(spec: str):
  """"narrow.py:moe" -> the validated `ExperimentConfig` of experiments/configs/narrow.py, variant moe."""
  file_name, _, variant = spec.partition(":")
  if not file_name.endswith(".py") or "/" in file_name:
    raise ValueError(f"scratch_config={spec!r} must name a file of experiments/configs/, e.g. narrow.py:moe")
  try:
    module = importlib.import_module(f"experiments.configs.{file_name[:-3]}")
  except ModuleNotFoundError:
    raise ValueError(f"scratch_config={spec!r}: no experiments/configs/{file_name}") from None
  return from_config_dict(module.get_config(*([variant] if variant else [])))


def main(argv):
  del argv
  quiet_library_logging()
  raw = _CONFIG.value.to_dict()["finetune"]
  for name, flag in (("task", _TASK), ("init_from", _INIT_FROM), ("seed", _SEED)):
    if flag.value is not None:
      raw[name] = flag.value
  try:
    config = from_dict(raw)
    scratch = resolve_config_spec(config.scratch_config) if config.scratch_config else None
    results = finetune(config, _WORKDIR.value, scratch_experiment=scratch)
  except (*USER_ERRORS, GlueFormatError, ImportError) as error:
    sys.exit(f"error: {error}")
  logging.info("results in %s/results.json", _WORKDIR.value)
  print(json.dumps({key: results[key] for key in ("task", "init_from", "seed", "last", "best", "majority",
                                                  "wall_seconds")}, indent=1))


if __name__ == "__main__":
  app.run(main)
