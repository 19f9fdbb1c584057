"""Replays of a long key stream one chunk at a time, for the gap report: memory O(chunk + keys +
capacity) however long the stream, and exactly the misses of :func:`moesim.cache.replay.replay`.

Each replay counts misses per layer (``key // E``); ``layer`` restricts it to one layer's keys
(a per-layer cache). Belady's next uses come from :func:`spill_next_use`, a backward pass that
writes them to a temporary file, read back chunk by chunk.
"""
from __future__ import annotations

import heapq
import sys
import tempfile
from collections import OrderedDict
from typing import BinaryIO, Iterator

import numpy as np

from .policies import get_policy
from .replay import next_use_and_first

__all__ = ["CHUNK", "chunks", "spill_next_use", "lru_counts", "belady_counts", "policy_counts"]

CHUNK = 1 << 16  # requests per chunk


def chunks(stream, chunk: int = CHUNK) -> Iterator[tuple[int, np.ndarray]]:
    """(start, int64 copy of stream[start:start + chunk]) over the stream; only one chunk is copied."""
    for c0 in range(0, len(stream), chunk):
        yield c0, np.asarray(stream[c0:c0 + chunk], dtype=np.int64)


def _select(c0: int, keys: np.ndarray, E: int, layer: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The chunk's keys and their global positions, restricted to ``layer`` when given."""
    pos = np.arange(c0, c0 + keys.size, dtype=np.int64)
    if layer is None:
        return keys, pos
    m = keys // E == layer
    return keys[m], pos[m]


def spill_next_use(stream, key_lo: int, key_hi: int, chunk: int = CHUNK) -> BinaryIO:
    """A temporary file holding, as int64, the next position of each request's key in ``stream``
    (-1: never), as :func:`next_use_positions` would give, computed backwards one chunk at a time
    with a table of each key's earliest position seen so far. Keys lie in [key_lo, key_hi]."""
    n = len(stream)
    f = tempfile.TemporaryFile(prefix="moesim-next-use-")
    f.truncate(n * 8)
    table = key_hi - key_lo < 1 << 24
    later = np.full(key_hi - key_lo + 1, -1, dtype=np.int64) if table else {}  # key -> first position after the chunk
    for c0 in reversed(range(0, n, chunk)):
        keys = np.asarray(stream[c0:c0 + chunk], dtype=np.int64) - key_lo
        nxt, first = next_use_and_first(keys)
        tail = nxt < 0                                     # the key's last request in this chunk
        nxt[~tail] += c0
        uniq = keys[first]
        if table:
            nxt[tail] = later[keys[tail]]
            later[uniq] = first + c0
        else:
            nxt[tail] = [later.get(k, -1) for k in keys[tail].tolist()]
            later.update(zip(uniq.tolist(), (first + c0).tolist()))
        f.seek(c0 * 8)
        nxt.astype("<i8").tofile(f)
    return f


def _read(f: BinaryIO, c0: int, count: int) -> np.ndarray:
    f.seek(c0 * 8)
    return np.fromfile(f, dtype="<i8", count=count)


def compiled(K: int) -> bool:
    """Whether the replays run compiled (moesim.cache.chunked_jit) for keys spanning `K` offsets:
    when numba is loaded already (importing it costs ~0.9 s, more than it saves on a million
    accesses) and a flag per key fits."""
    return "numba" in sys.modules and K <= TABLE_KEYS


def lru_counts(stream, cap: int, E: int, L: int, layer: int | None = None, chunk: int = CHUNK,
               key_range: tuple[int, int] | None = None, jit: bool | None = None) -> np.ndarray:
    """Per-layer LRU misses (OrderedDict loop over each chunk's keys; compiled, the same loop on
    arrays over the key offsets of `key_range` (lo, hi), where `compiled` says or `jit` asks)."""
    out = np.zeros(L, dtype=np.int64)
    if key_range is not None and (compiled(key_range[1] - key_range[0] + 1) if jit is None else jit):
        from .chunked_jit import LRUState, lru_chunk
        lo = key_range[0]
        state, buf = LRUState(key_range[1] - lo + 1), np.empty(chunk, dtype=np.int64)
        for c0, keys in chunks(stream, chunk):
            keys, _ = _select(c0, keys, E, layer)
            m = lru_chunk(state.link, keys - lo, cap, buf)
            out += _per_layer(buf[:m] + lo, E, L)
        return out
    od: OrderedDict[int, None] = OrderedDict()
    to_end, evict = od.move_to_end, od.popitem
    size = 0
    for c0, keys in chunks(stream, chunk):
        keys, _ = _select(c0, keys, E, layer)
        missed = []
        for x in keys.tolist():
            if x in od:
                to_end(x)
                continue
            missed.append(x)
            if size < cap:
                size += 1
            else:
                evict(False)
            od[x] = None
        out += _per_layer(missed, E, L)
    return out


TABLE_KEYS = 1 << 24  # key ranges up to which a replay keeps a flag per key


def _per_layer(missed: list[int], E: int, L: int) -> np.ndarray:
    return np.bincount(np.asarray(missed, dtype=np.int64) // E, minlength=L)[:L]


def belady_counts(stream, nxt_file: BinaryIO, cap: int, key_lo: int, key_hi: int, E: int, L: int,
                  layer: int | None = None, chunk: int = CHUNK, jit: bool | None = None) -> np.ndarray:
    """Per-layer misses of Belady's MIN, as moesim.cache.replay._replay_belady, reading the next
    uses from ``nxt_file`` (:func:`spill_next_use`). A heap entry is -(next use * K + key offset),
    so the evicted key is read off the entry instead of looked up in the stream; residency is a
    flag per key offset (a bytearray, or a set for a key range over TABLE_KEYS). Compiled (where
    `compiled` says or `jit` asks), each chunk's loop is one call of chunked_jit.belady_chunk."""
    n = len(stream)
    K = key_hi - key_lo + 1
    out = np.zeros(L, dtype=np.int64)
    jit = compiled(K) if jit is None else jit
    resident = (np.zeros(K, dtype=np.uint8) if jit else bytearray(K)) if K <= TABLE_KEYS else _FlagSet()
    heap: list[int] = []
    push, pop, replace = heapq.heappush, heapq.heappop, heapq.heapreplace
    limit = 8 * cap + 1024
    size = 0
    if jit:
        from .chunked_jit import belady_chunk
        harr, hn, buf = np.empty(limit + 2, dtype=np.int64), 0, np.empty(chunk, dtype=np.int64)  # (the heap)
    for c0, keys in chunks(stream, chunk):
        keys, pos = _select(c0, keys, E, layer)
        nxt = _read(nxt_file, c0, min(chunk, n - c0))
        keep = ~_near_previous(nxt, c0, pos, cap)
        if layer is not None:
            nxt = nxt[pos - c0]
        off = keys - key_lo
        neg = _heap_values(nxt, pos, off, n, K, cap)
        keep |= neg != 0  # (the rest: sure hits that push nothing)
        if jit:
            if hn + off.size + 2 > harr.size:  # (hits push without evicting: the heap can outgrow the limit)
                harr = np.concatenate([harr, np.empty(harr.size + off.size, dtype=np.int64)])
            hn, size, m = belady_chunk(resident, harr, hn, size, cap, K, off[keep], neg[keep], buf)
            out += _per_layer(buf[:m] + key_lo, E, L)
            continue
        missed = []
        for x, nv in zip(off[keep].tolist(), neg[keep].tolist()):
            if resident[x]:
                if nv:
                    push(heap, nv)
                continue
            missed.append(x)
            if size < cap:
                size += 1
                if nv:
                    push(heap, nv)
            else:
                v = replace(heap, nv) if nv else pop(heap)
                resident[(-v) % K] = 0
                if len(heap) > limit:
                    heap.sort()
                    del heap[size:]
            resident[x] = 1
        out += _per_layer(np.asarray(missed, dtype=np.int64) + key_lo, E, L)
    return out


class _FlagSet(set):
    """Residency flags by key offset as a set, for key ranges too wide for a bytearray."""

    def __getitem__(self, x: int) -> bool:
        return x in self

    def __setitem__(self, x: int, flag: int) -> None:
        if flag:
            self.add(x)
        else:
            self.discard(x)


def _near_previous(nxt: np.ndarray, c0: int, pos: np.ndarray, cap: int) -> np.ndarray:
    """Per request at ``pos``: whether its key's previous request is at most ``cap`` positions
    before it, in this chunk (the chunk's next uses at ``c0``; ``pos`` a subset of its positions).
    Such a key was not pushed on the heap then, so MIN kept it: the request hits."""
    end = c0 + nxt.size
    near = np.zeros(nxt.size, dtype=bool)
    j = np.flatnonzero((nxt >= 0) & (nxt < end) & (nxt - np.arange(c0, end) <= cap))
    near[nxt[j] - c0] = True
    return near[pos - c0]


def _heap_values(nxt: np.ndarray, pos: np.ndarray, off: np.ndarray, n: int, K: int, cap: int) -> np.ndarray:
    """-(next use * K + key offset) per request, "never" as 2n-1-pos (later than any position, and
    the least recently used first), and 0 (push nothing) for a next use at most ``cap`` positions
    on: MIN cannot evict such a key before it (see replay._replay_belady)."""
    dead = nxt < 0
    short = (nxt - pos <= cap) & ~dead
    v = np.where(dead, 2 * n - 1 - pos, nxt)
    v *= K
    v += off
    np.negative(v, out=v)
    v[short] = 0
    return v


def policy_counts(stream, policy: str, cap: int, E: int, L: int, layer: int | None = None,
                  chunk: int = CHUNK) -> np.ndarray:
    """Per-layer misses of any policy without next uses, driven through its incremental class (as
    moesim.cache.replay._incremental_flags)."""
    out = np.zeros(L, dtype=np.int64)
    pol = get_policy(policy, cap)
    touch, insert, miss, victim, evict = pol.touch, pol.insert, pol.miss, pol.victim, pol.evict
    for c0, keys in chunks(stream, chunk):
        keys, _ = _select(c0, keys, E, layer)
        missed = []
        for x in keys.tolist():
            if x in pol:
                touch(x, None)
                continue
            miss(x)
            missed.append(x)
            if len(pol) >= cap:
                evict(victim())
            insert(x, None)
        out += _per_layer(missed, E, L)
    return out
