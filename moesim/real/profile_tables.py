"""The compute tables of `moesim profile`: expert FFN and attention times by tokens, a decode
grid, and the roofline numbers (GEMM, GEMV streaming, per-op overhead); the disk and link
measurements are in profile_io.py, the profile YAML is written by profiler.py."""
from __future__ import annotations

import math

import numpy as np

from ..models import ModelSpec

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
DECODE_SHAPE_MAX = 16  # attention table: up to this many tokens, a decode step of that many sequences


class Profiler:
    """Times what the real executor computes, on this machine (`moesim profile`'s tables)."""

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
        from .kernels import expert_views
        from .weights import random_expert_bytes

        n = max(2, min(64, math.ceil(pool_bytes / shapes.slot_bytes)))
        gen = torch.Generator().manual_seed(0)
        base = [random_expert_bytes(shapes, self.dtype, gen) for _ in range(min(n, 4))]
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
        from .kernels import Shapes

        s = Shapes(self.model, self.dtype_name)
        pool = self._attention_pool(s, 1)
        it = iter(range(10 ** 12))
        calls = {t: self._attention_call(s, pool, it, t, context if t <= DECODE_SHAPE_MAX else None)
                 for t in tokens}
        return self.bench_points(calls, warmup=2)

    def _attention_call(self, s, pool: list, it, tokens: int, context: int | None):
        """A call of one attention block (cycling through `pool`): a decode step of `tokens`
        sequences at `context` cached positions each, or (context None) a prefill of one causal
        sequence of `tokens` tokens."""
        from .kernels import KVCache, StepGeometry, attention_segment

        t = tokens
        if context is not None:
            # room for a sequence to grow, as the replay's per-batch cache has (so the keys
            # attended over are a strided slice of a longer buffer, as there)
            cache = KVCache(t, 2 * context + 1, s, self.dtype, self.device)
            g = StepGeometry(np.arange(t), np.full(t, context), np.full(t, context + 1), self.device, False)
        else:
            cache = KVCache(1, t, s, self.dtype, self.device)
            g = StepGeometry(np.zeros(t, np.int64), np.arange(t), np.array([t]), self.device, True)
        x = self.torch.randn(t, s.H, dtype=self.dtype, device=self.device)
        return lambda: attention_segment(x, pool[next(it) % len(pool)], cache, g)

    def _attention_pool(self, s, seed: int) -> list:
        """Distinct attention blocks, more than the caches hold, cycled as a model's layers are."""
        from .kernels import Attention

        gen = self.torch.Generator().manual_seed(seed)
        one = (s.nh + 2 * s.kvh) * s.hd * s.H + s.H * s.nh * s.hd
        n = max(2, min(16, math.ceil((128 * MiB) / (one * s.esize))))
        return [Attention(s, self.dtype, self.device, gen) for _ in range(n)]

    def attention_decode_grid(self, batches: list[int], contexts: list[int]) -> list[dict]:
        """Decode steps of each batch size at each context (for the record: the tables have no context axis)."""
        from .kernels import Shapes

        s = Shapes(self.model, self.dtype_name)
        pool = self._attention_pool(s, 2)
        it = iter(range(10 ** 12))
        calls = {(b, c): self._attention_call(s, pool, it, b, c) for b in batches for c in contexts}
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
        k = 200 if self.cuda else 1000

        def many():
            for _ in range(k):
                z.add_(1)
        st_l = self.bench(many)
        launch_us = st_l.median / k * 1e6
        return {"gemm": {"size": n, "tflops": tflops, **st_mm.as_dict()},
                "gemv": {"bytes": W.numel() * dt.itemsize, "gbps": gbps, **st_mv.as_dict()},
                "op_overhead": {"us": launch_us, "ops_per_sample": k, **st_l.as_dict()}}
