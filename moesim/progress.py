"""The progress bar of a long `moesim run`: tokens simulated and an ETA on stderr, only when
stderr is a terminal (nothing when piped or with --quiet) and only once the run has lasted
DELAY_S (a short run prints nothing extra)."""
from __future__ import annotations

import sys
from contextlib import contextmanager

DELAY_S = 2.0  # a run shorter than this never shows the bar


@contextmanager
def token_progress(enabled: bool, stream=None):
    """Yields `start(total_tokens) -> on_step(tokens)` for engine.run.simulate's `progress`, or
    None when disabled or stderr is not a terminal. The bar is closed on exit."""
    stream = sys.stderr if stream is None else stream
    if not enabled or not getattr(stream, "isatty", lambda: False)():
        yield None
        return
    from tqdm import tqdm

    bars: list = []

    def start(total: int):
        bar = tqdm(total=total, unit="tok", desc="simulating", delay=DELAY_S, file=stream, leave=False,
                   dynamic_ncols=True, mininterval=0.5)
        bars.append(bar)
        return bar.update

    try:
        yield start
    finally:
        for b in bars:
            b.close()
