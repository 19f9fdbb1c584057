"""Self-contained HTML reports (plotly) of a run or a sweep, built from result files only.

    render_run("reports/quickstart")    # -> reports/quickstart/report.html
    render_sweep("reports/whatif")      # -> reports/whatif/report.html
    render("some/dir")                  # whichever the files say it is

plotly is imported only inside this package.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError


def render_run(outdir: str | Path) -> Path:
    """Write `outdir/report.html` for a run (summary.json, steps.parquet[, events.parquet])."""
    from .run import render_run as _render

    return _render(outdir)


def render_sweep(sweepdir: str | Path) -> Path:
    """Write `sweepdir/report.html` for a sweep (sweep.json, results.parquet)."""
    from .sweep import render_sweep as _render

    return _render(sweepdir)


def render_advise(outdir: str | Path) -> Path:
    """Write `outdir/report.html` for a deployment search (advise.json, trials.parquet)."""
    from .advise import render_advise as _render

    return _render(outdir)


def detect(path: str | Path) -> str:
    """'run', 'sweep' or 'advise', from the files present (InputError if none)."""
    d = Path(path)
    if not d.is_dir():
        raise InputError("not a directory", file=str(d))
    if (d / "summary.json").is_file():
        return "run"
    if (d / "results.parquet").is_file() or (d / "sweep.json").is_file():
        return "sweep"
    if (d / "advise.json").is_file():
        return "advise"
    raise InputError("no results here: expected summary.json (a run) or results.parquet / sweep.json (a sweep)",
                     file=str(d))


def render(path: str | Path) -> Path:
    return {"run": render_run, "sweep": render_sweep, "advise": render_advise}[detect(path)](path)


__all__ = ["detect", "render", "render_advise", "render_run", "render_sweep"]
