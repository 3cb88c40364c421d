"""Train state, optimizer and the pure train/eval step functions.

The train step is a module-level pure function `(state, batch) -> (state, metrics)`; `hmoe.train` jits it once with
shardings and donation. Randomness is derived from `(state.rng, state.step)`, and data position is the step number
(`hmoe.data.train_batch` is stateless), so a checkpointed `TrainState` is everything needed to resume exactly.

NaN guard: if the loss, gradient norm or update norm is not finite, the update is skipped and `state.nan_step` records
the step; from then on the state is frozen, so whenever the host notices, the state still holds the last good
parameters.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from hmoe import regroup
from hmoe.config import ExperimentConfig, TrainConfig
from hmoe.model import TransformerLM, cross_entropy
from hmoe.regroup import ClusterState
from hmoe.routing import update_balancing_bias

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 [] number of completed (good) updates.
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32 [2] base key; per-step keys are fold_in(rng, step).
  nan_step: jax.Array  # int32 [] first step whose loss was not finite, -1 if none.
  cluster_state: ClusterState | None = None  # HMoE clustering statistics; None without HMoE layers.
  # float32 [num_moe_layers, E] auxiliary-loss-free balancing biases of standard MoE layers; None when
  # `moe.bias_update_rate` is 0 or the model has no standard MoE layer.
  moe_selection_bias: jax.Array | None = None


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine decay to `learning_rate * min_lr_ratio`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
      decay_steps=config.num_steps, end_value=config.learning_rate * config.min_lr_ratio)


def _decay_mask(params: Any) -> Any:
  # No weight decay on norm scales (1-d); matrices, embeddings and routers are decayed.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def fan_in_lr_multipliers(params: Any, base_fan_in: int) -> Any:
  """Per-leaf learning-rate multipliers: base_fan_in / fan_in for SwiGLU output projections (`w_down`), else 1.

  muP for Adam: an update of size lr per entry moves a layer's output by about lr * fan_in, so a routed expert of
  width 256 learns 4x slower in function space than a dense FFN of width 1024 at the same lr. Scaling its lr by
  1024 / 256 restores the dense rate. `w_down` is [..., F, D] (dense [F, D], experts [E, F, D]): fan_in is F.
  """
  def multiplier(path, leaf) -> float:
    name = getattr(path[-1], "key", None)
    return base_fan_in / leaf.shape[-2] if name == "w_down" else 1.0

  return jax.tree_util.tree_map_with_path(multiplier, params)


def scale_by_fan_in(base_fan_in: int) -> optax.GradientTransformation:
  """Multiplies each update by `fan_in_lr_multipliers`; placed after AdamW it acts as a per-parameter lr."""

  def update_fn(updates, state, params=None):
    del params
    multipliers = fan_in_lr_multipliers(updates, base_fan_in)
    return jax.tree.map(lambda update, m: update * m if m != 1.0 else update, updates, multipliers), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  transforms = [
      optax.clip_by_global_norm(config.grad_clip_norm),
      optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2,
                  weight_decay=config.weight_decay, mask=_decay_mask),
  ]
  if config.fan_in_lr_base:
    transforms.append(scale_by_fan_in(config.fan_in_lr_base))
  return optax.chain(*transforms)


def init_boxed_train_state(model: TransformerLM, optimizer: optax.GradientTransformation,
                           config: ExperimentConfig) -> TrainState:
  """Train state whose params and moments still carry their `nn.LogicallyPartitioned` axis names.

  Only for `jax.eval_shape`, to read the partition specs (`hmoe.sharding.logical_shardings`).
  """
  rng = jax.random.PRNGKey(config.train.seed)
  init_rng, state_rng = jax.random.split(rng)
  tokens = jnp.zeros((config.data.batch_size, config.data.seq_len), jnp.int32)
  params = model.init({"params": init_rng, "jitter": init_rng}, tokens, train=False)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=state_rng,
                    nan_step=jnp.full((), -1, jnp.int32), cluster_state=regroup.init_cluster_state(config.model),
                    moe_selection_bias=_init_moe_selection_bias(config))


def _init_moe_selection_bias(config: ExperimentConfig) -> jax.Array | None:
  num_moe_layers = config.model.ffn_kinds.count("moe")
  if not num_moe_layers or config.model.moe.bias_update_rate <= 0:
    return None
  return jnp.zeros((num_moe_layers, config.model.moe.num_experts), jnp.float32)


def init_train_state(model: TransformerLM, optimizer: optax.GradientTransformation, config: ExperimentConfig
                     ) -> TrainState:
  """Initial parameters (plain arrays) and optimizer state. Pure, so it can be jitted with output shardings."""
  return nn.meta.unbox(init_boxed_train_state(model, optimizer, config))


def _moe_loss_and_metrics(moe_stats, config: ExperimentConfig) -> tuple[jax.Array, Metrics]:
  if moe_stats is None:
    return jnp.zeros((), jnp.float32), {}
  model_cfg = config.model
  sparse_cfg = model_cfg.hmoe if model_cfg.sparse_kind == "hmoe" else model_cfg.moe
  # Auxiliary losses are summed over routed layers, each layer weighted as in Switch / ST-MoE.
  aux = (sparse_cfg.balance_loss_weight * jnp.sum(moe_stats.balance_loss)
         + sparse_cfg.z_loss_weight * jnp.sum(moe_stats.z_loss))
  metrics = {
      "balance_loss": jnp.mean(moe_stats.balance_loss),
      "z_loss": jnp.mean(moe_stats.z_loss),
      "expert_load": moe_stats.expert_load,  # [num_routed_layers, E]
      "num_dropped": jnp.sum(moe_stats.num_dropped),
      "num_assignments": jnp.sum(moe_stats.num_assignments),
  }
  if model_cfg.sparse_kind == "hmoe":
    aux += sparse_cfg.cluster_balance_loss_weight * jnp.sum(moe_stats.cluster_balance_loss)
    metrics.update(cluster_balance_loss=jnp.mean(moe_stats.cluster_balance_loss),
                   cluster_load=moe_stats.cluster_load)  # [num_routed_layers, G]
  return aux, metrics


def train_step(state: TrainState, batch: Batch, *, model: TransformerLM, optimizer: optax.GradientTransformation,
               config: ExperimentConfig) -> tuple[TrainState, Metrics]:
  """One AdamW update on `batch` ({"inputs", "targets"} int32 [B, L]); returns the new state and step metrics."""
  jitter_rng = jax.random.fold_in(state.rng, state.step)
  # A separate stream, so turning dropout on leaves the jitter noise of a run unchanged.
  dropout_rng = jax.random.fold_in(jitter_rng, 1)
  bias = selection_bias(state, config)

  def loss_fn(params):
    logits, moe_stats = model.apply({"params": params}, batch["inputs"], train=True, selection_bias=bias,
                                    rngs={"jitter": jitter_rng, "dropout": dropout_rng})
    nll_sum, count = cross_entropy(logits, batch["targets"])
    ce = nll_sum / count
    aux, metrics = _moe_loss_and_metrics(moe_stats, config)
    return ce + aux, ({"ce_loss": ce, **metrics}, moe_stats)

  (loss, (metrics, moe_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.tree.norm(grads)
  updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)

  # Updates are checked too: corrupted optimizer moments give finite gradients but non-finite parameters.
  healthy = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
             & (state.nan_step < 0))
  keep_new = lambda new, old: jax.tree.map(lambda n, o: jnp.where(healthy, n, o), new, old)
  new_state = state.replace(
      step=jnp.where(healthy, state.step + 1, state.step),
      params=keep_new(new_params, state.params),
      opt_state=keep_new(new_opt_state, state.opt_state),
      nan_step=jnp.where((state.nan_step < 0) & ~healthy, state.step, state.nan_step),
  )
  if state.cluster_state is not None:
    updated = regroup.update_statistics(state.cluster_state, moe_stats.expert_token_count, moe_stats.expert_token_sum,
                                        config.model.hmoe.centroid_ema)
    if config.model.hmoe.bias_update_rate > 0:
      updated = regroup.update_selection_bias(updated, moe_stats.expert_token_count,
                                              config.model.hmoe.bias_update_rate)
    new_state = new_state.replace(cluster_state=keep_new(updated, state.cluster_state))
  if state.moe_selection_bias is not None:
    updated = update_balancing_bias(state.moe_selection_bias, moe_stats.expert_load, config.model.moe.bias_update_rate)
    new_state = new_state.replace(moe_selection_bias=keep_new(updated, state.moe_selection_bias))
  metrics.update(loss=loss, grad_norm=grad_norm, learning_rate=learning_rate_schedule(config.train)(state.step))
  return new_state, metrics


def recluster_step(state: TrainState, *, optimizer: optax.GradientTransformation, config: ExperimentConfig
                   ) -> TrainState:
  """Regroups the experts of every HMoE layer (`hmoe.regroup.recluster`); jitted on its own, outside train_step."""
  params, opt_state, cluster_state = regroup.recluster(state.params, state.opt_state, state.cluster_state, state.step,
                                                       config=config.model, optimizer=optimizer)
  return state.replace(params=params, opt_state=opt_state, cluster_state=cluster_state)


def selection_bias(state: TrainState, config: ExperimentConfig) -> jax.Array | None:
  """Auxiliary-loss-free selection biases, [num_moe_layers, E] or [num_hmoe_layers, G, M]; None when they are off."""
  if state.moe_selection_bias is not None:
    return state.moe_selection_bias
  if state.cluster_state is None or config.model.hmoe.bias_update_rate <= 0:
    return None
  return state.cluster_state.selection_bias_LxGxM(config.model.hmoe.num_clusters)


def eval_step(params: Any, batch: Batch, bias: jax.Array | None = None, *, model: TransformerLM) -> Metrics:
  """Summed NLL and token count of one padded eval batch ({"inputs", "targets", "weights"})."""
  logits, moe_stats = model.apply({"params": params}, batch["inputs"], train=False, selection_bias=bias)
  nll_sum, count = cross_entropy(logits, batch["targets"], batch["weights"])
  metrics = {"nll_sum": nll_sum, "num_tokens": count}
  if moe_stats is not None:
    metrics["num_dropped"] = jnp.sum(moe_stats.num_dropped)
  return metrics
