"""Modern eviction policies: ``clock``, ``sieve``, ``s3fifo``, ``twoq``, ``slru``, ``arc``.

Each follows libCacheSim 0.3.5's C implementation (``libCacheSim/cache/eviction/<Name>.c``) with
its default parameters, and gives the same miss counts as its ``process_trace`` on count-based
traces (``tests/test_cache_modern.py``), except where libCacheSim's integer rounding of queue
sizes makes the C policy degenerate (noted per class; moesim rounds up to one slot instead).

They use the full verb set of :class:`moesim.cache.policies.Policy`: ``miss`` (libCacheSim's
``find`` on a miss: ghost look-ups, before any eviction), ``victim`` (may reorder internal queues
-- clear reference bits, move objects between queues -- but never changes the resident set),
``evict`` (the victim leaves for room: ghosts are recorded) and ``remove`` (asked for: no ghost).
Keys in ``excluded`` (pinned or in flight) are stepped over and keep their bits; without
exclusions the order is libCacheSim's exactly.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Container, Hashable

from .policies import Policy, _Keyed

__all__ = ["Clock", "Sieve", "S3FIFO", "TwoQ", "SLRU", "ARC"]


def _has_free(res, excluded) -> bool:
    """True if some key of ``res`` is not in ``excluded``."""
    if not excluded:
        return bool(res)
    return len(res) > sum(1 for k in excluded if k in res)


def _first_free(od, excluded):
    """The first key of ``od`` (eviction end first) not in ``excluded``, or None."""
    for k in od:
        if k not in excluded:
            return k
    return None


def _ghost_add(ghost: OrderedDict, key: int, cap: int) -> None:
    """libCacheSim's FIFO ``get`` on a ghost queue: a present key stays put; else it is added,
    dropping the oldest when full; a zero-size ghost keeps nothing."""
    if cap <= 0 or key in ghost:
        return
    if len(ghost) >= cap:
        ghost.popitem(last=False)
    ghost[key] = None


class Clock(_Keyed):
    """CLOCK (second chance) with an n-bit counter (libCacheSim ``Clock``, ``n-bit-counter=1``).

    Inserted keys start at 0; a hit raises the counter up to ``2**bits - 1``. To evict, the hand
    looks at the oldest key: a non-zero counter is decremented and the key goes to the front."""

    __slots__ = ("_od", "_max")
    name = "clock"

    def __init__(self, capacity: int | None = None, bits: int = 1) -> None:
        self._od: OrderedDict[int, int] = OrderedDict()  # first = the hand's end
        self._res = self._od
        self._max = (1 << bits) - 1

    def insert(self, key, next_use=None):
        if key in self._od:
            raise ValueError(f"key {key} is already resident")
        self._od[key] = 0

    def touch(self, key, next_use=None):
        f = self._od[key]
        if f < self._max:
            self._od[key] = f + 1

    def remove(self, key):
        del self._od[key]

    def victim(self, excluded: Container[Hashable] = ()):
        od = self._od
        if not _has_free(od, excluded):
            return None
        while True:
            k = next(iter(od))
            f = od[k]
            if k in excluded:
                od.move_to_end(k)
            elif f:
                od[k] = f - 1
                od.move_to_end(k)
            else:
                return k


class Sieve(_Keyed):
    """SIEVE (libCacheSim ``Sieve``): a FIFO queue with a visited bit and a hand that sweeps from
    the oldest key towards the newest, clearing bits, and stays where it evicted; new keys go to
    the head, and a hit only sets the bit (no reordering)."""

    __slots__ = ("_bit", "_newer", "_older", "_head", "_tail", "_hand")
    name = "sieve"

    def __init__(self, capacity: int | None = None) -> None:
        self._bit: dict[int, int] = {}
        self._res = self._bit
        self._newer: dict[int, int | None] = {}   # neighbour towards the head (C's queue.prev)
        self._older: dict[int, int | None] = {}   # towards the tail (C's queue.next)
        self._head = self._tail = self._hand = None

    def insert(self, key, next_use=None):
        if key in self._bit:
            raise ValueError(f"key {key} is already resident")
        self._bit[key] = 0
        h = self._head
        self._newer[key], self._older[key] = None, h
        if h is None:
            self._tail = key
        else:
            self._newer[h] = key
        self._head = key

    def touch(self, key, next_use=None):
        if key not in self._bit:
            raise KeyError(key)
        self._bit[key] = 1

    def remove(self, key):
        del self._bit[key]
        nw, old = self._newer.pop(key), self._older.pop(key)
        if self._hand == key:
            self._hand = nw
        if nw is None:
            self._head = old
        else:
            self._older[nw] = old
        if old is None:
            self._tail = nw
        else:
            self._newer[old] = nw

    def victim(self, excluded: Container[Hashable] = ()):
        bit = self._bit
        if not _has_free(bit, excluded):
            return None
        k = self._tail if self._hand is None else self._hand
        newer, tail = self._newer, self._tail
        while k in excluded or bit[k]:
            if k not in excluded:
                bit[k] = 0
            k = newer[k]
            if k is None:
                k = tail
        self._hand = k   # remove() moves the hand one step towards the head, as Sieve_evict
        return k


class S3FIFO(_Keyed):
    """S3-FIFO (libCacheSim ``S3FIFO``: small queue 10 %, ghost 90 %, move-to-main threshold 2).

    New keys enter the small FIFO (until the first eviction, main once small is full), keys found
    in the ghost enter the main FIFO. Evicting from the
    small queue moves keys hit at least twice to main and sends the first other one to the ghost;
    main is a FIFO with reinsertion (a key hit since its last pass goes back with its count,
    capped at 3, minus one). Main is evicted from when it is over its size or small is empty.

    libCacheSim sizes the small queue ``int(0.1 * capacity)`` and refuses objects as large as it,
    so below 20 slots it caches nothing; moesim gives the small queue ``max(1, int(0.1 *
    capacity))`` slots and always admits. From 20 slots on the two agree exactly."""

    __slots__ = ("_small", "_main", "_ghost", "_small_cap", "_main_cap", "_ghost_cap", "_gh", "_thr", "_warm")
    name = "s3fifo"

    def __init__(self, capacity: int | None = None, small_ratio: float = 0.1, ghost_ratio: float = 0.9,
                 threshold: int = 2) -> None:
        cap = capacity if capacity is not None else 64
        self._small: OrderedDict[int, int] = OrderedDict()
        self._main: OrderedDict[int, int] = OrderedDict()
        self._ghost: OrderedDict[int, None] = OrderedDict()
        self._small_cap = max(1, int(cap * small_ratio))
        self._main_cap = cap - self._small_cap
        self._ghost_cap = int(cap * ghost_ratio)
        self._thr = threshold
        self._gh = None
        self._warm = False   # True after the first eviction
        self._res = _Union(self._small, self._main)

    def miss(self, key):
        self._gh = key if self._ghost.pop(key, 0) is None else None

    def insert(self, key, next_use=None):
        if key in self._res:
            raise ValueError(f"key {key} is already resident")
        to_main = self._gh == key or (not self._warm and len(self._small) >= self._small_cap)
        (self._main if to_main else self._small)[key] = 0
        self._gh = None

    def touch(self, key, next_use=None):
        q = self._small if key in self._small else self._main
        q[key] += 1

    def remove(self, key):
        if self._small.pop(key, None) is None:
            del self._main[key]

    def evict(self, key):
        if key in self._small:
            del self._small[key]
            _ghost_add(self._ghost, key, self._ghost_cap)
        else:
            del self._main[key]

    def _sweep_small(self, excluded):
        small, main = self._small, self._main
        for k in list(small):
            if k in excluded:
                continue
            if small[k] >= self._thr:
                del small[k]
                main[k] = 0
                continue
            return k
        return None

    def _sweep_main(self, excluded):
        main = self._main
        if not _has_free(main, excluded):
            return None
        while True:
            for k in list(main):
                if k in excluded:
                    continue
                f = main[k]
                if not f:
                    return k
                main[k] = min(f, 3) - 1
                main.move_to_end(k)

    def victim(self, excluded: Container[Hashable] = ()):
        if not _has_free(self._res, excluded):
            return None
        self._warm = True
        while True:
            if len(self._main) > self._main_cap or not self._small:
                k = self._sweep_main(excluded)
                k = self._sweep_small(excluded) if k is None else k
            else:
                k = self._sweep_small(excluded)
                k = self._sweep_main(excluded) if k is None else k
            if k is not None:
                return k


class _Union:
    """Membership, length and keys over two dicts (the resident set of a two-queue policy)."""

    __slots__ = ("a", "b")

    def __init__(self, a, b) -> None:
        self.a, self.b = a, b

    def __contains__(self, key) -> bool:
        return key in self.a or key in self.b

    def __len__(self) -> int:
        return len(self.a) + len(self.b)

    def __iter__(self):
        yield from self.a
        yield from self.b


class TwoQ(_Keyed):
    """2Q (libCacheSim ``TwoQ``: A1in FIFO 25 %, A1out ghost 50 %, Am LRU the rest).

    New keys enter A1in; keys found in A1out enter Am. Evict from A1in (its oldest goes to
    A1out) while it is over its size, else Am's least recent. libCacheSim's A1in of
    ``int(0.25 * capacity)`` is zero below 4 slots (it then caches nothing); moesim gives it one."""

    __slots__ = ("_ain", "_aout", "_am", "_ain_cap", "_aout_cap", "_gh")
    name = "twoq"

    def __init__(self, capacity: int | None = None, ain_ratio: float = 0.25, aout_ratio: float = 0.5) -> None:
        cap = capacity if capacity is not None else 64
        self._ain: OrderedDict[int, None] = OrderedDict()
        self._aout: OrderedDict[int, None] = OrderedDict()
        self._am: OrderedDict[int, None] = OrderedDict()
        self._ain_cap = max(1, int(cap * ain_ratio))
        self._aout_cap = int(cap * aout_ratio)
        self._gh = None
        self._res = _Union(self._ain, self._am)

    def miss(self, key):
        self._gh = key if self._aout.pop(key, 0) is None else None

    def insert(self, key, next_use=None):
        if key in self._res:
            raise ValueError(f"key {key} is already resident")
        (self._am if self._gh == key else self._ain)[key] = None
        self._gh = None

    def touch(self, key, next_use=None):
        if key in self._am:
            self._am.move_to_end(key)
        elif key not in self._ain:
            raise KeyError(key)

    def remove(self, key):
        if self._ain.pop(key, 0) is not None:
            del self._am[key]

    def evict(self, key):
        if key in self._ain:
            del self._ain[key]
            _ghost_add(self._aout, key, self._aout_cap)
        else:
            del self._am[key]

    def victim(self, excluded: Container[Hashable] = ()):
        first, second = (self._ain, self._am) if len(self._ain) > self._ain_cap else (self._am, self._ain)
        k = _first_free(first, excluded)
        return _first_free(second, excluded) if k is None else k


class SLRU(_Keyed):
    """Segmented LRU with 4 segments (libCacheSim ``SLRU``, ``n-seg=4``).

    A new key goes to the lowest segment with room (segment 0 once the cache is full); a hit
    moves a key up one segment (the top one: to its head), and an over-full segment demotes its
    least recent key to the head of the one below. Victim: the least recent key of the lowest
    non-empty segment. libCacheSim makes every segment ``capacity // 4``, so when 4 does not
    divide the capacity its segment 0 overflows and a hit can evict; moesim gives the remainder
    to the lowest segments (identical when 4 divides the capacity)."""

    __slots__ = ("_seg", "_of", "_caps")
    name = "slru"

    def __init__(self, capacity: int | None = None, n_seg: int = 4) -> None:
        cap = capacity if capacity is not None else 64
        self._seg: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(n_seg)]
        self._of: dict[int, int] = {}
        self._res = self._of
        self._caps = [cap // n_seg + (1 if i < cap % n_seg else 0) for i in range(n_seg)]

    def insert(self, key, next_use=None):
        if key in self._of:
            raise ValueError(f"key {key} is already resident")
        i = next((i for i, s in enumerate(self._seg) if len(s) < self._caps[i]), 0)
        self._seg[i][key] = None
        self._of[key] = i

    def touch(self, key, next_use=None):
        i, seg = self._of[key], self._seg
        if i == len(seg) - 1:
            seg[i].move_to_end(key)
            return
        del seg[i][key]
        seg[i + 1][key] = None
        self._of[key] = j = i + 1
        while j > 0 and len(seg[j]) > self._caps[j]:   # cool: demote the tail one segment down
            k, _ = seg[j].popitem(last=False)
            seg[j - 1][k] = None
            self._of[k] = j - 1
            j -= 1

    def remove(self, key):
        del self._seg[self._of.pop(key)][key]

    def victim(self, excluded: Container[Hashable] = ()):
        for s in self._seg:
            k = _first_free(s, excluded)
            if k is not None:
                return k
        return None


class ARC(_Keyed):
    """Adaptive Replacement Cache (libCacheSim ``ARC``): T1/T2 resident LRU lists, B1/B2 ghosts
    and the target size ``p`` of T1, adapted on ghost hits (B1: ``p += max(|B2|/|B1|, 1)``, B2:
    ``p -= max(|B1|/|B2|, 1)``). As in libCacheSim, ghosts are trimmed only while evicting."""

    __slots__ = ("_t1", "_t2", "_b1", "_b2", "_p", "_c", "_gh", "_plan")
    name = "arc"

    def __init__(self, capacity: int | None = None) -> None:
        self._c = capacity if capacity is not None else 64
        self._t1: OrderedDict[int, None] = OrderedDict()
        self._t2: OrderedDict[int, None] = OrderedDict()
        self._b1: OrderedDict[int, None] = OrderedDict()
        self._b2: OrderedDict[int, None] = OrderedDict()
        self._p = 0.0
        self._gh = 0          # 1 or 2: the current miss was found in B1 or B2
        self._plan = None     # (victim, ghost to trim first, ghost the victim goes to)
        self._res = _Union(self._t1, self._t2)

    def miss(self, key):
        b1, b2 = self._b1, self._b2
        self._gh = 0
        if key in b1:
            self._p = min(self._p + max(len(b2) / len(b1), 1), self._c)
            del b1[key]
            self._gh = 1
        elif key in b2:
            self._p = max(self._p - max(len(b1) / len(b2), 1), 0)
            del b2[key]
            self._gh = 2

    def insert(self, key, next_use=None):
        if key in self._res:
            raise ValueError(f"key {key} is already resident")
        (self._t2 if self._gh else self._t1)[key] = None
        self._gh = 0

    def touch(self, key, next_use=None):
        self._gh = 0
        if key in self._t1:
            del self._t1[key]
            self._t2[key] = None
        else:
            self._t2.move_to_end(key)

    def remove(self, key):
        if self._t1.pop(key, 0) is not None:
            del self._t2[key]

    def _replace_from_t1(self) -> bool:
        n1 = len(self._t1)
        return (n1 > 0 and (n1 > self._p or (n1 == self._p and self._gh == 2))) or not self._t2

    def victim(self, excluded: Container[Hashable] = ()):
        t1, t2 = self._t1, self._t2
        trim, ghost_of = None, {1: self._b1, 2: self._b2}
        if self._gh:
            from_t1 = self._replace_from_t1()
        elif len(t1) + len(self._b1) + 1 > self._c:
            if self._b1:
                trim, from_t1 = self._b1, self._replace_from_t1()
            else:
                from_t1, ghost_of = True, {1: None, 2: self._b2}
        else:
            if len(t1) + len(self._b1) + len(t2) + len(self._b2) >= 2 * self._c and self._b2:
                trim = self._b2
            from_t1 = self._replace_from_t1()
        first, second = (t1, t2) if from_t1 else (t2, t1)
        k = _first_free(first, excluded)
        if k is None:
            k = _first_free(second, excluded)
            if k is None:
                return None
        self._plan = (k, trim, ghost_of[1 if k in t1 else 2])
        return k

    def evict(self, key):
        plan, self._plan = self._plan, None
        if plan is None or plan[0] != key:  # not the key victim() named: no trim, its own ghost
            plan = (key, None, self._b1 if key in self._t1 else self._b2)
        _, trim, ghost = plan
        if trim:
            trim.popitem(last=False)
        self.remove(key)
        if ghost is not None:
            ghost[key] = None
