"""Shipped hardware profiles: they load, every number is sourced, units are sane."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from moesim.errors import InputError
from moesim.hardware import list_profiles, load_profile
from moesim.hardware.profile import PROFILE_DIR, Disk, GPU, HostDRAM, Link

REQUIRED = ["a100-80gb-pcie4", "h100-sxm-pcie5", "rtx3090-pcie4", "rtx4090-pcie4",
            "v100-32gb-pcie3", "t4-pcie3"]
SECTIONS = {"gpu": GPU, "pcie_h2d": Link, "disk": Disk, "host_dram": HostDRAM}

# Raw per-direction rate of one lane, GB/s: GT/s x 128/130 encoding / 8 bits.
LANE_GBPS = {3: 8 * 128 / 130 / 8, 4: 16 * 128 / 130 / 8, 5: 32 * 128 / 130 / 8}


def _gen(name: str) -> int:
    return int(re.search(r"pcie(\d)", name).group(1))


def _numeric_fields(model) -> list[str]:
    return [n for n, f in model.model_fields.items()
            if n not in ("source", "name") and f.annotation in (int, float)]


def test_required_profiles_shipped():
    assert set(REQUIRED) <= set(list_profiles())


@pytest.mark.parametrize("name", list_profiles())
def test_profile_loads_and_is_named_after_its_file(name):
    p = load_profile(name)
    assert p.name == name
    assert p.description
    assert p.measured is None  # nobody has measured these machines here
    assert p.gpu.name and p.disk.name


@pytest.mark.parametrize("name", list_profiles())
def test_every_number_sourced(name):
    raw = yaml.safe_load((PROFILE_DIR / f"{name}.yaml").read_text())
    for section, model in SECTIONS.items():
        data = raw[section]
        src = data.get("source", {})
        fields = _numeric_fields(model)
        for field in fields:
            assert field in data, f"{name}.{section}.{field} left to its default"
            assert isinstance(src.get(field), str) and len(src[field]) > 20, \
                f"{name}.{section}.{field} has no real source"
        assert set(src) <= set(fields), f"{name}.{section}.source names unknown fields"


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_missing_source_is_rejected(tmp_path):
    data = yaml.safe_load((PROFILE_DIR / "a100-80gb-pcie4.yaml").read_text())
    del data["pcie_h2d"]["source"]["bandwidth_gbps"]
    with pytest.raises(InputError, match="bandwidth_gbps"):
        load_profile(str(_write(tmp_path, data)))


def test_defaulted_number_still_needs_source(tmp_path):
    data = yaml.safe_load((PROFILE_DIR / "a100-80gb-pcie4.yaml").read_text())
    del data["disk"]["queue_depth"]           # falls back to the default 1 ...
    del data["disk"]["source"]["queue_depth"]  # ... which is still a number without a source
    with pytest.raises(InputError, match="queue_depth"):
        load_profile(str(_write(tmp_path, data)))


def test_copy_of_shipped_profile_loads(tmp_path):
    data = yaml.safe_load((PROFILE_DIR / "t4-pcie3.yaml").read_text())
    assert load_profile(str(_write(tmp_path, data))).gpu.peak_bf16_tflops == 65


@pytest.mark.parametrize("name", list_profiles())
def test_unit_sanity(name):
    p = load_profile(name)
    gen = _gen(name)
    x16, x4 = 16 * LANE_GBPS[gen], 4 * LANE_GBPS[gen]   # 15.75 / 31.5 / 63.0 and 3.94 / 7.88 / 15.75
    # sustained pinned H2D: below the link's raw rate, but not implausibly far below (not Gbit/s)
    assert 0.6 * x16 < p.pcie_h2d.bandwidth_gbps < x16
    # moesim gives every copy slot the full bandwidth: slots must not add up past the link
    assert p.pcie_h2d.copy_engines * p.pcie_h2d.bandwidth_gbps < x16
    # an x4 NVMe drive of the same PCIe generation, again without slots multiplying bandwidth
    assert 0.3 * x4 < p.disk.read_bandwidth_gbps < x4
    assert p.disk.queue_depth * p.disk.read_bandwidth_gbps < x4
    # GPU: bytes (GB), GB/s, TFLOP/s and microseconds, in plausible ranges
    assert 8 < p.gpu.memory_gb < 200
    assert 200 < p.gpu.hbm_bandwidth_gbps < 5000
    assert 10 < p.gpu.peak_bf16_tflops < 2000
    assert 1 <= p.gpu.kernel_launch_us <= 50
    assert 1 <= p.pcie_h2d.latency_us <= 50
    assert 10 <= p.disk.latency_us <= 500
    assert 8 < p.host_dram.capacity_gb < 10_000
    # the link is the bottleneck of the hierarchy: HBM >> PCIe > disk
    assert p.gpu.hbm_bandwidth_gbps > 10 * p.pcie_h2d.bandwidth_gbps > 10 * p.disk.read_bandwidth_gbps


def test_pcie_generation_raw_rates():
    assert round(16 * LANE_GBPS[3], 2) == 15.75
    assert round(16 * LANE_GBPS[4], 1) == 31.5
    assert round(16 * LANE_GBPS[5], 1) == 63.0


def test_gpu_memory_is_binary_capacity_in_decimal_gb():
    # "80GB" HBM is 80 GiB = 85.9e9 bytes; *_gb fields are 1e9 bytes
    assert load_profile("a100-80gb-pcie4").gpu.memory_gb == pytest.approx(80 * 2**30 / 1e9, abs=0.05)
    assert load_profile("rtx4090-pcie4").gpu.memory_gb == pytest.approx(24 * 2**30 / 1e9, abs=0.05)


def test_newer_gpus_are_faster():
    p = {n: load_profile(n) for n in REQUIRED}
    assert p["h100-sxm-pcie5"].gpu.peak_bf16_tflops > p["a100-80gb-pcie4"].gpu.peak_bf16_tflops \
        > p["v100-32gb-pcie3"].gpu.peak_bf16_tflops > p["t4-pcie3"].gpu.peak_bf16_tflops
    assert p["rtx4090-pcie4"].gpu.peak_bf16_tflops > p["rtx3090-pcie4"].gpu.peak_bf16_tflops


def test_mixtral_expert_transfer_time_on_a100():
    # 352,321,536 B over 25 GB/s + 7 us = 14.1 ms (DESIGN.md: latency + bytes / bandwidth)
    from moesim.hardware.costs import transfer_s
    from moesim.models import get_preset
    link = load_profile("a100-80gb-pcie4").pcie_h2d
    t = transfer_s(get_preset("mixtral-8x7b").expert_bytes, link.bandwidth_gbps, link.latency_us)
    assert t == pytest.approx(352_321_536 / 25e9 + 7e-6)
    assert 0.014 < t < 0.0142
