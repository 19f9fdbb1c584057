"""`replay_real`: run a scenario on the real executor and return the simulator's Result."""
from __future__ import annotations

import tempfile
from pathlib import Path

from .executor import RealExecutor
from .summary import loadavg, real_section, run_summary


def replay_real(sc, *, device: str = "auto", dtype: str = "bfloat16", workdir=None, io: str = "auto",
                record_events: bool = False, threads: int | None = None, keep_files: bool = False,
                trace_path=None, scaling: dict | None = None, log=None):
    """Execute scenario `sc` for real and return an engine.run.Result (same format as simulate())."""
    from ..engine.run import Result, open_trace

    ex = RealExecutor(sc, device=device, dtype=dtype, workdir=workdir, io=io, record_events=record_events,
                      threads=threads, log=log)
    load_before = loadavg()
    try:
        with tempfile.TemporaryDirectory(prefix="moesim-real-trace-") as tmp:
            reader = open_trace(sc, Path(tmp)) if trace_path is None else _reader(trace_path, sc)
            rec = ex.run(reader)
        summary = run_summary(sc, rec, ex, real_section(ex, load_before, scaling))
        return Result(summary, rec.steps_frame(), rec.requests_frame(), rec.events_frame())
    finally:
        if not keep_files:
            ex.cleanup()


def _reader(path, sc):
    from ..traces import TraceReader, check_against_model

    r = TraceReader(path)
    check_against_model(r.meta, sc.model, str(path))
    return r
