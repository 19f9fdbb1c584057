"""What every click command of moesim shares: bad input → one line and exit status 2."""
from __future__ import annotations

import functools
import sys

import click

from moesim.errors import InputError


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


def fmt_ms(d: dict) -> str:
    """A latency summary (`mean`, `p50`, `p99` in ms) as one cell of a run's table."""
    return "-" if d["mean"] is None else f"{d['mean']:.2f} (p50 {d['p50']:.2f}, p99 {d['p99']:.2f})"


def fmt_pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def print_metrics(title: str, rows, out, width: int | None = None) -> None:
    """A run's metric/value table on the terminal, then where its results are."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in rows:
        t.add_row(k, v)
    Console(width=width).print(t)
    click.echo(f"results in {out}/")


def run_notes(s: dict) -> list[str]:
    """Explanations of a run's figures a reader could misread: a batch the trace could not fill,
    prefetches that were mostly late because the link is saturated."""
    notes = []
    b, ran = s["scenario"]["batch"], (s.get("scheduler") or {}).get("max_running")
    if ran is not None and ran < b["size"] and b.get("arrivals", "closed") == "closed":
        notes.append(f"batch.size is {b['size']} but at most {ran} requests ran at once: the trace has "
                     f"{s.get('requests', ran)} requests")
    pf = s.get("prefetch") or {}
    issued, late = pf.get("issued") or 0, pf.get("late") or 0
    if issued and late > issued / 2:
        sc = s["scenario"]
        layers = max(1, s["steps"] * sc["model"]["num_layers"])
        copy_ms = 1e3 * s["expert_bytes"] / (sc["hardware"]["pcie_h2d"]["bandwidth_gbps"] * 1e9)
        per_layer = s["transfers_pcie"] / layers
        notes.append(f"{late} of {issued} prefetches were late (still in flight when their layer needed them): "
                     f"a layer's copies take about {per_layer * copy_ms:.1f} ms over PCIe ({per_layer:.1f} experts "
                     f"x {copy_ms:.2f} ms) against {1e3 * s['compute_s'] / layers:.2f} ms of compute, so copies "
                     f"issued a layer or two ahead queue behind one another (link busy "
                     f"{fmt_pct(s.get('pcie_utilization'))}): prefetching can only start them earlier")
    return notes


def executor_options(executors: list[str], what: str, workers_help: str):
    """--executor (one of `executors`), --address and --workers of a command that simulates on the sweep executors
    (sweep, advise); `what` completes the --executor help: "where {what}: local processes, or a Ray cluster"."""

    def decorate(fn):
        fn = click.option("--workers", type=int, help=workers_help)(fn)
        fn = click.option("--address", metavar="auto|ray://HOST:PORT", help="Ray cluster to join (--executor ray)")(fn)
        return click.option("--executor", type=click.Choice(executors), default="local", show_default=True,
                            help=f"where {what}: local processes, or a Ray cluster")(fn)

    return decorate
