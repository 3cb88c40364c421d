"""Word-level perplexity of a trained run (or a compressed export) on WikiText splits, without touching its files.

  python -m experiments.evaluate --workdir=runs/small_moe --splits=valid,test
  python -m experiments.evaluate --workdir=runs/small_moe --dataset=wikitext-103 --splits=valid,test

Uses the run's own tokenizer and newest verified checkpoint (with its balancing biases); splits are encoded in memory
(`hmoe.inference.run.evaluate_splits`). WikiText-103 valid/test can be scored by a WikiText-2 run (the offline data
has no WikiText-103 train split).
"""

import json
import sys

from absl import app, flags

from hmoe.data import wikitext
from hmoe.inference.run import evaluate_splits, load_run
from hmoe.train.loop import USER_ERRORS, quiet_library_logging

_WORKDIR = flags.DEFINE_string("workdir", None, "A run directory or a compressed export.")
_DATASET = flags.DEFINE_enum("dataset", None, list(wikitext.DATASETS), "Default: the run's dataset.")
_SPLITS = flags.DEFINE_list("splits", ["valid", "test"], "Splits to score.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "WikiText root (default: the run's, $HMOE_DATA_DIR, ../shared/data).")

flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  quiet_library_logging()
  try:
    loaded = load_run(_WORKDIR.value)
    results = evaluate_splits(loaded, _SPLITS.value, _DATASET.value, _DATA_DIR.value)
  except USER_ERRORS as error:
    sys.exit(f"error: {error}")
  print(json.dumps({"step": loaded.step, **results}, indent=2))


if __name__ == "__main__":
  app.run(main)
