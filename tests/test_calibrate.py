"""`moesim calibrate` recovers a runtime it did not see, from points simulated under it (issue 15)."""
from __future__ import annotations

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from moesim import simulate
from moesim.cli import main
from moesim.config import load_scenario
from moesim.validate import TINY_MODEL, fixed_profile, write_routing

TRUE = {"layer_host_us": 700.0, "step_host_us": 2000.0}
SETS = {"small-cache": {"cache.gpu.capacity_experts": 2}, "big-cache": {"cache.gpu.capacity_experts": 32},
        "two-layers": {"model.num_layers": 2, "trace": "t2.parquet"},  # separates step from layer cost
        "oracle": {"cache.gpu.capacity_experts": 4, "predictor.name": "oracle"}}


@pytest.fixture
def points(tmp_path):
    """A scenario, and its tpot_ms under TRUE (blocking readback and loads) at three settings."""
    rng = np.random.default_rng(3)
    routing = rng.integers(0, 16, size=(2, 8, TINY_MODEL["num_layers"], 1)).astype(np.int16)
    write_routing(tmp_path / "t.parquet", routing, prompt_len=2, num_experts=16)
    write_routing(tmp_path / "t2.parquet", routing[:, :, :2], prompt_len=2, num_experts=16)
    sc = {"model": TINY_MODEL, "hardware": fixed_profile(), "trace": "t.parquet",
          "cache": {"gpu": {"capacity_experts": 2}}, "predictor": {"name": "on_demand"}}
    (tmp_path / "sc.yaml").write_text(yaml.safe_dump(sc))
    base = {"blocking_readback": True, "blocking_loads": True,
            "source": {"blocking_readback": "test", "blocking_loads": "test"}}
    truth = {**base, **TRUE, "source": {**base["source"], **{k: "test" for k in TRUE}}}
    pts = []
    for name, st in SETS.items():
        over = [f"{k}={v}" for k, v in st.items()] + [f"runtime={yaml.safe_dump(truth, default_flow_style=True).strip()}"]
        s = simulate(load_scenario(tmp_path / "sc.yaml", over)).summary
        pts.append({"name": name, "scenario": "sc.yaml", "set": st, "tpot_ms": s["tpot_ms"]["mean"],
                    "source": "simulated under TRUE", "holdout": name == "oracle"})
    doc = {"name": "fitted", "base_runtime": base, "free": {"layer_host_us": [0, 5000], "step_host_us": [0, 10000]},
           "points": pts}
    (tmp_path / "points.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return tmp_path / "points.yaml"


def test_calibrate_recovers_the_costs_and_writes_a_sourced_runtime(points, tmp_path):
    out = tmp_path / "rt.yaml"
    r = CliRunner().invoke(main, ["calibrate", str(points), "-o", str(out), "--max-evals", "40"])
    assert r.exit_code == 0, r.output
    rt = yaml.safe_load(out.read_text())
    for k, v in TRUE.items():
        assert rt[k] == pytest.approx(v, rel=0.02), (k, rt[k])
        assert all(n in rt["source"][k] for n in ("small-cache", "big-cache", "two-layers"))
        assert "oracle" not in rt["source"][k]  # the held-out point is never fitted
    assert rt["blocking_readback"] is True and rt["source"]["blocking_readback"] == "test"
    lines = [ln for ln in r.output.splitlines() if "cache" in ln or "oracle" in ln]
    assert "held out" in lines[-1]  # held-out points are reported last
    # the written runtime loads and predicts the held-out point
    from moesim.hardware.runtime import load_runtime

    assert load_runtime(str(out)).layer_host_us == pytest.approx(TRUE["layer_host_us"], rel=0.02)


def test_the_written_runtime_keeps_every_base_field(points, tmp_path):
    """Fields of the base runtime that the fit does not touch (load_slowdown, which the serializer
    omits at its default, and evict_writeback) are written with their sources."""
    doc = yaml.safe_load(points.read_text())
    doc["base_runtime"].update(load_slowdown=1.5, evict_writeback="same_stream")
    doc["base_runtime"]["source"].update(load_slowdown="test ls", evict_writeback="test wb")
    doc["free"] = {"layer_host_us": [0, 5000]}
    points.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = tmp_path / "rt.yaml"
    r = CliRunner().invoke(main, ["calibrate", str(points), "-o", str(out), "--max-evals", "3", "--quiet"])
    assert r.exit_code == 0, r.output
    rt = yaml.safe_load(out.read_text())
    assert rt["load_slowdown"] == 1.5 and rt["source"]["load_slowdown"] == "test ls"
    assert rt["evict_writeback"] == "same_stream" and rt["source"]["evict_writeback"] == "test wb"


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["free"].update({"bogus_us": [0, 1]}), "free.bogus_us"),
    (lambda d: d["free"].update({"layer_host_us": [5, 1]}), "free.layer_host_us"),
    (lambda d: d["points"][0].update({"tokens_per_s": 3.0}), "exactly one of tokens_per_s or tpot_ms"),
    (lambda d: d["points"][0].update({"set": {"cache.gpu.capacity_experts": -1}}), "cache.gpu.capacity_experts"),
])
def test_bad_points_exit_2(points, tmp_path, edit, field):
    d = yaml.safe_load(points.read_text())
    edit(d)
    points.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["calibrate", str(points), "-o", str(tmp_path / "rt.yaml")])
    assert r.exit_code == 2, r.output
    assert field in r.output and "Traceback" not in r.output


def test_left_out_and_held_out_points_are_predicted(points):
    """Each fitted point's left-out prediction and the held-out point come from fits that never saw
    them: where the other points identify both costs, the prediction lands on the measurement.
    Without `two-layers` the two 4-layer points only fix step + 4·layer, so its own left-out
    prediction is not asserted, only made."""
    from moesim.calibrate import calibrate, load_base, load_points

    pf, pts = load_points(points)
    cal = calibrate(pf, pts, load_base(pf.base_runtime, str(points)), str(points), max_evals=40)
    rows = {r["name"]: r for r in cal.rows}
    assert [r["name"] for r in cal.rows][-1] == "oracle" and rows["oracle"]["loo_error"] is None
    assert abs(rows["oracle"]["error"]) < 0.02
    for name in ("small-cache", "big-cache"):
        assert rows[name]["loo_error"] is not None and abs(rows[name]["loo_error"]) < 0.02, rows[name]
    assert rows["two-layers"]["loo_error"] is not None


def test_tokens_per_s_is_the_decode_rate_unless_end_to_end(points):
    from moesim.calibrate import load_points, measure

    d = yaml.safe_load(points.read_text())
    d["points"][0] = {"name": "a", "scenario": "sc.yaml", "tokens_per_s": 10.0}
    d["points"][1] = {"name": "b", "scenario": "sc.yaml", "tokens_per_s": 10.0, "throughput": "end_to_end"}
    points.write_text(yaml.safe_dump(d))
    _, pts = load_points(points)
    summary = {"tpot_ms": {"mean": 40.0}, "tokens_per_s": 7.0}
    assert measure(summary, pts[0]) == 25.0 and measure(summary, pts[1]) == 7.0


def test_a_hardware_speed_is_fitted_and_written_as_a_profile(points, tmp_path):
    """`hardware.pcie_h2d.bandwidth_gbps` free: the fit recovers the link speed the points were
    simulated with (the scenario's profile says 1.0 GB/s, the truth is 2.5), and writes the points'
    profile with it, sourced to the fitted points; the runtime stays the base."""
    doc = yaml.safe_load(points.read_text())
    sc = yaml.safe_load((tmp_path / "sc.yaml").read_text())
    for p in doc["points"]:
        over = [f"{k}={v}" for k, v in p["set"].items()] + ["hardware.pcie_h2d.bandwidth_gbps=2.5"]
        rt = yaml.safe_dump(doc["base_runtime"], default_flow_style=True).strip()
        p["tpot_ms"] = simulate(load_scenario(tmp_path / "sc.yaml", over + [f"runtime={rt}"])).summary["tpot_ms"]["mean"]
    doc["free"] = {"hardware.pcie_h2d.bandwidth_gbps": [0.2, 10]}
    points.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert sc["hardware"]["pcie_h2d"]["bandwidth_gbps"] == 1.0
    out = tmp_path / "rt.yaml"
    r = CliRunner().invoke(main, ["calibrate", str(points), "-o", str(out), "--max-evals", "30"])
    assert r.exit_code == 0, r.output
    hw = yaml.safe_load((tmp_path / "rt.hardware.yaml").read_text())
    assert hw["pcie_h2d"]["bandwidth_gbps"] == pytest.approx(2.5, rel=0.02)
    assert "small-cache" in hw["pcie_h2d"]["source"]["bandwidth_gbps"] and "oracle" not in hw["pcie_h2d"]["source"]["bandwidth_gbps"]
    assert hw["disk"] == sc["hardware"]["disk"] and hw["name"] == "fitted-hardware"
    assert yaml.safe_load(out.read_text())["blocking_loads"] is True  # the base runtime, unchanged
    from moesim.hardware.profile import load_profile

    assert load_profile(str(tmp_path / "rt.hardware.yaml")).pcie_h2d.bandwidth_gbps == pytest.approx(2.5, rel=0.02)


def test_hardware_fields_need_one_profile_for_every_point(points, tmp_path):
    doc = yaml.safe_load(points.read_text())
    doc["free"] = {"hardware.disk.read_bandwidth_gbps": [0.1, 5]}
    doc["points"][1]["set"] = {**doc["points"][1]["set"], "hardware.pcie_h2d.bandwidth_gbps": 3.0}
    points.write_text(yaml.safe_dump(doc, sort_keys=False))
    r = CliRunner().invoke(main, ["calibrate", str(points), "-o", str(tmp_path / "rt.yaml")])
    assert r.exit_code == 2 and "one machine" in r.output and "free" in r.output
    assert not (tmp_path / "rt.yaml").exists()
