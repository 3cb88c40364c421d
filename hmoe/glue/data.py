"""GLUE examples as model inputs: token ids with the pretrained tokenizer, and stateless batches.

A single sentence becomes `text <eos>`, a pair `text_a <eos> text_b <eos>`: `<eos>` is the separator the tokenizer
and the pretrained model know (it ends every WikiText line), and the final `<eos>` is the token whose state the
classifier reads under last-token pooling (`hmoe.glue.model`). Pairs longer than `max_len` are cut longest-first (one
token at a time from the longer text), so both texts keep as much as possible; the count of cut examples is returned so
callers can log it.

Batches are a pure function of (step, seed), as in pretraining (`hmoe.data.batching`): epoch e visits the examples in
the order `permutation(seed, e)`, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from hmoe.data.tokenizer import Tokenizer
from hmoe.glue.tasks import Example

_LENGTH_MULTIPLE = 8  # Splits are padded to a multiple of this (one compiled shape per split, little padding).


@dataclasses.dataclass(frozen=True)
class EncodedSplit:
  tokens: np.ndarray  # int32 [N, L], right-padded with the pad id.
  lengths: np.ndarray  # int32 [N], number of real tokens (>= 1).
  labels: np.ndarray  # int32 [N] class indices, or float32 [N] scores.
  num_truncated: int = 0

  def __len__(self) -> int:
    return len(self.lengths)


def _fit(ids_a: list[int], ids_b: list[int] | None, budget: int) -> tuple[list[int], list[int] | None, bool]:
  """Cuts the longer of the two texts, one token at a time, until both fit in `budget` tokens."""
  total = len(ids_a) + (len(ids_b) if ids_b is not None else 0)
  if total <= budget:
    return ids_a, ids_b, False
  if ids_b is None:
    return ids_a[:budget], None, True
  cut_a, cut_b = len(ids_a), len(ids_b)
  while cut_a + cut_b > budget:
    if cut_a >= cut_b:
      cut_a -= 1
    else:
      cut_b -= 1
  return ids_a[:cut_a], ids_b[:cut_b], True


def encode(tokenizer: Tokenizer, examples: Sequence[Example], labels: np.ndarray, max_len: int) -> EncodedSplit:
  """Token ids of every example, padded to a multiple of 8 up to `max_len` (the model's context)."""
  if not examples:
    raise ValueError("no examples to encode")
  is_pair = examples[0].text_b is not None
  num_separators = 2 if is_pair else 1
  if max_len <= num_separators:
    raise ValueError(f"max_len={max_len} leaves no room for text")
  texts_a = tokenizer.encode_batch([example.text_a for example in examples])
  texts_b = tokenizer.encode_batch([example.text_b or "" for example in examples]) if is_pair else None
  eos = tokenizer.eos_id
  rows, truncated = [], 0
  for index, ids_a in enumerate(texts_a):
    ids_a, ids_b, cut = _fit(ids_a, texts_b[index] if is_pair else None, max_len - num_separators)
    truncated += cut
    rows.append(ids_a + [eos] + (ids_b + [eos] if ids_b is not None else []))
  lengths = np.asarray([len(row) for row in rows], np.int32)
  width = min(max_len, -(-int(lengths.max()) // _LENGTH_MULTIPLE) * _LENGTH_MULTIPLE)
  tokens = np.full((len(rows), width), tokenizer.pad_id, np.int32)
  for index, row in enumerate(rows):
    tokens[index, :len(row)] = row
  return EncodedSplit(tokens=tokens, lengths=lengths, labels=np.asarray(labels), num_truncated=truncated)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch (the remainder of an epoch's permutation is dropped; it differs every epoch)."""
  if num_examples < batch_size:
    raise ValueError(f"batch_size={batch_size} exceeds the {num_examples} training examples")
  return num_examples // batch_size


def train_batch(split: EncodedSplit, step: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
  """The training batch of `step`: a pure function of (step, seed), so resuming at a step repeats nothing."""
  per_epoch = steps_per_epoch(len(split), batch_size)
  epoch, offset = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(len(split))
  rows = order[offset * batch_size:(offset + 1) * batch_size]
  return {"tokens": split.tokens[rows], "lengths": split.lengths[rows], "labels": split.labels[rows]}


def eval_batches(split: EncodedSplit, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """The split in order, in batches of one shape: the last is padded with copies of row 0 whose weight is 0."""
  for start in range(0, len(split), batch_size):
    rows = np.arange(start, min(start + batch_size, len(split)))
    weights = np.ones(batch_size, np.float32)
    if len(rows) < batch_size:
      weights[len(rows):] = 0.0
      rows = np.concatenate([rows, np.zeros(batch_size - len(rows), rows.dtype)])
    yield {"tokens": split.tokens[rows], "lengths": split.lengths[rows], "labels": split.labels[rows],
           "weights": weights}
