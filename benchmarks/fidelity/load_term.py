"""What the runtime's `load_slowdown` changes in each fidelity row: the row's simulation again with
that one field at 1 (everything else of the row's profile and runtime as measured), against the
same median real run.

    python benchmarks/fidelity/load_term.py            # rows of reports/fidelity/fidelity.csv with the term

Prints a markdown table: the measured factor (median and mean ratio of a load while computing over
alone), the error with the term and without it. Outputs: reports/fidelity/<row>/sim-no-load-slowdown/.
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
    lines = ["| row | load_slowdown (median; mean ratio) | error with it | error without it (=1) | change |",
             "|---|---:|---:|---:|---:|"]
    for key, pred, cap, batch in row_ids(""):
        rid = rid_of(key, pred, cap, batch)
        hit = table[table["row"] == rid]
        if not len(hit):
            continue
        r = hit.iloc[0]
        prof = ROOT / r["profile"]
        rt_path = prof.with_name(prof.stem + ".runtime.yaml")
        rt = yaml.safe_load(rt_path.read_text())
        if "load_slowdown" not in rt:
            continue
        meas = json.loads(prof.with_name(prof.stem + ".measurements.json").read_text())["runtime"]["load_slowdown"]
        factor = rt.pop("load_slowdown")
        rt["source"].pop("load_slowdown", None)
        d = out / rid
        no_rt = d / "runtime-no-load-slowdown.yaml"
        no_rt.write_text(yaml.safe_dump(rt, sort_keys=False))
        common = [HERE / MODELS[key][0], "--scale", SCALE, "--set", f"predictor.name={pred}",
                  "--set", f"cache.gpu.capacity_experts={cap}", "--set", f"batch.size={batch}", "--quiet"]
        for a in ([*cmd, "replay", *common, "--set", f"runtime={no_rt.resolve()}", "--hardware", prof,
                   "-o", d / "sim-no-load-slowdown"],
                  [*cmd, "compare", d / "sim-no-load-slowdown", d / r["real_median_run"], "-o",
                   d / "compare-no-load-slowdown", "--quiet"]):
            subprocess.run([str(x) for x in a], cwd=ROOT, check=True, capture_output=True)
        tot = {t["metric"]: t for t in json.loads((d / "compare-no-load-slowdown" / "compare.json").read_text())["totals"]}
        without = tot["makespan_s"]["error"]
        lines.append(f"| {rid} | {factor:.4g} "
                     f"({meas['mean_slowdown']:.3g}) | {100 * r['makespan_s_err']:+.1f}% | {100 * without:+.1f}% | "
                     f"{100 * (r['makespan_s_err'] - without):+.2f} points |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
