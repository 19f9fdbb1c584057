"""A disk read after idle (`hardware.disk.idle_read_extra`, issue 15): closed forms and schema."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from moesim import simulate
from moesim.hardware.costs import transfer_s
from moesim.hardware.profile import IdleExtra
from tests.helpers import TINY_MODEL, fixed_profile, scenario, write_routing

A, C = 0.1e-3, 0.2e-3
EB = 3 * 256 * 512 * 2
T_PCIE = transfer_s(EB, 1.0, 10.0)
T_DISK = transfer_s(EB, 0.5, 100.0)
L = TINY_MODEL["num_layers"]
X = 250e-6  # the extra of a read after idle


def _hw(idle_ms, extra_us=None):
    hw = fixed_profile()
    if idle_ms is not None:
        hw["disk"]["idle_read_extra"] = {"idle_ms": idle_ms, "extra_us": extra_us}
        hw["disk"]["source"]["idle_read_extra"] = "test fixture"
    return hw


def _disk_routing(tmp_path, k):
    """Every access a new expert: each layer reads k experts from the disk."""
    E = 256
    routing = np.empty((1, 5, L, k), dtype=np.int16)
    for t in range(5):
        for layer in range(L):
            routing[0, t, layer] = [(k * (t * L + layer) + j) % E for j in range(k)]
    return write_routing(tmp_path / "t.parquet", routing, prompt_len=1, num_experts=E), {**TINY_MODEL, "top_k": k,
                                                                                       "num_experts": E}


def _run(trace, model, k, hw):
    return simulate(scenario(trace, model=model, hardware=hw, gpu={"capacity_experts": k},
                             dram={"capacity_experts": k})).summary


def test_idle_extra_is_a_step_table():
    t = IdleExtra(idle_ms=[0.5, 2.0, 5.0], extra_us=[0.0, 100.0, 300.0])
    assert [t.extra_s(s) for s in (0.0, 0.4e-3, 0.5e-3, 1.9e-3, 2e-3, 4e-3, 5e-3, 1.0)] == pytest.approx(
        [0, 0, 0, 0, 100e-6, 100e-6, 300e-6, 300e-6])


def test_one_read_per_layer_pays_the_extra_when_idle_reaches_the_threshold(tmp_path):
    """One read per layer (n = 5·L reads). The disk idles A before the first read (since t = 0) and
    A + T_PCIE + C before each later one: a threshold at or below A charges all n reads X, one
    between the two charges n − 1, one above both none (the run as without the field)."""
    trace, model = _disk_routing(tmp_path, 1)
    n = 5 * L
    base = n * (A + T_DISK + T_PCIE + C)
    assert _run(trace, model, 1, _hw(None))["makespan_s"] == pytest.approx(base, rel=1e-9)
    gap_ms = (A + T_PCIE + C) * 1e3
    for thr_ms, charged in ((A * 1e3, n), ((A * 1e3 + gap_ms) / 2, n - 1), (gap_ms * 1.01, 0)):
        s = _run(trace, model, 1, _hw([thr_ms], [X * 1e6]))
        assert s["makespan_s"] == pytest.approx(base + charged * X, rel=1e-9), thr_ms


def test_back_to_back_reads_do_not_pay_it(tmp_path):
    """Two reads per layer, queue depth 1: the second starts as the first ends (0 idle), so each
    layer pays X once, not twice."""
    trace, model = _disk_routing(tmp_path, 2)
    plain = _run(trace, model, 2, _hw(None))["makespan_s"]
    extra = _run(trace, model, 2, _hw([A * 1e3 / 2], [X * 1e6]))["makespan_s"]
    assert extra - plain == pytest.approx(5 * L * X, rel=1e-6)


def test_channel_charges_only_a_transfer_that_starts_idle_long_enough():
    """The channel (0.1 s copies, 0.02 s extra from 0.8 s idle): idle since t = 0 at 1 s, two copies
    back to back (the first pays), a copy after 0.5 s idle (does not), one after 0.9 s (pays)."""
    import simpy

    from moesim.engine.channels import DEMAND, Channel, Transfer

    env = simpy.Environment()
    ends = []
    ch = Channel(env, "disk", 1, lambda n: 0.1, idle_extra_s=IdleExtra(idle_ms=[800], extra_us=[2e4]).extra_s)

    def go():
        yield env.timeout(1.0)
        for k in (0, 1):
            ch.submit(Transfer(k, 1, DEMAND, lambda t: ends.append(t.end)))
        yield env.timeout(0.22 + 0.5)  # both end at 1.22; then 0.5 s idle
        ch.submit(Transfer(2, 1, DEMAND, lambda t: ends.append(t.end)))
        yield env.timeout(0.1 + 0.9)  # it ends at 1.82; then 0.9 s idle
        ch.submit(Transfer(3, 1, DEMAND, lambda t: ends.append(t.end)))

    env.process(go())
    env.run()
    assert ends == pytest.approx([1.0 + 0.1 + 0.02, 1.22, 1.72 + 0.1, 2.72 + 0.1 + 0.02])


def test_a_profile_without_the_field_echoes_as_before(tmp_path):
    trace, model = _disk_routing(tmp_path, 1)
    s = simulate(scenario(trace, model=model, hardware=_hw(None), gpu={"capacity_experts": 1},
                          dram={"capacity_experts": 1})).summary
    assert "idle_read_extra" not in s["scenario"]["hardware"]["disk"]
    s = _run(trace, model, 1, _hw([0.1], [5.0]))
    assert s["scenario"]["hardware"]["disk"]["idle_read_extra"] == {"idle_ms": [0.1], "extra_us": [5.0]}


@pytest.mark.parametrize("extra,field", [
    ({"idle_ms": [1.0], "extra_us": [10.0]}, "idle_read_extra has no entry in source"),
    ({"idle_ms": [2.0, 1.0], "extra_us": [1.0, 2.0], "src": 1}, "strictly increasing"),
    ({"idle_ms": [1.0], "extra_us": [-1.0], "src": 1}, "extra_us must be >= 0"),
    ({"idle_ms": [1.0, 2.0], "extra_us": [1.0], "src": 1}, "idle_ms has 2 points"),
])
def test_bad_idle_read_extra_exits_2_naming_file_and_field(tmp_path, extra, field):
    import yaml

    from moesim.cli import main

    hw = fixed_profile()
    if extra.pop("src", None):
        hw["disk"]["source"]["idle_read_extra"] = "x"
    hw["disk"]["idle_read_extra"] = extra
    prof = tmp_path / "hw.yaml"
    prof.write_text(yaml.safe_dump(hw))
    trace, model = _disk_routing(tmp_path, 1)
    sc = tmp_path / "s.yaml"
    sc.write_text(yaml.safe_dump({"name": "x", "model": model, "hardware": str(prof), "trace": {"path": str(trace)},
                                  "cache": {"gpu": {"capacity_experts": 1}, "dram": {"capacity_experts": 1}},
                                  "predictor": {"name": "on_demand"}, "batch": {"size": 1}}))
    r = CliRunner().invoke(main, ["run", str(sc), "-o", str(tmp_path / "out"), "--quiet", "--no-report"])
    assert r.exit_code == 2, r.output
    assert str(prof) in r.output and "disk" in r.output and field in r.output and "Traceback" not in r.output
