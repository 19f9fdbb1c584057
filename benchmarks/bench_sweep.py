"""Sweep throughput: points per minute with 1 worker and with all cores, and the scaling ratio.

    python benchmarks/bench_sweep.py [--points 16]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=16, help="grid points (cache sizes × predictors)")
    a = ap.parse_args()
    from moesim.sweep import get_executor, load_sweep, run_sweep

    caps = [0.5 + 0.5 * i for i in range(max(1, a.points // 2))]
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "bench.yaml"
        f.write_text(yaml.safe_dump({
            "name": "bench-sweep", "base": str(ROOT / "scenarios/quickstart.yaml"),
            "grid": {"cache.gpu.capacity_gb": caps, "predictor.name": ["on_demand", "oracle"]}}))
        cores = os.cpu_count() or 1
        rates = {}
        for workers in sorted({1, cores}):
            spec = load_sweep(f)
            t = time.perf_counter()
            res = run_sweep(spec, Path(tmp) / f"out{workers}", get_executor("local", workers=workers),
                            progress=False, echo=lambda m: None)
            wall = time.perf_counter() - t
            assert not res.failed, res.failed
            rates[workers] = len(res.ran) / wall * 60
            print(f"{workers} worker{'s' if workers > 1 else ' '}: {len(res.ran)} points in {wall:6.1f} s "
                  f"= {rates[workers]:6.1f} points/min")
        if cores > 1:
            print(f"scaling {cores} workers / 1 worker: {rates[cores] / rates[1]:.2f}× (ideal {cores}×)")


if __name__ == "__main__":
    main()
