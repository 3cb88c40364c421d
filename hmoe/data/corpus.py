"""A run's corpus: the tokenizer trained on the train split and every split it needs, encoded and cached."""

from __future__ import annotations

import dataclasses
import pathlib

from hmoe.config import DataConfig
from hmoe.data import wikitext
from hmoe.data.tokenizer import Tokenizer, load_or_train_tokenizer


@dataclasses.dataclass
class Corpus:
  tokenizer: Tokenizer
  train: wikitext.SplitTokens
  eval_splits: dict[str, wikitext.SplitTokens]


def split_paths(config: DataConfig) -> dict[str, pathlib.Path]:
  """The files of every split a run reads, checked to exist (the loop calls this before it writes anything)."""
  data_dir = wikitext.resolve_data_dir(config.data_dir)
  splits = ("train", *config.eval_splits)
  wikitext.ensure_wikitext(data_dir, config.dataset, splits)  # First use: download and verify.
  return {split: wikitext.wikitext_split_path(data_dir, config.dataset, split)
          for split in splits}


def load_corpus(config: DataConfig, vocab_size: int, workdir: pathlib.Path) -> Corpus:
  """Trains (or loads the cached) tokenizer on the train split and encodes every split the run needs.

  The tokenizer (`workdir/tokenizer.json`) and the encoded splits (`workdir/token_cache`) are cached in the workdir.
  """
  paths = split_paths(config)
  tokenizer = load_or_train_tokenizer(paths["train"], vocab_size, workdir / "tokenizer.json")
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={vocab_size}")
  cache_dir = workdir / "token_cache"
  return Corpus(
      tokenizer=tokenizer,
      train=wikitext.load_split(tokenizer, paths["train"], cache_dir=cache_dir),
      eval_splits={split: wikitext.load_split(tokenizer, paths[split], cache_dir=cache_dir)
                   for split in config.eval_splits},
  )
