"""The simulation: a SimPy model of the per-step, per-layer pipeline of DESIGN §3.

One driver process walks the steps and layers on the GPU compute stream. It asks the scheduler
(engine/scheduler.py) for each step at the simulated time the step starts, and idles (advances
time; loads in flight carry on) when nothing is runnable before the next arrival. Expert loads are
transfers on the PCIe and disk channels (one SimPy event each); a GPU-tier hit costs no event.
Within a layer, expert compute starts as soon as the expert is resident and kernels run one after
another, so the layer's end is computed from the load completion times once they are known.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from operator import add

import numpy as np
import simpy

from ..cache.tiers import Tier
from .channels import PREFETCH, Channel
from ..hardware.costs import CostModel
from ..models import ModelSpec
from ..predictors.base import Predictor, Prefetch
from .cpu_exec import CpuExecutor
from .host import HostThread
from .kv import KvBudget
from .loads import Load, LoadChain
from .metrics import KeyLog, Recorder
from .overlap import ComputeHorizon
from .plan import StepPlan
from .standin import StandIns
from .writeback import WriteBack
from .scheduler import PlanSource


@dataclass(frozen=True)
class EngineConfig:
    """Plain (non-pydantic) settings the engine needs, taken from the scenario."""

    gpu_capacity: int | tuple[int, ...] | None  # experts (per layer if per_layer, or one per layer); None = unbounded
    gpu_policy: str = "lru"
    gpu_partition: str = "global"
    dram_capacity: int | None = None  # None with has_dram=False: host memory holds every expert
    dram_policy: str = "lru"
    dram_partition: str = "global"
    has_dram: bool = False
    dedup: bool = True
    record_events: bool = False
    seed: int = 0                     # seeds randomised eviction policies (a stream of its own)
    miss: str = "wait"      # wait | cpu | auto (engine/cpu_exec.py)
    kv_cache: bool = False  # the GPU tier holds what the KV cache leaves (engine/kv.py)
    gpu_preload: tuple[int, ...] = ()  # keys resident on the GPU before the run (cache.gpu.preload)
    standin: tuple[float, float] | None = None  # (bits, threshold) of low-bit stand-ins (engine/standin.py)


class _View:
    """The read-only StepView predictors see."""

    def __init__(self, sim: Simulation, plan: StepPlan):
        self._sim, self._plan = sim, plan
        self.step, self.phase, self.request_ids = plan.index, plan.phase, plan.request_ids
        self.token_request_ids = plan.token_requests
        self.gated = -1  # last layer whose gate has run
        self.pre_attn_layer = -1  # last layer whose pre-attention hook has run

    def _check(self, layer: int) -> None:
        if layer > self.gated:
            raise LookupError(f"layer {layer} is not routed yet (gate ran up to layer {self.gated})")

    def experts(self, layer: int) -> np.ndarray:
        self._check(layer)
        E = self._sim.E
        return np.unique(self._plan.keys[layer]) - layer * E

    def pre_attn(self, layer: int) -> np.ndarray:
        """[tokens, d] pre-attention hidden states of `layer` (known from its pre-attention hook on)."""
        if layer > self.pre_attn_layer:
            raise LookupError(f"layer {layer}'s pre-attention state is not computed yet")
        if self._plan.pre_attn is None:
            raise LookupError("this run has no pre_attn states (the predictor class must set needs_pre_attn)")
        return self._plan.pre_attn[:, layer, :]

    def token_experts(self, layer: int) -> np.ndarray:
        self._check(layer)
        return self._plan.routing[:, layer, :]

    def routing(self) -> np.ndarray:
        self._check(self._sim.L - 1)
        return self._plan.routing

    def future(self, n_layers: int, after_layer: int) -> list[tuple[int, int, np.ndarray]]:
        """Oracle only: the unique experts of the next `n_layers` layers after `after_layer`.
        The rest of this step is exact; later steps are as the scheduler would form them from the
        requests arrived so far (exact with closed arrivals; see engine/scheduler.py)."""
        if not self._sim.predictor.needs_future:
            raise PermissionError("only predictors with needs_future may read the trace ahead")
        L, E, dedup = self._sim.L, self._sim.E, self._dedup()
        out, plan, ahead, layer = [], self._plan, 0, after_layer
        for _ in range(n_layers):
            layer += 1
            if layer >= L:
                plan, layer = self._steps_ahead(ahead), 0
                ahead += 1
                if plan is None:
                    break
            flat = plan.flat  # (the same keys, read without the per-layer view object)
            keys = plan.keys[layer] if flat is None else flat[0][flat[2][layer]:flat[2][layer + 1]]
            out.append((plan.index, layer, (keys if dedup else np.unique(keys)) - layer * E))  # unique already, unless dedup is off
        return out

    def _steps_ahead(self, i: int) -> StepPlan | None:
        """The `i`-th step after this one (None past the last), as the scheduler would form it now."""
        return self._sim.sched.peek(i, self._sim.env.now)

    def _dedup(self) -> bool:
        return self._sim.cfg.dedup


class _Memo(dict):
    """f(x) of a pure f, computed once per x: a copy's seconds by its bytes (every copy is one expert)."""

    def __init__(self, f):
        super().__init__()
        self._f = f

    def __missing__(self, x):
        v = self[x] = self._f(x)
        return v


class Simulation(LoadChain):
    """Runs the steps of a scheduler through the timing model and records metrics.

    `steps`: a Scheduler (anything with `next_step(now)` and `peek(i, now)`), or an iterable of
    StepPlans run back to back."""

    def __init__(self, model: ModelSpec, cost: CostModel, cfg: EngineConfig, predictor: Predictor,
                 steps, next_use=None):
        self.model, self.cost, self.cfg, self.predictor = model, cost, cfg, predictor
        self.dedup = cfg.dedup
        self.E, self.L = model.num_experts, model.num_layers
        self.eb = model.expert_bytes
        self.env = simpy.Environment()
        self.sched = steps if hasattr(steps, "next_step") else PlanSource(steps)
        g_rng, d_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(3)[1:])
        self.gpu = Tier("gpu", cfg.gpu_capacity, cfg.gpu_policy, cfg.gpu_partition, self.E, self.L, next_use, g_rng)
        self.dram = (Tier("dram", cfg.dram_capacity, cfg.dram_policy, cfg.dram_partition, self.E, self.L, next_use,
                          d_rng)
                     if cfg.has_dram else None)
        self.events_log: list | None = [] if cfg.record_events else None
        rt = cost.runtime
        slow = rt.load_slowdown if rt is not None else 1.0
        self.horizon = ComputeHorizon(self.env, slow) if slow != 1.0 else None  # loads slowed by compute
        pcie_s, disk_s = (_Memo(cost.pcie_s).__getitem__, _Memo(cost.disk_s).__getitem__) if self.horizon is None else \
            (self.horizon.slowed(cost.pcie_s), self.horizon.slowed(cost.disk_s))
        self.pcie = Channel(self.env, "pcie", cost.hw.pcie_h2d.copy_engines, pcie_s, self._dropped,
                            self.events_log)
        idle = cost.hw.disk.idle_read_extra
        self.disk = Channel(self.env, "disk", cost.hw.disk.queue_depth, disk_s, self._dropped, self.events_log,
                            None if idle is None else idle.extra_s)
        if not cfg.has_dram:  # (a drop undoes more with a DRAM tier: then one by one, `_dropped`)
            self.pcie.prune = self._drop_stale
        self._spare: list[Load] = []  # dropped stale prefetches, reused as new queued ones
        self.rec = Recorder(model)
        self.loads: dict[int, Load] = {}
        self.prefetched_unused: set[int] = set()
        self.pos = -1              # index of the latest access (the cache clock; Belady next-use index)
        self.accessed = KeyLog()   # every layer's keys as accessed, in order (the gap report)
        self.gated = (-1, -1)      # (step, layer) whose gate ran last: prefetches at or before are stale
        self.view: _View | None = None
        self.protected: dict[tuple[int, int], list[int]] = {}  # target (step, layer) -> pinned keys
        self.predicted: dict[tuple[int, int], set[int]] = {}   # target -> every key predicted for it
        self.prefetch_bytes: dict[tuple[int, int], int] = {}   # target -> prefetched bytes (bounded)
        self.prefetch_inflight = 0
        self._implements = {h: getattr(type(predictor), h) is not getattr(Predictor, h)
                            for h in ("on_step_start", "on_pre_attention", "on_gate")}
        self.stale_pins: dict[int, int] = {}  # key -> unpins to ignore (pins of loads that never got a slot)
        self.host = HostThread(rt) if rt is not None and rt.costs_host else None  # None: host never delays
        self.cpu = CpuExecutor(self, cfg.miss, self.host is not None) if cfg.miss != "wait" else None
        self.kv = KvBudget(model, cost.hw.gpu.memory_gb, cfg.gpu_capacity) if cfg.kv_cache else None
        self.standin = StandIns(self, *cfg.standin) if cfg.standin is not None else None
        wb = rt.evict_writeback if rt is not None else "none"
        self.writeback = WriteBack(self, wb) if wb != "none" else None  # evicted experts copied back
        self._diverts = self._divert if self.cpu is not None or self.standin is not None else None
        for key in cfg.gpu_preload:  # placed before the run: no transfer, not an access
            self.gpu.reserve(key, -1)
            self.gpu.complete(key)

    def now(self) -> float:
        return self.env.now

    def _start_prefetch(self, key: int, target: tuple[int, int]) -> Load:
        """A prefetch with no DRAM tier (most of them): `_start_load` inlined. The load goes
        straight onto the PCIe prefetch queue as a plain record and the channel is woken only when
        a slot is free; most queued prefetches turn stale before they start and are dropped."""
        if self.dram is not None:
            return self._start_load(key, True, target)
        load = Load(key, True, target, False)
        self.loads[key] = load
        cb = self._cb
        if cb is None:
            cb = self._callbacks()
        load.nbytes = self.eb
        load.priority = PREFETCH
        load.on_done, load.on_start, load.stale = cb[0], cb[1], cb[4]
        pcie = load.channel = self.pcie
        load.queued_at = self.env.now
        pcie.queues[PREFETCH].append(load)
        if pcie.busy < pcie.slots:
            pcie._dispatch()
        return load

    def _start_prefetches(self, keys: list[int], target: tuple[int, int]) -> None:
        """LoadChain._start_prefetches with no DRAM tier: the loads are built in one go and join
        the PCIe prefetch queue together (it is busy: nothing starts before time passes)."""
        if self.dram is not None:
            return super()._start_prefetches(keys, target)
        loads, pcie, eb, now = self.loads, self.pcie, self.eb, self.env.now
        cb = self._cb if self._cb is not None else self._callbacks()
        make, spare = Load.queued_prefetch, self._spare
        queued: list[Load] = []
        for key in keys:
            load = loads.get(key)
            if load is not None:  # (a key twice in one answer)
                load.pins += 1
                continue
            if spare:  # a dropped stale prefetch: all but these fields are as a new one's
                load = spare.pop()
                load.key, load.target, load.pins, load.dropped, load.queued_at = key, target, 1, False, now
            else:
                load = make(key, target, eb, cb, pcie, now)
            loads[key] = load
            queued.append(load)
        pcie.queues[PREFETCH].extend(queued)
        self.rec.prefetch_issued += len(queued)
        self.prefetch_inflight += len(queued)

    def _drop_stale(self, q) -> None:
        """Drop the stale front of the PCIe prefetch queue `q` in one call (Channel.prune): what
        Queues._next does one by one with `_stale` and `_dropped`, with no DRAM tier. A dropped
        load was never copied nor waited on; `_start_prefetches` reuses it."""
        gated, loads, stale_pins, spare = self.gated, self.loads, self.stale_pins, self._spare
        dropped = inflight = 0
        while q:
            t = q[0]
            if not (t.prefetch and t.target <= gated):
                break
            q.popleft()
            t.dropped = True
            del loads[t.key]
            if t.counted_inflight:
                inflight += 1
            if t.pins:  # (_forget_pins, inlined)
                stale_pins[t.key] = stale_pins.get(t.key, 0) + t.pins
                t.pins = 0
            dropped += 1
            if not t.waiters:
                spare.append(t)
        self.prefetch_inflight -= inflight
        self.rec.prefetch_dropped += dropped

    def _pcie_full(self) -> bool:
        """No PCIe copy starts (none claims a GPU slot) before simulated time passes."""
        return self.pcie.busy >= self.pcie.slots

    def _landed(self, load: Load) -> None:
        for w in load.waiters:
            w()

    def _wait_host(self, t: float):
        """Yield until time `t` (when the host has issued what the GPU or a load needs next)."""
        if t > self.env.now:
            self.host.gpu_wait_s += t - self.env.now
            yield self.env.timeout(t - self.env.now)

    def _dispatched(self, cursor: float, costs, pending) -> tuple[float, float]:
        """The GPU cursor after the layer's expert kernels when each kernel also waits for the host
        to dispatch it (hits first, then loads in landing order; with blocking_loads the host
        waits for each load first; with synchronous_compute for each kernel; a kernel that starts
        while one of the layer's copies is in flight takes copy_slowdown times longer); returns
        (cursor, busy time the caller has not counted yet)."""
        host, busy, rt = self.host, 0.0, self.host.rt
        block, sync, slow = rt.blocking_loads, rt.synchronous_compute, rt.copy_slowdown
        copying_until = max((ld.done_t for ld, _ in pending), default=-1.0)
        for c in costs:
            start = max(cursor, host.work(host.dispatch_s))
            if start < copying_until:
                busy += c * (slow - 1.0)
                c = c * slow
            cursor = start + c
            if sync:
                host.sync(cursor)
        for ld, c in pending:
            start = max(cursor, ld.done_t, host.work(host.dispatch_s, ld.done_t if block else 0.0))
            c = c * slow if start < copying_until else c
            cursor = start + c
            busy += c
            if sync:
                host.sync(cursor)
        return cursor, busy

    # ---- prefetch ----------------------------------------------------------------------------

    def _hook(self, reqs: list[Prefetch], hook: str, tokens: int) -> float:
        """Act on a predictor's answer; returns GPU-stream time the predictor costs. Only hooks the
        predictor implements cost time (the base class's hooks do nothing)."""
        if not self._implements[hook]:
            return 0.0
        lat = self.predictor.latency_for(tokens) * 1e-6
        self.rec.predictor_s += lat
        on_gpu = self.predictor.params.runs_on == "gpu"
        if on_gpu or lat == 0:
            self._issue(reqs)
            return lat if on_gpu else 0.0
        if self.host is not None:  # a runtime's host thread runs it after the host work it has queued
            lat = self.host.work(lat, self.env.now) - self.env.now
        if reqs:  # host CPU: the requests are issued once the predictor has finished
            ev = self.env.timeout(lat)
            ev.callbacks.append(lambda _e, r=reqs: self._issue(r))
        return 0.0

    # ---- the pipeline ------------------------------------------------------------------------

    def run(self):
        self.env.process(self._driver())
        self.env.run()
        self._release(None)
        self.rec.finish(self)
        return self.rec

    def _driver(self):
        """The GPU stream: ask the scheduler for each step at the time it starts, idle when nothing
        is runnable, run each step."""
        env, rec, sched = self.env, self.rec, self.sched
        while True:
            plan = sched.next_step(env.now)
            if plan is None:
                break
            if not isinstance(plan, StepPlan):  # nothing runnable: idle until the next arrival
                rec.idle_s += plan - env.now
                yield env.timeout(plan - env.now)
                continue
            yield from self._step(plan)

    def _step(self, plan: StepPlan):
        """One forward step: set-up, the dense blocks before the first MoE block, every MoE layer,
        the LM head."""
        env, cost, m, rec = self.env, self.cost, self.model, self.rec
        pred, host = self.predictor, self.host
        view = self.view = _View(self, plan)
        t_step = env.now
        rec.step_start(plan, t_step)
        if self.kv is not None:  # the batch's KV cache now: the GPU tier gets what it leaves
            self._evicted(self.kv.step(plan.context_tokens, plan.tokens, self.gpu))
        if host is not None:  # the host has the previous token; set-up, then the dense blocks' work
            host.sync(t_step)
            yield from self._wait_host(host.work(host.step_s + m.first_dense_layers * host.layer_s))
        gpu_extra = self._hook(pred.on_step_start(view), "on_step_start", plan.tokens)
        # dense blocks before the first MoE block: resident weights, compute only
        attn = cost.attention_s(plan.tokens, plan.context_tokens, len(plan.request_ids))  # (every layer's)
        dense = m.first_dense_layers * (attn + cost.dense_ffn_s(plan.tokens))
        if dense + gpu_extra > 0:
            if self.horizon is not None:
                self.horizon.busy(dense + gpu_extra)
            rec.compute_s += dense + gpu_extra
            yield env.timeout(dense + gpu_extra)
        for layer in range(self.L):
            yield from self._layer(plan, layer, attn)
        view.gated = self.L - 1
        pred.on_step_end(view)
        head = cost.lm_head_s(plan.tokens)
        if head > 0:
            if self.horizon is not None:
                self.horizon.busy(head)
            rec.compute_s += head
            yield env.timeout(head)
        if host is not None:  # the host reads the token back before the next step
            host.sync(env.now)
        rec.step_end(plan, t_step, env.now)

    def _layer(self, plan: StepPlan, layer: int, attn: float):
        """One MoE layer: attention, the gate, the experts' hits and loads, the expert kernels as
        their experts become resident, then the layer's row."""
        env, rec, host, view = self.env, self.rec, self.host, self.view
        t0 = env.now
        if host is not None:  # the layer's host work, then its attention is issued
            yield from self._wait_host(host.work(host.layer_s))
        view.pre_attn_layer = layer
        pre = self._hook(self.predictor.on_pre_attention(view, layer), "on_pre_attention", plan.tokens) \
            if self._implements["on_pre_attention"] else 0.0  # (the base hook answers nothing and costs nothing)
        if self.horizon is not None:
            self.horizon.busy(pre + attn)
        yield env.timeout(pre + attn)
        if host is not None:  # loads and the gate hook wait for the routing to reach the host
            yield from self._wait_host(host.routing_known(env.now))
        t_gate = env.now
        gate_reqs = self._gate(plan, view, layer)
        keys = plan.keys[layer]
        self.accessed.append(keys)
        if self.standin is not None:
            self.standin.layer(plan, layer)
        if self.horizon is not None:
            self._commit_gate_compute(plan, layer)
        counts = plan.counts[layer].tolist()  # the accesses (LoadChain._access_layer), kernel seconds as payloads
        (hits, late, misses), hit_costs, pending, pinned = self._access_layer(
            plan.index, layer, keys.tolist(), counts, list(map(self.cost.expert_compute_s, counts)), self._diverts)
        # shared experts (always resident), then each hit's kernel, summed in access order
        busy = reduce(add, hit_costs, self.cost.shared_compute_s(plan.tokens))
        if self.horizon is not None:  # each loaded expert's kernel runs once its load lands
            for ld, c in pending:
                if ld.done_t < 0 and c > 0:
                    ld.waiters.append(lambda c=c: self.horizon.busy(c))
        # The layer's own experts are pinned and their loads queued before the predictor's
        # prefetches for later layers, so a prefetch never evicts what this layer needs.
        post = self._hook(gate_reqs, "on_gate", plan.tokens)
        busy += post
        dispatch = host is not None and host.paces_kernels
        cursor = t_gate + busy - sum(hit_costs) if dispatch else t_gate + busy
        if pending:
            yield from self._wait_loads(pending)
            pending.sort(key=lambda p: p[0].done_t)
            if not dispatch:
                for ld, c in pending:
                    cursor = max(cursor, ld.done_t) + c
                    busy += c
        if dispatch:
            cursor, loaded = self._dispatched(cursor, hit_costs, pending)
            busy += loaded
        if cursor > env.now:
            yield env.timeout(cursor - env.now)
        self._layer_done(plan.index, layer, pinned)
        rec.layer_row(plan, layer, t0, t_gate, env.now, attn + pre, busy,
                      env.now - t_gate - busy, hits, late, misses, len(keys))

    def _divert(self, key: int, cnt: int, c: float):
        """A miss served without a copy into the cache: a low-bit stand-in (not cached) or the host
        CPU, as (job, its GPU kernel seconds); None: a demand load."""
        if self.standin is not None and self.standin.serves(key):
            return self.standin.submit(key, cnt), c
        if self.cpu is not None and self.cpu.prefers_cpu(key, cnt, c):
            return self.cpu.submit(key, cnt), 0.0
        return None

    def _commit_gate_compute(self, plan: StepPlan, layer: int) -> None:
        """The compute known at the gate, before the layer's loads start (engine/overlap.py): the
        shared experts and the kernels of the experts resident now."""
        gpu, ecs = self.gpu, self.cost.expert_compute_s
        self.horizon.busy(self.cost.shared_compute_s(plan.tokens) + sum(
            ecs(cnt) for key, cnt in zip(plan.keys[layer].tolist(), plan.counts[layer].tolist())
            if key in gpu and not gpu.in_flight(key)))

    def _wait_loads(self, pending: list):
        """Yield until every load of `pending` has landed (one event, whichever lands last)."""
        waiting = [ld for ld, _ in pending if ld.done_t < 0]
        if not waiting:
            return
        ev = self.env.event()
        left = [len(waiting)]

        def arrived(ev=ev, left=left):
            left[0] -= 1
            if left[0] == 0:
                ev.succeed()
        for ld in waiting:
            ld.waiters.append(arrived)
        yield ev
