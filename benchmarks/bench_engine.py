"""Engine speed: simulated expert accesses per second against a bare SimPy loop measured in the
same run, and peak memory at two trace lengths (flat = streaming works).

    python benchmarks/bench_engine.py            # ~1M token×expert accesses, every predictor family
                                                 # (on_demand, oracle and topk on their fast paths and,
                                                 # forced, on SimPy)
    python benchmarks/bench_engine.py --quick    # smaller, for a smoke run
    python benchmarks/bench_engine.py --memory   # peak RSS at ~256k and ~4M accesses (on_demand)

Each configuration runs in a child process (its own peak RSS), `--repeat` times (3; 1 with
--memory); the row shown is its best run by the cpu ratio, as each child's floor is the best of
three loops (timeit's rule: the slower passes are the machine's hiccups, not the code's). To
compare two versions of the code in one run, run this file twice back to back with PYTHONPATH
pointing at each checkout.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import simpy


def bare_simpy_events_per_s(n: int = 1_000_000, clock=time.perf_counter) -> float:
    """Events per second of a bare SimPy loop of `n` timeouts, by `clock` (wall or process time)."""
    env = simpy.Environment()

    def proc():
        for _ in range(n):
            yield env.timeout(1)

    env.process(proc())
    t = clock()
    env.run()
    return n / (clock() - t)


def run_one(trace: str, preset: str, capacity: int, policy: str, predictor: str, engine: str = "auto") -> dict:
    """One simulate() call: its wall and CPU time, and the CPU time of the engine's run alone (the
    step walk, without the trace reading, the summary and the gap report around it)."""
    from moesim.config import scenario_from_dict
    from moesim.engine import fast, run
    from moesim.engine.run import simulate
    from moesim.engine.sim import Simulation

    sc = scenario_from_dict({"name": "bench", "model": preset, "hardware": "a100-80gb-pcie4",
                             "trace": {"path": trace}, "cache": {"gpu": {"capacity_experts": capacity,
                                                                          "policy": policy}},
                             "predictor": {"name": predictor}, "batch": {"size": 1}})
    engine_cpu, ran = [], []

    def timed(path):  # time the engine's own run (this child only)
        _run = path.run

        def run_timed():
            t0 = time.process_time()
            try:
                return _run()
            finally:
                engine_cpu.append(time.process_time() - t0)
                ran.append(type(path).__name__)
        path.run = run_timed
        return path

    # (wrapped where the paths are made, so that no path's module is imported here: the flat
    # path's imports numba, which would change the run being measured)
    fast_path = fast.fast_path
    run.fast_path = fast.fast_path = lambda sim: timed(fast_path(sim))
    sim_init = Simulation.__init__

    def init(self, *a, **k):
        sim_init(self, *a, **k)
        timed(self)
    Simulation.__init__ = init
    t, c = time.perf_counter(), time.process_time()
    res = simulate(sc, engine=engine)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    s = res.summary
    return {"wall_s": wall, "cpu_s": cpu, "engine_cpu_s": sum(engine_cpu), "pairs": s["token_expert_pairs"],
            "accesses": s["accesses"], "misses": s["misses"],
            "engine": ("flat-p" if "FlatPrefetch" in ran else "fast-p") if res.engine.get("path") == "prefetch"
            else res.engine["engine"],
            "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak RSS since it started: VmHWM of its own address space. (ru_maxrss is kept
    across exec, so a child would report its parent's peak at fork time if that were larger: here
    the parent's, after it generated the 4M trace.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: ru_maxrss


def make_trace(path: Path, preset: str, requests: int, decode: int) -> None:
    from moesim.models import get_preset
    from moesim.traces.synthetic import generate_to_file

    generate_to_file(path, get_preset(preset), preset=preset, requests=requests, prompt_len=16, decode_len=decode,
                     rng=np.random.default_rng(0), seed=0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--memory", action="store_true", help="peak RSS at two trace lengths instead")
    ap.add_argument("--repeat", type=int, default=None, help="children per configuration; the best is shown "
                                                           "(default 3, 1 with --memory)")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        trace, preset, cap, policy, pred, engine = a.child
        # this run's own floor, just before it (shared cores drift); the best of three, as timeit
        # takes the best: one slow pass (a hiccup of the machine) would flatter the row's ratios
        floor = max(bare_simpy_events_per_s(300_000) for _ in range(3))
        floor_cpu = max(bare_simpy_events_per_s(300_000, time.process_time) for _ in range(3))
        print(json.dumps({**run_one(trace, preset, int(cap), policy, pred, engine), "floor": floor,
                          "floor_cpu": floor_cpu}))
        return
    preset = "olmoe-1b-7b"  # 16 layers × top-8 = 128 token×expert accesses per token
    decode = 60 if a.quick else 240
    if a.memory:
        sizes = {"256k": 8, "4M": 128}
    else:
        sizes = {"short": 8, "long": 32} if not a.quick else {"short": 4, "long": 8}
    floor = bare_simpy_events_per_s(200_000 if a.quick else 1_000_000)
    print(f"bare SimPy timeout loop: {floor / 1e6:.2f} M events/s (each row: its own, measured just before it)")
    print("vs floor: accesses/s over the floor's events/s, wall-clock; cpu: the same by process CPU time "
          "(steadier on shared cores); engine: the engine's run alone, CPU time; each row: the best of "
          f"{a.repeat or (1 if a.memory else 3)} runs by cpu")
    print(f"{'trace':6s} {'policy':7s} {'predictor':11s} {'engine':6s} {'accesses':>9s} {'pairs':>9s} {'wall s':>7s} "
          f"{'acc/s':>9s} {'floor/s':>8s} {'vs floor':>8s} {'cpu':>6s} {'engine':>6s} {'peak RSS MB':>11s}")
    rss = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, req in sizes.items():
            path = Path(tmp) / f"{name}.parquet"
            make_trace(path, preset, req, decode)
            if a.memory or name == "short":
                combos = [("lru", "on_demand", "auto")]
            else:  # auto: a fast path where the scenario allows it (fast: on_demand; fast-p, flat-p: prefetching), else SimPy
                combos = [("lru", "on_demand", "auto"), ("lru", "on_demand", "simpy"), ("lru", "oracle", "auto"),
                          ("lru", "oracle", "simpy"), ("lru", "topk", "auto"), ("lru", "topk", "simpy"),
                          ("lru", "multilook", "auto"), ("lru", "intelligent", "auto"),
                          ("belady", "on_demand", "auto")]
            for policy, pred, engine in combos:
                runs = []
                for _ in range(a.repeat or (1 if a.memory else 3)):
                    out = subprocess.run([sys.executable, __file__, "--child", str(path), preset, "256", policy,
                                          pred, engine], capture_output=True, text=True, check=True)
                    runs.append(json.loads(out.stdout))
                r = max(runs, key=lambda r: r["accesses"] / r["cpu_s"] / r["floor_cpu"])
                rate = r["accesses"] / r["wall_s"]
                rss[name] = r["peak_rss_mb"]
                print(f"{name:6s} {policy:7s} {pred:11s} {r['engine']:6s} {r['accesses']:9d} {r['pairs']:9d} "
                      f"{r['wall_s']:7.2f} "
                      f"{rate / 1e3:8.0f}k {r['floor'] / 1e6:7.2f}M {rate / r['floor']:8.3f} "
                      f"{r['accesses'] / r['cpu_s'] / r['floor_cpu']:6.3f} "
                      f"{r['accesses'] / r['engine_cpu_s'] / r['floor_cpu']:6.3f} {r['peak_rss_mb']:11.0f}")
    if a.memory:
        print(f"peak RSS 4M - 256k accesses: {rss['4M'] - rss['256k']:+.0f} MB")


if __name__ == "__main__":
    main()
