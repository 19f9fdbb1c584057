"""The prefetch fast path (engine/fast_prefetch.py) against the SimPy engine: the same summary,
steps, requests and events on random scenarios with prefetching predictors, with link, attention
and kernel times chosen so that events fall at equal times (SimPy's tie order must be kept)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.cache import POLICIES
from moesim.engine import fast as fast_module, fast_prefetch
from moesim.engine.fast import engine_line
from moesim.engine.run import simulate
from tests.helpers import TINY_MODEL, fixed_profile, scenario, write_routing
from tests.test_engine_fast import _assert_same as same, _tiny, routing_draw

L = TINY_MODEL["num_layers"]
EB = 786_432  # TINY_MODEL's expert bytes: at 7.86432 GB/s a copy takes 0.1 ms, as long as a 0.1 ms attention
PREDICTORS = ("oracle", "noisy_oracle", "topk", "multilook", "intelligent", "activation_matrix")
# (attention ms, PCIe GB/s, PCIe latency µs): a copy takes exactly one, two or half an attention
TIES = [(0.1, 7.86432, 0.0), (0.125, 7.86432, 25.0), (0.25, 1.572864, 0.0), (0.25, 3.145728, 0.0),
        (0.5, 0.786432, 0.0), (0.1, 1.0, 10.0)]


def tier_draw(draw, E: int, K: int, policy: str, allocations: list[str]) -> dict:
    """A GPU tier of `policy`: global, or per layer with one of `allocations`; at least top-k slots."""
    per_layer = draw(st.booleans())
    gpu = {"capacity_experts": draw(st.integers(K, E if per_layer else E * L)), "policy": policy}
    if per_layer:
        gpu.update(partition="per_layer", allocation=draw(st.sampled_from(allocations)))
    return gpu


def predictor_draw(draw) -> dict:
    """A prefetching predictor, protect on or off, sometimes with budgets or a longer look-ahead
    (where it has one); its latency is the caller's."""
    pred = {"name": draw(st.sampled_from(PREDICTORS)), "protect": draw(st.booleans())}
    if draw(st.booleans()):
        pred["max_inflight"] = draw(st.integers(1, 4))
    if draw(st.booleans()):
        pred["max_bytes_per_layer"] = EB * draw(st.integers(1, 3))
    if draw(st.booleans()):
        pred["lookahead_layers"] = draw(st.integers(1, 5))
    return pred


@st.composite
def prefetch_cases(draw):
    """A random small scenario on the prefetch path: a prefetching predictor with its budgets,
    protect on or off, any GPU tier (global or per layer), sometimes a DRAM tier over the disk,
    any batching and arrivals, 1-3 copy engines, times that tie."""
    E, K, R, T, routing = routing_draw(draw)
    policy = draw(st.sampled_from(sorted(POLICIES)))
    gpu = tier_draw(draw, E, K, policy, ["uniform", "proportional"])
    pred = predictor_draw(draw)
    # on the GPU a hook's latency delays the compute stream (issued at once); on the host CPU it delays the issue
    pred.update(runs_on=draw(st.sampled_from(["cpu", "gpu"])), latency_us=draw(st.sampled_from([0.0, 25.0, 100.0])))
    batch = {"size": draw(st.integers(1, R)), "dedup": draw(st.booleans())}
    if draw(st.booleans()):
        batch["scheduler"] = "continuous"
    if policy != "belady" and draw(st.booleans()):
        batch.update(arrivals="poisson", rate_per_s=draw(st.sampled_from([50.0, 500.0, 5000.0])))
    attn, gbps, lat = draw(st.sampled_from(TIES))
    hw = fixed_profile(copy_engines=draw(st.integers(1, 3)), pcie_gbps=gbps, pcie_lat_us=lat, attn_ms=attn,
                       expert_ms=draw(st.sampled_from([attn, attn / 2, 0.2])), disk_gbps=gbps / 2,
                       disk_lat_us=draw(st.sampled_from([0.0, 100.0])), queue_depth=draw(st.integers(1, 2)))
    dram = None
    if draw(st.integers(0, 3)) == 0:
        dram = {"capacity_experts": draw(st.integers(K, E * L)), "policy": draw(st.sampled_from(["lru", "fifo"]))}
    return dict(E=E, K=K, routing=routing.astype(np.int16), gpu=gpu, dram=dram, pred=pred, batch=batch, hw=hw,
                seed=draw(st.integers(0, 3)), prompt=draw(st.integers(1, T - 1)))


def _scenario(tmp, case):
    path = write_routing(Path(tmp) / "t.parquet", case["routing"], prompt_len=case["prompt"], num_experts=case["E"])
    model = {**TINY_MODEL, "num_experts": case["E"], "top_k": case["K"]}
    return scenario(path, model=model, hardware=case["hw"], gpu=case["gpu"], dram=case["dram"],
                    predictor=case["pred"], batch=case["batch"], seed=case["seed"])


def _assert_same(fast, ref):
    same(fast, ref, {"engine": "fast", "reason": None, "path": "prefetch"})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefetch_cases())
def test_prefetch_path_equals_simpy_on_random_scenarios(case):
    with tempfile.TemporaryDirectory() as tmp:
        sc = _scenario(tmp, case)
        fast = simulate(sc, record_events=True, engine="fast")
        ref = simulate(sc, record_events=True, engine="simpy")
    _assert_same(fast, ref)


def test_equal_times_happen_and_keep_simpy_order(tmp_path, monkeypatch):
    """A scenario where a copy ends exactly when the driver wakes: the heap meets equal times,
    and the path still matches SimPy (the order at a tie decides which copy starts next). The
    flat path would run this case: it is turned off here (tests/test_engine_flat_prefetch.py has its own)."""
    monkeypatch.setattr(fast_module, "flat_unsupported", lambda sim: "turned off by the test")
    ties = []
    run = fast_prefetch.FastPrefetch._run

    def counting(self):
        heap = self.env.heap
        ties.append(sum(1 for e in heap if e[0] == heap[0][0]) > 1 if heap else False)
        return run(self)
    monkeypatch.setattr(fast_prefetch.FastPrefetch, "_run", counting)
    rng = np.random.default_rng(1)
    routing = np.stack([rng.permutation(8)[:2] for _ in range(2 * 5 * L)]).reshape(2, 5, L, 2).astype(np.int16)
    path = write_routing(tmp_path / "t.parquet", routing, prompt_len=2, num_experts=8)
    sc = scenario(path, model={**TINY_MODEL, "num_experts": 8, "top_k": 2}, gpu={"capacity_experts": 10},
                  hardware=fixed_profile(attn_ms=0.1, pcie_gbps=7.86432, pcie_lat_us=0.0, expert_ms=0.1),
                  predictor={"name": "oracle", "lookahead_layers": 2}, batch={"size": 2})
    fast = simulate(sc, record_events=True)
    assert any(ties)
    _assert_same(fast, simulate(sc, record_events=True, engine="simpy"))


def test_auto_takes_the_prefetch_path_and_says_so(tmp_path):
    res = simulate(_tiny(tmp_path, predictor={"name": "topk"}))
    assert res.engine == {"engine": "fast", "reason": None, "path": "prefetch"}
    lat = simulate(_tiny(tmp_path, predictor={"name": "topk", "latency_us": 30.0}))  # a delayed issue, modelled
    assert lat.engine == res.engine and lat.summary != res.summary
    assert engine_line(res.engine) == "engine: fast (prefetch path without SimPy, same results as the SimPy engine)"
