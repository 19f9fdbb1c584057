"""Frequency policies of moesim's own: ``lfuda``, ``lfu_history``, ``pinned_hot``.

``lfu`` (libCacheSim's LFU) forgets a key's count when it is evicted, so on a cache that thrashes
every count stays at 1 and it degenerates to LRU order. These keep or age frequency instead:

* **lfu_history** -- perfect LFU: a key's count of accesses is kept across evictions (a
  re-inserted key resumes its count). Victim: the fewest accesses, ties to the least recent.
* **lfuda** -- LFU with dynamic aging (Arlitt et al. 2000): priority ``K = L + F`` set at each
  access (``F`` accesses since insert), ``L`` = the priority of the last evicted key. Victim: the
  lowest ``K``, ties to the least recent. libCacheSim 0.3.5's ``LFUDA`` is not this: its hits add
  the current minimum frequency instead of 1 (nothing while it is 0) and it can hang at small
  sizes, so lfuda is checked against a plain reference, not against libCacheSim.
* **pinned_hot** -- a hot set from measured frequency: the ``hot_fraction`` (default half) of
  the partition's slots held by the resident keys with the most accesses so far (counted at
  every insert and hit, kept across evictions; ties to the more recently accessed) is kept; the
  rest is LRU. A hot key is evicted
  only when every other resident key is excluded (pinned or in flight).
"""
from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from typing import Container, Hashable

from .policies import LFU, _Heaped, _Ordered

__all__ = ["LFUHistory", "LFUDA", "PinnedHot"]


class LFUHistory(LFU):
    """LFU whose counts survive eviction (see the module docstring)."""

    __slots__ = ("_hist",)
    name = "lfu_history"

    def __init__(self, capacity: int | None = None) -> None:
        super().__init__(capacity)
        self._hist: dict[int, int] = {}

    def insert(self, key: int, next_use: float | None = None) -> None:
        if key in self._freq:
            raise ValueError(f"key {key} is already resident")
        self._tick = t = self._tick + 1
        f = self._hist.pop(key, 0) + 1
        self._freq[key] = f
        self._last[key] = t
        self._ins[key] = t
        heapq.heappush(self._heap, (f, t, key))
        if len(self._heap) > 4 * len(self._freq) + 256:
            self._compact()

    def remove(self, key: int) -> None:
        self._hist[key] = self._freq[key]
        super().remove(key)


class LFUDA(_Heaped):
    """LFU with dynamic aging (see the module docstring). The heap holds (K, tick, key) entries
    never greater than the key's true value (K only grows), popped and re-pushed lazily."""

    __slots__ = ("_cur", "_f", "_ins", "_heap", "_tick", "_age")
    name = "lfuda"

    def __init__(self, capacity: int | None = None) -> None:
        self._cur: dict[int, tuple[int, int]] = {}   # key -> (K, tick of last access)
        self._res = self._cur
        self._f: dict[int, int] = {}
        self._ins: dict[int, int] = {}
        self._heap: list[tuple[int, int, int]] = []
        self._tick = 0
        self._age = 0

    def _set(self, key: int, f: int) -> tuple[int, int]:
        self._tick = t = self._tick + 1
        v = self._cur[key] = (self._age + f, t)
        self._f[key] = f
        return v

    def insert(self, key: int, next_use: float | None = None) -> None:
        if key in self._cur:
            raise ValueError(f"key {key} is already resident")
        k, t = self._set(key, 1)
        self._ins[key] = t
        heapq.heappush(self._heap, (k, t, key))
        if len(self._heap) > 4 * len(self._cur) + 256:
            self._heap = [(k, t, key) for key, (k, t) in self._cur.items()]
            heapq.heapify(self._heap)

    def touch(self, key: int, next_use: float | None = None) -> None:
        self._set(key, self._f[key] + 1)   # KeyError if not resident

    def remove(self, key: int) -> None:
        del self._cur[key], self._f[key], self._ins[key]

    def evict(self, key: int) -> None:
        self._age = self._cur[key][0]
        self.remove(key)

    def _top(self) -> int | None:
        heap = self._heap
        k, t, key = heap[0]
        cur = self._cur.get(key)
        if cur is None or t < self._ins[key]:
            heapq.heappop(heap)
            return None
        if cur != (k, t):
            heapq.heapreplace(heap, (*cur, key))
            return None
        return key

    def priority(self, key: int) -> int:
        """The current K of a resident key."""
        return self._cur[key][0]


class PinnedHot(_Ordered):
    """LRU that never evicts the most accessed resident keys (see the module docstring).

    ``_rank`` is the sorted list of ``(count, tick of last access, key)`` of the resident keys;
    its last ``hot_n`` entries are the hot set, so the victim is the least recent key ranked
    below them (ties in count go to the more recently accessed key being hot)."""

    __slots__ = ("_count", "_hot_n", "_rank", "_cur", "_tick")
    name = "pinned_hot"

    def __init__(self, capacity: int | None = None, hot_fraction: float = 0.5) -> None:
        super().__init__(capacity)
        self._count: dict[int, int] = {}
        self._hot_n = int((capacity or 0) * hot_fraction)
        self._rank: list[tuple[int, int, int]] = []
        self._cur: dict[int, tuple[int, int, int]] = {}
        self._tick = 0

    def _access(self, key: int) -> None:
        self._tick += 1
        c = self._count[key] = self._count.get(key, 0) + 1
        old = self._cur.get(key)
        if old is not None:
            del self._rank[bisect_left(self._rank, old)]
        self._cur[key] = e = (c, self._tick, key)
        insort(self._rank, e)

    def insert(self, key: int, next_use: float | None = None) -> None:
        super().insert(key)
        self._access(key)

    def touch(self, key: int, next_use: float | None = None) -> None:
        self._od.move_to_end(key)
        self._access(key)

    def remove(self, key: int) -> None:
        super().remove(key)
        del self._rank[bisect_left(self._rank, self._cur.pop(key))]

    def hot(self) -> set[int]:
        """The resident keys held as hot now."""
        return {k for _, _, k in self._rank[len(self._rank) - self._hot_n:]} if self._hot_n else set()

    def victim(self, excluded: Container[Hashable] = ()) -> int | None:
        n = len(self._rank)
        if self._hot_n < n:
            bar, cur = self._rank[n - self._hot_n] if self._hot_n else None, self._cur
            for k in self._od:
                if k not in excluded and (bar is None or cur[k] < bar):
                    return k
        return super().victim(excluded)
