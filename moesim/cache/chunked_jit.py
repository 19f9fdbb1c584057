"""The gap report's LRU and Belady replays (moesim.cache.chunked) compiled with numba: the same
loops over a chunk's keys, with their state in arrays over the key range, so each chunk is one
call. chunked.py uses them once numba is loaded anyway (the flat prefetch path loads it): loading
it for these alone costs more than they save at a million accesses.
"""
from __future__ import annotations

import numpy as np
from numba import njit


class LRUState:
    """An LRU cache of key offsets [0, K): a doubly linked list in recency order (head: the least
    recently used) and its size."""

    def __init__(self, K: int):
        self.link = np.full((3, K + 1), -1, dtype=np.int64)  # rows: next, previous, resident; [0, K]: head, tail, size
        self.link[2] = 0


@njit(cache=True, nogil=True)
def lru_chunk(link, keys, cap, missed):
    """The LRU replay of `keys` (offsets) at capacity `cap`: writes the missed ones to `missed`
    and returns how many."""
    K = link.shape[1] - 1
    nxt, prv, res = link[0], link[1], link[2]
    m = 0
    for x in keys:
        if res[x]:
            if nxt[x] >= 0:  # (not the most recent already): to the tail
                p, n = prv[x], nxt[x]
                if p >= 0:
                    nxt[p] = n
                else:
                    nxt[K] = n
                prv[n] = p
                t = prv[K]
                nxt[t], prv[x], nxt[x], prv[K] = x, t, -1, x
            continue
        missed[m] = x
        m += 1
        if res[K] < cap:
            res[K] += 1
        else:  # evict the head
            h = nxt[K]
            n = nxt[h]
            nxt[K] = n
            if n >= 0:
                prv[n] = -1
            else:
                prv[K] = -1
            res[h] = 0
        t = prv[K]
        prv[x], nxt[x] = t, -1
        if t >= 0:
            nxt[t] = x
        else:
            nxt[K] = x
        prv[K] = x
        res[x] = 1
    return m


@njit(cache=True, nogil=True)
def _sift_down(heap, n, i):
    v = heap[i]
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and heap[c + 1] < heap[c]:
            c += 1
        if heap[c] < v:
            heap[i] = heap[c]
            i = c
        else:
            break
    heap[i] = v


@njit(cache=True, nogil=True)
def _push(heap, n, v):
    """heappush of `v` on the heap's `n` entries; returns the new count."""
    heap[n] = v
    _sift_up(heap, n)
    return n + 1


@njit(cache=True, nogil=True)
def _sift_up(heap, i):
    v = heap[i]
    while i > 0:
        p = (i - 1) >> 1
        if v < heap[p]:
            heap[i] = heap[p]
            i = p
        else:
            break
    heap[i] = v


@njit(cache=True, nogil=True)
def belady_chunk(resident, heap, hn, size, cap, K, offs, negs, missed):
    """chunked.belady_counts' loop over one chunk's requests (key offsets `offs`, heap values
    `negs`): a min-heap of distinct values, so it pops what heapq would. `heap` holds `hn` entries
    and has room for the limit's compaction. Returns (entries, cache size, misses written)."""
    limit = 8 * cap + 1024
    m = 0
    for i in range(offs.shape[0]):
        x, nv = offs[i], negs[i]
        if resident[x]:
            if nv:
                hn = _push(heap, hn, nv)
            continue
        missed[m] = x
        m += 1
        if size < cap:
            size += 1
            if nv:
                hn = _push(heap, hn, nv)
        else:
            v = heap[0]
            if nv:  # heapreplace
                heap[0] = nv
            else:  # heappop
                hn -= 1
                heap[0] = heap[hn]
            _sift_down(heap, hn, 0)
            resident[(-v) % K] = 0
            if hn > limit:
                heap[:hn].sort()
                hn = size if size < hn else hn
        resident[x] = 1
    return hn, size, m
