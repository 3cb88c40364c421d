"""The one place that maps an FFN kind to its layer: `ffn_layer(config, kind)`.

Every FFN kind is called the same way, `ffn(x_BxLxD, train=..., selection_bias=...) -> (y_BxLxD, stats)`, with
`stats` a `hmoe.routing.RoutingStats` for routed kinds and None for the dense FFN. A routed FFN gets the model's
always-on shared expert added beside it when `shared_expert_ff > 0`. The model, the benchmarks and the comparison
build their FFNs here, so a new kind is one entry in `_ROUTED_LAYERS` plus its config section.

Parameter names are those of the checkpoints: `ffn` (dense), `moe` / `hmoe` (the routed layer, named by its kind)
and `shared_expert`, all directly under the enclosing block.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from hmoe.config import ModelConfig
from hmoe.model.hierarchical import HMoEFeedForward
from hmoe.model.layers import DenseFeedForward
from hmoe.model.moe import MoEFeedForward
from hmoe.routing.statistics import RoutingStats

_ROUTED_LAYERS = {"moe": MoEFeedForward, "hmoe": HMoEFeedForward}


class FeedForward(nn.Module):
  """The FFN of one layer of kind `kind`, as a standalone module (benchmarks, tests).

  Inside `hmoe.model.transformer.Block` the same layers are created by `ffn_layer` directly in the block's scope, so
  parameter paths stay `block_i/moe/...`; this wrapper adds one level (`.../FeedForward_0/moe/...`).
  """

  config: ModelConfig
  kind: str

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, *, train: bool = True, selection_bias: jax.Array | None = None
               ) -> tuple[jax.Array, RoutingStats | None]:
    return ffn_layer(self.config, self.kind)(x_BxLxD, train=train, selection_bias=selection_bias)


def ffn_layer(config: ModelConfig, kind: str):
  """A callable `(x, *, train, selection_bias) -> (y, stats)` that creates the layer's modules when called.

  Call it inside a compact method: its modules then belong to that method's module.
  """
  dtype = jnp.dtype(config.dtype)
  if kind == "dense":
    def dense(x_BxLxD, *, train, selection_bias=None):
      del train, selection_bias
      return DenseFeedForward(config.d_ff, dtype, name="ffn")(x_BxLxD), None
    return dense
  if kind not in _ROUTED_LAYERS:
    raise ValueError(f"unknown FFN kind {kind!r}; allowed: dense, {', '.join(_ROUTED_LAYERS)}")
  layer_cls = _ROUTED_LAYERS[kind]

  def routed(x_BxLxD, *, train, selection_bias=None):
    y_BxLxD, stats = layer_cls(getattr(config, kind), dtype, name=kind)(x_BxLxD, train=train,
                                                                         selection_bias=selection_bias)
    if config.shared_expert_ff:
      y_BxLxD = y_BxLxD + DenseFeedForward(config.shared_expert_ff, dtype, name="shared_expert")(x_BxLxD)
    return y_BxLxD, stats

  return routed
