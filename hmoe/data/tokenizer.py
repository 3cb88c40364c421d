"""Subword tokenizer for WikiText, trained offline with HF `tokenizers`.

Design:
  * Byte-level BPE (GPT-2 style). Byte-level rather than a character-level
    Unigram/BPE because its base alphabet is all 256 bytes: any character, including
    ones absent from the training split, encodes losslessly without an unknown-token
    fallback. That matters here because the natural fallback token, `<unk>`, already
    means something else in WikiText (see below). BPE rather than Unigram because
    BPE trains in a few seconds on WikiText-2 (2 CPU cores) and its merges are
    deterministic given the data.
  * `<unk>` in WikiText is the dataset's own out-of-vocabulary word marker. It is
    an atomic special token (never split into `<`, `unk`, `>`) and decodes back to
    the literal string `<unk>`. The normalizer folds the space before it into the
    token (`" <unk>"` -> `"<unk>"`) and the decoder puts it back, so an `<unk>`
    word costs one token rather than a lone space token plus `<unk>`
    (about 2% fewer tokens on WikiText-2).
  * `<eos>` never occurs in the text: the data pipeline appends one per line.
  * `<pad>` has id 0, `<eos>` id 1, `<unk>` id 2.
  * Whitespace is normalised (runs collapse to one space, ends stripped), so
    `decode(encode(line)) == " ".join(line.split())` for any line. WikiText is
    already single-space separated (` @-@ `, ` @,@ ` included), so on WikiText
    this is lossless.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import tempfile
from collections.abc import Iterator, Sequence

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from hmoe.data.wikitext import decode_text

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
# Order fixes the ids: <pad>=0, <eos>=1, <unk>=2.
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
# Special tokens plus the 256-byte base alphabet of byte-level BPE.
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256

PathLike = str | os.PathLike[str]


class Tokenizer:
  """A trained `tokenizers.Tokenizer` with the hmoe special-token conventions."""

  def __init__(self, hf_tokenizer: tokenizers.Tokenizer):
    for expected_id, token in enumerate(SPECIAL_TOKENS):
      actual_id = hf_tokenizer.token_to_id(token)
      if actual_id != expected_id:
        raise ValueError(
            f"tokenizer must map {token!r} to id {expected_id}, got {actual_id}"
        )
    self._tok = hf_tokenizer
    serialized = hf_tokenizer.to_str()
    self._fingerprint = hashlib.sha256(serialized.encode("utf-8")).hexdigest()[:16]

  @property
  def hf_tokenizer(self) -> tokenizers.Tokenizer:
    """The wrapped HF tokenizer."""
    return self._tok

  @property
  def vocab_size(self) -> int:
    """Number of ids, special tokens included; all ids lie in [0, vocab_size)."""
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def pad_id(self) -> int:
    return 0

  @property
  def eos_id(self) -> int:
    return 1

  @property
  def unk_id(self) -> int:
    return 2

  @property
  def fingerprint(self) -> str:
    """Stable hash (16 hex chars) of the serialized tokenizer JSON."""
    return self._fingerprint

  def encode(self, text: str) -> list[int]:
    """Encodes one line of text (no `<eos>` is added)."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, lines: Sequence[str]) -> list[list[int]]:
    """Encodes many lines in parallel (Rust threads); no `<eos>` is added."""
    encodings = self._tok.encode_batch(list(lines), add_special_tokens=False)
    return [e.ids for e in encodings]

  def decode(self, ids: Sequence[int]) -> str:
    """Decodes ids to text, dropping `<pad>` and `<eos>` but keeping `<unk>`."""
    kept = [int(i) for i in ids if int(i) not in (self.pad_id, self.eos_id)]
    # skip_special_tokens=False: <unk> is special (atomic) but must be printed.
    return self._tok.decode(kept, skip_special_tokens=False)

  def save(self, path: PathLike) -> None:
    """Writes the tokenizer JSON to `path` atomically (temp file + rename)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(self._tok.to_str())
      os.replace(tmp, path)
    except BaseException:
      pathlib.Path(tmp).unlink(missing_ok=True)
      raise

  @classmethod
  def load(cls, path: PathLike) -> Tokenizer:
    """Loads a tokenizer written by `save`."""
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"tokenizer file not found: {path}")
    return cls(tokenizers.Tokenizer.from_file(str(path)))

  def __repr__(self) -> str:
    return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint!r})"


def _build_untrained() -> tokenizers.Tokenizer:
  """The tokenizer pipeline before BPE merges are learned."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.normalizer = normalizers.Sequence([
      normalizers.Replace(tokenizers.Regex(r"\s+"), " "),
      normalizers.Strip(),
      normalizers.Replace(f" {UNK_TOKEN}", UNK_TOKEN),
  ])
  # add_prefix_space=False: a line's first word carries no leading space, so
  # decoding reproduces the stripped line exactly.
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.Sequence([
      decoders.ByteLevel(),
      # Undo the normalizer's space folding: an <unk> after a word gets its space back.
      decoders.Replace(tokenizers.Regex(rf"(?<=\S){UNK_TOKEN}"), f" {UNK_TOKEN}"),
  ])
  return tok


def _special_added_tokens() -> list[tokenizers.AddedToken]:
  # normalized=True for <unk> so it is matched after the normalizer has folded
  # the preceding space into it; the others never follow that rule.
  return [
      tokenizers.AddedToken(PAD_TOKEN, special=True, normalized=False),
      tokenizers.AddedToken(EOS_TOKEN, special=True, normalized=False),
      tokenizers.AddedToken(UNK_TOKEN, special=True, normalized=True),
  ]


def _iter_lines(path: pathlib.Path) -> Iterator[str]:
  # WikiText lines end in "\n" only; no other separators count. Lines keep their "\n", as a text file yields them.
  parts = decode_text(pathlib.Path(path).read_bytes(), path).split("\n")
  lines = [part + "\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
  for line in lines:
    if not line.isspace():
      yield line


def _check_vocab_size(vocab_size: int) -> None:
  if vocab_size < MIN_VOCAB_SIZE:
    raise ValueError(
        f"vocab_size={vocab_size} is too small: byte-level BPE needs at least "
        f"{MIN_VOCAB_SIZE} ({len(SPECIAL_TOKENS)} special tokens + 256 bytes)"
    )


def train_tokenizer(train_path: PathLike, vocab_size: int) -> Tokenizer:
  """Trains a byte-level BPE tokenizer on a WikiText-style text file.

  Args:
    train_path: UTF-8 text file, one line of text per line (e.g. wiki.train.tokens).
    vocab_size: Requested size including the special tokens. A tiny corpus may
      yield fewer ids if it runs out of pairs to merge (a warning is logged).

  Returns:
    The trained tokenizer (WikiText-2 train, vocab 8192: a few seconds on 2 cores).
  """
  _check_vocab_size(vocab_size)
  train_path = pathlib.Path(train_path)
  if not train_path.is_file():
    raise FileNotFoundError(f"tokenizer training file not found: {train_path}")
  tok = _build_untrained()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=_special_added_tokens(),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tok.train_from_iterator(_iter_lines(train_path), trainer=trainer)
  result = Tokenizer(tok)
  if result.vocab_size != vocab_size:
    logging.warning(
        "tokenizer trained on %s has %d ids, fewer than the requested %d "
        "(corpus too small for more merges)", train_path, result.vocab_size, vocab_size)
  return result


def load_or_train_tokenizer(
    train_path: PathLike, vocab_size: int, cache_path: PathLike
) -> Tokenizer:
  """Loads the tokenizer cached at `cache_path`, or trains and caches one.

  The cache is used only if it loads and has exactly `vocab_size` ids; otherwise a
  new tokenizer is trained on `train_path` and atomically written to `cache_path`.
  The cache is not tied to the training file's contents: use a distinct
  `cache_path` per training corpus.
  """
  _check_vocab_size(vocab_size)
  cache_path = pathlib.Path(cache_path)
  if cache_path.is_file():
    try:
      cached = Tokenizer.load(cache_path)
    except Exception as e:  # A corrupt or foreign file is rebuilt, not fatal.
      logging.warning("ignoring unreadable tokenizer cache %s: %s", cache_path, e)
    else:
      if cached.vocab_size == vocab_size:
        return cached
      logging.info("tokenizer cache %s has vocab_size=%d, want %d; retraining",
                   cache_path, cached.vocab_size, vocab_size)
  tok = train_tokenizer(train_path, vocab_size)
  tok.save(cache_path)
  return tok
