"""What every click command of moesim shares: bad input → one line and exit status 2."""
from __future__ import annotations

import functools
import sys

import click

from .errors import InputError


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
