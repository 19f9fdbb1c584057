"""Run every published operating point through `moesim run` and print published vs predicted.

This is the "before" picture of benchmarks/published/README.md: each point of every
`*.points.yaml` here is simulated with its scenario, its `set` overrides and whatever runtime the
scenario names (none, today), and compared with the published figure (per-token latency, or tokens/s as the source measured it).

    PYTHONPATH=$PWD python benchmarks/published/before.py [POINTS.yaml ...] [-o /tmp/published-before]
"""
from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def _overrides(point: dict) -> list[str]:
    """`--set path=value` arguments for a point's dotted overrides (values as YAML scalars)."""
    out = []
    for key, value in (point.get("set") or {}).items():
        out += ["--set", f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"]
    return out


def run_point(points_file: Path, point: dict, out: Path) -> dict:
    """Simulate one point with the moesim CLI; return its summary.json."""
    scenario = (points_file.parent / point["scenario"]).resolve()
    cmd = ["moesim", "run", str(scenario), "-o", str(out), "--no-report", "--quiet",
           *_overrides(point)]
    subprocess.run(cmd, check=True)
    return json.loads((out / "summary.json").read_text())


def published_tokens_per_s(point: dict) -> float:
    return point["tokens_per_s"] if "tokens_per_s" in point else 1000.0 / point["tpot_ms"]


def simulated_tokens_per_s(point: dict, summary: dict) -> float:
    """moesim's counterpart of the published figure, as `moesim calibrate` measures it: end to end
    (output tokens / makespan) or the decode rate (batch x 1000 / TPOT; 1000 / TPOT for tpot_ms)."""
    if point.get("throughput") == "end_to_end":
        return summary["tokens_per_s"]
    batch = summary["scenario"]["batch"]["size"] if "tokens_per_s" in point else 1
    return batch * 1000.0 / summary["tpot_ms"]["mean"]


def _ratios(spec: dict, speeds: dict) -> list[str]:
    """Rows of each point's speed relative to the file's fitted point (the ablation ratios)."""
    fitted = [p["name"] for p in spec["points"] if not p.get("holdout")]
    if len(fitted) != 1:  # ratios to one fitted point only (a GPU/stack file)
        return []
    pub0, sim0 = speeds[fitted[0]]
    return [f"| {name} | {fitted[0]} | {pub / pub0:.3f} | {sim / sim0:.3f} |"
            for name, (pub, sim) in speeds.items() if name != fitted[0]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("points", nargs="*", type=Path, help="points files (default: every *.points.yaml here)")
    ap.add_argument("-o", "--output", type=Path, default=Path("/tmp/published-before"))
    args = ap.parse_args()
    print("| point | group | fitted | published tok/s | moesim tok/s | moesim / published "
          "| GPU hit rate | PCIe busy |")
    print("|---|---|---|---|---|---|---|---|")
    ratios, done = [], {}
    for pf in args.points or sorted(HERE.glob("*.points.yaml")):
        spec = yaml.safe_load(pf.read_text())
        speeds = {}
        for point in spec["points"]:
            if point["name"] in done:  # a point fitted in two files is run and printed once
                speeds[point["name"]] = done[point["name"]]
                continue
            s = run_point(pf, point, args.output / spec["name"] / point["name"])
            pred = simulated_tokens_per_s(point, s)
            pub = published_tokens_per_s(point)
            speeds[point["name"]] = done[point["name"]] = (pub, pred)
            fitted = "no" if point.get("holdout") else "yes"
            print(f"| {point['name']} | {point['group']} | {fitted} | {pub:.3f} | {pred:.3f} | {pred / pub:.2f} "
                  f"| {s['gpu_hit_rate']:.1%} | {s['pcie_utilization']:.0%} |", flush=True)
        ratios += _ratios(spec, speeds)
    print("\n| point | relative to | published ratio | moesim ratio |")
    print("|---|---|---|---|")
    print("\n".join(ratios))


if __name__ == "__main__":
    main()
