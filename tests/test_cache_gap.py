"""The chunked, memory-flat gap report gives the numbers of the whole-array replays it replaced."""
from __future__ import annotations

import numpy as np
import pytest

from moesim.cache.chunked import spill_next_use
from moesim.cache.gap import REFERENCES, captured, gap_report
from moesim.cache.replay import miss_flags, next_use_positions, replay


def reference_report(stream, policy, partition, capacity, E, L):
    """The gap report as it was computed before: whole-array miss_flags / replay per policy."""
    s = np.asarray(stream, dtype=np.int64)
    layer = s // E
    pols = dict.fromkeys(REFERENCES + (policy,))
    if partition == "global":
        m = {p: np.bincount(layer[miss_flags(s, int(capacity), p)], minlength=L)[:L].tolist() for p in pols}
    else:
        caps = [capacity] * L if np.ndim(capacity) == 0 else list(capacity)
        subs = [s[layer == i] for i in range(L)]
        m = {p: [replay(x, int(c), p).misses for x, c in zip(subs, caps)] for p in pols}
    lru, bel, pol = m["lru"], m["belady"], m[policy]
    acc = np.bincount(layer, minlength=L)[:L].tolist()
    return {"policy": policy, "partition": partition, "accesses": int(s.size),
            "lru_misses": sum(lru), "belady_misses": sum(bel), "policy_misses": sum(pol),
            "captured": captured(sum(lru), sum(bel), sum(pol)),
            "layers": [{"layer": i, "accesses": n, "lru_misses": a, "belady_misses": b, "policy_misses": p,
                        "captured": captured(a, b, p)} for i, (n, a, b, p) in enumerate(zip(acc, lru, bel, pol))]}


def engine_like_stream(tokens, L, E, k, seed):
    """Per token, per layer, k distinct experts drawn from a skewed, layer-shifted popularity."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, E + 1) ** 1.1
    p /= p.sum()
    out = [l * E + (rng.choice(E, size=k, replace=False, p=p) + 3 * l) % E
           for _ in range(tokens) for l in range(L)]
    return np.concatenate(out)


@pytest.mark.parametrize("policy", ["lru", "fifo", "lfu", "belady", "arc", "s3fifo"])
@pytest.mark.parametrize("partition,capacity", [("global", 40), ("per_layer", 6), ("per_layer", [0, 3, 9, 30])])
def test_chunked_gap_report_equals_whole_array_replays(policy, partition, capacity):
    L, E = 4, 32
    s = engine_like_stream(300, L, E, 4, seed=len(policy))
    want = reference_report(s, policy, partition, capacity, E, L)
    for chunk in (97, 1 << 16):
        got = gap_report(s.astype(np.int32), policy, partition, capacity, E, L, chunk=chunk)
        assert got == want, chunk
    assert want["lru_misses"] > want["belady_misses"] > 0   # the traces exercise evictions


def test_spilled_next_use_equals_whole_array():
    rng = np.random.default_rng(5)
    for s in (rng.integers(3, 40, 1000), rng.integers(0, 2 ** 40, 300) % 50 * 2 ** 30):
        f = spill_next_use(s, int(s.min()), int(s.max()), chunk=64)
        f.seek(0)
        assert np.array_equal(np.fromfile(f, dtype="<i8"), next_use_positions(s))
        f.close()


def test_gap_report_empty_stream():
    r = gap_report(np.zeros(0, dtype=np.int32), "lru", "global", 4, 8, 2)
    assert r["accesses"] == 0 and r["lru_misses"] == 0 and [x["accesses"] for x in r["layers"]] == [0, 0]
