"""simulate(scenario) -> Result: open the trace, build the plan, run the engine, summarise."""
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
from .plan import static_plan
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
        generate_to_file(path, sc.model, preset=syn.preset or sc.model.name, requests=syn.requests,
                         prompt_len=syn.prompt_len, decode_len=syn.decode_len,
                         rng=np.random.default_rng(sc.seed), seed=sc.seed, pre_attn=syn.pre_attn)
    else:
        path = sc.resolve(sc.trace.path)
        if not path.is_file():
            raise InputError("trace file not found", file=str(path), field="trace.path")
    reader = TraceReader(path)
    check_against_model(reader.meta, sc.model, str(path))
    return reader


def _access_stream(reader, sc: Scenario) -> np.ndarray:
    """Every cache key the engine will access, in order (a first pass, for Belady's next use)."""
    parts = [k for st in static_plan(reader.iter_requests(), sc.batch.size, sc.model.num_experts, sc.batch.dedup)
             for k in st.keys]
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
        cost = CostModel(sc.model, sc.hardware)
        decode_tokens: dict[int, int] = {}

        def requests():
            for r in reader.iter_requests():
                decode_tokens[r.request_id] = r.decode_len
                yield r

        steps = static_plan(requests(), sc.batch.size, sc.model.num_experts, sc.batch.dedup)
        sim = Simulation(sc.model, cost, cfg, predictor, steps, next_use)
        rec = sim.run()
        summary = {"moesim_version": __version__, "scenario": scenario_echo(sc), **rec.summary(decode_tokens),
                   "timing_source": {k: ("measured" if v else "roofline") for k, v in cost.uses_measured.items()},
                   "expert_bytes": sc.model.expert_bytes,
                   "gpu_cache_experts": cfg.gpu_capacity}
        return Result(summary, rec.steps_frame(), rec.requests_frame(), rec.events_frame())


def scenario_echo(sc: Scenario) -> dict:
    d = sc.model_dump(mode="json", exclude={"base_dir"})
    return d
