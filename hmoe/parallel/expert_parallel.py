"""Explicit expert-parallel dispatch: `jax.shard_map` over the mesh's (data, expert) axes with `all_to_all`.

Every device holds `T / n` of its data shard's tokens (n = size of the expert axis) and `E / n` experts (MoE) or
`G / n` whole clusters (HMoE: a cluster's base and its members' factors live on one shard). Per routed layer:
1. routing runs outside, as in the single-device layer (same decisions);
2. each device sorts its assignments by *destination shard* into a `[n, C, D]` send buffer of fixed capacity C per
   shard (`dispatch.plan_capacity` over shards; assignments past C are dropped and counted exactly), with the
   assignment's local expert (MoE) or local cluster, members and gates (HMoE) beside it;
3. `all_to_all` over the expert axis: device j receives the rows every device sent to shard j;
4. the local experts run on the received rows with the layer's own math (`sort_path_forward` dropless over the local
   experts, or `hmoe_group_forward` over the local clusters);
5. `all_to_all` back, and each device combines its tokens' returned rows with their gates.
A standard MoE token sends one row per chosen expert (k rows, to up to k shards); an HMoE token one row per chosen
cluster (Kc rows, Kc = 1 by default), its Ke experts computed on the cluster's shard. `communication_bytes` gives
what crosses the expert axis from the buffer shapes.

Capacity per destination shard: C = ceil(capacity_factor * t * picks / n) for t local tokens (at most t * picks).
The model axis must have size 1 (tensor parallelism inside experts is not combined with this path).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hmoe.routing import dispatch
from hmoe.routing.routers import HierarchicalRouterOutput, RouterOutput

EXPERT_AXIS = "expert"


def expert_axis_size() -> int:
  """Size of the expert axis of the current mesh (`jax.set_mesh`), 1 without one."""
  mesh = jax.sharding.get_abstract_mesh()
  return dict(mesh.shape).get(EXPERT_AXIS, 1) if mesh is not None and mesh.shape else 1


def check_mesh(config, mesh_shape: dict[str, int]) -> None:
  """Names what makes a routed config unusable with expert parallelism on this mesh (before anything compiles)."""
  shards = mesh_shape.get(EXPERT_AXIS, 1)
  owner = "num_clusters" if config.clusters_experts else "num_experts"  # What one shard holds whole.
  owners = getattr(config, owner)
  if owners % shards:
    raise ValueError(f"expert parallelism places whole {owner[4:]} on shards: {config.section}.{owner}={owners} must "
                     f"be divisible by the expert-axis size {shards}")
  if mesh_shape.get("model", 1) != 1:
    raise ValueError(f"expert parallelism needs a model axis of size 1, got {mesh_shape['model']}")
  data = mesh_shape.get("data", 1)
  if config.num_groups % data:
    raise ValueError(f"expert parallelism gives every data shard its own routing groups: {config.section}.num_groups="
                     f"{config.num_groups} must be a multiple of the data-axis size {data}")


def _tokens_per_device(x_GxTxD: jax.Array) -> int:
  """Local tokens of one device; names the shapes a mesh cannot split evenly."""
  mesh_shape = dict(jax.sharding.get_abstract_mesh().shape)
  data, shards = mesh_shape.get("data", 1), mesh_shape.get(EXPERT_AXIS, 1)
  num_groups, num_tokens, _ = x_GxTxD.shape
  if num_groups % data or num_tokens % shards:
    raise ValueError(f"expert parallelism splits the {num_groups} routing groups over data={data} and each group's "
                     f"{num_tokens} tokens over expert={shards}: set num_groups to a multiple of the data axis and a "
                     f"batch whose tokens per group divide by the expert axis")
  return (num_groups // data) * (num_tokens // shards)


def shard_capacity(tokens_per_device: int, picks: int, shards: int, capacity_factor: float) -> int:
  """Send-buffer rows per destination shard."""
  rows = tokens_per_device * picks
  return int(min(rows, max(1, math.ceil(capacity_factor * rows / shards))))


def metadata_bytes(kind: str, top_k_experts: int = 0) -> tuple[int, int]:
  """(non-differentiable, float) metadata bytes per send-buffer row: MoE the local expert id and a valid flag; HMoE
  the local cluster id, the Ke member ids and gates, and the valid flag."""
  if kind == "moe":
    return 4 + 1, 0
  return 4 + 4 * top_k_experts + 1, 4 * top_k_experts


def communication_bytes(*, shards: int, capacity: int, width: int, activation_bytes: int, tokens_per_device: int,
                        metadata: tuple[int, int]) -> dict[str, float]:
  """What one routed layer hands to all_to_all, from the buffer shapes.

  Per device and step: forward = the dispatch buffer `[n, C, D]` plus its metadata, and the returned rows; backward =
  the transposed all_to_alls of the rows both ways and of the float metadata (integer metadata has no gradient). Of
  each buffer the block a device sends to itself stays local, so (n - 1) / n of it crosses the expert axis; the
  `*_per_token` entries are that crossing volume per local token.
  """
  rows = shards * capacity
  int_meta, float_meta = metadata
  forward = rows * (2 * width * activation_bytes + int_meta + float_meta)
  backward = rows * (2 * width * activation_bytes + float_meta)
  crossing = (shards - 1) / shards / tokens_per_device
  return {"forward_bytes_per_device": forward, "backward_bytes_per_device": backward,
          "forward_per_token": forward * crossing, "backward_per_token": backward * crossing}


def exchanged_bytes(fn, *args) -> int:
  """Bytes one device hands to `all_to_all` when `fn(*args)` runs: the operand sizes of every all_to_all in its
  jaxpr (recursively through shard_map, jit, custom derivatives; a `jax.grad` of `fn` includes the transposes)."""

  def walk(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "all_to_all":
        total += sum(math.prod(var.aval.shape) * var.aval.dtype.itemsize for var in eqn.invars)
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            total += walk(inner)
    return total

  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def _exchange(x_SxCxD: jax.Array) -> jax.Array:
  """Row block s goes to shard s; the result's block s came from shard s."""
  return jax.lax.all_to_all(x_SxCxD, EXPERT_AXIS, 0, 0, tiled=False)


def _send_buffers(x_NxD: jax.Array, dest_NxK: jax.Array, shards: int, capacity: int, *payloads: jax.Array):
  """Rows of `x` (and per-assignment payloads [N, K, ...]) sorted into `[shards, C, ...]` buffers."""
  plan = dispatch.plan_capacity(dest_NxK, shards, capacity)
  rows_x = dispatch.gather_rows(x_NxD, plan).reshape(shards, capacity, -1)
  buffers = []
  for payload in payloads:  # Assignment-indexed (k-major, as the plan): scatter into the rows they occupy.
    flat = jnp.swapaxes(payload, 0, 1).reshape(-1, *payload.shape[2:])
    empty = jnp.zeros((plan.num_rows + 1, *flat.shape[1:]), flat.dtype)
    buffers.append(empty.at[plan.row].set(flat)[:plan.num_rows].reshape(shards, capacity, *flat.shape[1:]))
  valid = jnp.zeros((plan.num_rows + 1,), bool).at[plan.row].set(plan.kept)[:plan.num_rows]
  return plan, rows_x, valid.reshape(shards, capacity), buffers


def _moe_local(x_NxD, expert_NxK, gates_NxK, weights, *, shards, capacity, block_size, sort_path_forward):
  experts_per_shard = weights[0].shape[0]
  plan, send_x, send_valid, (send_expert,) = _send_buffers(x_NxD, expert_NxK // experts_per_shard, shards, capacity,
                                                           expert_NxK % experts_per_shard)
  recv_x, recv_expert, recv_valid = _exchange(send_x), _exchange(send_expert), _exchange(send_valid)
  rows = shards * capacity
  local_route = RouterOutput(expert_index=recv_expert.reshape(1, rows, 1),
                             gates=recv_valid.reshape(1, rows, 1).astype(jnp.float32),
                             probs=jnp.zeros((1, rows, experts_per_shard)), balance_loss=jnp.zeros(()),
                             z_loss=jnp.zeros(()))
  y_rows, _ = sort_path_forward(recv_x.reshape(1, rows, -1), local_route, weights, experts_per_shard, None,
                                block_size)
  back = _exchange(y_rows.reshape(shards, capacity, -1)).reshape(rows, -1)
  return dispatch.combine_rows(back, plan, gates_NxK), plan.kept


def moe_forward(x_GxTxD: jax.Array, route: RouterOutput, weights: Sequence[jax.Array], capacity_factor: float,
                block_size: int) -> tuple[jax.Array, jax.Array]:
  """Expert-parallel standard MoE: output [G, T, D] and kept mask [G, T, K] (see the module docstring)."""
  from hmoe.model.moe import sort_path_forward  # The layer imports this module; import its math lazily.

  shards = expert_axis_size()
  top_k = route.expert_index.shape[-1]
  tokens_per_device = _tokens_per_device(x_GxTxD)
  capacity = shard_capacity(tokens_per_device, top_k, shards, capacity_factor)

  def local(x, expert_index, gates, *local_weights):
    g, t, width = x.shape
    y, kept = _moe_local(x.reshape(g * t, width), expert_index.reshape(g * t, -1), gates.reshape(g * t, -1),
                         local_weights, shards=shards, capacity=capacity, block_size=block_size,
                         sort_path_forward=sort_path_forward)
    return y.reshape(g, t, width), jnp.swapaxes(kept.reshape(-1, g * t), 0, 1).reshape(g, t, -1)

  tokens = P("data", EXPERT_AXIS, None)
  experts = P(EXPERT_AXIS, None, None)
  return jax.shard_map(local, in_specs=(tokens, tokens, tokens, experts, experts, experts),
                       out_specs=(tokens, tokens))(x_GxTxD, route.expert_index, route.gates, *weights)


def _hmoe_local(x_NxD, route_arrays, bases, factors, *, shards, capacity, block_size, members, group_forward):
  cluster_NxKc, member_NxKcxKe, gates_NxKcxKe = route_arrays
  clusters_per_shard = bases["gate"].shape[0]
  plan, send_x, send_valid, (send_cluster, send_members, send_gates) = _send_buffers(
      x_NxD, cluster_NxKc // clusters_per_shard, shards, capacity, cluster_NxKc % clusters_per_shard, member_NxKcxKe,
      gates_NxKcxKe)
  recv = [_exchange(buffer) for buffer in (send_x, send_cluster, send_members, send_gates, send_valid)]
  recv_x, recv_cluster, recv_members, recv_gates, recv_valid = recv
  rows = shards * capacity
  top_ke = member_NxKcxKe.shape[-1]
  gates = recv_gates.reshape(rows, 1, top_ke) * recv_valid.reshape(rows, 1, 1).astype(recv_gates.dtype)
  zeros = jnp.zeros(())
  local_route = HierarchicalRouterOutput(
      cluster_index=recv_cluster.reshape(rows, 1), member_index=recv_members.reshape(rows, 1, top_ke), gates=gates,
      cluster_probs=jnp.zeros((rows, clusters_per_shard)), expert_probs=jnp.zeros((rows, 1, members)),
      cluster_balance_loss=zeros, balance_loss=zeros, z_loss=zeros)
  y_rows, _ = group_forward(recv_x.reshape(rows, -1), local_route, bases, factors, None, block_size)
  back = _exchange(y_rows.reshape(shards, capacity, -1)).reshape(rows, -1)
  ones = jnp.ones(cluster_NxKc.shape, back.dtype)  # Gates were applied per expert on the cluster's shard.
  return dispatch.combine_rows(back, plan, ones), plan.kept


def hmoe_forward(x_GxTxD: jax.Array, route: HierarchicalRouterOutput, bases: dict[str, jax.Array],
                 factors: dict[str, tuple[jax.Array, jax.Array]], capacity_factor: float, block_size: int
                 ) -> tuple[jax.Array, jax.Array]:
  """Expert-parallel HMoE: whole clusters per shard; output [G, T, D] and kept mask [G, T, Kc]."""
  from hmoe.model.hierarchical import hmoe_group_forward

  shards = expert_axis_size()
  top_kc = route.cluster_index.shape[-1]
  members = route.expert_probs.shape[-1]
  tokens_per_device = _tokens_per_device(x_GxTxD)
  capacity = shard_capacity(tokens_per_device, top_kc, shards, capacity_factor)
  names = list(bases)

  def local(x, cluster_index, member_index, gates, *weights):
    g, t, width = x.shape
    local_bases = dict(zip(names, weights[:len(names)]))
    u_v = weights[len(names):]
    local_factors = {name: (u_v[2 * i], u_v[2 * i + 1]) for i, name in enumerate(names)}
    flat = lambda a: a.reshape(g * t, *a.shape[2:])  # noqa: E731
    y, kept = _hmoe_local(x.reshape(g * t, width), (flat(cluster_index), flat(member_index), flat(gates)),
                          local_bases, local_factors, shards=shards, capacity=capacity, block_size=block_size,
                          members=members, group_forward=hmoe_group_forward)
    return y.reshape(g, t, width), jnp.swapaxes(kept.reshape(-1, g * t), 0, 1).reshape(g, t, -1)

  tokens = P("data", EXPERT_AXIS, None)
  per_assignment = P("data", EXPERT_AXIS, None, None)
  owned = P(EXPERT_AXIS, None, None)  # Bases [G, I, O] by cluster, factors [E, I, R] cluster-major: same blocks.
  weights = [bases[name] for name in names] + [m for name in names for m in factors[name]]
  return jax.shard_map(local, in_specs=(tokens, tokens, per_assignment, per_assignment, *[owned] * len(weights)),
                       out_specs=(tokens, tokens))(x_GxTxD, route.cluster_index, route.member_index, route.gates,
                                                   *weights)
