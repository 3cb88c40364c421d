"""Compressed storage of a trained model: 16-bit bases and trunk, packed INT4 residual factors or experts.

`compress(params, model_config, StorageConfig(...))` maps every leaf of a parameter tree to its stored form:
- HMoE residual factors `u_*` / `v_*`: INT4 with per-group scales along their input dimension
  (`hmoe.inference.quantize`; the group is `min(group_size, input dim)`, so rank-R factors are not padded to 64);
- HMoE bases `base_*`: `base_dtype` (bfloat16 or float16);
- standard MoE experts `w_*`: INT4 like the factors, or `expert_dtype` (so MoE and HMoE compare like for like);
- routers: float32 (they decide discrete choices, see `hmoe.routing.routers`);
- everything else (attention, embeddings, dense FFNs, shared experts): `trunk_dtype`; norm scales stay float32.
`materialize(tree)` turns a stored tree back into float32 parameters; call it inside the jitted function that uses
them, so the weights are dequantized there and no float32 copy of the model is kept between calls.

`save(directory, tree, ...)` writes one `.npz` of all arrays and a `manifest.json` (each leaf's path, kind and static
fields, the SHA-256 of every array, the model config) atomically; `load` verifies the digests and rebuilds the tree.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from hmoe.config import ExperimentConfig, ModelConfig, from_config_dict
from hmoe.inference.quantize import QuantizedTensor, dequantize, group_for, quantize
from hmoe.routing.state import init_routing_state

_FLOAT16 = ("bfloat16", "float16")
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class StorageConfig:
  base_dtype: str = "bfloat16"  # HMoE shared bases.
  expert_format: str = "int4"  # Standard MoE experts: "int4" or a 16-bit dtype.
  trunk_dtype: str = "bfloat16"  # Attention, embeddings, dense FFNs, shared experts: a 16-bit dtype or "float32".
  group_size: int = 64  # INT4 scale group along the input dimension.
  scale_dtype: str = "float16"

  def validate(self) -> None:
    if self.base_dtype not in _FLOAT16:
      raise ValueError(f"base_dtype={self.base_dtype!r} not in {_FLOAT16}")
    if self.expert_format not in ("int4", *_FLOAT16):
      raise ValueError(f"expert_format={self.expert_format!r} not in {('int4', *_FLOAT16)}")
    if self.trunk_dtype not in (*_FLOAT16, "float32"):
      raise ValueError(f"trunk_dtype={self.trunk_dtype!r} not in {(*_FLOAT16, 'float32')}")
    if self.group_size < 2 or self.group_size % 2:
      raise ValueError(f"group_size={self.group_size} must be an even number >= 2")


def _component(names: list[str], config: ModelConfig) -> str:
  """What a parameter is, by its path: residual / base / expert / router / norm / trunk."""
  leaf = names[-1]
  if config.routed_kind in names and leaf != "kernel" and "shared_expert" not in names:
    if leaf.startswith(("u_", "v_")):
      return "residual"
    if leaf.startswith("base_"):
      return "base"
    if leaf.startswith("w_"):
      return "expert"
  if "router" in names:
    return "router"
  return "norm" if leaf == "scale" else "trunk"


def _int4(leaf: jax.Array, config: StorageConfig) -> QuantizedTensor:
  return quantize(leaf, group_for(leaf.shape[-2], config.group_size), config.scale_dtype)


def compress(params: Any, model_config: ModelConfig, config: StorageConfig | None = None) -> Any:
  """The stored form of every parameter (see the module docstring); one compiled function per model and format."""
  config = config or StorageConfig()
  config.validate()
  return _compress(params, model_config, config)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _compress(params: Any, model_config: ModelConfig, config: StorageConfig) -> Any:

  def stored(path, leaf):
    component = _component([getattr(key, "key", "") for key in path], model_config)
    if component == "residual" or (component == "expert" and config.expert_format == "int4"):
      return _int4(leaf, config)
    if component == "base":
      return jnp.asarray(leaf, config.base_dtype)
    if component == "expert":
      return jnp.asarray(leaf, config.expert_format)
    if component in ("router", "norm"):
      return jnp.asarray(leaf, jnp.float32)
    return jnp.asarray(leaf, config.trunk_dtype)

  return jax.tree_util.tree_map_with_path(stored, params)


def _is_quantized(node: Any) -> bool:
  return isinstance(node, QuantizedTensor)


def materialize(tree: Any, dtype: jnp.dtype = jnp.float32) -> Any:
  """Float parameters from a stored tree (float trees pass through, cast to `dtype`). Jittable."""
  return jax.tree.map(lambda node: dequantize(node, dtype) if _is_quantized(node) else node.astype(dtype), tree,
                      is_leaf=_is_quantized)


def stored_nbytes(tree: Any) -> int:
  """Bytes of a stored (or float) tree: packed INT4 tensors count their packed values and scales. Abstract trees
  (`jax.eval_shape`) work too."""
  return sum(node.nbytes if _is_quantized(node) else int(np.prod(node.shape)) * jnp.dtype(node.dtype).itemsize
             for node in jax.tree.leaves(tree, is_leaf=_is_quantized))


def bytes_by_component(tree: Any, model_config: ModelConfig) -> dict[str, int]:
  """Stored bytes of each component (residual, base, expert, router, norm, trunk) and in total."""
  totals: dict[str, int] = {}
  for path, node in jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_quantized):
    component = _component([getattr(key, "key", "") for key in path], model_config)
    totals[component] = totals.get(component, 0) + stored_nbytes(node)
  totals["total"] = sum(totals.values())
  return totals


def _digest(array: np.ndarray) -> str:
  return hashlib.sha256(f"{array.dtype.str}{array.shape}".encode() + np.ascontiguousarray(array).tobytes()).hexdigest()


def save(directory: str | pathlib.Path, params: Any, routing_state: Any, config: ExperimentConfig,
         storage: StorageConfig, *, step: int = 0, extra_files: dict[str, pathlib.Path] | None = None) -> None:
  """Writes stored `params` (from `compress`) and the routing state to a new directory, atomically: it appears whole
  or not at all. `config` is the run's experiment config; `extra_files` are copied in (e.g. the tokenizer)."""
  directory = pathlib.Path(directory)
  tree = {"params": params, "routing_state": flax.serialization.to_state_dict(routing_state)}
  if directory.exists():
    raise FileExistsError(f"{directory} exists; compressed exports are written to a new directory")
  arrays, entries = {}, []
  for index, (path, node) in enumerate(jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_quantized)):
    entry = {"path": [getattr(key, "key", str(key)) for key in path]}
    if _is_quantized(node):
      arrays[f"{index}.packed"], arrays[f"{index}.scale"] = np.asarray(node.packed), np.asarray(node.scale)
      entry.update(kind="int4", in_dim=node.in_dim, group_size=node.group_size, arrays=[f"{index}.packed",
                                                                                        f"{index}.scale"])
    else:
      arrays[f"{index}"] = np.asarray(node)
      entry.update(kind="array", arrays=[f"{index}"])
    entries.append(entry)
  # numpy has no bfloat16 in .npz: store 16-bit floats as their raw uint16 bits, with the dtype in the manifest.
  dtypes = {name: str(array.dtype) for name, array in arrays.items()}
  raw = {name: array.view(np.uint16) if str(array.dtype) == "bfloat16" else array for name, array in arrays.items()}
  manifest = {"format_version": FORMAT_VERSION, "step": step, "config": dataclasses.asdict(config),
              "storage": dataclasses.asdict(storage), "leaves": entries, "dtypes": dtypes,
              "sha256": {name: _digest(array) for name, array in raw.items()}}
  directory.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
  try:
    np.savez(staging / "arrays.npz", **raw)
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for name, source in (extra_files or {}).items():
      shutil.copy(source, staging / name)
    os.replace(staging, directory)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def load(directory: str | pathlib.Path) -> tuple[Any, Any, dict[str, Any]]:
  """(stored params, routing state, manifest) of a directory written by `save`.

  A damaged, truncated or foreign export raises a ValueError naming the file.
  """
  directory = pathlib.Path(directory)
  manifest_path, arrays_path = directory / "manifest.json", directory / "arrays.npz"
  if not manifest_path.is_file() or not arrays_path.is_file():
    raise FileNotFoundError(f"{directory} is not a compressed export (needs manifest.json and arrays.npz)")
  try:
    manifest = json.loads(manifest_path.read_text())
    with np.load(arrays_path) as stored:
      raw = {name: stored[name] for name in stored.files}
  except Exception as error:  # A truncated .npz raises several types (BadZipFile, EOFError, ValueError, ...).
    raise ValueError(f"{directory} is damaged ({type(error).__name__}: {error})") from None
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{manifest_path} has format {manifest.get('format_version')}, this hmoe reads {FORMAT_VERSION}")
  bad = sorted(name for name, digest in manifest["sha256"].items()
               if name not in raw or _digest(raw[name]) != digest)
  if bad:
    raise ValueError(f"{arrays_path} fails its SHA-256 check for arrays {bad[:5]}")
  arrays = {name: raw[name].view(jnp.bfloat16) if manifest["dtypes"][name] == "bfloat16" else raw[name]
            for name in raw}
  tree: dict[str, Any] = {}
  for entry in manifest["leaves"]:
    if entry["kind"] == "int4":
      packed, scale = (jnp.asarray(arrays[name]) for name in entry["arrays"])
      node = QuantizedTensor(packed=packed, scale=scale, in_dim=entry["in_dim"], group_size=entry["group_size"])
    else:
      node = jnp.asarray(arrays[entry["arrays"][0]])
    target = tree
    for key in entry["path"][:-1]:
      target = target.setdefault(key, {})
    target[entry["path"][-1]] = node
  model_config = from_config_dict(manifest["config"]).model
  # Fields that were None (e.g. no balancing biases) have no arrays: they take the template's None.
  template = init_routing_state(model_config)
  saved = tree.get("routing_state", {})
  state_dict = {key: saved.get(key, value) for key, value in flax.serialization.to_state_dict(template).items()}
  routing_state = flax.serialization.from_state_dict(template, state_dict)
  return tree["params"], routing_state, manifest
