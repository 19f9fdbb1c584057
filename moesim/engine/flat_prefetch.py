"""The flat prefetch path: the prefetch fast path's run for its common case, with the cache, the
link and the loads held in arrays and moved by compiled code (engine/flat_link.py, flat_jit.py)
instead of the Simulation's objects.

engine/fast_prefetch.py runs the Simulation's own load chain (Load objects, channel queues, the
Tier and its policy object) on a heap clock; each copy there goes through some ten Python calls.
This path makes the same decisions in one compiled call per layer, for runs with: no DRAM tier,
an LRU or FIFO GPU tier (global or per layer), dedup, predictor hooks that issue at once (latency
0, or on the GPU), numba installed, and nothing the prefetch path leaves out (`unsupported`, in
engine/fast.py: it must not import numba). The driver below is FastPrefetch's (with its shared
steps: drive, dense_blocks, step_end); the predictor's hooks stay Python.
tests/test_engine_flat_prefetch.py checks the results equal the SimPy engine's bit for bit on
random scenarios, times that tie included.
"""
from __future__ import annotations

import numpy as np

from . import flat_jit as J
from .fast import flat_unsupported as unsupported
from .fast_prefetch import dense_blocks, drive, step_end
from .flat_link import FlatLink
from .plan import StepPlan, flat_keys
from .sim import Simulation, _View

_NONE = np.zeros(1, dtype=np.int64)  # (no blocks)


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
        drive(self)
        self._drain()
        self.rec.finish(self.sim)
        return self.rec

    def _step(self, plan: StepPlan) -> None:
        """Simulation._step: set-up and hooks, the dense blocks, every MoE layer, the LM head. The
        step's keys are read once (every layer's slice of them)."""
        sim, rec, pred = self.sim, self.rec, self.sim.predictor
        view = self.view = sim.view = _View(sim, plan)
        t_step = self.env.now
        rec.step_start(plan, t_step)
        self._issued = int(self.Z[J.S, J.C_ISSUED])  # prefetches issued before the step: not its first row's
        self.lat = pred.latency_for(plan.tokens) * 1e-6
        shared = self._shared[plan.tokens]
        reqs = pred.on_step_start(view)
        attn = dense_blocks(self, plan, self._hooked(reqs) if self._on_step_start else 0.0)
        fk, fc, bounds = flat_keys(plan)
        sim.accessed.append(fk)  # (every layer's keys in order: the gap report's stream)
        allk = fk.tolist()
        ecs = self._ecs
        costs = np.array([ecs[c] for c in fc.tolist()], dtype=np.float64)
        fk, fc = fk.astype(np.int64, copy=False), fc.astype(np.int64, copy=False)
        rec.step_rows(plan, self._layers(plan, attn, allk, fk, fc, costs, bounds, shared))
        step_end(self, plan, view, t_step)

    def _layers(self, plan: StepPlan, attn: float, allk: list[int], fk, fc, costs, bounds: list[int],
                shared: float) -> list[tuple]:
        """Simulation._layer for every MoE layer: its hooks asked, the predictions for it scored
        (LoadChain._gate), then in one compiled call (flat_jit.layer) the pre-attention hook's
        prefetches issued, attention, the gate, the accesses fk[lo:hi], the gate hook's
        prefetches, the wait for the layer's loads, the kernels and the unpins. A hook that reads
        only the routing can be asked before the sleep to the gate; one that reads the trace ahead
        (`future`) with open-loop arrivals (its later steps are formed from the requests arrived
        by now) is asked at the gate's time, between two calls (to_gate, from_gate). Returns the layers' rows
        (Recorder.step_rows)."""
        env, rec, view, pred = self.env, self.rec, self.view, self.sim.predictor
        Z, X, predicted, pack = self.Z, self.X, self.predicted, self._pack
        layer_moves, to_gate, from_gate = J.layer, J.to_gate, J.from_gate
        on_pre, on_gate, log = self._on_pre_attention, self._on_gate, self.log
        lat, step, L = self.lat, plan.index, self.L
        hook_gpu = lat if self.on_gpu else 0.0
        needed, made, correct = rec.pred_needed, rec.pred_made, rec.pred_correct
        rows: list[tuple] = []
        issued0 = self._issued
        # (of the view, only `future` reads the time: its later steps are the requests arrived by now)
        timeless = not (pred.needs_future and getattr(self.sim.sched, "timed", True))
        for layer in range(L):
            lo, hi = bounds[layer], bounds[layer + 1]
            t0 = env.now
            out = [0]  # the hooks' blocks (FlatLink._pack): the pre-attention hook's, then the gate's
            view.pre_attn_layer = layer
            pre = 0.0
            if on_pre:
                reqs = pred.on_pre_attention(view, layer)
                rec.predictor_s += lat
                pre = hook_gpu
                if reqs:
                    pack(reqs, out)
            gate_at = len(out)
            target = self.gated = (step, layer)
            view.gated = layer
            if not timeless:  # the gate hook is asked at the gate's time
                if log is not None:
                    self._room()
                blocks = self._blocks(out)  # (first: it may grow PR)
                t_gate, self.npr = to_gate(Z, X, self.EI, self.EF, self.PR, blocks, gate_at, float(pre + attn))
                env.now = t_gate
                out = [0]
                gate_at = 1
            gate_gpu = 0.0
            if on_gate:
                reqs = pred.on_gate(view, layer)
                rec.predictor_s += lat
                gate_gpu = hook_gpu
                if reqs:
                    pack(reqs, out)
            n = hi - lo
            needed[layer] += n
            pset = predicted.pop(target, None)
            if pset:
                made[layer] += len(pset)
                correct[layer] += len(pset.intersection(allk[lo:hi]))
            if log is not None:
                self._room()
            blocks = self._blocks(out) if len(out) > 1 else _NONE  # (before PR is read: it may grow it)
            if timeless:
                t_gate, hits, late, misses, busy, now, issued, self.npr = layer_moves(
                    Z, X, self.EI, self.EF, self.PR, blocks, gate_at, float(pre + attn), step * L + layer, fk, fc,
                    costs, lo, hi, shared, gate_gpu)
            else:
                hits, late, misses, busy, now, issued, self.npr = from_gate(
                    Z, X, self.EI, self.EF, self.PR, blocks, gate_at, t_gate, step * L + layer, fk, fc, costs, lo, hi,
                    shared, gate_gpu)
            env.now = now
            rows.append((layer, t0, t_gate, now, attn + pre, busy, now - t_gate - busy, hits, late, misses, n,
                         issued - issued0))
            issued0 = issued
        return rows
