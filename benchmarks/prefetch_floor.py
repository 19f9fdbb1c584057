"""How cheap the essential work of a prefetching replay is in plain Python, beside the engine.

    python benchmarks/prefetch_floor.py            # bench_engine's short OLMoE trace (~251 k accesses)

A skeleton replays the trace with an LRU dict of `capacity` experts, a FIFO link whose copies end
at a running sum, and (oracle) the next layer's experts queued at each gate: no pins, protection,
stale drops, promotion, budgets or records beyond one tuple per layer, so it is NOT an engine and
its timing is not moesim's. It bounds what an exact engine's decisions need to cost; the engine's
oracle run on the same trace is printed beside it, both against bare SimPy in the same process.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from bench_engine import bare_simpy_events_per_s, make_trace

COPY_S, ATTN_S, KERNEL_S = 1.0e-3, 20e-6, 30e-6  # illustrative times: they change no decision's cost


def skeleton(rows: list[list[int]], capacity: int, oracle: bool) -> tuple[int, int]:
    """(hits, misses) of the skeleton replay of `rows` (one list of expert keys per layer gate)."""
    cache: dict[int, float] = {}  # key -> ready time; insertion order is the LRU order
    link = now = 0.0
    out, hits, misses = [], 0, 0
    for i, keys in enumerate(rows):
        now += ATTN_S
        if oracle and i + 1 < len(rows):
            for k in rows[i + 1]:
                if k not in cache:
                    link = max(link, now) + COPY_S
                    cache[k] = link
                    if len(cache) > capacity:
                        del cache[next(iter(cache))]
        cursor = now
        for k in keys:
            ready = cache.pop(k, None)
            if ready is None:
                misses += 1
                ready = link = max(link, now) + COPY_S
                if len(cache) >= capacity:
                    del cache[next(iter(cache))]
            else:
                hits += 1
            cache[k] = ready
            cursor = max(cursor, ready) + KERNEL_S
        out.append((i, now, cursor))
        now = cursor
    return hits, misses


def engine_cpu_s(trace: Path, capacity: int) -> float:
    """Process CPU seconds of moesim's whole simulate() with the oracle predictor on `trace`."""
    from moesim.config import scenario_from_dict
    from moesim.engine.run import simulate

    sc = scenario_from_dict({"name": "floor", "model": "olmoe-1b-7b", "hardware": "a100-80gb-pcie4",
                             "trace": {"path": str(trace)},
                             "cache": {"gpu": {"capacity_experts": capacity, "policy": "lru"}},
                             "predictor": {"name": "oracle"}, "batch": {"size": 1}})
    t = time.process_time()
    simulate(sc)
    return time.process_time() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=8, help="requests of the synthetic trace (8: ~251 k accesses)")
    ap.add_argument("--capacity", type=int, default=256)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.parquet"
        make_trace(path, "olmoe-1b-7b", a.requests, 240)
        t = pq.read_table(path, columns=["layer", "experts"])
        n_exp = int(t.schema.metadata[b"moesim.num_experts"])
        rows = [[lay * n_exp + e for e in ex]
                for lay, ex in zip(t.column("layer").to_pylist(), t.column("experts").to_pylist())]
        accesses = sum(map(len, rows))
        floor = bare_simpy_events_per_s(1_000_000, time.process_time)
        print(f"{accesses} accesses; bare SimPy {floor / 1e6:.2f} M events/s (CPU time)")
        for name, oracle in (("skeleton, no prefetch", False), ("skeleton, oracle", True)):
            best = min(_timed(skeleton, rows, a.capacity, oracle) for _ in range(3))
            print(f"{name:22s} {best:7.3f} s CPU  ratio {accesses / best / floor:6.3f}")
        eng = engine_cpu_s(path, a.capacity)
        print(f"{'moesim oracle run':22s} {eng:7.3f} s CPU  ratio {accesses / eng / floor:6.3f}")


def _timed(fn, *args) -> float:
    t = time.process_time()
    fn(*args)
    return time.process_time() - t


if __name__ == "__main__":
    main()
