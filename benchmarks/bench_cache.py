"""Speed of moesim.cache.replay against libCacheSim's C loop (process_trace), per policy.

    python benchmarks/bench_cache.py [--requests 1000000] [--capacity 300] [--universe 10000]
                                     [--alpha 1.0] [--seed 0] [--repeat 3]

Builds a seeded Zipf stream, writes it as a plain-text trace (one id per line) and as an
ORACLE_GENERAL_TRACE (24-byte records with the next access of each request; libCacheSim's Belady
needs it), then for each policy times, in the same run:

* libCacheSim ``process_trace`` on the binary oracle trace (its fastest reader; for lru, fifo and
  lfu also on the plain-text trace, shown separately),
* ``moesim.cache.replay`` on the ids read back from the binary trace with ``np.fromfile``
  (the read is timed; Belady's next uses are recomputed by replay, not taken from the file),

checks that the miss counts agree and prints a table. Timings are the best of ``--repeat`` runs,
both wall-clock and CPU time of this process (``time.process_time``): on a shared machine the
CPU-time ratio is the one other jobs disturb least, and the load average is printed with it.
``--policies all`` adds every other policy: libCacheSim's (clock, sieve, s3fifo, twoq, slru, arc
equal exactly; lirs, wtinylfu, lecar near: their miss difference is printed; moesim drives them
all through their incremental classes) and moesim's own (lfuda, lfu_history, pinned_hot, timed
without a libCacheSim counterpart).
Not a test: nothing here fails except a miss-count mismatch (exit status 1).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from moesim.cache import POLICIES, replay
from moesim.cache.reference import LCS_NAME, LCS_NEAR, ORACLE, write_oracle_trace
PLAIN_TXT_OK = ("lru", "fifo", "lfu")   # policies libCacheSim runs correctly from a plain-text trace
TARGET = {"lru": 0.5, "fifo": 0.5, "lfu": 0.25, "belady": 0.25}


def zipf_stream(n: int, universe: int, alpha: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, universe + 1) ** alpha
    ids = rng.choice(universe, size=n, p=p / p.sum())
    return rng.permutation(universe)[ids].astype(np.int64)


def write_traces(stream: np.ndarray, d: Path) -> tuple[Path, Path]:
    txt, bin_ = d / "trace.txt", d / "trace.oracleGeneral"
    np.savetxt(txt, stream, fmt="%d")
    write_oracle_trace(bin_, stream)
    return txt, bin_


def time_libcachesim(lcs, policy: str, path: Path, kind: str, capacity: int, n: int, repeat: int):
    best, cpu, misses = float("inf"), float("inf"), None
    for _ in range(repeat):
        params = lcs.ReaderInitParam(ignore_obj_size=True)
        ttype = lcs.TraceType.ORACLE_GENERAL_TRACE if kind == "oracle" else lcs.TraceType.PLAIN_TXT_TRACE
        reader = lcs.TraceReader(str(path), ttype, params)
        cache = getattr(lcs, LCS_NAME.get(policy) or LCS_NEAR[policy])(capacity)
        t0, c0 = time.perf_counter(), time.process_time()
        miss_ratio, _ = cache.process_trace(reader)
        best, cpu = min(best, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
        misses = round(miss_ratio * n)
    return n / best, n / cpu, misses


def time_moesim(policy: str, path: Path, capacity: int, repeat: int):
    best, cpu, res = float("inf"), float("inf"), None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        ids = np.fromfile(path, dtype=ORACLE)["id"].astype(np.int64)
        res = replay(ids, capacity, policy)
        best, cpu = min(best, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return res.requests / best, res.requests / cpu, res.misses


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--capacity", type=int, default=300)
    ap.add_argument("--universe", type=int, default=10_000)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--policies", default="lru,fifo,lfu,belady")
    a = ap.parse_args(argv)
    import libcachesim as lcs

    pols = list(TARGET) + sorted(set(POLICIES) - set(TARGET)) if a.policies == "all" else a.policies.split(",")
    stream = zipf_stream(a.requests, a.universe, a.alpha, a.seed)
    n = len(stream)
    print(f"Zipf stream: {n:,} requests, {a.universe:,} ids, alpha {a.alpha}, seed {a.seed}; "
          f"capacity {a.capacity}; best of {a.repeat} (wall and CPU time); Python {platform.python_version()}, "
          f"{platform.machine()}")
    ok = True
    rows = []
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        txt, bin_ = write_traces(stream, Path(tmp))
        for pol in pols:
            lcs_rate = lcs_cpu = lcs_miss = txt_rate = txt_miss = None
            if pol in LCS_NAME or pol in LCS_NEAR:
                lcs_rate, lcs_cpu, lcs_miss = time_libcachesim(lcs, pol, bin_, "oracle", a.capacity, n, a.repeat)
            if pol in PLAIN_TXT_OK:  # without next-access times libCacheSim's Belady is meaningless
                txt_rate, _, txt_miss = time_libcachesim(lcs, pol, txt, "txt", a.capacity, n, a.repeat)
            ms_rate, ms_cpu, ms_miss = time_moesim(pol, bin_, a.capacity, a.repeat)
            equal = None if lcs_miss is None or pol in LCS_NEAR else (
                ms_miss == lcs_miss and (txt_miss is None or txt_miss == lcs_miss))
            ok &= equal is not False
            rows.append((pol, lcs_rate, txt_rate, ms_rate, ms_rate / lcs_rate if lcs_rate else None,
                         ms_cpu / lcs_cpu if lcs_cpu else None, TARGET.get(pol), equal, ms_miss, lcs_miss))
    print_table(rows)
    print("load average (1, 5, 15 min) before: {:.2f} {:.2f} {:.2f}; after: {:.2f} {:.2f} {:.2f}".format(
        *load0, *os.getloadavg()))
    return 0 if ok else 1


def print_table(rows) -> None:
    hdr = (f"{'policy':<11} {'libcachesim req/s':>18} {'(plain txt)':>12} {'moesim req/s':>13} "
           f"{'ratio':>6} {'cpu ratio':>9} {'target':>6}  {'misses equal':<12} {'misses':>9}")
    print(hdr)
    print("-" * len(hdr))
    for pol, lr, tr, mr, ratio, cpu_ratio, target, eq, mm, lm in rows:
        tr_s = f"{tr / 1e6:.2f} M" if tr else "-"
        lr_s = f"{lr / 1e6:.2f} M" if lr else "-"
        eq_s = (f"near {mm / lm - 1:+.1%}" if lm and eq is None else "-" if eq is None
                else "yes" if eq else f"NO ({lm})")
        print(f"{pol:<11} {lr_s:>18} {tr_s:>12} {mr / 1e6:>11.2f} M {'-' if ratio is None else f'{ratio:.2f}':>6} "
              f"{'-' if cpu_ratio is None else f'{cpu_ratio:.2f}':>9} "
              f"{'-' if target is None else f'{target:.2f}':>6}  {eq_s:<12} {mm:>9,}")


if __name__ == "__main__":
    sys.exit(main())
