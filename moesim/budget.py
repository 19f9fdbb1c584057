"""Memory estimates made before allocating: a synthetic trace or a run that would not fit is refused
with its estimate and how to do it in pieces, instead of being OOM-killed after a minute.

The limit is half of this machine's physical memory, or MOESIM_MEMORY_LIMIT_GB when set. The
per-row costs are what moesim's tables take (measured on the quickstart run: 91 bytes per
steps.parquet row, 46 per compacted event; a Python tuple per event while running is ~300)."""
from __future__ import annotations

import os

from .errors import InputError

STEP_ROW_BYTES = 100          # one row of the per-step × layer table (compacted: ~91)
EVENT_BYTES = 300             # one transfer event, a Python tuple until the run ends
REQUEST_ROW_BYTES = 120       # one row of requests.parquet plus its bookkeeping
NEXT_USE_BYTES = 24           # Belady: per access, the key, its next use and the index


def memory_limit() -> tuple[int, str]:
    """(bytes, where the figure comes from)."""
    env = os.environ.get("MOESIM_MEMORY_LIMIT_GB")
    if env:
        try:
            gb = float(env)
        except ValueError:
            raise InputError(f"expected a number of GB, got {env!r}", field="MOESIM_MEMORY_LIMIT_GB") from None
        return int(gb * 1e9), "MOESIM_MEMORY_LIMIT_GB"
    try:
        phys = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume 16 GB
        phys = 16 * 10**9
    return phys // 2, "half of this machine's memory; MOESIM_MEMORY_LIMIT_GB sets it"


def check(need: float, what: str, hint: str, *, field: str | None = None, file: str | None = None) -> None:
    """InputError when `need` bytes exceed the limit, with the estimate and `hint`."""
    limit, why = memory_limit()
    if need > limit:
        raise InputError(f"{what} needs about {need / 1e9:,.1f} GB of memory, over the {limit / 1e9:,.1f} GB "
                         f"limit ({why}); {hint}", field=field, file=file)


def synthetic_bytes(layers: int, experts: int, top_k: int, hidden: int, requests: int, max_tokens: int) -> float:
    """Generating a synthetic trace: 4 int64 per request up front, then at least one whole request
    at a time (two latent float64 states per token × layer, the gate logits and the output rows)."""
    per_request = 32 * requests
    one = max_tokens * layers * (16 * hidden + 3 * 8 * experts + 16 + 2 * top_k)
    return per_request + one


def run_bytes(layers: int, top_k: int, steps: float, requests: int, tokens: int, events: bool,
              belady: bool) -> float:
    """A run's tables: one row per step × layer, one row per request, with --events one event per
    access at most, and for Belady the next-use index of every access."""
    accesses = tokens * layers * top_k
    return (steps * layers * STEP_ROW_BYTES + requests * REQUEST_ROW_BYTES
            + (accesses * EVENT_BYTES if events else 0) + (accesses * NEXT_USE_BYTES if belady else 0))
