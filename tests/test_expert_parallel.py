"""Expert-parallel dispatch on 8 fake CPU devices: equals the single-device layer (outputs and gradients), exact drop
counts when a shard's capacity binds, communication from the exchanged buffers, train step and regroup, bad meshes."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import pod
from hmoe.config import HMoEConfig, MoEConfig, from_config_dict
from hmoe.model.hierarchical import HMoEFeedForward
from hmoe.model.moe import MoEFeedForward
from hmoe.model.transformer import TransformerLM
from hmoe.parallel import expert_parallel, sharding
from hmoe.routing.routers import HierarchicalRouter, Router
from hmoe.testing import dummy_batch, init_params, tiny_config
from hmoe.train import optimizer as optimizer_lib, state as state_lib, step as step_lib

_X = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 32))
_LAYERS = {
    "moe": (MoEFeedForward, MoEConfig(num_experts=8, top_k=2, expert_ff=16, dropless=True)),
    "hmoe": (HMoEFeedForward, HMoEConfig(num_experts=16, num_clusters=8, rank=4, expert_ff=16, dropless=True,
                                         block_size=8)),
}


def _loss(layer, params, x):
  y, stats = layer.apply({"params": params}, x, train=True)
  return jnp.sum(jnp.sin(y)), (y, stats.num_dropped)


@functools.cache
def _layer(kind, data, **overrides):
  layer_cls, config = _LAYERS[kind]
  config = dataclasses.replace(config, num_groups=data, **overrides)
  params = init_params(layer_cls(config), _X, train=True)
  return layer_cls(config), layer_cls(dataclasses.replace(config, expert_parallel=True)), params


@pytest.mark.parametrize("kind", ["moe", "hmoe"])
@pytest.mark.parametrize("mesh_shape", [(2, 4, 1), (1, 8, 1)])
def test_expert_parallel_layer_equals_single_device_outputs_and_gradients(kind, mesh_shape):
  single, parallel, params = _layer(kind, mesh_shape[0])
  grad = lambda layer: jax.jit(jax.value_and_grad(functools.partial(_loss, layer), has_aux=True))  # noqa: E731
  (_, (y_ref, dropped_ref)), g_ref = grad(single)(params, _X)
  with jax.set_mesh(sharding.make_mesh(mesh_shape)):
    (_, (y, dropped)), g = grad(parallel)(params, _X)
    lowered = jax.jit(functools.partial(_loss, parallel)).lower(params, _X).as_text()
  assert "all_to_all" in lowered  # The explicit path ran, not the automatic partitioner.
  assert int(dropped) == int(dropped_ref) == 0  # Dropless: every row of a device may go to one shard.
  chex.assert_trees_all_close(y, y_ref, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(g, g_ref, atol=1e-5, rtol=1e-4)


def _moe_oracle(params, config, x, shards, data, capacity):
  """numpy: per device, assignments k-major into per-destination-shard slots; output of the kept ones."""
  groups = x.reshape(data, -1, x.shape[-1])
  route = Router(config.num_experts, config.top_k).apply({"params": params["router"]}, groups, train=True)
  index, gates = np.asarray(route.expert_index), np.asarray(route.gates)
  w = [np.asarray(params[name], np.float64) for name in ("w_gate", "w_up", "w_down")]
  per_shard = config.num_experts // shards
  xs = np.asarray(groups, np.float64)
  y = np.zeros_like(xs)
  dropped = 0
  for g in range(data):
    chunk = xs.shape[1] // shards
    for device in range(shards):  # The tokens of device (g, device).
      tokens = range(device * chunk, (device + 1) * chunk)
      used = np.zeros(shards, int)
      for k in range(config.top_k):
        for t in tokens:
          e = index[g, t, k]
          used[e // per_shard] += 1
          if used[e // per_shard] > capacity:
            dropped += 1
            continue
          hidden = (lambda a: a / (1 + np.exp(-a)))(xs[g, t] @ w[0][e]) * (xs[g, t] @ w[1][e])
          y[g, t] += gates[g, t, k] * (hidden @ w[2][e])
  return y.reshape(x.shape), dropped


@pytest.mark.parametrize("mesh_shape", [(2, 4, 1), (1, 8, 1)])
def test_drops_are_exact_when_a_shards_capacity_binds(mesh_shape):
  data, shards = mesh_shape[:2]
  _, parallel, params = _layer("moe", data, dropless=False, capacity_factor=0.5)
  with jax.set_mesh(sharding.make_mesh(mesh_shape)):
    _, (y, dropped) = jax.jit(functools.partial(_loss, parallel))(params, _X)
  tokens_per_device = _X.shape[0] * _X.shape[1] // (data * shards)
  capacity = expert_parallel.shard_capacity(tokens_per_device, 2, shards, 0.5)
  y_ref, dropped_ref = _moe_oracle(params, parallel.config, _X, shards, data, capacity)
  assert int(dropped) == dropped_ref > 0
  np.testing.assert_allclose(y, y_ref, atol=1e-4, rtol=1e-4)


def test_hmoe_drops_count_cluster_rows_past_each_shards_capacity():
  mesh_shape = (2, 4, 1)
  _, parallel, params = _layer("hmoe", 2, dropless=False, capacity_factor=0.5)
  with jax.set_mesh(sharding.make_mesh(mesh_shape)):
    _, (_, dropped) = jax.jit(functools.partial(_loss, parallel))(params, _X)
  cfg = parallel.config
  groups = _X.reshape(2, -1, _X.shape[-1])
  route = HierarchicalRouter(cfg.num_clusters, cfg.experts_per_cluster, cfg.top_k_clusters, cfg.top_k_experts).apply(
      {"params": params["router"]}, groups, train=True)
  clusters = np.asarray(route.cluster_index)[..., 0]  # [G, T], Kc = 1.
  shard = clusters // (cfg.num_clusters // 4)
  capacity = expert_parallel.shard_capacity(8, 1, 4, 0.5)
  expected = sum(max(0, int(np.sum(shard[g, d * 8:(d + 1) * 8] == s)) - capacity)
                 for g in range(2) for d in range(4) for s in range(4))
  assert int(dropped) == expected > 0


@pytest.mark.parametrize("kind", ["moe", "hmoe"])
def test_communication_accounting_equals_the_exchanged_buffers(kind):
  mesh_shape = (2, 4, 1)
  _, parallel, params = _layer(kind, 2, dropless=False, capacity_factor=1.0)
  tokens_per_device = _X.shape[0] * _X.shape[1] // 8  # 8 tokens per device.
  picks = 2 if kind == "moe" else 1
  capacity = expert_parallel.shard_capacity(tokens_per_device, picks, 4, 1.0)
  assert capacity == (4 if kind == "moe" else 2)  # ceil(8 tokens x picks / 4 shards).
  metadata = expert_parallel.metadata_bytes(kind, top_k_experts=2)
  expected = expert_parallel.communication_bytes(shards=4, capacity=capacity, width=32, activation_bytes=4,
                                                 tokens_per_device=tokens_per_device, metadata=metadata)
  # By hand, MoE: 4 shards x 4 rows x (32 floats there + 32 back = 256 bytes + int32 expert + bool valid).
  if kind == "moe":
    assert expected["forward_bytes_per_device"] == 16 * (256 + 5) and expected["backward_bytes_per_device"] == 16 * 256
  with jax.set_mesh(sharding.make_mesh(mesh_shape)):
    forward = expert_parallel.exchanged_bytes(functools.partial(_loss, parallel), params, _X)
    # Gradients w.r.t. the inputs too, as for a layer inside a model: both row exchanges are transposed.
    both = expert_parallel.exchanged_bytes(jax.grad(lambda p, x: _loss(parallel, p, x)[0], argnums=(0, 1)), params, _X)
  assert forward == expected["forward_bytes_per_device"]
  assert both == expected["forward_bytes_per_device"] + expected["backward_bytes_per_device"]
  assert expected["forward_per_token"] == pytest.approx(forward * 3 / 4 / tokens_per_device)


def _train_setup(config, mesh):
  model = TransformerLM(config.model)
  optimizer = optimizer_lib.make_optimizer(config.train)
  abstract = jax.eval_shape(functools.partial(state_lib.init_boxed_train_state, model, optimizer, config))
  state_sharding = sharding.logical_shardings(abstract, mesh)
  init = jax.jit(functools.partial(state_lib.init_train_state, model, optimizer, config), out_shardings=state_sharding)
  train_fn = jax.jit(functools.partial(step_lib.train_step, model=model, optimizer=optimizer, config=config),
                     in_shardings=(state_sharding, sharding.batch_sharding(mesh)), out_shardings=(state_sharding, None))
  return init, train_fn, optimizer


def test_train_step_and_regroup_with_expert_parallelism_equal_single_device():
  hmoe = HMoEConfig(num_experts=8, num_clusters=4, rank=4, expert_ff=16, block_size=8, dropless=True, num_groups=2,
                    recluster_every=1, min_gain=-1.0)
  base = tiny_config(ffn_pattern="dense,hmoe", hmoe=hmoe)
  base = dataclasses.replace(base, data=dataclasses.replace(base.data, batch_size=8))
  parallel = dataclasses.replace(base, model=dataclasses.replace(
      base.model, hmoe=dataclasses.replace(hmoe, expert_parallel=True)))
  batch = dummy_batch(base)
  results = []
  for config, mesh_shape in ((base, (1, 1, 1)), (parallel, (2, 4, 1))):
    mesh = sharding.make_mesh(mesh_shape)
    with jax.set_mesh(mesh):
      init, train_fn, optimizer = _train_setup(config, mesh)
      state, _ = train_fn(init(), batch)
      regroup = jax.jit(functools.partial(step_lib.recluster_step, config=config, optimizer=optimizer))
      results.append(jax.device_get(regroup(state)))
  chex.assert_trees_all_close(results[1].params, results[0].params, atol=2e-5, rtol=1e-4)
  chex.assert_trees_all_close(results[1].routing_state, results[0].routing_state, atol=2e-5, rtol=1e-4)


def test_pod_config_lowers_with_expert_parallelism():
  config = from_config_dict(pod.get_config("hmoe").to_dict())
  config = dataclasses.replace(config, model=dataclasses.replace(
      config.model, num_layers=2, hmoe=dataclasses.replace(config.model.hmoe, expert_parallel=True)))
  mesh = sharding.make_mesh(config.train.mesh_shape)
  expert_parallel.check_mesh(config.model.hmoe, dict(mesh.shape))
  model, optimizer = TransformerLM(config.model), optimizer_lib.make_optimizer(config.train)
  with jax.set_mesh(mesh):
    abstract = jax.eval_shape(functools.partial(state_lib.init_boxed_train_state, model, optimizer, config))
    state_sharding = sharding.logical_shardings(abstract, mesh)
    batch = {name: jax.ShapeDtypeStruct((config.data.batch_size, config.data.seq_len), jnp.int32)
             for name in ("inputs", "targets")}
    unboxed = jax.tree.map(lambda leaf: leaf.value if hasattr(leaf, "value") else leaf, abstract,
                           is_leaf=lambda leaf: hasattr(leaf, "value"))
    lowered = jax.jit(functools.partial(step_lib.train_step, model=model, optimizer=optimizer, config=config),
                      in_shardings=(state_sharding, sharding.batch_sharding(mesh))).lower(unboxed, batch)
  assert "all_to_all" in lowered.as_text()
  compiled = lowered.compile()  # Compiles for the fake mesh without allocating the model.
  assert compiled.memory_analysis() is None or compiled.memory_analysis().argument_size_in_bytes > 0


@pytest.mark.parametrize("config,mesh_shape,message", [
    (MoEConfig(num_experts=6), {"data": 2, "expert": 4, "model": 1}, "moe.num_experts=6 must be divisible by the "
                                                                     "expert-axis size 4"),
    (HMoEConfig(num_experts=12, num_clusters=6, expert_ff=32), {"data": 1, "expert": 4, "model": 1},
     "hmoe.num_clusters=6 must be divisible"),
    (MoEConfig(num_experts=8), {"data": 1, "expert": 4, "model": 2}, "model axis of size 1"),
    (MoEConfig(num_experts=8, num_groups=1), {"data": 2, "expert": 4, "model": 1},
     "moe.num_groups=1 must be a multiple of the data-axis size 2"),
])
def test_bad_meshes_are_named_before_compiling(config, mesh_shape, message):
  with pytest.raises(ValueError, match=message):
    expert_parallel.check_mesh(config, mesh_shape)


def test_a_mesh_larger_than_the_devices_and_indivisible_tokens_are_named():
  with pytest.raises(ValueError, match="needs 16 devices, found 8"):
    sharding.make_mesh((2, 8, 1))
  _, parallel, params = _layer("moe", 1)
  with jax.set_mesh(sharding.make_mesh((1, 8, 1))), pytest.raises(ValueError, match="tokens over expert=8"):
    jax.jit(functools.partial(_loss, parallel))(params, _X[:, :3])
