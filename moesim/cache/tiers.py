"""One level of the multi-level expert cache (GPU HBM or host DRAM), as the engine drives it.

Keys are ints ``layer * num_experts + expert``. An entry is either READY (its bytes are there) or IN_FLIGHT
(a slot reserved for a copy in progress). Both hold a slot. Victims are chosen by the tier's eviction policy
among READY entries that are not pinned; an IN_FLIGHT or pinned entry is never evicted.

Lifecycle::

    reserve(key, pos) -> evicted keys | None     (absent -> IN_FLIGHT; counts as an access)
    complete(key)                                (IN_FLIGHT -> READY; not an access)
    cancel(key)                                  (IN_FLIGHT -> absent; the slot is freed)
    hit(key, pos) -> bool                        (READY: an access, True; else False, no change)
    pin(key) / unpin(key)                        (reference counts on a READY or IN_FLIGHT key; pin_held, unpin_all)

``rng`` (a seeded numpy Generator) seeds randomised policies, one spawned child per partition.

``pos`` is the position of the access in the engine's access stream (Belady's clock: the tier asks
``next_use(key, pos)`` for the first request of ``key`` after ``pos``). Other policies do not look at it.

With ``partition="per_layer"`` the capacity is per layer (one int for every layer, or a sequence of one int
per layer: see :mod:`moesim.cache.allocation`) and every layer has its own policy instance, so a reservation
for layer ``l`` can only evict layer-``l`` keys. With ``"global"`` all keys share one capacity and one
policy. ``capacity=None`` means unbounded (never evicts; no policy is kept at all).
"""
from __future__ import annotations

import operator
from typing import Callable

from .policies import LRU, NO_POLICY, Policy, get_policy, policy_class

__all__ = ["Tier", "PARTITIONS"]

PARTITIONS = ("global", "per_layer")


def _capacity(name: str, capacity) -> int:
    try:
        if isinstance(capacity, bool):
            raise TypeError
        capacity = operator.index(capacity)
    except TypeError:
        raise ValueError(f"tier {name!r}: capacity must be None or an int >= 0, got {capacity!r}") from None
    if capacity < 0:
        raise ValueError(f"tier {name!r}: capacity must be None or an int >= 0, got {capacity!r}")
    return capacity


class Tier:
    """One cache level: slots, READY/IN_FLIGHT entries, pins, and an eviction policy per partition.

    Counters: ``reservations`` (successful ``reserve`` calls), ``evictions``, ``completions``, ``cancellations``;
    ``hits`` is *not* counted here (the engine counts; the hit path stays a dict lookup plus a policy touch).
    Always ``occupancy() == reservations - evictions - cancellations``.
    """

    __slots__ = ("name", "capacity", "_caps", "policy", "partition", "num_experts", "num_layers", "_next_use",
                 "_ready", "_flight", "_pins", "_blocked", "_occ", "_total", "_policies", "_per_layer",
                 "_belady", "reservations", "evictions", "completions", "cancellations")

    def __init__(self, name: str, capacity: int | None, policy: str = "lru", partition: str = "global",
                 num_experts: int = 1, num_layers: int = 1,
                 next_use: Callable[[int, int], float] | None = None, rng=None) -> None:
        cls = policy_class(policy)  # KeyError naming the known policies
        if partition not in PARTITIONS:
            raise ValueError(f"tier {name!r}: partition must be one of {PARTITIONS}, got {partition!r}")
        if num_experts < 1 or num_layers < 1:
            raise ValueError(f"tier {name!r}: num_experts and num_layers must be >= 1")
        if capacity is not None and partition == "per_layer" and not isinstance(capacity, (int, bool)) \
                and hasattr(capacity, "__len__"):
            if len(capacity) != num_layers:
                raise ValueError(f"tier {name!r}: {len(capacity)} per-layer capacities for {num_layers} layers")
            capacity = tuple(_capacity(name, c) for c in capacity)
        elif capacity is not None:
            capacity = _capacity(name, capacity)
        if cls.needs_next_use and next_use is None and capacity is not None:
            raise ValueError(f"tier {name!r}: policy {policy!r} needs a next_use(key, pos) function")
        self.name, self.capacity, self.policy, self.partition = name, capacity, policy, partition
        self.num_experts, self.num_layers = num_experts, num_layers
        self._per_layer = partition == "per_layer"
        bounded = capacity is not None
        self._belady = bounded and cls.needs_next_use
        # next_use is only consulted by policies that read it: the hit path of the others skips it
        self._next_use = next_use if self._belady else None
        n_parts = num_layers if self._per_layer else 1
        self._caps: list[int | None] = list(capacity) if isinstance(capacity, tuple) else [capacity] * n_parts
        rngs = rng.spawn(n_parts) if rng is not None and cls.randomised else [None] * n_parts
        self._policies: list[Policy] = [get_policy(policy, c, r) if bounded else NO_POLICY
                                        for c, r in zip(self._caps, rngs)]
        self._ready: dict[int, Policy] = {}   # READY key -> the policy instance of its partition
        self._flight: dict[int, Policy] = {}  # IN_FLIGHT key -> the same
        self._pins: dict[int, int] = {}       # key -> pin count (> 0)
        self._blocked: set[int] = set()       # pinned or IN_FLIGHT: never a victim
        self._occ = [0] * num_layers          # slots held per layer (READY + IN_FLIGHT)
        self._total = 0
        self.reservations = self.evictions = self.completions = self.cancellations = 0

    # ---- queries ---------------------------------------------------------------------------

    def is_ready(self, key: int) -> bool:
        return key in self._ready

    def in_flight(self, key: int) -> bool:
        return key in self._flight

    def __contains__(self, key: object) -> bool:
        return key in self._ready or key in self._flight

    def is_pinned(self, key: int) -> bool:
        return key in self._pins

    def pin_count(self, key: int) -> int:
        return self._pins.get(key, 0)

    def occupancy(self, layer: int | None = None) -> int:
        """Slots held (READY + IN_FLIGHT), in all, or by ``layer``'s keys."""
        return self._total if layer is None else self._occ[layer]

    def capacity_for(self, layer: int) -> int | None:
        """Slots ``layer``'s keys may hold at most: the per-layer capacity with ``per_layer``, the
        whole (shared) capacity with ``global``; None if unbounded."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"tier {self.name!r}: layer {layer} out of range 0..{self.num_layers - 1}")
        return self._caps[layer if self._per_layer else 0]

    def free_for(self, layer: int) -> int | None:
        """Free slots for ``layer``'s keys without evicting (None if unbounded)."""
        if self.capacity is None:
            return None
        if self._per_layer:
            return self._caps[layer] - self._occ[layer]
        return self.capacity - self._total

    def resident_keys(self) -> list[int]:
        """READY keys, ascending."""
        return sorted(self._ready)

    def in_flight_keys(self) -> list[int]:
        """IN_FLIGHT keys, ascending."""
        return sorted(self._flight)

    def __len__(self) -> int:
        return self._total

    def __repr__(self) -> str:
        cap = "unbounded" if self.capacity is None else f"{self.capacity}{' per layer' if self._per_layer else ''}"
        return (f"Tier({self.name!r}, {self.policy}, {cap}: {len(self._ready)} ready, "
                f"{len(self._flight)} in flight, {len(self._pins)} pinned)")

    # ---- the hit path ----------------------------------------------------------------------

    def hit(self, key: int, pos: int) -> bool:
        """``hit_pin`` with its pin undone: True and an access if ``key`` is READY; False, no change, if not."""
        if not self.hit_pin(key, pos):
            return False
        self.unpin(key)
        return True

    def hit_pin(self, key: int, pos: int) -> bool:
        """True, an access for the policy and a pin, if ``key`` is READY; False (nothing changes)
        if it is absent or IN_FLIGHT. One call per access: the engine's hot path."""
        p = self._ready.get(key)
        if p is None:
            return False
        nu = self._next_use
        if nu is None:
            p.touch(key)
        else:
            p.touch(key, nu(key, pos))
        pins = self._pins
        pins[key] = pins.get(key, 0) + 1
        self._blocked.add(key)
        return True

    # ---- one layer in one call (the contention-free engine) ---------------------------------

    def access_layer(self, keys: list[int], slots: int, pos: int) -> tuple[list[int], int, int]:
        """One layer's accesses as engine/fast.py makes them, in one call (its hot path): `keys` are distinct keys of
        one layer at positions pos, pos + 1, ..., nothing pinned or in flight before. A READY key is a hit (touched,
        pinned to the end); any other is a miss whose slot is reserved (`reserve`) at once for the first `slots`
        misses, and for the rest in order after the accesses, at the last position; a miss with no evictable slot is
        not cached (bypass). At the end every reserved key is READY, nothing is pinned, and the policy has seen the
        calls of hit_pin / reserve / complete / unpin, in order. Returns (miss indices in `keys`, bypassed, evicted)."""
        if self._pins or self._flight:
            raise ValueError(f"tier {self.name!r}: access_layer needs nothing pinned or in flight")
        if not keys:
            return [], 0, 0
        layer = self._layer(keys[0])
        part = layer if self._per_layer else 0
        p, cap = self._policies[part], self._caps[part]
        if cap is None:
            misses, bypass, evicted = self._access_unbounded(keys, p, layer), 0, 0
        elif type(p) is LRU:
            (misses,), bypass, evicted = self._access_lru(keys, (0, len(keys)), layer, slots, p, cap)
        else:
            misses, bypass, evicted = self._access_any(keys, slots, pos, p, cap, layer)
        self._count(len(misses) - bypass, evicted)
        return misses, bypass, evicted

    def access_step(self, keys: list[int], bounds, slots: int, pos: int) -> tuple[list[list[int]], int, int]:
        """`access_layer` for each layer l of a step in one call: keys[bounds[l]:bounds[l + 1]] from pos + bounds[l]."""
        p = self._policies[0]
        if self._per_layer or self._caps[0] is None or type(p) is not LRU or self._pins or self._flight or not keys:
            res = [self.access_layer(keys[lo:hi], slots, pos + lo) for lo, hi in zip(bounds, bounds[1:])]
            return [r[0] for r in res], sum(r[1] for r in res), sum(r[2] for r in res)
        self._layer(keys[0]), self._layer(keys[-1])  # (ValueError for a key outside the model)
        res = self._access_lru(keys, bounds, 0, slots, p, self._caps[0])
        self._count(sum(map(len, res[0])) - res[1], res[2])
        return res

    def _count(self, reserved: int, evicted: int) -> None:
        self._total, self.evictions = self._total + reserved - evicted, self.evictions + evicted
        self.reservations, self.completions = self.reservations + reserved, self.completions + reserved

    def _access_unbounded(self, keys, p, layer) -> list[int]:
        """`access_layer` without a capacity: every miss gets a slot."""
        ready, misses = self._ready, []
        for i, key in enumerate(keys):
            if key not in ready:
                misses.append(i)
                ready[key] = p
        self._occ[layer] += len(misses)
        return misses

    def _access_lru(self, keys, bounds, layer, slots, p, cap) -> tuple[list[list[int]], int, int]:
        """`access_layer` for plain LRU on its OrderedDict, for keys[bounds[j]:bounds[j + 1]] (layer `layer` + j) in
        turn. Hits move to the newest end and new keys enter there, so a layer's held keys (pinned or in flight: `i`
        less those bypassed before access i) are the newest entries: the victim is the oldest, unless all are held."""
        ready, occ, E, od, move, pop = self._ready, self._occ, self.num_experts, p._od, p._od.move_to_end, p._od.popitem
        used = used0 = occ[layer] if self._per_layer else self._total  # == len(od)
        out, bypass = [], 0
        for layer, (lo, hi) in enumerate(zip(bounds, bounds[1:]), layer):
            misses, late, bypass0 = [], [], bypass
            for i, key in enumerate(keys[lo:hi]):
                if key in ready:
                    move(key)
                    continue
                misses.append(i)
                if len(misses) > slots:  # its copy waits for a free slot on the link
                    late.append(key)
                    continue
                if used < cap:
                    used += 1
                elif used > i - (bypass - bypass0):  # an entry not held: evict the oldest
                    del ready[(v := pop(False)[0])]
                    occ[v // E] -= 1
                else:
                    bypass += 1
                    continue
                od[key] = None
                ready[key] = p  # in flight until the layer ends; distinct keys: nothing looks it up before
            held = hi - lo - len(late) - (bypass - bypass0)  # (+ j: once one is bypassed, so is every later one)
            for j, key in enumerate(late):  # their copies start after the accesses: slots in order, as `reserve` gives
                if used < cap:
                    used += 1
                elif used > held + j:
                    del ready[(v := pop(False)[0])]
                    occ[v // E] -= 1
                else:
                    bypass += 1
                    continue
                od[key] = None
                ready[key] = p
            occ[layer] += len(misses) - (bypass - bypass0)
            out.append(misses)
        return out, bypass, sum(map(len, out)) - bypass - (used - used0)  # (each reservation not filling evicted)

    def _access_any(self, keys, slots, pos, p, cap, layer) -> tuple[list[int], int, int]:
        """`access_layer` for any policy: its own touch / miss / victim / evict / insert calls (Belady's next uses
        and expiry at each access's position), with this layer's held keys as the excluded set."""
        ready, nu, misses = self._ready, self._next_use, []
        touch, blocked = p.touch, set()  # this layer's keys holding a slot (pinned or in flight)
        late: list[int] = []
        used, bypass, evicted = (self._occ[layer] if self._per_layer else self._total), 0, 0
        for at, key in enumerate(keys, pos):
            if key in ready:
                if nu is None:
                    touch(key)
                else:
                    touch(key, nu(key, at))
                blocked.add(key)
                continue
            misses.append(at - pos)
            if len(misses) > slots:
                late.append(key)
                continue
            used, ok, ev = self._admit(key, at, p, cap, layer, used, blocked)
            bypass += not ok
            evicted += ev
        last = pos + len(keys) - 1  # the queued copies start after the layer's last access
        for key in late:
            used, ok, ev = self._admit(key, last, p, cap, layer, used, blocked)
            bypass += not ok
            evicted += ev
        return misses, bypass, evicted

    def _admit(self, key, at, p, cap, layer, used, blocked) -> tuple[int, bool, int]:
        """`reserve`'s policy calls for one of `_access_any`'s misses (`used`: the partition's slots held); returns
        (used, whether it got a slot, evictions)."""
        p.miss(key)
        ev = 0
        if used >= cap:
            if cap == 0:
                return used, False, 0
            if self._belady:
                p.expire(at, self._next_use)
            v = p.victim(blocked)
            if v is None:
                return used, False, 0
            p.evict(v)
            del self._ready[v]
            self._occ[v // self.num_experts] -= 1
            used -= 1
            ev = 1
        nu = self._next_use
        p.insert(key, nu(key, at) if nu is not None else None)
        self._ready[key] = p  # in flight until the layer ends; distinct keys: nothing looks it up before
        blocked.add(key)
        self._occ[layer] += 1
        return used + 1, True, ev

    # ---- slots -----------------------------------------------------------------------------

    def _layer(self, key: int) -> int:
        layer = key // self.num_experts
        if not 0 <= layer < self.num_layers or key < 0:
            raise ValueError(f"tier {self.name!r}: key {key} is not layer*{self.num_experts}+expert "
                             f"for {self.num_layers} layers")
        return layer

    def reserve(self, key: int, pos: int) -> list[int] | None:
        """Allocate a slot for incoming ``key`` (it becomes IN_FLIGHT, an access for the policy), evicting the
        policy's victim among READY unpinned keys of the same partition if full. Returns the evicted keys (empty
        if a slot was free), or None -- changing nothing -- when no slot can be freed (capacity 0, or every key
        of the partition pinned or in flight). Raises ValueError if ``key`` is already READY or IN_FLIGHT."""
        if key in self._flight or key in self._ready:
            state = "in flight" if key in self._flight else "ready"
            raise ValueError(f"tier {self.name!r}: key {key} is already {state}; cannot reserve it again")
        layer = self._layer(key)
        part = layer if self._per_layer else 0
        p = self._policies[part]
        cap = self._caps[part]
        evicted: list[int] = []
        if cap is not None:
            p.miss(key)
            used = self._occ[layer] if self._per_layer else self._total
            if used >= cap:
                if cap == 0:
                    return None
                if self._belady:
                    p.expire(pos, self._next_use)  # type: ignore[attr-defined]
                v = p.victim(self._blocked)
                if v is None:
                    return None
                self._drop(p, v)
                evicted.append(v)
        nu = self._next_use
        p.insert(key, nu(key, pos) if nu is not None else None)
        self._flight[key] = p
        self._blocked.add(key)
        self._occ[layer] += 1
        self._total += 1
        self.reservations += 1
        return evicted

    def complete(self, key: int) -> None:
        """IN_FLIGHT -> READY (KeyError if ``key`` is not in flight). Not an access."""
        p = self._flight.pop(key, None)
        if p is None:
            raise KeyError(f"tier {self.name!r}: key {key} is not in flight")
        self._ready[key] = p
        if key not in self._pins:
            self._blocked.discard(key)
        self.completions += 1

    def cancel(self, key: int) -> None:
        """Drop the reservation of an IN_FLIGHT key, freeing its slot. KeyError if not in flight,
        ValueError if it is pinned (unpin first)."""
        p = self._flight.get(key)
        if p is None:
            raise KeyError(f"tier {self.name!r}: key {key} is not in flight")
        if key in self._pins:
            raise ValueError(f"tier {self.name!r}: cannot cancel pinned key {key}")
        del self._flight[key]
        p.remove(key)
        self._blocked.discard(key)
        self._occ[key // self.num_experts] -= 1
        self._total -= 1
        self.cancellations += 1

    def pin(self, key: int) -> None:
        """Add a reference to a READY or IN_FLIGHT key: it is never evicted while pinned.
        KeyError if the key holds no slot."""
        if not self.pin_held(key):
            raise KeyError(f"tier {self.name!r}: cannot pin key {key}: not resident or in flight")

    def pin_held(self, key: int) -> bool:
        """``pin`` a key that holds a slot and say True; False, changing nothing, if it holds none."""
        if key not in self._ready and key not in self._flight:
            return False
        self._pins[key] = self._pins.get(key, 0) + 1
        self._blocked.add(key)
        return True

    def pin_held_many(self, keys) -> tuple[list[int], list[int]]:
        """``pin_held`` each of ``keys`` in order, in one call (a protected block); returns (the
        keys pinned, the keys that hold no slot and were not), each in order."""
        ready, flight, pins, blocked = self._ready, self._flight, self._pins, self._blocked
        held: list[int] = []
        rest: list[int] = []
        for key in keys:
            if key in ready or key in flight:
                pins[key] = pins.get(key, 0) + 1
                blocked.add(key)
                held.append(key)
            else:
                rest.append(key)
        return held, rest

    def unpin(self, key: int) -> None:
        """Drop one reference (KeyError if ``key`` is not pinned)."""
        self.unpin_all((key,))

    def unpin_all(self, keys) -> None:
        """``unpin`` each of ``keys`` in order: one call for a layer's (or a protection's) keys."""
        pins, flight, blocked = self._pins, self._flight, self._blocked
        for key in keys:
            c = pins.get(key)
            if c is None:
                raise KeyError(f"tier {self.name!r}: key {key} is not pinned")
            if c > 1:
                pins[key] = c - 1
            else:
                del pins[key]
                if key not in flight:
                    blocked.discard(key)

    def resize(self, capacity: int) -> list[int]:
        """Set a global tier's capacity (the KV cache grew or shrank), evicting the policy's victims
        among READY unpinned keys until the occupancy fits; returns them. Pinned or IN_FLIGHT keys
        are never evicted, so the occupancy may stay above a new capacity until they leave."""
        if self._per_layer or self.capacity is None:
            raise ValueError(f"tier {self.name!r}: only a bounded global tier can be resized")
        p, evicted = self._policies[0], []
        self.capacity = self._caps[0] = _capacity(self.name, capacity)  # (queue-sized policies keep their sizing)
        while self._total > self.capacity:
            v = p.victim(self._blocked)
            if v is None:
                break
            self._drop(p, v)
            evicted.append(v)
        return evicted

    def _drop(self, p, v: int) -> None:
        """Evict READY key `v` (the victim policy `p` chose) and count it."""
        p.evict(v)
        del self._ready[v]
        self._occ[v // self.num_experts] -= 1
        self._total -= 1
        self.evictions += 1

    # ---- checking --------------------------------------------------------------------------

    def check(self) -> None:
        """Assert the internal invariants (for tests; O(n))."""
        ready, flight = self._ready, self._flight
        assert not (ready.keys() & flight.keys()), "a key both ready and in flight"
        keys = ready.keys() | flight.keys()
        assert self._total == len(keys)
        occ = [0] * self.num_layers
        for k in keys:
            occ[k // self.num_experts] += 1
        assert occ == self._occ, (occ, self._occ)
        if self.capacity is not None:
            if self._per_layer:
                assert all(o <= c for o, c in zip(occ, self._caps)), (occ, self._caps)
            else:
                assert self._total <= self.capacity
        assert set(self._pins) <= keys and all(c > 0 for c in self._pins.values())
        assert self._blocked == set(self._pins) | flight.keys()
        assert self._total == self.reservations - self.evictions - self.cancellations
        if self.capacity is not None:
            for i, p in enumerate(self._policies):
                mine = {k for k in keys if not self._per_layer or k // self.num_experts == i}
                assert set(p.keys()) == mine, (i, sorted(p.keys()), sorted(mine))
                for k in mine:
                    assert (ready.get(k) or flight.get(k)) is p
