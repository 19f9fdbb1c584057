"""The prefetch fast path: the SimPy engine's run without SimPy, for predictors that prefetch.

Everything that decides (the load chain, pins, tiers, the predictor's hooks) is the Simulation's
own code; only the clock changes. SimPy orders its events by (time, priority, creation id), and
every event of these runs has NORMAL priority, so events at equal times run in creation order.
Here a heap of (time, seq, channel, copy) does the same: `seq` counts creations in the order
SimPy would create its events (a copy's completion when it starts, the driver's wake-up when it
sleeps or when the last load it waits for lands, a host-CPU predictor's delayed issue). The
driver (engine/sim.py's `_driver`, `_step` and `_layer`) is a plain loop that runs the heap up to
its own wake-up entry wherever the SimPy driver yields. tests/test_engine_fast_prefetch.py checks the results are the same bit
for bit on random scenarios with equal times.

Supported (see `unsupported`): any predictor (a host-CPU predictor's latency delays its issue by a
timer entry of the heap, as SimPy's timeout), no host thread or load slowdown, misses that wait, no
stand-ins, KV cache or write-back. A DRAM tier over the disk is modelled too (its disk channel is a
heap channel).
"""
from __future__ import annotations

from functools import reduce
from heapq import heappop, heappush
from operator import add

from .channels import Channel
from .plan import StepPlan
from .sim import Simulation, _Memo, _View


def unsupported(sim: Simulation) -> str | None:
    """Why `sim` needs the SimPy engine (the first feature this path does not model), or None."""
    parts = ((sim.host, "a runtime with host costs"), (sim.horizon, "a runtime's load_slowdown"),
             (sim.cpu, f"miss: {sim.cfg.miss}"), (sim.standin, "low-bit stand-ins"),
             (sim.kv, "the KV cache in the GPU budget"), (sim.writeback, "the write-back of evicted experts"))
    return next((why for part, why in parts if part is not None), None)


class _Env:
    """The clock and event heap the Simulation reads in place of SimPy's environment."""

    __slots__ = ("heap", "now", "seq")

    def __init__(self):
        self.now = 0  # an int, as SimPy's clock starts
        self.heap: list = []
        self.seq = 0

    def timeout(self, d: float) -> _Timer:
        """SimPy's `env.timeout(d)` for a host-CPU predictor's delayed issue (Simulation._hook):
        an entry made now, whose callbacks run when it comes up."""
        tm = _Timer()
        self.seq += 1
        heappush(self.heap, (self.now + d, self.seq, tm, None))
        return tm


class _Timer:
    """A timeout of the heap: `callbacks` as a SimPy event's, each called with the timer."""

    __slots__ = ("callbacks",)

    def __init__(self):
        self.callbacks: list = []

    def finish(self, _t) -> None:
        for cb in self.callbacks:
            cb(self)


class _HeapChannel(Channel):
    """engine/channels.py's Channel with each copy's completion an entry of the heap, not a SimPy
    timeout (created at the same moment, so it takes the same place among equal times)."""

    def _dispatch(self) -> None:
        env = self.env
        while self.busy < self.slots:
            t = self._next()
            if t is None:
                return
            now = env.now
            d = self.duration_s(t.nbytes)
            if self.idle_extra_s is not None and self.busy == 0:
                d += self.idle_extra_s(now - self.idle_since)
            self.busy += 1
            t.start, t.end = now, now + d
            env.seq += 1
            heappush(env.heap, (now + d, env.seq, self, t))

    _wake = _dispatch

    def finish(self, t) -> None:
        """The copy `t` has ended (now): Channel._finish without the SimPy event (free the slot,
        count the copy, run its on_done, start what is queued)."""
        if self.busy == 1:
            self.idle_since = self.env.now
        self._finished(t)
        q = self.queues
        if q[0] or q[1]:  # (_dispatch finds nothing to start in empty queues)
            self._dispatch()


def _heap_channel(ch: Channel, env: _Env) -> _HeapChannel:
    """A heap channel with `ch`'s settings (and its prune, when its owner set one)."""
    new = _HeapChannel(env, ch.name, ch.slots, ch.duration_s, ch.on_drop, ch.log, ch.idle_extra_s)
    if "prune" in vars(ch):
        new.prune = ch.prune
    return new


class FastPrefetch:
    """Runs a Simulation with the heap clock (see the module docstring): `FastPrefetch(sim).run()`
    in place of `sim.run()`, for a sim with nothing `unsupported`."""

    def __init__(self, sim: Simulation):
        why = unsupported(sim)
        if why is not None:
            raise ValueError(f"the prefetch fast path does not model {why}")
        self.sim = sim
        self.env = sim.env = _Env()
        sim.pcie = _heap_channel(sim.pcie, self.env)
        sim.disk = _heap_channel(sim.disk, self.env)
        self.rec, self.cost = sim.rec, sim.cost
        self._ecs = _Memo(sim.cost.expert_compute_s)  # tokens -> one expert kernel's seconds
        self._shared = _Memo(sim.cost.shared_compute_s)  # tokens -> the shared experts' seconds

    # ---- the clock ---------------------------------------------------------------------------

    def _sleep(self, d: float) -> None:
        """`yield env.timeout(d)`: the driver's wake-up joins the heap now; run the heap to it."""
        env = self.env
        env.seq += 1
        t, heap = env.now + d, env.heap
        if heap and heap[0][0] <= t:  # (something runs first: at t, it was made before the wake-up)
            heappush(heap, (t, env.seq, None, None))
            self._run()
        else:  # nothing before the wake-up: it comes up at once
            env.now = t

    def _run(self) -> None:
        """Run the heap's entries in order up to the driver's wake-up (a channel of None)."""
        env, heap = self.env, self.env.heap
        while True:
            env.now, _, ch, t = heappop(heap)
            if ch is None:
                return
            ch.finish(t)

    def _wake(self) -> None:
        """The event the driver waits on succeeds now (it runs after what is at this time already)."""
        env = self.env
        env.seq += 1
        heappush(env.heap, (env.now, env.seq, None, None))

    # ---- the driver (engine/sim.py's, with the parts `unsupported` excludes left out) ---------

    def run(self):
        """Simulation.run: the driver's steps, then the copies still in flight; returns the Recorder."""
        sim, env, rec = self.sim, self.env, self.rec
        drive(self)
        heap = env.heap
        while heap:  # the copies still in flight (SimPy's run goes on until no event is left)
            env.now, _, ch, t = heappop(heap)
            ch.finish(t)
        sim._release(None)
        rec.finish(sim)
        return rec

    def _step(self, plan: StepPlan) -> None:
        """Simulation._step: set-up and hooks, the dense blocks, every MoE layer, the LM head."""
        sim = self.sim
        view = sim.view = _View(sim, plan)
        t_step = self.env.now
        self.rec.step_start(plan, t_step)
        attn = dense_blocks(self, plan, sim._hook(sim.predictor.on_step_start(view), "on_step_start", plan.tokens))
        for layer in range(sim.L):
            self._layer(plan, layer, attn)
        step_end(self, plan, view, t_step)

    def _layer(self, plan: StepPlan, layer: int, attn: float) -> None:
        """Simulation._layer: attention, the gate, the accesses, the wait for the layer's loads,
        the kernels, the row."""
        sim, env, rec = self.sim, self.env, self.rec
        view = sim.view
        t0 = env.now
        view.pre_attn_layer = layer
        pre = sim._hook(sim.predictor.on_pre_attention(view, layer), "on_pre_attention", plan.tokens) \
            if sim._implements["on_pre_attention"] else 0.0
        self._sleep(pre + attn)
        t_gate = env.now
        gate_reqs = sim._gate(plan, view, layer)
        keys = plan.keys[layer]
        sim.accessed.append(keys)
        counts = plan.counts[layer].tolist()
        (hits, late, misses), hit_costs, pending, pinned = sim._access_layer(
            plan.index, layer, keys.tolist(), counts, list(map(self._ecs.__getitem__, counts)), None)
        busy = reduce(add, hit_costs, self._shared[plan.tokens])
        busy += sim._hook(gate_reqs, "on_gate", plan.tokens)
        busy = kernels(self, pending, t_gate, busy)
        sim._layer_done(plan.index, layer, pinned)
        rec.layer_row(plan, layer, t0, t_gate, env.now, attn + pre, busy,
                      env.now - t_gate - busy, hits, late, misses, len(keys))

    def _wait_loads(self, pending: list) -> None:
        """Run the heap until every load of `pending` has landed and the driver's wake-up, made
        when the last one lands, comes up."""
        waiting = [ld for ld, _ in pending if ld.done_t < 0]
        if not waiting:
            return
        left = [len(waiting)]

        def arrived(left=left):
            left[0] -= 1
            if left[0] == 0:
                self._wake()
        for ld in waiting:
            ld.waiters.append(arrived)
        self._run()


def drive(path) -> None:
    """Simulation._driver as a loop, for a path without SimPy (its `sim`, `env`, `rec`, `_sleep`
    and `_step`): each step at the time it starts; idle when nothing is runnable before the next
    arrival."""
    env, rec, sched = path.env, path.rec, path.sim.sched
    while True:
        plan = sched.next_step(env.now)
        if plan is None:
            return
        if not isinstance(plan, StepPlan):  # nothing runnable: idle until the next arrival
            rec.idle_s += plan - env.now
            path._sleep(plan - env.now)
            continue
        path._step(plan)


def dense_blocks(path, plan: StepPlan, gpu_extra: float) -> float:
    """Simulation._step's start after its hook: the dense blocks before the first MoE block
    (resident weights, compute only) and the hook's GPU seconds `gpu_extra`; returns the step's
    attention seconds (every layer's)."""
    cost, rec = path.cost, path.rec
    attn = cost.attention_s(plan.tokens, plan.context_tokens, len(plan.request_ids))
    dense = path.sim.model.first_dense_layers * (attn + cost.dense_ffn_s(plan.tokens))
    if dense + gpu_extra > 0:
        rec.compute_s += dense + gpu_extra
        path._sleep(dense + gpu_extra)
    return attn


def step_end(path, plan: StepPlan, view, t_step: float) -> None:
    """Simulation._step's end: the predictor learns from the whole step, the LM head runs, the
    step is recorded."""
    sim, rec = path.sim, path.rec
    view.gated = sim.L - 1
    sim.predictor.on_step_end(view)
    head = path.cost.lm_head_s(plan.tokens)
    if head > 0:
        rec.compute_s += head
        path._sleep(head)
    rec.step_end(plan, t_step, path.env.now)


def kernels(path, pending: list, t_gate: float, busy: float) -> float:
    """Simulation._layer's kernels: the hits' (`busy` seconds from the gate), then each loaded
    expert's once its load has landed, in landing order; the driver sleeps until the last ends.
    Returns the layer's busy seconds."""
    cursor = t_gate + busy
    if pending:
        path._wait_loads(pending)
        pending.sort(key=_done_t)
        for ld, c in pending:
            cursor = max(cursor, ld.done_t) + c
            busy += c
    if cursor > path.env.now:
        path._sleep(cursor - path.env.now)
    return busy


def _done_t(p) -> float:
    return p[0].done_t
