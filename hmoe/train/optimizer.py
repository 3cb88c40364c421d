"""AdamW with warmup + cosine decay, decoupled weight decay on matrices, global-norm clipping, fan-in lr scaling."""

from __future__ import annotations

from typing import Any

import jax
import optax

from hmoe.config import TrainConfig


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine decay to `learning_rate * min_lr_ratio`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
      decay_steps=config.num_steps, end_value=config.learning_rate * config.min_lr_ratio)


def decay_mask(params: Any) -> Any:
  # No weight decay on norm scales (1-d); matrices, embeddings and routers are decayed.
  return jax.tree.map(lambda p: p.ndim > 1, params)


# SwiGLU output projections [..., F, D]: dense and MoE `w_down`, and the HMoE's shared `base_down` (the bulk of its
# experts' down matrix; the rank-R factors keep lr x1, as LoRA-style adapters do).
_OUTPUT_PROJECTIONS = ("w_down", "base_down")


def fan_in_lr_multipliers(params: Any, base_fan_in: int) -> Any:
  """Per-leaf learning-rate multipliers: base_fan_in / fan_in for SwiGLU output projections, else 1.

  muP for Adam: an update of size lr per entry moves a layer's output by about lr * fan_in, so a routed expert of
  width 256 learns 4x slower in function space than a dense FFN of width 1024 at the same lr. Scaling its lr by
  1024 / 256 restores the dense rate. `w_down` is [..., F, D] (dense [F, D], experts [E, F, D], HMoE bases [G, F, D]):
  fan_in is F.
  """
  def multiplier(path, leaf) -> float:
    name = getattr(path[-1], "key", None)
    return base_fan_in / leaf.shape[-2] if name in _OUTPUT_PROJECTIONS else 1.0

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
                  weight_decay=config.weight_decay, mask=decay_mask),
  ]
  if config.fan_in_lr_base:
    transforms.append(scale_by_fan_in(config.fan_in_lr_base))
  return optax.chain(*transforms)
