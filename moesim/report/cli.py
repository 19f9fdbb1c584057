"""`moesim report DIR`: (re)render the HTML report of a run or a sweep from its saved files."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from ..errors import InputError


def guard(fn):
    """InputError → `error: ...` on stderr and exit status 2; Ctrl-C → exit 130. No traceback."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except InputError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.command("report")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--points", is_flag=True, help="sweep: also render each finished point's run report")
@guard
def report(directory, points):
    """Render DIR/report.html from a run's or a sweep's saved result files.

    A run dir has summary.json (+ steps.parquet, events.parquet); a sweep dir has results.parquet /
    sweep.json (missing tables are rebuilt from DIR/points/).
    """
    from . import detect, render_run, render_sweep

    d = Path(directory)
    kind = detect(d)
    if kind == "run":
        out = render_run(d)
    else:
        out = render_sweep(d)
        if points:
            n = 0
            for pd_ in sorted((d / "points").glob("*/summary.json")):
                render_run(pd_.parent)
                n += 1
            click.echo(f"rendered {n} point report(s)")
    click.echo(f"wrote {out}")
