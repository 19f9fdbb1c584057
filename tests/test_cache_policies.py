"""Unit tests of the eviction policies and of Tier, on small hand-worked cases."""
from __future__ import annotations

import math

import pytest

from moesim.cache import FIFO, LFU, LRU, POLICIES, Belady, Tier, get_policy, replay, replay_incremental

ALL = ["lru", "lfu", "fifo", "belady"]


# ---- registry --------------------------------------------------------------------------------

def test_registry_names():
    assert set(POLICIES) >= set(ALL)
    for name in ALL:
        p = get_policy(name)
        assert p.name == name and len(p) == 0


def test_unknown_policy_lists_known_names():
    with pytest.raises(KeyError) as e:
        get_policy("random_walk")
    msg = str(e.value)
    assert "random_walk" in msg and all(n in msg for n in ALL)


# ---- hand-worked streams ---------------------------------------------------------------------

@pytest.mark.parametrize("policy, stream, cap, misses", [
    # LRU cap 2: 1m 2m 1h 3m(evicts 2) 2m(evicts 1)
    ("lru", [1, 2, 1, 3, 2], 2, 4),
    # FIFO cap 2: 1m 2m 1h 3m(evicts 1: the hit did not refresh it) 2h
    ("fifo", [1, 2, 1, 3, 2], 2, 3),
    # LFU cap 2: 1m 1h(f2) 2m 3m(evicts 2: f1 < f2) 2m(evicts 3: f1 < f2) 1h
    ("lfu", [1, 1, 2, 3, 2, 1], 2, 4),
    # LFU, frequency reset on eviction: 1 reaches f3; 2 reaches f4; 3 evicts 1 (f3 < f4) and
    # reaches f4; 1 comes back at f1, evicting 2 (f4 tie with 3: 2 accessed longer ago); 4 evicts
    # 1 (f1: its old f3 was forgotten) and 1 evicts 4 (f1): misses 1, 2, 3, 1, 4, 1
    ("lfu", [1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 1, 4, 1], 2, 6),
    # Belady cap 2: 1m 2m 3m(evicts 2: next use 4 > 3) 1h 2m(evicts 3 or 1: both dead) -> 4
    ("belady", [1, 2, 3, 1, 2], 2, 4),
    ("lru", [1, 2, 3, 1, 2], 2, 5),
    # capacity 0: all misses; capacity >= distinct: only cold misses
    ("lru", [1, 1, 2, 2], 0, 4),
    ("lfu", [5, 6, 5, 6, 7, 5], 3, 3),
])
def test_hand_worked(policy, stream, cap, misses):
    assert replay(stream, cap, policy).misses == misses
    assert replay_incremental(stream, cap, policy).misses == misses


def test_lru_order_and_excluded():
    p = LRU()
    for k in (1, 2, 3):
        p.insert(k)
    assert p.victim() == 1
    p.touch(1)                       # 2 3 1
    assert p.victim() == 2
    assert p.victim({2}) == 3
    assert p.victim({1, 2, 3}) is None
    p.remove(2)
    assert p.victim() == 3 and len(p) == 2 and 2 not in p


def test_fifo_touch_does_not_reorder():
    p = FIFO()
    for k in (1, 2, 3):
        p.insert(k)
    p.touch(1)
    assert p.victim() == 1
    assert p.victim([1]) == 2
    with pytest.raises(KeyError):
        p.touch(9)


def test_lfu_ties_least_recently_accessed():
    p = LFU()
    p.insert(1)
    p.insert(2)
    p.insert(3)                      # all f1: oldest access first
    assert p.victim() == 1
    p.touch(1)                       # 1: f2
    assert p.victim() == 2
    p.touch(2)                       # 1, 2: f2 (2 more recent); 3: f1
    assert p.victim() == 3
    assert p.victim({3}) == 1        # among f2, 1 was accessed longer ago
    p.touch(3)                       # all f2: order of last access 1, 2, 3
    assert p.victim() == 1
    p.touch(1)                       # 1: f3
    assert p.victim() == 2
    assert p.victim({2, 3}) == 1
    assert p.victim({1, 2, 3}) is None


def test_lfu_frequency_reset_on_removal():
    p = LFU()
    p.insert(1)
    for _ in range(5):
        p.touch(1)
    assert p.frequency(1) == 6
    p.insert(2)
    p.touch(2)
    assert p.victim() == 2           # f2 < f6
    p.remove(1)
    p.insert(1)                      # back at f1
    assert p.frequency(1) == 1
    assert p.victim() == 1


def test_double_insert_and_missing_key():
    for name in ALL:
        p = get_policy(name)
        p.insert(1, 5)
        with pytest.raises(ValueError):
            p.insert(1, 5)
        with pytest.raises(KeyError):
            p.remove(2)
        with pytest.raises(KeyError):
            p.touch(2, 3)


def test_belady_farthest_and_ties():
    p = Belady()
    p.insert(1, 10)
    p.insert(2, 20)
    p.insert(3, 15)
    assert p.victim() == 2
    assert p.victim({2}) == 3
    p.insert(4, None)                # never used again: evicted first
    p.insert(5, math.inf)
    assert p.victim() == 4           # tie among dead keys: least recently accessed
    p.touch(4, math.inf)
    assert p.victim() == 5
    p.touch(2, 12)                   # 2 is needed again soon now
    p.remove(4)
    p.remove(5)
    assert p.victim() == 3


def test_belady_expire_refreshes_stale_next_uses():
    p = Belady()
    p.insert(1, 5)                   # its use at 5 happened without a touch (served elsewhere)
    p.insert(2, 10)
    assert p.victim() == 2
    future = {(1, 6): math.inf}
    p.expire(6, lambda k, now: future[(k, now)])
    assert p.victim() == 1           # 1 is really never used again
    assert p.next_use_of(1) == math.inf and p.next_use_of(2) == 10
    p.touch(2, 7)
    with pytest.raises(ValueError):  # a next_use function answering the past would loop forever
        p.expire(8, lambda k, now: now)


# ---- Tier ------------------------------------------------------------------------------------

def test_tier_lifecycle_and_counters():
    t = Tier("gpu", 2, "lru", "global", num_experts=4, num_layers=2)
    assert t.reserve(1, 0) == [] and t.in_flight(1) and 1 in t and not t.is_ready(1)
    assert not t.hit(1, 1)           # in flight is not a hit
    t.complete(1)
    assert t.is_ready(1) and t.hit(1, 2)
    assert t.reserve(5, 3) == []
    t.complete(5)
    assert t.hit(1, 4)               # 5 is now the LRU
    assert t.reserve(6, 5) == [5]
    assert 5 not in t and t.evictions == 1 and t.occupancy() == 2
    t.cancel(6)
    assert 6 not in t and t.occupancy() == 1 and t.cancellations == 1
    assert t.occupancy() == t.reservations - t.evictions - t.cancellations
    assert t.resident_keys() == [1]
    t.check()


def test_tier_double_reserve_raises():
    t = Tier("gpu", 4, "lru", num_experts=4, num_layers=1)
    t.reserve(1, 0)
    with pytest.raises(ValueError):
        t.reserve(1, 1)
    t.complete(1)
    with pytest.raises(ValueError):
        t.reserve(1, 2)
    with pytest.raises(KeyError):
        t.complete(1)
    with pytest.raises(KeyError):
        t.cancel(2)


def test_tier_pinned_never_evicted_and_reserve_fails_when_all_pinned():
    t = Tier("gpu", 2, "lru", num_experts=8, num_layers=1)
    for k in (0, 1):
        t.reserve(k, k)
        t.complete(k)
    t.pin(0)
    assert t.reserve(2, 2) == [1]    # 0 is the LRU but pinned
    # 2 is in flight, 0 pinned: nothing can go
    before = (t.resident_keys(), t.in_flight_keys(), t.evictions, t.reservations)
    assert t.reserve(3, 3) is None
    assert (t.resident_keys(), t.in_flight_keys(), t.evictions, t.reservations) == before
    t.complete(2)
    t.pin(2)
    t.pin(2)
    assert t.reserve(3, 4) is None   # all pinned
    t.unpin(2)
    assert t.reserve(3, 5) is None   # still pinned once
    t.unpin(2)
    assert t.reserve(3, 6) == [2]
    with pytest.raises(KeyError):
        t.unpin(2)
    with pytest.raises(KeyError):
        t.pin(7)                     # not resident
    t.check()


def test_tier_cancel_pinned_in_flight_raises():
    t = Tier("gpu", 2, "fifo", num_experts=4, num_layers=1)
    t.reserve(1, 0)
    t.pin(1)                         # someone waits on the copy
    assert not t.hit(1, 1)
    with pytest.raises(ValueError):
        t.cancel(1)
    t.unpin(1)
    t.cancel(1)
    assert t.occupancy() == 0


def test_tier_per_layer_isolation():
    E = 4
    t = Tier("gpu", 2, "lru", "per_layer", num_experts=E, num_layers=3)
    # fill layer 0 and layer 1 up to their per-layer capacity
    for k in (0, 1, E + 0, E + 1):
        assert t.reserve(k, k) == []
        t.complete(k)
    assert t.occupancy() == 4 and t.occupancy(0) == 2 and t.occupancy(1) == 2
    assert t.capacity_for(1) == 2
    # layer 2 has its own budget: nothing evicted
    assert t.reserve(2 * E, 10) == []
    # a layer-1 miss evicts layer 1's LRU even though layer 0's keys are older
    assert t.reserve(E + 2, 11) == [E + 0]
    # a layer whose keys are all pinned cannot take a new key, even with room elsewhere
    t.complete(E + 2)
    t.pin(E + 1)
    t.pin(E + 2)
    assert t.reserve(E + 3, 12) is None
    assert t.occupancy(0) == 2 and t.occupancy(2) == 1
    t.check()


def test_tier_global_evicts_across_layers():
    E = 4
    t = Tier("gpu", 2, "lru", "global", num_experts=E, num_layers=2)
    for k in (0, E):
        t.reserve(k, k)
        t.complete(k)
    assert t.reserve(E + 1, 5) == [0]
    assert t.capacity_for(0) == 2 and t.occupancy(1) == 2


def test_tier_unbounded():
    t = Tier("dram", None, "belady", num_experts=16, num_layers=4)   # belady needs no next_use here
    for k in range(64):
        assert t.reserve(k, k) == []
        t.complete(k)
    assert t.occupancy() == 64 and t.evictions == 0 and t.capacity_for(3) is None
    assert all(t.hit(k, 100 + k) for k in range(64))
    assert t.free_for(0) is None
    t.check()


def test_tier_capacity_zero():
    t = Tier("gpu", 0, "lru", num_experts=4, num_layers=1)
    assert t.reserve(1, 0) is None and t.occupancy() == 0


def test_tier_belady_uses_next_use_and_expires():
    # stream positions of each key; the tier asks next_use(key, pos)
    stream = [0, 1, 2, 0, 1, 0, 2, 1]
    from moesim.cache import NextUse
    nu = NextUse(stream)
    t = Tier("gpu", 2, "belady", num_experts=4, num_layers=1, next_use=nu.next_after)
    t.reserve(0, 0)
    t.complete(0)
    t.reserve(1, 1)
    t.complete(1)
    # at 2: key 2 arrives; 0 next at 3, 1 next at 4 -> evict 1
    assert t.reserve(2, 2) == [1]
    t.complete(2)
    # 0's access at 3 is served elsewhere (no hit call): its stored next use (3) goes stale.
    # at 4: key 1 again; 0's real next use is 5, 2's is 6 -> evict 2, not 0
    assert t.reserve(1, 4) == [2]


def test_tier_bad_arguments():
    with pytest.raises(KeyError):
        Tier("gpu", 2, "nope")
    with pytest.raises(ValueError):
        Tier("gpu", 2, "lru", "sideways")
    with pytest.raises(ValueError):
        Tier("gpu", -1, "lru")
    with pytest.raises(ValueError):
        Tier("gpu", 2, "belady")     # bounded belady without next_use
    t = Tier("gpu", 2, "lru", num_experts=4, num_layers=2)
    with pytest.raises(ValueError):
        t.reserve(8, 0)              # layer 2 of 2
