"""The batch scheduler inside the engine: per-request accounting, dedup metrics, open-loop
arrivals (Little's law), continuous vs static batching, arrivals from the trace, determinism."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moesim import simulate
from moesim.config import load_scenario
from moesim.errors import InputError
from moesim.results import dump_json
from moesim.traces.io import write_trace
from moesim.traces.schema import TraceMeta
from tests.helpers import TINY_MODEL, scenario, write_routing

ROOT = Path(__file__).resolve().parents[1]
L = TINY_MODEL["num_layers"]
EB = 3 * 256 * 512 * 2


def write_requests(path: Path, lengths, E=16, K=1, seed=0, arrival_s=None) -> Path:
    """A trace of requests with their own (prompt, decode) lengths and random distinct experts;
    with `arrival_s` (one per request) an arrival_s column is added."""
    rng = np.random.default_rng(seed)
    cols = {"request_id": [], "token": [], "phase": [], "layer": [], "experts": []}
    for rid, (p, d) in enumerate(lengths):
        T = p + d
        cols["request_id"] += [rid] * (T * L)
        cols["token"] += np.repeat(np.arange(T), L).tolist()
        cols["phase"] += ["prefill"] * (p * L) + ["decode"] * (d * L)
        cols["layer"] += list(range(L)) * T
        cols["experts"] += [rng.permutation(E)[:K].astype(np.int16) for _ in range(T * L)]
    table = pa.table({"request_id": pa.array(cols["request_id"], pa.int32()),
                      "token": pa.array(cols["token"], pa.int32()),
                      "phase": pa.array(cols["phase"]).dictionary_encode(),
                      "layer": pa.array(cols["layer"], pa.int16()),
                      "experts": pa.array(cols["experts"], pa.list_(pa.int16()))})
    meta = TraceMeta(model="tiny", num_layers=L, num_experts=E, top_k=K, source="hand-made", seed=seed)
    write_trace(path, table, meta)
    if arrival_s is not None:  # not (yet) in the trace schema: add the column by hand
        t = pq.read_table(path)
        per_row = np.repeat(np.asarray(arrival_s, dtype=np.float64), [(p + d) * L for p, d in lengths])
        t = t.append_column("arrival_s", pa.array(per_row, pa.float64()))
        pq.write_table(t, path, row_group_size=1000)
    return path


def run(trace, E=16, K=1, cap=None, batch=None, **kw):
    model = {**TINY_MODEL, "num_experts": E, "top_k": K}
    return simulate(scenario(trace, model=model, gpu={"capacity_experts": cap or E * L}, batch=batch, **kw))


def lengths_mix(rng, n, prompt=(2, 8), decode=(1, 12)):
    return [(int(rng.integers(*prompt, endpoint=True)), int(rng.integers(*decode, endpoint=True))) for _ in range(n)]


BATCHES = [
    {"size": 3},
    {"size": 3, "scheduler": "continuous"},
    {"size": 3, "scheduler": "continuous", "arrivals": "poisson", "rate_per_s": 300.0,
     "max_tokens_per_step": 6, "chunked_prefill": True},
    {"size": 2, "arrivals": "poisson", "rate_per_s": 300.0, "max_wait_ms": 2.0},
    {"size": 4, "scheduler": "continuous", "arrivals": "poisson", "rate_per_s": 300.0,
     "admission": "expert_affinity", "affinity_window": 3},
]


@pytest.mark.parametrize("batch", BATCHES)
def test_every_request_once_with_its_tokens(tmp_path, batch):
    lengths = lengths_mix(np.random.default_rng(0), 12)
    trace = write_requests(tmp_path / "t.parquet", lengths, K=2)
    res = run(trace, K=2, cap=8, batch=batch)
    s, req, st = res.summary, res.requests, res.steps
    assert req["request_id"].tolist() == list(range(len(lengths)))
    assert req["prompt_tokens"].tolist() == [p for p, _ in lengths]
    assert req["output_tokens"].tolist() == [d + 1 for _, d in lengths]
    assert s["output_tokens"] == sum(d + 1 for _, d in lengths)
    assert s["processed_tokens"] == sum(p + d for p, d in lengths)
    assert s["requests"] == len(lengths)
    # times are ordered per request; the engine never starts a request before it arrives
    assert (req["start_s"] >= req["arrival_s"] - 1e-12).all()
    assert (req["first_token_s"] > req["start_s"]).all() and (req["finish_s"] >= req["first_token_s"]).all()
    assert (req["queue_ms"] >= -1e-9).all()
    steps = st.groupby("step").agg(seqs=("seqs", "first"), tokens=("tokens", "first"))
    assert steps["seqs"].max() <= batch.get("max_batch_size", batch["size"])
    if batch.get("chunked_prefill"):
        assert steps["tokens"].max() <= batch["max_tokens_per_step"]
    # unique experts <= min(requested, num_experts), per step and layer
    assert (st["unique_experts"] <= np.minimum(st["tokens"] * 2, 16)).all()
    assert s["hits"] + s["late_hits"] + s["misses"] == s["accesses"]


def test_batch_one_with_distinct_topk_experts_has_no_dedup(tmp_path):
    """One token per step (prompt of 1, batch 1), top-2 distinct experts: nothing to share."""
    trace = write_requests(tmp_path / "t.parquet", [(1, 6)] * 3, K=2)
    s = run(trace, K=2, batch={"size": 1}).summary
    assert s["dedup_ratio"] == 0.0 and s["dedup"]["copies_saved"] == 0 == s["dedup"]["bytes_saved"]
    assert s["dedup"]["loads_requested"] == s["dedup"]["loads_performed"]
    # with longer prompts the prefill shares experts, decode steps still do not
    trace = write_requests(tmp_path / "u.parquet", [(5, 6)] * 3, K=2)
    res = run(trace, K=2, batch={"size": 1, "scheduler": "continuous"})
    dec = res.steps[res.steps["phase"] == "decode"]
    assert (dec["unique_experts"] == 2).all()
    assert res.summary["dedup"]["unique_experts_by_batch_size"] == {"1": 2.0}


def test_dedup_metrics_when_every_access_misses(tmp_path):
    """Cache of one expert: every access is a copy, so dedup saves exactly the pairs it merged."""
    trace = write_requests(tmp_path / "t.parquet", [(3, 4)] * 4, E=4, K=2)
    s = run(trace, E=4, K=2, cap=2, batch={"size": 4}).summary
    assert s["hits"] == 0
    d = s["dedup"]
    assert d["loads_requested"] == s["token_expert_pairs"] and d["loads_performed"] == s["accesses"]
    assert d["copies_saved"] == d["loads_requested"] - d["loads_performed"] > 0
    assert d["bytes_saved"] == d["copies_saved"] * EB
    assert d["ratio"] == s["dedup_ratio"]
    off = run(trace, E=4, K=2, cap=2, batch={"size": 4, "dedup": False}).summary
    assert off["dedup_ratio"] == 0.0 and off["dedup"]["copies_saved"] == 0
    # the copies dedup saved are the copies the per-token engine made on top
    assert off["transfers_pcie"] - s["transfers_pcie"] == d["copies_saved"]


def test_littles_law_open_loop(tmp_path):
    """Open-loop Poisson arrivals into continuous batching: the time-average number of requests
    in the system equals arrival rate × mean time in system, within sampling error."""
    rng = np.random.default_rng(5)
    n, rate = 400, 80.0  # utilisation ≈ 0.7
    trace = write_requests(tmp_path / "t.parquet", lengths_mix(rng, n, prompt=(2, 6), decode=(2, 10)))
    res = run(trace, batch={"size": 8, "scheduler": "continuous", "arrivals": "poisson", "rate_per_s": rate},
              seed=3)
    req, s = res.requests, res.summary
    T = s["makespan_s"]
    # N(t) by sweeping arrivals (+1) and departures (-1)
    ev = np.concatenate([np.c_[req["arrival_s"], np.ones(n)], np.c_[req["finish_s"], -np.ones(n)]])
    ev = ev[np.lexsort((ev[:, 1], ev[:, 0]))]
    N = np.cumsum(ev[:, 1])
    area = float(np.sum(N[:-1] * np.diff(ev[:, 0])))
    L_bar = area / T
    W = (req["finish_s"] - req["arrival_s"]).mean()
    assert L_bar == pytest.approx(n / T * W, rel=1e-9)  # the identity over the run's own horizon
    assert 1 < L_bar < 4  # a stable, non-trivial load (L ≈ 1.8)
    # against the nominal rate: the arrival count over [0, T] varies by ~1/sqrt(n)
    assert L_bar == pytest.approx(rate * W, rel=3 / np.sqrt(n) + W / T)
    assert s["requests_per_s"] == pytest.approx(rate, rel=3 / np.sqrt(n) + W / T)
    assert s["idle_s"] > 0  # the engine waited for arrivals


RATES = [2.0, 8.0, 32.0, 1000.0]


@pytest.mark.parametrize("size", [2, 4])
def test_continuous_never_worse_in_mean_ttft_than_static(size):
    """Equal Poisson load, same seed, the switch sample trace (top-1, 128 experts). Not a law of
    offloaded MoE: when a prompt's prefill touches most experts (top-8 OLMoE) and the load is
    sustained, every continuous admission sweeps the expert cache and static batching can win."""
    sc = ROOT / "scenarios" / "quickstart.yaml"
    for rate in RATES:
        ttft = {}
        for sched in ("static", "continuous"):
            s = simulate(load_scenario(sc, [
                "model=switch-base-128", "trace=../traces/switch-sample.parquet",
                "cache.gpu.capacity_gb=0.5", f"batch.size={size}", f"batch.scheduler={sched}",
                "batch.arrivals=poisson", f"batch.rate_per_s={rate}"])).summary
            assert s["requests"] == 8
            ttft[sched] = s["ttft_ms"]["mean"]
        assert ttft["continuous"] <= ttft["static"] * (1 + 1e-9), (rate, ttft)


def test_same_seed_same_results_and_seed_moves_arrivals(tmp_path):
    trace = write_requests(tmp_path / "t.parquet", lengths_mix(np.random.default_rng(1), 20), K=2)
    batch = {"size": 3, "scheduler": "continuous", "arrivals": "poisson", "rate_per_s": 200.0,
             "admission": "expert_affinity", "slo": {"ttft_ms": 5.0, "tpot_ms": 2.0}}
    kw = {"K": 2, "cap": 8, "batch": batch, "predictor": {"name": "oracle", "lookahead_layers": 3}}
    a, b = run(trace, seed=4, **kw), run(trace, seed=4, **kw)
    assert dump_json(a.summary) == dump_json(b.summary)
    assert a.requests.equals(b.requests) and a.steps.equals(b.steps)
    c = run(trace, seed=5, **kw)
    assert not np.allclose(a.requests["arrival_s"], c.requests["arrival_s"])


def test_slo_attainment_and_percentiles(tmp_path):
    trace = write_requests(tmp_path / "t.parquet", lengths_mix(np.random.default_rng(2), 16))
    res = run(trace, batch={"size": 2, "scheduler": "continuous", "arrivals": "poisson", "rate_per_s": 60.0,
                            "slo": {"ttft_ms": 12.0, "tpot_ms": 2.5}})
    req, s = res.requests, res.summary
    ok_t = req["ttft_ms"] <= 12.0
    ok_p = req["tpot_ms"].isna() | (req["tpot_ms"] <= 2.5)
    assert s["slo"]["ttft_attainment"] == pytest.approx(ok_t.mean())
    assert s["slo"]["tpot_attainment"] == pytest.approx(ok_p.mean())
    assert s["slo"]["attainment"] == pytest.approx((ok_t & ok_p).mean())
    assert 0 < s["slo"]["attainment"] < 1
    assert s["slo"]["goodput_requests_per_s"] == pytest.approx((ok_t & ok_p).sum() / s["makespan_s"])
    assert s["queue_ms"]["p99"] == pytest.approx(np.percentile(req["queue_ms"], 99))
    assert s["ttft_ms"]["p50"] == pytest.approx(np.percentile(req["ttft_ms"], 50))
    assert s["e2e_ms"]["mean"] == pytest.approx(req["e2e_ms"].mean())
    assert run(trace, batch={"size": 2}).summary["slo"] is None


def test_arrivals_from_the_trace(tmp_path):
    lengths = [(2, 3)] * 4
    arr = [0.0, 0.0, 0.5, 0.51]
    trace = write_requests(tmp_path / "t.parquet", lengths, arrival_s=arr)
    res = run(trace, batch={"size": 2, "scheduler": "continuous", "arrivals": "trace"})
    req = res.requests
    assert req["arrival_s"].tolist() == arr
    assert req["start_s"].iloc[2] == pytest.approx(0.5) and req["queue_ms"].iloc[2] == pytest.approx(0.0)
    assert res.summary["idle_s"] > 0.4
    # a closed run of the same trace ignores the column
    assert run(trace, batch={"size": 2}).requests["queue_ms"].eq(0).all()


def test_trace_arrival_errors(tmp_path):
    plain = write_requests(tmp_path / "p.parquet", [(2, 2)] * 2)
    with pytest.raises(InputError, match="no arrival_s column"):
        run(plain, batch={"arrivals": "trace"})
    back = write_requests(tmp_path / "b.parquet", [(2, 2)] * 3, arrival_s=[0.0, 1.0, 0.5])
    with pytest.raises(InputError, match="must not decrease"):
        run(back, batch={"arrivals": "trace"})
    neg = write_requests(tmp_path / "n.parquet", [(2, 2)] * 2, arrival_s=[0.0, -1.0])
    with pytest.raises(InputError, match="finite time >= 0"):
        run(neg, batch={"arrivals": "trace"})
    with pytest.raises(InputError, match="belady"):
        simulate(scenario(plain, gpu={"capacity_experts": 2, "policy": "belady"},
                          batch={"arrivals": "poisson", "rate_per_s": 10.0}))


@pytest.mark.parametrize("batch, needle", [
    ({"arrivals": "poisson"}, "needs rate_per_s"),
    ({"rate_per_s": 3}, "only used with arrivals: poisson"),
    ({"scheduler": "continuous", "chunked_prefill": True}, "needs max_tokens_per_step"),
    ({"scheduler": "continuous", "size": 8, "max_tokens_per_step": 4}, "below the batch size"),
    ({"scheduler": "fifo"}, "batch.scheduler"),
    ({"arrivals": "poisson", "rate_per_s": -1}, "rate_per_s"),
    ({"slo": {"ttft_ms": 0}}, "ttft_ms"),
])
def test_bad_batch_config(tmp_path, batch, needle):
    trace = write_routing(tmp_path / "t.parquet", np.zeros((1, 2, L, 1), dtype=np.int16), 1, 16)
    with pytest.raises(InputError) as e:
        scenario(trace, batch=batch)
    assert needle in str(e.value)


def test_belady_with_continuous_closed_batching_beats_lru(tmp_path):
    """Closed arrivals keep the step sequence time-independent, so Belady gets its future."""
    trace = write_requests(tmp_path / "t.parquet", lengths_mix(np.random.default_rng(3), 10), K=2)
    batch = {"size": 3, "scheduler": "continuous", "max_tokens_per_step": 5, "chunked_prefill": True}
    misses = {}
    for policy in ("lru", "belady"):
        model = {**TINY_MODEL, "top_k": 2}
        misses[policy] = simulate(scenario(trace, model=model, gpu={"capacity_experts": 6, "policy": policy},
                                           batch=batch)).summary["misses"]
    assert misses["belady"] <= misses["lru"]
