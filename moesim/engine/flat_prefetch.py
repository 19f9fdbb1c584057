"""The flat prefetch path: the prefetch fast path's run for its common case, with the cache, the
link and the loads held in plain dicts, sets and deques instead of the Simulation's objects.

engine/fast_prefetch.py runs the Simulation's own load chain (Load objects, channel queues, the
Tier and its policy object) on a heap clock. Each copy there goes through some ten calls; this
path makes the same decisions inline, for runs with: no DRAM tier, a GPU tier that is one global
LRU or FIFO, dedup, predictor hooks that issue at once (latency 0, or on the GPU),
no prefetch budgets, and the constraints of the prefetch path (`unsupported`).

Why no heap is needed: every copy is one expert, so each takes the same `d` seconds; copies start
at the current time, which never goes back, so copies in flight end in the order they started,
and those with equal ends were started (and made their heap entries) in that order too. The heap
of FastPrefetch is thus the deque `_fly` of copies in flight plus the driver's one wake-up; a
counter `_seq` numbers both as FastPrefetch's heap does, which decides ties at equal times.
tests/test_engine_flat_prefetch.py checks the results equal the SimPy engine's bit for bit.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from functools import reduce
from operator import add

from ..cache.policies import FIFO, LRU
from ..predictors.base import Predictor, ranked_blocks
from .channels import DEMAND, PREFETCH
from .fast_prefetch import unsupported as prefetch_unsupported
from .plan import StepPlan
from .sim import Simulation, _Memo, _View


def unsupported(sim: Simulation) -> str | None:
    """Why `sim` needs the general prefetch path (or SimPy), or None when this one runs it."""
    why = prefetch_unsupported(sim)
    if why is not None:
        return why
    gpu, params, pred = sim.gpu, sim.predictor.params, sim.predictor
    parts = ((sim.dram is not None, "a DRAM tier"),
             (gpu.partition != "global", "a per-layer GPU tier"),
             (gpu.capacity is None, "an unbounded GPU tier"),
             (type(gpu._policies[0]) not in (LRU, FIFO), f"GPU policy {gpu.policy}"),
             (not sim.dedup, "batch.dedup off"),
             (params.max_inflight is not None or params.max_bytes_per_layer is not None, "prefetch budgets"),
             (params.runs_on == "cpu" and (params.latency_us != 0
                                           or type(pred).latency_for is not Predictor.latency_for),
              "a host-CPU predictor's latency"),
             (sim.cost.pcie_s(sim.eb) <= 0, "copies that take no time"))
    return next((why for bad, why in parts if bad), None)


class _Clock:
    """What the view and the recorder read of an environment: the simulated time."""

    __slots__ = ("now",)

    def __init__(self):
        self.now = 0  # an int, as SimPy's clock starts


class _Load:
    """An expert on its way to the GPU: queued, then copying (`start`, `end`, heap order `seq`)."""

    __slots__ = ("key", "prefetch", "prio", "target", "pins", "reserved", "bypass", "waited",
                 "done_t", "start", "end", "seq")

    def __init__(self, key: int, prefetch: bool, target: tuple[int, int], pins: int):
        self.key, self.prefetch, self.target, self.pins = key, prefetch, target, pins
        self.prio = PREFETCH if prefetch else DEMAND
        self.reserved = self.bypass = self.waited = False  # reserved: holds a GPU slot (from its copy's start)
        self.done_t = self.start = -1.0


class FlatPrefetch:
    """Runs a Simulation as FastPrefetch does, flat (see the module docstring):
    `FlatPrefetch(sim).run()` in place of `sim.run()`, for a sim with nothing `unsupported`."""

    def __init__(self, sim: Simulation):
        why = unsupported(sim)
        if why is not None:
            raise ValueError(f"the flat prefetch path does not model {why}")
        self.sim, self.rec, self.cost = sim, sim.rec, sim.cost
        self.env = sim.env = _Clock()
        self.view: _View | None = None
        self._ecs = _Memo(sim.cost.expert_compute_s)  # tokens -> one expert kernel's seconds
        self._shared = _Memo(sim.cost.shared_compute_s)
        self.d = sim.cost.pcie_s(sim.eb)  # every copy's seconds (one expert each)
        self.slots = sim.pcie.slots
        self.log = sim.events_log
        # the GPU tier: every key holding a slot in eviction order (READY and IN_FLIGHT), the READY
        # ones, the pin counts; IN_FLIGHT keys are those of reserved loads
        self.cap = sim.gpu.capacity
        self.lru = type(sim.gpu._policies[0]) is LRU
        self.od: OrderedDict[int, None] = OrderedDict.fromkeys(sim.gpu._policies[0]._od)  # (preloaded keys)
        self.ready = set(self.od)
        self.pins: dict[int, int] = {}
        self.loads: dict[int, _Load] = {}  # key -> its load, until it lands (a bypassed one leaves at its start)
        self.stale_pins: dict[int, int] = {}  # key -> unpins to ignore (pins of loads that never got a slot)
        self.protected: dict[tuple[int, int], list[int]] = {}
        self.dq: deque[_Load] = deque()  # the link's demand queue
        self.pq: deque[_Load] = deque()  # its prefetch queue
        self.fly: deque[_Load] = deque()  # copies in flight, in start (= end) order
        self.busy = self.transfers = 0
        self.busy_time = 0.0
        self.seq = 0
        self.left = 0  # waited loads not landed yet
        self.wake = -1  # the seq of the driver's wake-up when the last waited load landed (-1: none)
        self.gated = (-1, -1)
        self.protect = sim.predictor.params.protect
        self.on_gpu = sim.predictor.params.runs_on == "gpu"

    # ---- the clock ---------------------------------------------------------------------------

    def _sleep(self, dt: float) -> None:
        """The driver sleeps `dt`: copies that end before its wake-up (or at it, made before it) land."""
        env, fly = self.env, self.fly
        self.seq += 1
        ws, t = self.seq, env.now + dt
        while fly:
            ld = fly[0]
            if ld.end < t or (ld.end == t and ld.seq < ws):
                fly.popleft()
                env.now = ld.end
                self._finish(ld)
            else:
                break
        env.now = t

    def _wait_loads(self, pending: list) -> None:
        """Land copies until every load of `pending` has, then those before the driver's wake-up."""
        waiting = [ld for ld, _ in pending if ld.done_t < 0]
        if not waiting:
            return
        for ld in waiting:
            ld.waited = True
        self.left, self.wake = len(waiting), -1
        env, fly = self.env, self.fly
        while self.wake < 0:
            ld = fly.popleft()
            env.now = ld.end
            self._finish(ld)
        t, ws = env.now, self.wake
        while fly and fly[0].end == t and fly[0].seq < ws:
            self._finish(fly.popleft())

    # ---- the link ----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Start queued copies on free slots: demand first; a stale or slotless prefetch is dropped."""
        dq, pq, fly, now = self.dq, self.pq, self.fly, self.env.now
        while self.busy < self.slots:
            if dq:
                ld = dq.popleft()
                self._claim(ld)  # (a demand copy always starts: in a slot, or bypassing the cache)
            else:
                gated = self.gated
                while pq:
                    ld = pq.popleft()
                    if ld.target > gated and self._claim(ld):
                        break
                    self._drop(ld)
                else:
                    return
            self.busy += 1
            ld.start, ld.end = now, now + self.d
            self.seq += 1
            ld.seq = self.seq
            fly.append(ld)

    def _claim(self, ld: _Load) -> bool:
        """At a copy's start, reserve its GPU slot (Tier.reserve, evicting the oldest READY key not
        pinned); with none, a prefetch is dropped (False) and a demand copy bypasses the cache."""
        key, od, cap = ld.key, self.od, self.cap
        if len(od) >= cap:
            v = None
            if cap:
                pins, ready = self.pins, self.ready
                for k in od:  # (IN_FLIGHT keys are not READY)
                    if k not in pins and k in ready:
                        v = k
                        break
            if v is None:
                if ld.prefetch:
                    return False
                ld.bypass = True
                self.rec.bypass += 1
                del self.loads[key]
                self._forget_pins(ld)
                return True
            del od[v]
            self.ready.discard(v)
            unused = self.sim.prefetched_unused
            if v in unused:
                unused.discard(v)
                self.rec.prefetch_wasted += 1
            self.rec.gpu_evictions += 1
        od[key] = None
        ld.reserved = True
        if ld.pins:
            self.pins[key] = self.pins.get(key, 0) + ld.pins
            ld.pins = 0
        return True

    def _forget_pins(self, ld: _Load) -> None:
        """A load that never got a slot takes its waiting pins with it: their unpins become no-ops."""
        if ld.pins:
            self.stale_pins[ld.key] = self.stale_pins.get(ld.key, 0) + ld.pins
            ld.pins = 0

    def _drop(self, ld: _Load) -> None:
        """A queued prefetch leaves without a copy (stale, or no slot for it)."""
        del self.loads[ld.key]
        self._forget_pins(ld)
        self.rec.prefetch_dropped += 1

    def _finish(self, ld: _Load) -> None:
        """The copy of `ld` has ended (now): free its link slot, land it, start what is queued."""
        self.busy -= 1
        self.busy_time += ld.end - ld.start
        self.transfers += 1
        if self.log is not None:
            self.log.append(("pcie", ld.key, ld.prio, ld.start, ld.end))
        ld.done_t = self.env.now
        if not ld.bypass:
            key = ld.key
            self.ready.add(key)
            del self.loads[key]
            if ld.prefetch:
                self.sim.prefetched_unused.add(key)
        if ld.waited:
            self.left -= 1
            if self.left == 0:
                self.seq += 1
                self.wake = self.seq
        if self.dq or self.pq:
            self._dispatch()

    # ---- pins --------------------------------------------------------------------------------

    def _pin(self, key: int, ld: _Load | None) -> None:
        """One pin on `key`: on the GPU slot, or waiting on its load `ld` until it holds one."""
        if ld is not None and not ld.reserved:
            ld.pins += 1
        else:
            self.pins[key] = self.pins.get(key, 0) + 1

    def _unpin_all(self, keys: list[int]) -> None:
        """PinLedger._unpin_all: each unpin cancels a stale pin first, else a waiting one, else the slot's."""
        stale_pins, loads, pins = self.stale_pins, self.loads, self.pins
        for key in keys:
            if stale_pins:
                s = stale_pins.get(key)
                if s:
                    if s == 1:
                        del stale_pins[key]
                    else:
                        stale_pins[key] = s - 1
                    continue
            ld = loads.get(key)
            if ld is not None and not ld.reserved:
                ld.pins -= 1
                continue
            c = pins[key]
            if c > 1:
                pins[key] = c - 1
            else:
                del pins[key]

    # ---- prefetch ----------------------------------------------------------------------------

    def _hook(self, reqs, hook: str, tokens: int) -> float:
        """Simulation._hook for a predictor that issues at once; returns its GPU-stream seconds."""
        sim = self.sim
        if not sim._implements[hook]:
            return 0.0
        lat = sim.predictor.latency_for(tokens) * 1e-6
        self.rec.predictor_s += lat
        if reqs:
            self._issue(reqs)
        return lat if self.on_gpu else 0.0

    def _issue(self, reqs) -> None:
        """LoadChain._issue without budgets: each target's experts, best first, as loads or pins."""
        E, cur, protect = self.sim.E, self.gated, self.protect
        predicted, protected = self.sim.predicted, self.protected
        for step, layer, experts, _scores in ranked_blocks(reqs):
            target = (step, layer)
            if target <= cur:
                continue
            base = layer * E
            keys = [base + e for e in experts]
            pset = predicted.get(target)
            if pset is None:
                predicted[target] = set(keys)
            else:
                pset.update(keys)
            if protect and self.busy >= self.slots:
                plist = self._issue_held(keys, target)
            else:
                plist = self._issue_keys(keys, target, protect)
            if plist:
                held = protected.get(target)
                if held is None:
                    protected[target] = plist
                else:
                    held.extend(plist)

    def _issue_keys(self, keys: list[int], target: tuple[int, int], protect: bool) -> list[int]:
        """One target's keys in order: pin what is on its way or resident (with protect), queue a
        prefetch for the rest (started at once while a slot is free). Returns the keys protected."""
        loads, od, pins, pq, rec = self.loads, self.od, self.pins, self.pq, self.rec
        plist: list[int] = []
        for key in keys:
            ld = loads.get(key)
            if ld is not None or key in od:  # on its way, or resident (a key in flight has a load)
                if protect:
                    self._pin(key, ld)
                    plist.append(key)
                continue
            ld = loads[key] = _Load(key, True, target, 0)
            pq.append(ld)
            rec.prefetch_issued += 1
            if self.busy < self.slots:
                self._dispatch()
            if protect and key in loads:  # (a prefetch with no slot to land in was dropped at once)
                self._pin(key, ld)
                plist.append(key)
        return plist

    def _issue_held(self, keys: list[int], target: tuple[int, int]) -> list[int]:
        """_issue_keys with protect while no copy can start (LoadChain._issue_held): the keys holding
        a slot are pinned, the others queued or pinned on their loads. Returns the keys protected."""
        od, pins, loads = self.od, self.pins, self.loads
        plist: list[int] = []
        rest: list[int] = []
        for key in keys:
            if key in od:
                pins[key] = pins.get(key, 0) + 1
                plist.append(key)
            else:
                rest.append(key)
        if not rest:
            return plist
        queued: list[_Load] = []
        for key in rest:
            ld = loads.get(key)
            if ld is None:
                ld = loads[key] = _Load(key, True, target, 1)
                queued.append(ld)
            else:  # on its way with no slot yet (or a key twice): the pin waits on its load
                ld.pins += 1
        self.pq.extend(queued)
        self.rec.prefetch_issued += len(queued)
        return plist + rest

    # ---- the driver (FastPrefetch's, flat) ---------------------------------------------------

    def run(self):
        """Simulation.run: the driver's steps, then the copies still in flight; returns the Recorder."""
        sim, env, rec = self.sim, self.env, self.rec
        sched = sim.sched
        while True:
            plan = sched.next_step(env.now)
            if plan is None:
                break
            if not isinstance(plan, StepPlan):  # nothing runnable: idle until the next arrival
                rec.idle_s += plan - env.now
                self._sleep(plan - env.now)
                continue
            self._step(plan)
        fly = self.fly
        while fly:  # the copies still in flight (and those they start), as SimPy's run goes on
            ld = fly.popleft()
            env.now = ld.end
            self._finish(ld)
        pcie = sim.pcie  # what the recorder reads of the link
        pcie.transfers, pcie.busy_time, pcie.bytes = self.transfers, self.busy_time, self.transfers * sim.eb
        rec.finish(sim)
        return rec

    def _step(self, plan: StepPlan) -> None:
        """Simulation._step: set-up and hooks, the dense blocks, every MoE layer, the LM head."""
        sim, env, cost, rec = self.sim, self.env, self.cost, self.rec
        m, pred = sim.model, sim.predictor
        view = self.view = sim.view = _View(sim, plan)
        t_step = env.now
        rec.step_start(plan, t_step)
        gpu_extra = self._hook(pred.on_step_start(view), "on_step_start", plan.tokens)
        attn = cost.attention_s(plan.tokens, plan.context_tokens, len(plan.request_ids))
        dense = m.first_dense_layers * (attn + cost.dense_ffn_s(plan.tokens))
        if dense + gpu_extra > 0:
            rec.compute_s += dense + gpu_extra
            self._sleep(dense + gpu_extra)
        for layer in range(sim.L):
            self._layer(plan, layer, attn)
        view.gated = sim.L - 1
        pred.on_step_end(view)
        head = cost.lm_head_s(plan.tokens)
        if head > 0:
            rec.compute_s += head
            self._sleep(head)
        rec.step_end(plan, t_step, env.now)

    def _layer(self, plan: StepPlan, layer: int, attn: float) -> None:
        """Simulation._layer: attention, the gate, the accesses, the wait for the layer's loads,
        the kernels, the unpins, the row."""
        sim, env, rec, view = self.sim, self.env, self.rec, self.view
        t0 = env.now
        view.pre_attn_layer = layer
        pre = self._hook(sim.predictor.on_pre_attention(view, layer), "on_pre_attention", plan.tokens) \
            if sim._implements["on_pre_attention"] else 0.0
        self._sleep(pre + attn)
        t_gate = env.now
        keys = plan.keys[layer]
        self.gated = (plan.index, layer)  # (LoadChain._gate)
        view.gated = layer
        gate_reqs = sim.predictor.on_gate(view, layer)
        sim._score_predictions(self.gated, keys)
        sim.accessed.append(keys)
        counts = plan.counts[layer].tolist()
        hits, late, misses, hit_costs, pending, pinned = self._access(
            plan.index, layer, keys.tolist(), counts, list(map(self._ecs.__getitem__, counts)))
        busy = reduce(add, hit_costs, self._shared[plan.tokens])
        busy += self._hook(gate_reqs, "on_gate", plan.tokens)
        cursor = t_gate + busy
        if pending:
            self._wait_loads(pending)
            pending.sort(key=_done_t)
            for ld, c in pending:
                cursor = max(cursor, ld.done_t) + c
                busy += c
        if cursor > env.now:
            self._sleep(cursor - env.now)
        self._unpin_all(pinned)  # (PinLedger._layer_done)
        if self.protected:
            self._release((plan.index, layer))
        rec.layer_row(plan, layer, t0, t_gate, env.now, attn + pre, busy,
                      env.now - t_gate - busy, hits, late, misses, len(keys))

    def _access(self, step: int, layer: int, keys: list[int], counts: list[int], costs: list[float]) -> tuple:
        """LoadChain._access_layer with dedup: a hit is touched and pinned, a key on its way waited
        for (a queued prefetch promoted to the demand queue), a miss queues a demand load.
        Returns (hits, late, misses, the hits' kernel seconds, [(load, seconds)] to wait for, pinned keys)."""
        ready, od, pins, loads, rec = self.ready, self.od, self.pins, self.loads, self.rec
        unused = self.sim.prefetched_unused
        touch = od.move_to_end if self.lru else None
        hits = late = misses = saved = 0
        hit_costs: list[float] = []
        pending: list = []
        pinned: list[int] = []
        for key, cnt, c in zip(keys, counts, costs):
            if key in ready:
                if touch is not None:
                    touch(key)
                pins[key] = pins.get(key, 0) + 1
                hits += 1
                hit_costs.append(c)
                if key in unused:
                    unused.discard(key)
                    rec.prefetch_used += 1
                pinned.append(key)
                continue
            saved += cnt - 1  # without dedup each further token would copy it again
            ld = loads.get(key)
            if ld is not None:  # on its way: wait for it
                late += 1
                if ld.prefetch:
                    rec.prefetch_late += 1
                    ld.prefetch = False
                    if ld.start < 0:  # (Channel.promote: queued still, it joins the demand queue)
                        self.pq.remove(ld)
                        ld.prio = DEMAND
                        self.dq.append(ld)
                        if self.busy < self.slots:
                            self._dispatch()
            else:
                misses += 1
                ld = loads[key] = _Load(key, False, (step, layer), 0)
                self.dq.append(ld)
                if self.busy < self.slots:
                    self._dispatch()
            if not ld.bypass:
                self._pin(key, ld)
                pinned.append(key)
            pending.append((ld, c))
        rec.saved_loads += saved
        return hits, late, misses, hit_costs, pending, pinned

    def _release(self, upto: tuple[int, int]) -> None:
        """Unpin the protections whose target layer is at or before `upto`."""
        for target in [t for t in self.protected if t <= upto]:
            self._unpin_all(self.protected.pop(target))


def _done_t(p) -> float:
    return p[0].done_t
