"""Pure cache simulation over a stream of integer ids: no timing, no tiers, no pinning.

:func:`replay` counts hits and misses of one policy at one capacity. A miss inserts the
requested id, evicting one victim first when the cache is full (demand paging, no bypass);
capacity 0 makes every request a miss. lru and fifo are replayed by the array formulations of
:mod:`moesim.cache.vector`; lfu and belady have specialised loops (the ``_replay_*`` functions,
which include per-request lru and fifo loops kept as references). All give exactly the same counts
as driving the incremental policy classes of :mod:`moesim.cache.policies`
(:func:`replay_incremental`), which the tests check, and the same counts as libCacheSim's
``process_trace``.

:func:`next_use_positions` and :class:`NextUse` give Belady its future: the next position at
which each request's id (or any key after any position) is requested again.
"""
from __future__ import annotations

import heapq
import math
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .policies import get_policy, policy_class
from .vector import fifo_misses, lru_misses

__all__ = ["ReplayResult", "replay", "replay_incremental", "replay_steps", "miss_flags", "next_use_positions",
           "NextUse"]


@dataclass(frozen=True)
class ReplayResult:
    """Counts of one replay: ``hits + misses == requests``."""

    hits: int
    misses: int

    @property
    def requests(self) -> int:
        return self.hits + self.misses

    @property
    def miss_ratio(self) -> float:
        n = self.hits + self.misses
        return self.misses / n if n else 0.0

    @property
    def hit_ratio(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


# ---- next use --------------------------------------------------------------------------------

def _as_int_array(stream) -> np.ndarray:
    a = np.asarray(stream)
    if a.ndim != 1:
        raise ValueError(f"a request stream must be one-dimensional, got shape {a.shape}")
    if a.size == 0:
        return a.astype(np.int64)
    if a.dtype.kind not in "iu":
        if a.dtype.kind == "b" or a.dtype == object or a.dtype.kind == "f":
            b = a.astype(np.int64)
            if a.dtype.kind == "f" and not np.array_equal(b, a):
                raise ValueError("request ids must be integers")
            return b
        raise ValueError(f"request ids must be integers, got dtype {a.dtype}")
    return a


def _sort_keys(a: np.ndarray) -> np.ndarray:
    """``a`` itself, or ``a`` shifted into uint16 when its ids span fewer than 2**16 values:
    the same order, and numpy's stable sort on 16-bit ints is a radix sort (~5x faster)."""
    if a.size == 0:
        return a
    lo, hi = int(a.min()), int(a.max())
    if hi - lo < 1 << 16:
        return (a - lo).astype(np.uint16) if lo else a.astype(np.uint16)
    return a


def next_use_positions(stream, never: int = -1) -> np.ndarray:
    """For every position ``i`` of ``stream``, the smallest ``j > i`` with ``stream[j] ==
    stream[i]``, or ``never`` (default -1, as libCacheSim's ``next_access_vtime``) if there is
    none. Vectorised: one stable argsort, O(n log n) (a radix sort when the ids span < 65536
    values). Returns int64."""
    a = _as_int_array(stream)
    if a.size < 2:
        return np.full(a.size, never, dtype=np.int64)
    return next_use_and_first(a, never)[0]


def next_use_and_first(a: np.ndarray, never: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """:func:`next_use_positions` of a non-empty int array, and the position of each distinct id's
    first request, in increasing id order (``np.unique(a, return_index=True)[1]``), from one sort."""
    n = a.size
    k = _sort_keys(a)
    order = np.argsort(k, kind="stable")
    s = k[order]
    same = s[1:] == s[:-1]
    out = np.empty(n, dtype=np.int64)
    out[order[:-1]] = np.where(same, order[1:], never)
    out[order[-1]] = never
    starts = np.flatnonzero(~same) + 1  # where each id but the smallest begins in sorted order
    return out, order[np.concatenate(([0], starts))]


class NextUse:
    """Index over a stream of keys: ``next_after(key, pos)`` is the smallest position ``> pos``
    at which ``key`` is requested, or ``math.inf`` if none. Positions are 0-based indices into
    the stream. O(1) when ``stream[pos] == key`` (the usual question: "this access just
    happened, when is the next one?"), else O(log m) by bisection over the key's m positions."""

    __slots__ = ("_keys", "_next", "_positions", "n")

    def __init__(self, stream) -> None:
        a = _as_int_array(stream)
        self.n = n = int(a.size)
        self._keys: list[int] = a.tolist()
        self._next: list[float] = []
        self._positions: dict[int, list[int]] = {}
        if not n:
            return
        order = np.argsort(_sort_keys(a), kind="stable")
        s = a[order]
        same = s[1:] == s[:-1]
        nxt = np.empty(n, dtype=np.int64)
        nxt[order[:-1]] = np.where(same, order[1:], -1)
        nxt[order[-1]] = -1
        self._next = [math.inf if v < 0 else v for v in nxt.tolist()]
        cuts = np.flatnonzero(~same) + 1
        starts = np.concatenate(([0], cuts)).tolist()
        ends = np.concatenate((cuts, [n])).tolist()
        olist = order.tolist()
        ids = s[starts].tolist()
        self._positions = {k: olist[b:e] for k, b, e in zip(ids, starts, ends)}

    def next_after(self, key: int, pos: int) -> float:
        if 0 <= pos < self.n and self._keys[pos] == key:
            return self._next[pos]
        ps = self._positions.get(key)
        if not ps:
            return math.inf
        i = bisect_right(ps, pos)
        return ps[i] if i < len(ps) else math.inf

    def positions(self, key: int) -> list[int]:
        """All positions at which ``key`` is requested, ascending."""
        return list(self._positions.get(key, ()))

    def __len__(self) -> int:
        return self.n


# ---- replay ----------------------------------------------------------------------------------

def _as_list(requests) -> list[int]:
    if isinstance(requests, list):
        return requests
    if isinstance(requests, np.ndarray):
        return _as_int_array(requests).tolist()
    return [int(x) for x in requests]


def _check(capacity, policy: str) -> int:
    policy_class(policy)  # raises the KeyError listing the known names
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)):
        raise TypeError(f"capacity must be an int, got {capacity!r}")
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    return int(capacity)


def replay(requests: Sequence[int] | np.ndarray | Iterable[int], capacity: int, policy: str) -> ReplayResult:
    """Replay ``requests`` (integer ids) through an empty cache of ``capacity`` entries managed by
    ``policy`` (any registered name, see :data:`moesim.cache.policies.POLICIES`). Hits touch,
    misses insert (evicting the policy's victim first when full). Belady's next uses are computed
    from ``requests``. lru and fifo are replayed by :mod:`moesim.cache.vector`, lfu and belady by
    specialised loops; the others are driven through their policy classes."""
    cap = _check(capacity, policy)
    if policy == "belady":
        arr = _as_int_array(requests if isinstance(requests, (list, np.ndarray)) else list(requests))
        n = int(arr.size)
        if cap == 0 or n == 0:
            return ReplayResult(0, n)
        misses = _replay_belady(arr, cap)
        return ReplayResult(n - misses, misses)
    if policy in ("lru", "fifo"):
        arr = _as_int_array(requests if isinstance(requests, (list, np.ndarray)) else list(requests))
        n = int(arr.size)
        if cap == 0 or n == 0:
            return ReplayResult(0, n)
        if n < _SMALL:     # numpy's per-call overhead outweighs the loop
            misses = _REFERENCE_LOOPS[policy](arr.tolist(), cap)
        else:
            misses = lru_misses(arr, cap) if policy == "lru" else fifo_misses(arr, cap)
        if misses is None:
            misses = _replay_fifo(arr.tolist(), cap)
        return ReplayResult(n - misses, misses)
    if policy not in _FAST:
        return replay_incremental(requests, cap, policy)
    reqs = _as_list(requests)
    n = len(reqs)
    if cap == 0 or n == 0:
        return ReplayResult(0, n)
    misses = _FAST[policy](reqs, cap)
    return ReplayResult(n - misses, misses)


def _replay_lru(reqs: list[int], cap: int) -> int:
    od: OrderedDict[int, None] = OrderedDict()
    to_end = od.move_to_end
    evict = od.popitem
    size = misses = 0
    for x in reqs:
        if x in od:
            to_end(x)
            continue
        misses += 1
        if size < cap:
            size += 1
        else:
            evict(False)
        od[x] = None
    return misses


def _replay_fifo(reqs: list[int], cap: int) -> int:
    resident: set[int] = set()
    add, discard = resident.add, resident.remove
    ring = [0] * cap   # ring[p] is the oldest resident id once the cache is full
    p = size = misses = 0
    for x in reqs:
        if x in resident:
            continue
        misses += 1
        if size < cap:
            size += 1
        else:
            discard(ring[p])
        ring[p] = x
        add(x)
        p += 1
        if p == cap:
            p = 0
    return misses


def _replay_lfu(reqs: list[int], cap: int) -> int:
    # freq/last: true (frequency, tick) of resident ids. The heap holds exactly one entry per
    # resident id, never greater than its true value (hits do not push): pop the top, and if it
    # is stale re-push its true value, until the top is current -- that is the LFU victim
    # (lowest frequency, then oldest last access), as in policies.LFU.
    freq: dict[int, int] = {}
    last: dict[int, int] = {}
    heap: list[tuple[int, int, int]] = []
    push, pop, replace = heapq.heappush, heapq.heappop, heapq.heapreplace
    get = freq.get
    size = misses = tick = 0
    for x in reqs:
        tick += 1
        f = get(x)
        if f is not None:
            freq[x] = f + 1
            last[x] = tick
            continue
        misses += 1
        if size < cap:
            size += 1
        else:
            while True:
                hf, ht, k = heap[0]
                tf = freq[k]
                tl = last[k]
                if hf == tf and ht == tl:
                    pop(heap)
                    del freq[k], last[k]
                    break
                replace(heap, (tf, tl, k))
        freq[x] = 1
        last[x] = tick
        push(heap, (1, tick, x))
    return misses


def _replay_belady(arr: np.ndarray, cap: int, out: np.ndarray | None = None) -> int:
    """Belady's misses; with `out` (a bool array), also sets out[i] for every miss."""
    # The heap holds plain ints -(next use); the id is recovered from the position: a next use
    # v < n is position v, whose id is reqs[v]. "Never again" after position i is encoded as
    # 2n-1-i (>= n, and larger for older i, so ties among dead ids go to the least recently
    # accessed, as in policies.Belady). A hit pushes the id's new next use and leaves its old
    # entry, whose value (the current position) is <= now, while every current entry is > now.
    #
    # Short reuses need no entry at all: if the id requested at i is next requested at
    # j <= i + cap, MIN cannot evict it in (i, j) -- to be the farthest at an eviction at t it
    # would need cap-1 other residents with distinct next uses in (t, j), plus the miss at t,
    # all inside (i, j), which holds only j-i-1 < cap positions. Such requests get the sentinel
    # 0 and push nothing. The id with the farthest next use is therefore never such an id, so
    # the top of the heap is always a current entry; stale entries are <= now and are cleared
    # now and then by keeping the `size` smallest values (a sorted list is a heap).
    n = int(arr.size)
    nxt = next_use_positions(arr, never=-1)
    pos = np.arange(n, dtype=np.int64)
    short = nxt - pos <= cap           # includes never (-1): fixed just below
    dead = nxt < 0
    short &= ~dead
    np.copyto(nxt, 2 * n - 1 - pos, where=dead)
    neg = np.negative(nxt, out=nxt)
    neg[short] = 0
    del pos, short, dead
    resident: set[int] = set()
    add, discard = resident.add, resident.remove
    heap: list[int] = []
    push, pop, replace = heapq.heappush, heapq.heappop, heapq.heapreplace
    limit = 8 * cap + 1024
    size = misses = 0
    for c0 in range(0, n, _CHUNK):  # Python lists of one chunk at a time: memory O(chunk), not O(n)
        reqs_c, neg_c = arr[c0:c0 + _CHUNK].tolist(), neg[c0:c0 + _CHUNK].tolist()
        for i, (x, nv) in enumerate(zip(reqs_c, neg_c), c0):
            if x in resident:
                if nv:
                    push(heap, nv)
                continue
            misses += 1
            if out is not None:
                out[i] = True
            if size < cap:
                size += 1
                if nv:
                    push(heap, nv)
            else:
                v = -(replace(heap, nv) if nv else pop(heap))
                discard(int(arr[v if v < n else 2 * n - 1 - v]))
                if len(heap) > limit:
                    heap.sort()
                    del heap[size:]
            add(x)
    return misses


_FAST = {"lfu": _replay_lfu}
_REFERENCE_LOOPS = {"lru": _replay_lru, "fifo": _replay_fifo}  # per request, what vector.py must equal


def _flags_lru(arr: np.ndarray, cap: int, out: np.ndarray) -> None:
    """Set out[i] for every position at which an LRU cache of ``cap`` entries misses (as
    _replay_lru), reading the stream one chunk at a time: the per-request reference for
    vector.lru_misses's flags."""
    od: OrderedDict[int, None] = OrderedDict()
    to_end, evict = od.move_to_end, od.popitem
    size = 0
    for c0 in range(0, arr.size, _CHUNK):
        for i, x in enumerate(arr[c0:c0 + _CHUNK].tolist(), c0):
            if x in od:
                to_end(x)
                continue
            out[i] = True
            if size < cap:
                size += 1
            else:
                evict(False)
            od[x] = None


_SMALL = 1024     # streams shorter than this replay lru/fifo request by request
_CHUNK = 1 << 16  # requests turned into a Python list at a time by the flag loops


def replay_incremental(requests, capacity: int, policy: str) -> ReplayResult:
    """The same replay driven through the incremental policy classes (slow; the reference the
    fast paths are tested against)."""
    flags = _incremental_flags(requests, _check(capacity, policy), policy)
    misses = int(flags.sum())
    return ReplayResult(flags.size - misses, misses)


def miss_flags(requests, capacity: int, policy: str) -> np.ndarray:
    """Per request, True if it misses: the replay of :func:`replay_incremental`, request by
    request (for attributing misses of a shared cache to layers); lru (vector.lru_misses) and
    belady use the fast paths of :func:`replay`."""
    cap = _check(capacity, policy)
    if policy in ("lru", "belady") and cap > 0:  # specialised loops, as replay()
        arr = _as_int_array(requests if isinstance(requests, (list, np.ndarray)) else list(requests))
        out = np.zeros(arr.size, dtype=bool)
        if arr.size:
            if policy == "lru":
                lru_misses(arr, cap, out)
            else:
                _replay_belady(arr, cap, out)
        return out
    return _incremental_flags(requests, cap, policy)


def _incremental_flags(requests, cap: int, policy: str) -> np.ndarray:
    """miss_flags through the incremental policy classes (the reference)."""
    reqs = _as_list(requests)
    n = len(reqs)
    out = np.ones(n, dtype=bool)
    if cap == 0:
        return out
    pol = get_policy(policy, cap)
    if pol.needs_next_use:
        nxt = [math.inf if v < 0 else v for v in next_use_positions(np.asarray(reqs, dtype=np.int64)).tolist()]
    else:
        nxt = [None] * n
    touch, insert, miss, victim, evict = pol.touch, pol.insert, pol.miss, pol.victim, pol.evict
    for i, (x, nu) in enumerate(zip(reqs, nxt)):
        if x in pol:
            out[i] = False
            touch(x, nu)
            continue
        miss(x)
        if len(pol) >= cap:
            evict(victim())
        insert(x, nu)
    return out


def replay_steps(groups, capacity: int, policy: str) -> ReplayResult:
    """Replay a stream cut into groups (the keys one layer of one engine step needs) as the
    engine serves them: the group's hits first (each pinned), then its misses in order, each
    pinned once loaded; a key of the current group is never the victim, and a miss that finds
    every resident key pinned is loaded without being cached (the engine's bypass). Singleton
    groups give exactly :func:`replay`'s counts. Not for belady (next uses of the whole stream)."""
    cap = _check(capacity, policy)
    hits = n = 0
    pol = get_policy(policy, cap) if cap else None
    if pol is not None and pol.needs_next_use:
        raise ValueError("replay_steps does not take belady (it needs the whole stream's next uses)")
    for g in groups:
        keys = _as_list(g)
        n += len(keys)
        if pol is None:
            continue
        first = {x for x in keys if x in pol}
        pinned = set(first)
        for x in keys:
            if x in first:
                hits += 1
                pol.touch(x)
        for x in keys:
            if x in first:
                continue
            if x in pol:              # a repeat of a key this group loaded
                hits += 1
                pol.touch(x)
                continue
            pol.miss(x)
            if len(pol) >= cap:
                v = pol.victim(pinned)
                if v is None:
                    continue          # bypass: used once, not cached
                pol.evict(v)
            pol.insert(x)
            pinned.add(x)
    return ReplayResult(hits, n - hits)
