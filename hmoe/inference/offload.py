"""Offloaded inference: routed experts live in host memory, a bounded device cache holds the ones in use.

`OffloadedModel(config, params, routing_state, OffloadConfig(...))` runs a `TransformerLM` (float or compressed
params, `hmoe.inference.storage`) layer by layer. Everything but the routed experts (embeddings, attention, norms,
routers, shared experts, dense FFNs) stays on the device. Each routed layer's expert parameters are cut into *units*
that move whole between host and device:
- standard MoE, mode "expert": one expert's gate/up/down;
- HMoE, mode "cluster": one cluster's bases and its members' residual factors;
- HMoE, mode "residual": bases stay resident, one expert's (INT4) residual factors move.
A routed layer runs as: attention and the router on the device -> the host reads the chosen units (a few ints) ->
`hmoe.inference.residency.Residency` says which to copy into which cache slot (and in how many waves, when the budget
holds fewer units than the step needs) -> the experts run on the cache with the route's indices mapped to slots and the
gates of units outside the wave zeroed -> the waves' outputs are summed. The expert math is the layer's own
(`sort_path_forward`, `hmoe_group_forward`), so outputs equal the resident model's up to float summation order.

Prefetch: while layer l's experts run, the next routed layer's router is applied to layer l's residual stream (with
the next layer's FFN norm), and the units it picks are copied ahead. It changes which copies happen when, never what
is computed.

Memory: where the backend has memory kinds (GPU, TPU, and JAX's CPU client), host units are arrays in `pinned_host`
memory and the cache lives in `device` memory, so on an accelerator the device holds only the cache. On CPU both kinds
are the same RAM: the engine then runs the same code path and its accounting (`resident_expert_bytes`, the byte size
of the cache arrays plus resident bases) is what the budget bounds.

Axis alphabet as in `hmoe.routing`; U units of one layer, S cache slots.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from hmoe.config import ModelConfig
from hmoe.inference import storage
from hmoe.inference.generate import Generator, decoding_config
from hmoe.inference.quantize import fake_quantize, group_for
from hmoe.inference.residency import POLICIES, SCOPES, Residency, TraceEvent, Wave
from hmoe.model.hierarchical import hmoe_group_forward
from hmoe.model.layers import SWIGLU_MATRICES, CausalSelfAttention, DenseFeedForward, RMSNorm
from hmoe.model.moe import sort_path_forward
from hmoe.model.transformer import Block
from hmoe.routing import dispatch
from hmoe.routing.routers import HierarchicalRouter, Router
from hmoe.routing.state import RoutingState

MODES = {"moe": ("expert",), "hmoe": ("cluster", "residual")}


@dataclasses.dataclass(frozen=True)
class OffloadConfig:
  """Device budget for expert parameters and how the cache spends it.

  Exactly one of `budget_fraction` (of the model's stored expert bytes) and `budget_bytes` is set. The budget covers
  everything expert-related on the device: cache slots, plus the resident bases in "residual" mode.
  """

  budget_fraction: float | None = 1.0
  budget_bytes: int | None = None
  policy: str = "lru"  # hmoe.inference.residency.POLICIES
  scope: str = "global"  # One pool for all layers, or "per_layer" (the budget split evenly).
  mode: str | None = None  # None: "expert" for a MoE, "cluster" for an HMoE; or "residual" (HMoE).
  prefetch: bool = False

  def validate(self, routed_kind: str) -> None:
    if (self.budget_fraction is None) == (self.budget_bytes is None):
      raise ValueError("set exactly one of budget_fraction and budget_bytes")
    if self.budget_fraction is not None and not 0 < self.budget_fraction <= 1:
      raise ValueError(f"budget_fraction={self.budget_fraction} must be in (0, 1]")
    if self.budget_bytes is not None and self.budget_bytes <= 0:
      raise ValueError(f"budget_bytes={self.budget_bytes} must be > 0")
    if self.policy not in POLICIES:
      raise ValueError(f"policy={self.policy!r} must be one of {POLICIES}")
    if self.scope not in SCOPES:
      raise ValueError(f"scope={self.scope!r} must be one of {SCOPES}")
    if self.mode is not None and self.mode not in MODES[routed_kind]:
      raise ValueError(f"mode={self.mode!r} does not apply to a {routed_kind} model; choose from {MODES[routed_kind]}")


def _take(tree: Any, *index: int) -> Any:
  return jax.tree.map(lambda leaf: leaf[index], tree)


def _memory(device: jax.Device, kind: str) -> SingleDeviceSharding:
  kinds = {memory.kind for memory in device.addressable_memories()}
  return SingleDeviceSharding(device, memory_kind=kind if kind in kinds else None)


@functools.partial(jax.jit, donate_argnums=0)
def _write_slot(slots: Any, slot: jax.Array, unit: Any) -> Any:
  """`slots[slot] = unit` in place (the cache is donated): one compiled copy per unit structure."""
  return jax.tree.map(lambda pool, leaf: pool.at[slot].set(leaf), slots, unit)


class _Functions(NamedTuple):
  embed: Callable
  dense_block: Callable
  pre: Callable
  wave: Callable
  finish: Callable
  logits: Callable


@functools.lru_cache(maxsize=16)
def _compiled(cfg: ModelConfig, mode: str) -> _Functions:
  # Not a method: engines of one model config and mode share the compiled functions (tests build dozens of them).
  kind = cfg.routed_kind
  dtype = jnp.dtype(cfg.dtype)
  routed = cfg.routed

  def router(router_params, normed_BxLxD, bias):
    x_GxTxD = dispatch.split_groups(normed_BxLxD, 1)
    if kind == "moe":
      return Router(routed.num_experts, routed.top_k).apply({"params": router_params}, x_GxTxD, train=False,
                                                              selection_bias_E=bias)
    bias_GxM = None if bias is None else bias.reshape(routed.num_clusters, routed.experts_per_cluster)
    return HierarchicalRouter(routed.num_clusters, routed.experts_per_cluster, routed.top_k_clusters,
                              routed.top_k_experts).apply({"params": router_params}, x_GxTxD, train=False,
                                                          selection_bias_GxM=bias_GxM)

  def units_of(route):
    if mode == "expert":
      return route.expert_index.reshape(-1)
    if mode == "cluster":
      return route.cluster_index.reshape(-1)
    return route.expert_index.reshape(-1)  # Global (cluster-major) expert ids.

  def attend(block, cache, x_BxLxD, positions_BxL):
    variables = {"params": block["attention"]} if cache is None else {"params": block["attention"], "cache": cache}
    normed = RMSNorm(dtype=dtype).apply({"params": block["attention_norm"]}, x_BxLxD)
    attended, mutated = CausalSelfAttention(cfg.num_heads, cfg.rope_base, dtype, cache_len=cfg.max_len).apply(
        variables, normed, positions_BxL, mutable=["cache"])
    return x_BxLxD + attended, mutated["cache"]

  def pre(block, cache, x_BxLxD, positions_BxL, bias, next_block, next_bias):
    """Attention, FFN norm and router of a routed layer; the next routed layer's predicted units."""
    block, next_block = storage.materialize(block), storage.materialize(next_block)
    x_BxLxD, cache = attend(block, cache, x_BxLxD, positions_BxL)
    normed = RMSNorm(dtype=dtype).apply({"params": block["ffn_norm"]}, x_BxLxD)
    route = router(block[kind]["router"], normed, bias)
    predicted = None
    if next_block is not None:
      next_normed = RMSNorm(dtype=dtype).apply({"params": next_block["ffn_norm"]}, x_BxLxD)
      predicted = units_of(router(next_block[kind]["router"], next_normed, next_bias))
    return x_BxLxD, normed, route, units_of(route), predicted, cache

  def wave(slots, bases, normed_BxLxD, route, wave_slot_W, position_U, present_U):
    """The routed output of the wave's units; the gates of every other unit are zero.

    Only the wave's W slots (`wave_slot_W`) are gathered and dequantized, not the whole pool; `position_U` is each
    unit's position among them.
    """
    weights = storage.materialize(jax.tree.map(lambda pool: pool[wave_slot_W], slots))
    x_GxTxD = dispatch.split_groups(normed_BxLxD, 1).astype(dtype)
    num_slots, slot_U = wave_slot_W.shape[0], position_U
    if mode == "expert":
      index = route.expert_index
      route = route.replace(expert_index=slot_U[index], gates=jnp.where(present_U[index], route.gates, 0.0))
      y, _ = sort_path_forward(x_GxTxD, route, [weights[f"w_{name}"].astype(dtype) for name in SWIGLU_MATRICES],
                               num_slots, None, routed.dropless_block_size)
      return y.reshape(normed_BxLxD.shape)
    members = routed.experts_per_cluster
    factors = {}
    for name in SWIGLU_MATRICES:
      u, v = weights[f"u_{name}"], weights[f"v_{name}"]
      if routed.qat_group_size:  # The model computes with fake-quantized factors: so must the cache.
        u = fake_quantize(u, group_for(u.shape[-2], routed.qat_group_size))
        v = fake_quantize(v, group_for(v.shape[-2], routed.qat_group_size))
      factors[name] = (u.reshape(-1, *u.shape[-2:]).astype(dtype), v.reshape(-1, *v.shape[-2:]).astype(dtype))
    if mode == "cluster":
      bases = {name: weights[f"base_{name}"].astype(dtype) for name in SWIGLU_MATRICES}
      index = route.cluster_index
      route = route.replace(cluster_index=slot_U[index],
                            gates=jnp.where(present_U[index][..., None], route.gates, 0.0))
      factor_rows = None
    else:
      bases = jax.tree.map(lambda base: base.astype(dtype), storage.materialize(bases))
      expert_GxTxKcxKe = route.cluster_index[..., None] * members + route.member_index
      route = route.replace(gates=jnp.where(present_U[expert_GxTxKcxKe], route.gates, 0.0))
      factor_rows = slot_U
    y, _ = dispatch.map_groups(hmoe_group_forward, (0, 0, None, None, None, None, None), x_GxTxD, route, bases,
                               factors, None, routed.block_size, factor_rows)
    return y.reshape(normed_BxLxD.shape)

  def finish(block, x_BxLxD, normed_BxLxD, routed_BxLxD):
    block = storage.materialize(block)
    y = routed_BxLxD * routed.routed_scale if routed.routed_scale != 1.0 else routed_BxLxD
    if cfg.shared_expert_ff:
      y = y + DenseFeedForward(cfg.shared_expert_ff, dtype).apply({"params": block["shared_expert"]}, normed_BxLxD)
    return x_BxLxD + y

  def dense_block(block, cache, x_BxLxD, positions_BxL):
    variables = {"params": storage.materialize(block)}
    if cache is not None:
      variables["cache"] = cache
    (x_BxLxD, _), mutated = Block(cfg, "dense").apply(variables, x_BxLxD, train=False, positions=positions_BxL,
                                                       mutable=["cache"])
    return x_BxLxD, mutated["cache"]

  def embed(trunk, tokens_BxL):
    return storage.materialize(trunk["embedding"]).astype(dtype)[tokens_BxL]

  def logits(trunk, x_BxLxD):
    x_BxLxD = RMSNorm(dtype=dtype).apply({"params": storage.materialize(trunk["final_norm"])}, x_BxLxD)
    if cfg.tie_embeddings:
      out = jnp.einsum("bld,vd->blv", x_BxLxD, storage.materialize(trunk["embedding"]).astype(dtype))
    else:
      out = jnp.einsum("bld,dv->blv", x_BxLxD, storage.materialize(trunk["unembed"]).astype(dtype))
    return out.astype(jnp.float32)

  return _Functions(*(jax.jit(fn) for fn in (embed, dense_block, pre, wave, finish, logits)))


class OffloadedModel:
  """A `TransformerLM` whose routed experts are offloaded (see the module docstring)."""

  def __init__(self, config: ModelConfig, params: Any, routing_state: RoutingState, offload: OffloadConfig,
               device: jax.Device | None = None):
    if config.routed_kind is None:
      raise ValueError("an all-dense model has no experts to offload")
    offload.validate(config.routed_kind)
    self.config = decoding_config(config)
    self.routed = self.config.routed
    self.offload = offload
    self.mode = offload.mode or MODES[config.routed_kind][0]
    self.kind = config.routed_kind
    self.device = device or jax.devices()[0]
    on_device, on_host = _memory(self.device, "device"), _memory(self.device, "pinned_host")
    self._on_device = on_device
    self.routing_state = jax.device_put(routing_state, on_device)
    self.routed_layers = list(self.config.routed_layers)

    # Split every routed layer's expert parameters into host units (and resident bases in "residual" mode).
    trunk = dict(params)
    self._host_units, resident_bases = [], []
    for layer in self.routed_layers:
      block = dict(params[f"block_{layer}"])
      layer_params = dict(block[self.kind])
      experts = {name: leaf for name, leaf in layer_params.items() if name != "router"}
      block[self.kind] = {"router": layer_params["router"]}
      trunk[f"block_{layer}"] = block
      if self.mode == "residual":
        resident_bases.append({name: experts.pop(f"base_{name}") for name in SWIGLU_MATRICES})
      self._host_units.append([jax.device_put(unit, on_host) for unit in self._units_of(experts)])
    self.trunk = jax.device_put(trunk, on_device)
    self.resident_bases = jax.device_put(resident_bases, on_device)
    self.units_per_layer = len(self._host_units[0])
    self.unit_bytes = storage.stored_nbytes(self._host_units[0][0])
    self.resident_base_bytes = storage.stored_nbytes(resident_bases)
    self.expert_bytes = self.resident_base_bytes + self.unit_bytes * self.units_per_layer * len(self.routed_layers)

    budget = (offload.budget_bytes if offload.budget_bytes is not None
              else int(offload.budget_fraction * self.expert_bytes))
    unit_name = {"expert": "expert", "cluster": "cluster", "residual": "expert's residual factors"}[self.mode]
    free_bytes = budget - self.resident_base_bytes
    min_units = len(self.routed_layers) if offload.scope == "per_layer" else 1
    if free_bytes < min_units * self.unit_bytes:
      resident = f" beside {self.resident_base_bytes} bytes of resident bases" if self.resident_base_bytes else ""
      raise ValueError(f"expert budget of {budget} bytes is smaller than the smallest legal one: {min_units} x one "
                       f"{unit_name} ({self.unit_bytes} bytes){resident}")
    self.residency = Residency(len(self.routed_layers), self.units_per_layer, free_bytes // self.unit_bytes,
                               offload.policy, offload.scope)  # type: ignore[arg-type]
    template = self._host_units[0][0]
    self.slots = [jax.device_put(jax.tree.map(lambda leaf, n=n: jnp.zeros((n, *leaf.shape), leaf.dtype), template),
                                 on_device) for n in self.residency.slots_per_pool]
    self.trace: list[TraceEvent] = []
    self.load_seconds = 0.0
    for load in self.residency.preload():
      self._copy(load)
    self._fns = _compiled(self.config, self.mode)

  # --------------------------------------------------------------------------------------------------------------------
  # Units
  # --------------------------------------------------------------------------------------------------------------------

  def _units_of(self, experts: dict[str, Any]) -> list[Any]:
    """The layer's expert parameters cut into units (stored form, host arrays)."""
    if self.mode == "expert":
      count = self.routed.num_experts
      return [_take(experts, e) for e in range(count)]
    if self.mode == "cluster":
      return [_take(experts, g) for g in range(self.routed.num_clusters)]
    members = self.routed.experts_per_cluster
    return [_take(experts, e // members, e % members) for e in range(self.routed.num_experts)]

  @property
  def resident_expert_bytes(self) -> int:
    """Device bytes of expert parameters: the cache arrays plus resident bases (what the budget bounds)."""
    return storage.stored_nbytes(self.slots) + storage.stored_nbytes(self.resident_bases)

  def _copy(self, load) -> None:
    start = time.perf_counter()
    layer, index = load.key
    unit = jax.device_put(self._host_units[layer][index], self._on_device)
    pool = self.residency.pool_of(layer)
    self.slots[pool] = _write_slot(self.slots[pool], jnp.asarray(load.slot, jnp.int32), unit)
    self.load_seconds += time.perf_counter() - start

  def _wave_arrays(self, wave: Wave, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int32 [W] slots of the wave's units (padded with slot 0), int32 [U] position of each unit among them (0
    elsewhere) and bool [U] membership in the wave."""
    slot_W = np.zeros(width, np.int32)
    position_U = np.zeros(self.units_per_layer, np.int32)
    present_U = np.zeros(self.units_per_layer, bool)
    for position, ((_, index), slot) in enumerate(zip(wave.keys, wave.slots)):
      slot_W[position], position_U[index], present_U[index] = slot, position, True
    return slot_W, position_U, present_U

  # --------------------------------------------------------------------------------------------------------------------
  # Forward pass
  # --------------------------------------------------------------------------------------------------------------------

  def _bias(self, routed_index: int | None) -> jax.Array | None:
    bias = self.routing_state.selection_bias
    return None if bias is None or routed_index is None else bias[routed_index]

  def forward(self, tokens_BxL: jax.Array, positions_BxL: jax.Array, cache: dict[str, Any] | None
              ) -> tuple[jax.Array, dict[str, Any]]:
    """Logits [B, L, V] and the updated key/value cache ({"block_i": the block's cache}, None before prefill)."""
    x = self._fns.embed(self.trunk, tokens_BxL)
    new_cache = {}
    for layer in range(self.config.num_layers):
      name = f"block_{layer}"
      block_cache = None if cache is None else cache[name]
      if layer not in self.routed_layers:
        x, new_cache[name] = self._fns.dense_block(self.trunk[name], block_cache, x, positions_BxL)
        continue
      r = self.routed_layers.index(layer)
      has_next = r + 1 < len(self.routed_layers)
      next_block = self.trunk[f"block_{self.routed_layers[r + 1]}"] if has_next else None
      attention_cache = None if block_cache is None else block_cache["attention"]
      x, normed, route, units, predicted, attention_cache = self._fns.pre(
          self.trunk[name], attention_cache, x, positions_BxL, self._bias(r), next_block,
          self._bias(r + 1 if has_next else None))
      new_cache[name] = {"attention": attention_cache}
      needed = list(dict.fromkeys(np.asarray(units).tolist()))  # The host reads the decisions: a few ints.
      self.trace.append(TraceEvent("request", r, tuple(needed)))
      routed_out = None
      waves = self.residency.request(r, needed)
      bases = self.resident_bases[r] if self.mode == "residual" else None
      for wave in waves:
        for load in wave.loads:
          self._copy(load)
        pool = self.residency.pool_of(r)
        # Static width: a wave holds at most min(slots, units, routed picks) units (one compile per width).
        width = min(self.residency.slots_per_pool[pool], self.units_per_layer, len(np.asarray(units)))
        out = self._fns.wave(self.slots[pool], bases, normed, route, *self._wave_arrays(wave, width))
        routed_out = out if routed_out is None else routed_out + out
      if has_next:
        prediction = tuple(dict.fromkeys(np.asarray(predicted).tolist()))
        self.trace.append(TraceEvent("prefetch", r + 1, prediction))
        if self.offload.prefetch:
          # Protect this step's units: its waves may still be running on the device.
          for load in self.residency.prefetch(r + 1, prediction, protected=[(r, unit) for unit in needed]):
            self._copy(load)
      x = self._fns.finish(self.trunk[name], x, normed, routed_out)
    return self._fns.logits(self.trunk, x), new_cache


class OffloadedGenerator(Generator):
  """`Generator` (same prompts, sampling and outputs) running on an `OffloadedModel`."""

  def __init__(self, engine: OffloadedModel, *, pad_id: int = 0):
    self.engine = engine
    self.config, self.pad_id = engine.config, pad_id
    self.params, self.routing_state = None, engine.routing_state
    self._sample = jax.jit(lambda logits, rng, sampler: sampler(logits, rng), static_argnums=2)

  def run_prefill(self, tokens_BxP, lengths_B):
    tokens_BxP = jnp.asarray(tokens_BxP)
    positions_BxP = jnp.broadcast_to(jnp.arange(tokens_BxP.shape[1]), tokens_BxP.shape)
    logits_BxPxV, cache = self.engine.forward(tokens_BxP, positions_BxP, None)
    last = jnp.take_along_axis(logits_BxPxV, (jnp.asarray(lengths_B) - 1)[:, None, None], axis=1)[:, 0]
    return last, cache

  def run_decode_step(self, cache, tokens_B, positions_B):
    logits_Bx1xV, cache = self.engine.forward(jnp.asarray(tokens_B)[:, None], jnp.asarray(positions_B)[:, None],
                                              cache)
    return logits_Bx1xV[:, 0], cache
