"""Sweep throughput: points per minute with 1 worker and with all cores, and the scaling ratio,
on small points (about a second each) and large ones (several seconds), measured in one run.

    python benchmarks/bench_sweep.py [--points 8] [--small 4] [--large 32] [--workers N]

`--small`/`--large`: requests of the synthetic trace of each point (olmoe-1b-7b, 16 prompt +
64 decode tokens each); the mean seconds per point with one worker are printed beside.
`--workers`: the parallel run's workers (default: every core), e.g. 2 for the 2-vs-1 target.

The machine may be shared, so each run also prints the load average and, per process that ran
points, the points, their wall time and the CPU time the process got for them (each point's
status.json records both): CPU/wall well under 1 means other jobs took the cores (contention),
CPU/wall near 1 with a low ratio of points/min means a scaling defect, and CPU/wall over 1 means
threads inside a point (the inner thread pools' limits each process ran under are printed beside:
with N workers, cores // N each, moesim/threads.py). Where Linux's scheduler autogroup is on
(printed), the CPU is shared per session: on a busy machine the sweep's processes together get
about one session's share, however many workers it starts.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def rate(f: Path, out: Path, workers: int) -> tuple[float, float]:
    """(points/min, wall s) of one sweep run."""
    from moesim.sweep import get_executor, load_sweep, run_sweep

    spec = load_sweep(f)
    t, c, p = time.perf_counter(), time.process_time(), pool_cpu_s()
    res = run_sweep(spec, out, get_executor("local", workers=workers), progress=False, echo=lambda m: None)
    wall, cpu, pool = time.perf_counter() - t, time.process_time() - c, pool_cpu_s() - p
    assert not res.failed, res.failed
    print_workers(out, os.getpid(), wall, cpu, pool if workers > 1 else None)
    return len(res.ran) / wall * 60, wall


def pool_cpu_s() -> float:
    """CPU seconds of the local executor's forkserver so far, with the pool workers it has reaped
    (its children): the pool's start-up (the server's imports), its points and its IPC. 0 before
    the first pool, or without a forkserver (not Linux)."""
    from multiprocessing import forkserver

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return 0.0
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime


def print_workers(out: Path, driver: int, wall_all: float, cpu_driver: float, cpu_pool: float | None) -> None:
    """Per process that ran points: points, wall s, CPU s and CPU/wall (from each status.json);
    then the cores the sweep got in all and the sweep's own overhead: the sweep process's wall and
    CPU time outside its points, and the pool's CPU time outside its points (start-up, IPC)."""
    by_pid: dict[int, list] = {}
    for f in sorted((out / "points").glob("*/status.json")):
        st = json.loads(f.read_text())
        acc = by_pid.setdefault(st["pid"], [0, 0.0, 0.0, set()])
        acc[0] += 1
        acc[1] += st["wall_s"]
        acc[2] += st["cpu_s"]
        acc[3].add(", ".join(f"{k} {v}" for k, v in sorted(st.get("threads", {}).items())))
    for pid, (n, wall, cpu, threads) in sorted(by_pid.items(), key=lambda kv: kv[0] != driver):
        who = "sweep process" if pid == driver else f"pool worker {pid}"
        print(f"    {who:<18} {n:2d} points, {wall:6.2f} s wall, {cpu:6.2f} s CPU (CPU/wall {cpu / wall:.2f}); "
              f"inner threads: {' | '.join(sorted(threads)) or 'not recorded'}")
    total = sum(v[2] for v in by_pid.values())
    own_wall, own = by_pid.get(driver, [0, 0.0, 0.0])[1:3]
    print(f"    points' CPU time / sweep wall time = {total / wall_all:.2f} cores; sweep process outside "
          f"its points: {wall_all - own_wall:.2f} s wall, {cpu_driver - own:.2f} s CPU")
    if cpu_pool is not None:  # (the forkserver's imports count once per benchmark: its first pool)
        print(f"    pool processes' CPU outside their points (start-up, IPC): {cpu_pool - (total - own):.2f} s")


def autogroup() -> str:
    """Linux's autogroup shares the CPU between sessions, not processes: a sweep's workers (one
    session) then split one session's share when other sessions keep the cores busy."""
    try:
        on = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return "scheduler autogroup: unknown"
    return "scheduler autogroup on (CPU shared per session)" if on else "scheduler autogroup off"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=8, help="grid points (cache sizes × predictors)")
    ap.add_argument("--small", type=int, default=4, help="requests per point, small points")
    ap.add_argument("--large", type=int, default=32, help="requests per point, large points")
    ap.add_argument("--workers", type=int, default=None, help="workers of the parallel run (default: every core)")
    a = ap.parse_args()
    caps = [1.0 + 0.5 * i for i in range(max(1, a.points // 2))]
    cores = a.workers or os.cpu_count() or 1
    print(f"{os.cpu_count()} cores ({cores} workers in the parallel run), load average {os.getloadavg()[0]:.2f} at the start; {autogroup()}")
    with tempfile.TemporaryDirectory() as tmp:
        for label, req in (("small", a.small), ("large", a.large)):
            f = Path(tmp) / f"{label}.yaml"
            f.write_text(yaml.safe_dump({
                "name": f"bench-{label}", "base": {
                    "name": "b", "seed": 0, "model": "olmoe-1b-7b", "hardware": "rtx4090-pcie4",
                    "trace": {"synthetic": {"requests": req, "prompt_len": 16, "decode_len": 64}},
                    "cache": {"gpu": {"capacity_gb": 1.0}}, "batch": {"size": 4}},
                "grid": {"cache.gpu.capacity_gb": caps, "predictor.name": ["on_demand", "topk"]}}))
            rates = {}
            for workers in sorted({1, cores}):
                load = os.getloadavg()[0]
                r, wall = rate(f, Path(tmp) / f"{label}{workers}", workers)
                rates[workers] = r
                per = f" ({wall / len(caps) / 2:.2f} s/point)" if workers == 1 else ""
                print(f"{label} points, {workers} worker{'s' if workers > 1 else ' '}: {r:6.1f} points/min{per}; "
                      f"load average {load:.2f} before, {os.getloadavg()[0]:.2f} after")
            if cores > 1:
                print(f"{label} points: {cores} workers / 1 worker = {rates[cores] / rates[1]:.2f}×")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
