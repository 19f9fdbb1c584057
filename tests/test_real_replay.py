"""`moesim replay --real` on CPU: a tiny scenario executed with real tensors and real disk reads
writes the simulator's output files with consistent counts; on-demand hits/misses equal the
simulation's (same policy, same access stream)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from moesim.cli.replay import compare, replay
from moesim.validate import fixed_profile, write_routing

TINY = {"name": "tiny-real", "num_layers": 3, "num_experts": 16, "top_k": 2, "hidden_size": 256,
            "expert_intermediate_size": 512, "gated": True, "bytes_per_param": 2.0,
            "num_heads": 4, "num_kv_heads": 2, "head_dim": 64, "vocab_size": 1000}


def _scenario(tmp: Path, *, predictor="on_demand", gpu=6, dram=8, batch=2, requests=4, prompt=4, decode=6,
              policy="lru", partition="global", extra=None) -> Path:
    rng = np.random.default_rng(0)
    L, E, K = TINY["num_layers"], TINY["num_experts"], TINY["top_k"]
    routing = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)])
                        for _ in range(requests * (prompt + decode))]).reshape(requests, prompt + decode, L, K)
    trace = write_routing(tmp / "trace.parquet", routing.astype(np.int16), prompt, E, model="tiny-real")
    cache = {"gpu": {"capacity_experts": gpu, "policy": policy, "partition": partition}}
    if dram is not None:
        cache["dram"] = {"capacity_experts": dram, "policy": "lru"}
    data = {"name": "tiny-real", "seed": 0, "model": TINY, "hardware": fixed_profile(),
            "trace": str(trace), "cache": cache, "predictor": {"name": predictor, **(extra or {})},
            "batch": {"size": batch}}
    p = tmp / f"sc-{predictor}-{gpu}-{dram}-{batch}-{partition}.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _run(args):
    r = CliRunner().invoke(replay, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


def _check_outputs(d: Path, requests: int) -> dict:
    s = json.loads((d / "summary.json").read_text())
    steps = pd.read_parquet(d / "steps.parquet")
    req = pd.read_parquet(d / "requests.parquet")
    L = s["scenario"]["model"]["num_layers"]
    assert len(steps) == s["steps"] * L
    assert s["hits"] + s["late_hits"] + s["misses"] == s["accesses"]
    assert s["accesses"] == int(steps["unique_experts"].sum())
    assert int(steps["hits"].sum()) == s["hits"] and int(steps["misses"].sum()) == s["misses"]
    assert len(req) == s["requests"] == requests                     # every request completes
    assert (req["finish_s"] >= req["first_token_s"]).all() and (req["first_token_s"] > req["start_s"]).all()
    assert s["makespan_s"] > 0 and s["tokens_per_s"] > 0
    assert (steps["end_s"] >= steps["gate_s"]).all() and (steps["gate_s"] >= steps["start_s"]).all()
    assert steps["start_s"].is_monotonic_increasing
    eb = s["expert_bytes"]
    assert s["bytes_pcie"] == s["transfers_pcie"] * eb and s["bytes_disk"] == s["transfers_disk"] * eb
    return s


def test_real_on_demand_matches_simulation_counts(tmp_path):
    pytest.importorskip("torch")
    sc = _scenario(tmp_path)
    real, sim = tmp_path / "real", tmp_path / "sim"
    _run(["--real", sc, "-o", real, "--quiet", "--events", "--device", "cpu"])
    _run([sc, "-o", sim, "--quiet"])
    s = _check_outputs(real, 4)
    t = _check_outputs(sim, 4)
    assert s["mode"] == "real" and t["mode"] == "simulated"
    for k in ("accesses", "hits", "late_hits", "misses", "bypass_loads", "transfers_pcie", "transfers_disk",
              "dram_hit_rate", "evictions"):
        assert s[k] == t[k], k
    real_info = s["real"]
    assert real_info["device"]["device"] == "cpu"
    assert "RAM" in real_info["roles"]["gpu"]
    assert real_info["io"]["method"] in ("odirect", "fadvise")
    frac = real_info["io"]["page_cache_after_run"]
    assert frac is None or frac < 0.05  # the reads bypassed the page cache
    ev = pd.read_parquet(real / "events.parquet")
    assert len(ev[ev["resource"] == "disk"]) == s["transfers_disk"]
    assert (ev["end_s"] >= ev["start_s"]).all()
    # the written scaled scenario is runnable by `moesim run` and the trace is beside it
    assert (real / "scenario.yaml").is_file() and (real / "trace.parquet").is_file()
    # a real run compared with itself: zero error
    r = CliRunner().invoke(compare, [str(real), str(real), "-o", str(tmp_path / "cmp"), "--quiet"])
    assert r.exit_code == 0, r.output
    c = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert c["per_step"]["all"]["max_abs_error"] == 0


def test_real_oracle_bypass_and_all_in_host(tmp_path):
    """Prefetching (oracle), a cache smaller than a step's experts (bypass copies) and no dram tier
    (every expert in host memory): every run completes with consistent counts."""
    pytest.importorskip("torch")
    sc = _scenario(tmp_path, predictor="oracle", extra={"lookahead_layers": 2})
    _run(["--real", sc, "-o", tmp_path / "oracle", "--quiet"])
    s = _check_outputs(tmp_path / "oracle", 4)
    assert s["prefetch"]["issued"] > 0
    sc = _scenario(tmp_path, gpu=2, dram=None, batch=4)  # 4 requests x top-2: up to 8 experts per layer
    _run(["--real", sc, "-o", tmp_path / "tiny-cache", "--quiet"])
    s = _check_outputs(tmp_path / "tiny-cache", 4)
    _run([sc, "-o", tmp_path / "tiny-cache-sim", "--quiet"])
    t = json.loads((tmp_path / "tiny-cache-sim" / "summary.json").read_text())
    assert s["bypass_loads"] == t["bypass_loads"] > 0 and s["misses"] == t["misses"]
    assert s["transfers_disk"] == 0  # no dram tier: nothing is read from the disk during the run
    sc = _scenario(tmp_path, gpu=3, dram=12, policy="belady", partition="per_layer")
    _run(["--real", sc, "-o", tmp_path / "belady", "--quiet"])
    _run([sc, "-o", tmp_path / "belady-sim", "--quiet"])
    s = _check_outputs(tmp_path / "belady", 4)
    t = json.loads((tmp_path / "belady-sim" / "summary.json").read_text())
    assert (s["hits"], s["misses"], s["evictions"]) == (t["hits"], t["misses"], t["evictions"])


def test_scale_flags_cut_layers_requests_and_capacity(tmp_path):
    pytest.importorskip("torch")
    sc = _scenario(tmp_path, gpu=6, dram=9)
    out = tmp_path / "scaled"
    _run(["--real", sc, "-o", out, "--quiet", "--scale", "0.5", "--requests", "2"])
    s = _check_outputs(out, 2)
    m = s["scenario"]["model"]
    assert m["name"] == "tiny-real@0.5" and m["num_layers"] == 2 and m["expert_intermediate_size"] == 256
    assert s["gpu_cache_experts"] == 4  # 6 experts of 3 layers -> same fraction of 2 layers
    written = yaml.safe_load((out / "scenario.yaml").read_text())
    assert written["cache"]["dram"]["capacity_experts"] == 6


def test_moesim_imports_without_torch():
    code = ("import sys, moesim, moesim.real, moesim.compare, moesim.cli.profile, moesim.cli.replay, moesim.real.profiler, "
            "moesim.real.scale; assert 'torch' not in sys.modules, 'torch imported eagerly'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr


def test_replay_keeps_the_scenarios_runtime(tmp_path):
    """`--set runtime=...` reaches the scaled scenario: its simulation charges the host costs."""
    sc = _scenario(tmp_path)
    rt = {"layer_host_us": 5000.0, "source": {"layer_host_us": "test fixture"}}
    rt_path = tmp_path / "rt.yaml"
    rt_path.write_text(yaml.safe_dump(rt))
    _run([sc, "-o", tmp_path / "none", "--quiet"])
    _run([sc, "-o", tmp_path / "rt", "--quiet", "--set", f"runtime={rt_path}"])
    written = yaml.safe_load((tmp_path / "rt" / "scenario.yaml").read_text())
    assert written["runtime"]["layer_host_us"] == 5000.0
    a = json.loads((tmp_path / "none" / "summary.json").read_text())
    b = json.loads((tmp_path / "rt" / "summary.json").read_text())
    assert "runtime" not in yaml.safe_load((tmp_path / "none" / "scenario.yaml").read_text())
    assert b["host"]["busy_s"] >= a["steps"] * TINY["num_layers"] * 5e-3 * 0.999
    assert b["makespan_s"] > a["makespan_s"]  # host work partly hides behind the loads, never speeds up
