"""Scoring a model on a whole split: word-level perplexity from summed token NLL."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from hmoe.config import DataConfig
from hmoe.data import batching
from hmoe.data.wikitext import SplitTokens
from hmoe.routing.state import RoutingState
from hmoe.train import metrics


def evaluate(eval_fn: Callable[..., dict[str, jax.Array]], params: Any, routing_state: RoutingState,
             split: SplitTokens, config: DataConfig, eos_id: int) -> dict[str, float]:
  """Scores every token of a split once. Word-level perplexity = exp(total NLL / WikiText word count).

  Args:
    eval_fn: jitted `hmoe.train.step.eval_step` (with its model bound).
    params: model parameters.
    routing_state: the run's routing state (its balancing biases select experts as in training).
    split: the encoded split.
    config: eval batch size and sequence length.
    eos_id: context and padding token of the eval batches.
  """
  totals = None
  for batch in batching.eval_batches(split.tokens, config.eval_batch_size, config.seq_len, eos_id):
    batch_metrics = eval_fn(params, routing_state, batch)
    # Summing device arrays keeps the loop asynchronous: one host sync per split, not per batch.
    totals = batch_metrics if totals is None else jax.tree.map(jnp.add, totals, batch_metrics)
  totals = jax.device_get(totals)
  nll_sum, num_tokens = float(totals["nll_sum"]), float(totals["num_tokens"])
  return {
      "loss": nll_sum / num_tokens,
      "token_perplexity": metrics.perplexity(nll_sum, num_tokens),
      "word_perplexity": metrics.perplexity(nll_sum, split.num_words),
      "num_tokens": num_tokens,
      "num_words": split.num_words,
  }
