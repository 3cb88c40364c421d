"""Word-level perplexity of a trained run on WikiText splits, without touching the run's files.

  python -m experiments.evaluate --workdir=runs/small_moe --splits=valid,test
  python -m experiments.evaluate --workdir=runs/small_moe --dataset=wikitext-103 --splits=valid,test

Uses the run's own tokenizer and newest verified checkpoint (with its balancing biases); splits are encoded in memory.
WikiText-103 valid/test share WikiText-2's vocabulary style, so a WikiText-2 run can score them (the offline data has
no WikiText-103 train split).
"""

import json
import sys

import jax
from absl import app, flags

from hmoe.data import wikitext
from hmoe.inference import storage
from hmoe.inference.run import load_run
from hmoe.model.transformer import TransformerLM
from hmoe.train import step as step_lib
from hmoe.train.evaluation import evaluate
from hmoe.train.loop import USER_ERRORS, quiet_library_logging

_WORKDIR = flags.DEFINE_string("workdir", None, "A run directory (config.json, tokenizer.json, checkpoints/).")
_DATASET = flags.DEFINE_enum("dataset", None, list(wikitext.DATASETS), "Default: the run's dataset.")
_SPLITS = flags.DEFINE_list("splits", ["valid", "test"], "Splits to score.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "WikiText root (default: the run's, $HMOE_DATA_DIR, ../shared/data).")

flags.mark_flags_as_required(["workdir"])


def run(workdir: str, dataset: str | None, splits: list[str], data_dir: str | None) -> dict[str, dict[str, float]]:
  loaded = load_run(workdir)
  data_config = loaded.config.data
  data_dir = wikitext.resolve_data_dir(data_dir or data_config.data_dir)
  model = TransformerLM(loaded.config.model)
  # Compressed params are dequantized inside the jitted step (`materialize` is the identity cast for float32 ones).
  eval_fn = jax.jit(lambda params, routing, batch: step_lib.eval_step(storage.materialize(params), routing, batch,
                                                                     model=model))
  results = {}
  for split in splits:
    path = wikitext.wikitext_split_path(data_dir, dataset or data_config.dataset, split)
    tokens = wikitext.load_split(loaded.tokenizer, path)  # No cache_dir: nothing is written.
    results[split] = evaluate(eval_fn, loaded.params, loaded.routing_state, tokens, data_config,
                              loaded.tokenizer.eos_id)
  return {"step": loaded.step, **results}


def main(argv):
  del argv
  quiet_library_logging()
  try:
    results = run(_WORKDIR.value, _DATASET.value, _SPLITS.value, _DATA_DIR.value)
  except USER_ERRORS as error:
    sys.exit(f"error: {error}")
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  app.run(main)
