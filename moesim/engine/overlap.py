"""Loads slowed while compute runs (a runtime's `load_slowdown`, issue 15).

The driver commits compute (attention, dense blocks, the resident experts' kernels at the gate,
each loaded expert's kernel as its load lands, the LM head) to a horizon: when the compute stream
is next free as far as it is known now. A transfer that starts before that horizon progresses
`factor` times slower for the part of it that overlaps the committed compute, at full speed after.
"""
from __future__ import annotations

from collections.abc import Callable


def stretched_s(alone_s: float, overlap_s: float, factor: float) -> float:
    """Duration of a transfer of `alone_s` seconds alone that starts with `overlap_s` seconds of
    compute still to run, progressing at 1/`factor` of its speed while that compute runs:
    `factor·alone_s` if it ends inside the compute, else `alone_s + overlap_s·(1 − 1/factor)`."""
    if overlap_s <= 0 or factor == 1.0:
        return alone_s
    return min(alone_s * factor, alone_s + overlap_s * (1.0 - 1.0 / factor))


class ComputeHorizon:
    """When the compute stream is next free (the work the driver has committed so far), and the
    transfer-duration functions that are slowed until then."""

    def __init__(self, env, factor: float):
        self.env, self.factor = env, factor
        self.until = 0.0

    def busy(self, seconds: float) -> None:
        """Commit `seconds` of compute, after what is committed already (or from now)."""
        if seconds > 0:
            self.until = max(self.until, self.env.now) + seconds

    def slowed(self, duration_s: Callable[[int], float]) -> Callable[[int], float]:
        """`duration_s` (a channel's bytes -> seconds) stretched by the compute left at the transfer's start."""
        def f(nbytes: int) -> float:
            return stretched_s(duration_s(nbytes), self.until - self.env.now, self.factor)
        return f
