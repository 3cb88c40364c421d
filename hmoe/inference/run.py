"""Using a trained run from Python: `load_run(workdir)` once, then score text or generate.

Nothing here writes into the run's directory: the checkpoint is read (verified), the tokenizer loaded from the
workdir's `tokenizer.json`, and texts are encoded in memory.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from hmoe.config import ExperimentConfig, from_config_dict
from hmoe.data import wikitext
from hmoe.data.tokenizer import Tokenizer
from hmoe.inference import storage
from hmoe.inference.generate import Generator
from hmoe.inference.sampling import Sampler
from hmoe.model.transformer import TransformerLM, cross_entropy
from hmoe.routing.state import RoutingState
from hmoe.train import checkpoint, optimizer as optimizer_lib, state as state_lib, step as step_lib
from hmoe.train.evaluation import evaluate


@dataclasses.dataclass
class LoadedRun:
  """A trained model: its config, parameters, routing state (balancing biases, clusters) and tokenizer."""

  workdir: pathlib.Path
  config: ExperimentConfig
  step: int
  params: Any
  routing_state: RoutingState
  tokenizer: Tokenizer

  @functools.cached_property
  def generator(self) -> Generator:
    return Generator(self.config.model, self.params, self.routing_state, pad_id=self.tokenizer.pad_id)

  def generate(self, prompt: str, max_new_tokens: int = 32, *, sampler: Sampler | None = None, seed: int = 0) -> str:
    """Continues `prompt` (greedy unless `sampler` says; stopping early at an end of line) and returns the text."""
    ids = self.tokenizer.encode(prompt)
    new = []
    for tokens in self.generator.generate([ids], max_new_tokens, jax.random.PRNGKey(seed), sampler):
      if int(tokens[0]) == self.tokenizer.eos_id:
        break
      new.append(int(tokens[0]))
    return self.tokenizer.decode(new)

  def score(self, text: str) -> dict[str, float]:
    """Summed NLL of `text`'s tokens after an eos context token, its token count and per-token loss."""
    ids = [self.tokenizer.eos_id, *self.tokenizer.encode(text)]
    if len(ids) < 2:
      raise ValueError("need a non-empty text to score")
    if len(ids) - 1 > self.config.model.max_len:
      raise ValueError(f"text of {len(ids) - 1} tokens exceeds the model's context of {self.config.model.max_len}")
    tokens = np.asarray(ids, np.int32)[None]
    model = TransformerLM(self.config.model)
    logits, _ = model.apply({"params": storage.materialize(self.params)}, tokens[:, :-1], train=False,
                            selection_bias=self.routing_state.selection_bias)
    nll, count = cross_entropy(logits, tokens[:, 1:])
    return {"nll": float(nll), "num_tokens": int(count), "loss": float(nll / count)}


def load_run(workdir: str | pathlib.Path) -> LoadedRun:
  """Reads a run directory written by `hmoe.train.loop.train_and_evaluate` (newest verified checkpoint), or a
  compressed export written by `experiments/compress.py` (its params stay in their stored form)."""
  workdir = pathlib.Path(workdir)
  if (workdir / "manifest.json").exists():
    params, routing_state, manifest = storage.load(workdir)
    return LoadedRun(workdir=workdir, config=from_config_dict(manifest["config"]), step=manifest["step"],
                     params=params, routing_state=routing_state,
                     tokenizer=Tokenizer.load(workdir / "tokenizer.json"))
  missing = [name for name in ("config.json", "tokenizer.json", "checkpoints") if not (workdir / name).exists()]
  if missing:
    raise FileNotFoundError(f"{workdir} is not a run directory: it has no {', '.join(missing)}")
  config = from_config_dict(json.loads((workdir / "config.json").read_text()))
  model, optimizer = TransformerLM(config.model), optimizer_lib.make_optimizer(config.train)
  abstract = jax.eval_shape(functools.partial(state_lib.init_train_state, model, optimizer, config))
  checkpointer = checkpoint.Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints)
  try:
    restored = checkpointer.restore(abstract)
  finally:
    checkpointer.close()
  if restored is None:
    raise FileNotFoundError(f"{workdir / 'checkpoints'} holds no checkpoint")
  step, state = restored
  return LoadedRun(workdir=workdir, config=config, step=step, params=state.params,
                   routing_state=state.routing_state, tokenizer=Tokenizer.load(workdir / "tokenizer.json"))


def evaluate_splits(loaded: LoadedRun, splits: Sequence[str], dataset: str | None = None,
                    data_dir: str | None = None) -> dict[str, dict[str, float]]:
  """Word-level perplexity of a loaded run (float or compressed) on whole WikiText splits, encoded in memory.

  `dataset` defaults to the run's; `data_dir` to the run's data dir, then `$HMOE_DATA_DIR`, then ../shared/data.
  """
  data_config = loaded.config.data
  root = wikitext.resolve_data_dir(data_dir or data_config.data_dir)
  model = TransformerLM(loaded.config.model)
  # Compressed params are dequantized inside the jitted step (`materialize` is a no-op cast for float32 ones).
  eval_fn = jax.jit(lambda params, routing, batch: step_lib.eval_step(storage.materialize(params), routing, batch,
                                                                     model=model))
  results = {}
  for split in splits:
    tokens = wikitext.load_split(loaded.tokenizer, wikitext.wikitext_split_path(root, dataset or data_config.dataset,
                                                                                split))
    results[split] = evaluate(eval_fn, loaded.params, loaded.routing_state, tokens, data_config,
                              loaded.tokenizer.eos_id)
  return results
