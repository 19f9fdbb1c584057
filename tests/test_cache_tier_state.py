"""Stateful property test of Tier: random interleavings of hit, reserve, complete, cancel, pin and
unpin, for both partitions and every policy, checked against a plain model after every step.

The model tracks each key's state (ready / in flight), pin counts and the policy's bookkeeping
(last access tick, insert tick, frequency since insert, next use), and predicts exactly which key
a reservation must evict -- or that it must fail, changing nothing. For the other policies (their
exact order is checked against libCacheSim and plain references elsewhere) it predicts whether a
reservation must evict or fail, and checks that the victim is a READY, unpinned key of the same
partition."""
from __future__ import annotations


import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from moesim.cache import NextUse, Tier

from moesim.cache import POLICIES as REGISTERED

EXACT = ["lru", "lfu", "fifo", "belady"]
POLICIES = EXACT + sorted(set(REGISTERED) - set(EXACT)) + ["lru+second_touch", "s3fifo+second_touch",
                                                         "arc+second_touch"]
E, L = 4, 3
KEYS = st.integers(0, E * L - 1)


class TierMachine(RuleBasedStateMachine):
    @initialize(policy=st.sampled_from(POLICIES), partition=st.sampled_from(["global", "per_layer"]),
                capacity=st.one_of(st.integers(0, 5), st.none()),
                future=st.lists(KEYS, min_size=0, max_size=150))
    def setup(self, policy, partition, capacity, future):
        self.policy, self.partition, self.cap = policy, partition, capacity
        self.nu = NextUse(future)   # Belady's oracle: any deterministic next_use(key, pos) will do
        self.tier = Tier("t", capacity, policy, partition, E, L, self.nu.next_after)
        self.state: dict[int, str] = {}      # key -> "ready" | "flight"
        self.pins: dict[int, int] = {}
        self.tick = 0
        self.last: dict[int, int] = {}       # last access (reserve or hit)
        self.ins: dict[int, int] = {}        # reserve tick
        self.freq: dict[int, int] = {}       # accesses since reserve
        self.next: dict[int, float] = {}     # stored next use
        self.pos = 0

    # ---- helpers -------------------------------------------------------------------------

    def part(self, key):
        return key // E if self.partition == "per_layer" else 0

    def used(self, key):
        p = self.part(key)
        return sum(1 for k in self.state if self.part(k) == p)

    def expected_victim(self, key, pos):
        """None if no slot can be freed, else the key the policy must evict."""
        p = self.part(key)
        mine = [k for k in self.state if self.part(k) == p]
        if self.policy == "belady":   # stale next uses (<= now) are looked up again first
            for k in mine:
                if self.next[k] <= pos:
                    self.next[k] = self.nu.next_after(k, pos)
        cands = [k for k in mine if self.state[k] == "ready" and k not in self.pins]
        if not cands:
            return None
        if self.policy not in EXACT:
            return set(cands)   # any of them
        order = {
            "lru": lambda k: self.last[k],
            "fifo": lambda k: self.ins[k],
            "lfu": lambda k: (self.freq[k], self.last[k]),
            "belady": lambda k: (-self.next[k], self.last[k]),
        }[self.policy]
        return min(cands, key=order)

    def access(self, key, pos):
        self.tick += 1
        self.last[key] = self.tick
        self.freq[key] = self.freq.get(key, 0) + 1
        self.next[key] = self.nu.next_after(key, pos)

    def forget(self, key):
        for d in (self.state, self.last, self.ins, self.freq, self.next):
            d.pop(key, None)

    def snapshot(self):
        t = self.tier
        return (t.resident_keys(), t.in_flight_keys(), t.occupancy(), t.reservations, t.evictions,
                t.cancellations, t.completions)

    # ---- rules ---------------------------------------------------------------------------

    @rule(key=KEYS)
    def hit(self, key):
        self.pos += 1
        ready = self.state.get(key) == "ready"
        assert self.tier.hit(key, self.pos) == ready
        if ready:
            self.access(key, self.pos)

    @rule(key=KEYS)
    def hit_pin(self, key):
        """The engine's one-call hit + pin: a hit (as `hit`) that also pins; a miss changes nothing."""
        self.pos += 1
        ready = self.state.get(key) == "ready"
        assert self.tier.hit_pin(key, self.pos) == ready
        if ready:
            self.access(key, self.pos)
            self.pins[key] = self.pins.get(key, 0) + 1

    @rule(key=KEYS)
    def reserve(self, key):
        self.pos += 1
        pos = self.pos
        if key in self.state:
            try:
                self.tier.reserve(key, pos)
            except ValueError:
                return
            raise AssertionError("double reservation accepted")
        full = self.cap is not None and self.used(key) >= self.cap
        want = self.expected_victim(key, pos) if full else None
        before = self.snapshot()
        got = self.tier.reserve(key, pos)
        if full and (self.cap == 0 or want is None):
            assert got is None
            assert self.snapshot() == before, "a failed reserve changed the tier"
            return
        if isinstance(want, set):
            assert len(got) == 1 and got[0] in want, (got, want)
        else:
            assert got == ([want] if full else [])
        for v in got:
            assert v not in self.pins, "evicted a pinned key"
            assert self.state[v] == "ready", "evicted an in-flight key"
            if self.partition == "per_layer":
                assert v // E == key // E, "evicted across layers"
            self.forget(v)
        self.state[key] = "flight"
        self.ins[key] = self.tick + 1
        self.freq.pop(key, None)
        self.access(key, pos)

    @precondition(lambda self: any(s == "flight" for s in self.state.values()))
    @rule(data=st.data())
    def complete(self, data):
        key = data.draw(st.sampled_from(sorted(k for k, s in self.state.items() if s == "flight")))
        self.tier.complete(key)
        self.state[key] = "ready"

    @precondition(lambda self: any(s == "flight" for s in self.state.values()))
    @rule(data=st.data())
    def cancel(self, data):
        key = data.draw(st.sampled_from(sorted(k for k, s in self.state.items() if s == "flight")))
        if key in self.pins:
            try:
                self.tier.cancel(key)
            except ValueError:
                return
            raise AssertionError("cancelled a pinned key")
        self.tier.cancel(key)
        self.forget(key)

    @precondition(lambda self: bool(self.state))
    @rule(data=st.data())
    def pin(self, data):
        key = data.draw(st.sampled_from(sorted(self.state)))
        self.tier.pin(key)
        self.pins[key] = self.pins.get(key, 0) + 1

    @precondition(lambda self: bool(self.pins))
    @rule(data=st.data())
    def unpin(self, data):
        key = data.draw(st.sampled_from(sorted(self.pins)))
        self.tier.unpin(key)
        self.pins[key] -= 1
        if not self.pins[key]:
            del self.pins[key]

    @rule(key=KEYS)
    def pin_absent_fails(self, key):
        if key not in self.state:
            try:
                self.tier.pin(key)
            except KeyError:
                return
            raise AssertionError("pinned an absent key")

    # ---- invariants ----------------------------------------------------------------------

    @invariant()
    def consistent(self):
        t = self.tier
        t.check()
        assert t.resident_keys() == sorted(k for k, s in self.state.items() if s == "ready")
        assert t.in_flight_keys() == sorted(k for k, s in self.state.items() if s == "flight")
        assert all(t.pin_count(k) == c for k, c in self.pins.items())
        assert t.occupancy() == len(self.state)
        assert t.occupancy() == t.reservations - t.evictions - t.cancellations
        assert t.completions <= t.reservations
        for layer in range(L):
            occ = t.occupancy(layer)
            assert occ == sum(1 for k in self.state if k // E == layer)
            if self.cap is not None and self.partition == "per_layer":
                assert occ <= self.cap
        if self.cap is not None and self.partition == "global":
            assert t.occupancy() <= self.cap
        for k in self.state:
            assert k in t
            assert t.is_ready(k) == (self.state[k] == "ready")
            assert t.in_flight(k) == (self.state[k] == "flight")


TierMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
test_tier_state_machine = TierMachine.TestCase


class LongTierMachine(TierMachine):
    """The same machine, four times the examples (`-m slow`)."""


LongTierMachine.TestCase.settings = settings(max_examples=800, stateful_step_count=50, deadline=None)
test_tier_state_machine_long = pytest.mark.slow(LongTierMachine.TestCase)
