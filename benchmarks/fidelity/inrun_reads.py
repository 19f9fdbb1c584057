"""Are a real replay's disk reads slower while the main thread computes? Read from the run itself.

    python benchmarks/fidelity/inrun_reads.py reports/fidelity/olmoe-on_demand-c64-b1/real ...

In a decode layer with misses the first disk read starts at the gate with nothing to compute (no
expert is resident yet when every access misses, and the attention has ended); each later read of
the layer runs while the experts that landed before it compute. Prints the median duration of the
1st, 2nd, 3rd and later reads of such layers (events.parquet and steps.parquet of each run).
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


def main() -> None:
    for d in sys.argv[1:]:
        pos = by_position(d)
        print(d + ": " + ", ".join(f"read {k + 1}{'+' if k == 3 else ''} {np.median(v):.3f} ms (n={len(v)})"
                                   for k, v in sorted(pos.items())))


if __name__ == "__main__":
    main()
