"""Running one sweep point, in whatever process an executor picks, and committing its files.

A point's directory `points/<id>/` appears in one `rename`: the result files and `status.json`
are written into a hidden temporary directory beside it first. So a point directory is always
complete — `status.json` says `done` (and the result files are there) or `failed` (with the
error) — and an interrupted sweep never leaves half a point behind.
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..results import dump_json
from ..threads import current as current_threads
from .spec import override_strings
from .tables import STATUS, read_status  # noqa: F401  (read_status re-exported)

TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class PointTask:
    """Everything a worker needs to run one point (picklable, no simulator objects)."""

    point_id: str
    index: int
    label: str
    overrides: dict
    base: dict
    file: str | None
    base_dir: str
    events: bool
    run_id: str
    scenario_hash: str


def _status(task: PointTask, status: str, started: float, error: str | None = None, **extra) -> dict:
    now = time.time()
    return {"point_id": task.point_id, "status": status, "error": error, "label": task.label,
            "overrides": task.overrides, "wall_s": round(now - started, 6), "started_at": started,
            "finished_at": now, "run": task.run_id, "scenario_hash": task.scenario_hash,
            "host": socket.gethostname(), "pid": os.getpid(), **extra}


def _simulate_into(task: PointTask, tmp: Path) -> dict:
    """Run the point and write its result files into `tmp`; the status dict (done or failed)."""
    started, cpu0 = time.time(), time.process_time()

    def cpu() -> dict:   # CPU time this process spent on the point: wall_s / cpu_s tells contention;
        # and the inner thread pools' limits it ran under (the executor's cap, moesim/threads.py)
        return {"cpu_s": round(time.process_time() - cpu0, 6), "threads": current_threads()}

    try:
        from ..config import apply_overrides, scenario_from_dict
        from ..engine.run import simulate
        from ..results import write_result

        data = apply_overrides(task.base, override_strings(task.overrides), task.file)
        sc = scenario_from_dict(data, file=task.file, base_dir=Path(task.base_dir))
        result = simulate(sc, record_events=task.events)
        write_result(result, tmp)
        s = result.summary
        headline = {"tokens_per_s": s.get("tokens_per_s"), "gpu_hit_rate": s.get("gpu_hit_rate")}
        return _status(task, "done", started, **cpu(), headline=headline)
    except InputError as e:
        return _status(task, "failed", started, str(e), **cpu(), error_type="InputError")
    except Exception as e:  # any bug in a point must not stop the sweep: record it
        return _status(task, "failed", started, f"{type(e).__name__}: {e}", **cpu(), error_type=type(e).__name__,
                       traceback=traceback.format_exc())


def _tmp_dir(points_dir: Path, point_id: str) -> Path:
    return points_dir / f"{TMP_PREFIX}{point_id}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _commit(tmp: Path, final: Path) -> None:
    """Move a complete point directory into place (replacing an older, not-done one)."""
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)


def run_point(task: PointTask, points_dir: str | None) -> dict:
    """Run one point. With `points_dir` (a directory this process can write, shared with the
    driver), write `points_dir/<id>/` and return the status dict. Without it (a remote worker),
    return the status dict with the files' bytes under `"files"` for the driver to commit."""
    if points_dir is not None:
        pdir = Path(points_dir)
        tmp = _tmp_dir(pdir, task.point_id)
        tmp.mkdir(parents=True)
        try:
            st = _simulate_into(task, tmp)
            if st["status"] != "done":  # keep only the status of a failed point
                for f in tmp.iterdir():
                    f.unlink()
            (tmp / STATUS).write_text(dump_json(st))
            _commit(tmp, pdir / task.point_id)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return st
    with tempfile.TemporaryDirectory(prefix="moesim-point-") as d:
        st = _simulate_into(task, Path(d))
        files = {}
        if st["status"] == "done":
            files = {f.name: f.read_bytes() for f in sorted(Path(d).iterdir()) if f.is_file()}
        return {**st, "files": files}


def commit_bundle(points_dir: Path, outcome: dict) -> dict:
    """Driver side of a remote point: write the returned files and status into `points/<id>/`."""
    outcome = dict(outcome)
    files = outcome.pop("files", {}) or {}
    pid = outcome["point_id"]
    tmp = _tmp_dir(points_dir, pid)
    tmp.mkdir(parents=True)
    try:
        for name, data in files.items():
            (tmp / Path(name).name).write_bytes(data)
        (tmp / STATUS).write_text(dump_json(outcome))
        _commit(tmp, points_dir / pid)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return outcome


def record_failure(points_dir: Path, task: PointTask, message: str, started: float | None = None) -> dict:
    """The driver records a point whose worker never reported (crashed, killed, lost)."""
    st = _status(task, "failed", started or time.time(), message, error_type="WorkerError")
    return commit_bundle(points_dir, st)


def is_done(point_dir: Path, scenario_hash: str | None = None) -> bool:
    st = read_status(point_dir)
    if not st or st.get("status") != "done" or not (Path(point_dir) / "summary.json").is_file():
        return False
    return scenario_hash is None or st.get("scenario_hash") == scenario_hash


def clean_stale_tmp(points_dir: Path, older_than_s: float = 0.0) -> None:
    """Remove temporary point directories left by an interrupted sweep."""
    if not points_dir.is_dir():
        return
    now = time.time()
    for d in points_dir.glob(f"{TMP_PREFIX}*"):
        try:
            if now - d.stat().st_mtime >= older_than_s:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def write_json(path: Path, obj: Any) -> None:
    """Write JSON to a temporary name and rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(dump_json(obj))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
