"""Cache decisions of the offloading engine on hand-made traces: eviction order, waves, scopes, prefetch, errors."""

import pytest

from hmoe.inference.residency import Residency, TraceEvent, replay


def _resident(residency, layer=0):
  return set(residency.resident(layer))


def test_lru_evicts_the_least_recently_used_unit():
  cache = Residency(1, 6, 3, "lru")
  for unit in (0, 1, 2):
    cache.request(0, [unit])
  cache.request(0, [0])  # 1 is now the least recent.
  (wave,) = cache.request(0, [3])
  assert [load.evicted for load in wave.loads] == [(0, 1)]
  assert _resident(cache) == {0, 2, 3}
  (wave,) = cache.request(0, [4])  # Then 2.
  assert [load.evicted for load in wave.loads] == [(0, 2)]
  assert cache.stats.requests == 6 and cache.stats.hits == 1 and cache.stats.evictions == 2


def test_lfu_evicts_the_least_frequently_requested_unit_with_counts_that_survive_eviction():
  cache = Residency(1, 6, 2, "lfu")
  for unit in (0, 0, 0, 1, 2):  # 2 evicts 1 (1 request), not 0 (3 requests), although 0 was used longer ago.
    cache.request(0, [unit])
  assert _resident(cache) == {0, 2}
  cache.request(0, [1])  # 1 (2 requests now) comes back and evicts 2 (1 request), not 0 (3 requests).
  assert _resident(cache) == {0, 1}
  cache.request(0, [3])  # 1 has 2 requests, 0 has 3: 1 goes.
  assert _resident(cache) == {0, 3}
  cache.request(0, [1])  # 1 now has 3 requests, 3 has 1: 3 goes although it was used more recently than 0.
  assert _resident(cache) == {0, 1}


def test_lfu_breaks_ties_by_least_recent_use():
  cache = Residency(1, 4, 2, "lfu")
  cache.request(0, [0])
  cache.request(0, [1])
  cache.request(0, [2])  # 0 and 1 asked once each: the older, 0, goes.
  assert _resident(cache) == {1, 2}


def test_a_request_larger_than_the_cache_runs_in_waves_that_each_fit():
  cache = Residency(1, 8, 3, "lru")
  cache.request(0, [6])
  waves = cache.request(0, [6, 0, 1, 2, 3, 4])
  computed = [key[1] for wave in waves for key in wave.keys]
  assert sorted(computed) == [0, 1, 2, 3, 4, 6]  # Every unit exactly once...
  assert waves[0].keys[0] == (0, 6) and not any(load.key == (0, 6) for load in waves[0].loads)  # ...the hit first.
  for wave in waves:
    assert len(wave.keys) <= 3 and len(set(wave.slots)) == len(wave.slots)
    assert {load.key for load in wave.loads} <= set(wave.keys)
  assert cache.stats.waves == 1 + len(waves) and len(waves) == 2


def test_smallest_budget_of_one_slot_still_computes_everything():
  cache = Residency(2, 4, 1, "lfu")
  waves = cache.request(1, [3, 1, 2])
  assert [wave.keys for wave in waves] == [((1, 3),), ((1, 1),), ((1, 2),)]
  assert all(wave.slots == (0,) for wave in waves)


def test_per_layer_scope_keeps_layers_apart_and_global_scope_shares():
  per_layer = Residency(2, 4, 4, "lru", scope="per_layer")
  assert per_layer.slots_per_pool == [2, 2]
  per_layer.request(0, [0, 1])
  per_layer.request(1, [0, 1, 2])  # Layer 1 needs a wave more but never evicts layer 0.
  assert _resident(per_layer, 0) == {0, 1}
  shared = Residency(2, 4, 4, "lru")
  shared.request(0, [0, 1])
  shared.request(1, [0, 1, 2])
  assert len(_resident(shared, 0)) == 1 and _resident(shared, 1) == {0, 1, 2}


def test_policy_all_preloads_and_never_moves_again():
  cache = Residency(2, 3, 6, "all")
  assert len(cache.preload()) == 6 and cache.stats.loads == 0
  for layer, units in ((0, [2, 1]), (1, [0]), (1, [2, 1, 0])):
    (wave,) = cache.request(layer, units)
    assert not wave.loads
  assert cache.stats.hit_rate == 1.0
  with pytest.raises(ValueError, match="all 6 units resident but the budget holds only 5"):
    Residency(2, 3, 5, "all")


def test_prefetch_never_evicts_protected_units_and_its_hits_are_counted():
  cache = Residency(2, 4, 3, "lru")
  cache.request(0, [0, 1])
  loads = cache.prefetch(1, [2, 3], protected=[(0, 0), (0, 1)])  # Room for one: the other would evict layer 0.
  assert [load.key for load in loads] == [(1, 2)] and cache.stats.prefetch_loads == 1
  assert _resident(cache, 0) == {0, 1}
  cache.request(1, [2])
  assert cache.stats.prefetch_hits == 1 and cache.stats.hits == 1
  cache.request(1, [2])  # A second use is an ordinary hit.
  assert cache.stats.prefetch_hits == 1 and cache.stats.hits == 2


def test_replay_counts_requests_and_prefetches():
  events = [TraceEvent("request", 0, (0, 1)), TraceEvent("prefetch", 1, (2,)), TraceEvent("request", 1, (2, 3)),
            TraceEvent("prefetch", 0, (0,)), TraceEvent("request", 0, (0,))]
  without = replay(events, num_layers=2, units_per_layer=4, num_slots=8, policy="lru")
  with_prefetch = replay(events, num_layers=2, units_per_layer=4, num_slots=8, policy="lru", prefetch=True)
  assert (without.requests, without.hits, without.loads) == (5, 1, 4)
  assert (with_prefetch.hits, with_prefetch.prefetch_hits, with_prefetch.loads) == (2, 1, 4)


@pytest.mark.parametrize("kwargs,message", [
    ({"num_slots": 0}, "needs at least 1"),
    ({"num_slots": 1, "scope": "per_layer"}, "needs at least 2"),
    ({"num_slots": 4, "policy": "fifo"}, "policy='fifo'"),
    ({"num_slots": 4, "scope": "node"}, "scope='node'"),
])
def test_bad_settings_are_named(kwargs, message):
  settings = {"policy": "lru", **kwargs}
  with pytest.raises(ValueError, match=message):
    Residency(2, 4, **settings)


def test_unknown_unit_is_rejected():
  with pytest.raises(ValueError, match="out of range"):
    Residency(1, 4, 2, "lru").request(0, [4])
