"""`moesim profile --quick` on this machine's CPU: a profile YAML that validates, that `moesim
hardware show` accepts and whose measured tables grow (roughly) with tokens."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from moesim.hardware.profile import load_profile
from moesim.cli.profile import profile


def _monotone_ish(xs, ms, slack=0.6):
    """Each point at least (1 - slack) of the largest before it (loose: other load on the machine moves single
    points); the curve rises overall."""
    best = 0.0
    for m in ms:
        assert m >= (1 - slack) * best - 0.02, (xs, ms)
        best = max(best, m)
    assert ms[-1] > ms[0], (xs, ms)


def test_profile_quick_writes_a_valid_measured_profile(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "cpu-test.yaml"
    r = CliRunner().invoke(profile, ["--quick", "--model", "switch-base-128", "--scale", "0.25", "-o", str(out),
                                     "--device", "cpu", "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0, r.output  # (its speed is not asserted: it depends on the machine's load)
    p = load_profile(str(out))
    assert p.name == "cpu-test"
    m = p.measured
    assert m is not None and m.model == "switch-base-128@0.25"
    assert m.source.startswith("measured by moesim profile") and "bfloat16" in m.source
    assert m.expert_compute_ms.tokens[0] == 1 and m.expert_compute_ms.tokens[-1] == 4096
    _monotone_ish(m.expert_compute_ms.tokens, m.expert_compute_ms.ms)
    # attention: decode-shaped up to 16 tokens, a causal prefill above; each part grows
    from moesim.real.profiler import DECODE_SHAPE_MAX
    pts = list(zip(m.attention_ms.tokens, m.attention_ms.ms))
    for part in ([p for p in pts if p[0] <= DECODE_SHAPE_MAX], [p for p in pts if p[0] > DECODE_SHAPE_MAX]):
        _monotone_ish([x for x, _ in part], [y for _, y in part])
    for sec in (p.gpu, p.pcie_h2d, p.disk, p.host_dram):
        for k, v in sec.source.items():
            assert v.startswith("measured by moesim profile") or "moesim replay" in v, (k, v)
    assert "CPU" in p.gpu.name and "CPU" in p.description
    assert 0.01 < p.disk.read_bandwidth_gbps < 100 and 0.1 < p.pcie_h2d.bandwidth_gbps < 1000
    # the raw measurements with their spread sit beside the profile
    side = json.loads((tmp_path / "cpu-test.measurements.json").read_text())
    assert side["disk"]["method"] in ("odirect", "fadvise")
    assert {"median", "p10", "p90", "n"} <= set(side["expert_compute"][0])
    frac = side["disk"]["verification"]["page_cache_fraction_after_bypassed_reads"]
    assert frac is None or frac < 0.05
    # the runtime part: a runtime YAML beside it that loads, every measured number sourced
    from moesim.hardware.runtime import load_runtime
    rt = load_runtime(str(tmp_path / "cpu-test.runtime.yaml"))
    assert rt.synchronous_compute and rt.blocking_readback  # the CPU computes on the host thread
    assert rt.layer_host_us > 0 and rt.step_host_us > 0 and rt.readback_us > 0 and rt.copy_slowdown >= 1
    assert set(rt.dequant_gbps) == {"int8", "int4"} and all(v > 0 for v in rt.dequant_gbps.values())
    assert rt.lm_head_table.tokens[0] == 1 and rt.attention_grid.ms[0][0] > 0
    assert rt.attention_grid.context[:2] == [32.0, 64.0]  # short decode contexts interpolate, not clamp
    assert side["runtime"]["layer_bookkeeping_batch"]["experts"] > side["runtime"]["layer_bookkeeping"]["experts"]
    for k in ("step_host_us", "layer_host_us", "readback_us", "copy_slowdown", "dequant_gbps", "lm_head_table"):
        assert rt.source[k].startswith("measured by moesim profile"), k
    assert side["runtime"]["copy_slowdown"]["copies"] > 0
    # loads slowed while computing: both phases timed, the loader's file removed, the field sourced
    ls = side["runtime"]["load_slowdown"]
    assert ls["alone"]["load"]["n"] > 0 and ls["busy"]["load"]["n"] > 0 and ls["io"] in ("odirect", "fadvise")
    assert ls["slowdown"] == pytest.approx(ls["busy"]["load"]["median"] / ls["alone"]["load"]["median"])
    assert rt.load_slowdown == max(1.0, float(f"{ls['slowdown']:.4g}")) and not list(tmp_path.glob(".moesim-load-*"))
    assert rt.load_slowdown == 1.0 or rt.source["load_slowdown"].startswith("measured by moesim profile")
    # a read after disk idle: each gap timed in interleaved rounds; the profile's table is what they
    # measured (negative extras as 0)
    idle = side["disk"]["idle_reads"]
    assert p.disk.idle_read_extra.idle_ms == [g["idle_ms"] for g in idle["gaps"]] == [0.5, 1.0, 2.0, 5.0, 10.0, 20.0]
    assert p.disk.idle_read_extra.extra_us == [float(f"{max(g['extra_us'], 0):.3g}") for g in idle["gaps"]]
    for g in idle["gaps"]:
        assert g["n"] == idle["rounds"] * idle["reads_per_round"] and len(g["extra_us_rounds"]) == idle["rounds"]
        assert g["extra_us"] == pytest.approx(float(np.median(g["extra_us_rounds"])))
    assert "interleaved rounds" in p.disk.source["idle_read_extra"]
    # every set of expert-sized reads, side by side: the disk's speed in each context
    ctx = side["disk"]["expert_read_contexts"]
    assert ctx["back to back"] == side["disk"]["expert_read"]["median"]
    assert ctx["interleaved with idle gaps, back to back"] == idle["back_to_back"]["median"]
    assert ctx["loader thread, alone"] == ls["alone"]["read"]["median"]
    assert "the same read elsewhere in this profile" in p.disk.source["read_bandwidth_gbps"]
    assert "max/min" in p.disk.source["read_bandwidth_gbps"]
    # `moesim hardware show` accepts it
    from moesim.cli import main
    r = CliRunner().invoke(main, ["hardware", "show", str(out)])
    assert r.exit_code == 0, r.output
    assert yaml.safe_load(r.output)["measured"]["model"] == "switch-base-128@0.25"
    # a scenario of that model picks up the measured tables
    from moesim.hardware.costs import CostModel
    from moesim.models import get_preset
    from moesim.real.scale import scaled_model
    cm = CostModel(scaled_model(get_preset("switch-base-128"), 0.25, None, 2.0), p)
    assert cm.uses_measured == {"expert_compute": True, "attention": True}


def test_profile_bad_model_is_an_input_error(tmp_path):
    r = CliRunner().invoke(profile, ["--model", "nope", "-o", str(tmp_path / "x.yaml")])
    assert r.exit_code == 2 and "unknown model preset" in r.output
