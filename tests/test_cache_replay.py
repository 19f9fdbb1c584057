"""replay()'s specialised loops against the incremental policy classes; next-use helpers."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moesim.cache import NextUse, ReplayResult, next_use_positions, replay, replay_incremental

POLICIES = ["lru", "fifo", "lfu", "belady"]


@st.composite
def streams(draw):
    alphabet = draw(st.integers(1, 16))
    stream = draw(st.lists(st.integers(0, alphabet - 1), min_size=0, max_size=300))
    cap = draw(st.integers(0, alphabet + 1))
    # relabel ids: small, negative, or spread wider than 2**16 (the non-radix path)
    scale, shift = draw(st.sampled_from([(1, 0), (1, -7), (100_003, 5), (-3, 2 ** 40)]))
    return [x * scale + shift for x in stream], cap


@settings(max_examples=300, deadline=None)
@given(streams())
def test_fast_paths_equal_incremental_classes(sc):
    stream, cap = sc
    for pol in POLICIES:
        fast = replay(stream, cap, pol)
        slow = replay_incremental(stream, cap, pol)
        assert fast == slow, pol
        assert fast.hits + fast.misses == len(stream)


@settings(max_examples=200, deadline=None)
@given(streams())
def test_miss_flags_fast_loops_equal_incremental_classes(sc):
    """miss_flags' lru/belady loops flag exactly the requests the policy classes miss."""
    from moesim.cache.replay import _incremental_flags, miss_flags

    stream, cap = sc
    for pol in ("lru", "belady"):
        assert np.array_equal(miss_flags(stream, cap, pol), _incremental_flags(stream, cap, pol)), pol


def test_fast_paths_equal_incremental_zipf():
    rng = np.random.default_rng(3)
    p = 1.0 / np.arange(1, 501) ** 1.1
    s = rng.choice(500, size=30_000, p=p / p.sum())
    for cap in (1, 7, 50, 200):
        for pol in POLICIES:
            assert replay(s, cap, pol) == replay_incremental(s, cap, pol), (pol, cap)


def test_replay_inputs():
    arr = np.array([3, 1, 3, 2, 1], dtype=np.int16)
    for pol in POLICIES:
        assert replay(arr, 2, pol) == replay(arr.tolist(), 2, pol) == replay(iter(arr.tolist()), 2, pol)
        assert replay([], 3, pol) == ReplayResult(0, 0)
        assert replay(arr, 0, pol) == ReplayResult(0, 5)
        assert replay(arr, 10, pol) == ReplayResult(2, 3)
    r = replay(arr, 2, "lru")
    assert r.requests == 5 and math.isclose(r.miss_ratio + r.hit_ratio, 1.0)
    with pytest.raises(KeyError, match="belady"):
        replay(arr, 2, "mru")
    with pytest.raises(ValueError):
        replay(arr, -1, "lru")
    with pytest.raises(TypeError):
        replay(arr, 1.5, "lru")
    with pytest.raises(ValueError):
        replay(np.array([0.5, 1.0]), 1, "belady")


def naive_next(s):
    return [next((j for j in range(i + 1, len(s)) if s[j] == s[i]), -1) for i in range(len(s))]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-3, 5), max_size=60), st.sampled_from([1, 70_001]))
def test_next_use_positions(s, scale):
    s = [x * scale for x in s]
    got = next_use_positions(np.array(s, dtype=np.int64))
    assert got.dtype == np.int64 and got.tolist() == naive_next(s)
    assert next_use_positions(s, never=len(s)).tolist() == [len(s) if v < 0 else v for v in naive_next(s)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 6), max_size=60), st.lists(st.tuples(st.integers(-2, 8), st.integers(-3, 65)),
                                                          max_size=30))
def test_next_use_index(s, queries):
    nu = NextUse(s)
    assert len(nu) == len(s)
    for key, pos in queries + [(s[i], i) for i in range(len(s))]:
        want = next((j for j in range(max(pos + 1, 0), len(s)) if s[j] == key), math.inf)
        assert nu.next_after(key, pos) == want, (key, pos)
    for key in set(s):
        assert nu.positions(key) == [i for i, x in enumerate(s) if x == key]
