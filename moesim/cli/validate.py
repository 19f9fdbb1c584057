"""`moesim validate`: this build against closed-form timings and reference cache simulators."""
from __future__ import annotations

import sys

import click

from moesim.cli.util import guard as _guard


@click.command()
@_guard
def validate():
    """Check this build against closed-form timings and reference cache simulators."""
    from rich.console import Console
    from rich.table import Table

    from moesim.validate import checks

    rows = checks()
    t = Table(title="moesim validate")
    for c in ("check", "expected", "got", "ok"):
        t.add_column(c)
    for name, exp, got, ok in rows:
        t.add_row(name, exp, got, "[green]yes[/]" if ok else "[red]NO[/]")
    Console(width=140).print(t)
    failed = sum(not r[3] for r in rows)
    click.echo(f"{len(rows) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
