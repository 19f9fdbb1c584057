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
