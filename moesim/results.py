"""Result files of a run: summary.json, steps.parquet, requests.parquet, events.parquet.

Each file is written to a temporary name and renamed into place, so an interrupted run never
leaves a half-written file where a finished one was.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd

from .errors import InputError


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def dump_json(obj) -> str:
    return json.dumps(obj, indent=2, allow_nan=False, default=float) + "\n"


def write_result(result, outdir: str | Path) -> list[Path]:
    """Write a run's files as one set: first remove every run file of an earlier run (summary.json
    first), then write the tables and summary.json last, so a directory never mixes two runs and
    holds a summary.json only when the set is complete."""
    from .outdir import RUN_FILES

    out = Path(outdir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the output directory ({e.strerror or e})", file=str(out)) from None
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    written = []
    steps_file = getattr(result, "steps_file", None)  # streamed during the run: copied, never loaded
    steps = None if steps_file is not None else result.steps
    for name, df in (("steps", steps), ("requests", result.requests), ("events", result.events)):
        p = out / f"{name}.parquet"
        if name == "steps" and steps_file is not None:
            _atomic(p, lambda t: shutil.copyfile(steps_file, t))
        elif df is None:
            continue
        else:
            _atomic(p, lambda t, df=df: df.to_parquet(t, index=False))
        written.append(p)
    text = dump_json(result.summary)
    p = out / "summary.json"
    _atomic(p, lambda t: t.write_text(text))
    return [p] + written


def read_summary(outdir: str | Path) -> dict:
    """summary.json of a run dir; InputError when it is missing or not JSON."""
    d = Path(outdir)
    p = d / "summary.json"
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError("no summary.json: not a run's output dir", file=str(d)) from None
    except ValueError as e:
        raise InputError(f"unreadable JSON: {e}", file=str(p)) from None


def read_table(outdir: str | Path, name: str) -> pd.DataFrame:
    return pd.read_parquet(Path(outdir) / f"{name}.parquet")
