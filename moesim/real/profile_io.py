"""The disk and link measurements of `moesim profile`: page-cache-bypassing reads by size, and
the copies that move an expert to the compute device (host-to-device on CUDA, host memcpy on a
CPU), each with a latency + bandwidth fit anchored at one expert's size."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from .kernels import padded
from .profile_tables import GiB, KiB, MiB, Profiler
from .store import aligned_buffer, cached_fraction, open_reader, write_random_file


def _fit_latency_bw(sizes: list[int], secs: list[float]) -> tuple[float, float]:
    """Least squares of t = a + B/b in relative error; returns (latency_us, bandwidth_gbps)."""
    x = np.asarray(sizes, dtype=float)
    y = np.asarray(secs, dtype=float)
    w = 1.0 / y
    A = np.stack([np.ones_like(x), x], axis=1) * w[:, None]
    (a, slope), *_ = np.linalg.lstsq(A, y * w, rcond=None)
    if slope <= 0:
        slope = y[-1] / x[-1]
    a = max(0.0, a)
    return a * 1e6, 1.0 / slope / 1e9


def _anchor(lat_us: float, size: int, secs: float, fallback_gbps: float) -> float:
    """Bandwidth that makes latency + size/bandwidth equal the measured `secs` for `size` bytes (the
    simulator moves only expert-sized blocks, so its two-number model is made exact there)."""
    rest = secs - lat_us * 1e-6
    return size / rest / 1e9 if rest > 0 else fallback_gbps


def _block_device_name(path: Path) -> str:
    """The model name of the block device holding `path` (best effort, Linux)."""
    try:
        st = os.stat(path)
        dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
        sys_dev = Path("/sys/dev/block") / dev
        real = sys_dev.resolve()
        cands = [real, real.parent]
        for c in cands:
            for f in ("device/model", "device/name"):
                p = c / f
                if p.is_file():
                    model = p.read_text().strip()
                    if model:
                        return f"{model} ({c.name})"
        for c in cands:
            if (c / "device").exists() or c.name.startswith(("vd", "sd", "nvme", "xvd")):
                virt = "virtio " if c.name.startswith("vd") else ""
                return f"{virt}block device {c.name}"
        return f"block device {real.name}"
    except (OSError, ValueError):
        return "unknown block device"


def _fs_type(path: Path) -> str:
    try:
        best, fs = "", "unknown"
        p = str(Path(path).resolve())
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and p.startswith(parts[1]) and len(parts[1]) > len(best):
                    best, fs = parts[1], parts[2]
        return fs
    except OSError:
        return "unknown"


def measure_disk(p: Profiler, directory: Path, expert_bytes: int, io: str) -> dict:
    """Reads of 64 KiB ... 64 MiB blocks and of one expert at random offsets of a fresh file in
    `directory`, the page cache bypassed (`io`), verified; a latency + bandwidth model anchored at
    one expert's read."""
    sizes = [64 * KiB, 256 * KiB, MiB, 4 * MiB, 16 * MiB] + ([] if p.quick else [64 * MiB])
    eb = padded(expert_bytes)
    if eb not in sizes and eb <= 256 * MiB:
        sizes.append(eb)
    sizes.sort()
    file_bytes = max(128 * MiB if p.quick else GiB, 8 * sizes[-1], 4 * eb)
    file_bytes = -(-file_bytes // (4 * MiB)) * (4 * MiB)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".moesim-disk-", suffix=".bin", dir=directory)
    os.close(fd)
    path = Path(tmp)
    try:
        t = time.perf_counter()
        rnd = np.random.default_rng(0).integers(0, 256, 4 * MiB, dtype=np.uint8)
        write_random_file(path, file_bytes // (4 * MiB), 4 * MiB, lambda i: rnd)
        write_s = time.perf_counter() - t
        reader = open_reader(path, io)
        buf = aligned_buffer(sizes[-1])
        res, expert_alone = _read_points(p, reader, buf, sizes, file_bytes, eb)
        idle = measure_idle_reads(reader, file_bytes, eb, IDLE_GAPS_MS, 10 if p.quick else 16, 15 if p.quick else 25)
        probe = min(eb, sizes[-1])
        ver = _verify_bypass(path, buf, file_bytes, probe)
        reader.close()
    finally:
        path.unlink(missing_ok=True)
    med = [res[s].median for s in sizes]
    lat_us, bw = _fit_latency_bw(sizes, med)
    bypass_s = res[probe].median
    model_bw = _anchor(lat_us, eb, expert_alone.median, bw)
    frac, cached_s = ver["page_cache_fraction_after_bypassed_reads"], ver.pop("cached_s")
    ver.update(probe_bytes=probe, bypassed_read_ms=bypass_s * 1e3, cached_read_ms=cached_s * 1e3,
               bypass_works=bool((frac is None or frac < 0.01) and bypass_s > 2 * cached_s))
    return {"method": reader.method, "dir": str(directory), "filesystem": _fs_type(directory),
            "device": _block_device_name(directory), "file_bytes": file_bytes, "write_s": write_s,
            "reads": [{"bytes": s, **res[s].as_dict()} for s in sizes],
            "fit": {"latency_us": lat_us, "bandwidth_gbps": bw},
            "model": {"latency_us": lat_us, "bandwidth_gbps": model_bw, "anchored_at_bytes": eb},
            "verification": ver,
            "expert_read": {"bytes": eb, "alone": True, **expert_alone.as_dict()},
            "expert_read_in_sweep": {"bytes": probe, **res[probe].as_dict()},
            "idle_reads": idle}


IDLE_GAPS_MS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0)


def measure_idle_reads(reader, file_bytes: int, eb: int, gaps_ms, rounds: int, reads: int, seed: int = 2) -> dict:
    """Expert-sized reads right after another ("back to back") and after each idle gap in `gaps_ms`
    (the disk left idle that long before each read, as a decode layer's first read follows its
    attention), in `rounds` interleaved rounds of `reads` per case so that drift hits every case.
    Returns each case's median, p10, p90 (ms) and n, and each gap's extra over back to back (us)."""
    rng = np.random.default_rng(seed)
    buf = aligned_buffer(eb)
    cases = (0.0, *gaps_ms)
    times: dict[float, list[float]] = {g: [] for g in cases}
    n_exp = file_bytes // eb
    for _ in range(rounds):
        for g in cases:
            reader.read(buf, int(rng.integers(0, n_exp)) * eb, eb)  # the case's first read: not timed
            for off in (rng.integers(0, n_exp, reads) * eb).tolist():
                if g:
                    time.sleep(g * 1e-3)
                t = time.perf_counter()
                reader.read(buf, off, eb)
                times[g].append(time.perf_counter() - t)
    stats = {g: {"median": float(np.median(x)) * 1e3, "p10": float(np.percentile(x, 10)) * 1e3,
                 "p90": float(np.percentile(x, 90)) * 1e3, "n": len(x)} for g, x in times.items()}
    by_round = {g: np.median(np.reshape(x, (rounds, reads)), axis=1) for g, x in times.items()}
    return {"bytes": eb, "rounds": rounds, "reads_per_round": reads, "back_to_back": stats[0.0],
            "gaps": [{"idle_ms": g, **stats[g],
                      # each round's median over back to back's in the same round, the median over rounds
                      "extra_us": float(np.median(by_round[g] - by_round[0.0])) * 1e6,
                      "extra_us_rounds": [float(x) * 1e6 for x in by_round[g] - by_round[0.0]]}
                     for g in gaps_ms]}


def _read_points(p: Profiler, reader, buf, sizes: list[int], file_bytes: int, eb: int):
    """Timed reads of each size at random aligned offsets (round robin), and expert-sized reads on
    their own."""
    rng = np.random.default_rng(1)
    calls = {}
    for sz in sizes:
        n_blocks = file_bytes // sz
        offs = iter((rng.integers(0, n_blocks, 10 ** 4) * sz).tolist())
        calls[sz] = lambda offs=offs, sz=sz: reader.read(buf, next(offs), sz)
    res = p.bench_points(calls, budget_factor=2.0)
    # expert-sized reads on their own, back to back at random expert-aligned offsets, as the
    # replay reads them: what the profile's disk model is anchored at (in the sweep above a
    # read can queue behind the device's work on a neighbouring large read)
    n_exp = file_bytes // eb
    eoffs = iter((rng.integers(0, n_exp, 10 ** 4) * eb).tolist())
    ebuf = aligned_buffer(eb)
    expert_alone = p.bench(lambda: reader.read(ebuf, next(eoffs), eb), warmup=2,
                           budget=p.budget * 4, repeats=p.repeats * 2)
    return res, expert_alone


def _verify_bypass(path: Path, buf, file_bytes: int, probe: int) -> dict:
    """Is the file in the page cache after the bypassed reads (mincore), and how fast is a read of
    `probe` bytes that the page cache serves? (`cached_s`: that read's seconds.)"""
    frac = cached_fraction(path, 0, file_bytes)
    with open(path, "rb", buffering=0) as f:
        f.readinto(memoryview(buf)[:probe])        # now cached
        t = time.perf_counter()
        f.seek(0)
        f.readinto(memoryview(buf)[:probe])
        cached_s = time.perf_counter() - t
    return {"page_cache_fraction_after_bypassed_reads": frac,
            "page_cache_fraction_after_one_buffered_read": cached_fraction(path, 0, probe),
            "cached_s": cached_s}


def measure_link_cpu(p: Profiler, expert_bytes: int) -> dict:
    """Host memcpy (np.copyto) by size: what moves an expert into the CPU's RAM expert cache."""
    sizes = [64 * KiB, 256 * KiB, MiB, 4 * MiB, 16 * MiB, 64 * MiB] + ([] if p.quick else [256 * MiB])
    eb = padded(expert_bytes)
    if eb not in sizes and eb <= sizes[-1]:
        sizes.append(eb)
    sizes.sort()
    # the source walks through a 256 MiB pool (more than the caches hold), so that it comes
    # from memory, as an expert just read from the disk or held in a host buffer does
    pool_bytes = max(256 * MiB, sizes[-1])
    pool = aligned_buffer(pool_bytes)
    dst = aligned_buffer(sizes[-1])
    pos = {sz: iter(range(10 ** 12)) for sz in sizes}

    def call(sz):
        n = pool_bytes // sz
        off = (next(pos[sz]) % n) * sz
        np.copyto(dst[:sz], pool[off: off + sz])
    calls = {sz: (lambda sz=sz: call(sz)) for sz in sizes}
    res = p.bench_points(calls)
    med = [res[s].median for s in sizes]
    lat_us, bw = _fit_latency_bw(sizes, med)
    return {"kind": "host memcpy (np.copyto), source walking through a 256 MiB buffer",
            "copies": [{"bytes": s, **res[s].as_dict()} for s in sizes],
            "fit": {"latency_us": lat_us, "bandwidth_gbps": bw},
            "model": {"latency_us": lat_us, "bandwidth_gbps": _anchor(lat_us, eb, res[eb].median, bw),
                      "anchored_at_bytes": eb},
            "expert_copy": {"bytes": eb, **res[eb].as_dict()} if eb in res else None}


def measure_link_cuda(p: Profiler, expert_bytes: int) -> dict:
    """Host-to-device copies by size, pinned and pageable, on 1 and 2 CUDA streams."""
    torch = p.torch
    top = 64 * MiB if p.quick else GiB
    sizes = []
    s = 64 * KiB
    while s <= top:
        sizes.append(s)
        s *= 4
    eb = padded(expert_bytes)
    if eb not in sizes and eb <= top:
        sizes.append(eb)
    sizes.sort()
    streams = [torch.cuda.Stream(device=p.device) for _ in range(2)]
    rows = []
    fits = {}
    for pinned in (True, False):
        for n_streams in (1, 2):
            meds = []
            for sz in sizes:
                srcs = [torch.empty(sz, dtype=torch.uint8, pin_memory=pinned) for _ in range(n_streams)]
                dsts = [torch.empty(sz, dtype=torch.uint8, device=p.device) for _ in range(n_streams)]

                def go(srcs=srcs, dsts=dsts, n_streams=n_streams):
                    for st, a, b in zip(streams, srcs, dsts, strict=False):
                        with torch.cuda.stream(st):
                            b.copy_(a, non_blocking=True)
                    for st in streams[:n_streams]:
                        st.synchronize()
                stt = p.bench(go)
                meds.append(stt.median)
                rows.append({"pinned": pinned, "streams": n_streams, "bytes": sz,
                             "gbps": n_streams * sz / stt.median / 1e9, **stt.as_dict()})
                del srcs, dsts
            lat, bw = _fit_latency_bw([n_streams * s for s in sizes], meds)
            fits[f"{'pinned' if pinned else 'pageable'}_{n_streams}stream"] = {"latency_us": lat,
                                                                               "bandwidth_gbps": bw}
    lat = fits["pinned_1stream"]["latency_us"]
    at = [r for r in rows if r["pinned"] and r["streams"] == 1 and r["bytes"] == eb]
    model_bw = (_anchor(lat, eb, at[0]["median"] * 1e-3, fits["pinned_1stream"]["bandwidth_gbps"]) if at
                else fits["pinned_1stream"]["bandwidth_gbps"])
    return {"kind": "host-to-device copy_ (non_blocking) on dedicated CUDA streams", "copies": rows,
            "fits": fits, "fit": fits["pinned_1stream"],
            "model": {"latency_us": lat, "bandwidth_gbps": model_bw, "anchored_at_bytes": eb}}
