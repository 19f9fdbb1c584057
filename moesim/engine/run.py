"""simulate(scenario) -> Result: open the trace, build the scheduler, run the engine, summarise."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from ..cache.replay import NextUse
from ..config import Scenario
from ..errors import InputError
from ..hardware.costs import CostModel
from ..predictors import registry
from .scheduler import ArrivalSource, Scheduler, collect_keys
from .sim import EngineConfig, Simulation


@dataclass
class Result:
    """What a run produced: the summary dict and the tables behind it."""

    summary: dict
    steps: pd.DataFrame
    requests: pd.DataFrame
    events: pd.DataFrame | None = None


def engine_config(sc: Scenario, record_events: bool = False) -> EngineConfig:
    m = sc.model
    g, d = sc.cache.gpu, sc.cache.dram
    return EngineConfig(
        gpu_capacity=g.experts(m.expert_bytes), gpu_policy=g.policy, gpu_partition=g.partition,
        dram_capacity=d.experts(m.expert_bytes) if d else None,
        dram_policy=d.policy if d else "lru", dram_partition=d.partition if d else "global",
        has_dram=d is not None, dedup=sc.batch.dedup, record_events=record_events)


def open_trace(sc: Scenario, workdir: Path):
    """A TraceReader for the scenario's trace, generating a synthetic one first if asked."""
    from ..traces import TraceReader, check_against_model
    from ..traces.synthetic import generate_to_file

    if sc.trace.synthetic is not None:
        syn = sc.trace.synthetic
        path = workdir / "synthetic-trace.parquet"
        params, label = None, syn.preset or sc.model.name
        if syn.params_file is not None:
            from ..traces.synthetic import load_preset_file

            pf = sc.resolve(syn.params_file)
            params, doc = load_preset_file(pf)
            for k in ("num_layers", "num_experts", "top_k"):
                if doc.get(k) not in (None, getattr(sc.model, k)):
                    raise InputError(f"fitted to {k}={doc[k]}, the model has {getattr(sc.model, k)}",
                                     file=str(pf), field=k)
            label = f"fitted:{pf.name}"
        generate_to_file(path, sc.model, params, preset=label, requests=syn.requests,
                         prompt_len=syn.prompt_len, decode_len=syn.decode_len,
                         rng=np.random.default_rng(sc.seed), seed=sc.seed, pre_attn=syn.pre_attn,
                         model_seed=syn.model_seed)
    else:
        path = sc.resolve(sc.trace.path)
        if not path.is_file():
            raise InputError("trace file not found", file=str(path), field="trace.path")
    reader = TraceReader(path)
    check_against_model(reader.meta, sc.model, str(path))
    return reader


def arrival_rng(seed: int) -> np.random.Generator:
    """The generator of Poisson arrival times: seeded from the scenario seed, a stream of its own
    (independent of the predictor's and the synthetic trace's)."""
    return np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])


def read_arrivals(path: Path) -> dict[int, float]:
    """request id -> arrival time (s) from the trace's optional `arrival_s` column (one value per
    request, repeated on each of its rows), read a row group at a time."""
    import pyarrow.parquet as pq

    file = str(path)
    pf = pq.ParquetFile(path)
    if "arrival_s" not in pf.schema_arrow.names:
        raise InputError("batch.arrivals is 'trace' but the trace has no arrival_s column", file=file,
                         field="arrival_s")
    out: dict[int, float] = {}
    prev_rid, prev_a, base = None, None, 0
    for g in range(pf.metadata.num_row_groups):
        t = pf.read_row_group(g, columns=["request_id", "arrival_s"])
        col = t.column("arrival_s")
        if col.null_count:
            bad = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise InputError(f"row {base + bad}: null value", file=file, field="arrival_s")
        rid = t.column("request_id").to_numpy().astype(np.int64)
        a = col.to_numpy().astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(a) | (a < 0))
        if bad.size:
            raise InputError(f"row {base + bad[0]}: expected a finite time >= 0 s, found {a[bad[0]]}",
                             file=file, field="arrival_s")
        if prev_rid is not None:
            rid, a = np.concatenate([[prev_rid], rid]), np.concatenate([[prev_a], a])
        same = rid[1:] == rid[:-1]
        bad = np.flatnonzero(same & (a[1:] != a[:-1]))
        if bad.size:
            i = bad[0] + 1
            raise InputError(f"row {base + i - (prev_rid is not None)}: request {rid[i]} has two arrival times "
                             f"({a[i - 1]} and {a[i]}): expected one per request", file=file, field="arrival_s")
        first = np.flatnonzero(np.concatenate([[True], ~same]))
        for r, x in zip(rid[first].tolist(), a[first].tolist()):
            out.setdefault(r, x)
        prev_rid, prev_a = int(rid[-1]), float(a[-1])
        base += t.num_rows
    return out


def make_scheduler(sc: Scenario, requests, trace_path: Path | None = None) -> Scheduler:
    """The scenario's scheduler over a stream of RequestTraces."""
    b = sc.batch
    arrival_s = None
    if b.arrivals == "trace":
        if trace_path is None:
            raise InputError("batch.arrivals is 'trace' but the trace is synthetic (no arrival_s column)",
                             field="batch.arrivals")
        arrival_s = read_arrivals(trace_path)
    source = ArrivalSource(requests, b.arrivals, b.rate_per_s,
                           arrival_rng(sc.seed) if b.arrivals == "poisson" else None, arrival_s,
                           str(trace_path) if trace_path else None)
    return Scheduler(source, kind=b.scheduler, size=b.batch_limit, max_tokens_per_step=b.max_tokens_per_step,
                     chunked_prefill=b.chunked_prefill, admission=b.admission, affinity_window=b.affinity_window,
                     max_wait_s=b.max_wait_ms * 1e-3, num_experts=sc.model.num_experts,
                     num_layers=sc.model.num_layers, dedup=b.dedup)


def _access_stream(reader, sc: Scenario) -> np.ndarray:
    """Every cache key the engine will access, in order (a first pass, for Belady's next use).
    Only closed arrivals have a step sequence that does not depend on simulated time."""
    if sc.batch.arrivals != "closed":
        tier = "gpu" if sc.cache.gpu.policy == "belady" else "dram"
        raise InputError("the belady policy needs the future access stream, which with open-loop arrivals "
                         "depends on simulated time: use batch.arrivals: closed", field=f"cache.{tier}.policy")
    parts = list(collect_keys(make_scheduler(sc, reader.iter_requests(), reader.path)))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def simulate(sc: Scenario, record_events: bool = False) -> Result:
    """Run one scenario. Deterministic: the same scenario and seed give the same Result."""
    with tempfile.TemporaryDirectory(prefix="moesim-") as tmp:
        reader = open_trace(sc, Path(tmp))
        cfg = engine_config(sc, record_events)
        next_use = None
        if "belady" in (cfg.gpu_policy, cfg.dram_policy if cfg.has_dram else ""):
            next_use = NextUse(_access_stream(reader, sc)).next_after
        rng = np.random.default_rng(sc.seed)
        predictor = registry.create(sc.predictor.name, sc.predictor.params, sc.model, rng)
        cost = CostModel(sc.model, sc.hardware, sc.runtime)
        lengths: dict[int, tuple[int, int]] = {}

        want_pre = bool(getattr(type(predictor), "needs_pre_attn", False))

        def requests():
            for r in reader.iter_requests(pre_attn=want_pre):
                lengths[r.request_id] = (r.prompt_len, r.decode_len)
                yield r

        sched = make_scheduler(sc, requests(), reader.path)
        sim = Simulation(sc.model, cost, cfg, predictor, sched, next_use)
        sim.rec.lengths = lengths
        rec = sim.run()
        summary = {"moesim_version": __version__, "scenario": scenario_echo(sc),
                   **rec.summary(slo=sc.batch.slo),
                   "scheduler": {"max_running": sched.max_running, "max_queue": sched.max_queue},
                   "timing_source": {k: ("measured" if v else "roofline") for k, v in cost.uses_measured.items()},
                   "expert_bytes": sc.model.expert_bytes,
                   "gpu_cache_experts": cfg.gpu_capacity}
        if sc.runtime is not None:  # only with a runtime: `none` keeps the summary as it was
            summary["host"] = sim.host.summary() if sim.host is not None else None
        return Result(summary, rec.steps_frame(), rec.requests_frame(), rec.events_frame())


def scenario_echo(sc: Scenario) -> dict:
    d = sc.model_dump(mode="json", exclude={"base_dir"})
    if sc.runtime is None:  # the pure-hardware model echoes as it did before runtimes existed
        d.pop("runtime")
    if sc.model.precision is None:
        d["model"].pop("precision")
    return d
