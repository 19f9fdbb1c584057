"""The contention-free fast path (engine/fast.py) against the SimPy engine: the same summary,
steps, requests and events on random scenarios it supports, and the SimPy engine for the rest."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.engine.run import simulate
from moesim.cache import POLICIES
from moesim.cache.tiers import Tier
from moesim.config import scenario_from_dict
from moesim.errors import InputError
from tests.helpers import TINY_MODEL, fixed_profile, scenario, write_routing

ROOT = Path(__file__).resolve().parents[1]
L = TINY_MODEL["num_layers"]


def routing_draw(draw):
    """(experts, top-k, requests, tokens per request, routing [R, T, L, K]) of a random small trace: each
    token's experts distinct."""
    E = draw(st.sampled_from([4, 8, 16]))
    K = draw(st.integers(1, 3))
    R = draw(st.integers(1, 4))
    T = draw(st.integers(2, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    return E, K, R, T, np.stack([rng.permutation(E)[:K] for _ in range(R * T * L)]).reshape(R, T, L, K)


@st.composite
def fast_cases(draw, policies=tuple(sorted(POLICIES)), dedup=st.booleans()):
    """A random small scenario within the fast path's set: on_demand, no DRAM tier, any GPU tier,
    any batching and arrivals, 1-3 copy engines, random link and kernel times."""
    E, K, R, T, routing = routing_draw(draw)
    per_layer = draw(st.booleans())
    policy = draw(st.sampled_from(policies))
    gpu = {"capacity_experts": draw(st.integers(K, E if per_layer else E * L)), "policy": policy}
    if per_layer:
        gpu.update(partition="per_layer", allocation=draw(st.sampled_from(["uniform", "proportional", "optimal"])))
    if policy != "belady" and draw(st.booleans()):
        gpu["admission"] = "second_touch"
    if draw(st.booleans()):
        gpu["preload"] = "popular"
    batch = {"size": draw(st.integers(1, R)), "dedup": draw(dedup)}
    if draw(st.booleans()):
        batch["scheduler"] = "continuous"
    if policy != "belady" and draw(st.booleans()):
        batch.update(arrivals="poisson", rate_per_s=draw(st.sampled_from([5.0, 50.0, 500.0])))
    hw = fixed_profile(copy_engines=draw(st.integers(1, 3)), pcie_gbps=draw(st.sampled_from([0.3, 1.0, 7.7])),
                       pcie_lat_us=draw(st.sampled_from([0.0, 10.0, 3.3])),
                       expert_ms=draw(st.sampled_from([0.01, 0.2, 1.3])), attn_ms=draw(st.sampled_from([0.05, 0.1])))
    return dict(E=E, K=K, routing=routing.astype(np.int16), gpu=gpu, batch=batch, hw=hw,
                seed=draw(st.integers(0, 3)), prompt=draw(st.integers(1, T - 1)))


def _both(sc):
    fast = simulate(sc, record_events=True, engine="fast")
    ref = simulate(sc, record_events=True, engine="simpy")
    return fast, ref


def _assert_same(fast, ref, engine=None):
    """The same summary and tables; `fast` ran on the fast path `engine` says (the contention-free one by default)."""
    assert fast.engine == (engine or {"engine": "fast", "reason": None})
    assert ref.engine["engine"] == "simpy"
    assert json.dumps(fast.summary, sort_keys=True) == json.dumps(ref.summary, sort_keys=True)
    for name in ("steps", "requests", "events"):
        pd.testing.assert_frame_equal(getattr(fast, name), getattr(ref, name), check_exact=True)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fast_cases())
def test_fast_path_equals_simpy_on_random_scenarios(case):
    with tempfile.TemporaryDirectory() as tmp:
        path = write_routing(Path(tmp) / "t.parquet", case["routing"], prompt_len=case["prompt"],
                             num_experts=case["E"])
        model = {**TINY_MODEL, "num_experts": case["E"], "top_k": case["K"]}
        sc = scenario(path, model=model, hardware=case["hw"], gpu=case["gpu"], batch=case["batch"],
                      seed=case["seed"])
        _assert_same(*_both(sc))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fast_cases(dedup=st.just(True)))
def test_batched_layers_equal_simpy(case):
    """With dedup the fast path takes FastPath._layers (one Tier.access_step call per step)."""
    calls = []
    orig = Tier.access_step
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setattr(Tier, "access_step", lambda self, *a: calls.append(1) or orig(self, *a))
        path = write_routing(Path(tmp) / "t.parquet", case["routing"], prompt_len=case["prompt"],
                             num_experts=case["E"])
        model = {**TINY_MODEL, "num_experts": case["E"], "top_k": case["K"]}
        sc = scenario(path, model=model, hardware=case["hw"], gpu=case["gpu"], batch=case["batch"],
                      seed=case["seed"])
        fast, ref = _both(sc)
    assert calls
    _assert_same(fast, ref)


def _per_key_layer(tier, keys, pos, slots):
    """What engine/fast.py's per-key path asks of the tier for one layer of distinct keys at
    positions pos, pos + 1, ...: hit_pin or a reservation (the first `slots` misses at once, the
    rest after the accesses, at the last position), then complete and unpin. Returns (miss
    indices, bypassed, evicted)."""
    misses, claimed, bypass, evicted = [], [], 0, 0

    def claim(key, at):
        nonlocal bypass, evicted
        ev = tier.reserve(key, at)
        if ev is None:
            bypass += 1
            return
        evicted += len(ev)
        tier.pin(key)
        claimed.append(key)

    hits = []
    for i, key in enumerate(keys):
        if tier.hit_pin(key, pos + i):
            hits.append(key)
            continue
        misses.append(i)
        if len(misses) <= slots:
            claim(key, pos + i)
    for i in misses[slots:]:
        claim(keys[i], pos + len(keys) - 1)
    for key in claimed:
        tier.complete(key)
    for key in hits + claimed:
        tier.unpin(key)
    return misses, bypass, evicted


def _next_use(key, pos):
    """A made-up next use after `pos` (any deterministic one will do for Belady's calls)."""
    return pos + 1 + (key * 7919 + pos * 104729) % 13


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([*sorted(POLICIES), "lru+second_touch", None]), st.sampled_from(["global", "per_layer"]),
       st.integers(0, 6), st.integers(1, 3), st.integers(0, 2**16))
def test_access_layer_makes_the_per_key_calls(policy, partition, cap, slots, seed):
    """Tier.access_layer against hit_pin / reserve / complete / unpin key by key (every policy, and
    an unbounded tier): the same misses, bypasses and evictions, and the same tier afterwards
    (contents, eviction order, counters), layer after layer."""
    E, layers = 6, 3
    rng = np.random.default_rng(seed)
    a, b = (Tier("gpu", None if policy is None else cap, policy or "lru", partition, E, layers, _next_use,
                 np.random.default_rng(seed)) for _ in range(2))
    pos = 0
    for _ in range(40):
        layer = int(rng.integers(layers))
        keys = (layer * E + rng.permutation(E)[:int(rng.integers(0, E + 1))]).tolist()
        assert a.access_layer(keys, slots, pos) == _per_key_layer(b, keys, pos, slots)
        pos += len(keys)
        a.check()
        assert a.resident_keys() == b.resident_keys() and not a.in_flight_keys()
        for name in ("_occ", "_total", "reservations", "evictions", "completions"):
            assert getattr(a, name) == getattr(b, name), name
        for pa, pb in zip(a._policies, b._policies):
            assert sorted(pa.keys()) == sorted(pb.keys())
            if pa.keys():  # the same next victim: the same eviction order
                assert pa.victim() == pb.victim()


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["lru", "fifo", "belady", None]), st.sampled_from(["global", "per_layer"]),
       st.integers(0, 12), st.integers(1, 3), st.integers(0, 2**16))
def test_access_step_equals_access_layer_per_layer(policy, partition, cap, slots, seed):
    """Tier.access_step (one call per step; its own loop for a global LRU tier) against
    access_layer layer by layer: the same misses per layer, bypasses, evictions and tier after."""
    E, layers = 6, 3
    rng = np.random.default_rng(seed)
    a, b = (Tier("gpu", None if policy is None else cap, policy or "lru", partition, E, layers, _next_use)
            for _ in range(2))
    pos = 0
    for _ in range(30):
        per = [(layer * E + np.sort(rng.permutation(E)[:int(rng.integers(0, E + 1))])).tolist()
               for layer in range(layers)]
        bounds = np.cumsum([0] + [len(k) for k in per]).tolist()
        keys = [k for ks in per for k in ks]
        want = [b.access_layer(ks, slots, pos + lo) for ks, lo in zip(per, bounds)]
        got = a.access_step(keys, bounds, slots, pos)
        assert got == ([w[0] for w in want], sum(w[1] for w in want), sum(w[2] for w in want))
        pos += len(keys)
        a.check()
        assert a.resident_keys() == b.resident_keys()
        for name in ("_occ", "_total", "reservations", "evictions", "completions"):
            assert getattr(a, name) == getattr(b, name), name
        for pa, pb in zip(a._policies, b._policies):
            assert list(pa.keys()) == list(pb.keys())


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(8, 400), st.sampled_from(["lru", "belady", "lfu"]), st.integers(1, 4), st.booleans())
def test_fast_path_equals_simpy_on_a_real_model(cap, policy, size, dense):
    """A preset model on a shipped hardware profile: roofline kernel times that vary with the
    tokens per expert, a dense first layer or not, a runtime without host costs."""
    model = "deepseek-v2-lite" if dense else "olmoe-1b-7b"
    sc = scenario_from_dict({"name": "t", "model": model, "hardware": "rtx4090-pcie4",
                             "trace": {"synthetic": {"requests": 3, "prompt_len": 5, "decode_len": 4}},
                             "cache": {"gpu": {"capacity_experts": cap, "policy": policy}},
                             "predictor": {"name": "on_demand"}, "batch": {"size": size}})
    _assert_same(*_both(sc))


def _tiny(tmp, **kw):
    rng = np.random.default_rng(0)
    routing = np.stack([rng.permutation(8)[:2] for _ in range(2 * 4 * L)]).reshape(2, 4, L, 2)
    path = write_routing(Path(tmp) / "t.parquet", routing.astype(np.int16), prompt_len=2, num_experts=8)
    args = dict(model={**TINY_MODEL, "num_experts": 8, "top_k": 2}, gpu={"capacity_experts": 6})
    args.update(kw)
    return scenario(path, **args)


@pytest.mark.parametrize("kw, reason", [
    (dict(predictor={"name": "topk"}, runtime="pytorch-offload-loop"), "a runtime with host costs"),
    (dict(predictor={"name": "oracle"}, runtime="pytorch-offload-loop"), "a runtime with host costs"),
    (dict(predictor={"name": "oracle", "latency_us": 5.0}, runtime="pytorch-offload-loop"),
     "a runtime with host costs"),
    (dict(dram={"capacity_experts": 8, "policy": "lru"}), "a DRAM tier"),
    (dict(runtime="pytorch-offload-loop"), "a runtime with host costs"),
])
def test_scenarios_outside_the_set_take_the_simpy_path(tmp_path, kw, reason):
    sc = _tiny(tmp_path, **kw)
    res = simulate(sc)
    assert res.engine["engine"] == "simpy" and res.engine["reason"].startswith(reason)
    with pytest.raises(InputError, match="the fast engine does not model"):
        simulate(sc, engine="fast")


def test_auto_takes_the_fast_path_and_simpy_can_be_forced(tmp_path):
    sc = _tiny(tmp_path)
    assert simulate(sc).engine == {"engine": "fast", "reason": None}
    assert simulate(sc, engine="simpy").engine == {"engine": "simpy", "reason": "forced: --engine simpy"}
    with pytest.raises(InputError, match="auto, fast, simpy"):
        simulate(sc, engine="quick")


def test_cli_says_which_engine_ran(tmp_path):
    from moesim.cli import main

    q = str(ROOT / "scenarios/quickstart.yaml")
    common = ["--no-report", "--no-why", "--set", "batch.size=1"]
    r = CliRunner().invoke(main, ["run", q, "-o", str(tmp_path / "a"), *common])
    assert r.exit_code == 0, r.output
    assert "engine: fast" in r.output
    assert json.loads((tmp_path / "a" / "engine.json").read_text()) == {"engine": "fast", "reason": None}
    r = CliRunner().invoke(main, ["run", q, "-o", str(tmp_path / "b"), "--engine", "simpy", *common])
    assert r.exit_code == 0, r.output
    assert "engine: simpy (forced: --engine simpy)" in r.output
    assert (tmp_path / "a" / "summary.json").read_bytes() == (tmp_path / "b" / "summary.json").read_bytes()
    r = CliRunner().invoke(main, ["run", str(ROOT / "scenarios/oracle-ssd.yaml"), "-o", str(tmp_path / "c"),
                                  "--engine", "fast", "--set", "runtime=pytorch-offload-loop", "--quiet",
                                  "--no-report", "--no-why"])
    assert r.exit_code == 2 and "the fast engine does not model a runtime with host costs" in r.output
    assert "Traceback" not in r.output
