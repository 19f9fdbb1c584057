"""replay() against libCacheSim 0.3.5 (process_trace on an ORACLE_GENERAL_TRACE), against plain
reference implementations written here, and the MIN / stack properties."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moesim.cache import replay
from moesim.cache.reference import libcachesim_misses

lcs = pytest.importorskip("libcachesim")

POLICIES = ["lru", "fifo", "lfu", "belady"]


# ---- libCacheSim -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lcs-traces")


_counter = itertools.count()


def lcs_misses(trace_dir, stream, capacity: int, policies=POLICIES) -> dict[str, int]:
    return libcachesim_misses(stream, capacity, policies, path=str(trace_dir / f"t{next(_counter)}.oracle"))


def zipf_stream(n: int, universe: int, alpha: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, universe + 1) ** alpha
    ids = rng.choice(universe, size=n, p=p / p.sum())
    return rng.permutation(universe)[ids].astype(np.int64)  # popularity not tied to id order


@st.composite
def stream_and_capacity(draw, max_alphabet=8, max_len=120):
    alphabet = draw(st.integers(1, max_alphabet))
    stream = draw(st.lists(st.integers(0, alphabet - 1), min_size=1, max_size=max_len))
    cap = draw(st.integers(1, alphabet))
    return stream, cap


@settings(max_examples=150, deadline=None)
@given(stream_and_capacity())
def test_replay_equals_libcachesim_small_alphabets(trace_dir, sc):
    stream, cap = sc
    ref = lcs_misses(trace_dir, stream, cap)
    got = {pol: replay(stream, cap, pol).misses for pol in POLICIES}
    assert got == ref


@pytest.mark.parametrize("capacity", [1, 10, 64, 300])
def test_replay_equals_libcachesim_zipf(trace_dir, capacity):
    s = zipf_stream(20_000, 2_000, 0.9, seed=capacity)
    ref = lcs_misses(trace_dir, s, capacity)
    got = {pol: replay(s, capacity, pol).misses for pol in POLICIES}
    assert got == ref
    assert got["belady"] <= min(got.values())


def test_replay_equals_libcachesim_moe_keys(trace_dir):
    """Keys shaped like the engine's (layer * E + expert), visited layer by layer."""
    rng = np.random.default_rng(7)
    L, E, k = 12, 64, 4
    pop = rng.dirichlet(np.full(E, 0.3), size=L)
    steps = [np.sort(layer * E + rng.choice(E, size=k, replace=False, p=pop[layer]))
             for _ in range(300) for layer in range(L)]
    s = np.concatenate(steps)
    for cap in (16, 100):
        ref = lcs_misses(trace_dir, s, cap)
        assert {pol: replay(s, cap, pol).misses for pol in POLICIES} == ref


# ---- independent plain references ------------------------------------------------------------

def ref_lru(s, cap):
    cache, misses = [], 0
    for x in s:
        if x in cache:
            cache.remove(x)
        else:
            misses += 1
            if len(cache) == cap:
                cache.pop(0)
        cache.append(x)
    return misses


def ref_fifo(s, cap):
    cache, misses = [], 0
    for x in s:
        if x not in cache:
            misses += 1
            if len(cache) == cap:
                cache.pop(0)
            cache.append(x)
    return misses


def ref_lfu(s, cap):
    freq, last, misses = {}, {}, 0          # resident id -> accesses since insert, last access
    for t, x in enumerate(s):
        if x not in freq:
            misses += 1
            if len(freq) == cap:
                v = min(freq, key=lambda k: (freq[k], last[k]))
                del freq[v], last[v]
            freq[x] = 0
        freq[x] += 1
        last[x] = t
    return misses


def ref_belady(s, cap):
    cache, misses = set(), 0
    for t, x in enumerate(s):
        if x not in cache:
            misses += 1
            if len(cache) == cap:
                def nxt(k):
                    return next((j for j in range(t + 1, len(s)) if s[j] == k), len(s))
                cache.remove(max(cache, key=nxt))
            cache.add(x)
    return misses


REFS = {"lru": ref_lru, "fifo": ref_fifo, "lfu": ref_lfu, "belady": ref_belady}


@settings(max_examples=200, deadline=None)
@given(stream_and_capacity(max_alphabet=10, max_len=150))
def test_replay_equals_plain_references(sc):
    stream, cap = sc
    for pol in POLICIES:
        assert replay(stream, cap, pol).misses == REFS[pol](stream, cap), pol


# ---- properties ------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(stream_and_capacity(max_alphabet=12, max_len=200))
def test_belady_is_optimal(sc):
    stream, cap = sc
    opt = replay(stream, cap, "belady").misses
    for pol in ("lru", "fifo", "lfu"):
        assert opt <= replay(stream, cap, pol).misses


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 11), min_size=1, max_size=200))
def test_lru_and_belady_misses_never_rise_with_capacity(stream):
    for pol in ("lru", "belady"):  # both are stack algorithms
        m = [replay(stream, c, pol).misses for c in range(0, 14)]
        assert all(a >= b for a, b in zip(m, m[1:])), (pol, m)
        assert m[0] == len(stream) and m[-1] == len(set(stream))


def _flatten_trace(path):
    """Every expert access of a trace in row order, as layer * num_experts + expert."""
    from moesim.traces.io import TraceReader

    r = TraceReader(path)
    E = r.meta.num_experts
    parts = [(req.experts.astype(np.int64) + (np.arange(req.experts.shape[1]) * E)[None, :, None]).ravel()
             for req in r.iter_requests(pre_attn=False, scores=False)]
    return np.concatenate(parts), r.meta.num_layers * E


@pytest.mark.parametrize("name", sorted(p.name for p in (__import__("pathlib").Path(__file__).resolve().parents[1]
                                                           / "traces").glob("*.parquet")))
def test_replay_equals_libcachesim_on_shipped_traces(trace_dir, name):
    from pathlib import Path

    stream, universe = _flatten_trace(Path(__file__).resolve().parents[1] / "traces" / name)
    for cap in sorted({max(1, universe // 16), max(1, universe // 4)}):
        ref = lcs_misses(trace_dir, stream, cap)
        assert {pol: replay(stream, cap, pol).misses for pol in POLICIES} == ref, (name, cap)
