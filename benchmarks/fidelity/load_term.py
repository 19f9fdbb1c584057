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
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from run import MODELS, SCALE, moesim_cmd, row_ids, rid_of  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "reports" / "fidelity"))
    args = ap.parse_args()
    out = Path(args.out)
    table = pd.read_csv(out / "fidelity.csv")
    cmd = moesim_cmd()
    lines = ["| row | load_slowdown: median / mean ratio | error (median, the table's sim) | error with the mean "
             "ratio | error without the term |", "|---|---:|---:|---:|---:|"]
    for key, pred, cap, batch in row_ids(""):
        rid = rid_of(key, pred, cap, batch)
        hit = table[table["row"] == rid]
        if not len(hit):
            continue
        r = hit.iloc[0]
        prof = ROOT / r["profile"]
        rt_path = prof.with_name(prof.stem + ".runtime.yaml")
        rt = yaml.safe_load(rt_path.read_text())
        if "load_slowdown" not in rt.get("source", {}):
            continue
        meas = json.loads(prof.with_name(prof.stem + ".measurements.json").read_text())["runtime"]["load_slowdown"]
        factor = rt.get("load_slowdown", 1.0)
        d = out / rid
        common = [HERE / MODELS[key][0], "--scale", SCALE, "--set", f"predictor.name={pred}",
                  "--set", f"cache.gpu.capacity_experts={cap}", "--set", f"batch.size={batch}", "--quiet"]
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
            for a in ([*cmd, "replay", *common, "--set", f"runtime={path.resolve()}", "--hardware", prof,
                       "-o", d / f"sim-{variant}"],
                      [*cmd, "compare", d / f"sim-{variant}", d / r["real_median_run"], "-o", d / f"compare-{variant}",
                       "--quiet"]):
                subprocess.run([str(x) for x in a], cwd=ROOT, check=True, capture_output=True)
            tot = {t["metric"]: t for t in json.loads((d / f"compare-{variant}" / "compare.json").read_text())["totals"]}
            err[variant] = tot["makespan_s"]["error"]
        lines.append(f"| {rid} | {factor:.4g} / {meas['mean_slowdown']:.3g} | {100 * r['makespan_s_err']:+.1f}% | "
                     f"{100 * err['mean-load-slowdown']:+.1f}% | {100 * err['no-load-slowdown']:+.1f}% |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
