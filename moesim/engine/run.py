"""simulate(scenario) -> Result: open the trace, build the scheduler, run the engine, summarise."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace
import weakref
from pathlib import Path

import numpy as np
import pandas as pd

from ..version import __version__
from ..cache.replay import NextUse, replay
from ..config import Scenario
from ..errors import InputError
from ..hardware.costs import CostModel
from ..predictors import registry
from ..threads import one_blas_thread
from .scheduler import ArrivalSource, Scheduler, collect_keys
from .fast import ENGINES, fast_path, prefetches, unsupported
from .sim import EngineConfig, Simulation


class Result:
    """What a run produced: the summary dict and the tables behind it. The step × layer table
    is either a DataFrame or, for a run of the engine, the Parquet file it was streamed to
    (`steps_file`, deleted with the Result), read on each access of `steps`."""

    def __init__(self, summary: dict, steps: pd.DataFrame | None, requests: pd.DataFrame,
                 events: pd.DataFrame | None = None, steps_file: Path | None = None, engine: dict | None = None):
        self.summary, self._steps, self.requests, self.events = summary, steps, requests, events
        self.steps_file = steps_file
        self.engine = engine  # which engine ran it: {"engine": "fast" | "simpy", "reason": why SimPy or None}
        if steps_file is not None:
            weakref.finalize(self, _unlink, str(steps_file))

    @property
    def steps(self) -> pd.DataFrame:
        return self._steps if self._steps is not None else pd.read_parquet(self.steps_file)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def engine_config(sc: Scenario, record_events: bool = False, capacities: dict | None = None) -> EngineConfig:
    """The engine's settings; ``capacities`` (tier -> one capacity per layer) overrides the
    uniform per-layer capacity of tiers with a non-uniform allocation."""
    m = sc.model
    g, d = sc.cache.gpu, sc.cache.dram
    caps = capacities or {}
    return EngineConfig(
        gpu_capacity=caps.get("gpu", g.experts(m.expert_bytes)), gpu_policy=g.policy_name, gpu_partition=g.partition,
        dram_capacity=caps.get("dram", d.experts(m.expert_bytes)) if d else None,
        dram_policy=d.policy_name if d else "lru", dram_partition=d.partition if d else "global",
        has_dram=d is not None, dedup=sc.batch.dedup, record_events=record_events, seed=sc.seed, miss=sc.miss,
        kv_cache=sc.cache.kv_cache,
        standin=(sc.standin.bits, sc.standin.threshold) if sc.standin is not None else None)


_SPLIT = ("simulate fewer requests (per-token rates settle long before a million), or split the trace "
          "into several runs")


def _check_run_memory(sc: Scenario, requests: int | None, tokens: int, decode_tokens: int, record_events: bool,
                      field: str, file: str | None = None) -> None:
    """Refuse, before anything is allocated, a run whose tables would not fit in memory."""
    from .. import budget

    m, b = sc.model, sc.batch
    if requests is None:  # a trace file: the request count is not known until it is read
        requests, steps = 0, decode_tokens / b.batch_limit
    else:
        steps = decode_tokens / min(b.batch_limit, requests) + requests
    belady = "belady" in (sc.cache.gpu.policy, sc.cache.dram.policy if sc.cache.dram else "")
    need = budget.run_bytes(m.num_layers, m.top_k, steps, requests, tokens, record_events, belady)
    budget.check(need, f"a run over {tokens:,} tokens ({m.num_layers} MoE layers, about {steps:,.0f} steps)",
                 "it keeps one row per step and layer: " + _SPLIT, field=field, file=file)


def open_trace(sc: Scenario, workdir: Path, record_events: bool = False):
    """A TraceReader for the scenario's trace, generating a synthetic one first if asked. A run that
    would not fit in memory and an empty trace are refused before the simulation starts."""
    from ..traces import TraceReader, check_against_model
    from ..traces.synthetic import generate_to_file

    if sc.trace.synthetic is not None:
        syn = sc.trace.synthetic
        _check_run_memory(sc, syn.requests, syn.requests * (syn.prompt_len + syn.decode_len),
                          syn.requests * syn.decode_len, record_events,
                          "trace.synthetic." + ("decode_len" if syn.decode_len > syn.requests else "requests"))
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
                         scores=sc.standin is not None,
                         model_seed=syn.model_seed, field_prefix="trace.synthetic.")
    else:
        path = sc.resolve(sc.trace.path)
        if not path.is_file():
            raise InputError("trace file not found", file=str(path), field="trace.path")
    reader = TraceReader(path)
    check_against_model(reader.meta, sc.model, str(path))
    if reader.num_rows == 0:
        raise InputError("the trace has no rows: nothing to simulate", file=str(path), field="trace")
    if sc.standin is not None and not reader.has_scores:
        raise InputError("standin needs gate scores, but the trace has no scores column", file=str(path),
                         field="standin")
    if sc.trace.synthetic is None:
        tokens = reader.num_rows // max(1, sc.model.num_layers)
        _check_run_memory(sc, None, tokens, tokens, record_events, "trace", str(path))
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


def make_scheduler(sc: Scenario, requests, trace_path: Path | None = None, size: int | None = None) -> Scheduler:
    """The scenario's scheduler over a stream of RequestTraces (`size`: a tighter batch limit, e.g.
    admission by KV budget)."""
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
    return Scheduler(source, kind=b.scheduler, size=size or b.batch_limit, max_tokens_per_step=b.max_tokens_per_step,
                     chunked_prefill=b.chunked_prefill, admission=b.admission, affinity_window=b.affinity_window,
                     max_wait_s=b.max_wait_ms * 1e-3, num_experts=sc.model.num_experts,
                     num_layers=sc.model.num_layers, dedup=b.dedup)


def _planning_steps(reader, sc: Scenario) -> list[np.ndarray]:
    """The keys of every layer of every engine step, in order, where they do not depend on time
    (closed arrivals); else every token's keys per layer in trace order: what per-layer
    allocations are planned on."""
    if sc.batch.arrivals == "closed":
        return list(collect_keys(make_scheduler(sc, reader.iter_requests(), reader.path)))
    E = sc.model.num_experts
    return [(r.experts[t, layer].astype(np.int64) + layer * E)
            for r in reader.iter_requests(pre_attn=False, scores=False)
            for t in range(r.experts.shape[0]) for layer in range(r.experts.shape[1])]


def plan_capacities(reader, sc: Scenario) -> tuple[dict, dict]:
    """Per-layer capacities of tiers with ``allocation`` proportional or optimal, and the
    allocation report: per tier, the capacities and the misses of uniform and of the chosen
    split in a replay of the planning steps that pins each step's experts, as the engine does."""
    from ..cache.allocation import allocate
    from ..cache.replay import replay_steps

    m = sc.model
    E, L, caps, report, by_layer = m.num_experts, m.num_layers, {}, {}, None
    for name in ("gpu", "dram"):
        t = getattr(sc.cache, name)
        if t is None or t.partition != "per_layer":
            continue
        n = t.experts(m.expert_bytes)
        rep = {"allocation": t.allocation, "per_layer": [n] * L, "budget": n * L}
        if t.allocation != "uniform":
            if by_layer is None:
                by_layer = [[] for _ in range(L)]
                for g in _planning_steps(reader, sc):
                    if g.size:
                        by_layer[int(g[0]) // E].append(g)
            subs = [np.concatenate(g) if g else np.zeros(0, np.int64) for g in by_layer]
            pol = t.policy_name
            chosen = allocate(t.allocation, subs, n * L, m.top_k, E, pol, E, groups=by_layer)
            caps[name] = tuple(chosen)
            miss = ((lambda i, c: replay(subs[i], c, pol).misses) if pol == "belady" else
                    (lambda i, c: replay_steps(by_layer[i], c, pol).misses))
            rep.update(per_layer=chosen, planning_accesses=int(sum(s.size for s in subs)),
                       replay_misses={"uniform": sum(miss(i, n) for i in range(L)),
                                      t.allocation: sum(miss(i, c) for i, c in enumerate(chosen))})
        report[name] = rep
    return caps, report


def popular_keys(reader, sc: Scenario, capacity) -> tuple[int, ...]:
    """The keys the trace routes to most (ties: lower key first), as many as the GPU tier holds
    (per layer with per_layer): what `cache.gpu.preload: popular` places before the run."""
    m = sc.model
    E, L = m.num_experts, m.num_layers
    steps = _planning_steps(reader, sc)
    counts = np.bincount(np.concatenate(steps) if steps else np.zeros(0, np.int64), minlength=E * L)
    if sc.cache.gpu.partition == "per_layer":
        caps = capacity if isinstance(capacity, tuple) else (capacity,) * L
        parts = [layer * E + np.argsort(-counts[layer * E:(layer + 1) * E], kind="stable")[:c]
                 for layer, c in enumerate(caps)]
        keys = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    else:
        keys = np.argsort(-counts, kind="stable")[:capacity]
    return tuple(int(k) for k in keys if counts[k] > 0)


def _access_stream(reader, sc: Scenario) -> np.ndarray:
    """Every cache key the engine will access, in order (a first pass, for Belady's next use).
    Only closed arrivals have a step sequence that does not depend on simulated time."""
    if sc.batch.arrivals != "closed":
        tier = "gpu" if sc.cache.gpu.policy == "belady" else "dram"
        raise InputError("the belady policy needs the future access stream, which with open-loop arrivals "
                         "depends on simulated time: use batch.arrivals: closed", field=f"cache.{tier}.policy")
    parts = list(collect_keys(make_scheduler(sc, reader.iter_requests(), reader.path)))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def simulate(sc: Scenario, record_events: bool = False, progress=None, engine: str = "auto") -> Result:
    """Run one scenario. Deterministic: the same scenario and seed give the same Result.
    `progress`: None, or `progress(total_tokens)` returning a callback called with each step's
    tokens (moesim.progress's bar). `engine`: auto (a fast path, engine/fast.py's or
    engine/fast_prefetch.py's, when the scenario has nothing it does not model, else SimPy), fast
    (that path, or an InputError), or
    simpy (the reference engine); the results are the same either way."""
    if engine not in ENGINES:
        raise InputError(f"expected one of {', '.join(ENGINES)}, found {engine!r}", field="engine")
    with one_blas_thread(), tempfile.TemporaryDirectory(prefix="moesim-") as tmp:  # (moesim/threads.py)
        reader = open_trace(sc, Path(tmp), record_events)
        capacities, allocation = plan_capacities(reader, sc)
        cfg = engine_config(sc, record_events, capacities)
        if sc.cache.gpu.preload == "popular":
            cfg = replace(cfg, gpu_preload=popular_keys(reader, sc, cfg.gpu_capacity))
        next_use = None
        if "belady" in (cfg.gpu_policy, cfg.dram_policy if cfg.has_dram else ""):
            next_use = NextUse(_access_stream(reader, sc)).next_after
        rng = np.random.default_rng(sc.seed)
        predictor = registry.create(sc.predictor.name, sc.predictor.params, sc.model, rng)
        cost = CostModel(sc.model, sc.hardware, sc.runtime)
        lengths: dict[int, tuple[int, int]] = {}

        want_pre = predictor.needs_pre_attn

        def requests():
            for r in reader.iter_requests(pre_attn=want_pre):
                lengths[r.request_id] = (r.prompt_len, r.decode_len)
                yield r

        admit = kv_admission(sc)
        sched = make_scheduler(sc, requests(), reader.path, admit)
        sim = Simulation(sc.model, cost, cfg, predictor, sched, next_use)
        why = unsupported(sim) if engine != "simpy" else "forced: --engine simpy"
        if engine == "fast" and why is not None:
            raise InputError(f"the fast engine does not model {why}: use --engine auto or simpy", field="engine")
        sim.rec.lengths = lengths
        fd, spill = tempfile.mkstemp(prefix="moesim-steps-", suffix=".parquet")  # outlives `tmp`: the Result's
        os.close(fd)
        sim.rec.spill = Path(spill)  # the step rows stream to it as the run goes (memory flat in length)
        if progress is not None:
            sim.rec.on_step = progress(reader.num_rows // max(1, sc.model.num_layers))
        try:
            rec = fast_path(sim).run() if why is None else sim.run()
            return _result(sc, sim, rec, cfg, cost, sched, allocation, admit, why)
        except BaseException:  # (nothing is left behind: the Result owns the spill file only once made)
            _unlink(spill)
            raise
        finally:
            sim.accessed.close()  # its temporary file (unlinked already) is freed now, not at collection


def _result(sc: Scenario, sim: Simulation, rec, cfg: EngineConfig, cost, sched, allocation, admit,
            why: str | None) -> Result:
    """The Result of a finished run: the summary (the recorder's, the gap report and the optional
    parts' own) and the tables."""
    summary = {"moesim_version": __version__, "scenario": scenario_echo(sc),
               **rec.summary(slo=sc.batch.slo),
               "warnings": cache_warnings(sc, cfg),
               "cache_allocation": allocation,
               "policy_gap": policy_gap(sim.accessed, sc, cfg),
               "scheduler": {"max_running": sched.max_running, "max_queue": sched.max_queue},
               "timing_source": {k: ("measured" if v else "roofline") for k, v in cost.uses_measured.items()},
               "expert_bytes": sc.model.expert_bytes,
               "gpu_cache_experts": sc.cache.gpu.experts(sc.model.expert_bytes)}
    if sim.cpu is not None:
        summary["miss"] = {"mode": sc.miss, **sim.cpu.summary(summary["makespan_s"])}
    if sim.standin is not None:
        summary["standin"] = sim.standin.summary()
    if cfg.gpu_preload:
        summary["gpu_preloaded_experts"] = len(cfg.gpu_preload)
    if sim.kv is not None:
        summary["kv_cache"] = {**sim.kv.summary(), "admission_limit": admit,
                               "batch_limit": sc.batch.batch_limit}
    if sc.runtime is not None:  # only with a runtime: `none` keeps the summary as it was
        summary["host"] = sim.host.summary() if sim.host is not None else None
        if sim.writeback is not None:
            summary["writeback"] = sim.writeback.summary()
    return Result(summary, None, rec.requests_frame(), rec.events_frame(), steps_file=rec.steps_file(),
                  engine=_engine(sim, why))


def _engine(sim: Simulation, why: str | None) -> dict:
    """Which engine ran (engine.json): SimPy and why, or a fast path ("path": "prefetch" for
    engine/fast_prefetch.py's)."""
    if why is not None:
        return {"engine": "simpy", "reason": why}
    return {"engine": "fast", "reason": None, **({"path": "prefetch"} if prefetches(sim) else {})}


def kv_admission(sc: Scenario) -> int | None:
    """With cache.kv_cache: the most sequences whose KV caches at max_context still leave one
    layer's top-k experts (None without; an InputError with the numbers when not even one fits)."""
    from .kv import KvBudget

    if not sc.cache.kv_cache:
        return None
    m, syn = sc.model, sc.trace.synthetic
    if sc.cache.gpu.partition != "global":
        raise InputError("cache.kv_cache resizes a global GPU tier: use cache.gpu.partition: global",
                         field="cache.gpu.partition")
    ctx = sc.batch.max_context or (syn.prompt_len + syn.decode_len if syn is not None else None)
    if ctx is None:
        raise InputError("cache.kv_cache with a trace file needs batch.max_context (KV positions reserved per "
                         "sequence)", field="batch.max_context")
    n = KvBudget(m, sc.hardware.gpu.memory_gb, sc.cache.gpu.experts(m.expert_bytes)).admit_limit(ctx)
    return min(n, sc.batch.batch_limit)


def cache_warnings(sc: Scenario, cfg: EngineConfig) -> list[str]:
    from ..cache.guards import thrash_warnings

    m, out = sc.model, []
    for name, cap, part in (("gpu", cfg.gpu_capacity, cfg.gpu_partition),
                            ("dram", cfg.dram_capacity if cfg.has_dram else None, cfg.dram_partition)):
        out += thrash_warnings(name, cap, part, m.top_k, m.num_layers)
    return out


def policy_gap(accessed, sc: Scenario, cfg: EngineConfig) -> dict | None:
    """The GPU tier's LRU -> Belady gap report from a replay of this run's own access stream
    (None for an unbounded GPU cache)."""
    from ..cache.gap import gap_report

    if cfg.gpu_capacity is None:
        return None
    if hasattr(accessed, "array"):  # a KeyLog: read chunk by chunk from its file (never whole)
        stream = accessed
    else:
        stream = np.concatenate(accessed) if accessed else np.zeros(0, dtype=np.int64)
    return gap_report(stream, cfg.gpu_policy, cfg.gpu_partition, cfg.gpu_capacity,
                      sc.model.num_experts, sc.model.num_layers)


def scenario_echo(sc: Scenario) -> dict:
    d = sc.model_dump(mode="json", exclude={"base_dir"})
    if sc.runtime is None:  # the pure-hardware model echoes as it did before runtimes existed
        d.pop("runtime")
    if sc.model.precision is None:
        d["model"].pop("precision")
    # issue 17's knobs echo only when used: a run without them keeps its summary as it was
    for sec in ("pcie_d2h", "host_cpu"):  # echoed when the run uses them (miss: cpu | auto)
        if d["hardware"].get(sec) is None or (sc.miss == "wait" and not (
                sec == "pcie_d2h" and sc.runtime is not None and sc.runtime.evict_writeback == "d2h_stream")):
            d["hardware"].pop(sec, None)
    if sc.model.kv_values_per_token is None:
        d["model"].pop("kv_values_per_token", None)
    if not sc.cache.kv_cache:
        d["cache"].pop("kv_cache")
    if sc.batch.max_context is None:
        d["batch"].pop("max_context")
    for tier in ("gpu", "dram"):
        if d["cache"].get(tier) is not None and d["cache"][tier]["preload"] == "none":
            d["cache"][tier].pop("preload")
    if sc.miss == "wait":
        d.pop("miss")
    if sc.standin is None:
        d.pop("standin")
    return d
