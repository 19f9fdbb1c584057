"""Real execution of a scenario's trace (`moesim replay --real`): real tensors, real I/O.

torch is an optional extra (`pip install moesim[torch]`): nothing here imports it at module
import time, so `import moesim` and `import moesim.real` work without it.

    from moesim.real import replay_real
    result = replay_real(scenario, device="cpu")      # an engine.run.Result, same format as simulate()
"""
from __future__ import annotations


def replay_real(*args, **kwargs):
    """Execute a (scaled) scenario for real; see moesim.real.replay.replay_real."""
    from .replay import replay_real as _replay

    return _replay(*args, **kwargs)


__all__ = ["replay_real"]
