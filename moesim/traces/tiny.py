"""`python -m moesim.traces.tiny` (traces/make_tiny_learned.sh): the `moesim trace train-tiny` command.
The trainer itself is `moesim.routing.tiny`; this module only keeps the old entry point."""

if __name__ == "__main__":  # pragma: no cover
    from moesim.cli.trace_sources import train_tiny as _cmd

    _cmd(prog_name="python -m moesim.traces.tiny")
