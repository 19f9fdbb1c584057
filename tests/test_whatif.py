"""Bottleneck what-ifs: the closed-form link bound, the registry's applicability checks, the
verdict sentence and `moesim run --why`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from moesim.advise import whatif
from moesim.advise.whatif import WHATIFS, WhatIf, applicable, run_whatifs, verdict
from moesim.cli import main
from moesim.config import scenario_from_dict
from moesim.engine.run import simulate
from moesim.sweep import get_executor

# Mixtral's 352 MB experts over PCIe 4.0 with a cache of top_k experts: every access misses and the
# GPU waits on the link for almost all of the run.
LINK_BOUND = {"name": "linkbound", "model": "mixtral-8x7b", "hardware": "a100-80gb-pcie4",
              "trace": {"synthetic": {"requests": 2, "prompt_len": 4, "decode_len": 8}},
              "cache": {"gpu": {"capacity_experts": 2}}, "batch": {"size": 1}}


def test_2x_pcie_gives_the_gain_the_link_bound_predicts(tmp_path):
    """On demand, every access a miss: each layer waits for its experts' transfers one after another,
    so doubling the bandwidth removes half of the bytes' transfer time from the makespan and
    nothing else: gain = T / (T - bytes / (2·bw)) - 1 (per-transfer latency unchanged)."""
    sc = scenario_from_dict(LINK_BOUND)
    s = simulate(sc).summary
    assert s["gpu_hit_rate"] == 0 and s["stall_fraction"] > 0.95
    doc = run_whatifs(LINK_BOUND, sc, s, tmp_path, get_executor("local", workers=1))
    gains = {r["name"]: r["gain"] for r in doc["whatifs"]}
    bw = sc.hardware.pcie_h2d.bandwidth_gbps * 1e9
    predicted = s["makespan_s"] / (s["makespan_s"] - s["bytes_pcie"] / (2 * bw)) - 1
    assert gains["pcie_2x"] == pytest.approx(predicted, rel=1e-3)
    assert doc["kind"] == "link-bound"
    assert doc["verdict"].startswith(f"link-bound: {s['stall_fraction']:.0%} stalled on PCIe; ")
    # ranked largest first, and the file says the same
    assert [r["gain"] for r in doc["whatifs"]] == sorted((r["gain"] for r in doc["whatifs"]), reverse=True)
    assert json.loads((tmp_path / "whatif.json").read_text())["verdict"] == doc["verdict"]


def test_applicability():
    resident = scenario_from_dict({**LINK_BOUND, "hardware": {"profile": "a100-80gb-pcie4", "gpu": {"memory_gb": 100}},
                                   "cache": {"gpu": {"capacity_experts": 8, "partition": "per_layer"}}})
    run, skipped = applicable(resident)
    assert not run and {s["name"] for s in skipped} == set(WHATIFS)
    oracle = scenario_from_dict({**LINK_BOUND, "predictor": {"name": "oracle", "lookahead_layers": 2}})
    run, skipped = applicable(oracle)
    assert [s["name"] for s in skipped] == ["oracle", "half_host", "miss_auto"]  # no runtime; a100-80gb-pcie4 has no host_cpu
    assert {w.name for w in run} == {"pcie_2x", "cache_plus_25", "all_resident"}


def test_transforms_change_one_thing():
    sc = scenario_from_dict(LINK_BOUND)
    assert WHATIFS["pcie_2x"].overrides(sc) == {"hardware.pcie_h2d.bandwidth_gbps": 50.0}
    assert WHATIFS["cache_plus_25"].overrides(sc)["cache.gpu"]["capacity_experts"] == 3
    res = WHATIFS["all_resident"].overrides(sc)
    assert res["cache.gpu"] == {"capacity_experts": 8, "policy": "lru", "partition": "per_layer"}
    assert res["hardware.gpu.memory_gb"] >= 256 * sc.model.expert_bytes / 1e9  # a GPU with room for them all


def test_a_new_whatif_is_one_registration(monkeypatch, tmp_path):
    monkeypatch.setitem(WHATIFS, "half_link", WhatIf(
        "half_link", "a ½ link", lambda sc: None,
        lambda sc: {"hardware.pcie_h2d.bandwidth_gbps": sc.hardware.pcie_h2d.bandwidth_gbps / 2}))
    sc = scenario_from_dict(LINK_BOUND)
    doc = run_whatifs(LINK_BOUND, sc, simulate(sc).summary, tmp_path, get_executor("local", workers=1))
    half = next(r for r in doc["whatifs"] if r["name"] == "half_link")
    assert half["gain"] < -0.4 and doc["whatifs"][-1]["name"] == "half_link"


def test_verdict_names_compute_bound():
    kind, text = verdict({"stall_fraction": 0.1, "gpu_utilization": 0.8},
                         [{"label": "a 2× link", "gain": 0.01}, {"label": "an oracle predictor", "gain": 0.0}])
    assert kind == "compute-bound"
    assert text == "compute-bound: the GPU computes 80% of the time; a 2× link gives +1%, an oracle predictor +0%"


def _scenario(tmp_path) -> Path:
    f = tmp_path / "lb.yaml"
    f.write_text(yaml.safe_dump(LINK_BOUND))
    return f


def test_run_why_writes_whatif_json_and_the_report_section(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["run", str(_scenario(tmp_path)), "-o", str(out), "--why"])
    assert r.exit_code == 0, r.output
    assert "why: link-bound:" in r.output
    doc = json.loads((out / "whatif.json").read_text())
    page = (out / "report.html").read_text()
    assert "Why: bottleneck analysis" in page and doc["verdict"] in page.replace("\\u00d7", "×")
    # a later run without the analysis drops the old one (and its report section)
    r = CliRunner().invoke(main, ["run", str(_scenario(tmp_path)), "-o", str(out), "--no-why", "--quiet"])
    assert r.exit_code == 0, r.output
    assert not (out / "whatif.json").exists()
    assert "Why: bottleneck analysis" not in (out / "report.html").read_text()


@pytest.mark.parametrize("cores,runs", [(1, False), (8, True)])
def test_why_default_depends_on_whether_it_would_double_the_run_time(tmp_path, monkeypatch, cores, runs):
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["run", str(_scenario(tmp_path)), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "whatif.json").exists() == runs and ("why: link-bound" in r.output) == runs
    assert ("Why: bottleneck analysis" in (out / "report.html").read_text()) == runs
    assert ("moesim run --why` adds one" in (out / "report.html").read_text()) == (not runs)


def test_registry_is_the_module_level_dict():
    assert whatif.WHATIFS is WHATIFS and list(WHATIFS) == ["pcie_2x", "cache_plus_25", "oracle", "all_resident",
                                                                  "half_host", "miss_auto"]


# Every expert resident and a per-layer host cost far above the GPU's work per layer: the GPU waits
# on the host at every layer, so each step lasts (layers x host cost) + its last layer's GPU work.
HOST_BOUND = {"name": "hostbound", "model": "olmoe-1b-7b", "hardware": "a100-80gb-pcie4",
              "trace": {"synthetic": {"requests": 1, "prompt_len": 4, "decode_len": 6}},
              "cache": {"gpu": {"capacity_experts": 64, "partition": "per_layer"}}, "batch": {"size": 1},
              "runtime": {"layer_host_us": 100_000, "source": {"layer_host_us": "a test value"}}}


def test_half_host_overhead_gives_the_host_bound_gain(tmp_path):
    """Host-bound: halving the per-layer host cost H removes steps x layers x H/2 from the makespan
    and nothing else, so gain = T / (T - steps·L·H/2) - 1; the verdict names the host."""
    sc = scenario_from_dict(HOST_BOUND)
    res = simulate(sc)
    s = res.summary
    steps = res.steps["step"].nunique()
    T, saved = s["makespan_s"], steps * sc.model.num_layers * 0.05
    assert s["host"]["gpu_wait_on_host_s"] / T > 0.9
    assert WHATIFS["half_host"].overrides(sc) == {"runtime.layer_host_us": 50_000}
    doc = run_whatifs(HOST_BOUND, sc, s, tmp_path, get_executor("local", workers=1))
    gains = {r["name"]: r["gain"] for r in doc["whatifs"]}
    assert gains["half_host"] == pytest.approx(T / (T - saved) - 1, rel=1e-6)
    assert doc["kind"] == "host-bound" and doc["verdict"].startswith("host-bound: the GPU waits ")
    assert "half the host overhead gives +" in doc["verdict"]
