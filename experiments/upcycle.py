"""Upcycling: start an HMoE from a briefly trained standard MoE and train it on under the HMoE's own recipe.

  python -m experiments.upcycle --moe_workdir=runs/narrow/moe_s0 --moe_step=500 \
      --config=experiments/configs/narrow.py:hmoe --workdir=runs/narrow/hmoe_up500_s0

Reads the MoE run's checkpoint at --moe_step (an early one: keep it, e.g. by copying it before the run rotates it
away), converts every MoE layer with the post-hoc path (`hmoe.clustering.convert`: experts clustered by the config's
similarity signal, base = cluster mean, rank-R SVD residuals, router rows and biases permuted with their experts) into
the model of --config, and trains that model from step --moe_step to the config's num_steps: the same learning-rate
schedule, seed and data order as a from-scratch HMoE run of that config, so the two compare at equal tokens. The
optimizer moments start fresh (the HMoE's parameters are new ones). The MoE's and the converted model's valid
perplexity at the hand-over step are evaluated first and written to <workdir>/upcycle.json, so the cost of the
conversion itself (the truncation error) is on record.
"""

import json
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from experiments import moe_runs
from hmoe.config import from_config_dict
from hmoe.train.loop import USER_ERRORS, quiet_library_logging

_CONFIG = config_flags.DEFINE_config_file("config", None, "Target HMoE experiment config.", lock_config=True)
_MOE_WORKDIR = flags.DEFINE_string("moe_workdir", None, "Workdir of the standard-MoE run.")
_MOE_STEP = flags.DEFINE_integer("moe_step", None, "Checkpoint step of the MoE run to convert.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the upcycled HMoE run.")
_SEED = flags.DEFINE_integer("kmeans_seed", 0, "Seed of the k-means seeding of the conversion.")
flags.mark_flags_as_required(["config", "moe_workdir", "moe_step", "workdir"])


def main(argv):
  del argv
  quiet_library_logging()
  try:
    summary = moe_runs.upcycle(pathlib.Path(_MOE_WORKDIR.value), _MOE_STEP.value, from_config_dict(_CONFIG.value),
                  pathlib.Path(_WORKDIR.value), _SEED.value)
  except USER_ERRORS as error:
    sys.exit(f"error: {error}")
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  app.run(main)
