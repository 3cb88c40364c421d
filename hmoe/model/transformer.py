"""Decoder-only pre-norm Transformer language model with dense or MoE feed-forward blocks.

`TransformerLM.apply(params, tokens_BxL, train=..., rngs=...)` returns `(logits_BxLxV, routing_stats)`, where
`routing_stats` is a `hmoe.routing.RoutingStats` whose leaves carry a leading axis over the routed layers (None for an
all-dense model). Training needs a "jitter" rng when the router jitters and a "dropout" rng when
`dropout_rate > 0`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from hmoe.config import ModelConfig
from hmoe.model.ffn import ffn_layer
from hmoe.model.layers import CausalSelfAttention, RMSNorm, flat_dot
from hmoe.routing.statistics import RoutingStats


class Block(nn.Module):
  config: ModelConfig
  ffn_kind: str

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, *, train: bool, selection_bias: jax.Array | None = None,
               positions: jax.Array | None = None) -> tuple[jax.Array, RoutingStats | None]:
    """`selection_bias`: this layer's balancing biases [E] (cluster-major for an HMoE layer), or None.

    `positions` (int [B, L]): decode with the attention's key/value cache (`hmoe.inference.generate`).
    """
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    dropout = nn.Dropout(cfg.dropout_rate, deterministic=not train)
    attended = CausalSelfAttention(cfg.num_heads, cfg.rope_base, dtype, cache_len=cfg.max_len, name="attention")(
        RMSNorm(dtype=dtype, name="attention_norm")(x_BxLxD), positions)
    x_BxLxD = x_BxLxD + dropout(attended)
    normed = RMSNorm(dtype=dtype, name="ffn_norm")(x_BxLxD)
    ffn_out, stats = ffn_layer(cfg, self.ffn_kind)(normed, train=train, selection_bias=selection_bias)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD + dropout(ffn_out), ("batch", "length", "embed"))
    return x_BxLxD, stats


class TransformerLM(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL: jax.Array, *, train: bool = False, selection_bias: jax.Array | None = None,
               positions: jax.Array | None = None, features_only: bool = False
               ) -> tuple[jax.Array, RoutingStats | None]:
    """`selection_bias`: float32 [num_routed_layers, E] auxiliary-loss-free balancing biases (selection only).

    `positions`: int [B, L] position of every token, for decoding with the key/value cache in the mutable "cache"
    collection (apply with `mutable=["cache"]`); None for training and scoring (positions 0..L-1, no cache).
    `features_only`: return the final-normed hidden states [B, L, D] instead of logits (`hmoe.glue.model`); an untied
    model then never creates its `unembed`.
    """
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    embedding_VxD = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(stddev=cfg.d_model**-0.5), ("vocab", "embed")),
        (cfg.vocab_size, cfg.d_model), jnp.float32)
    # Embeddings start at norm ~1, small next to the blocks' outputs: a larger scale makes a tied model start by
    # predicting its own input token with a logit of ~sqrt(D). The pre-norm blocks normalise their inputs anyway.
    x_BxLxD = nn.Dropout(cfg.dropout_rate, deterministic=not train)(embedding_VxD[tokens_BxL].astype(dtype))
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
    layer_stats = []
    for layer, kind in enumerate(cfg.ffn_kinds):
      bias = None
      if selection_bias is not None and layer in cfg.routed_layers:
        bias = selection_bias[cfg.routed_layers.index(layer)]
      x_BxLxD, stats = Block(cfg, kind, name=f"block_{layer}")(x_BxLxD, train=train, selection_bias=bias,
                                                              positions=positions)
      if stats is not None:
        layer_stats.append(stats)
    x_BxLxD = RMSNorm(dtype=dtype, name="final_norm")(x_BxLxD)
    stats = jax.tree.map(lambda *leaves: jnp.stack(leaves), *layer_stats) if layer_stats else None
    if features_only:
      return x_BxLxD, stats
    if cfg.tie_embeddings:
      # Tied output: |x| = sqrt(D) after the final norm and entries of E have std 1/sqrt(D), so logits start O(1).
      logits_BxLxV = flat_dot(x_BxLxD, embedding_VxD.T.astype(dtype))
    else:
      unembed_DxV = self.param(
          "unembed", nn.with_logical_partitioning(nn.initializers.normal(stddev=cfg.d_model**-0.5), ("embed", "vocab")),
          (cfg.d_model, cfg.vocab_size), jnp.float32)
      logits_BxLxV = flat_dot(x_BxLxD, unembed_DxV.astype(dtype))
    return logits_BxLxV.astype(jnp.float32), stats


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array, weights_BxL: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """Summed token negative log-likelihood (float32) and the summed weight (number of scored tokens)."""
  log_probs = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
  nll_BxL = -jnp.take_along_axis(log_probs, targets_BxL[..., None], axis=-1)[..., 0]
  if weights_BxL is None:
    weights_BxL = jnp.ones_like(nll_BxL)
  return jnp.sum(nll_BxL * weights_BxL), jnp.sum(weights_BxL)
