"""The eviction policies beyond lru/fifo/lfu/belady: exact agreement with libCacheSim 0.3.5's C
loop where libCacheSim has the policy, plain references written here where it has not (or where
moesim differs by design), and the policy protocol under exclusions for every registered policy."""
from __future__ import annotations

import itertools
from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moesim.cache import POLICIES, get_policy, replay
from moesim.cache.reference import LCS_NAME, lcs_comparable, libcachesim_misses

LCS_NEW = ["clock", "sieve", "s3fifo", "twoq", "slru", "arc"]
ALL = sorted(POLICIES)
_counter = itertools.count()


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lcs-modern")


def zipf_stream(n: int, universe: int, alpha: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, universe + 1) ** alpha
    return rng.permutation(universe)[rng.choice(universe, size=n, p=p / p.sum())].astype(np.int64)


def check_lcs(trace_dir, stream, cap):
    pytest.importorskip("libcachesim")
    pols = [p for p in LCS_NEW if lcs_comparable(p, cap)]
    ref = libcachesim_misses(stream, cap, pols, path=str(trace_dir / f"m{next(_counter)}.oracle"))
    assert {p: replay(stream, cap, p).misses for p in pols} == ref, cap


def test_every_libcachesim_policy_is_named():
    assert set(LCS_NEW) <= set(LCS_NAME) and set(LCS_NEW) <= set(POLICIES)


# ---- libCacheSim, exactly --------------------------------------------------------------------

@settings(max_examples=120, deadline=None)
@given(st.integers(2, 48).flatmap(lambda a: st.tuples(
    st.lists(st.integers(0, a - 1), min_size=1, max_size=300), st.integers(1, a))))
def test_equals_libcachesim_on_hypothesis_streams(trace_dir, sc):
    stream, cap = sc
    check_lcs(trace_dir, stream, cap)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 39), min_size=50, max_size=400), st.sampled_from([20, 24, 28, 32]))
def test_equals_libcachesim_where_every_policy_is_comparable(trace_dir, stream, cap):
    """Capacities >= 20 and divisible by 4: all six policies are checked on every example."""
    check_lcs(trace_dir, stream, cap)


@pytest.mark.parametrize("cap", [4, 8, 20, 64, 300])
def test_equals_libcachesim_on_zipf(trace_dir, cap):
    check_lcs(trace_dir, zipf_stream(20_000, 2_000, 0.9, seed=cap), cap)


def test_equals_libcachesim_on_moe_keys(trace_dir):
    rng = np.random.default_rng(3)
    L, E, k = 8, 32, 4
    pop = rng.dirichlet(np.full(E, 0.3), size=L)
    s = np.concatenate([np.sort(layer * E + rng.choice(E, size=k, replace=False, p=pop[layer]))
                        for _ in range(300) for layer in range(L)])
    for cap in (24, 64, 128):
        check_lcs(trace_dir, s, cap)


# ---- where moesim differs from libCacheSim by design -----------------------------------------

@pytest.mark.parametrize("policy,cap", [("s3fifo", 12), ("s3fifo", 16), ("twoq", 2), ("twoq", 3)])
def test_tiny_capacities_cache_where_libcachesim_rounds_queues_to_nothing(trace_dir, policy, cap):
    pytest.importorskip("libcachesim")
    s = zipf_stream(3000, 50, 1.0, seed=cap)
    assert not lcs_comparable(policy, cap)
    ref = libcachesim_misses(s, cap, [policy], path=str(trace_dir / f"d{next(_counter)}.oracle"))[policy]
    assert ref == len(s)                       # libCacheSim: every request misses
    assert replay(s, cap, policy).hits >= replay(s, cap, "lru").hits // 2 > 0   # moesim: a working cache


# ---- plain references ------------------------------------------------------------------------

def ref_lfu_history(s, cap):
    res, count, last, misses = set(), {}, {}, 0
    for t, x in enumerate(s):
        count[x] = count.get(x, 0) + 1
        last[x] = t
        if x in res:
            continue
        misses += 1
        if len(res) == cap:
            res.remove(min(res - {x}, key=lambda k: (count[k], last[k])))
        res.add(x)
    return misses


def ref_lfuda(s, cap):
    res, f, prio, last, age, misses = set(), {}, {}, {}, 0, 0
    for t, x in enumerate(s):
        if x in res:
            f[x] += 1
        else:
            misses += 1
            if len(res) == cap:
                v = min(res, key=lambda k: (prio[k], last[k]))
                age = prio[v]
                res.remove(v)
            res.add(x)
            f[x] = 1
        prio[x], last[x] = age + f[x], t
    return misses


def ref_pinned_hot(s, cap, frac=0.5):
    lru, count, misses = [], {}, 0
    for x in s:
        count[x] = count.get(x, 0) + 1
        if x in lru:
            lru.remove(x)
        else:
            misses += 1
            if len(lru) == cap:
                hot = sorted(lru, key=lambda k: (count[k], lru.index(k)), reverse=True)[:int(cap * frac)]
                lru.remove(next(k for k in lru if k not in hot))
        lru.append(x)
    return misses


def ref_lru_second_touch(s, cap):
    prob, main, seen, misses = [], [], OrderedDict(), 0   # oldest first
    for x in s:
        if x in prob:
            prob.remove(x)
            main.append(x)
            seen.pop(x, None)
            continue
        if x in main:
            main.remove(x)
            main.append(x)
            continue
        misses += 1
        if len(prob) + len(main) == cap:
            (prob if prob else main).pop(0)
        if x in seen:
            del seen[x]
            main.append(x)
        else:
            seen[x] = None
            if len(seen) > cap:
                seen.popitem(last=False)
            prob.append(x)
    return misses


REFS = {"lfu_history": ref_lfu_history, "lfuda": ref_lfuda, "pinned_hot": ref_pinned_hot,
        "lru+second_touch": ref_lru_second_touch}


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 12).flatmap(lambda a: st.tuples(
    st.lists(st.integers(0, a - 1), min_size=1, max_size=200), st.integers(1, a))))
def test_equal_plain_references(sc):
    stream, cap = sc
    for pol, ref in REFS.items():
        assert replay(stream, cap, pol).misses == ref(stream, cap), pol


@pytest.mark.parametrize("pol", sorted(REFS))
def test_equal_plain_references_on_zipf(pol):
    s = zipf_stream(4000, 300, 0.9, seed=5).tolist()
    assert replay(s, 40, pol).misses == REFS[pol](s, 40)


def test_frequency_with_history_keeps_hot_keys_where_lfu_thrashes():
    """Two hot keys, each followed by a scan longer than the cache: lfu forgets the hot keys'
    counts on every eviction (0 hits); lfu_history keeps them resident."""
    cold = itertools.count(100)
    s = [k for i in range(400) for k in ([i % 2] + [next(cold) for _ in range(4)])]
    assert replay(s, 3, "lfu").hits == 0
    assert replay(s, 3, "lfu_history").hits >= 390


# ---- the protocol, every policy --------------------------------------------------------------

@pytest.mark.parametrize("name", ALL + ["lru+second_touch", "arc+second_touch"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_victim_respects_exclusions(name, data):
    """victim(excluded) is resident and not excluded, or None exactly when every resident key is
    excluded; evict/remove/insert keep the resident set what the caller made it."""
    if name == "belady":
        return
    cap = data.draw(st.integers(1, 8))
    pol, res = get_policy(name, cap), set()
    for x in data.draw(st.lists(st.integers(0, 15), max_size=80)):
        if x in res:
            pol.touch(x)
            continue
        pol.miss(x)
        if len(res) >= cap:
            excl = set(data.draw(st.lists(st.sampled_from(sorted(res)), max_size=len(res))))
            v = pol.victim(excl)
            if v is None:
                assert res <= excl
                continue
            assert v in res and v not in excl
            (pol.evict if data.draw(st.booleans()) else pol.remove)(v)
            res.discard(v)
        pol.insert(x)
        res.add(x)
        assert set(pol.keys()) == res and len(pol) == len(res)
