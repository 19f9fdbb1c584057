"""Is a read after idle slower because the disk idled, or because the CPU slept? A control.

    python benchmarks/fidelity/idle_control.py reports/fidelity --bytes 3145728

Times expert-sized page-cache-bypassing reads of a fresh 128 MiB file in DIR back to back and after
2 and 10 ms gaps spent either asleep (as `moesim profile` measures `disk.idle_read_extra`) or
spinning on the CPU (as a real replay's main thread computes while its disk idles), in interleaved
rounds; prints each case's median and its extra over back to back (the median over rounds).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from moesim.real.store import aligned_buffer, open_reader, write_random_file

MiB = 1 << 20


def spin(s: float) -> None:
    end = time.perf_counter() + s
    while time.perf_counter() < end:
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--bytes", type=int, default=3145728)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--reads", type=int, default=15)
    args = ap.parse_args()
    eb, rounds, reads = args.bytes, args.rounds, args.reads
    fd, tmp = tempfile.mkstemp(prefix=".moesim-idle-control-", suffix=".bin", dir=args.dir)
    os.close(fd)
    path = Path(tmp)
    cases = [(0.0, "back to back"), (2.0, "sleep"), (2.0, "spin"), (10.0, "sleep"), (10.0, "spin")]
    times: dict = {c: [] for c in cases}
    rng = np.random.default_rng(3)
    try:
        rnd = rng.integers(0, 256, 4 * MiB, dtype=np.uint8)
        write_random_file(path, 32, 4 * MiB, lambda i: rnd)
        reader, buf, n = open_reader(path, "auto"), aligned_buffer(eb), 128 * MiB // eb
        for _ in range(rounds):
            for c in cases:
                reader.read(buf, int(rng.integers(0, n)) * eb, eb)  # not timed
                for off in (rng.integers(0, n, reads) * eb).tolist():
                    if c[0]:
                        (time.sleep if c[1] == "sleep" else spin)(c[0] * 1e-3)
                    t = time.perf_counter()
                    reader.read(buf, off, eb)
                    times[c].append(time.perf_counter() - t)
        reader.close()
    finally:
        path.unlink(missing_ok=True)
    by_round = {c: np.median(np.reshape(x, (rounds, reads)), axis=1) for c, x in times.items()}
    print(f"{eb / MiB:.2f} MiB reads ({reader.method}), {rounds} rounds x {reads} per case, load {os.getloadavg()[0]:.1f}")
    for c in cases:
        what = c[1] if not c[0] else f"{c[0]:g} ms {c[1]}"
        extra = float(np.median(by_round[c] - by_round[cases[0]])) * 1e6
        print(f"  {what:16s} median {np.median(times[c]) * 1e3:.3f} ms, extra {extra:+.0f} us")


if __name__ == "__main__":
    main()
