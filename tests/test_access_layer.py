"""The per-layer access decision the simulator and the real executor share (issue #20)."""
from types import SimpleNamespace

import pytest

from moesim.cache.tiers import Tier
from moesim.engine.loads import LoadChain
from moesim.engine.sim import Simulation
from moesim.real.executor import RealExecutor

E, L = 8, 2


class _Channel:
    """Records what the chain submits and promotes; copies nothing."""

    def __init__(self):
        self.submitted, self.promoted = [], []

    def submit(self, load):
        self.submitted.append(load)

    def promote(self, t):
        self.promoted.append(t)


class _Chain(LoadChain):
    def __init__(self, dedup=True):
        self.E, self.eb, self.dedup, self.dram = E, 1, dedup, None
        self.gpu = Tier("gpu", 6, "lru", "global", E, L)
        self.pcie = self.disk = _Channel()
        self.rec = SimpleNamespace(prefetch_used=0, prefetch_late=0, saved_loads=0, bypass=0, gpu_evictions=0,
                                   prefetch_wasted=0)
        self.loads, self.prefetched_unused, self.stale_pins, self.protected = {}, set(), {}, {}
        self.pos, self.gated, self.prefetch_inflight = -1, (-1, -1), 0

    def ready(self, key):
        self.gpu.reserve(key, -1)
        self.gpu.complete(key)


def test_hit_late_miss_and_divert_each_decided_once():
    ch = _Chain()
    ch.ready(1)
    ch.ready(2)
    ch.prefetched_unused.add(2)
    queued = ch._start_load(3, True, (0, 0))  # a prefetch still queued
    served = object()
    divert = lambda key, cnt, pay: (served, "cpu") if key == 5 else None  # noqa: E731
    keys, counts, pays = [1, 2, 3, 4, 5], [1, 3, 2, 4, 2], ["a", "b", "c", "d", "e"]
    (hits, late, misses), ready, pending, pinned = ch._access_layer(0, 0, keys, counts, pays, divert)
    assert (hits, late, misses) == (2, 1, 2)
    assert ready == ["a", "b"]
    demand = ch.loads[4]
    assert pending == [(queued, "c"), (demand, "d"), (served, "cpu")]
    assert pinned == [1, 2, 3, 4]  # a diverted miss takes no slot
    assert not queued.prefetch and ch.pcie.promoted == [queued]
    assert not demand.prefetch and demand.target == (0, 0)
    assert ch.rec.prefetch_late == 1 and ch.rec.prefetch_used == 1 and not ch.prefetched_unused
    assert ch.rec.saved_loads == (2 - 1) + (4 - 1)  # the late and the demand load serve all their tokens
    assert ch.pos == 4
    assert ch.gpu._pins == {1: 1, 2: 1}  # loads without a slot yet hold their pins themselves
    assert (queued.pins, demand.pins) == (1, 1)


def test_without_dedup_a_second_token_of_a_demand_load_copies_again():
    ch = _Chain(dedup=False)
    (hits, late, misses), _, pending, pinned = ch._access_layer(0, 0, [4, 4], [1, 1], [0, 1])
    assert (hits, late, misses) == (0, 0, 2)
    first, second = (ld for ld, _ in pending)
    assert not first.bypass and second.bypass and ch.rec.bypass == 1
    assert pinned == [4] and ch.rec.saved_loads == 0


@pytest.mark.parametrize("cls", [Simulation, RealExecutor])
def test_simulator_and_real_executor_share_the_decision(cls):
    assert cls._access_layer is LoadChain._access_layer
    assert cls._gate is LoadChain._gate
