"""`moesim replay --real` runs every registered predictor, the learned ones (speculation,
pre_attention) included, on a tiny CPU model: every run completes with consistent counts, and the
predictions each predictor makes are the simulator's on the same scaled scenario (both engines show
predictors the same step views, so the same routing gives the same guesses)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from moesim.cli.replay import replay
from moesim.models import ModelSpec
from moesim.predictors import registry
from moesim.traces.synthetic import generate_to_file
from moesim.validate import fixed_profile

from .test_real_replay import TINY, _check_outputs

torch = pytest.importorskip("torch")

REQUESTS = 4


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A trace of the tiny model with pre_attn, and a tiny checkpoint of each learned predictor."""
    from moesim.predictors.neural import train

    d = tmp_path_factory.mktemp("real-predictors")
    params = dict(rho=0.9, tau=0.2, attention_noise=0.0, popularity_skew=0.2, hidden_dim=8, topic_weight=0.0,
                  gate_affinity=0.9)
    trace = generate_to_file(d / "trace.parquet", ModelSpec(**TINY), params, requests=REQUESTS, prompt_len=4,
                             decode_len=6, rng=np.random.default_rng(0), seed=0, pre_attn=True)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train("speculation", trace, preset="tiny", train_overrides={"epochs": 1}, output=d / "s.pt", progress=False)
        train("pre_attention", trace, preset="tiny", train_overrides={"epochs": 5}, output=d / "p.pt", progress=False)
    finally:
        torch.set_num_threads(n)
    # latency_us 0: the simulator would otherwise charge the latency measured at training (on a busy
    # machine, long enough that its prefetches come after their layer and are not counted as predicted)
    return d, trace, {"speculation": {"checkpoint": str(d / "s.pt"), "latency_us": 0},
                      "pre_attention": {"checkpoint": str(d / "p.pt"), "latency_us": 0}}


def _scenario(d: Path, trace: Path, name: str, params: dict) -> Path:
    data = {"name": "tiny-real", "seed": 0, "model": TINY, "hardware": fixed_profile(), "trace": str(trace),
            "cache": {"gpu": {"capacity_experts": 6, "policy": "lru"}, "dram": {"capacity_experts": 8, "policy": "lru"}},
            "predictor": {"name": name, **params}, "batch": {"size": 2}}
    p = d / f"sc-{name}.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_the_learned_predictors_are_registered():
    assert {"pre_attention", "speculation", "oracle", "on_demand"} <= set(registry.names())
    assert registry.get("pre_attention").needs_pre_attn and not registry.get("oracle").needs_pre_attn


@pytest.mark.parametrize("name", registry.names())
def test_replay_real_runs_the_predictor(work, name):
    d, trace, params = work
    sc = _scenario(d, trace, name, params.get(name, {}))
    out = {}
    for mode in ("--real", "--sim"):
        o = d / f"{name}{mode}"
        r = CliRunner().invoke(replay, [mode, str(sc), "-o", str(o), "--quiet", "--device", "cpu", "--threads", "1"],
                               catch_exceptions=False)
        assert r.exit_code == 0, r.output
        out[mode] = _check_outputs(o, REQUESTS)
    real, sim = out["--real"], out["--sim"]
    assert real["mode"] == "real" and real["scenario"]["predictor"]["name"] == name
    # the same guesses from the same views (what was predicted for which layer, and how much of it was needed)
    assert real["prediction"] == sim["prediction"]
    assert real["accesses"] == sim["accesses"]
    if name == "on_demand":  # no prefetches: the same accesses hit and miss alike, and dedup saves as many copies
        assert (real["hits"], real["misses"]) == (sim["hits"], sim["misses"])
        assert real["dedup"] == sim["dedup"] and real["dedup"]["copies_saved"] > 0
    if name in ("pre_attention", "speculation", "oracle", "noisy_oracle"):
        assert real["prefetch"]["issued"] > 0 and real["prediction"]["predicted"] > 0
    if name == "pre_attention":  # the scaled trace keeps the column the predictor reads
        assert "pre_attn" in pq.read_schema(d / f"{name}--real" / "trace.parquet").names


def test_scaled_trace_keeps_pre_attn_of_the_kept_layers(work, tmp_path):
    """--layers cuts pre_attn with the routing: the scaled trace's states are the original's first layers."""
    from moesim.traces import TraceReader

    d, trace, _ = work
    sc = _scenario(tmp_path, trace, "on_demand", {})
    r = CliRunner().invoke(replay, ["--sim", str(sc), "-o", str(tmp_path / "o"), "--quiet", "--layers", "2",
                                    "--requests", "3"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    orig = list(TraceReader(trace).iter_requests(pre_attn=True))[:3]
    cut = list(TraceReader(tmp_path / "o" / "trace.parquet").iter_requests(pre_attn=True))
    assert len(cut) == 3
    for a, b in zip(orig, cut):
        assert np.array_equal(b.experts, a.experts[:, :2]) and np.array_equal(b.pre_attn, a.pre_attn[:, :2])
