"""A sequence classifier (or regressor) on the language model's trunk, for every FFN kind.

`SequenceClassifier` shares its scope with a `TransformerLM` (`nn.share_scope`), so its parameters are the LM's own
tree (`embedding`, `block_i`, `final_norm`) plus one `classifier` entry: a pretrained LM's parameters load unchanged,
and the HMoE regroup step (`hmoe.clustering.regroup`), which finds layers by name, runs on it as it is.

Pooling (the representation the head reads):
  * "last": the final-normed state of the last real token, the separator `<eos>` that ends every input
    (`hmoe.glue.data`). The model is causal, so only that position has seen the whole input; this is how a decoder-only
    model is fine-tuned for classification (GPT-1, Radford et al. 2018). The default.
  * "mean": the average state over the real tokens, earlier ones seeing only a prefix.
docs/glue.md has the ablation of the two.
Padding sits after the text, so causal attention keeps it out of every real token's state; padded positions are still
routed (they count in the routing statistics, and in the capacity of a non-dropless layer).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from hmoe.config import ModelConfig
from hmoe.model.transformer import TransformerLM
from hmoe.routing.statistics import RoutingStats

POOLINGS = ("last", "mean")


class SequenceClassifier(nn.Module):
  config: ModelConfig
  num_outputs: int  # Classes, or 1 for a regression score.
  pooling: str = "last"
  head_dropout: float = 0.1

  def setup(self):
    self.trunk = TransformerLM(self.config)
    nn.share_scope(self, self.trunk)  # The LM's parameter names, unprefixed.
    self.dropout = nn.Dropout(self.head_dropout)
    # Small init: the head starts near a constant prediction and does not fight the pretrained features.
    self.classifier = nn.Dense(self.num_outputs, kernel_init=nn.initializers.normal(0.02))

  def __call__(self, tokens_BxL: jax.Array, lengths_B: jax.Array, *, train: bool = False,
               selection_bias: jax.Array | None = None) -> tuple[jax.Array, RoutingStats | None]:
    """Outputs float32 [B, num_outputs] (class logits, or [B, 1] scores) and the trunk's routing statistics."""
    hidden_BxLxD, stats = self.trunk(tokens_BxL, train=train, selection_bias=selection_bias, features_only=True)
    if self.pooling == "last":
      pooled_BxD = jnp.take_along_axis(hidden_BxLxD, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    else:
      mask_BxL = (jnp.arange(tokens_BxL.shape[1])[None] < lengths_B[:, None]).astype(hidden_BxLxD.dtype)
      pooled_BxD = jnp.einsum("bld,bl->bd", hidden_BxLxD, mask_BxL) / lengths_B[:, None].astype(hidden_BxLxD.dtype)
    pooled_BxD = self.dropout(pooled_BxD.astype(jnp.float32), deterministic=not train)
    return self.classifier(pooled_BxD), stats


def example_losses(outputs_BxC: jax.Array, labels_B: jax.Array, is_regression: bool) -> jax.Array:
  """Per-example float32 loss: softmax cross-entropy over classes, or squared error of the score (STS-B)."""
  if is_regression:
    return jnp.square(outputs_BxC[:, 0] - labels_B.astype(jnp.float32))
  log_probs = jax.nn.log_softmax(outputs_BxC, axis=-1)
  return -jnp.take_along_axis(log_probs, labels_B[:, None].astype(jnp.int32), axis=-1)[:, 0]


def predictions(outputs_BxC: jax.Array, is_regression: bool) -> jax.Array:
  return outputs_BxC[:, 0] if is_regression else jnp.argmax(outputs_BxC, axis=-1)
