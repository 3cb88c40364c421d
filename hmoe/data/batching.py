"""Stateless batching of encoded token streams: shuffled training windows and full-split evaluation batches.

Axis names: B batch, L sequence length, N tokens in a split.

`train_batch` derives the batch for a step from (seed, step) alone, so a resumed run continues exactly by step number.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np


@functools.lru_cache(maxsize=8)
def _epoch_order(seed: int, epoch: int, num_windows: int) -> np.ndarray:
  order = np.random.default_rng([seed, epoch]).permutation(num_windows)
  order.flags.writeable = False  # Shared through the cache.
  return order


def train_batch(tokens: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int) -> dict[str, np.ndarray]:
  """The training batch for `step`, a pure function of its arguments.

  The stream is cut into windows of seq_len + 1 tokens starting at multiples of seq_len (consecutive windows share
  one token, so each token after the first, up to the last whole window, is a target once per epoch). Epoch e visits
  all windows in the order `default_rng([seed, e]).permutation(num_windows)`; step s takes windows [s*B, (s+1)*B) of
  the concatenated epoch orders, so a batch may span two epochs.

  Args:
    tokens: int [N] token stream.
    step: Global step, >= 0.
    batch_size: B.
    seq_len: L.
    seed: Shuffle seed.

  Returns:
    {"inputs": int32 [B, L], "targets": int32 [B, L]}, targets = inputs shifted by one.
  """
  _check_batch_args(tokens, batch_size, seq_len)
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}")
  num_windows = (len(tokens) - 1) // seq_len
  if num_windows < batch_size:
    raise ValueError(f"split of {len(tokens)} tokens has {num_windows} windows of seq_len+1={seq_len + 1}, "
                     f"fewer than batch_size={batch_size}")
  flat = step * batch_size + np.arange(batch_size)
  epochs, positions = np.divmod(flat, num_windows)
  windows = np.empty(batch_size, dtype=np.int64)
  # batch_size <= num_windows, so a batch touches at most two epochs.
  for epoch in np.unique(epochs):
    in_epoch = epochs == epoch
    windows[in_epoch] = _epoch_order(seed, int(epoch), num_windows)[positions[in_epoch]]
  index_BxL1 = windows[:, None] * seq_len + np.arange(seq_len + 1)
  chunk_BxL1 = np.asarray(tokens)[index_BxL1].astype(np.int32)
  return {"inputs": chunk_BxL1[:, :-1], "targets": chunk_BxL1[:, 1:]}


def num_eval_batches(num_tokens: int, batch_size: int, seq_len: int) -> int:
  """Number of batches `eval_batches` yields for a split of num_tokens tokens."""
  num_windows = -(-num_tokens // seq_len)
  return -(-num_windows // batch_size)


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, eos_id: int) -> Iterator[dict[str, np.ndarray]]:
  """Batches covering the whole split; every token is a target exactly once.

  One eos is prepended as beginning-of-text context (the token before a split's first line is conceptually the
  previous line's eos), and the shifted stream is cut into consecutive, non-overlapping windows of seq_len. The final
  partial window and the final partial batch are padded with eos_id and weight 0, so every batch has the same static
  shape and eval compiles once.

  Args:
    tokens: int [N] token stream.
    batch_size: B.
    seq_len: L.
    eos_id: Used as the leading context token and as padding.

  Returns:
    An iterator of `num_eval_batches(N, B, L)` dicts {"inputs": int32 [B, L], "targets": int32 [B, L],
    "weights": float32 [B, L]}, weights 1 on real targets and 0 on padding; weights sum to N over all batches.
  """
  # Validated here, not inside the generator, so bad arguments fail at the call.
  _check_batch_args(tokens, batch_size, seq_len)
  return _eval_batches(np.asarray(tokens), batch_size, seq_len, eos_id)


def _eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, eos_id: int) -> Iterator[dict[str, np.ndarray]]:
  num_tokens = len(tokens)
  num_batches = num_eval_batches(num_tokens, batch_size, seq_len)
  padded_len = num_batches * batch_size * seq_len
  inputs = np.full(padded_len, eos_id, dtype=np.int32)
  targets = np.full(padded_len, eos_id, dtype=np.int32)
  weights = np.zeros(padded_len, dtype=np.float32)
  inputs[1:num_tokens] = tokens[:-1]
  targets[:num_tokens] = tokens
  weights[:num_tokens] = 1.0
  shape = (num_batches, batch_size, seq_len)
  inputs, targets, weights = (a.reshape(shape) for a in (inputs, targets, weights))
  for i in range(num_batches):
    yield {"inputs": inputs[i], "targets": targets[i], "weights": weights[i]}


def _check_batch_args(tokens: np.ndarray, batch_size: int, seq_len: int) -> None:
  if np.ndim(tokens) != 1:
    raise ValueError(f"tokens must be 1-D, got shape {np.shape(tokens)}")
  if len(tokens) == 0:
    raise ValueError("tokens is empty")
  if batch_size <= 0 or seq_len <= 0:
    raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")


