"""The LRU -> Belady gap report: per layer, how much of the miss gap between LRU and Belady's
optimum a policy closes, from a replay of one access stream (keys ``layer * E + expert``).

``captured = (LRU misses - policy misses) / (LRU misses - Belady misses)``: 0 is no better than
LRU, 1 is the optimum, negative is worse than LRU; None where LRU is already optimal. A shared
(``global``) cache is replayed as one stream and its misses are attributed to the layer of each
request; a per-layer cache is replayed layer by layer at that layer's capacity.

The stream is read one chunk at a time (:mod:`moesim.cache.chunked`) and Belady's next uses are
spilled to a temporary file, so the report's memory does not grow with the stream.
"""
from __future__ import annotations

import numpy as np

from .chunked import CHUNK, belady_counts, chunks, lru_counts, policy_counts, spill_next_use
from .policies import policy_class

__all__ = ["gap_report", "captured"]

REFERENCES = ("lru", "belady")


def captured(lru: int, belady: int, policy: int) -> float | None:
    gap = lru - belady
    return None if gap <= 0 else (lru - policy) / gap


def _scan(stream, E: int, L: int, chunk: int) -> tuple[np.ndarray, int, int]:
    """Accesses per layer and the smallest and largest key, in one chunked pass."""
    acc = np.zeros(L, dtype=np.int64)
    lo, hi = 0, -1
    for c0, keys in chunks(stream, chunk):
        acc += np.bincount(keys // E, minlength=L)[:L]
        lo, hi = (int(keys.min()), int(keys.max())) if c0 == 0 else (min(lo, int(keys.min())), max(hi, int(keys.max())))
    return acc, lo, hi


def _misses(stream, pol: str, caps: list[int], acc: np.ndarray, nxt, lo: int, hi: int, E: int, L: int,
            chunk: int) -> list[int]:
    """Per-layer misses of ``pol``: one cache of caps[0] (global, len(caps) == 1) or one per layer."""
    layers = [None] if len(caps) == 1 else range(L)
    out = np.zeros(L, dtype=np.int64)
    for layer, cap in zip(layers, caps):
        if cap == 0:
            out += acc if layer is None else np.where(np.arange(L) == layer, acc, 0)
        elif pol == "lru":
            out += lru_counts(stream, cap, E, L, layer, chunk, key_range=(lo, hi))
        elif pol == "belady":
            out += belady_counts(stream, nxt, cap, lo, hi, E, L, layer, chunk)
        else:
            out += policy_counts(stream, pol, cap, E, L, layer, chunk)
    return out.tolist()


def gap_report(stream, policy: str, partition: str, capacity, num_experts: int, num_layers: int,
               chunk: int = CHUNK) -> dict:
    """The report for one bounded tier: per-layer misses of lru, belady and ``policy`` and the
    fraction of the gap captured, plus the totals. ``capacity``: an int (shared, or the same for
    every layer) or one int per layer. ``stream``: any sliceable sequence of int keys (a numpy
    array of any int dtype, or the engine's on-disk KeyLog, is read without a whole-stream copy)."""
    policy_class(policy)  # raises the KeyError listing the known names
    s = np.asarray(stream, dtype=np.int64) if isinstance(stream, (list, tuple, range)) else stream
    E, L = num_experts, num_layers
    if partition == "global":
        caps = [int(capacity)]
    else:
        caps = [int(c) for c in ([capacity] * L if np.ndim(capacity) == 0 else list(capacity))]
    acc, lo, hi = _scan(s, E, L, chunk)
    pols = list(dict.fromkeys(REFERENCES + (policy,)))
    nxt = spill_next_use(s, lo, hi, chunk) if len(s) else None
    try:
        m = {p: _misses(s, p, caps, acc, nxt, lo, hi, E, L, chunk) for p in pols}
    finally:
        if nxt is not None:
            nxt.close()
    lru, bel, pol = m["lru"], m["belady"], m[policy]
    layers = [{"layer": i, "accesses": int(n), "lru_misses": a, "belady_misses": b, "policy_misses": p,
               "captured": captured(a, b, p)}
              for i, (n, a, b, p) in enumerate(zip(acc.tolist(), lru, bel, pol))]
    return {"policy": policy, "partition": partition, "accesses": int(len(s)),
            "lru_misses": sum(lru), "belady_misses": sum(bel), "policy_misses": sum(pol),
            "captured": captured(sum(lru), sum(bel), sum(pol)), "layers": layers}
