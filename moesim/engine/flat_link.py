"""The flat prefetch path's state: the GPU tier's slots and pins, the PCIe link's queues and copies,
the loads, in the arrays engine/flat_jit.py's compiled moves work on; and the glue the driver
(engine/flat_prefetch.py) and the predictor's answers (LoadChain._issue) call.

Why no heap is needed: every copy is one expert, so each takes the same `d` seconds; copies start
at the current time, which never goes back, so copies in flight end in the order they started,
and those with equal ends were started (and made their heap entries) in that order too. The heap
of FastPrefetch (engine/fast_prefetch.py) is thus a ring of copies in flight plus the driver's one
wake-up; a counter numbers both as that heap does, which decides ties at equal times.
"""
from __future__ import annotations

from itertools import chain, repeat

import numpy as np

from ..cache.policies import LRU
from . import flat_jit as J
from .fast_prefetch import _Env
from .loads import predicted_blocks, record_predicted
from .sim import Simulation, _Memo


class FlatLink:
    """The state and the calls into its compiled moves (see the module docstring); FlatPrefetch
    drives them."""

    room: int | None = None  # the events' and protections' first room (None: enough for most runs; they grow)

    def __init__(self, sim: Simulation):
        self.sim, self.rec, self.cost = sim, sim.rec, sim.cost
        self.env = sim.env = _Env()  # (its clock only: no heap here)
        self._ecs = _Memo(sim.cost.expert_compute_s)  # tokens -> one expert kernel's seconds
        self._shared = _Memo(sim.cost.shared_compute_s)
        self.L, self.E = sim.L, sim.E
        K, slots, gpu = sim.L * sim.E, sim.pcie.slots, sim.gpu
        self.K = K
        W = max(K + slots + sim.E + 2, J.N_SCALARS)  # (keys; the load pool: queued demand, in flight, a layer's pending)
        Z = self.Z = np.full((J.Z_ROWS, W), -1, dtype=np.int64)
        X = self.X = np.zeros((J.X_ROWS, W), dtype=np.float64)
        for row in (J.PINS, J.STALE, J.KST, J.INOD, J.READY, J.UNUSED, J.PSZ, J.PCAP, J.LPEND):
            Z[row] = 0
        Z[J.LNEXT, :-1] = np.arange(1, W)  # (the free list of load ids: all of them)
        Z[J.S, :J.N_SCALARS] = 0
        Z[J.S, J.FREE] = 0
        Z[J.S, J.SLOTS] = slots
        Z[J.S, J.PQH] = Z[J.S, J.PQT] = -1
        Z[J.S, J.PERLAYER] = gpu.partition == "per_layer"
        Z[J.S, J.LRU_] = type(gpu._policies[0]) is LRU
        Z[J.S, J.NE] = sim.E
        Z[J.S, J.DQCAP] = K + 1
        self.gated = (-1, -1)
        Z[J.S, J.GATED] = -sim.L - 1  # (the code of (-1, -1): step * L + layer)
        for p, (cap, pol) in enumerate(zip(gpu._caps, gpu._policies)):  # (preloaded keys, in eviction order)
            Z[J.PCAP, p] = cap
            for k in pol._od:
                J._od_append(Z, p, k)
                Z[J.READY, k] = 1
        X[J.XS, J.DUR] = sim.cost.pcie_s(sim.eb)  # every copy's seconds (one expert each)
        params = sim.predictor.params
        max_bytes = params.max_bytes_per_layer
        self.budgets = params.max_inflight is not None or max_bytes is not None
        Z[J.S, J.MAXINF] = -1 if params.max_inflight is None else params.max_inflight
        X[J.XS, J.MAXBYTES] = -1.0 if max_bytes is None else max_bytes
        self.log = sim.events_log
        Z[J.S, J.LOG] = self.log is not None
        n = (self.room or 2 * K + slots) if self.log is not None else 1  # (events: key, priority; start, end)
        self.EI, self.EF = np.zeros((2, n), dtype=np.int64), np.zeros((2, n), dtype=np.float64)
        Z[J.S, J.PROTECT] = params.protect
        Z[J.S, J.BUDGETS] = self.budgets
        Z[J.S, J.EBI] = sim.eb
        self.PR = np.zeros((4, self.room or 4 * W), dtype=np.int64)  # (protections held; per-target prefetch counts)
        self.npr = 0  # protections held (or targets counted for max_bytes_per_layer, if more)
        self.predicted = sim.predicted  # target -> every key predicted for it
        # per layer: keys needed, predicted, predicted and needed (_pack_gates' scoring; added to
        # the recorder's at the end)
        self.pred = np.zeros((3, sim.L), dtype=np.int64)
        self.predictor = sim.predictor
        self.on_gpu = params.runs_on == "gpu"
        self.lat = 0.0  # seconds one hook call costs in the current step (Predictor.latency_for)

    # ---- the clock ---------------------------------------------------------------------------

    def _room(self, more: int = 0) -> None:
        """Events log: room for every copy that can land in one call: each load there is, queued or
        in flight (2 per key at most, and the slots), and `more` loads the call may make."""
        need, cap = int(self.Z[J.S, J.EVN]) + 2 * self.K + int(self.Z[J.S, J.SLOTS]) + more, self.EI.shape[1]
        if need > cap:
            grow = max(cap, need - cap)  # (at least doubled)
            self.EI = np.concatenate([self.EI, np.zeros((2, grow), dtype=np.int64)], axis=1)
            self.EF = np.concatenate([self.EF, np.zeros((2, grow), dtype=np.float64)], axis=1)

    def _sleep(self, dt: float) -> None:
        """The driver sleeps `dt`: copies that end before its wake-up (or at it, made before it) land."""
        if self.log is not None:
            self._room()
        self.env.now = J.sleep(self.Z, self.X, self.EI, self.EF, float(dt))

    def _drain(self) -> None:
        """The copies still in flight at the end, then the link's, the recorder's and the events'
        totals written where the Simulation keeps them."""
        sim, rec, Z = self.sim, self.rec, self.Z
        if self.log is not None:
            self._room()
        self.env.now = J.drain(Z, self.X, self.EI, self.EF)
        s = Z[J.S].tolist()
        rec.bypass += s[J.C_BYPASS]
        rec.prefetch_dropped += s[J.C_DROPPED]
        rec.prefetch_wasted += s[J.C_WASTED]
        rec.gpu_evictions += s[J.C_EVICT]
        rec.prefetch_issued += s[J.C_ISSUED]
        rec.prefetch_used += s[J.C_USED]
        rec.prefetch_late += s[J.C_LATE]
        rec.saved_loads += s[J.C_SAVED]
        for lst, add in zip((rec.pred_needed, rec.pred_made, rec.pred_correct), self.pred.tolist()):
            lst[:] = [a + b for a, b in zip(lst, add)]
        self.pred[:] = 0
        sim.prefetched_unused.update(np.flatnonzero(Z[J.UNUSED, :self.K]).tolist())
        pcie = sim.pcie  # what the recorder reads of the link
        pcie.transfers, pcie.busy_time = s[J.TRANSFERS], float(self.X[J.XS, J.BUSYTIME])
        pcie.bytes = pcie.transfers * sim.eb
        if self.log is not None:
            n = s[J.EVN]
            self.log.extend(zip(repeat("pcie"), self.EI[0, :n].tolist(), self.EI[1, :n].tolist(),
                                self.EF[0, :n].tolist(), self.EF[1, :n].tolist()))

    # ---- prefetch ----------------------------------------------------------------------------

    def _hooked(self, reqs) -> float:
        """Simulation._hook for a hook the predictor implements, issuing at once: count its latency
        (`lat`, this step's), issue its answer; returns its GPU-stream seconds."""
        lat = self.lat
        self.rec.predictor_s += lat
        if reqs:
            self._issue(reqs)
        return lat if self.on_gpu else 0.0

    def _pack(self, reqs, out: list[int]) -> None:
        """LoadChain._issue's walk of a hook's answer, up to the copies: its Ranked blocks for
        targets after the gated one appended to `out` as (target code, n, n keys), and scored
        as predictions (`predicted`)."""
        L = self.L
        for (step, layer), keys in predicted_blocks(reqs, self.E, self.gated, self.predicted):
            out.append(step * L + layer)
            out.append(len(keys))
            out.extend(keys)

    def _pack_gates(self, g, step: int, fk: np.ndarray, starts: np.ndarray):
        """_pack of every gate's answer of step `step` from a GateBlocks, and _score of the step's
        layers, compiled (flat_jit.pack_gates): returns the blocks as `_pack` would append them to
        [0], and each gate's start twice (no pre-attention blocks) then their end, int64 arrays.
        Per layer, the keys accessed (fk[starts[l]:starts[l + 1]]), predicted for it (with those
        recorded earlier) and predicted and accessed are added to `pred`. Each later target's keys
        are recorded once, the union of its blocks'."""
        L, E, predicted = self.L, self.E, self.predicted
        now, pop = np.zeros(L * E, dtype=np.bool_), predicted.pop
        earlier = [pop(t) for t in [t for t in predicted if t[0] == step]]  # (predicted before: recorded)
        if earlier:
            now[np.fromiter(chain.from_iterable(earlier), dtype=np.int64)] = True
        codes = np.asarray(g.steps, dtype=np.int64) * L + np.asarray(g.layers, dtype=np.int64)
        out, at, targets, ends, keys = J.pack_gates(g.experts, np.asarray(g.ends, dtype=np.int64), codes, g.per_gate,
                                                    step * L, E, L, now, fk, starts, self.pred)
        keys, a = keys.tolist(), 0
        for code, b in zip(targets.tolist(), ends.tolist()):
            record_predicted(predicted, divmod(code, L), keys[a:b])
            a = b
        return out, at

    def _blocks(self, out: list[int]) -> np.ndarray:
        """`out` as the int64 array the compiled moves read, with room for its protections."""
        need, cap = self.npr + len(out), self.PR.shape[1]
        if need > cap:
            self.PR = np.concatenate([self.PR, np.zeros((4, max(cap, need - cap)), dtype=np.int64)], axis=1)
        return out if type(out) is np.ndarray else np.array(out, dtype=np.int64)

    def _issue(self, reqs) -> None:
        """Issue a hook's answer now (LoadChain._issue)."""
        out = [0]
        self._pack(reqs, out)
        if len(out) > 1:
            blocks = self._blocks(out)  # (first: it may grow PR)
            J.issue_blocks(self.Z, self.X, self.PR, blocks, 1, len(out))
            self.npr = int(max(self.Z[J.S, J.NPR], self.Z[J.S, J.NPB]))
