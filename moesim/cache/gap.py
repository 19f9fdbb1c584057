"""The LRU -> Belady gap report: per layer, how much of the miss gap between LRU and Belady's
optimum a policy closes, from a replay of one access stream (keys ``layer * E + expert``).

``captured = (LRU misses - policy misses) / (LRU misses - Belady misses)``: 0 is no better than
LRU, 1 is the optimum, negative is worse than LRU; None where LRU is already optimal. A shared
(``global``) cache is replayed as one stream and its misses are attributed to the layer of each
request; a per-layer cache is replayed layer by layer at that layer's capacity.
"""
from __future__ import annotations

import numpy as np

from .replay import miss_flags, replay

__all__ = ["gap_report", "captured"]

REFERENCES = ("lru", "belady")


def captured(lru: int, belady: int, policy: int) -> float | None:
    gap = lru - belady
    return None if gap <= 0 else (lru - policy) / gap


def _global(stream: np.ndarray, cap: int, policy: str, E: int, L: int) -> dict[str, list[int]]:
    layer = stream // E
    out = {}
    for pol in dict.fromkeys(REFERENCES + (policy,)):
        flags = miss_flags(stream, cap, pol)
        out[pol] = np.bincount(layer[flags], minlength=L)[:L].tolist()
    return out


def _per_layer(stream: np.ndarray, caps, policy: str, E: int, L: int) -> dict[str, list[int]]:
    layer = stream // E
    subs = [stream[layer == i] for i in range(L)]
    return {pol: [replay(s, int(c), pol).misses for s, c in zip(subs, caps)]
            for pol in dict.fromkeys(REFERENCES + (policy,))}


def gap_report(stream, policy: str, partition: str, capacity, num_experts: int, num_layers: int) -> dict:
    """The report for one bounded tier: per-layer misses of lru, belady and ``policy`` and the
    fraction of the gap captured, plus the totals. ``capacity``: an int (shared, or the same for
    every layer) or one int per layer."""
    s = np.asarray(stream, dtype=np.int64)
    E, L = num_experts, num_layers
    if partition == "global":
        m = _global(s, int(capacity), policy, E, L)
    else:
        caps = [capacity] * L if np.ndim(capacity) == 0 else list(capacity)
        m = _per_layer(s, caps, policy, E, L)
    lru, bel, pol = m["lru"], m["belady"], m[policy]
    layers = [{"layer": i, "accesses": int(n), "lru_misses": a, "belady_misses": b, "policy_misses": p,
               "captured": captured(a, b, p)}
              for i, (n, a, b, p) in enumerate(zip(np.bincount(s // E, minlength=L)[:L].tolist(), lru, bel, pol))]
    return {"policy": policy, "partition": partition, "accesses": int(s.size),
            "lru_misses": sum(lru), "belady_misses": sum(bel), "policy_misses": sum(pol),
            "captured": captured(sum(lru), sum(bel), sum(pol)), "layers": layers}
