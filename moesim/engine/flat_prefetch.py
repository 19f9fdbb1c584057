"""The flat prefetch path: the prefetch fast path's run for its common case, with the cache, the
link and the loads held in arrays and moved by compiled code (engine/flat_link.py, flat_jit.py)
instead of the Simulation's objects.

engine/fast_prefetch.py runs the Simulation's own load chain (Load objects, channel queues, the
Tier and its policy object) on a heap clock; each copy there goes through some ten Python calls.
This path makes the same decisions in one compiled call per step, for runs with: no DRAM tier,
an LRU or FIFO GPU tier (global or per layer), dedup, predictor hooks that issue at once (latency
0, or on the GPU), numba installed, and nothing the prefetch path leaves out (`unsupported`, in
engine/fast.py: it must not import numba). The driver below is FastPrefetch's (with its shared
steps: drive, dense_blocks, step_end); the predictor's hooks stay its own (Python, or its
compiled step-level `on_gates`).
tests/test_engine_flat_prefetch.py checks the results equal the SimPy engine's bit for bit on
random scenarios, times that tie included.
"""
from __future__ import annotations

import numpy as np

from ..predictors.base import GateBlocks
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
        self._fc = self._costs = None  # the last step's counts and its keys' kernel seconds
        # the last step's layer starts (and as an array, and its keys per layer)
        self._bounds = self._starts = self._nkeys = None
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
        if fc is not self._fc:  # (one-token steps share their counts: plan._ones)
            ecs = self._ecs
            self._fc, self._costs = fc, np.array([ecs[c] for c in fc.tolist()], dtype=np.float64)
        costs = self._costs
        fk, fc = fk.astype(np.int64, copy=False).view(), fc.astype(np.int64, copy=False).view()
        fk.flags.writeable = fc.flags.writeable = False  # (always read-only: one compiled signature, not two)
        self._layers(plan, attn, fk, fc, costs, bounds, shared)
        step_end(self, plan, view, t_step)

    def _layers(self, plan: StepPlan, attn: float, fk, fc, costs, bounds: list[int],
                shared: float) -> None:
        """Simulation._layer for every MoE layer: its hooks asked, the predictions for it scored
        (LoadChain._gate); then the pre-attention hook's prefetches issued, attention, the gate,
        the accesses fk[lo:hi], the gate hook's prefetches, the wait for the layer's loads, the
        kernels and the unpins, all compiled (flat_jit). Hooks that read only the routing are all
        asked first, and the step's layers run in one call (flat_jit.layers); a hook that reads the
        trace ahead (`future`) with open-loop arrivals (its later steps are formed from the
        requests arrived by now) is asked at its gate's time, between two calls per layer
        (to_gate, from_gate). A predictor without a pre-attention hook may answer every gate at
        once (Predictor.on_gates; a GateBlocks is packed from its arrays). The layers' rows go to
        the Recorder."""
        pred = self.sim.predictor
        # (of the view, only `future` reads the time: its later steps are the requests arrived by now)
        if pred.needs_future and getattr(self.sim.sched, "timed", True):
            self._layers_at_gates(plan, attn, fk, fc, costs, bounds, shared)
            return
        L, step, lat, rec, view = self.L, plan.index, self.lat, self.rec, self.view
        on_pre, on_gate, pack = self._on_pre_attention, self._on_gate, self._pack
        out = [0]  # every hook's blocks (FlatLink._pack), layer by layer: pre-attention's, then the gate's
        at = []  # where each layer's pre-attention and gate blocks start (and the end)
        spent = rec.predictor_s  # (the hooks' seconds, added one call at a time as LoadChain does)
        answers = None  # every gate hook's answer at once (Predictor.on_gates), or None: one by one
        if on_gate and not on_pre:
            view.gated = view.pre_attn_layer = L - 1
            answers = pred.on_gates(view)
        if bounds is not self._bounds:  # (one-token steps share them: plan._ones)
            self._bounds, self._starts = bounds, np.array(bounds, dtype=np.int64)
            self._nkeys = np.diff(self._starts)
            self._nkeys.flags.writeable = False  # (the Recorder keeps it: StepArrays)
        scored = False  # (a GateBlocks' packing scores the step's predictions too)
        if type(answers) is GateBlocks:
            out, at = self._pack_gates(answers, step, fk, self._starts)
            scored = True
            for _ in range(L):
                spent += lat
            self.gated = (step, L - 1)
        elif answers is not None:
            for layer, reqs in enumerate(answers):
                n = len(out)
                at += (n, n)
                spent += lat
                if reqs:
                    self.gated = (step, layer)
                    pack(reqs, out)
            self.gated = (step, L - 1)
        for layer in range(L if answers is None else 0):
            at.append(len(out))
            view.pre_attn_layer = layer
            if on_pre:
                reqs = pred.on_pre_attention(view, layer)
                spent += lat
                if reqs:
                    pack(reqs, out)
            at.append(len(out))
            self.gated = (step, layer)
            view.gated = layer
            if on_gate:
                reqs = pred.on_gate(view, layer)
                spent += lat
                if reqs:
                    pack(reqs, out)
        if not scored:
            at.append(len(out))
        rec.predictor_s = spent
        if not scored:  # (every prediction for a layer is made before its gate: all are in)
            self._score(step, range(L), fk.tolist(), bounds)
        hook_gpu = lat if self.on_gpu else 0.0
        pre, gate_gpu = hook_gpu if on_pre else 0.0, hook_gpu if on_gate else 0.0
        if self.log is not None:
            self._room(len(fk) + len(out))
        blocks = self._blocks(out)  # (before PR is read: it may grow it)
        F, I = np.empty((L, 5), dtype=np.float64), np.empty((L, 4), dtype=np.int64)
        self.npr = J.layers(self.Z, self.X, self.EI, self.EF, self.PR, blocks,
                            at if scored else np.array(at, dtype=np.int64),
                            float(pre + attn), step * L, fk, fc, costs, self._starts, shared,
                            gate_gpu, self._issued, F, I)
        self.env.now = float(self.X[J.XS, J.NOW])
        self.rec.step_arrays(plan, attn + pre, F, I, self._nkeys)

    def _score(self, step: int, layers, allk: list[int], bounds: list[int]) -> None:
        """LoadChain._gate's scoring of the predictions for (step, layer), for each of `layers`."""
        rec, pop = self.rec, self.predicted.pop
        needed, made, correct = rec.pred_needed, rec.pred_made, rec.pred_correct
        for layer in layers:
            lo, hi = bounds[layer], bounds[layer + 1]
            needed[layer] += hi - lo
            pset = pop((step, layer), None)
            if pset:
                made[layer] += len(pset)
                correct[layer] += len(pset.intersection(allk[lo:hi]))

    def _layers_at_gates(self, plan: StepPlan, attn: float, fk, fc, costs, bounds: list[int],
                         shared: float) -> None:
        """_layers with the gate hook asked at its gate's time: two compiled calls per layer."""
        env, rec, view, pred = self.env, self.rec, self.view, self.sim.predictor
        Z, X, pack = self.Z, self.X, self._pack
        to_gate, from_gate = J.to_gate, J.from_gate
        on_pre, on_gate, log = self._on_pre_attention, self._on_gate, self.log
        lat, step, L = self.lat, plan.index, self.L
        hook_gpu = lat if self.on_gpu else 0.0
        F, I = [], []  # the rows (Recorder.step_arrays)
        allk = fk.tolist()
        issued0 = self._issued
        pre = hook_gpu if on_pre else 0.0  # (every layer's pre-attention GPU seconds)
        for layer in range(L):
            lo, hi = bounds[layer], bounds[layer + 1]
            t0 = env.now
            out = [0]  # the pre-attention hook's blocks
            view.pre_attn_layer = layer
            if on_pre:
                reqs = pred.on_pre_attention(view, layer)
                rec.predictor_s += lat
                if reqs:
                    pack(reqs, out)
            self.gated = (step, layer)
            view.gated = layer
            if log is not None:
                self._room()
            blocks = self._blocks(out)  # (first: it may grow PR)
            t_gate, self.npr = to_gate(Z, X, self.EI, self.EF, self.PR, blocks, 1, len(out), float(pre + attn))
            env.now = t_gate
            out = [0]  # the gate hook's blocks
            gate_gpu = 0.0
            if on_gate:
                reqs = pred.on_gate(view, layer)
                rec.predictor_s += lat
                gate_gpu = hook_gpu
                if reqs:
                    pack(reqs, out)
            self._score(step, (layer,), allk, bounds)
            if log is not None:
                self._room()
            blocks = self._blocks(out) if len(out) > 1 else _NONE  # (before PR is read: it may grow it)
            hits, late, misses, busy, now, issued, self.npr = from_gate(
                Z, X, self.EI, self.EF, self.PR, blocks, 1, len(out), t_gate, step * L + layer, fk, fc, costs, lo, hi,
                shared, gate_gpu)
            env.now = now
            F.append((t0, t_gate, now, busy, now - t_gate - busy))
            I.append((hits, late, misses, issued - issued0))
            issued0 = issued
        rec.step_arrays(plan, attn + pre, np.array(F, dtype=np.float64), np.array(I, dtype=np.int64),
                        np.diff(np.array(bounds, dtype=np.int64)))
