"""`moesim report DIR`: (re)render the HTML report of a run or a sweep from its saved files."""
from __future__ import annotations

from pathlib import Path

import click

from moesim.cli.util import guard


@click.command("report")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--points", is_flag=True, help="sweep: also render each finished point's run report")
@guard
def report(directory, points):
    """Render DIR/report.html from a run's, a sweep's or a search's saved result files.

    A run dir has summary.json (+ steps.parquet, events.parquet); a sweep dir has results.parquet /
    sweep.json (missing tables are rebuilt from DIR/points/); an advise dir has advise.json.
    """
    from moesim.report import detect, render_advise, render_run, render_sweep

    d = Path(directory)
    kind = detect(d)
    if kind == "run":
        out = render_run(d)
    elif kind == "advise":
        out = render_advise(d)
    else:
        out = render_sweep(d)
        if points:
            n = 0
            for pd_ in sorted((d / "points").glob("*/summary.json")):
                render_run(pd_.parent)
                n += 1
            click.echo(f"rendered {n} point report(s)")
    click.echo(f"wrote {out}")
