"""The flat prefetch path (engine/flat_prefetch.py) against the SimPy engine: the same summary,
steps, requests and events on random scenarios of its case (times that tie included), and the
general prefetch path for every feature it leaves out."""
from __future__ import annotations

import contextlib
import tempfile
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.engine import fast_prefetch, flat_jit, flat_prefetch
from moesim.engine.run import simulate
from tests.helpers import TINY_MODEL, fixed_profile, scenario, write_routing
from tests.test_engine_fast import routing_draw
from tests.test_engine_fast_prefetch import TIES, _assert_same, _scenario, predictor_draw, tier_draw

L = TINY_MODEL["num_layers"]


@st.composite
def flat_cases(draw):
    """A random small scenario of the flat path's case: a prefetching predictor issuing at once,
    with its budgets, protect on or off, an LRU or FIFO GPU tier, global or per layer (sometimes preloaded), dedup, any
    batching and arrivals, 1-3 copy engines, times that tie."""
    E, K, R, T, routing = routing_draw(draw)
    gpu = tier_draw(draw, E, K, draw(st.sampled_from(["lru", "fifo"])), ["uniform", "proportional", "optimal"])
    if draw(st.booleans()):
        gpu["preload"] = "popular"
    pred = predictor_draw(draw)
    if draw(st.booleans()):  # (on the host CPU with latency 0, the default, it issues at once too)
        pred.update(runs_on="gpu", latency_us=draw(st.sampled_from([0.0, 25.0, 100.0])))
    batch = {"size": draw(st.integers(1, R))}
    if draw(st.booleans()):
        batch["scheduler"] = "continuous"
    if draw(st.booleans()):
        batch.update(arrivals="poisson", rate_per_s=draw(st.sampled_from([50.0, 500.0, 5000.0])))
    attn, gbps, lat = draw(st.sampled_from(TIES))
    hw = fixed_profile(copy_engines=draw(st.integers(1, 3)), pcie_gbps=gbps, pcie_lat_us=lat, attn_ms=attn,
                       expert_ms=draw(st.sampled_from([attn, attn / 2, 0.2])))
    return dict(E=E, K=K, routing=routing.astype(np.int16), gpu=gpu, dram=None, pred=pred, batch=batch, hw=hw,
                seed=draw(st.integers(0, 3)), prompt=draw(st.integers(1, T - 1)))


class _Spy:
    """Counts the runs of the flat path and of the general prefetch path."""

    def __init__(self):
        self.flat = self.general = 0

    def __enter__(self):
        flat_run, general_run = flat_prefetch.FlatPrefetch.run, fast_prefetch.FastPrefetch.run

        def flat(path):
            self.flat += 1
            return flat_run(path)

        def general(path):
            self.general += 1
            return general_run(path)
        self._patches = [mock.patch.object(flat_prefetch.FlatPrefetch, "run", flat),
                         mock.patch.object(fast_prefetch.FastPrefetch, "run", general)]
        for p in self._patches:
            p.start()
        return self

    def __exit__(self, *exc):
        for p in self._patches:
            p.stop()


@contextlib.contextmanager
def _moves_in_python():
    """Every compiled move of engine/flat_jit.py replaced by its Python function (which calls the
    others through the module, so they are replaced too)."""
    with contextlib.ExitStack() as stack:
        for name, f in list(vars(flat_jit).items()):
            if hasattr(f, "py_func"):
                stack.enter_context(mock.patch.object(flat_jit, name, f.py_func))
        yield


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flat_cases())
def test_flat_path_equals_simpy_on_random_scenarios(case):
    with tempfile.TemporaryDirectory() as tmp:
        sc = _scenario(tmp, case)
        with _Spy() as spy:
            fast = simulate(sc, record_events=True, engine="fast")
        ref = simulate(sc, record_events=True, engine="simpy")
    assert (spy.flat, spy.general) == (1, 0)
    _assert_same(fast, ref)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flat_cases())
def test_the_events_and_protections_grow_from_one_entry(case):
    """FlatLink's event buffer and protections array start with room for one entry, so that they
    grow all the time. numba does not check bounds (a missed growth would write past them,
    unseen), so here the moves run as plain Python, whose indexing raises past the end."""
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(flat_prefetch.FlatPrefetch, "room", 1), \
            _moves_in_python():
        sc = _scenario(tmp, {**case, "pred": {**case["pred"], "protect": True}})
        with _Spy() as spy:
            fast = simulate(sc, record_events=True, engine="fast")
        ref = simulate(sc, record_events=True, engine="simpy")
    assert (spy.flat, spy.general) == (1, 0)
    _assert_same(fast, ref)


def test_equal_times_happen_and_keep_simpy_order(tmp_path):
    """Copies that end exactly together, on the flat path: the results still match SimPy's (at a
    tie, a copy made before the driver's wake-up lands first, one made after it lands later)."""
    rng = np.random.default_rng(1)
    routing = np.stack([rng.permutation(8)[:2] for _ in range(2 * 5 * L)]).reshape(2, 5, L, 2).astype(np.int16)
    path = write_routing(tmp_path / "t.parquet", routing, prompt_len=2, num_experts=8)
    sc = scenario(path, model={**TINY_MODEL, "num_experts": 8, "top_k": 2}, gpu={"capacity_experts": 10},
                  hardware=fixed_profile(attn_ms=0.1, pcie_gbps=7.86432, pcie_lat_us=0.0, expert_ms=0.1,
                                         copy_engines=2),
                  predictor={"name": "oracle", "lookahead_layers": 2}, batch={"size": 2})
    with _Spy() as spy:
        fast = simulate(sc, record_events=True)
    assert spy.flat == 1
    ends = fast.events[fast.events["resource"] == "pcie"]["end_s"]
    assert ends.duplicated().any()  # copies ending at the same time
    _assert_same(fast, simulate(sc, record_events=True, engine="simpy"))


def test_an_oracle_with_open_arrivals_looks_ahead_from_its_gate(tmp_path):
    """With Poisson arrivals the oracle's later steps are formed from the requests arrived by the
    time it asks (the gate, after the layer's attention): asking it earlier, at the layer's start,
    changes which prefetches it issues. (A case hypothesis once found; rare in random draws.)"""
    routing = np.array([[[[2, 4], [6, 2], [3, 2], [5, 4]], [[2, 1], [4, 7], [1, 0], [5, 7]]],
                        [[[7, 6], [2, 6], [3, 7], [2, 3]], [[6, 1], [3, 6], [5, 6], [7, 3]]],
                        [[[2, 5], [4, 2], [2, 5], [3, 0]], [[2, 7], [0, 1], [7, 5], [5, 6]]],
                        [[[6, 5], [2, 5], [5, 1], [0, 1]], [[4, 0], [5, 6], [1, 2], [3, 2]]]], dtype=np.int16)
    case = dict(E=8, K=2, routing=routing, gpu={"capacity_experts": 10, "policy": "lru"}, dram=None,
                pred={"name": "oracle", "protect": False, "lookahead_layers": 2},
                batch={"size": 1, "arrivals": "poisson", "rate_per_s": 50.0},
                hw=fixed_profile(copy_engines=1, pcie_gbps=1.572864, pcie_lat_us=0.0, attn_ms=0.25, expert_ms=0.2),
                seed=3, prompt=1)
    sc = _scenario(str(tmp_path), case)
    with _Spy() as spy:
        fast = simulate(sc, record_events=True, engine="fast")
    assert spy.flat == 1
    _assert_same(fast, simulate(sc, record_events=True, engine="simpy"))


@pytest.mark.parametrize("change, why", [
    ({"dram": {"capacity_experts": 8}}, "a DRAM tier"),
    ({"gpu": {"capacity_experts": 8, "policy": "belady"}}, "GPU policy belady"),
    ({"gpu": {"capacity_experts": 8, "policy": "lfu"}}, "GPU policy lfu"),
    ({"batch": {"size": 2, "dedup": False}}, "batch.dedup off"),
    ({"predictor": {"name": "topk", "latency_us": 30.0}}, "a host-CPU predictor's latency"),
])
def test_features_left_out_take_the_general_prefetch_path(tmp_path, change, why):
    rng = np.random.default_rng(2)
    routing = np.stack([rng.permutation(8)[:2] for _ in range(2 * 4 * L)]).reshape(2, 4, L, 2).astype(np.int16)
    path = write_routing(tmp_path / "t.parquet", routing, prompt_len=2, num_experts=8)
    kw = {"gpu": {"capacity_experts": 8}, "predictor": {"name": "topk"}, "batch": {"size": 2}, **change}
    sc = scenario(path, model={**TINY_MODEL, "num_experts": 8, "top_k": 2}, hardware=fixed_profile(), **kw)
    seen = []
    unsupported = flat_prefetch.unsupported

    def spy(sim):
        seen.append(unsupported(sim))
        return seen[-1]
    with mock.patch("moesim.engine.fast.flat_unsupported", spy), _Spy() as runs:
        fast = simulate(sc, record_events=True)
    assert seen == [why] and (runs.flat, runs.general) == (0, 1)
    _assert_same(fast, simulate(sc, record_events=True, engine="simpy"))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(8, 400), st.sampled_from(["lru", "fifo"]), st.integers(1, 4), st.booleans(),
       st.sampled_from(["oracle", "topk", "multilook", "intelligent"]))
def test_flat_path_equals_simpy_on_a_real_model(cap, policy, size, dense, predictor):
    """A preset model on a shipped hardware profile: roofline kernel times that vary with the
    tokens per expert, an LM head, a dense first layer or not."""
    from moesim.config import scenario_from_dict

    model = "deepseek-v2-lite" if dense else "olmoe-1b-7b"
    sc = scenario_from_dict({"name": "t", "model": model, "hardware": "rtx4090-pcie4",
                             "trace": {"synthetic": {"requests": 3, "prompt_len": 5, "decode_len": 4}},
                             "cache": {"gpu": {"capacity_experts": cap, "policy": policy}},
                             "predictor": {"name": predictor}, "batch": {"size": size}})
    with _Spy() as spy:
        fast = simulate(sc, record_events=True, engine="fast")
    assert (spy.flat, spy.general) == (1, 0)
    _assert_same(fast, simulate(sc, record_events=True, engine="simpy"))
