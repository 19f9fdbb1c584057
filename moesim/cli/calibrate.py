"""Click command `moesim calibrate POINTS.yaml -o runtime.yaml [--base RUNTIME]`."""
from __future__ import annotations

from pathlib import Path

import click

from moesim.cli.util import guard as _guard


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def print_calibration(cal, width: int | None = 120) -> None:
    """Each point's fit and leave-one-group-out error, held-out points last; then the fitted values."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title="calibration (error = predicted / measured - 1)")
    for c in ("point", "group", "metric", "measured", "predicted", "fit error", "left-out error"):
        t.add_column(c, justify="left" if c in ("point", "group", "metric") else "right")
    for r in cal.rows:
        t.add_row(r["name"] + (" (held out)" if r["holdout"] else ""), r["group"], r["metric"],
                  f"{r['measured']:.4g}", f"{r['predicted']:.4g}", _pct(r["error"]),
                  _pct(r["error"] if r["holdout"] else r["loo_error"]))
    con = Console(width=width)
    con.print(t)
    click.echo("fitted: " + ", ".join(f"{k} = {v:.4g}" for k, v in cal.values.items())
               + f"  ({cal.evaluations} simulations)")


@click.command("calibrate")
@click.argument("points", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="runtime YAML to write")
@click.option("--base", default=None, help="runtime preset or path to start from (default: the file's base_runtime)")
@click.option("--max-evals", type=int, default=30, show_default=True,
              help="most residual evaluations per fit (each simulates every fitted point)")
@click.option("--hardware-output", type=click.Path(dir_okay=False), default=None,
              help="hardware profile YAML to write when hardware.* fields are free (default: OUTPUT's stem + "
                   ".hardware.yaml)")
@click.option("--quiet", is_flag=True)
@_guard
def calibrate(points, output, base, max_evals, hardware_output, quiet):
    """Fit a runtime's free costs to the measured operating points in POINTS (YAML).

    Bounded least squares (scipy) on relative errors of each point's tpot_ms or tokens_per_s; each
    point is also predicted by a fit without its group (leave-one-group-out), and `holdout: true`
    points are never fitted and are reported last. Writes a runtime YAML whose source names the points,
    and, when hardware.disk/pcie_h2d fields are free, the points' hardware profile with them fitted.
    """
    from moesim.calibrate import calibrate as run_calibration
    from moesim.calibrate import hardware_yaml, load_base, load_points, runtime_yaml

    pf, pts = load_points(points)
    start = load_base(base if base is not None else pf.base_runtime, points)
    cal = run_calibration(pf, pts, start, points, max_evals=max_evals)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(runtime_yaml(cal))
    hw_out = None
    if cal.hardware is not None:
        hw_out = Path(hardware_output) if hardware_output else out.with_name(out.stem + ".hardware.yaml")
        hw_out.write_text(hardware_yaml(cal))
    if not quiet:
        print_calibration(cal)
        click.echo(f"runtime written to {out}" + (f"; hardware profile written to {hw_out}" if hw_out else ""))


@click.group("runtime")
def runtime():
    """Runtime (software-stack) cost presets in runtimes/."""


@runtime.command("list")
def runtime_list():
    """Name and description of each runtime preset."""
    from moesim.hardware.runtime import list_runtimes, load_runtime

    for name in list_runtimes():
        click.echo(f"{name}: {load_runtime(name).description}")


@runtime.command("show")
@click.argument("name")
@_guard
def runtime_show(name):
    """Print a runtime preset or file, with its sources."""
    import yaml

    from moesim.hardware.runtime import load_runtime

    rt = load_runtime(name, file=name)
    if rt is None:
        click.echo("none: the pure-hardware model (no software-stack costs)")
        return
    click.echo(yaml.safe_dump(rt.model_dump(mode="json", exclude_none=True), sort_keys=False, width=100))
