"""Which offloaded units (experts, clusters or residual factors) occupy the device cache: policies and accounting.

Pure Python, no arrays: the live engine (`hmoe.inference.offload`) asks a `Residency` what to load where and then moves
the bytes; `replay` runs the very same decisions on a recorded trace, so its counts equal the live engine's by
construction, and a trace from one small run can be replayed at many budgets and policies.

A *unit* is keyed `(layer, index)`. A layer's step asks for the units its tokens routed to (`request`); the answer is
a list of *waves*: each wave names resident units only, and the step computes the wave's units, then the next. A
budget smaller than one step's units therefore still gives exact outputs (the step runs in several waves), and the
smallest legal budget is one unit. Within a request, units already resident are used in the first wave and protected
from eviction there.

Policies (which resident unit makes room for a missing one):
- "lru": the least recently used (requested or prefetched) unit;
- "lfu": the unit requested least often since the engine started (counts survive eviction, so a unit that was hot
  comes back hot), ties broken by least recent use;
- "all": every unit resident from the start (the budget must hold all of them); nothing ever moves after that.
`scope="global"` shares one pool of slots among all layers (units of all layers must have one size);
`scope="per_layer"` splits the slots evenly, each layer evicting only its own units.

Prefetch (`prefetch(layer, units)`): units predicted for the coming layer are loaded ahead of its request, evicting
by the policy but never a unit protected by the current step. A later request that finds a prefetched, not yet used
unit counts as a prefetch hit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Literal

POLICIES = ("lru", "lfu", "all")
SCOPES = ("global", "per_layer")

Key = tuple[int, int]


@dataclasses.dataclass
class ResidencyStats:
  """Counts since the start (or the last `reset_stats`); loads include prefetch loads."""

  requests: int = 0  # Units asked for by layer steps.
  hits: int = 0  # ... of which were resident when asked for.
  loads: int = 0  # Host-to-device unit copies.
  prefetch_loads: int = 0
  prefetch_hits: int = 0  # Requests served by a unit a prefetch loaded (and nothing had used since).
  evictions: int = 0
  waves: int = 0  # Expert computations run (one per wave).

  @property
  def hit_rate(self) -> float:
    return self.hits / self.requests if self.requests else 1.0

  def as_dict(self) -> dict[str, float]:
    return {**dataclasses.asdict(self), "hit_rate": self.hit_rate}


@dataclasses.dataclass(frozen=True)
class Load:
  key: Key
  slot: int  # Slot of the key's pool.
  evicted: Key | None


@dataclasses.dataclass(frozen=True)
class Wave:
  keys: tuple[Key, ...]  # Units this wave computes, all resident while it runs...
  slots: tuple[int, ...]  # ... in these slots (a later wave of the same request may reuse them).
  loads: tuple[Load, ...]  # Copies to make before it runs.


class _Pool:
  """Slots of one pool and the bookkeeping of the units in them."""

  def __init__(self, num_slots: int, policy: str):
    self.policy = policy
    self.slot_of: dict[Key, int] = {}
    self.free = list(range(num_slots - 1, -1, -1))  # Popped from the end: slot 0 first.

  def victim(self, protected: set[Key], last_use: dict[Key, int], frequency: dict[Key, int]) -> Key | None:
    candidates = [key for key in self.slot_of if key not in protected]
    if not candidates:
      return None
    if self.policy == "lfu":
      return min(candidates, key=lambda key: (frequency.get(key, 0), last_use.get(key, -1)))
    return min(candidates, key=lambda key: last_use.get(key, -1))


class Residency:
  """Cache decisions for `num_layers` layers of `units_per_layer` units in `num_slots` slots (see the module doc)."""

  def __init__(self, num_layers: int, units_per_layer: int, num_slots: int, policy: Literal["lru", "lfu", "all"],
               scope: Literal["global", "per_layer"] = "global"):
    if policy not in POLICIES:
      raise ValueError(f"policy={policy!r} must be one of {POLICIES}")
    if scope not in SCOPES:
      raise ValueError(f"scope={scope!r} must be one of {SCOPES}")
    if num_layers < 1 or units_per_layer < 1:
      raise ValueError(f"need >= 1 layer and unit, got {num_layers} layers of {units_per_layer} units")
    total = num_layers * units_per_layer
    min_slots = num_layers if scope == "per_layer" else 1
    if num_slots < min_slots:
      raise ValueError(f"the budget holds {num_slots} units; {scope} residency needs at least {min_slots} (one unit "
                       f"per {'layer' if scope == 'per_layer' else 'pool'})")
    if policy == "all" and num_slots < total:
      raise ValueError(f"policy 'all' keeps all {total} units resident but the budget holds only {num_slots}")
    self.num_layers, self.units_per_layer, self.policy, self.scope = num_layers, units_per_layer, policy, scope
    num_slots = min(num_slots, total)  # More slots than units would never be used.
    if scope == "global":
      self.pools = [_Pool(num_slots, policy)]
      self.slots_per_pool = [num_slots]
    else:
      per_layer = min(num_slots // num_layers, units_per_layer)
      self.pools = [_Pool(per_layer, policy) for _ in range(num_layers)]
      self.slots_per_pool = [per_layer] * num_layers
    self.stats = ResidencyStats()
    self._tick = 0
    self._last_use: dict[Key, int] = {}
    self._frequency: dict[Key, int] = {}
    self._prefetched: set[Key] = set()

  @property
  def num_slots(self) -> int:
    return sum(self.slots_per_pool)

  def pool_of(self, layer: int) -> int:
    return 0 if self.scope == "global" else layer

  def resident(self, layer: int) -> dict[int, int]:
    """{unit index: slot} of the layer's resident units."""
    return {key[1]: slot for key, slot in self.pools[self.pool_of(layer)].slot_of.items() if key[0] == layer}

  def reset_stats(self) -> None:
    self.stats = ResidencyStats()

  def _touch(self, key: Key) -> None:
    self._tick += 1
    self._last_use[key] = self._tick

  def _place(self, key: Key, protected: set[Key]) -> Load | None:
    """Makes `key` resident (free slot first, else the policy's victim); None if every slot is protected."""
    pool = self.pools[self.pool_of(key[0])]
    evicted = None
    if pool.free:
      slot = pool.free.pop()
    else:
      evicted = pool.victim(protected, self._last_use, self._frequency)
      if evicted is None:
        return None
      slot = pool.slot_of.pop(evicted)
      self._prefetched.discard(evicted)
      self.stats.evictions += 1
    pool.slot_of[key] = slot
    self.stats.loads += 1
    return Load(key, slot, evicted)

  def preload(self) -> list[Load]:
    """Policy "all": loads every unit once (not counted as traffic of any step)."""
    if self.policy != "all":
      return []
    loads = [self._place((layer, index), set()) for layer in range(self.num_layers)
             for index in range(self.units_per_layer)]
    self.stats = ResidencyStats()
    return loads

  def request(self, layer: int, units: Iterable[int]) -> list[Wave]:
    """The waves that compute `units` (distinct unit indices of `layer`, in first-use order)."""
    keys = [(layer, int(index)) for index in dict.fromkeys(units)]
    if any(not 0 <= key[1] < self.units_per_layer for key in keys):
      raise ValueError(f"unit index out of range [0, {self.units_per_layer}) in {[key[1] for key in keys]}")
    pool = self.pools[self.pool_of(layer)]
    for key in keys:
      self._frequency[key] = self._frequency.get(key, 0) + 1
    self.stats.requests += len(keys)
    resident = [key for key in keys if key in pool.slot_of]
    self.stats.hits += len(resident)
    self.stats.prefetch_hits += sum(key in self._prefetched for key in resident)
    self._prefetched.difference_update(keys)
    missing = [key for key in keys if key not in pool.slot_of]
    for key in resident:
      self._touch(key)
    waves, protected = [], set(resident)
    current, slots, loads = list(resident), [pool.slot_of[key] for key in resident], []
    for key in missing:
      load = self._place(key, protected)
      if load is None:  # Every slot holds a unit of this wave: run it, then continue in a new one.
        waves.append(Wave(tuple(current), tuple(slots), tuple(loads)))
        current, slots, loads, protected = [], [], [], set()
        load = self._place(key, protected)
      current.append(key)
      slots.append(load.slot)
      loads.append(load)
      protected.add(key)
      self._touch(key)  # Used now: within a request, the units of earlier waves are older.
    waves.append(Wave(tuple(current), tuple(slots), tuple(loads)))
    self.stats.waves += len(waves)
    return waves

  def prefetch(self, layer: int, units: Iterable[int], protected: Iterable[Key] = ()) -> list[Load]:
    """Loads the predicted `units` of `layer` that are not resident, never evicting a `protected` key."""
    if self.policy == "all":
      return []
    keep = set(protected)
    loads = []
    for index in dict.fromkeys(units):
      key = (layer, int(index))
      if key in self.pools[self.pool_of(layer)].slot_of:
        continue
      load = self._place(key, keep)
      if load is None:
        break
      keep.add(key)
      loads.append(load)
      self._prefetched.add(key)
      self._touch(key)
      self.stats.prefetch_loads += 1
    return loads


@dataclasses.dataclass(frozen=True)
class TraceEvent:
  """One decision the engine asked for: a layer step's units, or a prefetch's prediction for a layer."""

  kind: Literal["request", "prefetch"]
  layer: int
  units: tuple[int, ...]


def replay(events: Sequence[TraceEvent], *, num_layers: int, units_per_layer: int, num_slots: int, policy: str,
           scope: str = "global", prefetch: bool = False) -> ResidencyStats:
  """The counts a live engine with these settings would have produced on the recorded `events`.

  Prefetch events replay only with `prefetch=True`; a prefetch is protected against evicting the units of the
  request just before it (the live engine's current step), as in the engine.
  """
  residency = Residency(num_layers, units_per_layer, num_slots, policy, scope)  # type: ignore[arg-type]
  residency.preload()
  last_request: tuple[Key, ...] = ()
  for event in events:
    if event.kind == "request":
      residency.request(event.layer, event.units)
      last_request = tuple((event.layer, unit) for unit in event.units)
    elif prefetch:
      residency.prefetch(event.layer, event.units, protected=last_request)
  return residency.stats
