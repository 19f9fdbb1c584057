"""The GPU fidelity rows as a table: real (median of the runs, spread) vs the simulation.

    python benchmarks/gpu/table.py RESULTS_DIR

RESULTS_DIR is what benchmarks/gpu/run.sh packed (unpacked): rows/<row>/{real1,real2,...,sim,sim-rt}.
Error = (sim - real median) / real median, of the makespan.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pandas as pd


def _load(d: Path) -> dict:
    return json.loads((d / "summary.json").read_text())


def _disk_ms(d: Path) -> float:
    e = pd.read_parquet(d / "events.parquet").query("resource == 'disk'")
    return float((e.end_s - e.start_s).mean()) * 1e3


def row(d: Path) -> dict:
    runs = [p for p in sorted(d.glob("real*")) if (p / "summary.json").is_file()]
    ms = [_load(p)["makespan_s"] for p in runs]
    med = statistics.median(ms)
    out = {"row": d.name, "real runs": len(ms), "real makespan s (median)": med,
           "spread (max-min)/median": (max(ms) - min(ms)) / med,
           "hit rate real": _load(runs[0])["gpu_hit_rate"],
           "disk read ms real (median of run means)": statistics.median(_disk_ms(p) for p in runs)}
    for name in ("sim", "sim-rt"):
        if (d / name / "summary.json").is_file():
            s = _load(d / name)
            out[f"{name} makespan s"] = s["makespan_s"]
            out[f"{name} error"] = (s["makespan_s"] - med) / med
    return out


def main() -> None:
    root = Path(sys.argv[1])
    df = pd.DataFrame([row(d) for d in sorted((root / "rows").iterdir()) if d.is_dir()])
    for c in df.columns:
        if c.endswith("error"):
            df[c] = df[c].map("{:+.1%}".format)
    for c in ("spread (max-min)/median", "hit rate real"):
        df[c] = df[c].map("{:.1%}".format)
    for c in df.columns:
        if df[c].dtype.kind == "f":
            df[c] = df[c].map("{:.3g}".format)
    print("| " + " | ".join(df.columns) + " |")
    print("|" + "---|" * len(df.columns))
    for r in df.itertuples(index=False):
        print("| " + " | ".join(str(v) for v in r) + " |")


if __name__ == "__main__":
    main()
