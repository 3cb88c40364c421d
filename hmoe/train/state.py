"""`TrainState`: everything a run needs to continue exactly, and its (shardable, pure) initialisation.

Randomness is derived from `(state.rng, state.step)` and the data position is the step number (`hmoe.data.batching`
is stateless), so a checkpointed `TrainState` is everything needed to resume exactly.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from hmoe.config import ExperimentConfig
from hmoe.model.transformer import TransformerLM
from hmoe.routing.state import RoutingState, init_routing_state


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 [] number of completed (good) updates.
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32 [2] base key; per-step keys are fold_in(rng, step).
  nan_step: jax.Array  # int32 [] first step whose loss was not finite, -1 if none.
  routing_state: RoutingState  # Balancing biases and clustering statistics (fields None where unused).


def init_boxed_train_state(model: TransformerLM, optimizer: optax.GradientTransformation,
                           config: ExperimentConfig) -> TrainState:
  """Train state whose params and moments still carry their `nn.LogicallyPartitioned` axis names.

  Only for `jax.eval_shape`, to read the partition specs (`hmoe.parallel.sharding.logical_shardings`).
  """
  rng = jax.random.PRNGKey(config.train.seed)
  init_rng, state_rng = jax.random.split(rng)
  tokens = jnp.zeros((config.data.batch_size, config.data.seq_len), jnp.int32)
  params = model.init({"params": init_rng, "jitter": init_rng}, tokens, train=False)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=state_rng,
                    nan_step=jnp.full((), -1, jnp.int32), routing_state=init_routing_state(config.model))


def init_train_state(model: TransformerLM, optimizer: optax.GradientTransformation, config: ExperimentConfig
                     ) -> TrainState:
  """Initial parameters (plain arrays) and optimizer state. Pure, so it can be jitted with output shardings."""
  return nn.meta.unbox(init_boxed_train_state(model, optimizer, config))
