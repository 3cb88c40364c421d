"""Trains and evaluates a language model from an ml_collections config.

  python -m experiments.train --config=experiments/configs/small.py --workdir=runs/small_moe \
      --config.model.ffn_pattern=moe

The run resumes automatically from the newest checkpoint in --workdir.
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from hmoe.config import from_config_dict
from hmoe.train.loop import quiet_library_logging, train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and caches.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "WikiText root (default: $HMOE_DATA_DIR, else ../shared/data).")

flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  quiet_library_logging()
  raw = _CONFIG.value.to_dict()
  if _DATA_DIR.value:
    raw["data"]["data_dir"] = _DATA_DIR.value
  config = from_config_dict(raw)  # Validates every field before anything compiles.
  logging.info("JAX %s on %s", jax.__version__, jax.devices())
  results = train_and_evaluate(config, _WORKDIR.value)
  for key, value in sorted(results.items()):
    print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
  app.run(main)
