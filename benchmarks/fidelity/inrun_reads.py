"""Are a real replay's disk reads slower while the main thread computes? Read from the run itself.

    python benchmarks/fidelity/inrun_reads.py reports/fidelity/olmoe-on_demand-c64-b1/real ...

In a decode layer with misses the first disk read starts at the gate with nothing to compute (no
expert is resident yet when every access misses, and the attention has ended); each later read of
the layer runs while the experts that landed before it compute. Prints the median duration of the
1st, 2nd, 3rd and later reads of such layers (events.parquet and steps.parquet of each run), and
the median read that started after more than 1 ms of disk idle (with that idle's median) against
one that started within 0.2 ms of the previous read's end (the disk's `idle_read_extra`, in the run).
"""
from __future__ import annotations

import sys

import numpy as np
import pandas as pd


def by_position(run_dir: str) -> dict[int, list[float]]:
    ev = pd.read_parquet(f"{run_dir}/events.parquet")
    st = pd.read_parquet(f"{run_dir}/steps.parquet")
    layers = st[(st["phase"] == "decode") & (st["misses"] > 0)]
    disk = ev[ev["resource"] == "disk"].sort_values("start_s")
    s, e = disk["start_s"].to_numpy(), disk["end_s"].to_numpy()
    pos: dict[int, list[float]] = {}
    for g, end in zip(layers["gate_s"], layers["end_s"]):
        for k, i in enumerate(range(np.searchsorted(s, g), np.searchsorted(s, end))):
            pos.setdefault(min(k, 3), []).append((e[i] - s[i]) * 1e3)
    return pos


def after_idle(run_dir: str) -> str:
    """Reads after > 1 ms of disk idle against reads back to back (< 0.2 ms after the previous)."""
    ev = pd.read_parquet(f"{run_dir}/events.parquet")
    disk = ev[ev["resource"] == "disk"].sort_values("start_s")
    s, e = disk["start_s"].to_numpy(), disk["end_s"].to_numpy()
    idle = np.r_[np.inf, s[1:] - e[:-1]]  # the first read follows the start of the run
    dur = (e - s) * 1e3
    gap, b2b = (idle > 1e-3) & np.isfinite(idle), idle < 0.2e-3
    return (f"after idle (median {np.median(idle[gap]) * 1e3:.2f} ms) {np.median(dur[gap]):.3f} ms (n={gap.sum()}), "
            f"back to back {np.median(dur[b2b]):.3f} ms (n={b2b.sum()}): "
            f"{(np.median(dur[gap]) - np.median(dur[b2b])) * 1e3:+.0f} us")


def main() -> None:
    for d in sys.argv[1:]:
        pos = by_position(d)
        print(d + ": " + ", ".join(f"read {k + 1}{'+' if k == 3 else ''} {np.median(v):.3f} ms (n={len(v)})"
                                   for k, v in sorted(pos.items())))
        print(f"  {after_idle(d)}")


if __name__ == "__main__":
    main()
