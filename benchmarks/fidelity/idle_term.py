"""What the disk's `idle_read_extra` changes in each fidelity row: the row's simulation again with
that one field left out of its profile (everything else as measured), against the same median real run.

    python benchmarks/fidelity/idle_term.py            # rows of reports/fidelity/fidelity.csv with the term

Prints a markdown table: the profile's extra by idle time, the error with it (the table's sim) and
without it, the simulated disk reads that paid an extra, and (a diagnostic of the disk's drift) the
error with the disk anchored at the idle measurement's interleaved back-to-back reads instead.
Outputs: reports/fidelity/<row>/sim-{with-idle-extra,no-idle-extra,b2b-anchor}/.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from run import resim_error, table_rows  # noqa: E402


def paid(sim_dir: Path, prof: dict) -> str:
    """How many of the simulation's disk reads took longer than latency + bytes/bandwidth."""
    ev = pd.read_parquet(sim_dir / "events.parquet")
    d = ev[ev["resource"] == "disk"]
    if not len(d):
        return "–"
    dur = (d["end_s"] - d["start_s"]).to_numpy()
    return f"{int((dur > dur.min() * (1 + 1e-9)).sum())} of {len(dur)}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "reports" / "fidelity"))
    args = ap.parse_args()
    out = Path(args.out)
    lines = ["| row | profile: extra us after 0.5 / 1 / 2 / 5 / 10 / 20 ms idle | error with the term (the "
             "table's sim) | error without it | simulated reads that paid it | profile expert read ms: 30 in a "
             "row / interleaved back to back | error, anchored at the interleaved |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for rid, r, common in table_rows(out):
        prof_path = ROOT / r["profile"]
        prof = yaml.safe_load(prof_path.read_text())
        extra = prof["disk"].get("idle_read_extra")
        if extra is None:
            continue
        d = out / rid
        rt = prof_path.with_name(prof_path.stem + ".runtime.yaml")
        no = {**prof, "disk": {k: v for k, v in prof["disk"].items() if k != "idle_read_extra"}}
        no["disk"]["source"] = {k: v for k, v in prof["disk"]["source"].items() if k != "idle_read_extra"}
        no_path = d / "profile-no-idle-extra.yaml"
        no_path.write_text(yaml.safe_dump(no, sort_keys=False))
        # the same profile with the disk anchored at the idle measurement's back-to-back median (150
        # reads over ~8 s in 10 rounds) instead of the 30 expert reads in a row (0.05-0.08 s) it is anchored at
        meas = json.loads(prof_path.with_name(prof_path.stem + ".measurements.json").read_text())["disk"]
        b2b_ms, lat_us = meas["idle_reads"]["back_to_back"]["median"], prof["disk"]["latency_us"]
        rb = {**prof, "disk": {**prof["disk"], "read_bandwidth_gbps": meas["idle_reads"]["bytes"] / (
            b2b_ms * 1e-3 - lat_us * 1e-6) / 1e9}}
        rb["disk"]["source"] = {**prof["disk"]["source"], "read_bandwidth_gbps": f"re-anchored at {b2b_ms:.3g} ms"}
        rb_path = d / "profile-b2b-anchor.yaml"
        rb_path.write_text(yaml.safe_dump(rb, sort_keys=False))
        err = {}
        for variant, hw in (("with-idle-extra", prof_path), ("no-idle-extra", no_path), ("b2b-anchor", rb_path)):
            err[variant] = resim_error(d, variant, common, rt, hw, r["real_median_run"], events=True)
        us = " / ".join(f"{x:g}" for x in extra["extra_us"])
        lines.append(f"| {rid} | {us} | {100 * err['with-idle-extra']:+.1f}% | {100 * err['no-idle-extra']:+.1f}% | "
                     f"{paid(d / 'sim-with-idle-extra', prof)} | {meas['expert_read']['median']:.3g} / {b2b_ms:.3g} | "
                     f"{100 * err['b2b-anchor']:+.1f}% |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
