"""Autoregressive generation with a key/value cache: a jitted prefill and a jitted one-token decode step.

Shapes are static: the cache holds `model.max_len` positions per sequence, the decode step always takes one token per
sequence, so decoding never recompiles (the prefill compiles once per padded prompt length). Prompts of different
lengths are right-padded with `pad_id`; sequence b's prompt occupies positions 0..len_b-1 and its t-th generated token
position len_b + t, so pad positions are overwritten before any query can attend to them (see
`hmoe.model.layers.CausalSelfAttention`). Routed layers decode dropless in one routing group (`decoding_config`):
every token is routed on its own, exactly as in the full forward pass.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hmoe.config import ModelConfig
from hmoe.inference import storage
from hmoe.inference.sampling import Sampler
from hmoe.model.transformer import TransformerLM
from hmoe.routing.state import RoutingState


def decoding_config(config: ModelConfig) -> ModelConfig:
  """The model config for decoding: routed layers dropless and in one routing group (same parameters)."""
  if config.routed is None:
    return config
  routed = dataclasses.replace(config.routed, eval_dropless=True, num_groups=1)
  return dataclasses.replace(config, **{config.routed_kind: routed})


def _forward(model: TransformerLM, params: Any, routing_state: RoutingState, cache: Any, tokens_BxL: jax.Array,
             positions_BxL: jax.Array) -> tuple[jax.Array, Any]:
  params = storage.materialize(params)  # Compressed weights are dequantized here, inside the jitted step.
  variables = {"params": params} if cache is None else {"params": params, "cache": cache}
  (logits_BxLxV, _), mutated = model.apply(variables, tokens_BxL, train=False,
                                           selection_bias=routing_state.selection_bias, positions=positions_BxL,
                                           mutable=["cache"])
  return logits_BxLxV, mutated["cache"]


def _prefill(params, routing_state, tokens_BxP, lengths_B, *, model):
  """Runs the prompts, fills the cache; returns the logits after each prompt's last token and the cache."""
  positions_BxP = jnp.broadcast_to(jnp.arange(tokens_BxP.shape[1]), tokens_BxP.shape)
  logits_BxPxV, cache = _forward(model, params, routing_state, None, tokens_BxP, positions_BxP)
  last_BxV = jnp.take_along_axis(logits_BxPxV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  return last_BxV, cache


def _decode_step(params, routing_state, cache, tokens_B, positions_B, *, model):
  """One token per sequence at `positions_B`: its logits (for the next token) and the updated cache."""
  logits_Bx1xV, cache = _forward(model, params, routing_state, cache, tokens_B[:, None], positions_B[:, None])
  return logits_Bx1xV[:, 0], cache


class Generator:
  """Generates from one model: `generate(prompts, max_new_tokens, rng)` yields each step's tokens as they come."""

  def __init__(self, config: ModelConfig, params: Any, routing_state: RoutingState, *, pad_id: int = 0):
    self.config = decoding_config(config)
    self.params, self.routing_state, self.pad_id = params, routing_state, pad_id
    model = TransformerLM(self.config)
    self.prefill = jax.jit(functools.partial(_prefill, model=model))
    self.decode_step = jax.jit(functools.partial(_decode_step, model=model), donate_argnums=2)
    self._sample = jax.jit(lambda logits, rng, sampler: sampler(logits, rng), static_argnums=2)

  def _pad(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    if not prompts:
      raise ValueError("need at least one prompt")
    lengths = np.array([len(prompt) for prompt in prompts], np.int32)
    if np.any(lengths == 0):
      raise ValueError(f"prompt {int(np.argmin(lengths))} is empty: a prompt needs at least one token")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = int(lengths.max()) + max_new_tokens
    if longest > self.config.max_len:
      raise ValueError(f"prompt of {int(lengths.max())} tokens + {max_new_tokens} new tokens exceeds the model's "
                       f"context of max_len={self.config.max_len}")
    vocab = self.config.vocab_size
    if any(not 0 <= token < vocab for prompt in prompts for token in prompt):
      raise ValueError(f"prompt tokens must be ids in [0, {vocab})")
    tokens = np.full((len(prompts), int(lengths.max())), self.pad_id, np.int32)
    for row, prompt in enumerate(prompts):
      tokens[row, :len(prompt)] = prompt
    return tokens, lengths

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, rng: jax.Array,
               sampler: Sampler | None = None) -> Iterator[np.ndarray]:
    """Yields int32 [B] tokens, one array per step, `max_new_tokens` times (greedy unless `sampler` says)."""
    sampler = sampler or Sampler()
    tokens, lengths = self._pad(prompts, max_new_tokens)
    logits, cache = self.run_prefill(tokens, lengths)
    positions = jnp.asarray(lengths)
    for step in range(max_new_tokens):
      next_tokens = self._sample(logits, jax.random.fold_in(rng, step), sampler)
      yield np.asarray(next_tokens)
      if step + 1 < max_new_tokens:
        logits, cache = self.run_decode_step(cache, next_tokens, positions)
        positions = positions + 1

  def run_prefill(self, tokens_BxP: np.ndarray, lengths_B: np.ndarray) -> tuple[jax.Array, Any]:
    """Logits after each prompt's last token [B, V] and the filled cache (the offloading engine overrides this)."""
    return self.prefill(self.params, self.routing_state, tokens_BxP, lengths_B)

  def run_decode_step(self, cache: Any, tokens_B: jax.Array, positions_B: jax.Array) -> tuple[jax.Array, Any]:
    """Logits [B, V] for the next token after `tokens_B` at `positions_B`, and the updated cache."""
    return self.decode_step(self.params, self.routing_state, cache, tokens_B, positions_B)
