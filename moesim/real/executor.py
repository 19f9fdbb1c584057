"""The real executor: a scenario's step plan run with real tensors and real I/O.

It follows the simulator's pipeline (moesim/engine/sim.py, DESIGN §3) step by step, with the
same cache tiers (`moesim.cache.tiers.Tier`, the same eviction policies), the same predictor
objects and hooks, the same load chain and the same priorities — but every duration is measured:

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
summary.json (+ events.parquet), with a `real` section describing how it was run.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..version import __version__
from ..cache.tiers import Tier
from ..engine.loads import Load, LoadChain
from ..errors import InputError
from ..engine.channels import Queues, Transfer
from .kernels import (
    Attention,
    KVCache,
    Shapes,
    StepGeometry,
    attention_segment,
    expert_forward,
    expert_views,
    ffn,
    lm_head,
    random_weight,
)
from .store import (
    aligned_buffer,
    cached_fraction,
    drop_cache,
    open_reader,
    write_random_file,
)
from .torchutil import (
    default_threads,
    device_description,
    pick_device,
    require_torch,
    set_threads,
    torch_dtype,
)

TIER_ROLES = {
    "cpu": {"gpu": "bounded expert cache in RAM that the CPU computes from (the scenario's gpu tier)",
            "dram": "host staging buffers in RAM filled from the expert file (the scenario's dram tier)",
            "pcie": "host memcpy from a host buffer into the RAM expert cache",
            "disk": "reads of the expert file with the page cache bypassed"},
    "cuda": {"gpu": "expert cache in GPU memory (the scenario's gpu tier)",
             "dram": "pinned host buffers filled from the expert file (the scenario's dram tier)",
             "pcie": "host-to-device copy on a dedicated CUDA stream",
             "disk": "reads of the expert file with the page cache bypassed"},
}


# ---- buffers ------------------------------------------------------------------------------------

class HostBuf:
    """Host memory for one expert: a numpy uint8 view (for reads) and a torch view (for copies)."""

    __slots__ = ("np", "t")

    def __init__(self, arr: np.ndarray, t):
        self.np, self.t = arr, t


def _host_block(n: int, nbytes: int, pinned: bool) -> list[HostBuf]:
    """`n` page-aligned host buffers of `nbytes` (pinned memory when `pinned`)."""
    torch = require_torch()
    if n == 0:
        return []
    if pinned:
        raw = torch.empty(n * nbytes + 4096, dtype=torch.uint8, pin_memory=True)
        off = (-raw.data_ptr()) % 4096
        big_t = raw[off: off + n * nbytes]
        big = big_t.numpy()
    else:
        big = aligned_buffer(n * nbytes)
        big_t = torch.from_numpy(big)
    return [HostBuf(big[i * nbytes:(i + 1) * nbytes], big_t[i * nbytes:(i + 1) * nbytes]) for i in range(n)]


class Pool:
    """Transient buffers (staging reads or bypass copies), grown on demand and reused."""

    def __init__(self, make):
        self._make, self._free = make, []
        self.allocated = 0

    def get(self):
        if self._free:
            return self._free.pop()
        self.allocated += 1
        return self._make()

    def put(self, b) -> None:
        self._free.append(b)


class DevSlots:
    """The compute device's expert slots: flat uint8 tensors and their (w1, w3, w2) views."""

    def __init__(self, n: int, shapes: Shapes, dtype, device: str):
        torch = require_torch()
        self.shapes, self.dtype, self.device = shapes, dtype, device
        self.cuda = device.startswith("cuda")
        nb = shapes.slot_bytes
        if self.cuda:
            self.flat = [torch.zeros(nb, dtype=torch.uint8, device=device) for _ in range(n)] if n else []
            self.np = [None] * n
        else:
            hb = _host_block(n, nb, pinned=False)
            self.flat = [b.t for b in hb]
            self.np = [b.np for b in hb]
        self.views = [expert_views(f, shapes, dtype) for f in self.flat]

    def make_one(self):
        """A transient slot (for bypass copies): (flat tensor, numpy view or None, views)."""
        torch = require_torch()
        nb = self.shapes.slot_bytes
        if self.cuda:
            f = torch.zeros(nb, dtype=torch.uint8, device=self.device)
            a = None
        else:
            a = aligned_buffer(nb)
            f = torch.from_numpy(a)
        return f, a, expert_views(f, self.shapes, self.dtype)


# ---- loads and channels -------------------------------------------------------------------------

class _Load(Load):
    """A load of engine.loads with the buffers it reads from and lands in. `waiters`: the main
    thread's accesses waiting on it (a count; they poll `done_t`)."""

    __slots__ = (
        "dev",
        "dev_dst",
        "dev_transient",
        "src",
        "staging",
    )

    def __init__(self, key: int, prefetch: bool, target: tuple[int, int], bypass: bool):
        super().__init__(key, prefetch, target, bypass)
        self.waiters = 0
        self.src: HostBuf | None = None      # where the link copy reads from
        self.staging: HostBuf | None = None  # transient host buffer to give back after the link copy
        self.dev = None                      # views of the device buffer the expert lands in
        self.dev_dst = None                  # (flat tensor, numpy view or None) of that buffer
        self.dev_transient = None            # a bypass copy's transient device slot


class RealChannel(Queues):
    """A link served by `slots` worker threads with the simulator's two-level priority queue."""

    def __init__(self, ex: RealExecutor, name: str, slots: int, work, on_drop):
        super().__init__(name, slots, on_drop, ex.events_log)
        self.ex, self.work = ex, work
        self.cond = threading.Condition(ex.lock)
        self.closed = False
        self.threads = [threading.Thread(target=self._worker, name=f"moesim-{name}-{i}", daemon=True)
                        for i in range(slots)]
        for t in self.threads:
            t.start()

    # called with the lock held ----------------------------------------------------------------
    def _now(self) -> float:
        return self.ex.now()

    def _wake(self) -> None:
        self.cond.notify()

    # the worker thread --------------------------------------------------------------------------
    def _worker(self) -> None:
        ex = self.ex
        while True:
            with ex.lock:
                while True:
                    if self.closed:
                        return
                    t = self._next()
                    if t is not None:
                        break
                    self.cond.wait()
                self.busy += 1
                t.start = ex.now()
            try:
                self.work(t)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                with ex.lock:
                    ex.error = e
                    ex.cond.notify_all()
                return
            with ex.lock:
                t.end = ex.now()
                self._finished(t)

    def close(self) -> None:
        with self.ex.lock:
            self.closed = True
            self.cond.notify_all()
        for t in self.threads:
            t.join(timeout=30)


class _View:
    """The read-only StepView predictors see (as engine.sim._View, over a real run)."""

    def __init__(self, ex: RealExecutor, plan):
        self._ex, self._plan = ex, plan
        self.step, self.phase, self.request_ids = plan.index, plan.phase, plan.request_ids
        self.token_request_ids = plan.token_requests
        self.gated = -1

    def _check(self, layer: int) -> None:
        if layer > self.gated:
            raise LookupError(f"layer {layer} is not routed yet (gate ran up to layer {self.gated})")

    def experts(self, layer: int) -> np.ndarray:
        self._check(layer)
        return np.unique(self._plan.keys[layer]) - layer * self._ex.E

    def token_experts(self, layer: int) -> np.ndarray:
        self._check(layer)
        return self._plan.routing[:, layer, :]

    def future(self, n_layers: int, after_layer: int) -> list[tuple[int, int, np.ndarray]]:
        ex = self._ex
        if not ex.predictor.needs_future:
            raise PermissionError("only predictors with needs_future may read the trace ahead")
        L, E = ex.L, ex.E
        out, plan, ahead, layer = [], self._plan, 0, after_layer
        for _ in range(n_layers):
            layer += 1
            if layer >= L:
                plan, layer = ex.steps.peek(ahead), 0
                ahead += 1
                if plan is None:
                    break
            keys = plan.keys[layer]
            out.append((plan.index, layer, (keys if ex.dedup else np.unique(keys)) - layer * E))
        return out


# ---- the executor -------------------------------------------------------------------------------

class RealExecutor(LoadChain):
    """Runs a scenario's static-batch step plan for real. Use `replay_real()`."""

    Load = _Load

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
    def _expert_file(self) -> Path:
        s, m = self.shapes, self.model
        n = self.L * self.E
        path = self.workdir / f"experts-{m.num_layers}x{m.num_experts}x{s.slot_bytes}-{s.dtype_name}.bin"
        if path.is_file() and path.stat().st_size == n * s.slot_bytes:
            drop_cache(path)
            return path
        torch = self.torch
        gen = torch.Generator().manual_seed(self.seed)
        pool = []
        for _ in range(min(4, n)):
            parts = [random_weight((s.I, s.H), self.dtype, "cpu", gen) for _ in range(s.mats - 1)]
            parts.append(random_weight((s.H, s.I), self.dtype, "cpu", gen))
            flat = torch.cat([p.reshape(-1) for p in parts]).view(torch.uint8).numpy()
            pool.append(flat)
        need = n * s.slot_bytes
        free = shutil.disk_usage(self.workdir).free
        if need > free * 0.9:
            raise InputError(f"the expert file needs {need / 1e9:.2f} GB but {self.workdir} has "
                             f"{free / 1e9:.2f} GB free (use --scale, --layers or --workdir)", field="--workdir")
        write_random_file(path, n, s.slot_bytes, lambda i: pool[i % len(pool)])
        return path

    def setup(self):
        torch, s, m, sc = self.torch, self.shapes, self.model, self.sc
        t = time.perf_counter()
        self.path = self._expert_file()
        self.setup_s["expert_file"] = time.perf_counter() - t
        t = time.perf_counter()
        self.reader = open_reader(self.path, self.io_method)
        E, L = self.E, self.L
        total = E * L
        g, d = sc.cache.gpu, sc.cache.dram
        for name, tier in (("gpu", g), ("dram", d)):
            if tier is not None and tier.allocation != "uniform":
                raise InputError(f"replay --real runs the uniform per-layer split only, not {tier.allocation!r}",
                                 field=f"cache.{name}.allocation")
        self.gpu_capacity = g.experts(m.expert_bytes)
        gparts = L if g.partition == "per_layer" else 1
        n_dev = total if self.gpu_capacity is None else min(total, self.gpu_capacity * gparts)
        from ..cache.replay import NextUse

        next_use = None
        if "belady" in (g.policy, d.policy if d is not None else ""):
            from ..engine.plan import static_plan

            keys = [k for st in static_plan(self._requests(), sc.batch.size, E, self.dedup) for k in st.keys]
            next_use = NextUse(np.concatenate(keys) if keys else np.zeros(0, np.int64)).next_after
        self.gpu = Tier("gpu", self.gpu_capacity, g.policy_name, g.partition, E, L, next_use)
        self.dev = DevSlots(n_dev, s, self.dtype, self.device)
        self.dev_free = list(range(n_dev - 1, -1, -1))
        self.dev_slot: dict[int, int] = {}
        self.dev_pool = Pool(self.dev.make_one)
        pinned = self.cuda
        if d is not None:
            self.dram_capacity = d.experts(m.expert_bytes)
            dparts = L if d.partition == "per_layer" else 1
            n_host = min(total, self.dram_capacity * dparts)
            self.dram = Tier("dram", self.dram_capacity, d.policy_name, d.partition, E, L, next_use)
            self.host = _host_block(n_host, s.slot_bytes, pinned)
            self.host_free = list(range(n_host - 1, -1, -1))
            self.host_slot: dict[int, int] = {}
            self.all_host = None
        else:
            self.dram_capacity = None
            self.dram = None
            self.host = []
            # host memory holds every expert: read them all once, before the clock starts
            self.all_host = _host_block(total, s.slot_bytes, pinned)
            for k in range(total):
                self.reader.read(self.all_host[k].np, k * s.slot_bytes, s.slot_bytes)
        self.staging = Pool(lambda: _host_block(1, s.slot_bytes, pinned)[0])
        # resident weights: attention per block, shared experts, dense FFNs, LM head
        gen = torch.Generator().manual_seed(self.seed + 1)
        dev, dt = self.device, self.dtype
        blocks = m.first_dense_layers + L
        self.attn = [Attention(s, dt, dev, gen) for _ in range(blocks)]

        def mlp(width):
            w1 = random_weight((width, s.H), dt, dev, gen)
            w3 = random_weight((width, s.H), dt, dev, gen) if s.gated else None
            return w1, w3, random_weight((s.H, width), dt, dev, gen)

        self.dense = [mlp(m.dense_intermediate_size) for _ in range(m.first_dense_layers)]
        sw = m.shared_expert_intermediate_size or m.expert_intermediate_size
        self.shared = [[mlp(sw) for _ in range(m.num_shared_experts)] for _ in range(L)]
        self.lm_head = random_weight((m.vocab_size, s.H), dt, dev, gen) if m.vocab_size else None
        self.setup_s["buffers_and_weights"] = time.perf_counter() - t
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device=self.device)
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)

    def _requests(self):
        for r in self.reader_trace.iter_requests(pre_attn=False, scores=False):
            self.decode_tokens[r.request_id] = r.decode_len
            self.max_len[r.request_id] = r.prompt_len + r.decode_len
            yield r

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
    def _landed(self, load: _Load) -> None:
        if load.waiters:
            self.cond.notify_all()

    def _dram_reserve(self, key: int) -> list[int] | None:
        ev = super()._dram_reserve(key)
        if ev is not None:
            for k in ev:
                self.host_free.append(self.host_slot.pop(k))
            self.host_slot[key] = self.host_free.pop()
        return ev

    def _disk_start(self, load: _Load) -> bool:
        if not load.dram_reserved:
            load.staging = self.staging.get()
        return True

    def _claim_slot(self, load: _Load) -> bool:
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

    def _pcie_done(self, load: _Load) -> None:
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

    # ---- per-step compute helpers -----------------------------------------------------------------
    def _geometry(self, plan):
        """StepGeometry of a step; a prefill starts a new static batch (new KV caches)."""
        if plan.phase == "prefill":
            ids = [int(r) for r in plan.request_ids.tolist()]
            self.slot_of = {r: i for i, r in enumerate(ids)}
            max_len = max(self.max_len[r] for r in ids) + 1
            self.caches = None
            self.caches = [KVCache(len(ids), max_len, self.shapes, self.dtype, self.device)
                           for _ in range(len(self.attn))]
            rows = plan.token_requests
            slot = np.array([self.slot_of[int(r)] for r in rows.tolist()], dtype=np.int64)
            starts = np.r_[0, np.flatnonzero(np.diff(rows)) + 1]
            pos = np.arange(len(rows)) - np.repeat(starts, np.diff(np.r_[starts, len(rows)]))
            self.lengths = np.zeros(len(ids), dtype=np.int64)
            np.maximum.at(self.lengths, slot, pos + 1)
            return StepGeometry(slot, pos, self.lengths[np.unique(slot)], self.device, True)
        slot = np.array([self.slot_of[int(r)] for r in plan.request_ids.tolist()], dtype=np.int64)
        pos = self.lengths[slot].copy()
        self.lengths[slot] += 1
        return StepGeometry(slot, pos, self.lengths[np.unique(slot)], self.device, False)

    def _token_groups(self, plan, layer: int, keys: np.ndarray):
        """Per needed key: a tensor of the token rows routed to it."""
        torch = self.torch
        K = self.model.top_k
        flat = plan.routing[:, layer, :].reshape(-1).astype(np.int64) + layer * self.E
        if not self.dedup:
            rows = np.arange(flat.size) // K
            return [torch.tensor([r], device=self.device) for r in rows.tolist()]
        order = np.argsort(flat, kind="stable")
        srt = flat[order]
        lo = np.searchsorted(srt, keys, "left")
        hi = np.searchsorted(srt, keys, "right")
        rows = order // K
        return [torch.as_tensor(rows[a:b], device=self.device) for a, b in zip(lo.tolist(), hi.tolist())]

    def _timed(self, fn, *args) -> float:
        t = time.perf_counter()
        fn(*args)
        self.sync()
        return time.perf_counter() - t

    # ---- run ------------------------------------------------------------------------------------
    def run(self, reader):
        from ..engine.metrics import Recorder
        from ..engine.plan import Lookahead, static_plan
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
        self.steps = Lookahead(iter(static_plan(self._requests(), sc.batch.size, self.E, self.dedup)),
                               pred.lookahead_steps())
        self.loads: dict[int, _Load] = {}
        self.prefetched_unused: set[int] = set()
        self.pos = -1
        self.gated = (-1, -1)
        self.protected: dict = {}
        self.predicted: dict = {}
        self.prefetch_bytes: dict = {}
        self.prefetch_inflight = 0
        self.stale_pins: dict[int, int] = {}
        hw = sc.hardware
        self.pcie = RealChannel(self, "pcie", hw.pcie_h2d.copy_engines, self._pcie_work, self._dropped)
        self.disk = RealChannel(self, "disk", hw.disk.queue_depth, self._disk_work, self._dropped)
        x_base = torch.randn(max(1, max_tokens), self.shapes.H, generator=torch.Generator().manual_seed(self.seed + 2),
                             dtype=torch.float32).to(self.dtype).to(self.device)
        alpha = 1.0 / m.top_k
        try:
            self._t0 = time.perf_counter()
            with torch.inference_mode():
                self._drive(x_base, alpha)
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

    def _wait(self, pending_loads) -> None:
        """Block until one of `pending_loads` has landed (or a worker failed)."""
        with self.lock:
            while not any(ld.done_t >= 0 for ld in pending_loads):
                if self.error is not None:
                    raise RuntimeError(f"a load failed: {self.error!r}") from self.error
                self.cond.wait(timeout=1.0)

    def _drive(self, x_base, alpha: float) -> None:
        m, rec, pred, gpu = self.model, self.rec, self.predictor, self.gpu
        dedup = self.dedup
        n_dense = m.first_dense_layers
        for plan in self.steps:
            view = _View(self, plan)
            t_step = self.now()
            rec.step_start(plan, t_step)
            self._hook(pred.on_step_start, view)
            g = self._geometry(plan)
            x = x_base[: plan.tokens].clone()
            t = time.perf_counter()
            for i in range(n_dense):
                h = attention_segment(x, self.attn[i], self.caches[i], g)
                x.add_(ffn(h, *self.dense[i]))
            if n_dense:
                self.sync()
                rec.compute_s += time.perf_counter() - t
            for layer in range(self.L):
                t0 = self.now()
                self._hook(pred.on_pre_attention, view, layer)
                h = attention_segment(x, self.attn[n_dense + layer], self.caches[n_dense + layer], g)
                self.sync()
                t_gate = self.now()
                keys = plan.keys[layer]
                groups = self._token_groups(plan, layer, keys)
                hits = late = misses = 0
                ready: list[tuple[object, object]] = []  # (views, token rows) of hits
                pending: list[tuple[_Load, object]] = []
                pinned: list[int] = []
                with self.lock:
                    self.gated = (plan.index, layer)
                    view.gated = layer
                    gate_reqs = pred.on_gate(view, layer)
                    self._score_predictions(self.gated, keys if dedup else np.unique(keys))
                    unused = self.prefetched_unused
                    for key, rows in zip(keys.tolist(), groups):
                        self.pos += 1
                        if gpu.hit(key, self.pos):
                            hits += 1
                            if key in unused:
                                unused.discard(key)
                                rec.prefetch_used += 1
                            gpu.pin(key)
                            pinned.append(key)
                            ready.append((self.dev.views[self.dev_slot[key]], rows))
                            continue
                        load = self.loads.get(key)
                        if load is not None and (dedup or load.prefetch):
                            late += 1
                            if load.prefetch:
                                rec.prefetch_late += 1
                                load.prefetch = False
                                load.channel.promote(load.transfer)
                        else:
                            misses += 1
                            load = self._start_load(key, False, (plan.index, layer), bypass=load is not None)
                        load.waiters += 1
                        if not load.bypass:
                            self._pin(key)
                            pinned.append(key)
                        pending.append((load, rows))
                    self._issue(gate_reqs)
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
                with self.lock:
                    for key in pinned:
                        self._unpin(key)
                    if self.protected:
                        self._release((plan.index, layer))
                    for ld, _ in pending:
                        if ld.dev_transient is not None:
                            self.dev_pool.put(ld.dev_transient)
                            ld.dev_transient = None
                t_end = self.now()
                rec.layer_row(plan, layer, t0, t_gate, t_end, t_gate - t0, busy, t_end - t_gate - busy,
                              hits, late, misses, len(keys))
            view.gated = self.L - 1
            with self.lock:
                pred.on_step_end(view)
            if self.lm_head is not None:
                t = time.perf_counter()
                lm_head(x, self.lm_head)
                self.sync()
                rec.compute_s += time.perf_counter() - t
            rec.step_end(plan, t_step, self.now())

    def cleanup(self) -> None:
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


# ---- entry point --------------------------------------------------------------------------------

def replay_real(sc, *, device: str = "auto", dtype: str = "bfloat16", workdir=None, io: str = "auto",
                record_events: bool = False, threads: int | None = None, keep_files: bool = False,
                trace_path=None, scaling: dict | None = None, log=None):
    """Execute scenario `sc` for real and return an engine.run.Result (same format as simulate())."""
    from ..engine.run import Result, open_trace, scenario_echo

    ex = RealExecutor(sc, device=device, dtype=dtype, workdir=workdir, io=io, record_events=record_events,
                      threads=threads, log=log)
    load_before = _loadavg()
    try:
        with tempfile.TemporaryDirectory(prefix="moesim-real-trace-") as tmp:
            reader = open_trace(sc, Path(tmp)) if trace_path is None else _reader(trace_path, sc)
            rec = ex.run(reader)
        s = ex.shapes
        sample = min(s.slot_bytes * 4, os.path.getsize(ex.path))
        info = {
            "device": device_description(ex.device),
            "dtype": ex.dtype_name,
            "torch_threads": ex.threads,
            "roles": TIER_ROLES["cuda" if ex.cuda else "cpu"],
            "expert_file": {"path": str(ex.path), "bytes": os.path.getsize(ex.path), "slot_bytes": s.slot_bytes,
                            "expert_bytes_in_dtype": s.expert_nbytes},
            "io": {"method": ex.reader.method,
                   "page_cache_after_run": cached_fraction(ex.path, 0, sample),
                   "note": {"odirect": "O_DIRECT reads into page-aligned buffers: the page cache is bypassed",
                            "fadvise": "posix_fadvise(DONTNEED) before and after each read: the page cache "
                                       "is dropped for the range, so each read goes to the device",
                            "buffered": "plain buffered reads: NOT bypassing the page cache"}[ex.reader.method]},
            "channels": {"pcie": ex.pcie.slots, "disk": ex.disk.slots},
            "transient_buffers": {"staging": ex.staging.allocated, "bypass": ex.dev_pool.allocated},
            "setup_s": ex.setup_s,
            "load_average": {"before": load_before, "after": _loadavg(), "cores": os.cpu_count(),
                             "note": "1-minute load average of the machine: other processes compete for the cores"},
            "scaling": scaling or {},
        }
        summary = {"moesim_version": __version__, "scenario": scenario_echo(sc), **_summary(rec, ex.decode_tokens, sc),
                   "timing_source": {"expert_compute": "real", "attention": "real"},
                   "expert_bytes": sc.model.expert_bytes,
                   "gpu_cache_experts": ex.gpu_capacity,
                   "mode": "real",
                   "real": info}
        return Result(summary, rec.steps_frame(), rec.requests_frame(), rec.events_frame())
    finally:
        if not keep_files:
            ex.cleanup()


def _summary(rec, decode_tokens, sc) -> dict:
    slo = getattr(sc.batch, "slo", None)
    return rec.summary(decode_tokens, slo) if slo is not None else rec.summary(decode_tokens)


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _reader(path, sc):
    from ..traces import TraceReader, check_against_model

    r = TraceReader(path)
    check_against_model(r.meta, sc.model, str(path))
    return r
