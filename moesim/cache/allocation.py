"""How a per-layer cache's total budget is split across layers: ``uniform``, ``proportional``
(to each layer's effective number of experts, ``exp(routing entropy)``) or ``optimal`` (the split
that minimises the total replay misses, from each layer's miss curve, by dynamic programming).

Every layer gets at least ``lo`` slots (top_k: a token's experts must fit together) and at most
``hi`` (its number of experts). Pure: streams in, capacities out.
"""
from __future__ import annotations

import numpy as np

from .replay import replay, replay_steps

__all__ = ["ALLOCATIONS", "miss_curve", "allocate", "effective_experts", "proportional", "optimal"]

ALLOCATIONS = ("uniform", "proportional", "optimal")


def _lru_curve(stream, hi: int) -> np.ndarray:
    """LRU misses at every capacity 0..hi from one pass (LRU is a stack algorithm: a request hits
    at capacity c iff its stack distance is < c)."""
    stack: list[int] = []
    dist = np.zeros(hi + 2, dtype=np.int64)   # dist[d]: requests at stack distance d (hi+1: farther/cold)
    for x in stream:
        try:
            d = stack.index(x)
        except ValueError:
            dist[hi + 1] += 1
            stack.insert(0, x)
            continue
        dist[min(d, hi + 1)] += 1
        del stack[d]
        stack.insert(0, x)
    hits_at = np.concatenate(([0], np.cumsum(dist[:hi + 1])))[: hi + 1]
    return len(stream) - hits_at


def miss_curve(stream, policy: str, hi: int, lo: int = 0, groups=None) -> np.ndarray:
    """Misses of ``policy`` on ``stream`` at every capacity 0..hi (entries below ``lo`` are
    not computed: +inf). One pass for lru; one replay per capacity for the others. With
    ``groups`` (the stream cut into engine steps of this layer) the replay pins each step's keys
    as the engine does (:func:`moesim.cache.replay.replay_steps`; not for belady)."""
    s = np.asarray(stream, dtype=np.int64)
    if groups is not None and policy != "belady":
        out = np.array([replay_steps(groups, c, policy).misses if c >= lo else 0 for c in range(hi + 1)],
                       dtype=float)
    elif policy == "lru":
        out = _lru_curve(s.tolist(), hi).astype(float)
    else:
        out = np.array([replay(s, c, policy).misses if c >= lo else 0 for c in range(hi + 1)], dtype=float)
    out[:lo] = np.inf
    return out


def _check(n_layers: int, budget: int, lo: int, hi: int) -> None:
    if not n_layers * lo <= budget:
        raise ValueError(f"a budget of {budget} slots cannot give {n_layers} layers {lo} each")


def effective_experts(stream, num_experts: int) -> float:
    """``exp`` of the entropy of a layer's expert frequencies (1 .. num_experts)."""
    c = np.bincount(np.asarray(stream, dtype=np.int64) % num_experts, minlength=num_experts).astype(float)
    if c.sum() == 0:
        return 1.0
    p = c[c > 0] / c.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def proportional(weights, budget: int, lo: int, hi: int) -> list[int]:
    """Split ``budget`` in proportion to ``weights`` (largest remainders), each in [lo, hi]."""
    w = np.asarray(weights, dtype=float)
    n = w.size
    _check(n, budget, lo, hi)
    budget = min(budget, n * hi)
    caps = np.full(n, lo, dtype=np.int64)
    free = np.ones(n, dtype=bool)
    while caps.sum() < budget and free.any():
        left = budget - caps.sum()
        ww = np.where(free, w, 0.0)
        share = ww / ww.sum() * left if ww.sum() > 0 else free / free.sum() * left
        add = np.minimum(np.floor(share).astype(np.int64), hi - caps)
        if add.sum() == 0:   # hand out the remainders one by one, largest first
            order = np.argsort(-(share - np.floor(share)), kind="stable")
            for i in order[:left]:
                if free[i] and caps[i] < hi:
                    caps[i] += 1
        caps += add
        free = caps < hi
    return caps.tolist()


def optimal(curves, budget: int, lo: int, hi: int) -> list[int]:
    """Capacities (each in [lo, hi], summing to at most ``budget``) minimising the total misses,
    given each layer's miss curve (misses at capacity 0..hi). Exact, by dynamic programming over
    layers and budget: O(layers x budget x (hi - lo)) numpy work."""
    n = len(curves)
    _check(n, budget, lo, hi)
    budget = min(budget, n * hi)
    best = np.zeros(budget + 1)            # best[b]: least misses of the layers so far with <= b slots
    choice = np.zeros((n, budget + 1), dtype=np.int64)
    for i, m in enumerate(curves):
        new = np.full(budget + 1, np.inf)
        for c in range(lo, min(hi, budget) + 1):
            cand = np.full(budget + 1, np.inf)
            cand[c:] = best[: budget + 1 - c] + m[c]
            better = cand < new
            new[better], choice[i, better] = cand[better], c
        best = new
    caps, b = [0] * n, budget
    for i in range(n - 1, -1, -1):
        caps[i] = int(choice[i, b])
        b -= caps[i]
    return caps


def allocate(kind: str, streams, budget: int, lo: int, hi: int, policy: str, num_experts: int,
             groups=None) -> list[int]:
    """Per-layer capacities for allocation ``kind`` from each layer's key stream (and, for
    ``optimal``, optionally each layer's stream cut into engine steps: see :func:`miss_curve`)."""
    n = len(streams)
    if kind == "uniform":
        return [min(hi, budget // n)] * n
    if kind == "proportional":
        return proportional([effective_experts(s, num_experts) for s in streams], budget, lo, hi)
    if kind == "optimal":
        gs = groups if groups is not None else [None] * n
        return optimal([miss_curve(s, policy, hi, lo, g) for s, g in zip(streams, gs)], budget, lo, hi)
    raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {kind!r}")
