"""The pieces issue #16's speed work changed give exactly what they replaced: one sort for next uses
and first requests, Belady's skipped sure hits, and per-layer views made on access."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
@pytest.mark.parametrize("flags", ["bytearray", "set", "compiled"])
def test_belady_with_sure_hits_skipped_equals_whole_array_replay(cap, chunk, flags, monkeypatch):
    # 2 layers × 6 experts, heavy reuse: most requests' previous and next ones lie within `cap`;
    # residency as a bytearray per key, or as the set kept for key ranges too wide for one, or
    # the compiled loop (chunked_jit)
    if flags == "set":
        monkeypatch.setattr(chunked, "TABLE_KEYS", 0)
    jit = flags == "compiled"
    rng = np.random.default_rng(cap)
    s = rng.choice(12, size=3000, p=np.r_[np.full(4, 0.2), np.full(8, 0.025)])
    E, L = 6, 2
    f = spill_next_use(s, 0, 11, chunk)
    try:
        got = belady_counts(s, f, cap, 0, 11, E, L, None, chunk, jit=jit)
        want = np.bincount(s[miss_flags(s, cap, "belady")] // E, minlength=L)
        assert got.tolist() == want.tolist()
        for layer in range(L):
            sub = s[s // E == layer]
            got = belady_counts(s, f, cap, 0, 11, E, L, layer, chunk, jit=jit)
            assert got.tolist() == [int(miss_flags(sub, cap, "belady").sum()) if i == layer else 0 for i in range(L)]
    finally:
        f.close()


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 400), st.integers(1, 40), st.integers(0, 60), st.sampled_from([7, 64, 1 << 16]),
       st.integers(0, 2 ** 32 - 1), st.booleans())
def test_compiled_replays_equal_the_python_loops(n, keys, cap, chunk, seed, per_layer):
    """chunked_jit's LRU and Belady loops against chunked's Python ones: the same per-layer misses
    on random streams (a key range not starting at 0, capacities below and above the distinct
    keys, chunks splitting the stream, one layer's cache or a shared one)."""
    E, L, lo = 5, 9, 3
    rng = np.random.default_rng(seed)
    s = lo + rng.integers(0, keys, n) if n % 2 else lo + (rng.zipf(1.3, n) - 1) % keys
    hi = int(s.max())
    layer = int(s[0] // E) if per_layer else None
    cap = max(cap, 1)
    want = chunked.lru_counts(s, cap, E, L, layer, chunk)
    assert chunked.lru_counts(s, cap, E, L, layer, chunk, key_range=(lo, hi), jit=True).tolist() == want.tolist()
    f = spill_next_use(s, lo, hi, chunk)
    try:
        want = belady_counts(s, f, cap, lo, hi, E, L, layer, chunk, jit=False)
        assert belady_counts(s, f, cap, lo, hi, E, L, layer, chunk, jit=True).tolist() == want.tolist()
    finally:
        f.close()


def test_replays_run_compiled_only_once_numba_is_loaded(monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "numba", raising=False)
    assert not chunked.compiled(100)
    monkeypatch.setitem(sys.modules, "numba", object())
    assert chunked.compiled(100) and not chunked.compiled(chunked.TABLE_KEYS + 1)


def test_per_layer_views_are_the_slices_they_stand_for():
    routing = np.random.default_rng(0).integers(0, 16, size=(5, 4, 3))
    keys, counts, (flat, fc, bounds) = _dedup_flat(routing, 16, True)
    want = [flat[i:j] for i, j in zip(bounds, bounds[1:])]
    assert len(keys) == 4 and [k.tolist() for k in keys] == [w.tolist() for w in want]
    assert keys[-1].tolist() == want[-1].tolist() and [k.tolist() for k in keys[1:3]] == [w.tolist() for w in want[1:3]]
    assert np.array_equal(np.concatenate(counts), fc) and int(fc.sum()) == 5 * 4 * 3
    with pytest.raises(IndexError):
        keys[4]
