"""The engine against closed-form answers, on a profile whose measured tables fix every time."""
from __future__ import annotations

import numpy as np
import pytest

from moesim import simulate
from moesim.hardware.costs import transfer_s
from tests.helpers import TINY_MODEL, fixed_profile, scenario, write_routing

A, C = 0.1e-3, 0.2e-3           # attention and expert-compute seconds per layer / expert
EB = 3 * 256 * 512 * 2          # tiny expert: 3 matrices × hidden × ffn × bf16
T_PCIE = transfer_s(EB, 1.0, 10.0)
T_DISK = transfer_s(EB, 0.5, 100.0)
L = TINY_MODEL["num_layers"]


def _rand_routing(rng, R, T, E, K=1):
    out = np.empty((R, T, L, K), dtype=np.int16)
    for idx in np.ndindex(R, T, L):
        out[idx] = rng.choice(E, size=K, replace=False)
    return out


@pytest.fixture
def rng():
    return np.random.default_rng(1)


def test_single_transfer_is_latency_plus_bytes_over_bandwidth():
    assert transfer_s(1e9, 25.0, 5.0) == pytest.approx(5e-6 + 1 / 25)


def test_on_demand_without_cache_is_sum_of_attention_load_compute(tmp_path, rng):
    """Capacity 1 (< layers) in a global LRU cache: every access misses; each layer costs
    attention + one PCIe load + one expert, serially."""
    routing = _rand_routing(rng, 2, 6, 16)
    trace = write_routing(tmp_path / "t.parquet", routing, prompt_len=1, num_experts=16)
    res = simulate(scenario(trace, gpu={"capacity_experts": 1}))
    s = res.summary
    steps = 2 * 6  # batch 1: one prefill step (1 prompt token) + 5 decode steps, per request
    assert s["misses"] == steps * L and s["hits"] == 0
    assert s["makespan_s"] == pytest.approx(steps * L * (A + T_PCIE + C), rel=1e-9)
    assert s["bytes_pcie"] == s["transfers_pcie"] * EB == steps * L * EB
    assert s["stall_s"] == pytest.approx(steps * L * T_PCIE, rel=1e-9)


def test_top2_loads_pipeline_with_compute(tmp_path, rng):
    """Two experts per layer, one copy engine: expert 1 computes while expert 2 copies, so a layer
    takes attention + 2 loads + 1 compute (compute is shorter than a copy)."""
    model = {**TINY_MODEL, "top_k": 2}
    routing = _rand_routing(rng, 1, 4, 16, K=2)
    trace = write_routing(tmp_path / "t.parquet", routing, prompt_len=1, num_experts=16)
    res = simulate(scenario(trace, model=model, gpu={"capacity_experts": 2}))
    assert res.summary["misses"] == 4 * L * 2
    assert res.summary["makespan_s"] == pytest.approx(4 * L * (A + 2 * T_PCIE + C), rel=1e-9)


def test_infinite_cache_is_pure_compute_once_loaded(tmp_path, rng):
    """With room for every expert, a layer that needs no load costs exactly attention + compute,
    and every expert is loaded at most once."""
    routing = _rand_routing(rng, 1, 10, 4)  # 4 experts per layer in use
    trace = write_routing(tmp_path / "t.parquet", routing, prompt_len=1, num_experts=16)
    res = simulate(scenario(trace, gpu={"capacity_experts": 16 * L}))
    st = res.steps
    warm = st[st["misses"] == 0]
    assert len(warm) > 0
    assert warm["stall_s"].abs().max() < 1e-12
    assert (warm["end_s"] - warm["start_s"]).to_numpy() == pytest.approx(A + C, rel=1e-9)
    assert res.summary["misses"] == len({(layer, int(e)) for layer in range(L) for e in routing[0, :, layer, 0]})


def test_cache_holding_every_expert_has_no_stall_after_first_step(tmp_path, rng):
    """One prefill step that touches every expert, then decode: zero stall after step 0."""
    E = 4
    routing = np.empty((1, 12, L, 1), dtype=np.int16)
    routing[0, :E, :, 0] = np.arange(E)[:, None]          # prompt covers all 4 experts of every layer
    routing[0, E:] = rng.integers(0, E, size=(8, L, 1))
    trace = write_routing(tmp_path / "t.parquet", routing, prompt_len=E, num_experts=E)
    res = simulate(scenario(trace, model={**TINY_MODEL, "num_experts": E}, gpu={"capacity_experts": E * L}))
    st = res.steps
    assert st[st["step"] > 0]["stall_s"].abs().max() < 1e-12
    assert st[st["step"] > 0]["misses"].sum() == 0


def test_disk_backed_misses_pay_disk_then_pcie(tmp_path, rng):
    routing = _rand_routing(rng, 1, 5, 16)
    trace = write_routing(tmp_path / "t.parquet", routing, prompt_len=1, num_experts=16)
    res = simulate(scenario(trace, gpu={"capacity_experts": 1}, dram={"capacity_experts": 1}))
    s = res.summary
    n = 5 * L
    assert s["bytes_disk"] == n * EB and s["dram_hit_rate"] == 0.0
    assert s["makespan_s"] == pytest.approx(n * (A + T_DISK + T_PCIE + C), rel=1e-9)


def test_perfect_prefetch_without_reuse_converges_to_link_bound(tmp_path):
    """Oracle prefetching one layer ahead, every expert new: a layer takes max(A + C, T_PCIE)."""
    E = 256
    T = 40
    routing = np.empty((1, T, L, 1), dtype=np.int16)
    for t in range(T):
        for layer in range(L):
            routing[0, t, layer, 0] = (t * 7 + layer) % E  # never reused within the run
    trace = write_routing(tmp_path / "t.parquet", routing, prompt_len=1, num_experts=E)
    res = simulate(scenario(trace, model={**TINY_MODEL, "num_experts": E}, gpu={"capacity_experts": 4},
                            predictor={"name": "oracle", "lookahead_layers": 1}))
    st = res.steps
    late = st[st["step"] >= T // 2]
    per_layer = (late["end_s"] - late["start_s"]).mean()
    assert per_layer == pytest.approx(max(A + C, T_PCIE), rel=0.02)
    on_demand = simulate(scenario(trace, model={**TINY_MODEL, "num_experts": E}, gpu={"capacity_experts": 4}))
    assert res.summary["makespan_s"] < on_demand.summary["makespan_s"]


def test_layer_time_bounded_by_compute_and_serial_loads(tmp_path, rng):
    model = {**TINY_MODEL, "top_k": 2}
    routing = _rand_routing(rng, 3, 8, 16, K=2)
    trace = write_routing(tmp_path / "t.parquet", routing, prompt_len=3, num_experts=16)
    res = simulate(scenario(trace, model=model, gpu={"capacity_experts": 8}, batch={"size": 3}))
    st = res.steps
    dur = st["end_s"] - st["start_s"]
    lower = st["attention_s"] + st["unique_experts"] * C
    upper = lower + (st["misses"] + st["late_hits"]) * T_PCIE
    assert (dur >= lower - 1e-12).all()
    assert (dur <= upper + 1e-12).all()
    s = res.summary
    assert s["hits"] + s["late_hits"] + s["misses"] == s["accesses"] == int(st["unique_experts"].sum())
