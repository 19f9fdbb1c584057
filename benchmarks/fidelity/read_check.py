"""Why are expert reads slower in a real replay than in the profile? A diagnostic, not a profile.

    python benchmarks/fidelity/read_check.py reports/fidelity/work-olmoe/experts-*.bin --bytes 3145728

Times page-cache-bypassing reads of one expert (`--bytes`, at random expert-aligned offsets, seeded)
from (a) a fresh file as `moesim profile` writes one (128 MiB, read right after it is written) and
(b) the replay's own expert file, each back to back and with `--gap-ms` of idle before every read
(as a demand load that follows a layer's compute), in interleaved rounds so that a change in the
machine's speed hits every case. Prints the median and p10-p90 (ms) of each case.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from moesim.real.kernels import padded
from moesim.real.store import aligned_buffer, open_reader, write_random_file

MiB = 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("file", help="the replay's expert file (kept with --keep-files)")
    ap.add_argument("--bytes", type=int, required=True, help="one expert's bytes")
    ap.add_argument("--gap-ms", type=float, default=5.0, help="idle before each read in the gapped cases")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--reads", type=int, default=40, help="reads per case per round")
    ap.add_argument("--io", default="auto")
    args = ap.parse_args()
    eb = padded(args.bytes)
    rng = np.random.default_rng(11)
    big = Path(args.file)
    fd, tmp = tempfile.mkstemp(prefix=".moesim-read-check-", suffix=".bin", dir=big.parent)
    os.close(fd)
    fresh = Path(tmp)
    try:
        rnd = rng.integers(0, 256, 4 * MiB, dtype=np.uint8)
        write_random_file(fresh, 32, 4 * MiB, lambda i: rnd)
        readers = {"fresh 128 MiB file": open_reader(fresh, args.io), "replay's expert file": open_reader(big, args.io)}
        sizes = {"fresh 128 MiB file": 128 * MiB, "replay's expert file": big.stat().st_size}
        buf = aligned_buffer(eb)
        times = {(f, g): [] for f in readers for g in (0.0, args.gap_ms)}
        for _ in range(args.rounds):
            for f, g in [k for k in times]:
                offs = rng.integers(0, sizes[f] // eb, args.reads) * eb
                for off in offs.tolist():
                    if g:
                        time.sleep(g * 1e-3)
                    t = time.perf_counter()
                    readers[f].read(buf, off, eb)
                    times[(f, g)].append(time.perf_counter() - t)
        method = readers["fresh 128 MiB file"].method
        for r in readers.values():
            r.close()
    finally:
        fresh.unlink(missing_ok=True)
    print(f"{eb / MiB:.2f} MiB reads ({method}), {args.rounds} rounds x {args.reads} per case, load "
          f"{os.getloadavg()[0]:.1f}")
    for (f, g), xs in times.items():
        ms = np.asarray(xs) * 1e3
        what = "back to back" if not g else f"{g:g} ms idle before each"
        print(f"  {f:22s} {what:24s} median {np.median(ms):.3g} ms (p10-p90 {np.percentile(ms, 10):.3g}-"
              f"{np.percentile(ms, 90):.3g}, n={len(ms)})")


if __name__ == "__main__":
    main()
