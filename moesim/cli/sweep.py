"""`moesim sweep`: run every point of a sweep file, resumably (registered on the main group)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from moesim.cli.util import executor_options, guard
from moesim.sweep.executors import executor_names


@click.command("sweep")
@click.argument("sweep_file", metavar="SWEEP.yaml", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(file_okay=False),
              help="sweep dir (default: the file's output:, else reports/<sweep name>/)")
@executor_options(executor_names(), "points run",
                  "local: worker processes (default: all cores), each with cores // N inner "
                  "threads (OMP_NUM_THREADS sets them); ray: most tasks in flight")
@click.option("--set", "overrides", multiple=True, metavar="PATH=VALUE", help="override a field of the base scenario")
@click.option("--events", is_flag=True, help="also write events.parquet for every point")
@click.option("--list", "list_only", is_flag=True, help="print the points (id and overrides) and exit")
@click.option("--no-progress", is_flag=True, help="no progress bar")
@click.option("--no-report", is_flag=True, help="do not write report.html")
@click.option("--no-table", is_flag=True, help="do not print the results table")
@guard
def sweep(sweep_file, output, executor, address, workers, overrides, events, list_only, no_progress, no_report,
          no_table):
    """Run every point of SWEEP.yaml (base scenario × grid × zip × repeats).

    Each point writes DIR/points/<id>/ (status.json + result files); a rerun skips the points
    already done, so an interrupted sweep resumes. Then DIR/results.parquet (one row per point),
    DIR/manifest.parquet and DIR/report.html. Exit status 0 if every point is done, 1 if some
    failed, 2 for a bad sweep file.
    """
    from moesim.sweep.executors import get_executor
    from moesim.sweep.runner import run_sweep, summarize_failures
    from moesim.sweep.spec import load_sweep

    spec = load_sweep(sweep_file, overrides)
    if events:
        spec.events = True
    points = spec.points()
    if list_only:
        for p in points:
            click.echo(f"{p.id}  {p.label}")
        click.echo(f"{len(points)} point{'s' if len(points) != 1 else ''}", err=True)
        return
    ex = get_executor(executor, workers=workers, address=address)
    from moesim.outdir import check_writable_dir

    out = check_writable_dir(output or spec.output or Path("reports") / spec.name)
    res = run_sweep(spec, out, ex, progress=not no_progress, echo=lambda m: click.echo(m, err=True))
    done = int((res.results["status"] == "done").sum()) if res.results is not None and len(res.results) else 0
    if res.failed:
        click.echo(f"{len(res.failed)} of {res.total} point{'s' if res.total != 1 else ''} failed:", err=True)
        for line in summarize_failures(res.failed):
            click.echo(line, err=True)
    if res.interrupted:
        click.echo(f"interrupted: {done} of {res.total} points done, kept in {out}/; "
                   "run the same command again to resume", err=True)
        sys.exit(130)
    if done and not no_table:
        from moesim.cli.render import print_sweep_table

        # zipped axes vary together: the first one names the row
        shown = list(spec.grid) + list(spec.zip)[:1] + (["seed"] if "seed" in spec.axes else [])
        print_sweep_table(res.results, [a for a in shown if a in res.results])
    if not no_report and done:
        try:
            from moesim.report import render_sweep
        except ImportError as e:  # plotly missing
            click.echo(f"warning: no report ({e}); install plotly", err=True)
        else:
            render_sweep(out)
    click.echo(f"{done} of {res.total} points done; results in {out}/results.parquet")
    sys.exit(1 if res.failed or done < res.total else 0)
