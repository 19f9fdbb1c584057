"""Multi-Look Ahead prefetching (seed 004 §4): sequence patterns, expert co-occurrence, temporal
position and multi-hop transition chains, each learnt online; their predictions are united.

Per-layer adaptation. A token's routing history is the sequence of its expert sets layer by layer:
the layers it has passed in this step, preceded by the layers of its request's previous token
(layer L-1 of token t is followed by layer 0 of token t+1). On this sequence:

- sequence patterns: the last `pattern_length` expert sets (and the layer they end at) -> the
  experts seen 1..h layers later; kept in a bounded store (`max_patterns`, evicting the least
  accessed, as the seed's MemoryEfficientPatternStore); trusted once seen `min_pattern_frequency`
  times.
- co-occurrence: expert a at layer l -> expert b at layer l+1 (the seed's `expert_cooccurrence`,
  which links consecutive history entries).
- temporal: the token's position in its request modulo `temporal_period` -> experts per layer.
- chains: expert a at layer l -> expert c at layer l+d for d = 2..h (the A -> B -> C
  dependencies the seed's `_predict_from_chains` looks for), which predict the far layers directly.

A component's probability for an expert is a conditional frequency; it counts only when the count
passes the seed's thresholds and the probability reaches `min_confidence`. Over the batch, a
component's score is the chance that at least one token needs the expert (noisy-OR); the union of
components takes the best component's score. The scoring and the learning are compiled
(multilook_jit, which also defines their float arithmetic); every gate of a step can be scored in
one call (on_gates).
"""
from __future__ import annotations

import math
from functools import partial
from operator import mul
import numpy as np
from pydantic import Field

from .base import GateBlocks, Prefetch, Ranked
from .registry import register
from .topk import HistoryParams, HistoryPredictor, RequestMemory, row_owners, sample_rows

_MULT = np.random.default_rng(0x5EED).integers(1, 2**63, size=(2, 4096), dtype=np.uint64) | np.uint64(1)
_S29 = np.uint64(29)
_ONE = np.float32(1.0)


def _mix(h: np.ndarray) -> np.ndarray:
    h ^= h >> _S29
    return h


_M64 = (1 << 64) - 1
_MULT_PY = [_MULT[0, :64].tolist(), _MULT[1, :65].tolist()]  # the same, as Python ints (tiny inputs)
_FEW = 8  # rows up to which plain Python beats numpy's per-call cost (the same uint64 arithmetic)


def _set_code(experts: list[int]) -> int:
    h = sum(map(mul, sorted(experts), _MULT_PY[0])) & _M64
    return h ^ (h >> 29)


def set_codes(experts: np.ndarray) -> np.ndarray:
    """64-bit hash of each expert set (last axis; order-insensitive)."""
    experts = np.asarray(experts)
    lead = experts.shape[:-1]
    if experts.ndim >= 2 and math.prod(lead) <= _FEW and 0 < experts.shape[-1] <= 64:
        rows = experts.reshape(-1, experts.shape[-1]).tolist()
        return np.array([_set_code(r) for r in rows], dtype=np.uint64).reshape(lead)
    s = np.sort(experts.astype(np.int64), axis=-1).astype(np.uint64)
    with np.errstate(over="ignore"):
        return _mix((s * _MULT[0, :s.shape[-1]]).sum(axis=-1, dtype=np.uint64))


def context_keys(window: np.ndarray, layer: int) -> list[int]:
    """context_hash of each row of `window` [n, pl] ending at one `layer`, as Python ints."""
    n = window.shape[1]
    if window.shape[0] > _FEW or n >= 64:
        return context_hash(window, layer).tolist()
    mult, tail = _MULT_PY[1][:n], (layer + 1) * _MULT_PY[1][n]
    out = []
    for w in window.tolist():
        h = (sum(map(mul, w, mult)) + tail) & _M64
        out.append(h ^ (h >> 29))
    return out


def context_hash(window: np.ndarray, layer) -> np.ndarray:
    """Hash of a sequence of set codes (last axis) ending at `layer`."""
    n = window.shape[-1]
    with np.errstate(over="ignore"):
        h = (window * _MULT[1, :n]).sum(axis=-1, dtype=np.uint64)
        h += (np.asarray(layer, dtype=np.uint64) + np.uint64(1)) * _MULT[1, n]
        return _mix(h)


class PatternStore:
    """Bounded map: context hash -> counts of the experts seen d = 1..h layers later. Its index is
    a hash table read and written by compiled code (multilook_jit)."""

    def __init__(self, capacity: int, horizon: int, num_experts: int):
        from . import multilook_jit as jit
        self._jit = jit
        self.capacity = capacity
        # the index: key -> slot, a hash table at most half full (multilook_jit.find)
        bits = max(2, (2 * capacity - 1).bit_length())
        self._hk, self._hv = np.zeros(1 << bits, dtype=np.uint64), np.full(1 << bits, -1, dtype=np.int64)
        self._shift = np.uint64(64 - bits)
        self.slot_key = np.zeros(capacity, dtype=np.uint64)  # (valid where used)
        self.counts = np.zeros((capacity, horizon, num_experts), dtype=np.float32)
        self.n = np.zeros((capacity, horizon), dtype=np.float32)
        self.access = np.zeros(capacity, dtype=np.int64)
        self.used = np.zeros(capacity, dtype=bool)
        # prediction cache, refreshed for the slots a step touched: each next expert's thresholded
        # probability, and whether the pattern is trusted yet
        self.p = np.zeros((capacity, horizon, num_experts), dtype=np.float32)
        self.trusted = np.zeros(capacity, dtype=bool)
        # (a slot's accesses count once per gate: stamp[slot] = the mark of the last gate counted)
        self.stamp = np.full(capacity, -1, dtype=np.int64)
        self.mark = 0
        # free slots: a stack, free[:top[0]], its last given first (slot 0 first at the start)
        self.free = np.arange(capacity - 1, -1, -1, dtype=np.int64)
        self.top = np.array([capacity], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.used.sum())

    def find(self, keys) -> np.ndarray:
        """Slots of these keys (in order; -1 where not stored)."""
        return self._jit.find(self._hk, self._hv, self._shift, np.asarray(keys, dtype=np.uint64))

    def slots(self, keys) -> np.ndarray:
        """Slots of these keys, creating the missing ones (evicting the least accessed; -1 where
        the store cannot hold them)."""
        keys = np.asarray(keys, dtype=np.uint64)
        claim = partial(self._jit.claim, self._hk, self._hv, self._shift)
        found, short = claim(keys, self.slot_key, self.used, self.free, self.top)
        if short:
            self._evict(short - int(self.top[0]), keep=found[found >= 0])
            found, short = claim(keys, self.slot_key, self.used, self.free, self.top)
            if short:  # (fewer slots than new keys even so: the first ones get what is free)
                n = int(self.top[0])
                new = keys[found < 0]
                first = np.unique(new, return_index=True)[1]
                kept = set(new[np.sort(first)[:n]].tolist())
                room = np.array([k in kept for k in keys.tolist()]) | (found >= 0)
                found = np.full(keys.size, -1, dtype=np.int64)
                found[room] = claim(keys[room], self.slot_key, self.used, self.free, self.top)[0]
        return found

    def _evict(self, need: int, keep: np.ndarray) -> None:
        need = max(need, self.capacity // 10)
        acc = self.access.astype(np.float64)
        acc[keep] = np.inf
        acc[~self.used] = np.inf
        n_evictable = int(np.isfinite(acc).sum())
        need = min(need, n_evictable)
        if need <= 0:
            return
        victims = np.argpartition(acc, need - 1)[:need] if need < acc.size else np.arange(acc.size)
        victims = np.sort(victims[np.isfinite(acc[victims])])
        self._jit.forget(self._hk, self._hv, self._shift, self.slot_key, self.used, self.free, self.top, victims)
        self.counts[victims] = 0
        self.n[victims] = 0
        self.access[victims] = 0
        self.p[victims] = 0
        self.trusted[victims] = False


class MultiLookParams(HistoryParams):
    """Defaults from seed §4: `pattern_length = 3`, `lookahead_steps = 4`, `min_pattern_frequency
    = 3`, next-expert confidence `min_pattern_frequency * 0.3`, temporal period 64 (`% 64`),
    at most 32 predicted experts, `MemoryEfficientPatternStore(max_patterns=10000)`.
    `min_confidence` is not in the seed (there, every count past the threshold is predicted)."""

    lookahead_layers: int = Field(4, ge=1, le=64, description="predict this many layers ahead (seed lookahead_steps; "
                                                             "memory grows with it: chains and patterns keep one "
                                                             "table per distance)")
    max_per_layer: int = Field(32, ge=1, description="at most this many experts per predicted layer")
    pattern_length: int = Field(3, ge=1, description="expert sets (layers) a sequence pattern is made of")
    min_pattern_frequency: int = Field(3, ge=1, description="occurrences before a pattern / count is trusted")
    confidence_fraction: float = Field(0.3, ge=0, description="a pattern's next expert needs this x min_pattern_frequency counts")
    min_confidence: float = Field(0.25, ge=0, le=1, description="conditional probability an expert needs to be predicted")
    temporal_period: int = Field(64, ge=1, description="token positions are taken modulo this")
    max_patterns: int = Field(10000, ge=1, description="bound of the sequence-pattern store")
    use_sequences: bool = Field(True, description="sequence-pattern component")
    use_cooccurrence: bool = Field(True, description="co-occurrence (layer l -> l+1) component")
    use_temporal: bool = Field(True, description="temporal-position component")
    use_chains: bool = Field(True, description="multi-hop chain (layer l -> l+d, d >= 2) component")


@register
class MultiLook(HistoryPredictor):
    """Seed §4 on per-layer routing; see the module docstring."""

    name = "multilook"
    Params = MultiLookParams

    def __init__(self, params, model, rng):
        super().__init__(params, model, rng)
        p, L, E, h = params, self.L, self.E, params.lookahead_layers
        self.h = h
        self.store = PatternStore(p.max_patterns, h, E)
        # hops[d-1][l, a, b]: times a at layer l was followed by b at layer l+d; occ[d-1][l, a]
        n_hops = h if p.use_chains else 1
        self._n_hops = n_hops if (p.use_chains or p.use_cooccurrence) else 0
        self.hops = np.zeros((n_hops, L, E, E), dtype=np.float32)
        # every hop's (source position q, target q + d, row hop * L + q % L, q in this token) at once
        q = [np.arange(max(0, L - d), 2 * L - d) for d in range(1, n_hops + 1)]
        self._hop_q = (np.concatenate(q), np.concatenate([qs + i + 1 for i, qs in enumerate(q)]),
                       np.concatenate([qs % L + i * L for i, qs in enumerate(q)]), np.concatenate(q) >= L)
        self.occ = np.zeros((n_hops, L, E), dtype=np.float32)
        self.hops_p = np.zeros_like(self.hops)    # thresholded conditional probabilities (hops / occ)
        # (the learning's views: hop tables as [hops * L, E, E], occurrences as [hops * L, E])
        self._hops3, self._hops_p3 = self.hops.reshape(-1, E, E), self.hops_p.reshape(-1, E, E)
        self._occ2 = self.occ.reshape(-1, E)
        self.temporal = np.zeros((p.temporal_period, L, E), dtype=np.float32)
        self.temporal_n = np.zeros((p.temporal_period, L), dtype=np.float32)
        self.positions = RequestMemory(p.max_requests)
        from . import multilook_jit as jit  # (numba: loaded by the runs that use this predictor only)
        self._jit = jit
        # thresholds in the counts' precision (float32), as numpy compared them
        self._conf = np.float32(p.min_confidence)
        self._hop_min, self._pattern_min = np.float32(p.min_pattern_frequency), np.float32(
            p.confidence_fraction * p.min_pattern_frequency)
        self._trust_min = np.float32(p.min_pattern_frequency)
        # the positions q of [previous token | this token] whose context a step learns: its window
        # fits, and an outcome q + d (d <= h) lies in this token
        self._pattern_q = np.arange(max(p.pattern_length - 1, L - h), 2 * L - 1)
        self._no_table = np.zeros((0, E), dtype=np.float32)
        self._no_slots = np.zeros(0, dtype=np.int64)
        # every gate's targets, gate after gate: step offsets and layers
        self._gate_off = np.array([off for l in range(L) for _d, off, _lay in self._targets[l]], dtype=np.int64)
        self._gate_lay = np.array([lay for l in range(L) for _d, _off, lay in self._targets[l]], dtype=np.int64)

    # -- per-step state --

    def _new_step(self, view) -> None:
        super()._new_step(view)
        self._prev_codes = np.empty(self._prev.shape[:2], dtype=np.uint64)
        self._jit.codes_into(self._prev, _MULT[0], self._prev_codes)
        self._known = view.phase != "prefill" and bool(self._pvalid.any())  # (a previous token to read)
        self._rows = None       # sampled row indices (prefill), fixed at the first gate
        self._cur_codes = None  # [T', L] codes of this step's layers, filled gate by gate
        self._have = np.zeros(self.L, dtype=bool)
        self._temporal_table = None
        if view.phase == "prefill":
            self._pos = None
        else:
            get = self.positions.get
            self._pos = np.array([get(r, 0) for r in view.request_ids.tolist()], dtype=np.int64)

    def _rows_of(self, view, layer: int) -> np.ndarray:
        te = np.asarray(view.token_experts(layer))
        if self._cur_codes is None:
            T = te.shape[0]
            self._rows = sample_rows(T, self.params.max_tokens)
            n = T if self._rows is None else len(self._rows)
            self._cur_codes = np.zeros((n, self.L), dtype=np.uint64)
            if self._pos is None:  # prefill: position within the request's prompt
                owners = row_owners(view, T)
                pos = np.arange(T, dtype=np.int64) - np.searchsorted(owners, owners)
                self._pos = pos if self._rows is None else pos[self._rows]
        return te if self._rows is None else te[self._rows]

    def _code(self, view, layer: int) -> None:
        if not self._have[layer]:
            rows = self._rows_of(view, layer)
            if rows.shape[0] <= _FEW and 0 < rows.shape[1] <= 64:  # (set_codes' own small case, inline)
                self._cur_codes[:, layer] = [_set_code(r) for r in rows.tolist()]
            else:
                self._cur_codes[:, layer] = set_codes(rows)
            self._have[layer] = True

    def _window(self, view, layer: int):
        """Codes of the `pattern_length` sets ending at `layer` (-1: the previous token's last
        layer), per row, and which rows have them all (None: every row)."""
        pl, L = self.params.pattern_length, self.L
        start = L + layer - pl + 1   # positions in [previous token | this token]
        if start < 0:
            return None
        if start >= L:
            for l in range(start - L, layer + 1):
                self._code(view, l)
            return self._cur_codes[:, start - L:layer + 1], None
        if not self._known:
            return None
        if layer < 0:
            return self._prev_codes[:, start:], self._pvalid
        if self._prev_codes.shape[0] != self._cur_codes.shape[0]:
            return None
        for l in range(0, layer + 1):
            self._code(view, l)
        return np.concatenate([self._prev_codes[:, start:], self._cur_codes[:, :layer + 1]], axis=1), self._pvalid

    def _temporal(self) -> np.ndarray:
        """Temporal component for this step: [positions (this step's layers, then the next
        steps'), E], fixed within a step (it depends only on the tokens' positions); no rows
        where there is none."""
        if self._temporal_table is None:
            p = self.params
            if not p.use_temporal or self._pos is None or not self._pos.size:
                return self._no_table
            self._temporal_table = self._jit.temporal_table(self.temporal, self.temporal_n, self._pos, self.L, self.h,
                                                            self._hop_min, self._conf)
        return self._temporal_table

    # -- prediction --

    def _predict(self, view, layer: int) -> Ranked:
        p, L, E = self.params, self.L, self.E
        # co-occurrence (d = 1) and chains (d >= 2): from the experts now known at `src`
        if layer >= 0:
            full = np.asarray(view.token_experts(layer))
            if self._cur_codes is None:
                self._rows_of(view, layer)  # fixes the step's row sample and positions
            cnt = np.bincount(full.ravel(), minlength=E)
            src = layer
        elif self._known:
            cnt = np.bincount(self._prev[self._pvalid, L - 1].ravel(), minlength=E)
            src = L - 1
        else:
            cnt = None
        # sequence patterns
        slots = self._no_slots
        if p.use_sequences and cnt is not None:
            w = self._window(view, layer)
            if w is not None:
                win, ok = w
                if ok is not None:
                    win = win[ok]
                if win.shape[0]:
                    slots = self.store.find(context_keys(win, src))
        counts = np.zeros((1, E), dtype=np.int64) if cnt is None else cnt.reshape(1, E)
        experts, scores, ends = self._score(counts, np.array([cnt is not None]), np.array([src if cnt is not None else 0]),
                                            np.array([layer + 1]), slots, np.zeros(slots.size, dtype=np.int64))
        step, out, a = view.step, Ranked(), 0
        for (_d, off, lay), b in zip(self._targets[layer], ends.tolist()):
            out.add(step + off, lay, experts[a:b].tolist(), scores[a:b].tolist())
            a = b
        return out

    def _score(self, counts, has, srcs, t0s, key_slots, key_gate):
        """multilook_jit.predict of these gates with this predictor's tables (each gate's pattern
        accesses counted)."""
        out = self._jit.predict(counts, has, srcs, t0s, key_slots, key_gate, *self._tables())
        self.store.mark += len(has)
        return out

    def _tables(self) -> tuple:
        """The arguments every compiled prediction ends with (multilook_jit.predict's): the pattern
        store's trust, accesses and gate marks, the hop tables, the temporal table, the pattern
        tables and the per-layer cap."""
        p, st = self.params, self.store
        return (st.trusted, st.access, st.stamp, st.mark, self.hops_p, self._n_hops, p.use_cooccurrence,
                self._temporal(), st.p, min(self._cap, self.E))

    # -- hooks --

    def on_step_start(self, view) -> Ranked:
        """`_predict(view, -1)` in one compiled call (multilook_jit.start)."""
        self._begin(view)
        p, st = self.params, self.store
        experts, scores, ends = self._jit.start(
            self._prev, self._pvalid, self._prev_codes, self._known,
            p.pattern_length if p.use_sequences else self.L + 1, _MULT, st._hk, st._hv, st._shift, *self._tables())
        st.mark += 1
        step, out, a = view.step, Ranked(), 0
        experts, scores = experts.tolist(), scores.tolist()
        for (_d, off, lay), b in zip(self._targets[-1], ends.tolist()):
            out.add(step + off, lay, experts[a:b], scores[a:b])
            a = b
        return out

    def on_gate(self, view, layer: int) -> list[Prefetch]:
        self._begin(view)
        return self._predict(view, layer)

    def on_gates(self, view) -> GateBlocks | None:
        """Every gate hook of the step at once (Predictor.on_gates): what `_predict` gives layer by
        layer, each gate's `lookahead_layers` targets scored in one compiled call (multilook_jit.gates)."""
        self._begin(view)
        routing = self._step_routing(view)
        if routing.shape[0] == 0:
            return None
        if self._cur_codes is None:
            self._rows_of(view, 0)
        rows = routing if self._rows is None else routing[self._rows]
        p, st = self.params, self.store
        use_prev = self._known and self._prev_codes.shape[0] == rows.shape[0]
        experts, scores, ends = self._jit.gates(
            routing, rows, self._prev_codes, self._pvalid, use_prev, p.pattern_length if p.use_sequences else 0,
            _MULT, self._cur_codes, st._hk, st._hv, st._shift, *self._tables())
        st.mark += self.L
        if p.use_sequences:
            self._have[:] = True  # (gates wrote every layer's codes)
        return GateBlocks(self._gate_off + view.step, self._gate_lay, experts, scores, ends, self.h)

    def _learn(self, view, routing: np.ndarray, rows, prev, pvalid, owners) -> None:
        p, T = self.params, routing.shape[0]
        pos = self._no_slots  # temporal position (none: not learnt)
        if p.use_temporal:
            if view.phase == "prefill":
                start = np.searchsorted(owners, owners)
                pos_all = np.arange(T, dtype=np.int64) - start
                idx_rows = sample_rows(T, p.max_tokens)
                pos = pos_all if idx_rows is None else pos_all[idx_rows]
            else:
                pos = self._pos
        self._learn_tables(prev, rows, pvalid, pos % p.temporal_period)
        # remember
        self._remember(view, routing, owners)
        ids = view.request_ids.tolist()
        if view.phase == "prefill":
            counts = np.bincount(owners, minlength=len(ids))
            for i, rid in enumerate(ids):
                if counts[i]:
                    self.positions.put(rid, int(counts[i]))
        else:
            for rid, ps in zip(ids, self._pos.tolist()):
                self.positions.put(rid, ps + 1)

    def _learn_tables(self, prev, rows, pvalid, slot) -> None:
        """Co-occurrence and chains, temporal position and sequence patterns (contexts ending at q
        whose outcome q+d, d <= h, lies in this token), learnt from rows [n, L, k] with their
        previous tokens (prev, where pvalid) and positions (slot, modulo the period; none: not
        learnt), in one compiled call (multilook_jit.learn_step); the patterns are left to
        `_learn_patterns` when the store must evict to hold the step's contexts."""
        p, st = self.params, self.store
        hq, tgt, lay, late = self._hop_q
        short = self._jit.learn_step(
            prev, rows, pvalid, self._hops3, self._occ2, self._hops_p3, hq, tgt, lay, late, self._hop_min, self._conf,
            self.temporal, self.temporal_n, slot, self._pattern_q if p.use_sequences else self._no_slots,
            p.pattern_length, self.L, _MULT, st._hk, st._hv, st._shift, st.slot_key, st.used, st.free, st.top,
            st.counts, st.n, st.p, st.trusted, st.access, self._trust_min, self._pattern_min)
        if short:  # (the contexts' keys made again: the same)
            self._learn_patterns(np.concatenate([prev, rows], axis=1), prev, rows, pvalid)

    def _learn_patterns(self, seq, prev, rows, pvalid) -> None:
        p, L, st, qs = self.params, self.L, self.store, self._pattern_q
        if qs.size == 0:
            return
        keys, ti, tq = self._jit.learn_keys(seq, pvalid, qs, p.pattern_length, L, _MULT)
        if ti.size == 0:
            return
        slots = st.slots(keys)
        if slots.min() < 0:  # (contexts the store could not hold)
            keep = slots >= 0
            slots, ti, tq = slots[keep], ti[keep], tq[keep]
        self._jit.learn_patterns(st.counts, st.n, st.p, st.trusted, st.access, slots, ti, tq, seq, L,
                                 self._trust_min, self._pattern_min, self._conf)
