"""Results unchanged? Run every predictor and shipped scenario on two checkouts and diff the outputs.

    python benchmarks/same_results.py OLD_ROOT NEW_ROOT [--quick] [-k SUBSTRING]

Each checkout runs in a child process of its own (PYTHONPATH=ROOT), writing summary.json and
steps/requests/events.parquet per case; the parent compares them exactly (the events table is every
transfer with its start and end, so a changed order of copies shows). Every case runs on the SimPy
engine, and again on the contention-free fast path where `--engine auto` takes it (the case name
ends `@fast`; where only the new checkout takes a fast path, it is compared with the old checkout's
SimPy run of the case). Cases: every predictor on the quickstart scenario and on a bench trace (olmoe-1b-7b,
as benchmarks/bench_engine.py) with lru, belady and fifo caches, global and per-layer, at batch 1
and 4; prefetch limits (protect off, max_inflight, max_bytes_per_layer); a DRAM tier over the SSD;
every scenario file and every point of the shipped sweeps (`--quick`: the first two points of
each). Exit status 1 when anything differs. An old checkout: `git worktree add /tmp/old REV`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PREDICTORS = ("on_demand", "oracle", "topk", "multilook", "intelligent", "activation_matrix", "noisy_oracle")
TABLES = ("steps", "requests", "events")


def cases(root: Path, bench_trace: str, quick: bool) -> dict[str, tuple[dict, Path]]:
    """name -> (scenario mapping, base dir), read from `root`'s own scenario files."""
    from moesim.config import apply_overrides, read_yaml
    from moesim.sweep.spec import load_sweep, override_strings

    out: dict[str, tuple[dict, Path]] = {}
    sdir = root / "scenarios"
    quick_data = read_yaml(sdir / "quickstart.yaml")
    for p in PREDICTORS:
        out[f"quickstart/{p}"] = (apply_overrides(quick_data, [f"predictor.name={p}"]), sdir)
    for extra in ("predictor.protect=false", "predictor.max_inflight=3", "predictor.max_bytes_per_layer=40e6",
                  "batch.size=1"):
        for p in ("oracle", "topk", "multilook"):
            out[f"quickstart/{p}/{extra}"] = (apply_overrides(quick_data, [f"predictor.name={p}", extra]), sdir)
    for p in ("oracle", "topk", "intelligent"):
        out[f"quickstart/{p}/dram"] = (apply_overrides(quick_data, [f"predictor.name={p}",
                                                                    "cache.dram.capacity_experts=400"]), sdir)
    bench = {"name": "bench", "model": "olmoe-1b-7b", "hardware": "a100-80gb-pcie4", "trace": {"path": bench_trace},
             "cache": {"gpu": {"capacity_experts": 256, "policy": "lru"}}, "batch": {"size": 1}}
    for p in PREDICTORS:
        out[f"bench/{p}"] = ({**bench, "predictor": {"name": p}}, sdir)
    for pol in ("lru", "belady", "fifo"):  # the fast path's tier calls, by policy, partition and batch
        for p in ("on_demand", "oracle", "topk", "multilook", "intelligent"):
            for part, cap in (("global", 256), ("per_layer", 16)):
                for bs in (1, 4):
                    if (pol, part, bs) == ("lru", "global", 1) or (pol != "lru" and (p not in ("on_demand", "oracle")
                                                                                     or bs == 4)):
                        continue
                    cache = {"gpu": {"capacity_experts": cap, "policy": pol, "partition": part}}
                    out[f"bench/{pol}/{p}/{part}/bs{bs}"] = ({**bench, "cache": cache, "predictor": {"name": p},
                                                              "batch": {"size": bs}}, sdir)
    for f in sorted(list(sdir.glob("*.yaml")) + list((root / "benchmarks/fidelity/scenarios").glob("*.yaml"))):
        data = read_yaml(f)
        if "base" not in data:
            out[f"file/{f.name}"] = (data, f.parent)
            continue
        spec = load_sweep(f)
        points = spec.points()[:2] if quick else spec.points()
        for pt in points:
            out[f"sweep/{f.name}/{pt.id}"] = (apply_overrides(spec.base, override_strings(pt.overrides)),
                                             Path(spec.base_dir))
    return out


def emit(outdir: Path, bench_trace: str, quick: bool, only: str | None) -> None:
    """Child: run every case with this process's moesim and write its files under `outdir`."""
    from moesim.config import scenario_from_dict
    from moesim.engine.run import simulate
    from moesim.results import write_result

    for name, (data, base_dir) in cases(Path.cwd(), bench_trace, quick).items():
        if only and only not in name:
            continue
        d = outdir / name.replace("/", "__")
        try:
            sc = scenario_from_dict(data, base_dir=base_dir)
        except Exception as e:  # a scenario this checkout cannot run (needs torch, a checkpoint...)
            d.mkdir(parents=True)
            (d / "skipped.txt").write_text(f"{type(e).__name__}: {e}\n")
            continue
        write_result(simulate(sc, record_events=True, engine="simpy"), d)
        auto = simulate(sc, record_events=True)
        if auto.engine["engine"] == "fast":  # the same case on the fast path, compared with the old fast path
            write_result(auto, d.with_name(d.name + "@fast"))
        print(name, auto.engine["engine"], flush=True)


def _changed(a, b, path: str = "") -> list[str]:
    """The values that differ between two summaries, as 'path: old -> new' (wall-clock fields
    skipped: they always differ)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [c for k in sorted(a.keys() | b.keys()) if "wall" not in k
                for c in _changed(a.get(k), b.get(k), f"{path}.{k}" if path else k)]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [c for i, (x, y) in enumerate(zip(a, b)) for c in _changed(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a} -> {b}"]


def compare(a: Path, b: Path) -> list[str]:
    """Every difference between two emitted trees, as lines."""
    import pandas as pd

    diffs = []
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    for n in names:
        da, db = a / n, b / n
        if n.endswith("@fast") and db.is_dir() and not da.is_dir():  # a fast path new in `b`: against `a`'s SimPy run
            da = a / n.removesuffix("@fast")
        if not (da.is_dir() and db.is_dir()):
            diffs.append(f"{n}: only in {'old' if da.is_dir() else 'new'}")
            continue
        if (da / "skipped.txt").exists() or (db / "skipped.txt").exists():
            if (da / "skipped.txt").exists() != (db / "skipped.txt").exists():
                diffs.append(f"{n}: skipped in one checkout only")
            continue
        sa, sb = json.loads((da / "summary.json").read_text()), json.loads((db / "summary.json").read_text())
        if sa != sb:
            changed = _changed(sa, sb)
            diffs.append(f"{n}: summary.json differs ({len(changed)} values: "
                         f"{'; '.join(changed[:6])}{'; ...' if len(changed) > 6 else ''})")
        for t in TABLES:
            pa, pb = da / f"{t}.parquet", db / f"{t}.parquet"
            if pa.exists() != pb.exists():
                diffs.append(f"{n}: {t}.parquet in one checkout only")
            elif pa.exists() and not pd.read_parquet(pa).equals(pd.read_parquet(pb)):
                diffs.append(f"{n}: {t}.parquet differs")
    return diffs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--quick", action="store_true", help="two points of each sweep")
    ap.add_argument("-k", dest="only", help="only cases whose name contains this")
    ap.add_argument("--emit", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--trace", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.emit:
        emit(args.emit, args.trace, args.quick, args.only)
        return 0
    sys.path.insert(0, str(HERE))
    import bench_engine

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trace = tmp / "bench.parquet"
        bench_engine.make_trace(trace, "olmoe-1b-7b", 4, 120 if args.quick else 240)
        procs = []
        for tag, root in (("old", args.old), ("new", args.new)):
            cmd = [sys.executable, str(Path(__file__).resolve()), str(root), str(root), "--emit", str(tmp / tag),
                   "--trace", str(trace)] + (["--quick"] if args.quick else []) + (["-k", args.only] if args.only else [])
            env = {**os.environ, "PYTHONPATH": str(root.resolve())}
            procs.append(subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL))
        if any(p.wait() for p in procs):
            print("a checkout failed to run its cases", file=sys.stderr)
            return 1
        diffs = compare(tmp / "old", tmp / "new")
        n = len({p.name for p in (tmp / "old").iterdir()} | {p.name for p in (tmp / "new").iterdir()})
        fast = len(list((tmp / "new").glob("*@fast")))
        skipped = sorted((tmp / "old").glob("*/skipped.txt"))
        for f in skipped:
            print(f"skipped {f.parent.name}: {f.read_text().strip()[:200]}")
    for d in diffs:
        print(d)
    print(f"{n} cases ({fast} of them on a fast path in the new checkout, {len(skipped)} skipped: cannot run here): "
          f"{'identical' if not diffs else f'{len(diffs)} differences'}")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
