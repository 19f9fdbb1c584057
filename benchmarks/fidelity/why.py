"""Why a fidelity row misses: the median real run's own component times against the simulation's.

    python benchmarks/fidelity/why.py            # reads reports/fidelity/fidelity.csv and the row dirs

Per row: the profile's expert read (alone, and within its size sweep) against the real runs' median
disk read; decode attention and expert compute per layer, real over simulated; the stall of decode
layers where every expert was resident, and of layers with at least one miss (real and simulated);
and the time between steps (LM head, step set-up). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]


def layer_stalls(run_dir: Path) -> dict:
    """Mean decode stall (ms) of layers with no miss and no late hit, and of layers with a miss;
    median gap between steps (ms)."""
    st = pd.read_parquet(run_dir / "steps.parquet")
    dec = st[st["phase"] == "decode"]
    hit = dec[(dec["misses"] == 0) & (dec["late_hits"] == 0)]
    miss = dec[dec["misses"] > 0]
    g = st.groupby("step").agg(s=("start_s", "min"), e=("end_s", "max"))
    return {"hit_stall": hit["stall_s"].mean() * 1e3 if len(hit) else float("nan"),
            "miss_stall": miss["stall_s"].mean() * 1e3 if len(miss) else float("nan"),
            "misses_per_miss_layer": miss["misses"].mean() if len(miss) else float("nan"),
            "step_gap": (g["s"].shift(-1) - g["e"]).median() * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "reports" / "fidelity"))
    ap.add_argument("--rows", default="", help="comma-separated row ids (default: every row of fidelity.csv)")
    args = ap.parse_args()
    out = Path(args.out)
    df = pd.read_csv(out / "fidelity.csv")
    if args.rows:
        df = df[df["row"].isin(args.rows.split(","))]
    print("| row | error | profile expert read ms: alone / in sweep | real disk read ms (3 runs) | attention "
          "real/sim | expert compute real/sim | all-resident layer stall ms sim / real | miss layer stall ms "
          "sim / real (misses) | between steps ms sim / real |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for _, r in df.iterrows():
        d = out / r["row"]
        prof = ROOT / r["profile"]
        meas = json.loads(prof.with_name(prof.stem + ".measurements.json").read_text())
        disk = meas["disk"]
        s, x = layer_stalls(d / "sim"), layer_stalls(d / r["real_median_run"])
        runs = ", ".join(f"{v:.2f}" for v in ast.literal_eval(r["real_disk_read_ms_runs"]) if v is not None)
        att = r["attention_ms_per_layer_decode_real"] / r["attention_ms_per_layer_decode_sim"]
        comp = r["compute_ms_per_layer_decode_real"] / r["compute_ms_per_layer_decode_sim"]
        print((f"| {r['row']} | {100 * r['makespan_s_err']:+.1f}% | {disk['expert_read']['median']:.2f} / "
              f"{disk['expert_read_in_sweep']['median']:.2f} | {runs or '–'} | {att:.2f} | {comp:.2f} | "
              f"{s['hit_stall']:.2f} / {x['hit_stall']:.2f} | {s['miss_stall']:.2f} / {x['miss_stall']:.2f} "
              f"({x['misses_per_miss_layer']:.1f}) | {s['step_gap']:.2f} / {x['step_gap']:.2f} |")
              .replace("nan / nan (nan)", "–").replace("nan / nan", "–"))


if __name__ == "__main__":
    main()
