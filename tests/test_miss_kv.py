"""Issue 17: CPU execution of a miss (`miss: cpu | auto`) and the KV cache in the GPU budget, against
closed forms, random scenarios (hypothesis) and bad input."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import simpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim import simulate
from moesim.cache.tiers import Tier
from moesim.config import scenario_from_dict
from moesim.engine import run as run_mod
from moesim.engine.kv import KvBudget, activation_bytes
from moesim.engine.sim import Simulation
from moesim.hardware.costs import transfer_s
from moesim.hardware.runtime import load_runtime
from moesim.models import ModelSpec
from tests.helpers import TINY_MODEL, fixed_profile, write_routing

L = TINY_MODEL["num_layers"]
A = 0.1e-3                    # attention per layer (fixed_profile)
EB = 3 * 256 * 512 * 2        # tiny expert bytes
ACT = 256 * 2                 # one token's bf16 hidden state


def cpu_profile(cpu_ms=0.5, d2h_gbps=2.0, d2h_lat_us=5.0, pcie_gbps=1.0, cores=1, threads=1, memory_gb=80.0,
                expert_ms=0.2, **kw) -> dict:
    """fixed_profile plus a D2H link and a host CPU whose measured expert time is `cpu_ms` at any size."""
    src = "validation fixture"
    hw = fixed_profile(pcie_gbps=pcie_gbps, expert_ms=expert_ms, **kw)
    hw["gpu"]["memory_gb"] = memory_gb
    hw["pcie_d2h"] = {"bandwidth_gbps": d2h_gbps, "latency_us": d2h_lat_us, "copy_engines": 1,
                      "source": {k: src for k in ("bandwidth_gbps", "latency_us", "copy_engines")}}
    hw["host_cpu"] = {"cores": cores, "threads_per_expert": threads,
                      "expert_ms": {"bfloat16": {"tokens": [1, 100000], "ms": [cpu_ms, cpu_ms]}},
                      "source": {k: src for k in ("cores", "threads_per_expert", "expert_ms")}}
    return hw


def scen(trace, miss="wait", hw=None, gpu=None, model=None, batch=None, kv=False, predictor="on_demand"):
    data = {"name": "t", "model": model or TINY_MODEL, "hardware": hw or cpu_profile(),
            "trace": {"path": str(trace)}, "cache": {"gpu": gpu or {"capacity_experts": 1}, "kv_cache": kv},
            "predictor": {"name": predictor}, "batch": batch or {"size": 1}, "miss": miss}
    return scenario_from_dict(data, file="<test>")


def routing(rng, R, T, E, K=1):
    return np.stack([rng.permutation(E)[:K] for _ in range(R * T * L)]).reshape(R, T, L, K).astype(np.int16)


# ---- miss: cpu ----------------------------------------------------------------------------------

def test_cpu_miss_with_idle_link_is_activations_out_compute_back(tmp_path):
    """Every access misses (capacity 1 < layers); each layer costs attention, then activations
    device->host, the CPU expert, activations host->device, serially on idle links."""
    trace = write_routing(tmp_path / "t.parquet", routing(np.random.default_rng(0), 2, 5, 16), 1, 16)
    s = simulate(scen(trace, "cpu")).summary
    n = 2 * 5 * L
    per = A + transfer_s(ACT, 2.0, 5.0) + 0.5e-3 + transfer_s(ACT, 1.0, 10.0)
    assert s["makespan_s"] == pytest.approx(n * per, rel=1e-9)
    assert s["miss"]["cpu_experts"] == s["misses"] == n and s["hits"] == 0
    assert s["miss"]["activation_bytes_d2h"] == s["miss"]["activation_bytes_h2d"] == n * ACT
    assert s["transfers_pcie"] == n  # only the activations came back: no expert was copied


def test_cpu_expert_waits_for_a_free_core(tmp_path):
    """Two experts per layer on one CPU worker: the second waits for the first (top-2, batch 1)."""
    model = {**TINY_MODEL, "top_k": 2}
    trace = write_routing(tmp_path / "t.parquet", routing(np.random.default_rng(1), 1, 3, 16, K=2), 1, 16)
    s = simulate(scen(trace, "cpu", model=model, gpu={"capacity_experts": 2}, hw=cpu_profile(cpu_ms=2.0))).summary
    d2h, back = transfer_s(ACT, 2.0, 5.0), transfer_s(ACT, 1.0, 10.0)
    # second job: its activations arrive during the first job; it starts when the core frees
    per = A + d2h + 2 * 2.0e-3 + back
    assert s["makespan_s"] == pytest.approx(3 * L * per, rel=1e-9)


def test_host_thread_leaves_the_cpu_kernel_fewer_cores(tmp_path):
    """A runtime host thread holds one of 2 cores: a kernel timed on 2 threads runs twice as long."""
    trace = write_routing(tmp_path / "t.parquet", routing(np.random.default_rng(2), 1, 3, 16), 1, 16)
    sc = scen(trace, "cpu", hw=cpu_profile(cores=2, threads=2))
    rt = {"name": "t", "step_host_us": 1.0, "source": {"step_host_us": "validation fixture"}}
    with_host = simulate(sc.model_copy(update={"runtime": load_runtime(rt)})).summary
    assert with_host["miss"]["cpu_busy_s"] == pytest.approx(2 * simulate(sc).summary["miss"]["cpu_busy_s"])


@st.composite
def miss_cases(draw):
    E, K = draw(st.sampled_from([8, 16])), draw(st.integers(1, 2))
    R, T = draw(st.integers(1, 3)), draw(st.integers(2, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    return dict(E=E, K=K, R=R, routing=routing(rng, R, T, E, K), cap=draw(st.integers(K, E * L)),
                batch=draw(st.integers(1, R)), cpu_ms=draw(st.sampled_from([0.05, 0.3, 1.0, 3.0])),
                pcie=draw(st.sampled_from([0.5, 1.0, 8.0])), cores=draw(st.integers(1, 3)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(miss_cases())
def test_auto_is_never_slower_than_both_wait_and_cpu(case):
    with tempfile.TemporaryDirectory() as tmp:
        trace = write_routing(Path(tmp) / "t.parquet", case["routing"], 1, case["E"])
        hw = cpu_profile(cpu_ms=case["cpu_ms"], pcie_gbps=case["pcie"], cores=case["cores"])
        model = {**TINY_MODEL, "num_experts": case["E"], "top_k": case["K"]}
        t = {m: simulate(scen(trace, m, hw=hw, model=model, gpu={"capacity_experts": case["cap"]},
                              batch={"size": case["batch"]})).summary for m in ("wait", "cpu", "auto")}
    assert t["auto"]["makespan_s"] <= max(t["wait"]["makespan_s"], t["cpu"]["makespan_s"]) * (1 + 1e-9)
    for s in t.values():
        assert s["hits"] + s["late_hits"] + s["misses"] == s["accesses"]


# ---- KV cache in the GPU budget ------------------------------------------------------------------

def _budget(extra_bytes: float, configured: int = 10):
    m = ModelSpec(**TINY_MODEL)
    mem = (m.resident_bytes + activation_bytes(m, 1) + configured * m.expert_bytes + extra_bytes) / 1e9
    return m, KvBudget(m, mem, configured)


def test_kv_growth_evicts_exactly_the_closed_form_number():
    """Tier full at 10 experts with half an expert spare (96 KV tokens); each expert's worth of KV
    tokens (eb / kv bytes per token = 192) evicts one more: a tier of n experts keeps
    floor(10.5 - kv_tokens / 192)."""
    m, kv = _budget(m_half := 0.5 * ModelSpec(**TINY_MODEL).expert_bytes)
    per_token = 2 * 4 * 64 * L * 2
    assert m.kv_bytes_per_token == per_token
    tier = Tier("gpu", 10, "lru", "global", 16, L)
    for k in range(10):
        tier.reserve(k, k)
        tier.complete(k)
    for kv_tokens, want in ((0, 0), (90, 0), (192 * 3, 3), (192 * 3 + 100, 1), (192 * 9, 5)):
        before = len(tier)
        expected = max(0, before - int((10 * EB + m_half - kv_tokens * per_token) // EB))
        assert expected == want
        assert len(kv.step(kv_tokens, 1, tier)) == want
        tier.check()
    assert kv.kv_evictions == 3 + 1 + 5
    kv.step(0, 1, tier)  # the sequences finish: the tier grows back
    assert tier.capacity == 10 and kv.kv_evictions == 9


class _Checked(Simulation):
    """Steps SimPy one event at a time and checks the tier against the memory the KV cache leaves."""

    def run(self):
        self.env.process(self._driver())
        mem = self.cost.hw.gpu.memory_gb * 1e9
        while True:
            try:
                self.env.step()
            except simpy.core.EmptySchedule:
                break
            if self.view is not None:
                plan = self.view._plan
                used = (self.gpu.occupancy() * self.eb + plan.context_tokens * self.model.kv_bytes_per_token
                        + self.model.resident_bytes + activation_bytes(self.model, plan.tokens))
                assert used <= mem, (used, mem)
                assert self.gpu.occupancy() <= self.gpu.capacity
        self._release(None)
        self.rec.finish(self)
        return self.rec


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(miss_cases(), st.integers(2, 30), st.sampled_from(["wait", "auto"]))
def test_tier_never_exceeds_memory_left_after_kv(case, spare_experts, miss):
    """Memory for the resident weights, `spare_experts` experts and the batch's KV cache at its
    longest: the tier starts larger than it ends, and shrinks as the sequences grow."""
    m = ModelSpec(**{**TINY_MODEL, "num_experts": case["E"], "top_k": case["K"]})
    b, ctx = case["batch"], case["routing"].shape[1]
    kv_max = b * (ctx * m.kv_bytes_per_token + activation_bytes(m, 1)) + activation_bytes(m, b)
    mem = (m.resident_bytes + spare_experts * m.expert_bytes + kv_max) / 1e9
    with tempfile.TemporaryDirectory() as tmp:
        trace = write_routing(Path(tmp) / "t.parquet", case["routing"], 1, case["E"])
        sc = scen(trace, miss, hw=cpu_profile(memory_gb=mem), model=m.model_dump(),
                  gpu={"capacity_experts": case["cap"]}, batch={"size": b, "max_context": ctx}, kv=True)
        orig = run_mod.Simulation
        run_mod.Simulation = _Checked
        try:
            s = simulate(sc).summary
        finally:
            run_mod.Simulation = orig
    assert s["kv_cache"]["overcommitted_steps"] == 0
    assert s["kv_cache"]["admission_limit"] >= 1


def test_kv_admission_limits_the_batch(tmp_path):
    """Memory for the resident weights, one layer's top-k (1) experts and 2.5 sequences' KV at
    max_context: a batch of 4 is admitted 2 at a time."""
    m = ModelSpec(**TINY_MODEL)
    ctx = 64
    per_seq = ctx * m.kv_bytes_per_token + activation_bytes(m, 1)
    mem = (m.resident_bytes + 1 * m.expert_bytes + 2.5 * per_seq) / 1e9
    trace = write_routing(tmp_path / "t.parquet", routing(np.random.default_rng(3), 4, 8, 16), 2, 16)
    sc = scen(trace, hw=cpu_profile(memory_gb=mem), gpu={"capacity_experts": 6},
              batch={"size": 4, "max_context": ctx}, kv=True)
    s = simulate(sc).summary
    assert s["kv_cache"]["admission_limit"] == 2 and s["scheduler"]["max_running"] == 2
    free = simulate(scen(trace, gpu={"capacity_experts": 6},
                         batch={"size": 4})).summary
    assert "kv_cache" not in free and free["scheduler"]["max_running"] == 4


# ---- bad input ---------------------------------------------------------------------------------

def _cli(tmp_path, text):
    from click.testing import CliRunner

    from moesim.cli import main

    p = tmp_path / "s.yaml"
    p.write_text(text)
    r = CliRunner().invoke(main, ["run", str(p), "-o", str(tmp_path / "out")])
    return r.exit_code, r.output


ROOT = Path(__file__).resolve().parents[1]
QS = (ROOT / "scenarios/quickstart.yaml").read_text().replace("../traces/", str(ROOT / "traces") + "/")


def test_cpu_miss_without_host_cpu_is_an_exit_2_error(tmp_path):
    code, out = _cli(tmp_path, QS.replace("hardware: rtx4090-pcie4", "hardware: a100-80gb-pcie4") + "miss: cpu\n")
    assert code == 2 and "Traceback" not in out
    assert "hardware.host_cpu" in out and "host_cpu section" in out


def test_kv_leaving_no_room_for_top_k_is_an_exit_2_error_with_numbers(tmp_path):
    text = QS.replace("batch: {size: 4}", "batch: {size: 4, max_context: 2000000}").replace(
        "cache:\n", "cache:\n  kv_cache: true\n")
    code, out = _cli(tmp_path, text)
    assert code == 2 and "Traceback" not in out, out
    assert "cache.kv_cache" in out and "top_k=8 experts need" in out and "2000000 positions" in out


# ---- advise and the what-if ----------------------------------------------------------------------

def test_advise_searches_miss_and_kv_cache_where_the_profile_allows():
    from moesim.advise import advise_from_dict
    from moesim.advise.space import Infeasible, Space
    from moesim.config import apply_overrides
    from moesim.sweep.spec import override_strings

    spec = advise_from_dict({"model": "olmoe-1b-7b", "hardware": ["rtx4090-pcie4", "a100-80gb-pcie4"],
                             "slo": {"tpot_ms": 1000},
                             "space": {"miss": ["wait", "auto"], "cache.kv_cache": [False, True]}})
    sp = Space(spec)
    cfg = {**spec.default_config, "miss": "auto", "cache.kv_cache": True}
    ov = sp.overrides({**cfg, "hardware": "rtx4090-pcie4"})
    assert ov["miss"] == "auto" and ov["cache.kv_cache"] is True
    assert ov["batch.max_context"] == 96  # the shipped OLMoE sample: 32 prompt + 64 decode tokens
    sc = scenario_from_dict(apply_overrides(sp.base(), override_strings(ov)))
    assert sc.miss == "auto" and sc.cache.kv_cache
    with pytest.raises(Infeasible, match="host_cpu"):
        sp.overrides({**cfg, "hardware": "a100-80gb-pcie4"})


def test_miss_auto_whatif_applies_to_a_wait_run_on_a_profile_with_a_host_cpu(tmp_path):
    from moesim.advise.whatif import WHATIFS, applicable

    trace = write_routing(tmp_path / "t.parquet", routing(np.random.default_rng(4), 1, 3, 16), 1, 16)
    run, _ = applicable(scen(trace))
    assert "miss_auto" in {w.name for w in run}
    assert WHATIFS["miss_auto"].overrides(scen(trace)) == {"miss": "auto"}
    _, skipped = applicable(scen(trace, "auto"))
    assert "miss_auto" in {s["name"] for s in skipped}


def test_preload_popular_places_the_most_used_experts_before_the_run(tmp_path):
    """Every layer routes to expert 3 except the last token (expert 5): with a global capacity of L
    experts, preload holds expert 3 of every layer, so its first access is already a hit."""
    r = np.full((1, 6, L, 1), 3, dtype=np.int16)
    r[0, 5, :, 0] = 5
    trace = write_routing(tmp_path / "t.parquet", r, 1, 16)
    pre = simulate(scen(trace, gpu={"capacity_experts": L, "preload": "popular"})).summary
    cold = simulate(scen(trace, gpu={"capacity_experts": L})).summary
    assert pre["gpu_preloaded_experts"] == L
    assert cold["misses"] - pre["misses"] == L  # the L first-touch misses of expert 3
    assert "preload" not in cold["scenario"]["cache"]["gpu"]


def test_profile_section_host_cpu_adds_a_measured_section(tmp_path):
    pytest.importorskip("torch")
    import json
    import shutil

    from click.testing import CliRunner

    from moesim.cli import main
    from moesim.hardware.profile import load_profile

    src = ROOT / "benchmarks/fidelity/profiles/cpu-olmoe-1b-7b-x0.25.yaml"
    prof = tmp_path / "p.yaml"
    shutil.copy(src, prof)
    r = CliRunner().invoke(main, ["profile", "-o", str(prof), "--model", "olmoe-1b-7b", "--scale", "0.05",
                                  "--section", "host_cpu", "--quick", "--quiet"])
    assert r.exit_code == 0, r.output
    hp = load_profile(str(prof))
    assert set(hp.host_cpu.expert_ms) == {"bfloat16", "float32"} and hp.host_cpu.model == "olmoe-1b-7b@0.05"
    assert all(m > 0 for m in hp.host_cpu.expert_ms["bfloat16"].ms)
    assert hp.gpu == load_profile(str(src)).gpu  # the rest of the profile is kept
    assert "host_cpu" in json.loads((tmp_path / "p.measurements.json").read_text())


# ---- low-bit stand-ins ---------------------------------------------------------------------------

def _scored_trace(path, routing, scores, num_experts):
    """write_routing plus a `scores` column (one gate weight per chosen expert)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from moesim.traces.io import TraceReader, write_trace

    write_routing(path, routing, 1, num_experts)
    t = pq.read_table(path)
    K = routing.shape[3]
    t = t.append_column("scores", pa.array(list(scores.reshape(-1, K).astype(np.float32)), pa.list_(pa.float32())))
    write_trace(path, t, TraceReader(path).meta)
    return path


def test_low_score_misses_load_a_low_bit_stand_in(tmp_path):
    """Every access misses (capacity 1); tokens alternate between gate weight 0.05 (below the 0.1
    threshold: a 4-bit stand-in, a quarter of the bf16 bytes) and 0.9 (full precision):
    makespan = n/2 * (A + T(eb/4) + C) + n/2 * (A + T(eb) + C)."""
    R, T = 1, 6
    r = routing(np.random.default_rng(5), R, T, 16)
    sc = np.where((np.arange(T) % 2 == 0)[None, :, None, None], 0.05, 0.9) * np.ones(r.shape)
    trace = _scored_trace(tmp_path / "t.parquet", r, sc, 16)
    data = scen(trace).model_dump(mode="json", exclude={"base_dir"})
    data["standin"] = {"bits": 4, "threshold": 0.1}
    s = simulate(scenario_from_dict(data, file="<test>")).summary
    n = T * L
    low = transfer_s(EB / 4, 1.0, 10.0)
    assert s["standin"]["standin_experts"] == s["standin"]["standin_tokens"] == n // 2
    assert s["makespan_s"] == pytest.approx(n / 2 * (A + low + 0.2e-3) + n / 2 * (A + transfer_s(EB, 1.0, 10.0)
                                                                            + 0.2e-3), rel=1e-9)
    assert s["bytes_pcie"] == n // 2 * EB + n // 2 * (EB // 4)


def test_standin_without_scores_is_an_exit_2_error(tmp_path):
    code, out = _cli(tmp_path, QS + "standin: {bits: 4, threshold: 0.1}\n")
    assert code == 2 and "Traceback" not in out
    assert "standin" in out and "no scores column" in out and "olmoe-sample.parquet" in out


def test_readme_kv_budget_figures_are_what_the_scenario_gives():
    """The README's KV-budget paragraph quotes scenarios/kv-budget.yaml: keep them in step."""
    from moesim.config import load_scenario

    readme = (ROOT / "README.md").read_text()
    s = simulate(load_scenario(ROOT / "scenarios/kv-budget.yaml")).summary
    off = simulate(load_scenario(ROOT / "scenarios/kv-budget.yaml", ["cache.kv_cache=false"])).summary
    kv = s["kv_cache"]
    claim = (f"The tier's capacity drops as low as {kv['gpu_capacity_min']} experts, from\nthe configured "
             f"{kv['gpu_capacity_configured']}, and KV growth evicts {kv['kv_evictions']} experts. Tokens/s are "
             f"{s['tokens_per_s']:.1f}, against {off['tokens_per_s']:.1f} with")
    assert claim in readme
