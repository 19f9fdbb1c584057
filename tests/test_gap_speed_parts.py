"""The pieces issue #16's speed work changed give exactly what they replaced: one sort for next uses
and first requests, Belady's skipped sure hits, and per-layer views made on access."""
from __future__ import annotations

import numpy as np
import pytest

from moesim.cache import chunked
from moesim.cache.chunked import belady_counts, spill_next_use
from moesim.cache.replay import miss_flags, next_use_and_first, next_use_positions
from moesim.engine.plan import _dedup_flat


@pytest.mark.parametrize("n,hi", [(1, 1), (2, 1), (7, 3), (500, 40), (300, 70_000), (200, 2 ** 40)])
def test_next_use_and_first_equals_np_unique(n, hi):
    a = np.random.default_rng(n).integers(0, hi, n)
    nxt, first = next_use_and_first(a)
    assert np.array_equal(nxt, next_use_positions(a))
    assert np.array_equal(first, np.unique(a, return_index=True)[1])


@pytest.mark.parametrize("cap", [1, 3, 8, 11])
@pytest.mark.parametrize("chunk", [16, 50, 1 << 16])
@pytest.mark.parametrize("flags", ["bytearray", "set"])
def test_belady_with_sure_hits_skipped_equals_whole_array_replay(cap, chunk, flags, monkeypatch):
    # 2 layers × 6 experts, heavy reuse: most requests' previous and next ones lie within `cap`;
    # residency as a bytearray per key, or as the set kept for key ranges too wide for one
    if flags == "set":
        monkeypatch.setattr(chunked, "TABLE_KEYS", 0)
    rng = np.random.default_rng(cap)
    s = rng.choice(12, size=3000, p=np.r_[np.full(4, 0.2), np.full(8, 0.025)])
    E, L = 6, 2
    f = spill_next_use(s, 0, 11, chunk)
    try:
        got = belady_counts(s, f, cap, 0, 11, E, L, None, chunk)
        want = np.bincount(s[miss_flags(s, cap, "belady")] // E, minlength=L)
        assert got.tolist() == want.tolist()
        for layer in range(L):
            sub = s[s // E == layer]
            got = belady_counts(s, f, cap, 0, 11, E, L, layer, chunk)
            assert got.tolist() == [int(miss_flags(sub, cap, "belady").sum()) if i == layer else 0 for i in range(L)]
    finally:
        f.close()


def test_per_layer_views_are_the_slices_they_stand_for():
    routing = np.random.default_rng(0).integers(0, 16, size=(5, 4, 3))
    keys, counts, (flat, fc, bounds) = _dedup_flat(routing, 16, True)
    want = [flat[i:j] for i, j in zip(bounds, bounds[1:])]
    assert len(keys) == 4 and [k.tolist() for k in keys] == [w.tolist() for w in want]
    assert keys[-1].tolist() == want[-1].tolist() and [k.tolist() for k in keys[1:3]] == [w.tolist() for w in want[1:3]]
    assert np.array_equal(np.concatenate(counts), fc) and int(fc.sum()) == 5 * 4 * 3
    with pytest.raises(IndexError):
        keys[4]
