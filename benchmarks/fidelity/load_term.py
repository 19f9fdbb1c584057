"""What the runtime's `load_slowdown` changes in each fidelity row: the row's simulation again with
that one field at 1, and with the measurement's mean ratio (everything else of the row's profile and
runtime as measured), against the same median real run.

    python benchmarks/fidelity/load_term.py            # rows of reports/fidelity/fidelity.csv with the term

Prints a markdown table: the measured factor (the median ratio of a load while computing over
alone, which the runtime carries, and the mean ratio), the error with it, with the mean ratio instead,
and without the term. Outputs: reports/fidelity/<row>/sim-{no,mean}-load-slowdown/.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from run import resim_error, table_rows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "reports" / "fidelity"))
    args = ap.parse_args()
    lines = ["| row | load_slowdown: median / mean ratio | error (median, the table's sim) | error with the mean "
             "ratio | error without the term |", "|---|---:|---:|---:|---:|"]
    for rid, r, common in table_rows(Path(args.out)):
        prof = ROOT / r["profile"]
        rt = yaml.safe_load(prof.with_name(prof.stem + ".runtime.yaml").read_text())
        if "load_slowdown" not in rt.get("source", {}):
            continue
        meas = json.loads(prof.with_name(prof.stem + ".measurements.json").read_text())["runtime"]["load_slowdown"]
        factor = rt.get("load_slowdown", 1.0)
        d = Path(args.out) / rid
        err = {}
        for variant, value in (("no-load-slowdown", None), ("mean-load-slowdown", max(1.0, meas["mean_slowdown"]))):
            v = {k: x for k, x in rt.items() if k != "load_slowdown"}
            v["source"] = {k: x for k, x in rt["source"].items() if k != "load_slowdown"}
            if value is not None:
                v["load_slowdown"] = round(value, 4)
                v["source"]["load_slowdown"] = ("the mean (not median) ratio of the measurement in "
                                                + rt["source"]["load_slowdown"])
            path = d / f"runtime-{variant}.yaml"
            path.write_text(yaml.safe_dump(v, sort_keys=False))
            err[variant] = resim_error(d, variant, common, path, prof, r["real_median_run"])
        lines.append(f"| {rid} | {factor:.4g} / {meas['mean_slowdown']:.3g} | {100 * r['makespan_s_err']:+.1f}% | "
                     f"{100 * err['mean-load-slowdown']:+.1f}% | {100 * err['no-load-slowdown']:+.1f}% |")
    print("\n".join(lines))

if __name__ == "__main__":
    main()
