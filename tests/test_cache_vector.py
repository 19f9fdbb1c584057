"""The array formulations of LRU and FIFO (moesim.cache.vector) against the per-request loops."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moesim.cache.replay import _flags_lru, _replay_fifo, _replay_lru
from moesim.cache.vector import fifo_misses, lru_misses


def _zipf(n, universe, alpha, seed):
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, universe + 1) ** alpha
    return rng.permutation(universe)[rng.choice(universe, size=n, p=p / p.sum())].astype(np.int64)


@pytest.mark.parametrize("cap", [1, 2, 7, 64, 300, 2999, 5000])
def test_vector_lru_fifo_equal_loops_on_zipf(cap):
    a = _zipf(60_000, 3000, 1.2, cap)
    want = _replay_lru(a.tolist(), cap)
    flags = np.zeros(a.size, dtype=bool)
    assert lru_misses(a, cap, flags) == want
    ref = np.zeros(a.size, dtype=bool)
    _flags_lru(a, cap, ref)
    assert np.array_equal(flags, ref)
    assert fifo_misses(a, cap) == _replay_fifo(a.tolist(), cap)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=1, max_size=400), st.integers(1, 14),
       st.sampled_from([(1, 0), (1, -9), (70_001, 3)]))
def test_vector_lru_fifo_equal_loops(stream, cap, relabel):
    scale, shift = relabel
    a = np.asarray(stream, dtype=np.int64) * scale + shift
    flags = np.zeros(a.size, dtype=bool)
    assert lru_misses(a, cap, flags) == _replay_lru(a.tolist(), cap)
    ref = np.zeros(a.size, dtype=bool)
    _flags_lru(a, cap, ref)
    assert np.array_equal(flags, ref)
    assert fifo_misses(a, cap) == _replay_fifo(a.tolist(), cap)


def test_fifo_declines_ids_too_wide_for_a_table():
    assert fifo_misses(np.array([0, 2 ** 40, 0]), 1) is None
