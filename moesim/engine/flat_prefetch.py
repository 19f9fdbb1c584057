"""The flat prefetch path: the prefetch fast path's run for its common case, with the cache, the
link and the loads held in plain dicts, sets and deques (engine/flat_link.py) instead of the
Simulation's objects.

engine/fast_prefetch.py runs the Simulation's own load chain (Load objects, channel queues, the
Tier and its policy object) on a heap clock; each copy there goes through some ten calls. This
path makes the same decisions inline, for runs with: no DRAM tier, an LRU or FIFO GPU tier (global
or per layer), dedup, predictor hooks that issue at once (latency 0, or on the GPU), and nothing the prefetch path leaves out (`unsupported`). The driver below is
FastPrefetch's (with its shared steps: drive, dense_blocks, kernels, step_end).
tests/test_engine_flat_prefetch.py checks the results equal the SimPy engine's bit
for bit on random scenarios, times that tie included.
"""
from __future__ import annotations

from ..cache.policies import FIFO, LRU
from ..predictors.base import Predictor
from .fast_prefetch import dense_blocks, drive, kernels, step_end, unsupported as prefetch_unsupported
from .flat_link import FlatLink, _Load
from .plan import StepPlan, flat_keys
from .sim import Simulation, _View


def unsupported(sim: Simulation) -> str | None:
    """Why `sim` needs the general prefetch path (or SimPy), or None when this one runs it."""
    why = prefetch_unsupported(sim)
    if why is not None:
        return why
    gpu, params, pred = sim.gpu, sim.predictor.params, sim.predictor
    parts = ((sim.dram is not None, "a DRAM tier"),
             (gpu.capacity is None, "an unbounded GPU tier"),
             (type(gpu._policies[0]) not in (LRU, FIFO), f"GPU policy {gpu.policy}"),
             (not sim.dedup, "batch.dedup off"),
             (params.runs_on == "cpu" and (params.latency_us != 0
                                           or type(pred).latency_for is not Predictor.latency_for),
              "a host-CPU predictor's latency"),
             (sim.cost.pcie_s(sim.eb) <= 0, "copies that take no time"))
    return next((why for bad, why in parts if bad), None)


class FlatPrefetch(FlatLink):
    """Runs a Simulation as FastPrefetch does, flat (see the module docstring):
    `FlatPrefetch(sim).run()` in place of `sim.run()`, for a sim with nothing `unsupported`."""

    def __init__(self, sim: Simulation):
        why = unsupported(sim)
        if why is not None:
            raise ValueError(f"the flat prefetch path does not model {why}")
        super().__init__(sim)
        self.view: _View | None = None
        self._on_step_start, self._on_pre_attention, self._on_gate = (
            sim._implements[h] for h in ("on_step_start", "on_pre_attention", "on_gate"))

    def run(self):
        """Simulation.run: the driver's steps, then the copies still in flight; returns the Recorder."""
        sim, env, rec = self.sim, self.env, self.rec
        drive(self)
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
        """Simulation._step: set-up and hooks, the dense blocks, every MoE layer, the LM head. The
        step's keys are read once, as lists (every layer's slice of them)."""
        sim, rec, pred = self.sim, self.rec, self.sim.predictor
        view = self.view = sim.view = _View(sim, plan)
        t_step = self.env.now
        rec.step_start(plan, t_step)
        self._issued = rec.prefetch_issued  # prefetches issued before the step: not its first row's
        self.lat = pred.latency_for(plan.tokens) * 1e-6
        self._shared_s = self._shared[plan.tokens]
        reqs = pred.on_step_start(view)
        attn = dense_blocks(self, plan, self._hooked(reqs) if self._on_step_start else 0.0)
        fk, fc, bounds = flat_keys(plan)
        sim.accessed.append(fk)  # (every layer's keys in order: the gap report's stream)
        allk, allc = fk.tolist(), fc.tolist()
        costs = list(map(self._ecs.__getitem__, allc))
        self._rows: list[tuple] = []  # the step's layer rows (Recorder.step_rows)
        for layer in range(sim.L):
            lo, hi = bounds[layer], bounds[layer + 1]
            self._layer(plan, layer, attn, allk[lo:hi], allc[lo:hi], costs[lo:hi])
        rec.step_rows(plan, self._rows)
        step_end(self, plan, view, t_step)

    def _layer(self, plan: StepPlan, layer: int, attn: float, keys: list[int], counts: list[int],
               costs: list[float]) -> None:
        """Simulation._layer: attention, the gate (LoadChain._gate: its predictions scored), the
        accesses, the wait for the layer's loads, the kernels, the unpins, the row."""
        sim, env, rec, view = self.sim, self.env, self.rec, self.view
        t0 = env.now
        view.pre_attn_layer = layer
        pre = self._hooked(sim.predictor.on_pre_attention(view, layer)) if self._on_pre_attention else 0.0
        self._sleep(pre + attn)
        t_gate = env.now
        target = self.gated = (plan.index, layer)
        view.gated = layer
        gate_reqs = sim.predictor.on_gate(view, layer)
        pset = self.predicted.pop(target, None)
        self.pbytes.pop(target, None)
        rec.pred_needed[layer] += len(keys)
        if pset:
            rec.pred_made[layer] += len(pset)
            rec.pred_correct[layer] += len(pset.intersection(keys))
        hits, late, misses, busy, pending, pinned = self._access(target, keys, counts, costs, self._shared_s)
        if self._on_gate:
            busy += self._hooked(gate_reqs)
        busy = kernels(self, pending, t_gate, busy)
        self._unpin_all(pinned)  # (PinLedger._layer_done)
        if self.protected:
            self._release(target)
        issued = rec.prefetch_issued
        self._rows.append((layer, t0, t_gate, env.now, attn + pre, busy, env.now - t_gate - busy, hits, late,
                           misses, len(keys), issued - self._issued))
        self._issued = issued

    def _access(self, target: tuple[int, int], keys: list[int], counts: list[int], costs: list[float],
                busy: float) -> tuple:
        """LoadChain._access_layer with dedup: a hit is touched and pinned (its kernel seconds added
        to `busy`, in access order), a key on its way waited for (a queued prefetch promoted to the
        demand queue), a miss queues a demand load. Returns (hits, late, misses, busy,
        [(load, seconds)] to wait for, the pinned keys)."""
        ready, pins, loads, rec = self.ready, self.pins, self.loads, self.rec
        unused = self.unused
        touch = self.ods[target[1] if self.per_layer else 0].move_to_end if self.lru else None
        hits = late = misses = saved = 0
        pending: list = []
        bypassed = None
        for key, cnt, c in zip(keys, counts, costs):
            if key in ready:
                if touch is not None:
                    touch(key)
                pins[key] += 1
                busy += c
                hits += 1
                if key in unused:
                    unused.discard(key)
                    rec.prefetch_used += 1
                continue
            saved += cnt - 1  # without dedup each further token would copy it again
            ld = loads.get(key)
            if ld is not None:  # on its way: wait for it
                late += 1
                if type(ld) is tuple:  # a queued prefetch: promoted (Channel.promote) to the demand queue
                    rec.prefetch_late += 1
                    self.pq.remove(ld)
                    ld = loads[key] = _Load(key, False, ld[1])
                    ld.counted = True
                    self.dq.append(ld)
                    if self.busy < self.slots:
                        self._dispatch()
                elif ld.prefetch:  # copying already: it stays a prefetch copy on the link
                    rec.prefetch_late += 1
                    ld.prefetch = False
            else:
                misses += 1
                ld = loads[key] = _Load(key, False, target)
                self.dq.append(ld)
                if self.busy < self.slots:
                    self._dispatch()
            if ld.bypass:  # (copied through a transient buffer: not cached, not pinned)
                bypassed = bypassed or set()
                bypassed.add(key)
            else:
                pins[key] += 1
            pending.append((ld, c))
        rec.saved_loads += saved
        pinned = keys if bypassed is None else [k for k in keys if k not in bypassed]
        return hits, late, misses, busy, pending, pinned

    def _release(self, upto: tuple[int, int]) -> None:
        """Unpin the protections whose target layer is at or before `upto`."""
        for target in [t for t in self.protected if t <= upto]:
            self._unpin_all(self.protected.pop(target))
