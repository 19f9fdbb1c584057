"""LRU and FIFO replays that do most of their work in numpy, with exactly the counts of the
per-request loops in :mod:`moesim.cache.replay` (which stay as the reference; the tests compare).

They start from exact reductions of the stream:

* an immediate repeat (the id just requested) is a hit and changes neither LRU's nor FIFO's state,
  so it is dropped;
* for LRU, a request whose previous request of the same id is at most ``cap`` positions back is a
  hit (at most ``cap - 1`` other ids were used in between). (FIFO has no such test: its hits
  depend on when the id was inserted, not last used; it runs request by request on dense ids.)

LRU then needs no per-hit work at all: an id is resident iff its previous request has not yet been
passed by the eviction pointer, which walks, in request order, the requests whose next use is far
(more than ``cap`` later, or never): the least recently used resident id is the first one of those
not yet re-requested. Only the far requests are visited by the Python loop.
"""
from __future__ import annotations

import numpy as np

__all__ = ["lru_misses", "fifo_misses"]


def _dedup(a: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``a`` without immediate repeats, and the kept positions (None when nothing was dropped)."""
    keep = np.empty(a.size, dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    if keep.all():
        return a, None
    idx = np.flatnonzero(keep)
    return a[idx], idx


def _dense(a: np.ndarray) -> np.ndarray | None:
    """Ids relabelled 0.. by decreasing frequency (most requests then turn into CPython's cached
    small ints), or None when the ids span too wide a range for a count table. LRU and FIFO do not
    look at id values, so their counts are unchanged."""
    lo, hi = int(a.min()), int(a.max())
    if hi - lo >= 1 << 22:
        return None
    b = a - lo if lo else a
    cnt = np.bincount(b)
    rank = np.empty(cnt.size, dtype=np.int64)
    rank[np.argsort(-cnt, kind="stable")] = np.arange(cnt.size)
    return rank[b]


def _prev_positions(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(prev, last): for every position the previous position of the same id (-1 if none), as
    int32, and the positions of each id's last request."""
    from .replay import _sort_keys

    n = a.size
    order = np.argsort(_sort_keys(a), kind="stable")
    s = a[order]
    same = s[1:] == s[:-1]
    o = order.astype(np.int32 if n < 1 << 31 else np.int64)
    prv = np.empty(n, dtype=o.dtype)
    prv[o[1:]] = np.where(same, o[:-1], -1)
    prv[o[0]] = -1
    return prv, np.append(o[:-1][~same], o[-1])


def _lru_plan(a: np.ndarray, cap: int):
    """The far requests of ``a`` (candidates that may miss), each with the eviction-queue index of
    its previous request (-1: first request), and per queue entry the candidate index of its
    next request (len(candidates): never)."""
    n = a.size
    prv, last = _prev_positions(a)
    far = np.arange(n, dtype=prv.dtype)
    far -= prv
    cand = np.flatnonzero((far > cap) | (prv < 0))
    del far
    m = cand.size
    cprv = prv[cand]
    del prv
    seen = cprv >= 0
    qpos = cprv[seen]
    qnext = np.empty(n, dtype=np.int64)       # valid at queue positions only
    qnext[qpos] = np.flatnonzero(seen)
    qnext[last] = m
    inq = np.zeros(n, dtype=bool)
    inq[qpos] = True
    inq[last] = True
    queue = np.flatnonzero(inq)
    del inq
    qidx = np.empty(n, dtype=np.int64)        # valid at queue positions only
    qidx[queue] = np.arange(queue.size)
    cq = np.full(m, -1, dtype=np.int64)
    cq[seen] = qidx[qpos]
    return cand, cq, np.append(qnext[queue], m)


def _lru_loop(cq, qnext, cap: int, flags: list[int] | None) -> int:
    """The eviction pointer's walk (see the module docstring) over the candidates' queue indices
    `cq` and the queue entries' next candidates `qnext`: int sequences (memoryviews of int64
    arrays, which the loop reads faster than it reads lists made of them)."""
    misses = size = qi = 0
    for c, p in enumerate(cq):
        if p >= qi:                  # its previous request is still queued: resident
            continue
        misses += 1
        if flags is not None:
            flags.append(c)
        if size < cap:
            size += 1
            continue
        while qnext[qi] < c:         # re-requested since: not the least recently used
            qi += 1
        qi += 1                      # evict it
    return misses


def lru_misses(a: np.ndarray, cap: int, out: np.ndarray | None = None) -> int:
    """LRU misses of the int stream ``a`` at capacity ``cap`` >= 1; with ``out`` (bool, len(a))
    also sets out[i] for every missing request."""
    if a.size == 0:
        return 0
    b, kept = _dedup(a)
    cand, cq, qnext = _lru_plan(b, cap)
    flags: list[int] | None = [] if out is not None else None
    misses = _lru_loop(memoryview(cq), memoryview(qnext), cap, flags)
    if out is not None:
        pos = cand[np.asarray(flags, dtype=np.int64)]
        out[pos if kept is None else kept[pos]] = True
    return misses


def _fifo_loop(reqs, cap: int, universe: int) -> int:
    """FIFO misses of the dense ids `reqs` (an int sequence: a memoryview of an int64 array)."""
    resident = bytearray(universe)
    ring = [0] * cap   # ring[p] is the oldest resident id once the cache is full
    p = size = misses = 0
    for x in reqs:
        if resident[x]:
            continue
        misses += 1
        if size < cap:
            size += 1
        else:
            resident[ring[p]] = 0
        ring[p] = x
        resident[x] = 1
        p += 1
        if p == cap:
            p = 0
    return misses


def fifo_misses(a: np.ndarray, cap: int) -> int | None:
    """FIFO misses of the int stream ``a`` at capacity ``cap`` >= 1, or None when its ids span too
    wide a range for the dense table (the caller then uses the set-based loop)."""
    if a.size == 0:
        return 0
    d = _dense(a)
    if d is None:
        return None
    d, _ = _dedup(d)
    return _fifo_loop(memoryview(np.ascontiguousarray(d, dtype=np.int64)), cap, int(d.max()) + 1)
