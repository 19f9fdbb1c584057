"""The `moesim` command line. Bad input → one line on stderr naming file and field, exit 2."""
from __future__ import annotations

import click


@click.group()
@click.version_option(package_name="moesim")
def main():
    """Simulate Mixture-of-Experts inference with offloaded experts."""


def _register_subcommands() -> None:
    """Every command group lives in its own module of this package; the group is assembled here."""
    from moesim.cli.advise import advise
    from moesim.cli.calibrate import calibrate, runtime
    from moesim.cli.hardware import hardware
    from moesim.cli.info import models, schema
    from moesim.cli.predictor import predictor
    from moesim.cli.profile import compare, profile, replay
    from moesim.cli.report import report
    from moesim.cli.run import run
    from moesim.cli.sweep import sweep
    from moesim.cli.trace import trace
    from moesim.cli.trace_sources import collect, fit, import_, train_tiny
    from moesim.cli.validate import validate

    for cmd in (run, schema, models, hardware, trace, validate, sweep, advise, report, predictor, runtime,
                profile, replay, compare, calibrate):
        main.add_command(cmd)
    for cmd in (collect, train_tiny, import_, fit):
        trace.add_command(cmd)


_register_subcommands()

if __name__ == "__main__":  # pragma: no cover
    main()
