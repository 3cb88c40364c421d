"""Sharding on 8 fake CPU devices: a sharded train step matches the single-device one; pod config shapes."""

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

from experiments.configs import pod
from hmoe.config import HMoEConfig, MoEConfig, from_config_dict
from hmoe.model.param_counts import parameter_counts
from hmoe.model.transformer import TransformerLM
from hmoe.parallel import sharding
from hmoe.testing import dummy_batch, tiny_config
from hmoe.train import optimizer as optimizer_lib, state as state_lib, step as step_lib


def _state_and_step(config, mesh, optimizer):
  model = TransformerLM(config.model)
  abstract_boxed = jax.eval_shape(functools.partial(state_lib.init_boxed_train_state, model, optimizer, config))
  state_sharding = sharding.logical_shardings(abstract_boxed, mesh)
  init = jax.jit(functools.partial(state_lib.init_train_state, model, optimizer, config), out_shardings=state_sharding)
  train_fn = jax.jit(functools.partial(step_lib.train_step, model=model, optimizer=optimizer, config=config),
                     in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                     out_shardings=(state_sharding, None))
  return init, train_fn, state_sharding


def test_make_mesh_fills_one_axis_and_names_bad_shapes():
  assert jax.device_count() == 8
  assert dict(sharding.make_mesh((-1, 2, 1)).shape) == {"data": 4, "expert": 2, "model": 1}
  assert sharding.make_mesh((1, 1, 1)).devices.size == 1
  with pytest.raises(ValueError, match=r"\(3, 1, -1\)"):
    sharding.make_mesh((3, 1, -1))
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh((4, 4, 1))


_HMOE = HMoEConfig(num_experts=8, num_clusters=2, rank=4, expert_ff=32, block_size=8, bias_update_rate=0.01)


@pytest.mark.parametrize("kind, mesh_shape", [("moe", (8, 1, 1)), ("moe", (2, 2, 2)), ("hmoe", (2, 2, 2))])
def test_sharded_train_step_matches_single_device(kind, mesh_shape):
  # One routing group per data shard, as on a pod; biases on, so the routing state is compared too.
  if kind == "moe":
    config = tiny_config(moe=MoEConfig(num_experts=4, top_k=2, expert_ff=32, num_groups=mesh_shape[0],
                                       bias_update_rate=0.01))
  else:
    config = tiny_config(ffn_pattern="dense,hmoe", hmoe=dataclasses.replace(_HMOE, num_groups=mesh_shape[0]))
  # Plain SGD at learning rate 1 after clipping: each step moves the params by exactly minus the clipped gradient, so
  # the comparison checks gradients at full size (AdamW's m / sqrt(v) would amplify reduction-order noise in
  # near-zero gradients into sign flips of whole updates).
  optimizer = optax.chain(optax.clip_by_global_norm(config.train.grad_clip_norm), optax.sgd(1.0))
  batches = [dummy_batch(config, seed) for seed in range(2)]
  with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    results = []
    for shape in ((1, 1, 1), mesh_shape):
      mesh = sharding.make_mesh(shape, jax.devices()[: int(np.prod(shape))])
      with jax.set_mesh(mesh):
        init, train_fn, state_sharding = _state_and_step(config, mesh, optimizer)
        state = init()
        initial = jax.device_get(state.params)
        losses = []
        for batch in batches:
          state, step_metrics = train_fn(state, batch)
          losses.append(float(step_metrics["loss"]))
        moved = jax.tree.map(lambda new, old: new - old, jax.device_get(state.params), initial)
        results.append((moved, jax.device_get(state.routing_state), losses))
      if shape == mesh_shape and mesh_shape[1] > 1:
        if kind == "moe":
          spec = state_sharding.params["block_1"]["moe"]["w_gate"].spec
          assert spec == PartitionSpec("expert", None, "model"), spec
        else:
          spec = state_sharding.params["block_1"]["hmoe"]["u_gate"].spec
          assert spec == PartitionSpec("expert", None, None, None), spec
  (moved_single, routing_single, loss_single), (moved_sharded, routing_sharded, loss_sharded) = results
  scale = max(float(np.max(np.abs(leaf))) for leaf in jax.tree.leaves(moved_single))
  assert scale > 1e-3  # The steps really moved the parameters.
  # Two steps of summed gradients, equal up to float32 reduction order.
  chex.assert_trees_all_close(moved_sharded, moved_single, atol=2e-6, rtol=1e-4)
  chex.assert_trees_all_close(routing_sharded, routing_single, atol=1e-6, rtol=1e-5)
  np.testing.assert_allclose(loss_sharded, loss_single, rtol=1e-5)


def test_pod_config_shapes_without_memory():
  config = from_config_dict(pod.get_config())
  model, optimizer = TransformerLM(config.model), optimizer_lib.make_optimizer(config.train)
  abstract = jax.eval_shape(functools.partial(state_lib.init_train_state, model, optimizer, config))
  counts = parameter_counts(abstract.params, config.model)
  assert 6.9e9 < counts["params_total"] < 7.1e9, counts
  assert 0.55e9 < counts["params_active"] < 0.6e9, counts
  chex.assert_shape(abstract.params["block_1"]["moe"]["w_down"], (64, 2816, 1024))
  abstract_boxed = jax.eval_shape(functools.partial(state_lib.init_boxed_train_state, model, optimizer, config))
  mesh = sharding.make_mesh((1, 8, 1))
  shardings = sharding.logical_shardings(abstract_boxed, mesh)
  assert shardings.params["block_1"]["moe"]["w_down"].spec == PartitionSpec("expert", "model", None)
  assert shardings.opt_state[1][0].mu["block_1"]["moe"]["w_down"].spec == PartitionSpec("expert", "model", None)


def test_pod_hmoe_config_shapes_counts_and_cluster_sharding_without_memory():
  config = from_config_dict(pod.get_config("hmoe"))
  model, optimizer = TransformerLM(config.model), optimizer_lib.make_optimizer(config.train)
  abstract = jax.eval_shape(functools.partial(state_lib.init_train_state, model, optimizer, config))
  counts = parameter_counts(abstract.params, config.model)
  moe_config = from_config_dict(pod.get_config("moe"))
  moe_abstract = jax.eval_shape(functools.partial(state_lib.init_train_state, TransformerLM(moe_config.model),
                                                  optimizer_lib.make_optimizer(moe_config.train), moe_config))
  moe_counts = parameter_counts(moe_abstract.params, moe_config.model)
  # Per HMoE layer: G full bases + E rank-R factor pairs instead of E full experts:
  # expert params = 3 (G D F + E R (D + F)) = 3 (16*1024*2816 + 64*64*3840) over 12 layers.
  assert counts["params_expert"] == 12 * 3 * (16 * 1024 * 2816 + 64 * 64 * (1024 + 2816))
  # Expert-parameter ratio to the standard MoE = 1/M + R (D + F) / (D F) = 0.25 + 0.085.
  np.testing.assert_allclose(counts["params_expert"] / moe_counts["params_expert"],
                             1 / 4 + 64 * (1024 + 2816) / (1024 * 2816), rtol=1e-9)
  assert moe_counts["params_total"] - counts["params_total"] == moe_counts["params_expert"] - counts["params_expert"]
  chex.assert_shape(abstract.params["block_1"]["hmoe"]["base_down"], (16, 2816, 1024))
  chex.assert_shape(abstract.params["block_1"]["hmoe"]["u_gate"], (16, 4, 1024, 64))
  chex.assert_shape(abstract.routing_state.clusters.centroid, (12, 64, 1024))
  abstract_boxed = jax.eval_shape(functools.partial(state_lib.init_boxed_train_state, model, optimizer, config))
  shardings = sharding.logical_shardings(abstract_boxed, sharding.make_mesh((1, 8, 1)))
  hmoe_shardings = shardings.params["block_1"]["hmoe"]
  assert hmoe_shardings["base_gate"].spec == PartitionSpec("expert", None, "model")
  assert hmoe_shardings["v_up"].spec == PartitionSpec("expert", None, None, "model")
  assert hmoe_shardings["router"]["kernel"].spec == PartitionSpec(None, "expert", None)
