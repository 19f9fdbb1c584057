"""The real executor: a scenario's step plan run with real tensors and real I/O.

It follows the simulator's pipeline (moesim/engine/sim.py, DESIGN §3) step by step, with the
same cache tiers (`moesim.cache.tiers.Tier`, the same eviction policies), the same predictor
objects and hooks, the same load chain, per-layer access decision and priorities (engine/loads.py) —
but every duration is measured:

* the expert file on disk: every (layer, expert) of the model, random weights of its shape;
* the scenario's ``dram`` tier: host buffers (pinned on CUDA) filled from the file by reads that
  bypass the page cache (O_DIRECT, else posix_fadvise DONTNEED), on the ``disk`` channel; without
  a ``dram`` tier every expert is read into host memory once, before the clock starts;
* the scenario's ``gpu`` tier: the expert cache of the compute device — GPU memory on CUDA, and on
  a CPU-only machine a bounded RAM cache the CPU computes from; a load into it is a copy on the
  ``pcie`` channel: a host-to-device copy on its own CUDA stream, or a host memcpy on the CPU;
* channels are worker threads (``copy_engines`` / ``queue_depth`` of the scenario's profile) with
  the simulator's two-level queue: demand before prefetch, promotion of a prefetch that a demand
  access waits on, dropping of stale prefetches; they overlap with compute on the main thread;
* the attention blocks, the routed experts (only the tokens routed to them), shared experts,
  dense blocks and the LM head are computed with torch, on the main thread, in the engine's order
  (a layer's hits first, then every loaded expert as soon as its copy has landed).

Bookkeeping (tiers, pins, predictor hooks) runs under one lock; copies and compute run outside it.
The output is the simulator's (engine.metrics.Recorder): steps.parquet, requests.parquet,
summary.json (+ events.parquet), with a `real` section describing how it was run (summary.py;
the entry point is replay.py). Its parts: buffers.py (host and device memory), channels.py (the
worker threads), view.py (what predictors see), batch.py (KV caches), weights.py (expert file and
resident blocks).
"""
from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..cache.tiers import Tier
from ..engine.channels import Transfer
from ..engine.loads import LoadChain
from ..errors import InputError
from .batch import StaticBatch, token_groups
from .buffers import BufferedLoad, DevSlots, HostBuf, Pool, host_block
from .channels import RealChannel
from .kernels import KVCache, Shapes, StepGeometry, attention_segment, expert_forward, ffn, lm_head
from .store import open_reader
from .torchutil import default_threads, pick_device, require_torch, set_threads, torch_dtype
from .view import RealView, with_pre_attn
from .weights import Resident, expert_file


class RealExecutor(LoadChain):
    """Runs a scenario's static-batch step plan for real. Use `moesim.real.replay_real()`."""

    Load = BufferedLoad

    def __init__(self, sc, *, device: str = "auto", dtype: str = "bfloat16", workdir=None, io: str = "auto",
                 record_events: bool = False, threads: int | None = None, seed: int | None = None, log=None):
        self.torch = require_torch()
        self.sc = sc
        self.model = m = sc.model
        self.device = pick_device(device)
        self.cuda = self.device.startswith("cuda")
        self.dtype_name = dtype
        self.dtype = torch_dtype(dtype)
        self.threads = set_threads(threads or default_threads(self.device))
        self.io_method = io
        self.log = log or (lambda msg: None)
        self.shapes = Shapes(m, dtype)
        self.E, self.L = m.num_experts, m.num_layers
        self.eb = m.expert_bytes
        self.dedup = sc.batch.dedup
        self.record_events = record_events
        self.seed = sc.seed if seed is None else seed
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="moesim-real-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.error: BaseException | None = None
        self.events_log: list | None = [] if record_events else None
        self._t0 = None
        self.setup_s: dict[str, float] = {}

    def now(self) -> float:
        return time.perf_counter() - self._t0 if self._t0 is not None else 0.0

    # ---- setup ------------------------------------------------------------------------------
    def setup(self):
        s, m = self.shapes, self.model
        t = time.perf_counter()
        self.path = expert_file(self.workdir, m, s, self.dtype, self.seed)
        self.setup_s["expert_file"] = time.perf_counter() - t
        t = time.perf_counter()
        self.reader = open_reader(self.path, self.io_method)
        next_use = self._next_use()
        self._gpu_tier(next_use)
        self._host_tier(next_use)
        self.staging = Pool(lambda: host_block(1, s.slot_bytes, self.cuda)[0])
        w = Resident(m, s, self.dtype, self.device, self.seed + 1)
        self.attn, self.dense, self.shared, self.lm_head = w.attn, w.dense, w.shared, w.lm_head
        self.batch = StaticBatch(s, self.dtype, self.device, len(self.attn))
        self.setup_s["buffers_and_weights"] = time.perf_counter() - t
        if self.cuda:
            self.copy_stream = self.torch.cuda.Stream(device=self.device)
        self.sync = self.torch.cuda.synchronize if self.cuda else (lambda: None)

    def _next_use(self):
        """Belady's oracle over the whole static plan, when a tier evicts by it (else None)."""
        g, d = self.sc.cache.gpu, self.sc.cache.dram
        for name, tier in (("gpu", g), ("dram", d)):
            if tier is not None and tier.allocation != "uniform":
                raise InputError(f"replay --real runs the uniform per-layer split only, not {tier.allocation!r}",
                                 field=f"cache.{name}.allocation")
        if "belady" not in (g.policy, d.policy if d is not None else ""):
            return None
        from ..cache.replay import NextUse
        from ..engine.plan import static_plan

        keys = [k for st in static_plan(self._requests(), self.sc.batch.size, self.E, self.dedup) for k in st.keys]
        return NextUse(np.concatenate(keys) if keys else np.zeros(0, np.int64)).next_after

    def _gpu_tier(self, next_use) -> None:
        """The gpu tier and the compute device's expert slots (one per expert it can hold)."""
        g, E, L = self.sc.cache.gpu, self.E, self.L
        self.gpu_capacity = g.experts(self.model.expert_bytes)
        gparts = L if g.partition == "per_layer" else 1
        n_dev = E * L if self.gpu_capacity is None else min(E * L, self.gpu_capacity * gparts)
        self.gpu = Tier("gpu", self.gpu_capacity, g.policy_name, g.partition, E, L, next_use)
        self.dev = DevSlots(n_dev, self.shapes, self.dtype, self.device)
        self.dev_free = list(range(n_dev - 1, -1, -1))
        self.dev_slot: dict[int, int] = {}
        self.dev_pool = Pool(self.dev.make_one)

    def _host_tier(self, next_use) -> None:
        """The dram tier's host buffers; without one, every expert read into host memory now."""
        d, E, L, nb = self.sc.cache.dram, self.E, self.L, self.shapes.slot_bytes
        if d is not None:
            self.dram_capacity = d.experts(self.model.expert_bytes)
            dparts = L if d.partition == "per_layer" else 1
            n_host = min(E * L, self.dram_capacity * dparts)
            self.dram = Tier("dram", self.dram_capacity, d.policy_name, d.partition, E, L, next_use)
            self.host = host_block(n_host, nb, self.cuda)
            self.host_free = list(range(n_host - 1, -1, -1))
            self.host_slot: dict[int, int] = {}
            self.all_host = None
            return
        self.dram_capacity = None
        self.dram = None
        self.host = []
        # host memory holds every expert: read them all once, before the clock starts
        self.all_host = host_block(E * L, nb, self.cuda)
        for k in range(E * L):
            self.reader.read(self.all_host[k].np, k * nb, nb)

    def _requests(self, pre_attn: bool = False, keep: dict | None = None):
        """The trace's requests (lengths noted; with `keep`, each kept by id, read with its pre_attn)."""
        for r in self.reader_trace.iter_requests(pre_attn=pre_attn, scores=False):
            self.decode_tokens[r.request_id] = r.decode_len
            self.max_len[r.request_id] = r.prompt_len + r.decode_len
            if keep is not None:
                keep[r.request_id] = r
            yield r

    def _plan(self):
        """The static plan of the run; its steps carry pre_attn when the predictor reads it."""
        from ..engine.plan import static_plan

        if not self.predictor.needs_pre_attn:
            return static_plan(self._requests(), self.sc.batch.size, self.E, self.dedup)
        reqs: dict = {}
        steps = static_plan(self._requests(True, reqs), self.sc.batch.size, self.E, self.dedup)
        return with_pre_attn(steps, reqs)

    def _warmup(self, max_tokens: int) -> None:
        """Run every kernel shape once before the clock starts (first calls pay one-off costs)."""
        torch, s = self.torch, self.shapes
        views = self.dev.views[0] if self.dev.views else self.dev.make_one()[2]
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, max_tokens} - {0})
        for n in sizes:
            if n > max_tokens:
                continue
            x = torch.randn(n, s.H, dtype=self.dtype, device=self.device)
            idx = torch.arange(n, device=self.device)
            for _ in range(2):
                expert_forward(x, idx, views, x, 1.0)
            cache = KVCache(1, n + 1, s, self.dtype, self.device)
            g = StepGeometry(np.zeros(n, np.int64), np.arange(n), np.array([n]), self.device, True)
            attention_segment(x, self.attn[0], cache, g)
            g = StepGeometry(np.zeros(1, np.int64), np.array([n]), np.array([n + 1]), self.device, False)
            attention_segment(x[:1], self.attn[0], cache, g)
        src = self.all_host[0] if self.all_host else self.staging.get()
        for _ in range(2):
            self._link_copy(src, (self.dev.flat[0], self.dev.np[0]) if self.dev.flat else self.dev.make_one()[:2])
        if not self.all_host:
            self.staging.put(src)
        self.sync()

    # ---- the link and the disk --------------------------------------------------------------
    def _link_copy(self, src: HostBuf, dst) -> None:
        flat, arr = dst
        if self.cuda:
            torch = self.torch
            with torch.cuda.stream(self.copy_stream):
                flat.copy_(src.t, non_blocking=True)
            self.copy_stream.synchronize()
        else:
            np.copyto(arr, src.np)

    def _disk_work(self, t: Transfer) -> None:
        ld = t.load
        buf = self.host[self.host_slot[ld.key]] if ld.dram_reserved else ld.staging
        self.reader.read(buf.np, ld.key * self.shapes.slot_bytes, self.shapes.slot_bytes)

    def _pcie_work(self, t: Transfer) -> None:
        ld = t.load
        self._link_copy(ld.src, ld.dev_dst)

    # ---- loads: engine.loads.LoadChain, plus the buffers ---------------------------------------
    def _landed(self, load: BufferedLoad) -> None:
        if load.waiters:
            self.cond.notify_all()

    def _dram_reserve(self, key: int) -> list[int] | None:
        ev = super()._dram_reserve(key)
        if ev is not None:
            for k in ev:
                self.host_free.append(self.host_slot.pop(k))
            self.host_slot[key] = self.host_free.pop()
        return ev

    def _disk_start(self, load: BufferedLoad) -> bool:
        if not load.dram_reserved:
            load.staging = self.staging.get()
        return True

    def _claim_slot(self, load: BufferedLoad) -> bool:
        """As the engine's, then the buffers of the link copy: a device slot (a transient one for
        a bypass copy) and the host buffer it reads from."""
        if not super()._claim_slot(load):
            return False
        if load.bypass:
            f, a, views = self.dev_pool.get()
            load.dev_transient = (f, a, views)
            load.dev, load.dev_dst = views, (f, a)
        else:
            slot = self.dev_free.pop()
            self.dev_slot[load.key] = slot
            load.dev = self.dev.views[slot]
            load.dev_dst = (self.dev.flat[slot], self.dev.np[slot])
        if self.dram is None:
            load.src = self.all_host[load.key]
        elif load.pinned_dram:
            load.src = self.host[self.host_slot[load.key]]
        else:
            load.src = load.staging
        return True

    def _evicted(self, keys: list[int]) -> None:
        for k in keys:
            self.dev_free.append(self.dev_slot.pop(k))
        super()._evicted(keys)

    def _pcie_done(self, load: BufferedLoad) -> None:
        if load.staging is not None:
            self.staging.put(load.staging)
            load.staging = None
        super()._pcie_done(load)

    def _dropped(self, t: Transfer) -> None:
        load = self.loads[t.key]
        if load.channel is self.disk:
            if load.dram_reserved:
                self.host_free.append(self.host_slot.pop(t.key))
        elif load.staging is not None:
            self.staging.put(load.staging)
            load.staging = None
        super()._dropped(t)

    def _hook(self, fn, *args):
        """Call a predictor hook under the lock, issue its prefetches; its wall time is charged
        where it runs (the main thread), as it really is."""
        t = time.perf_counter()
        with self.lock:
            reqs = fn(*args)
            self._issue(reqs)
        self.rec.predictor_s += time.perf_counter() - t

    def _timed(self, fn, *args) -> float:
        t = time.perf_counter()
        fn(*args)
        self.sync()
        return time.perf_counter() - t

    # ---- run ------------------------------------------------------------------------------------
    def run(self, reader):
        from ..engine.metrics import Recorder
        from ..engine.plan import Lookahead
        from ..predictors import registry

        torch, sc, m = self.torch, self.sc, self.model
        self.reader_trace = reader
        self.decode_tokens: dict[int, int] = {}
        self.max_len: dict[int, int] = {}
        self.setup()
        # the most tokens any step processes: the largest prefill of a static batch
        prompts = [r.prompt_len for r in reader.iter_requests(pre_attn=False, scores=False)]
        B = sc.batch.size
        max_tokens = max((sum(prompts[i:i + B]) for i in range(0, len(prompts), B)), default=1)
        t = time.perf_counter()
        self._warmup(max(1, max_tokens))
        self.setup_s["warmup"] = time.perf_counter() - t
        self.rec = rec = Recorder(m)
        rng = np.random.default_rng(sc.seed)
        self.predictor = pred = registry.create(sc.predictor.name, sc.predictor.params, m, rng)
        self.steps = Lookahead(iter(self._plan()), pred.lookahead_steps())
        self._reset_bookkeeping()
        hw = sc.hardware
        self.pcie = RealChannel(self, "pcie", hw.pcie_h2d.copy_engines, self._pcie_work, self._dropped)
        self.disk = RealChannel(self, "disk", hw.disk.queue_depth, self._disk_work, self._dropped)
        x_base = torch.randn(max(1, max_tokens), self.shapes.H, generator=torch.Generator().manual_seed(self.seed + 2),
                             dtype=torch.float32).to(self.dtype).to(self.device)
        try:
            self._t0 = time.perf_counter()
            with torch.inference_mode():
                self._drive(x_base, 1.0 / m.top_k)
            makespan = self.now()
        finally:
            self.pcie.close()
            self.disk.close()
            self.reader.close()
        if self.error is not None:
            raise self.error
        with self.lock:
            self._release(None)
        rec.finish(SimpleNamespace(env=SimpleNamespace(now=makespan), pcie=self.pcie, disk=self.disk,
                                   prefetched_unused=self.prefetched_unused, events_log=self.events_log))
        return rec

    def _reset_bookkeeping(self) -> None:
        """The LoadChain's state at the start of a run: no loads, pins, predictions."""
        self.loads: dict[int, BufferedLoad] = {}
        self.prefetched_unused: set[int] = set()
        self.pos = -1
        self.gated = (-1, -1)
        self.protected: dict = {}
        self.predicted: dict = {}
        self.prefetch_bytes: dict = {}
        self.prefetch_inflight = 0
        self.stale_pins: dict[int, int] = {}

    def _wait(self, pending_loads) -> None:
        """Block until one of `pending_loads` has landed (or a worker failed)."""
        with self.lock:
            while not any(ld.done_t >= 0 for ld in pending_loads):
                if self.error is not None:
                    raise RuntimeError(f"a load failed: {self.error!r}") from self.error
                self.cond.wait(timeout=1.0)

    def _drive(self, x_base, alpha: float) -> None:
        """Every step of the plan, in the engine's order: dense blocks, the MoE layers, the LM head."""
        rec, pred = self.rec, self.predictor
        for plan in self.steps:
            view = RealView(self, plan)
            t_step = self.now()
            rec.step_start(plan, t_step)
            self._hook(pred.on_step_start, view)
            g = self.batch.geometry(plan, self.max_len)
            x = x_base[: plan.tokens].clone()
            t = time.perf_counter()
            n_dense = self.model.first_dense_layers
            for i in range(n_dense):
                h = attention_segment(x, self.attn[i], self.batch.caches[i], g)
                x.add_(ffn(h, *self.dense[i]))
            if n_dense:
                self.sync()
                rec.compute_s += time.perf_counter() - t
            for layer in range(self.L):
                self._layer(plan, view, layer, x, g, alpha)
            view.gated = self.L - 1
            with self.lock:
                pred.on_step_end(view)
            if self.lm_head is not None:
                t = time.perf_counter()
                lm_head(x, self.lm_head)
                self.sync()
                rec.compute_s += time.perf_counter() - t
            rec.step_end(plan, t_step, self.now())

    def _layer(self, plan, view: RealView, layer: int, x, g, alpha: float) -> None:
        """One MoE layer: pre-attention hook, attention, gate hook and accesses, expert compute."""
        pred, block = self.predictor, self.model.first_dense_layers + layer
        t0 = self.now()
        view.pre_attn_layer = layer
        self._hook(pred.on_pre_attention, view, layer)
        h = attention_segment(x, self.attn[block], self.batch.caches[block], g)
        self.sync()
        t_gate = self.now()
        keys = plan.keys[layer]
        groups = token_groups(plan, layer, keys, self.E, self.model.top_k, self.dedup, self.device)
        with self.lock:
            gate_reqs = self._gate(plan, view, layer)
            counts, ready, pending, pinned = self._access(plan, layer, keys, groups)
            self._issue(gate_reqs)
        busy = self._compute(x, h, layer, ready, pending, alpha)
        with self.lock:
            self._layer_done(plan.index, layer, pinned)
            for ld, _ in pending:
                if ld.dev_transient is not None:
                    self.dev_pool.put(ld.dev_transient)
                    ld.dev_transient = None
        t_end = self.now()
        self.rec.layer_row(plan, layer, t0, t_gate, t_end, t_gate - t0, busy, t_end - t_gate - busy,
                           *counts, len(keys))

    def _access(self, plan, layer: int, keys: np.ndarray, groups):
        """Under the lock: the layer's accesses, decided as the simulator decides them
        (LoadChain._access_layer), each key's payload its index. Returns ((hits, late, misses),
        ready (views, rows), pending (load, rows), pinned keys)."""
        ks = keys.tolist()
        counts, hit_i, pending_i, pinned = self._access_layer(plan.index, layer, ks, plan.counts[layer].tolist(),
                                                              range(len(ks)))
        views, slot = self.dev.views, self.dev_slot
        ready = [(views[slot[ks[i]]], groups[i]) for i in hit_i]
        pending = []
        for load, i in pending_i:
            load.waiters += 1
            pending.append((load, groups[i]))
        return counts, ready, pending, pinned

    def _compute(self, x, h, layer: int, ready, pending, alpha: float) -> float:
        """Shared experts, the hits, then each loaded expert as soon as its copy has landed (in
        landing order); returns the compute seconds."""
        busy = 0.0
        for w in self.shared[layer]:
            busy += self._timed(lambda w=w, x=x, h=h: x.add_(ffn(h, *w)))
        for views, rows in ready:
            busy += self._timed(expert_forward, h, rows, views, x, alpha)
        todo = list(pending)
        while todo:
            if not any(ld.done_t >= 0 for ld, _ in todo):
                self._wait([ld for ld, _ in todo])
            with self.lock:
                done = [p for p in todo if p[0].done_t >= 0]
            done.sort(key=lambda p: p[0].done_t)
            for p in done:
                todo.remove(p)
                busy += self._timed(expert_forward, h, p[1], p[0].dev, x, alpha)
        return busy

    def cleanup(self) -> None:
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
