"""The pure train, eval and regroup steps.

The train step is a module-level pure function `(state, batch) -> (state, metrics)`; `hmoe.train.loop` jits it once
with shardings and donation. Nothing here depends on the FFN kind: routed layers report `RoutingStats`, whose
auxiliary loss and metrics the step adds, and `update_routing_state` folds them into the `RoutingState`.

NaN guard: if the loss, gradient norm or update norm is not finite, the update is skipped and `state.nan_step` records
the step; from then on the state is frozen (routing state included), so whenever the host notices, the state still
holds the last good parameters.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from hmoe.clustering import regroup
from hmoe.config import ExperimentConfig
from hmoe.model.transformer import TransformerLM, cross_entropy
from hmoe.routing.state import RoutingState, update_routing_state
from hmoe.train.optimizer import learning_rate_schedule
from hmoe.train.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def step_rngs(state: TrainState) -> dict[str, jax.Array]:
  """The rng streams of training step `state.step`: jitter from `fold_in(rng, step)`, dropout from a fold of that, so
  turning dropout on leaves a run's jitter noise unchanged."""
  jitter_rng = jax.random.fold_in(state.rng, state.step)
  return {"jitter": jitter_rng, "dropout": jax.random.fold_in(jitter_rng, 1)}


def train_step(state: TrainState, batch: Batch, *, model: TransformerLM, optimizer: optax.GradientTransformation,
               config: ExperimentConfig) -> tuple[TrainState, Metrics]:
  """One AdamW update on `batch` ({"inputs", "targets"} int32 [B, L]); returns the new state and step metrics."""
  routed = config.model.routed
  bias = state.routing_state.selection_bias

  def loss_fn(params):
    logits, stats = model.apply({"params": params}, batch["inputs"], train=True, selection_bias=bias,
                                rngs=step_rngs(state))
    nll_sum, count = cross_entropy(logits, batch["targets"])
    ce = nll_sum / count
    if stats is None:
      return ce, ({"ce_loss": ce}, stats)
    return ce + stats.auxiliary_loss(routed.loss_weights), ({"ce_loss": ce, **stats.metrics()}, stats)

  (loss, (metrics, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state, update_metrics = apply_gradients(state, loss, grads, stats, optimizer=optimizer, config=config)
  return new_state, {**metrics, **update_metrics}


def apply_gradients(state: TrainState, loss: jax.Array, grads: Any, stats: Any, *,
                    optimizer: optax.GradientTransformation, config: ExperimentConfig) -> tuple[TrainState, Metrics]:
  """The update of one step, shared by every training objective (language modelling, `hmoe.glue.finetune`).

  Applies `grads`, folds the routing statistics `stats` into the routing state, and, unless the loss, gradient or
  update is non-finite (the NaN guard of the module docstring), advances the step.
  """
  grad_norm = optax.tree.norm(grads)
  updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)

  # Updates are checked too: corrupted optimizer moments give finite gradients but non-finite parameters.
  healthy = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
             & (state.nan_step < 0))
  keep_new = lambda new, old: jax.tree.map(lambda n, o: jnp.where(healthy, n, o), new, old)
  new_routing_state = update_routing_state(state.routing_state, stats, config.model)
  new_state = state.replace(
      step=jnp.where(healthy, state.step + 1, state.step),
      params=keep_new(new_params, state.params),
      opt_state=keep_new(new_opt_state, state.opt_state),
      nan_step=jnp.where((state.nan_step < 0) & ~healthy, state.step, state.nan_step),
      routing_state=keep_new(new_routing_state, state.routing_state),
  )
  metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": learning_rate_schedule(config.train)(state.step)}
  return new_state, metrics


def recluster_step(state: TrainState, *, optimizer: optax.GradientTransformation, config: ExperimentConfig
                   ) -> TrainState:
  """Regroups the experts of every HMoE layer (`hmoe.clustering.regroup.recluster`); jitted on its own."""
  params, opt_state, routing_state = regroup.recluster(state.params, state.opt_state, state.routing_state, state.step,
                                                       config=config.model, optimizer=optimizer)
  return state.replace(params=params, opt_state=opt_state, routing_state=routing_state)


def eval_step(params: Any, routing_state: RoutingState, batch: Batch, *, model: TransformerLM) -> Metrics:
  """Summed NLL and token count of one padded eval batch ({"inputs", "targets", "weights"}).

  The routing state's balancing biases select experts exactly as in training.
  """
  logits, stats = model.apply({"params": params}, batch["inputs"], train=False,
                              selection_bias=routing_state.selection_bias)
  nll_sum, count = cross_entropy(logits, batch["targets"], batch["weights"])
  metrics = {"nll_sum": nll_sum, "num_tokens": count}
  if stats is not None:
    metrics["num_dropped"] = jnp.sum(stats.num_dropped)
  return metrics
