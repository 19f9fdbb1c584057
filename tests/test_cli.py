"""End-to-end: the CLI as a user runs it (subprocess for the main paths, CliRunner for the rest)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
from click.testing import CliRunner

from moesim.cli import main

ROOT = Path(__file__).resolve().parents[1]


def moesim(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "moesim.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_quickstart_runs_and_writes_results(tmp_path):
    out = tmp_path / "qs"
    r = moesim("run", "scenarios/quickstart.yaml", "-o", out, "--events")
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["tokens_per_s"] > 0
    assert s["hits"] + s["late_hits"] + s["misses"] == s["accesses"]
    steps = pd.read_parquet(out / "steps.parquet")
    assert len(steps) == s["steps"] * s["scenario"]["model"]["num_layers"]
    ev = pd.read_parquet(out / "events.parquet")
    assert len(ev[ev["resource"] == "pcie"]) == s["transfers_pcie"]
    req = pd.read_parquet(out / "requests.parquet")
    assert len(req) == s["requests"] == 8


def test_same_seed_gives_byte_identical_summary(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        r = CliRunner().invoke(main, ["run", str(ROOT / "scenarios/oracle-ssd.yaml"), "-o", str(d), "--quiet"])
        assert r.exit_code == 0, r.output
    assert (a / "summary.json").read_bytes() == (b / "summary.json").read_bytes()


def test_set_overrides_a_field(tmp_path):
    r = CliRunner().invoke(main, ["run", str(ROOT / "scenarios/quickstart.yaml"), "-o", str(tmp_path), "--quiet",
                                  "--set", "cache.gpu.capacity_gb=null", "--set", "cache.gpu.capacity_experts=64",
                                  "--set", "batch.size=2"])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["scenario"]["cache"]["gpu"]["capacity_experts"] == 64
    assert s["gpu_cache_experts"] == 64 and s["scenario"]["batch"]["size"] == 2


def test_bigger_cache_never_misses_more_with_lru(tmp_path):
    misses = []
    for cap in (16, 64, 256, 1024):
        r = CliRunner().invoke(main, ["run", str(ROOT / "scenarios/quickstart.yaml"), "-o", str(tmp_path / str(cap)),
                                      "--quiet", "--set", "cache.gpu.capacity_gb=null",
                                      "--set", f"cache.gpu.capacity_experts={cap}"])
        assert r.exit_code == 0, r.output
        misses.append(json.loads((tmp_path / str(cap) / "summary.json").read_text())["misses"])
    assert misses == sorted(misses, reverse=True)
    assert misses[-1] <= 1024  # a cache holding all experts loads each at most once


def test_oracle_never_slower_than_on_demand(tmp_path):
    res = {}
    for trace in ("olmoe-sample", "switch-sample"):
        for pred in ("on_demand", "oracle"):
            model = "olmoe-1b-7b" if trace.startswith("olmoe") else "switch-base-128"
            d = tmp_path / f"{trace}-{pred}"
            r = CliRunner().invoke(main, ["run", str(ROOT / "scenarios/quickstart.yaml"), "-o", str(d), "--quiet",
                                          "--set", f"model={model}", "--set", f"trace=../traces/{trace}.parquet",
                                          "--set", f"predictor.name={pred}", "--set", "cache.gpu.capacity_gb=1"])
            assert r.exit_code == 0, r.output
            res[trace, pred] = json.loads((d / "summary.json").read_text())["makespan_s"]
        assert res[trace, "oracle"] <= res[trace, "on_demand"]


def test_info_commands():
    runner = CliRunner()
    for args in (["models"], ["hardware", "list"], ["hardware", "show", "rtx4090-pcie4"], ["schema"],
                 ["trace", "info", str(ROOT / "traces/switch-sample.parquet")]):
        r = runner.invoke(main, args)
        assert r.exit_code == 0, (args, r.output)
    assert "olmoe-1b-7b" in runner.invoke(main, ["models"]).output
    assert '"properties"' in runner.invoke(main, ["schema"]).output


def test_trace_generate_then_run(tmp_path):
    f = tmp_path / "mix.parquet"
    r = moesim("trace", "generate", "--preset", "mixtral-8x7b", "--requests", 3, "--prompt-len", 8,
               "--decode-len", 8, "--seed", 5, "-o", f)
    assert r.returncode == 0, r.stderr
    sc = tmp_path / "s.yaml"
    sc.write_text(f"model: mixtral-8x7b\nhardware: a100-80gb-pcie4\ntrace: {f}\n"
                  "cache: {gpu: {capacity_experts: 64}}\nbatch: {size: 3}\n")
    r = moesim("run", sc, "-o", tmp_path / "out", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out/summary.json").read_text())["requests"] == 3


def test_validate_command_passes():
    r = CliRunner().invoke(main, ["validate"])
    assert r.exit_code == 0, r.output
    assert " 0 failed" in r.output and "NO" not in r.output
