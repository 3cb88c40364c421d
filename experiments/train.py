"""Trains and evaluates a language model from an ml_collections config.

  python -m experiments.train --config=experiments/configs/small.py --workdir=runs/small_moe \
      --config.model.ffn_pattern=moe

The run resumes automatically from the newest checkpoint in --workdir, with the config it was started with;
`--allow_config_change=train.learning_rate,train.num_steps` accepts (and logs) changes of such safe fields. Errors a
user can fix (a bad config value, missing data, a locked or foreign workdir, a diverged run) end the process with one
line on stderr and exit status 1.
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from hmoe.config import from_config_dict
from hmoe.train.loop import USER_ERRORS, quiet_library_logging, train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and caches.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "WikiText root (default: $HMOE_DATA_DIR, else ../shared/data).")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_list(
    "allow_config_change", [], "Fields a resume may change (only safe ones: hmoe.train.run_dir.SAFE_TO_CHANGE).")

_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-host: call jax.distributed.initialize() first (auto-detected on Cloud TPU and SLURM; "
    "elsewhere give the three flags below).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host, no TPU/SLURM).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")

flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  quiet_library_logging()
  raw = _CONFIG.value.to_dict()
  if _DATA_DIR.value:
    raw["data"]["data_dir"] = _DATA_DIR.value
  try:
    config = from_config_dict(raw)  # Validates every field before anything compiles.
    if _DISTRIBUTED.value or _COORDINATOR.value:
      jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    logging.info("JAX %s on %s", jax.__version__, jax.devices())
    results = train_and_evaluate(config, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except USER_ERRORS as error:
    sys.exit(f"error: {error}")
  for key, value in sorted(results.items()):
    print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
  app.run(main)
