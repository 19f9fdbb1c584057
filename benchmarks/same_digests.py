"""Results unchanged, the fast path included (benchmarks/same_results.py compares two checkouts on the SimPy
engine; this one writes digest files and runs each case on the engine it picks)? Run every shipped scenario (scenarios/*.yaml, a spread of each sweep's points,
benchmarks/fidelity/scenarios) and bench_engine.py's trace with each predictor family (lru, belady
and fifo; global and per-layer caches; batch 1 and 4; on_demand forced on SimPy too) and write one
digest per run: summary.json without wall-clock fields, and hashes of the steps and requests tables.

    PYTHONPATH=<checkout> python benchmarks/same_digests.py OUT.json   # from that checkout's root
    python benchmarks/same_digests.py --diff OLD.json NEW.json       # exit 1 when any run differs

Run it on the code before a speed change and after (e.g. a `git archive` of the old commit), then
diff the two files. It takes a few minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import sys
import tempfile
from pathlib import Path


def digest(df) -> str | None:
    """A hash of a table's values (floats written in full, so any last-bit change shows)."""
    if df is None:
        return None
    b = io.BytesIO()
    df.to_csv(b, index=False, float_format="%.17g")
    return hashlib.sha256(b.getvalue()).hexdigest()


def strip_wall(d):
    """The summary without its wall-clock fields (the only ones allowed to change)."""
    if isinstance(d, dict):
        return {k: strip_wall(v) for k, v in d.items() if "wall" not in k}
    if isinstance(d, list):
        return [strip_wall(x) for x in d]
    return d


def scenarios():
    """(name, Scenario) of every shipped scenario and of up to ~8 points spread over each sweep."""
    from moesim.config import apply_overrides, load_scenario, scenario_from_dict
    from moesim.sweep.spec import load_sweep, override_strings

    for f in sorted(glob.glob("scenarios/*.yaml")) + sorted(glob.glob("benchmarks/fidelity/scenarios/*.yaml")):
        try:
            yield f, load_scenario(f)
            continue
        except Exception:  # a sweep file (or a file for another command): its points below
            pass
        try:
            spec = load_sweep(f)
        except Exception as e:
            print(f"skip {f}: {type(e).__name__}", file=sys.stderr)
            continue
        pts = spec.points()
        for p in pts[::max(1, len(pts) // 8)]:
            data = apply_overrides(spec.base, override_strings(p.overrides), spec.scenario_file)
            yield f"{f}::{p.label}", scenario_from_dict(data, file=spec.scenario_file, base_dir=Path(spec.base_dir))


def bench_scenarios(trace: Path):
    """(name, Scenario, engine) on bench_engine.py's trace: each predictor family and policy."""
    from moesim.config import scenario_from_dict

    base = {"name": "bench", "model": "olmoe-1b-7b", "hardware": "a100-80gb-pcie4", "trace": {"path": str(trace)}}
    for pol in ("lru", "belady", "fifo"):
        for pred in ("on_demand", "oracle", "topk", "multilook", "intelligent"):
            for part, cap in (("global", 256), ("per_layer", 16)):
                for bs in (1, 4):
                    if pol != "lru" and (pred not in ("on_demand", "oracle") or bs == 4):
                        continue
                    d = dict(base, cache={"gpu": {"capacity_experts": cap, "policy": pol, "partition": part}},
                             predictor={"name": pred}, batch={"size": bs})
                    yield f"bench {pol} {pred} {part} bs{bs}", scenario_from_dict(d), "auto"
    d = dict(base, cache={"gpu": {"capacity_experts": 256, "policy": "lru"}}, predictor={"name": "on_demand"},
             batch={"size": 1})
    yield "bench on_demand simpy", scenario_from_dict(d), "simpy"


def run_all(out: Path) -> None:
    from moesim.engine.run import simulate
    from moesim.errors import InputError

    sys.path.insert(0, str(Path(__file__).parent))
    import bench_engine

    res = {}
    trace = Path(tempfile.gettempdir()) / "moesim-same-results-bench.parquet"  # (a fixed path: the summary echoes it)
    bench_engine.make_trace(trace, "olmoe-1b-7b", 8, 240)  # ~256k accesses, seeded: the same file every time
    runs = [(n, sc, "auto") for n, sc in scenarios()] + list(bench_scenarios(trace))
    for name, sc, engine in runs:
        try:
            r = simulate(sc, engine=engine)
            res[name] = {"summary": strip_wall(r.summary), "steps": digest(r.steps),
                         "requests": digest(r.requests), "engine": r.engine}
        except InputError as e:
            res[name] = {"error": str(e)}
        print(name, res[name].get("engine", res[name].get("error")), flush=True)
    out.write_text(json.dumps(res, indent=1, sort_keys=True, default=str))


def diff(a: Path, b: Path) -> int:
    x, y = json.loads(a.read_text()), json.loads(b.read_text())
    bad = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
    for k in bad:
        print(f"differs: {k}")
    print(f"{len(x)} and {len(y)} runs: " + ("identical" if not bad else f"{len(bad)} differ"))
    return 1 if bad else 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", type=Path)
    ap.add_argument("--diff", nargs=2, type=Path, metavar=("OLD", "NEW"))
    a = ap.parse_args()
    if a.diff:
        sys.exit(diff(*a.diff))
    if a.out is None:
        ap.error("give OUT.json or --diff OLD NEW")
    run_all(a.out)


if __name__ == "__main__":
    main()
