"""Lazy torch import, device and dtype selection, versions, timing helpers.

Shared by the profiler (`moesim profile`) and the real executor (`moesim replay --real`), so the
two measure the same code on the same device with the same settings.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field

from ..errors import InputError

DTYPES = {"bfloat16": 2, "float16": 2, "float32": 4}


def require_torch():
    """`import torch`, or an InputError (exit 2) that says how to install it."""
    try:
        import torch
    except ImportError:
        raise InputError("this command needs PyTorch: pip install 'moesim[torch]' (or any torch>=2.2)",
                         field="torch") from None
    return torch


def _no_cudnn_attention(torch) -> None:
    """Keep SDPA off its cuDNN backend: with a mask it builds an execution plan for every new
    context length, and decode grows the context by one each step. Measured on an H200 (torch
    2.11+cu130, benchmarks/gpu/sdpa_shapes.py): 58 ms for the first call at a new length, 0.3 ms
    after; without cuDNN 0.097 ms for both. An offloading loop does not recompile per token."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def pick_device(name: str = "auto") -> str:
    """'cpu', 'cuda' or 'cuda:N'; 'auto' is CUDA when available, else the CPU."""
    torch = require_torch()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError("CUDA was asked for but torch.cuda.is_available() is False", field="--device")
        _no_cudnn_attention(torch)
        return name
    if name != "cpu":
        raise InputError(f"expected cpu, cuda, cuda:N or auto, got {name!r}", field="--device")
    return name


def default_threads(device: str) -> int:
    """torch CPU threads when none are given: on a CPU-only run one core is left to the I/O threads
    (with every core computing, an OpenMP team stalls whenever a loader thread takes a core)."""
    n = os.cpu_count() or 1
    return n if device.startswith("cuda") else max(1, n - 1)


def torch_dtype(name: str):
    torch = require_torch()
    if name not in DTYPES:
        raise InputError(f"expected one of {', '.join(DTYPES)}, got {name!r}", field="--dtype")
    return getattr(torch, name)


def set_threads(n: int | None) -> int:
    torch = require_torch()
    if n:
        torch.set_num_threads(int(n))
    return torch.get_num_threads()


def synchronizer(device: str):
    """A function that waits until every kernel queued on `device` has finished."""
    torch = require_torch()
    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def device_description(device: str) -> dict:
    """What the measurements describe: device, host, driver and library versions."""
    torch = require_torch()
    import numpy

    d = {"device": device, "host_cpu": cpu_model(), "host_cores": os.cpu_count(),
         "torch_threads": torch.get_num_threads(), "host_memory_bytes": host_memory_bytes(),
         "torch": torch.__version__, "numpy": numpy.__version__, "python": platform.python_version(),
         "os": f"{platform.system()} {platform.release()}"}
    if device.startswith("cuda"):
        idx = torch.device(device).index or 0
        p = torch.cuda.get_device_properties(idx)
        d.update(gpu=p.name, gpu_memory_bytes=int(p.total_memory), cuda=torch.version.cuda,
                 cudnn=str(torch.backends.cudnn.version()), compute_capability=f"{p.major}.{p.minor}",
                 gpu_count=torch.cuda.device_count())
        try:
            import subprocess
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10, check=False)
            d["driver"] = out.stdout.strip().splitlines()[idx] if out.returncode == 0 else None
        except (OSError, IndexError, subprocess.SubprocessError):
            d["driver"] = None
        d["name"] = p.name
    else:
        d["name"] = f"CPU {d['host_cpu']} ({d['torch_threads']} torch threads)"
    return d


@dataclass
class Stats:
    """Median and spread of repeated timings (seconds)."""

    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def pct(self, q: float) -> float:
        s = sorted(self.samples)
        if len(s) == 1:
            return s[0]
        pos = q / 100 * (len(s) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    def as_dict(self, scale: float = 1e3) -> dict:
        """median, p10, p90, min, max (in ms by default) and the sample count."""
        return {"median": self.median * scale, "p10": self.pct(10) * scale, "p90": self.pct(90) * scale,
                "min": min(self.samples) * scale, "max": max(self.samples) * scale, "n": len(self.samples)}

    def spread(self) -> float:
        """(p90 - p10) / median."""
        m = self.median
        return (self.pct(90) - self.pct(10)) / m if m > 0 else 0.0


def bench(fn, *, sync=lambda: None, warmup: int = 2, repeats: int = 10, budget_s: float = 1.0,
          min_repeats: int = 3, setup=None) -> Stats:
    """Time `fn()` (each call individually, synchronised): `warmup` untimed calls, then up to
    `repeats` timed ones, stopping early once `budget_s` is spent (but never before `min_repeats`).
    `setup()` runs untimed before each call (e.g. dropping a file range from the page cache)."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
        sync()
    st = Stats()
    t_all = time.perf_counter()
    while len(st.samples) < repeats:
        if setup is not None:
            setup()
        sync()
        t = time.perf_counter()
        fn()
        sync()
        st.samples.append(time.perf_counter() - t)
        if len(st.samples) >= min_repeats and time.perf_counter() - t_all > budget_s:
            break
    return st


def bench_round_robin(calls: dict, *, sync=lambda: None, warmup: int = 1, min_repeats: int = 3,
                      max_repeats: int = 30, budget_s: float = 5.0, point_budget_s: float = 1.0,
                      setup=None) -> dict:
    """Time several calls in rounds (one of each per round, in a fresh random order) so that every
    point is sampled across the same stretch of time: on a machine shared with other work, load
    bursts then spread over all points instead of inflating whichever point ran during them (and
    no point always runs right after the longest one).

    Every point gets at least `min_repeats` samples; a point stops once it has `max_repeats` or has
    spent `point_budget_s`; no new round starts once `budget_s` is spent (after `min_repeats`).
    Returns {key: Stats}."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
            sync()
    import random

    order_rng = random.Random(0)
    out = {k: Stats() for k in calls}
    spent = {k: 0.0 for k in calls}
    t0 = time.perf_counter()
    rounds = 0
    while True:
        active = [k for k in calls if len(out[k].samples) < max_repeats
                  and (len(out[k].samples) < min_repeats or spent[k] < point_budget_s)]
        if not active or (rounds >= min_repeats and time.perf_counter() - t0 > budget_s):
            break
        order_rng.shuffle(active)
        for k in active:
            if setup is not None:
                setup()
            sync()
            t = time.perf_counter()
            calls[k]()
            sync()
            dt = time.perf_counter() - t
            out[k].samples.append(dt)
            spent[k] += dt
        rounds += 1
    return out
