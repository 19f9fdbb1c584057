"""`moesim profile`: measure this machine into a hardware profile with `measured` tables.

What is measured (medians over repeated calls after warm-up; spread = p10..p90):

* expert FFN time by tokens per expert (log-spaced, 1 … 4096) for the chosen model's expert shape and
  dtype, with the exact code the real executor runs (gather the routed rows, SwiGLU/ReLU MLP,
  weighted scatter-add), cycling through a pool of distinct experts larger than the caches so the
  weights come from memory, as a just-loaded or cached expert's do;
* attention block time by new tokens (norm, QKV, SDPA, O, residual, norm): up to 16 tokens a
  decode step of that many sequences at `--context` cached positions each, above one causal
  sequence of that many tokens (a prefill); and, for the record, a decode grid (batch × context);
  distinct attention blocks are cycled, as a model's layers are, so weights come from memory;
* large-GEMM throughput, GEMV weight-streaming bandwidth and per-op overhead (the roofline numbers
  the simulator uses for what the tables do not cover: LM head, shared experts, dense blocks);
* disk reads of 64 KiB … 64 MiB blocks (and one expert's size) with the page cache bypassed
  (O_DIRECT, else posix_fadvise DONTNEED), verified with mincore and against a cached read;
  the profile's latency is a least-squares intercept over all sizes and its bandwidth is chosen so
  that latency + expert_bytes / bandwidth equals the measured read of one expert (the simulator
  only ever moves experts, and the two-number model does not fit every size of this device);
* the link: on CUDA, pinned and pageable host-to-device copies of 64 KiB … 1 GiB with 1 and 2
  concurrent streams; on a CPU-only machine, host memcpy (np.copyto, what the real executor uses
  to move an expert from a host buffer into the RAM expert cache).

The YAML validates against moesim.hardware.profile; everything else (every point with its
spread, fits, verification, versions) goes to NAME.measurements.json beside it.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from ..models import ModelSpec
from ..hardware.profile import profile_from_dict

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
DECODE_SHAPE_MAX = 16  # attention table: up to this many tokens, a decode step of that many sequences


def _sig(x: float, n: int = 4) -> float:
    if x == 0 or not math.isfinite(x):
        return float(x)
    return float(f"{x:.{n}g}")


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


@dataclass
class ProfileResult:
    profile: dict
    measurements: dict
    path: Path
    sidecar: Path
    lines: list[str] = field(default_factory=list)

    def summary_text(self) -> str:
        return "\n".join(self.lines)


class Profiler:
    def __init__(self, model: ModelSpec, device: str, dtype: str, threads: int | None, quick: bool, log):
        from .torchutil import (
            default_threads,
            pick_device,
            require_torch,
            set_threads,
            synchronizer,
            torch_dtype,
        )

        self.torch = require_torch()
        self.device = pick_device(device)
        self.cuda = self.device.startswith("cuda")
        self.threads = set_threads(threads or default_threads(self.device))
        self.dtype_name, self.dtype = dtype, torch_dtype(dtype)
        self.model, self.quick, self.log = model, quick, log
        self.sync = synchronizer(self.device)
        self.budget = 0.25 if quick else 1.5
        self.repeats = 15 if quick else 60
        self.min_repeats = 3 if quick else 5

    def bench(self, fn, setup=None, budget=None, repeats=None, warmup=2):
        from .torchutil import bench

        return bench(fn, sync=self.sync, warmup=warmup, repeats=repeats or self.repeats,
                     budget_s=budget if budget is not None else self.budget, min_repeats=self.min_repeats,
                     setup=setup)

    def bench_points(self, calls: dict, budget_factor: float = 1.0, warmup: int = 1) -> dict:
        """Round-robin timing of a table's points (see torchutil.bench_round_robin)."""
        from .torchutil import bench_round_robin

        return bench_round_robin(calls, sync=self.sync, warmup=warmup, min_repeats=self.min_repeats,
                                 max_repeats=self.repeats, budget_s=self.budget * len(calls) * budget_factor,
                                 point_budget_s=self.budget * budget_factor)

    # ---- compute -------------------------------------------------------------------------------
    def _expert_pool(self, shapes, pool_bytes: int):
        torch = self.torch
        from .kernels import expert_views, random_weight

        n = max(2, min(64, math.ceil(pool_bytes / shapes.slot_bytes)))
        gen = torch.Generator().manual_seed(0)
        base = []
        for _ in range(min(n, 4)):
            parts = [random_weight((shapes.I, shapes.H), self.dtype, "cpu", gen) for _ in range(shapes.mats - 1)]
            parts.append(random_weight((shapes.H, shapes.I), self.dtype, "cpu", gen))
            base.append(torch.cat([p.reshape(-1) for p in parts]).view(torch.uint8))
        flats = []
        for i in range(n):
            f = torch.zeros(shapes.slot_bytes, dtype=torch.uint8, device=self.device)
            f[: base[0].numel()].copy_(base[i % len(base)])
            flats.append(f)
        return [expert_views(f, shapes, self.dtype) for f in flats]

    def expert_table(self, tokens: list[int]) -> dict:
        torch = self.torch
        from .kernels import Shapes, expert_forward

        s = Shapes(self.model, self.dtype_name)
        pool = self._expert_pool(s, (512 if not self.quick else 256) * MiB)
        self.log(f"  expert FFN {s.H}x{s.I}{' gated' if s.gated else ''} {self.dtype_name}, "
                 f"{len(pool)} distinct experts cycled ({len(pool) * s.slot_bytes / MiB:.0f} MiB)")
        calls = {}
        it = iter(range(10 ** 12))
        for t in tokens:
            h = torch.randn(t, s.H, dtype=self.dtype, device=self.device)
            x = torch.zeros(t, s.H, dtype=self.dtype, device=self.device)
            idx = torch.arange(t, device=self.device)

            def call(h=h, x=x, idx=idx):
                expert_forward(h, idx, pool[next(it) % len(pool)], x, 0.125)
            calls[t] = call
        return self.bench_points(calls, warmup=2)

    def attention_table(self, tokens: list[int], context: int) -> dict:
        """Up to DECODE_SHAPE_MAX tokens: a decode step of that many sequences, one new token each
        with `context` cached positions; above: a prefill of one causal sequence of that many tokens.
        (The simulator's table is indexed by new tokens only; DESIGN's cost model has no context
        axis once a table is given.)"""
        torch = self.torch
        from .kernels import KVCache, Shapes, StepGeometry, attention_segment

        s = Shapes(self.model, self.dtype_name)
        pool = self._attention_pool(s, 1)
        it = iter(range(10 ** 12))
        calls = {}
        for t in tokens:
            if t <= DECODE_SHAPE_MAX:
                # room for a sequence to grow, as the replay's per-batch cache has (so the keys
                # attended over are a strided slice of a longer buffer, as there)
                cache = KVCache(t, 2 * context + 1, s, self.dtype, self.device)
                g = StepGeometry(np.arange(t), np.full(t, context), np.full(t, context + 1), self.device, False)
            else:
                cache = KVCache(1, t, s, self.dtype, self.device)
                g = StepGeometry(np.zeros(t, np.int64), np.arange(t), np.array([t]), self.device, True)
            x = torch.randn(t, s.H, dtype=self.dtype, device=self.device)
            calls[t] = lambda x=x, cache=cache, g=g: attention_segment(x, pool[next(it) % len(pool)], cache, g)
        return self.bench_points(calls, warmup=2)

    def _attention_pool(self, s, seed: int) -> list:
        """Distinct attention blocks, more than the caches hold, cycled as a model's layers are."""
        from .kernels import Attention

        gen = self.torch.Generator().manual_seed(seed)
        one = (s.nh + 2 * s.kvh) * s.hd * s.H + s.H * s.nh * s.hd
        n = max(2, min(16, math.ceil((128 * MiB) / (one * s.esize))))
        return [Attention(s, self.dtype, self.device, gen) for _ in range(n)]

    def attention_decode_grid(self, batches: list[int], contexts: list[int]) -> list[dict]:
        torch = self.torch
        from .kernels import KVCache, Shapes, StepGeometry, attention_segment

        s = Shapes(self.model, self.dtype_name)
        pool = self._attention_pool(s, 2)
        it = iter(range(10 ** 12))
        calls = {}
        for b in batches:
            for c in contexts:
                cache = KVCache(b, 2 * c + 1, s, self.dtype, self.device)
                g = StepGeometry(np.arange(b), np.full(b, c), np.full(b, c + 1), self.device, False)
                x = torch.randn(b, s.H, dtype=self.dtype, device=self.device)
                calls[(b, c)] = lambda x=x, cache=cache, g=g: attention_segment(x, pool[next(it) % len(pool)],
                                                                                  cache, g)
        res = self.bench_points(calls, budget_factor=0.5)
        return [{"batch": b, "context": c, **res[(b, c)].as_dict()} for (b, c) in calls]

    def roofline_numbers(self) -> dict:
        torch = self.torch
        dt, dev = self.dtype, self.device
        n = (4096 if self.cuda else 2048) if self.quick else (8192 if self.cuda else 4096)
        a = torch.randn(n, n, dtype=dt, device=dev)
        b = torch.randn(n, n, dtype=dt, device=dev)
        st_mm = self.bench(lambda: a @ b, warmup=1, repeats=10)
        tflops = 2 * n ** 3 / st_mm.median / 1e12
        # GEMV over a weight matrix larger than the caches: effective weight-streaming bandwidth
        # (F.linear with a (out, in) weight, as the LM head and every projection are applied)
        cols = (256 if self.quick else 1024) * MiB // (self.model.hidden_size * dt.itemsize)
        W = torch.randn(cols, self.model.hidden_size, dtype=dt, device=dev)
        v = torch.randn(1, self.model.hidden_size, dtype=dt, device=dev)
        st_mv = self.bench(lambda: torch.nn.functional.linear(v, W), warmup=1)
        gbps = W.numel() * W.element_size() / st_mv.median / 1e9
        z = torch.zeros(16, dtype=dt, device=dev)
        if self.cuda:
            k = 200

            def many():
                for _ in range(k):
                    z.add_(1)
            st_l = self.bench(many)
            launch_us = st_l.median / k * 1e6
        else:
            k = 1000

            def many():
                for _ in range(k):
                    z.add_(1)
            st_l = self.bench(many)
            launch_us = st_l.median / k * 1e6
        return {"gemm": {"size": n, "tflops": tflops, **st_mm.as_dict()},
                "gemv": {"bytes": W.numel() * dt.itemsize, "gbps": gbps, **st_mv.as_dict()},
                "op_overhead": {"us": launch_us, "ops_per_sample": k, **st_l.as_dict()}}

    # ---- disk ----------------------------------------------------------------------------------
    def disk(self, directory: Path, expert_bytes: int, io: str) -> dict:
        from .kernels import padded
        from .store import (
            aligned_buffer,
            cached_fraction,
            open_reader,
            write_random_file,
        )

        sizes = [64 * KiB, 256 * KiB, MiB, 4 * MiB, 16 * MiB] + ([] if self.quick else [64 * MiB])
        eb = padded(expert_bytes)
        if eb not in sizes and eb <= 256 * MiB:
            sizes.append(eb)
        sizes.sort()
        file_bytes = max(128 * MiB if self.quick else GiB, 8 * sizes[-1], 4 * eb)
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
            rng = np.random.default_rng(1)
            calls = {}
            for sz in sizes:
                n_blocks = file_bytes // sz
                offs = iter((rng.integers(0, n_blocks, 10 ** 4) * sz).tolist())
                calls[sz] = lambda offs=offs, sz=sz: reader.read(buf, next(offs), sz)
            res = self.bench_points(calls, budget_factor=2.0)
            # expert-sized reads on their own, back to back at random expert-aligned offsets, as the
            # replay reads them: what the profile's disk model is anchored at (in the sweep above a
            # read can queue behind the device's work on a neighbouring large read)
            n_exp = file_bytes // eb
            eoffs = iter((rng.integers(0, n_exp, 10 ** 4) * eb).tolist())
            ebuf = aligned_buffer(eb)
            expert_alone = self.bench(lambda: reader.read(ebuf, next(eoffs), eb), warmup=2,
                                      budget=self.budget * 4, repeats=self.repeats * 2)
            # verification: is the file in the page cache after all these reads, and how fast is
            # a read that is served from the page cache?
            frac = cached_fraction(path, 0, file_bytes)
            probe = min(eb, sizes[-1])
            with open(path, "rb", buffering=0) as f:
                f.readinto(memoryview(buf)[:probe])        # now cached
                t = time.perf_counter()
                f.seek(0)
                f.readinto(memoryview(buf)[:probe])
                cached_s = time.perf_counter() - t
            frac_after_buffered = cached_fraction(path, 0, probe)
            reader.close()
        finally:
            path.unlink(missing_ok=True)
        med = [res[s].median for s in sizes]
        lat_us, bw = _fit_latency_bw(sizes, med)
        bypass_s = res[probe].median
        model_bw = _anchor(lat_us, eb, expert_alone.median, bw)
        return {"method": reader.method, "dir": str(directory), "filesystem": _fs_type(directory),
                "device": _block_device_name(directory), "file_bytes": file_bytes, "write_s": write_s,
                "reads": [{"bytes": s, **res[s].as_dict()} for s in sizes],
                "fit": {"latency_us": lat_us, "bandwidth_gbps": bw},
                "model": {"latency_us": lat_us, "bandwidth_gbps": model_bw, "anchored_at_bytes": eb},
                "verification": {
                    "page_cache_fraction_after_bypassed_reads": frac,
                    "page_cache_fraction_after_one_buffered_read": frac_after_buffered,
                    "probe_bytes": probe, "bypassed_read_ms": bypass_s * 1e3, "cached_read_ms": cached_s * 1e3,
                    "bypass_works": bool((frac is None or frac < 0.01) and bypass_s > 2 * cached_s)},
                "expert_read": {"bytes": eb, "alone": True, **expert_alone.as_dict()},
                "expert_read_in_sweep": {"bytes": probe, **res[probe].as_dict()}}

    # ---- the link --------------------------------------------------------------------------------
    def link_cpu(self, expert_bytes: int) -> dict:
        from .kernels import padded
        from .store import aligned_buffer

        sizes = [64 * KiB, 256 * KiB, MiB, 4 * MiB, 16 * MiB, 64 * MiB] + ([] if self.quick else [256 * MiB])
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
        res = self.bench_points(calls)
        med = [res[s].median for s in sizes]
        lat_us, bw = _fit_latency_bw(sizes, med)
        return {"kind": "host memcpy (np.copyto), source walking through a 256 MiB buffer",
                "copies": [{"bytes": s, **res[s].as_dict()} for s in sizes],
                "fit": {"latency_us": lat_us, "bandwidth_gbps": bw},
                "model": {"latency_us": lat_us, "bandwidth_gbps": _anchor(lat_us, eb, res[eb].median, bw),
                          "anchored_at_bytes": eb},
                "expert_copy": {"bytes": eb, **res[eb].as_dict()} if eb in res else None}

    def link_cuda(self, expert_bytes: int) -> dict:
        torch = self.torch
        from .kernels import padded

        top = 64 * MiB if self.quick else GiB
        sizes = []
        s = 64 * KiB
        while s <= top:
            sizes.append(s)
            s *= 4
        eb = padded(expert_bytes)
        if eb not in sizes and eb <= top:
            sizes.append(eb)
        sizes.sort()
        streams = [torch.cuda.Stream(device=self.device) for _ in range(2)]
        rows = []
        fits = {}
        for pinned in (True, False):
            for n_streams in (1, 2):
                meds = []
                for sz in sizes:
                    srcs = [torch.empty(sz, dtype=torch.uint8, pin_memory=pinned) for _ in range(n_streams)]
                    dsts = [torch.empty(sz, dtype=torch.uint8, device=self.device) for _ in range(n_streams)]

                    def go(srcs=srcs, dsts=dsts, n_streams=n_streams):
                        for st, a, b in zip(streams, srcs, dsts, strict=False):
                            with torch.cuda.stream(st):
                                b.copy_(a, non_blocking=True)
                        for st in streams[:n_streams]:
                            st.synchronize()
                    stt = self.bench(go)
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


def _token_points(quick: bool, top: int = 4096) -> list[int]:
    if quick:
        pts = [1, 4, 16, 64, 256, 1024, 4096]
    else:
        pts = [2 ** i for i in range(13)]
    return [p for p in pts if p <= top]


def run_profile(spec: ModelSpec, out: Path, *, scale: float = 1.0, device: str = "auto", dtype: str = "bfloat16",
                threads: int | None = None, quick: bool = False, disk_dir=None, io: str = "auto",
                name: str | None = None, context: int = 128, log=lambda m: None) -> ProfileResult:
    """Measure, write `out` (YAML) and `out` with .measurements.json, return both."""
    from .scale import scaled_model
    from .torchutil import DTYPES, device_description, host_memory_bytes

    t_start = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    model = scaled_model(spec, scale, None, float(DTYPES[dtype]))
    p = Profiler(model, device, dtype, threads, quick, log)
    torch = p.torch
    desc = device_description(p.device)
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    dev_words = (f"{desc['gpu']} (CUDA {desc.get('cuda')}, driver {desc.get('driver')})" if p.cuda
                 else f"CPU {desc['host_cpu']}, {p.threads} of {desc['host_cores']} cores computing")
    versions = f"torch {desc['torch']}, numpy {desc['numpy']}, Python {desc['python']}, {desc['os']}"
    by = f"measured by moesim profile {when} on {dev_words} ({versions})"
    log(f"profiling {dev_words}, {model.name}, {dtype}, {p.threads} torch threads{' (quick)' if quick else ''}")

    with torch.inference_mode():
        log("expert FFN table ...")
        tok = _token_points(quick)
        exp = p.expert_table(tok)
        log("attention table ...")
        atok = _token_points(quick, 1024 if quick else 2048)
        att = p.attention_table(atok, context)
        grid = p.attention_decode_grid([1, 8] if quick else [1, 8, 32], [128, 512] if quick else [128, 512, 2048])
        log("GEMM / GEMV / per-op overhead ...")
        roof = p.roofline_numbers()
    from .runtime_profiler import measure_runtime, runtime_doc

    rt_meas = measure_runtime(p, grid, log)
    log("disk reads ...")
    ddir = Path(disk_dir) if disk_dir else (out.parent if str(out.parent) else Path("."))
    disk = p.disk(ddir, model.expert_bytes, io)
    log("link ...")
    link = p.link_cuda(model.expert_bytes) if p.cuda else p.link_cpu(model.expert_bytes)

    gpu_mem = desc["gpu_memory_bytes"] if p.cuda else host_memory_bytes()
    gpu_name = (desc["gpu"] if p.cuda else
                f"CPU as the compute device: {desc['host_cpu']} ({p.threads} torch threads)")
    gm, gv, go = roof["gemm"], roof["gemv"], roof["op_overhead"]
    fit_d, fit_l = disk["model"], link["model"]
    ver = disk["verification"]
    method_words = {"odirect": "O_DIRECT reads into page-aligned buffers",
                    "fadvise": "buffered reads with posix_fadvise(DONTNEED) before each",
                    "buffered": "buffered reads (page cache NOT bypassed)"}[disk["method"]]
    reads = ", ".join(f"{r['bytes'] // KiB} KiB {r['median']:.3g} ms" for r in disk["reads"])
    copies = link.get("copies", [])
    copy_words = ", ".join(f"{c['bytes'] // KiB} KiB {c['median']:.3g} ms" for c in copies
                           if c.get("pinned", True) and c.get("streams", 1) == 1)
    prof = {
        "name": name or out.stem,
        "description": (f"Measured by moesim profile on this machine ({when}). Compute device: "
                        + (f"{desc['gpu']}." if p.cuda else
                           f"the CPU ({desc['host_cpu']}, {p.threads} torch threads, {dtype}); the 'gpu' section "
                           "describes the CPU computing from RAM, 'pcie_h2d' the host memcpy that moves an expert "
                           "into the RAM expert cache, 'disk' page-cache-bypassing reads of the expert file.")
                        + f" Tables for model {model.name} in {dtype}. {versions}."),
        "gpu": {
            "name": gpu_name,
            "memory_gb": _sig(gpu_mem / 1e9),
            "hbm_bandwidth_gbps": _sig(gv["gbps"]),
            "peak_bf16_tflops": _sig(gm["tflops"]),
            "kernel_launch_us": _sig(go["us"]),
            "source": {
                "memory_gb": f"{by}: " + ("torch.cuda.get_device_properties().total_memory" if p.cuda else
                                          "MemTotal of /proc/meminfo (host RAM: the CPU's expert cache lives there)"),
                "hbm_bandwidth_gbps": f"{by}: effective weight-streaming bandwidth of a 1-token GEMV over a "
                                      f"{gv['bytes'] / MiB:.0f} MiB {dtype} matrix, {spread_d(gv)}",
                "peak_bf16_tflops": f"{by}: {gm['size']}^3 GEMM in {dtype} (not necessarily bf16: see dtype), "
                                    f"{spread_d(gm)}",
                "kernel_launch_us": f"{by}: per-op cost of back-to-back tiny in-place adds "
                                    f"({go['ops_per_sample']} per sample), {spread_d(go)}",
            },
        },
        "pcie_h2d": {
            "bandwidth_gbps": _sig(fit_l["bandwidth_gbps"]),
            "latency_us": _sig(max(fit_l["latency_us"], 0.0)),
            "copy_engines": 1,
            "source": {
                "bandwidth_gbps": f"{by}: {link['kind']}; medians {copy_words}"
                                  + (" (pinned, 1 stream; pageable and 2-stream in the .measurements.json)"
                                     if p.cuda else "")
                                  + f"; latency from a least-squares fit t = latency + bytes/bandwidth over all sizes "
                                    f"(which gives {link['fit']['bandwidth_gbps']:.3g} GB/s), bandwidth chosen so "
                                    f"that latency + bytes/bandwidth equals the measured median for one expert "
                                    f"({fit_l['anchored_at_bytes']} bytes)",
                "latency_us": f"{by}: intercept of the least-squares fit",
                "copy_engines": "moesim replay --real moves experts with one copy thread (CPU) / one copy "
                                "stream (CUDA); the fit is for one copy at a time",
            },
        },
        "disk": {
            "name": f"{disk['device']}, {disk['filesystem']}",
            "read_bandwidth_gbps": _sig(fit_d["bandwidth_gbps"]),
            "latency_us": _sig(max(fit_d["latency_us"], 0.0)),
            "queue_depth": 1,
            "source": {
                "read_bandwidth_gbps": f"{by}: {method_words} at random aligned offsets of a "
                                       f"{disk['file_bytes'] // MiB} MiB file in {disk['dir']}, medians {reads}; "
                                       f"latency from a least-squares fit over all sizes (which gives "
                                       f"{disk['fit']['bandwidth_gbps']:.3g} GB/s), bandwidth chosen so that latency + "
                                       f"bytes/bandwidth equals the median of "
                                       f"{disk['expert_read']['n']} expert-sized reads ({fit_d['anchored_at_bytes']} bytes, "
                                       f"back to back at random offsets: {disk['expert_read']['median']:.3g} ms, p10-p90 "
                                       f"{disk['expert_read']['p10']:.3g}-{disk['expert_read']['p90']:.3g}); page cache "
                                       f"after the reads: "
                                       f"{'?' if ver['page_cache_fraction_after_bypassed_reads'] is None else format(ver['page_cache_fraction_after_bypassed_reads'], '.1%')}"
                                       f" (mincore), a cached read of the same size takes {ver['cached_read_ms']:.3g} ms",
                "latency_us": f"{by}: intercept of the least-squares fit",
                "queue_depth": "one read outstanding at a time: moesim replay --real reads with one thread",
            },
        },
        "host_dram": {"capacity_gb": _sig(host_memory_bytes() / 1e9),
                      "source": {"capacity_gb": f"{by}: MemTotal of /proc/meminfo"}},
        "measured": {
            "model": model.name,
            "expert_compute_ms": {"tokens": [float(t) for t in tok], "ms": [_sig(exp[t].median * 1e3) for t in tok]},
            "attention_ms": {"tokens": [float(t) for t in atok], "ms": [_sig(att[t].median * 1e3) for t in atok]},
            "source": (f"{by}; dtype {dtype}, {p.threads} torch threads. expert_compute_ms: one routed expert "
                       f"({model.hidden_size}x{model.expert_intermediate_size}, "
                       f"{'SwiGLU' if model.gated else 'ReLU MLP'}) over N tokens: gather, MLP, weighted "
                       f"scatter-add, weights cycled through a pool larger than the caches. attention_ms: one "
                       f"attention block (norm, QKV, SDPA, O, residual, norm): for N <= {DECODE_SHAPE_MAX} a decode "
                       f"step of N sequences with {context} cached positions each, above a prefill of one causal "
                       f"sequence of N tokens. Medians of warmed-up repeats, points sampled round-robin in random "
                       f"order; spread in the .measurements.json"),
        },
    }
    _optional_fields(prof, desc, dtype, p.threads, context, when, disk, link, p.cuda)
    from .cpu_profile import measure_host_cpu

    log("host CPU as an expert executor ...")
    prof["host_cpu"], host_meas = measure_host_cpu(spec, scale, None if p.cuda else p.threads, quick, log=log)
    hp = profile_from_dict(prof, file=str(out))  # must validate
    sidecar = out.with_name(out.stem + ".measurements.json")
    meas = {
        "profile": str(out), "when": when, "moesim_profile_seconds": None, "quick": quick, "model": model.model_dump(),
        "dtype": dtype, "threads": p.threads, "device": desc, "attention_context": context,
        "attention_decode_shape_max_tokens": DECODE_SHAPE_MAX,
        "expert_compute": [{"tokens": t, **exp[t].as_dict()} for t in tok],
        "attention": [{"tokens": t, **att[t].as_dict()} for t in atok],
        "attention_decode_grid": grid,
        "roofline": roof, "disk": disk, "link": link, "host_cpu": host_meas,
    }
    header = [(f"Hardware profile measured by `moesim profile{' --quick' if quick else ''} --model {spec.name}"
              f"{f' --scale {scale:g}' if scale != 1 else ''} --dtype {dtype} --context {context}` on {when}."),
              f"Device: {dev_words}.", f"Versions: {versions}.",
              f"Every point with its spread (p10/p90/min/max, n): {sidecar.name}.",
              "Units: *_gbps = 1e9 bytes/s, *_gb = 1e9 bytes, *_tflops = 1e12 FLOP/s, *_us microseconds.",
              "Spread (p90-p10)/median of the tables: expert "
              + ", ".join(f"{t}:{exp[t].spread():.0%}" for t in tok)
              + "; attention " + ", ".join(f"{t}:{att[t].spread():.0%}" for t in atok) + "."]
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"# {h}\n" for h in header) + yaml.safe_dump(hp.model_dump(mode="json", exclude_none=True),
                                                                 sort_keys=False, width=100)
    out.write_text(text)
    meas["moesim_profile_seconds"] = time.perf_counter() - t_start
    meas["load_average"] = {"before": load_before, "after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                            "cores": os.cpu_count()}
    rt_path = out.with_name(out.stem + ".runtime.yaml")
    rt_doc = runtime_doc(rt_meas, by, f"{name or out.stem}-runtime", p.cuda)
    rt_path.write_text(_runtime_text(rt_doc, rt_path, out, sidecar))
    meas["runtime"] = {"file": str(rt_path), **{k: v for k, v in rt_meas.items() if k != "attention_grid"}}
    sidecar.write_text(json.dumps(meas, indent=1, default=float) + "\n")
    lines = [
        f"device        {dev_words}; {dtype}, {p.threads} torch threads; model {model.name}",
        "expert FFN    " + "  ".join(f"{t}:{exp[t].median * 1e3:.3g}ms" for t in tok),
        "attention     " + "  ".join(f"{t}:{att[t].median * 1e3:.3g}ms" for t in atok),
        (f"GEMM          {gm['tflops']:.3g} TFLOP/s ({gm['size']}^3);  GEMV stream {gv['gbps']:.3g} GB/s;  "
        f"per-op {go['us']:.3g} us"),
        (f"disk          {disk['method']}: {fit_d['bandwidth_gbps']:.3g} GB/s + {fit_d['latency_us']:.3g} us; expert "
        f"read ({disk['expert_read']['bytes'] / MiB:.2f} MiB) {disk['expert_read']['median']:.3g} ms "
        f"(p10-p90 {disk['expert_read']['p10']:.3g}-{disk['expert_read']['p90']:.3g}); cached "
        f"{ver['cached_read_ms']:.3g} ms; bypass verified: {ver['bypass_works']}"),
        f"link          {link['kind']}: {fit_l['bandwidth_gbps']:.3g} GB/s + {fit_l['latency_us']:.3g} us",
        (f"runtime       step set-up {rt_doc['step_host_us']:.3g} us, layer bookkeeping {rt_doc['layer_host_us']:.3g} "
         f"us, readback {rt_doc['readback_us']:.3g} us, copy slowdown {rt_doc['copy_slowdown']:.3g}x, dequant "
         + ", ".join(f"{k} {v:.3g} GB/s" for k, v in rt_doc['dequant_gbps'].items()) + f" -> {rt_path.name}"),
        f"took          {meas['moesim_profile_seconds']:.1f} s",
    ]
    return ProfileResult(prof, meas, out, sidecar, lines)


def _runtime_text(doc: dict, path: Path, profile: Path, sidecar: Path) -> str:
    """The runtime YAML's text (validated first), with a header naming its profile."""
    from ..hardware.runtime import runtime_from_dict

    rt = runtime_from_dict(doc, file=str(path))
    head = (f"# Runtime (software-stack) costs measured by moesim profile beside {profile.name}; every point's\n"
            f"# spread is in {sidecar.name} (key: runtime). Use it as a scenario's `runtime:`.\n")
    return head + yaml.safe_dump(rt.model_dump(mode="json", exclude_none=True), sort_keys=False, width=100)


def _optional_fields(prof: dict, desc: dict, dtype: str, threads: int, context: int, when: str, disk: dict,
                     link: dict, cuda: bool) -> None:
    """Fields proposed for moesim.hardware.profile (a `device` section; `measured.dtype`,
    `measured.threads`, `measured.attention_context`, and the size tables `measured.h2d_ms` and
    `measured.disk_read_ms` as {bytes: [...], ms: [...]}): written only where the schema has them,
    so the YAML always validates."""
    from ..hardware.profile import HardwareProfile, Measured

    hf, mf = HardwareProfile.model_fields, Measured.model_fields
    if "device" in hf:
        versions = {k: str(desc[k]) for k in ("torch", "numpy", "python", "os", "cuda", "driver", "cudnn")
                    if desc.get(k) is not None}
        prof["device"] = {"kind": "cuda" if cuda else "cpu", "name": desc["name"], "threads": threads,
                          "versions": versions, "measured_at": when}
    m = prof["measured"]
    for key, val in (("dtype", dtype), ("threads", threads), ("attention_context", context)):
        if key in mf:
            m[key] = val
    if "h2d_ms" in mf:
        rows = [c for c in link["copies"] if c.get("pinned", True) and c.get("streams", 1) == 1]
        m["h2d_ms"] = {"bytes": [float(c["bytes"]) for c in rows], "ms": [_sig(c["median"]) for c in rows]}
    if "disk_read_ms" in mf:
        pts = {r["bytes"]: r["median"] for r in disk["reads"]}
        pts[disk["expert_read"]["bytes"]] = disk["expert_read"]["median"]  # the replay-like measurement
        xs = sorted(pts)
        m["disk_read_ms"] = {"bytes": [float(x) for x in xs], "ms": [_sig(pts[x]) for x in xs]}


def spread_d(d: dict) -> str:
    return f"median of {d['n']} (p10-p90 {d['p10']:.4g}-{d['p90']:.4g} ms)"
