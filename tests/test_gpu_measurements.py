"""benchmarks/gpu: the profiles measured on the lent GPU load as hardware profiles and runtimes,
and the GPU rows' points file loads each real run with the scenario it ran."""
from __future__ import annotations

from pathlib import Path

import pytest

from moesim.calibrate import load_points
from moesim.hardware.profile import load_profile
from moesim.hardware.runtime import load_runtime

GPU = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"
RUNTIMES = sorted(GPU.rglob("*.runtime.yaml"))
PROFILES = sorted(p for p in GPU.rglob("h200-*.yaml") if not p.name.endswith(".runtime.yaml"))


def test_there_are_gpu_profiles():
    assert len(PROFILES) >= 3 and len(RUNTIMES) == len(PROFILES)


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: str(p.relative_to(GPU)))
def test_gpu_profile_loads(path):
    prof = load_profile(str(path))
    assert prof.pcie_h2d.bandwidth_gbps > 10 and prof.disk.read_bandwidth_gbps > 0


def test_the_third_call_measured_the_new_terms_on_cuda():
    """The CUDA paths of disk.idle_read_extra and runtime.load_slowdown ran (call3), with sources."""
    prof = load_profile(str(GPU / "call3" / "h200-olmoe-1b-7b-x0.25.yaml"))
    assert prof.disk.idle_read_extra is not None and prof.disk.source.get("idle_read_extra")
    rt = load_runtime(str(GPU / "call3" / "h200-olmoe-1b-7b-x0.25.runtime.yaml"))
    assert rt.load_slowdown > 1.0 and "copy stream" in rt.source["load_slowdown"]


@pytest.mark.parametrize("path", RUNTIMES, ids=lambda p: str(p.relative_to(GPU)))
def test_gpu_runtime_loads_with_sources(path):
    rt = load_runtime(str(path))
    assert rt.layer_host_us > 0 and rt.source.get("layer_host_us")


@pytest.mark.parametrize("name, free", [("gpu-rows", "layer_host_us"),
                                        ("gpu-rows-disk", "hardware.disk.read_bandwidth_gbps")])
def test_gpu_rows_points_load_each_real_run(name, free):
    pf, pts = load_points(GPU / "call3" / f"{name}.points.yaml")
    assert list(pf.free) == [free]
    assert [p.spec.holdout for p in pts] == [False, True, True]
    for p in pts:  # the measurement is the real run's own TPOT, the scenario the one it ran
        assert p.metric == "tpot_ms" and p.measured > 0
        assert p.scenario.batch.size == (8 if "b8" in p.spec.name else 1)
