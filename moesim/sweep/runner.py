"""Run a sweep: skip the points already done, run the rest on an executor, and collect tables.

A sweep directory holds

    sweep.json          the expanded sweep: name, axes, base scenario, every point's id and overrides
    points/<id>/        one point: status.json (done/failed, error, wall time, overrides) and, when
                        done, the run's result files (summary.json, steps/requests[/events].parquet)
    manifest.parquet    one row per point: id, status, error, wall time, when, which run
    results.parquet     one row per point: the overrides as columns + the headline numbers
    report.html         the sweep report (moesim.report.render_sweep)

`status.json` of each point is the record of truth (written by the worker as the point finishes);
the two tables are rebuilt from the point directories at the end of every run, or by
`write_tables(dir)`.
"""
from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from .executors import Executor
from .spec import Point, SweepSpec
from .tables import HEADLINE, POINTS, SWEEP_JSON, collect_rows, headline, read_sweep_json, write_tables  # noqa: F401
from .worker import PointTask, clean_stale_tmp, is_done, write_json

@dataclass
class SweepOutcome:
    outdir: Path
    total: int
    skipped: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)   # status dicts of the points that failed
    interrupted: bool = False
    results: pd.DataFrame | None = None

    @property
    def done(self) -> int:
        return self.total - len(self.failed) - self.pending

    @property
    def pending(self) -> int:
        return self.total - len(self.skipped) - len(self.ran)


def make_tasks(spec: SweepSpec, points: list[Point], run_id: str) -> list[PointTask]:
    return [PointTask(point_id=p.id, index=p.index, label=p.label, overrides=p.overrides, base=spec.base,
                      file=spec.scenario_file, base_dir=spec.base_dir, events=spec.events, run_id=run_id,
                      scenario_hash=spec.scenario_hash(p)) for p in points]


def run_sweep(spec: SweepSpec, outdir: str | Path, executor: Executor, *, progress: bool = True,
              echo: Callable[[str], None] | None = None) -> SweepOutcome:
    """Run every point of `spec` not already done in `outdir`; never raises for a failing point.
    KeyboardInterrupt stops it, with what finished kept (outcome.interrupted)."""
    echo = echo or (lambda m: print(m, file=sys.stderr))
    out = Path(outdir)
    pdir = out / POINTS
    pdir.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(pdir)
    points = spec.points()
    echo_data = spec.echo()
    write_json(out / SWEEP_JSON, echo_data)
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    todo, skipped, changed = [], [], 0
    for p in points:
        h = spec.scenario_hash(p)
        if is_done(pdir / p.id, h) and (not spec.events or (pdir / p.id / "events.parquet").is_file()):
            skipped.append(p.id)
        else:
            if is_done(pdir / p.id):
                changed += 1
            todo.append(p)
    res = SweepOutcome(out, len(points), skipped=skipped)
    msg = f"sweep {spec.name}: {len(points)} point{'s' if len(points) != 1 else ''}"
    if skipped:
        msg += f", {len(skipped)} already done"
    if changed:
        msg += f", {changed} done with a different base or without events (run again)"
    if todo:
        msg += f"; running {len(todo)} on {executor.describe(len(todo))}"
    echo(msg)
    tasks = make_tasks(spec, todo, run_id)

    bar = None
    if progress and tasks:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), unit="pt", desc=spec.name, file=sys.stderr, dynamic_ncols=True,
                   smoothing=0.1)

    def on_done(st: dict) -> None:
        res.ran.append(st["point_id"])
        if st.get("status") != "done":
            res.failed.append(st)
        if bar is not None:
            bar.update(1)
            if res.failed:
                bar.set_postfix(failed=len(res.failed), refresh=False)

    try:
        executor.run(tasks, pdir, on_done)
    except KeyboardInterrupt:
        res.interrupted = True
    finally:
        if bar is not None:
            bar.close()
        _, res.results = write_tables(out, echo_data["points"])
    return res


def summarize_failures(failed: list[dict], limit: int = 20) -> list[str]:
    lines = []
    for st in failed[:limit]:
        err = (st.get("error") or "").strip().splitlines()
        lines.append(f"  {st['point_id']}  {st.get('label', '')}: {err[0] if err else 'failed'}")
    if len(failed) > limit:
        lines.append(f"  ... and {len(failed) - limit} more (see manifest.parquet)")
    return lines
