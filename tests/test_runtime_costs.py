"""Runtime (software-stack) costs against closed forms, on the fixed-time profile (issue 15)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim import simulate
from moesim.cli import main
from moesim.hardware.costs import transfer_s
from tests.helpers import TINY_MODEL, scenario, write_routing

A, C = 0.1e-3, 0.2e-3           # attention and expert-compute seconds (fixed tables)
EB = 3 * 256 * 512 * 2          # tiny expert in bf16
T_PCIE = transfer_s(EB, 1.0, 10.0)
L = TINY_MODEL["num_layers"]


def _src(**kw):
    return {**kw, "source": {k: "test fixture" for k in kw}}


def _fresh(tmp_path, T, E=256):
    """One request, T tokens (1 prompt), every (token, layer) a new expert: no reuse at all."""
    routing = np.empty((1, T, L, 1), dtype=np.int16)
    for t in range(T):
        for layer in range(L):
            routing[0, t, layer, 0] = (t * 7 + layer) % E
    return write_routing(tmp_path / "t.parquet", routing, prompt_len=1, num_experts=E), {**TINY_MODEL, "num_experts": E}


def _step_times(res):
    st = res.steps.groupby("step").agg(start=("start_s", "min"), end=("end_s", "max"))
    return st["end"].to_numpy() - st["start"].to_numpy(), st["start"].to_numpy()


def test_runtime_none_is_the_pure_hardware_model(tmp_path):
    trace, model = _fresh(tmp_path, 6)
    a = simulate(scenario(trace, model=model))
    b = simulate(scenario(trace, model=model, runtime="none"))
    assert a.summary == b.summary and "host" not in a.summary and "runtime" not in a.summary["scenario"]


def test_host_cost_alone(tmp_path):
    """Async launch, host-bound: layer host work H > attention + load + compute, so a step is
    set-up S + L·H (the GPU waits for each issue) + the last layer's A + T + C."""
    H, S = 2e-3, 0.5e-3
    trace, model = _fresh(tmp_path, 6)
    res = simulate(scenario(trace, model=model, runtime=_src(layer_host_us=H * 1e6, step_host_us=S * 1e6)))
    dur, start = _step_times(res)
    assert dur == pytest.approx(L * H + A + T_PCIE + C, rel=1e-9)  # from layer 0's host work to the end
    assert start[1:] - start[:-1] == pytest.approx(S + dur[:-1], rel=1e-9)  # set-up waits for the token
    assert res.summary["host"]["busy_s"] == pytest.approx(6 * (S + L * H), rel=1e-9)


def test_dequant_alone(tmp_path):
    """4-bit experts with a named format: a quarter of the bytes over PCIe, and each expert's
    kernel pays packed bytes / dequant throughput on top of its compute."""
    trace, model = _fresh(tmp_path, 5)
    model = {**model, "precision": {"experts": 4, "formats": {"experts": "q4"}}}
    eb4 = EB // 4
    D = eb4 / (0.5 * 1e9)
    res = simulate(scenario(trace, model=model, runtime=_src(dequant_gbps={"q4": 0.5})))
    s = res.summary
    assert s["expert_bytes"] == eb4 and s["bytes_pcie"] == 5 * L * eb4
    assert s["makespan_s"] == pytest.approx(5 * L * (A + transfer_s(eb4, 1.0, 10.0) + C + D), rel=1e-9)
    assert s["host"] is None  # no host cost: the host thread is not modelled at all


def test_group_scales_add_bytes():
    from moesim.models import ModelSpec

    m = ModelSpec(**{**TINY_MODEL, "precision": {"experts": 4, "attention": 16, "group_size": 64}})
    assert m.expert_bytes == int(np.ceil(m.expert_params * (4 + 16 / 64) / 8))
    assert m.component_bytes_per_param("attention") == 2.0  # 16-bit parts carry no group scales


def test_blocking_readback_delays_loads_by_a_known_time(tmp_path):
    """The host syncs on the gate and reads the routing back (R): every demand load starts R after
    its layer's attention ends, and a layer costs A + R + T + C."""
    R = 0.3e-3
    trace, model = _fresh(tmp_path, 5)
    sc = scenario(trace, model=model, runtime=_src(blocking_readback=True, readback_us=R * 1e6))
    res = simulate(sc, record_events=True)
    assert res.summary["makespan_s"] == pytest.approx(5 * L * (A + R + T_PCIE + C), rel=1e-9)
    loads = res.events[res.events["resource"] == "pcie"].sort_values("start_s")
    gates = (res.steps.sort_values("start_s")["start_s"] + A).to_numpy()
    assert loads["start_s"].to_numpy() == pytest.approx(gates + R, rel=1e-9)


def test_prefetch_hides_loads_behind_host_time(tmp_path):
    """Blocking readback and blocking demand loads (a Python offload loop): on demand a layer is
    A + R + T + H (the host waits for the copy, then does the next layer's work); an exact
    one-layer-ahead prefetch copies during the host work (T < H + A + R), so a layer is A + R + H."""
    H, R = 0.9e-3, 0.05e-3
    assert T_PCIE < H + A + R and C < H
    trace, model = _fresh(tmp_path, 30)
    rt = _src(layer_host_us=H * 1e6, readback_us=R * 1e6, blocking_readback=True, blocking_loads=True)
    on_demand = simulate(scenario(trace, model=model, gpu={"capacity_experts": 4}, runtime=rt))
    oracle = simulate(scenario(trace, model=model, gpu={"capacity_experts": 4}, runtime=rt,
                               predictor={"name": "oracle", "lookahead_layers": 1}))
    period = {}
    for name, res in (("on_demand", on_demand), ("oracle", oracle)):
        dur, _ = _step_times(res)
        period[name] = dur[15:].mean()
    assert period["on_demand"] == pytest.approx(L * (A + R + T_PCIE + H) + C, rel=1e-9)
    assert period["oracle"] == pytest.approx(L * (A + R + H) + C, rel=1e-9)
    assert oracle.summary["prefetch"]["late"] == 0


def test_synchronous_compute_serialises_host_and_kernels(tmp_path):
    """A CPU device: the host runs the kernels, so a layer is H + A + T + C with nothing overlapped
    (async launch would hide the host work behind the previous layer's load and compute)."""
    H = 0.5e-3
    trace, model = _fresh(tmp_path, 5)
    rt = _src(layer_host_us=H * 1e6, synchronous_compute=True)
    res = simulate(scenario(trace, model=model, runtime=rt))
    assert res.summary["makespan_s"] == pytest.approx(5 * L * (H + A + T_PCIE + C), rel=1e-9)
    asyn = simulate(scenario(trace, model=model, runtime=_src(layer_host_us=H * 1e6)))
    assert asyn.summary["makespan_s"] < res.summary["makespan_s"]


def _two_fresh_per_layer(tmp_path):
    """Top-2 over 256 experts, 4 tokens: every layer of every token routes to two experts never seen
    before, so with a 2-expert cache both miss. Returns (trace, model)."""
    model = {**TINY_MODEL, "top_k": 2, "num_experts": 256}
    routing = np.empty((1, 4, L, 2), dtype=np.int16)
    for t in range(4):
        for layer in range(L):
            routing[0, t, layer] = [(2 * (t * L + layer)) % 256, (2 * (t * L + layer) + 1) % 256]
    return write_routing(tmp_path / "t.parquet", routing, prompt_len=1, num_experts=256), model


def test_copy_slowdown_stretches_kernels_that_overlap_a_copy(tmp_path, rng=np.random.default_rng(2)):
    """Top-2, both miss, one copy engine: expert 1 computes while expert 2 copies, f times slower;
    with f·C > T expert 2 waits for it, so a layer is A + T + f·C + C (A + 2T + C at f = 1)."""
    f = 5.0
    assert f * C > T_PCIE
    trace, model = _two_fresh_per_layer(tmp_path)
    res = simulate(scenario(trace, model=model, gpu={"capacity_experts": 2}, runtime=_src(copy_slowdown=f)))
    assert res.summary["misses"] == 4 * L * 2
    assert res.summary["makespan_s"] == pytest.approx(4 * L * (A + T_PCIE + f * C + C), rel=1e-9)


def _write(tmp_path, runtime):
    trace, model = _fresh(tmp_path, 3)
    from moesim.validate import fixed_profile

    sc = {"model": model, "hardware": fixed_profile(), "trace": str(trace), "cache": {"gpu": {"capacity_experts": 1}},
          "runtime": runtime}
    p = tmp_path / "sc.yaml"
    p.write_text(yaml.safe_dump(sc))
    return p


@pytest.mark.parametrize("runtime, field", [
    ({"layer_host_us": 5, "source": {"layer_host_us": "x"}, "bogus_us": 1}, "runtime.bogus_us"),
    ("no-such-runtime", "runtime"),
    ({"layer_host_us": 5}, "layer_host_us has no entry in source"),
    ({"expert_efficiency": 1.5, "source": {"expert_efficiency": "x"}}, "runtime.expert_efficiency"),
    ({"load_slowdown": 0.5, "source": {"load_slowdown": "x"}}, "runtime.load_slowdown"),
    ({"load_slowdown": 1.3}, "load_slowdown has no entry in source"),
])
def test_bad_runtime_exits_2_naming_file_and_field(tmp_path, runtime, field):
    p = _write(tmp_path, runtime)
    r = CliRunner().invoke(main, ["run", str(p), "-o", str(tmp_path / "out"), "--quiet", "--no-report"])
    assert r.exit_code == 2, r.output
    assert str(p) in r.output and field in r.output and "Traceback" not in r.output


def test_unknown_key_in_a_runtime_file_names_that_file(tmp_path):
    rt = tmp_path / "rt.yaml"
    rt.write_text(yaml.safe_dump({"name": "x", "layer_host_ms": 3}))
    p = _write(tmp_path, str(rt))
    r = CliRunner().invoke(main, ["run", str(p), "-o", str(tmp_path / "out"), "--quiet", "--no-report"])
    assert r.exit_code == 2 and str(rt) in r.output and "layer_host_ms" in r.output


def test_every_shipped_runtime_preset_loads_with_sources():
    from moesim.hardware.runtime import list_runtimes, load_runtime

    names = list_runtimes()
    assert names
    for n in names:
        rt = load_runtime(n)
        assert rt.source and rt.description


def test_a_host_side_predictor_runs_on_the_host_thread(tmp_path):
    """With a runtime, a CPU predictor's latency P is host work: on a synchronous device the
    layer's kernels wait for it, so a layer whose expert was prefetched in time costs H + A + P + C,
    and the oracle's step-start call adds one P per step. Without a runtime P only delays the
    prefetches and the same run is link-bound (a layer is T)."""
    H, P = 0.9e-3, 0.2e-3
    assert T_PCIE <= C + H + A  # each one-layer-ahead prefetch lands before its layer's gate
    trace, model = _fresh(tmp_path, 6)
    pred = {"name": "oracle", "lookahead_layers": 1, "latency_us": P * 1e6, "runs_on": "cpu"}
    rt = _src(layer_host_us=H * 1e6, synchronous_compute=True)
    res = simulate(scenario(trace, model=model, gpu={"capacity_experts": 4}, runtime=rt, predictor=pred))
    s = res.summary
    assert s["host"]["busy_s"] == pytest.approx(6 * L * H + s["predictor_s"], rel=1e-9)
    dur, _ = _step_times(res)
    assert dur[2:] == pytest.approx(P + L * (H + A + P + C), rel=1e-9)
    plain = simulate(scenario(trace, model=model, gpu={"capacity_experts": 4}, predictor=pred))
    assert _step_times(plain)[0][2:] == pytest.approx(L * T_PCIE, rel=1e-9)  # link-bound: A + C < T


@st.composite
def _runtime_cases(draw):
    E, K = draw(st.sampled_from([4, 8, 16])), draw(st.integers(1, 2))
    R, T = draw(st.integers(1, 3)), draw(st.integers(2, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    routing = np.stack([rng.permutation(E)[:K] for _ in range(R * T * L)]).reshape(R, T, L, K).astype(np.int16)
    us = st.sampled_from([0.0, 50.0, 300.0, 1500.0])
    rt = {"step_host_us": draw(us), "layer_host_us": draw(us), "readback_us": draw(us),
          "expert_dispatch_us": draw(us), "blocking_readback": draw(st.booleans()),
          "blocking_loads": draw(st.booleans()), "synchronous_compute": draw(st.booleans()),
          "copy_slowdown": draw(st.sampled_from([1.0, 1.5]))}
    return dict(E=E, K=K, routing=routing, cap=draw(st.integers(K, E * L)), batch=draw(st.integers(1, R)),
                rt=_src(**{k: v for k, v in rt.items() if v not in (0.0, False, 1.0)}),
                predictor=draw(st.sampled_from([{"name": "on_demand"}, {"name": "oracle", "lookahead_layers": 2}])))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_runtime_cases())
def test_host_accounting_and_identities_under_random_runtimes(case):
    """Any runtime: every access served once, bytes = transfers x expert bytes, no layer shorter
    than its attention + compute, and the host's work is exactly what the runtime charges
    (set-up per step, layer work and readback per layer, one dispatch per expert kernel)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = write_routing(Path(tmp) / "t.parquet", case["routing"], prompt_len=1, num_experts=case["E"])
        model = {**TINY_MODEL, "num_experts": case["E"], "top_k": case["K"]}
        res = simulate(scenario(path, model=model, gpu={"capacity_experts": case["cap"]}, runtime=case["rt"],
                                predictor=case["predictor"], batch={"size": case["batch"]}))
    s, steps, rt = res.summary, res.steps, case["rt"]
    assert s["hits"] + s["late_hits"] + s["misses"] == s["accesses"]
    assert s["bytes_pcie"] == s["transfers_pcie"] * s["expert_bytes"]
    assert (steps["end_s"] - steps["start_s"] >= steps["attention_s"] + steps["compute_s"] - 1e-12).all()
    if s["host"] is None:
        return
    syncs = rt.get("blocking_readback", False) or rt.get("synchronous_compute", False)
    want = (steps["step"].nunique() * rt.get("step_host_us", 0) + len(steps) * rt.get("layer_host_us", 0)
            + (len(steps) * rt.get("readback_us", 0) if syncs else 0)
            + s["accesses"] * rt.get("expert_dispatch_us", 0)) * 1e-6
    assert s["host"]["busy_s"] == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_runtime_list_and_show():
    r = CliRunner().invoke(main, ["runtime", "list"])
    assert r.exit_code == 0 and "pytorch-offload-loop:" in r.output
    r = CliRunner().invoke(main, ["runtime", "show", "pytorch-offload-loop"])
    assert r.exit_code == 0 and yaml.safe_load(r.output)["blocking_readback"] is True
    r = CliRunner().invoke(main, ["runtime", "show", "nope"])
    assert r.exit_code == 2 and "unknown runtime 'nope'" in r.output


def test_attention_grid_times_decode_and_the_table_times_prefill():
    """A measured runtime grid (sequences x context) gives a decode step's attention; a prefill of S
    sequences of n tokens each is S one-sequence prefills of the profile's table, not n decode steps."""
    from moesim.hardware.costs import CostModel
    from moesim.hardware.profile import HardwareProfile
    from moesim.hardware.runtime import runtime_from_dict
    from moesim.models import ModelSpec
    from moesim.validate import fixed_profile

    prof = fixed_profile()
    prof["measured"]["attention_ms"] = {"tokens": [1, 16, 32, 256], "ms": [1.0, 4.0, 5.0, 30.0]}
    hw = HardwareProfile.model_validate(prof)
    rt = runtime_from_dict(_src(attention_grid={"sequences": [1, 8], "context": [32, 128],
                                                "ms": [[2.0, 3.0], [10.0, 14.0]]}))
    cm = CostModel(ModelSpec.model_validate(TINY_MODEL), hw, rt)
    assert cm.attention_s(1, 64, 1) == pytest.approx((2.0 + (3.0 - 2.0) * 32 / 96) * 1e-3)  # grid, decode
    assert cm.attention_s(8, 8 * 32, 8) == pytest.approx(10.0e-3)
    assert cm.attention_s(32, 32, 1) == pytest.approx(5.0e-3)         # prefill: the table at 32 tokens
    assert cm.attention_s(256, 256, 8) == pytest.approx(8 * 5.0e-3)   # 8 prefills of 32 tokens
    no_table = CostModel(ModelSpec.model_validate(TINY_MODEL),
                         HardwareProfile.model_validate({k: v for k, v in prof.items() if k != "measured"}), rt)
    assert no_table.attention_s(32, 32, 1) == pytest.approx(32 * 2.0e-3)  # no table: the grid, per token


def test_load_slowdown_stretches_a_load_that_overlaps_a_kernel(tmp_path):
    """Top-2, both miss, one copy engine: expert 2's copy starts as expert 1's kernel (C) starts
    and progresses f times slower while it runs: T + C·(1 − 1/f) (T > f·C would end it inside:
    not here), so a layer is A + T + T + C·(1 − 1/f) + C; f = 1 or runtime none: A + 2T + C."""
    f = 2.0
    trace, model = _two_fresh_per_layer(tmp_path)
    kw = dict(model=model, gpu={"capacity_experts": 2})
    res = simulate(scenario(trace, **kw, runtime=_src(load_slowdown=f)))
    assert res.summary["misses"] == 4 * L * 2 and T_PCIE > C
    assert res.summary["makespan_s"] == pytest.approx(4 * L * (A + 2 * T_PCIE + C * (1 - 1 / f) + C), rel=1e-9)
    for rt in ("none", {"load_slowdown": 1.0}):
        plain = simulate(scenario(trace, **kw, runtime=rt))
        assert plain.summary["makespan_s"] == pytest.approx(4 * L * (A + 2 * T_PCIE + C), rel=1e-9)
    # the scenario echo names the field only where it is set (runtimes without it echo as before)
    assert res.summary["scenario"]["runtime"]["load_slowdown"] == f
    assert "load_slowdown" not in plain.summary["scenario"]["runtime"]
    measured = simulate(scenario(trace, **kw, runtime=_src(load_slowdown=1.0)))  # a measured 1 is echoed
    assert measured.summary["scenario"]["runtime"]["load_slowdown"] == 1.0


def test_stretched_load_closed_form_and_horizon():
    """A transfer ends inside the compute (f·d) or after it (d + W·(1 − 1/f)); the horizon queues
    committed compute after what is committed already, and a channel copy takes the stretched time."""
    import simpy

    from moesim.engine.channels import DEMAND, Channel, Transfer
    from moesim.engine.overlap import ComputeHorizon, stretched_s

    assert stretched_s(1.0, 5.0, 3.0) == pytest.approx(3.0)               # inside: 3 s < 5 s of compute
    assert stretched_s(1.0, 1.5, 3.0) == pytest.approx(1.0 + 1.5 * 2 / 3)  # 0.5 done in 1.5 s, then 0.5
    assert stretched_s(1.0, 0.0, 3.0) == 1.0 and stretched_s(1.0, 5.0, 1.0) == 1.0
    env = simpy.Environment()
    h = ComputeHorizon(env, 2.0)
    h.busy(0.5)
    h.busy(0.5)  # queued after the first: compute until 1.0
    ends = []
    ch = Channel(env, "disk", 1, h.slowed(lambda n: n * 1e-3), on_drop=None)
    ch.submit(Transfer(0, 1000, DEMAND, lambda t: ends.append(t.end)))  # 1 s alone
    env.run()
    assert ends == [pytest.approx(1.0 + 1.0 * 0.5)]


def test_load_slowdown_is_simulated_on_simpy_only(tmp_path):
    """The fast path does not model the term: auto takes SimPy and names why; fast refuses."""
    from moesim.engine.run import simulate as run_engine
    from moesim.errors import InputError

    trace, model = _fresh(tmp_path, 3)
    sc = scenario(trace, model=model, runtime=_src(load_slowdown=2.0))
    assert run_engine(sc).engine == {"engine": "simpy", "reason": "a runtime's load_slowdown"}
    with pytest.raises(InputError, match="load_slowdown"):
        run_engine(sc, engine="fast")
