"""Tiny configs and dummy batches shared by tests, notebooks and benchmarks."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hmoe.config import DataConfig, ExperimentConfig, ModelConfig, MoEConfig, TrainConfig
from hmoe.train import state as state_lib


def tiny_config(**model_overrides) -> ExperimentConfig:
  """A 2-layer dense+MoE model (D=32, 4 experts, top-2) that compiles and steps in about a second on CPU."""
  model = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, d_ff=64, max_len=16,
                      ffn_pattern="dense,moe", moe=MoEConfig(num_experts=4, top_k=2, expert_ff=32))
  model = dataclasses.replace(model, **model_overrides)
  config = ExperimentConfig(
      model=model,
      data=DataConfig(seq_len=16, batch_size=8, eval_batch_size=8),
      train=TrainConfig(num_steps=10, learning_rate=1e-2, warmup_steps=2, log_every=1, eval_every=5,
                        checkpoint_every=5, mesh_shape=(1, 1, 1)),
  )
  config.validate()
  return config


def dummy_batch(config: ExperimentConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """Random tokens of the config's batch shape; targets are inputs shifted by one, as in real batches."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, config.model.vocab_size, (config.data.batch_size, config.data.seq_len + 1), np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def init_params(module: nn.Module, *args: Any, seed: int = 0, **kwargs: Any) -> Any:
  """`module.init(PRNGKey(seed), *args, **kwargs)["params"]`, jitted and unboxed: run op by op, the init of a model
  with an HMoE layer takes about 20 s on CPU; compiled, about one."""
  init = jax.jit(lambda key, *inputs: module.init(key, *inputs, **kwargs))
  return nn.meta.unbox(init(jax.random.PRNGKey(seed), *args)["params"])


def init_train_state(model: nn.Module, optimizer: Any, config: ExperimentConfig) -> Any:
  """`hmoe.train.state.init_train_state`, jitted: op by op it takes about 20 s for a tiny HMoE model on CPU."""
  return jax.jit(functools.partial(state_lib.init_train_state, model, optimizer, config))()


def random_layer_params(layer: nn.Module, x: jax.Array, seed: int,
                        stddev: Callable[[str, tuple[int, ...]], float]) -> Any:
  """Parameters of `layer`'s structure (from `eval_shape`, no eager init pass: that is slow) filled with normals of
  `stddev(leaf name, shape)`, drawn from numpy with `seed`."""
  shapes = nn.meta.unbox(jax.eval_shape(lambda: layer.init(jax.random.PRNGKey(0), x, train=True)))
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.asarray(stddev(path[-1].key, leaf.shape) * rng.normal(size=leaf.shape), jnp.float32),
      shapes)


def assert_close(name: str, actual: Any, expected: Any, atol: float, rtol: float) -> None:
  """`np.testing.assert_allclose` in float64 whose failure message names the quantity and its max |difference|."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol,
                             err_msg=f"{name}: max |diff| = {np.max(np.abs(actual - expected)):.3g}")


def layer_outputs_and_grads(layer: nn.Module, params: Any, x: jax.Array, **kwargs: Any) -> tuple[Any, Any, Any]:
  """A routed layer's (output, stats, grads of sum(sin(output)) w.r.t. (params, x)), in one jitted call."""

  def loss(params, x):
    y, stats = layer.apply(params, x, **kwargs)
    return jnp.sum(jnp.sin(y)), (y, stats)

  (_, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
  return y, stats, grads
