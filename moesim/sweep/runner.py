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

import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from ..errors import InputError
from .executors import Executor
from .spec import Point, SweepSpec, format_value
from .worker import PointTask, clean_stale_tmp, is_done, read_status, write_json

POINTS = "points"
SWEEP_JSON = "sweep.json"

# (column, path into summary.json)
HEADLINE: list[tuple[str, tuple[str, ...]]] = [
    ("tokens_per_s", ("tokens_per_s",)),
    ("tpot_ms_mean", ("tpot_ms", "mean")),
    ("tpot_ms_p50", ("tpot_ms", "p50")),
    ("tpot_ms_p99", ("tpot_ms", "p99")),
    ("ttft_ms_mean", ("ttft_ms", "mean")),
    ("ttft_ms_p99", ("ttft_ms", "p99")),
    ("gpu_hit_rate", ("gpu_hit_rate",)),
    ("dram_hit_rate", ("dram_hit_rate",)),
    ("stall_s", ("stall_s",)),
    ("stall_fraction", ("stall_fraction",)),
    ("bytes_pcie", ("bytes_pcie",)),
    ("bytes_disk", ("bytes_disk",)),
    ("pcie_utilization", ("pcie_utilization",)),
    ("gpu_utilization", ("gpu_utilization",)),
    ("prefetch_issued", ("prefetch", "issued")),
    ("prefetch_used", ("prefetch", "used")),
    ("prefetch_wasted", ("prefetch", "wasted")),
    ("prefetch_late", ("prefetch", "late")),
    ("prefetch_dropped", ("prefetch", "dropped")),
    ("prediction_precision", ("prediction", "precision")),
    ("prediction_recall", ("prediction", "recall")),
    ("dedup_ratio", ("dedup_ratio",)),
    ("dedup_bytes_saved", ("dedup", "bytes_saved")),
    ("unique_experts_per_layer_decode", ("dedup", "unique_experts_per_layer_decode")),
    ("requests_per_s", ("requests_per_s",)),
    ("queue_ms_mean", ("queue_ms", "mean")),
    ("queue_ms_p99", ("queue_ms", "p99")),
    ("slo_attainment", ("slo", "attainment")),
    ("makespan_s", ("makespan_s",)),
    ("output_tokens", ("output_tokens",)),
    ("gpu_cache_experts", ("gpu_cache_experts",)),
    ("expert_bytes", ("expert_bytes",)),
    ("misses", ("misses",)),
    ("gap_captured", ("policy_gap", "captured")),
    ("replay_misses", ("policy_gap", "policy_misses")),
    ("replay_lru_misses", ("policy_gap", "lru_misses")),
    ("replay_belady_misses", ("policy_gap", "belady_misses")),
]


def _get(d: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def headline(summary: dict) -> dict:
    """The numbers results.parquet keeps of one point's summary.json (None where absent)."""
    row = {col: _get(summary, path) for col, path in HEADLINE}
    sc = summary.get("scenario") or {}
    cache_gpu = _get(sc, ("cache", "gpu")) or {}
    n, eb = row["gpu_cache_experts"], row["expert_bytes"]
    if n is not None and eb is not None:
        layers = _get(sc, ("model", "num_layers")) or 1
        row["gpu_cache_bytes"] = n * eb * (layers if cache_gpu.get("partition") == "per_layer" else 1)
    else:
        row["gpu_cache_bytes"] = None
    row["predictor_name"] = _get(sc, ("predictor", "name"))
    row["batch_size"] = _get(sc, ("batch", "size"))
    return row


def _axis_series(values: list) -> pd.Series:
    """Override values as one Parquet-friendly column: numbers stay numbers, booleans booleans,
    lists/mappings become JSON strings, and a column mixing kinds becomes strings."""
    vals = [format_value(v) if isinstance(v, (dict, list)) else v for v in values]
    present = [v for v in vals if v is not None]
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        if len(present) == len(vals) and all(isinstance(v, int) for v in present):
            return pd.Series(vals, dtype="int64")
        return pd.Series([float("nan") if v is None else float(v) for v in vals], dtype="float64")
    if present and len(present) == len(vals) and all(isinstance(v, bool) for v in present):
        return pd.Series(vals, dtype=bool)
    if all(isinstance(v, str) for v in present):
        return pd.Series(vals, dtype=object)
    return pd.Series([None if v is None else format_value(v) for v in vals], dtype=object)


def collect_rows(sweepdir: Path, points: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(manifest, results) frames from the point directories; `points` as in sweep.json."""
    pdir = Path(sweepdir) / POINTS
    axes = []
    for p in points:
        for k in p["overrides"]:
            if k not in axes:
                axes.append(k)
    man, res = [], []
    for p in points:
        st = read_status(pdir / p["id"]) or {}
        status = st.get("status", "pending")
        summary: dict = {}
        if status == "done":
            try:
                summary = json.loads((pdir / p["id"] / "summary.json").read_text())
            except (OSError, ValueError):
                status = "pending"  # results deleted (or damaged) since: the next run redoes it
        error = st.get("error") if status == "failed" else None
        man.append({"point_id": p["id"], "status": status, "error": error, "label": p.get("label"),
                    "wall_s": st.get("wall_s"), "started_at": st.get("started_at"),
                    "finished_at": st.get("finished_at"), "run": st.get("run"), "host": st.get("host"),
                    "overrides": json.dumps(p["overrides"], sort_keys=True)})
        row = {"point_id": p["id"], "status": status, **{k: p["overrides"].get(k) for k in axes},
               "repeat": p.get("repeat"), **headline(summary), "wall_s": st.get("wall_s"), "error": error}
        res.append(row)
    manifest = pd.DataFrame(man, columns=["point_id", "status", "error", "label", "wall_s", "started_at",
                                          "finished_at", "run", "host", "overrides"])
    for c in ("wall_s", "started_at", "finished_at"):
        manifest[c] = pd.to_numeric(manifest[c], errors="coerce").astype("float64")
    results = pd.DataFrame(res)
    if len(results):
        for k in axes:
            results[k] = _axis_series(results[k].tolist())
        for c in [c for c, _ in HEADLINE] + ["gpu_cache_bytes", "wall_s", "batch_size"]:
            results[c] = pd.to_numeric(results[c], errors="coerce").astype("float64")
        if results["repeat"].isna().all():
            results = results.drop(columns=["repeat"])
        else:
            results["repeat"] = results["repeat"].astype("Int64")
    return manifest, results


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_sweep_json(sweepdir: Path) -> dict:
    p = Path(sweepdir) / SWEEP_JSON
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError("not a sweep directory (no sweep.json)", file=str(p.parent)) from None
    except ValueError as e:
        raise InputError(f"unreadable sweep.json: {e}", file=str(p)) from None


def write_tables(sweepdir: str | Path, points: list[dict] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rebuild manifest.parquet and results.parquet from the point directories."""
    d = Path(sweepdir)
    if points is None:
        points = read_sweep_json(d)["points"]
    manifest, results = collect_rows(d, points)
    _write_parquet(manifest, d / "manifest.parquet")
    _write_parquet(results, d / "results.parquet")
    return manifest, results


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
