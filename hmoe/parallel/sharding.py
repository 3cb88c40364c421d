"""Device mesh and the one table mapping logical axis names to mesh axes.

Mesh axes: `data` (batch and routing groups), `expert` (the expert axis of expert weights), `model` (tensor
parallelism of hidden widths and vocabulary). On one device every axis has size 1 and everything is replicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "expert", "model")

LOGICAL_AXIS_RULES = (
    ("batch", "data"),
    ("length", None),
    ("embed", None),
    ("vocab", "model"),
    ("heads", "model"),
    ("kv", None),
    ("qkv", None),
    ("mlp", "model"),
    ("expert", "expert"),
    # Cluster-major HMoE parameters: a cluster's base and its members' factors live on the same expert shard, so
    # stage-2 dispatch never leaves the device that holds the cluster.
    ("cluster", "expert"),
    ("member", None),
    ("rank", None),
)


def make_mesh(mesh_shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh over `MESH_AXES`; one entry of `mesh_shape` may be -1 and is filled with all remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  shape = list(mesh_shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh_shape={tuple(mesh_shape)} needs one size per axis {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh_shape={tuple(mesh_shape)} may contain at most one -1")
  known = int(np.prod([size for size in shape if size != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh_shape={tuple(mesh_shape)} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  needed = int(np.prod(shape))
  if needed > len(devices):
    raise ValueError(f"mesh_shape={tuple(shape)} needs {needed} devices, found {len(devices)}")
  # A fully specified shape may use fewer devices than exist (e.g. a one-device run on a multi-device host).
  return Mesh(np.asarray(devices[:needed]).reshape(shape), MESH_AXES)


def logical_shardings(boxed_tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a tree whose leaves are `nn.LogicallyPartitioned` boxes (or plain arrays: replicated)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
