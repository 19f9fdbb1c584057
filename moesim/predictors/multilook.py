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
components takes the best component's score.
"""
from __future__ import annotations

import math
from operator import mul
import numpy as np
from pydantic import Field

from .base import Prefetch
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
    """Bounded map: context hash -> counts of the experts seen d = 1..h layers later."""

    def __init__(self, capacity: int, horizon: int, num_experts: int):
        self.capacity = capacity
        self.index: dict[int, int] = {}
        self.slot_key: list[int | None] = [None] * capacity
        self.counts = np.zeros((capacity, horizon, num_experts), dtype=np.float32)
        self.n = np.zeros((capacity, horizon), dtype=np.float32)
        self.access = np.zeros(capacity, dtype=np.int64)
        self.used = np.zeros(capacity, dtype=bool)
        # prediction cache, refreshed for the slots a step touched: log(1 - p) of each next
        # expert's thresholded probability, and whether the pattern is trusted yet
        self.lq = np.zeros((capacity, horizon, num_experts), dtype=np.float32)
        self.trusted = np.zeros(capacity, dtype=bool)
        self._free = list(range(capacity - 1, -1, -1))

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, keys: list[int]) -> np.ndarray:
        """Slots of the stored keys among these (in order, repeats kept); each counts one access."""
        get = self.index.get
        hit = [s for s in map(get, keys) if s is not None]
        if not hit:
            return np.zeros(0, dtype=np.int64)
        hit = np.array(hit, dtype=np.int64)
        self.access[hit] += 1
        return hit

    def slots(self, keys: list[int]) -> np.ndarray:
        """Slots of these keys, creating the missing ones (evicting the least accessed; -1 where
        the store cannot hold them)."""
        get = self.index.get
        slots = np.fromiter((get(k, -1) for k in keys), dtype=np.int64, count=len(keys))
        missing = list(dict.fromkeys(k for k, s in zip(keys, slots.tolist()) if s < 0))
        if missing:
            if len(missing) > len(self._free):
                self._evict(len(missing) - len(self._free), keep=slots[slots >= 0])
            new = {}
            for k in missing:
                if not self._free:
                    break
                s = self._free.pop()
                self.index[k] = s
                self.slot_key[s] = k
                self.used[s] = True
                new[k] = s
            slots = np.fromiter((new.get(k, s) if s < 0 else s for k, s in zip(keys, slots.tolist())),
                                dtype=np.int64, count=len(keys))
        return slots

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
        victims = victims[np.isfinite(acc[victims])]
        for s in sorted(victims.tolist(), reverse=True):
            del self.index[self.slot_key[s]]
            self.slot_key[s] = None
            self.used[s] = False
            self._free.append(s)
        self.counts[victims] = 0
        self.n[victims] = 0
        self.access[victims] = 0
        self.lq[victims] = 0
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


def _noisy_or(p: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """1 - prod(1 - p) over the rows (axis 0, or axis -2 weighted by `counts`): the chance that
    at least one token needs the expert, were they independent."""
    lq = np.log1p(-np.minimum(p, np.float32(1.0 - 1e-6)))
    s = counts @ lq if counts is not None else lq.sum(axis=0)
    return -np.expm1(s)


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
        self.hops_lq = np.zeros_like(self.hops)   # log(1 - thresholded probability), per row
        self.temporal = np.zeros((p.temporal_period, L, E), dtype=np.float32)
        self.temporal_n = np.zeros((p.temporal_period, L), dtype=np.float32)
        self.positions = RequestMemory(p.max_requests)

    # -- per-step state --

    def _new_step(self, view) -> None:
        super()._new_step(view)
        self._prev_codes = set_codes(self._prev) if self._prev.shape[0] else np.zeros((0, self.L), np.uint64)
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
        if view.phase == "prefill" or not self._pvalid.any():
            return None
        if layer < 0:
            return self._prev_codes[:, start:], self._pvalid
        if self._prev_codes.shape[0] != self._cur_codes.shape[0]:
            return None
        for l in range(0, layer + 1):
            self._code(view, l)
        return np.concatenate([self._prev_codes[:, start:], self._cur_codes[:, :layer + 1]], axis=1), self._pvalid

    def _temporal(self) -> np.ndarray | None:
        """Temporal component for this step: [positions (this step's layers, then the next
        steps'), E], fixed within a step (it depends only on the tokens' positions)."""
        if self._temporal_table is None and self._pos is not None and self._pos.size:
            p, L = self.params, self.L
            J = np.arange(L + self.h)
            slot = (self._pos[:, None] + (J // L)[None, :]) % p.temporal_period      # [T', J]
            lay = np.broadcast_to(J % L, slot.shape)
            c = self.temporal[slot, lay]                                         # [T', J, E]
            n = self.temporal_n[slot, lay][..., None]
            prob = c / np.maximum(n, 1.0)
            prob[(c < p.min_pattern_frequency) | (prob < p.min_confidence)] = 0.0
            self._temporal_table = _noisy_or(prob)
        return self._temporal_table

    # -- prediction --

    def _predict(self, view, layer: int) -> list[Prefetch]:
        p, L, E, h = self.params, self.L, self.E, self.h
        score = None
        # co-occurrence (d = 1) and chains (d >= 2): from the experts now known at `src`
        if layer >= 0:
            full = np.asarray(view.token_experts(layer))
            if self._cur_codes is None:
                self._rows_of(view, layer)  # fixes the step's row sample and positions
            cnt = np.bincount(full.ravel(), minlength=E)
            src = layer
        elif view.phase != "prefill" and self._pvalid.any():
            cnt = np.bincount(self._prev[self._pvalid, L - 1].ravel(), minlength=E)
            src = L - 1
        else:
            cnt = None
        if cnt is not None and self._n_hops:
            nz = cnt.nonzero()[0]
            hh = self._n_hops
            # noisy-OR over the batch's (token, expert) pairs: 1 - prod (1 - p)^count
            hop = -np.expm1(cnt[nz].astype(np.float32) @ self.hops_lq[:hh, src][:, nz])
            if hh == h:
                score = hop
            else:
                score = np.zeros((h, E), dtype=np.float32)
                score[:hh] = hop
            if not p.use_cooccurrence:
                score[0] = 0.0
        if score is None:
            score = np.zeros((h, E), dtype=np.float32)
        # temporal position
        if p.use_temporal:
            t = self._temporal()
            if t is not None:
                np.maximum(score, t[layer + 1:layer + 1 + h], out=score)  # (the targets' positions)
        # sequence patterns
        if p.use_sequences and cnt is not None:
            w = self._window(view, layer)
            if w is not None:
                win, ok = w
                if ok is not None:
                    win = win[ok]
                if win.shape[0]:
                    slots = self.store.lookup(context_keys(win, src))
                    if slots.size:
                        slots = slots[self.store.trusted[slots]]
                    if slots.size:
                        np.maximum(score, -np.expm1(self.store.lq[slots].sum(axis=0)), out=score)
        return self._emit_all(view, layer, score)

    # -- hooks --

    def on_gate(self, view, layer: int) -> list[Prefetch]:
        self._begin(view)
        return self._predict(view, layer)

    def _learn(self, view, routing: np.ndarray, rows, prev, pvalid, owners) -> None:
        p, L, E = self.params, self.L, self.E
        T = routing.shape[0]
        seq = np.concatenate([prev, rows], axis=1)                 # [n, 2L, k]
        self._learn_hops(seq, pvalid)
        # temporal position
        if p.use_temporal:
            if view.phase == "prefill":
                start = np.searchsorted(owners, owners)
                pos_all = np.arange(T, dtype=np.int64) - start
                idx_rows = sample_rows(T, p.max_tokens)
                pos = pos_all if idx_rows is None else pos_all[idx_rows]
            else:
                pos = self._pos
            slot = pos % p.temporal_period
            ti = ((slot[:, None, None] * L + np.arange(L)[None, :, None]) * E + rows).ravel()
            np.add.at(self.temporal.reshape(-1), ti, _ONE)
            np.add.at(self.temporal_n.reshape(-1), (slot[:, None] * L + np.arange(L)[None, :]).ravel(), _ONE)
        # sequence patterns: contexts ending at q whose outcome q+d (d <= h) lies in this token
        if p.use_sequences:
            self._learn_patterns(seq, prev, rows, pvalid)
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

    def _learn_hops(self, seq: np.ndarray, pvalid: np.ndarray) -> None:
        """Co-occurrence and chains: a at position q -> b at q+d, for b in this token. Every hop's
        counts are added, and their touched rows' cache refreshed, in one call each (each count
        grows by the same 1.0, so the order of the additions does not matter)."""
        E = self.E
        qs, tgt, lay, late = self._hop_q
        if qs.size == 0:
            return
        valid = late[None, :] | pvalid[:, None]                   # [n, nq]
        src = np.broadcast_to(lay[:, None] * E, (valid.shape[0],) + lay.shape + (1,))[valid] + seq[:, qs][valid]  # [m, k]
        if src.shape[0] == 0:
            return
        b = seq[:, tgt][valid]
        src_rows = src.ravel()  # (rows of [hops * L, E]: hop, layer, expert a)
        np.add.at(self.hops.reshape(-1), (src[:, :, None] * E + b[:, None, :]).ravel(), _ONE)
        np.add.at(self.occ.reshape(-1), src_rows, _ONE)
        mark = np.zeros(self.occ.size, dtype=bool)
        mark[src_rows] = True
        touched = mark.nonzero()[0]  # rows whose counts changed: refresh their cache
        self.hops_lq.reshape(-1, E)[touched] = self._log1m(
            self.hops.reshape(-1, E)[touched], self.occ.reshape(-1)[touched][:, None], self.params.min_pattern_frequency)

    def _learn_patterns(self, seq, prev, rows, pvalid) -> None:
        p, L, h = self.params, self.L, self.h
        pl = p.pattern_length
        q0 = max(pl - 1, L - h)
        qs = np.arange(q0, 2 * L - 1)
        if qs.size == 0:
            return
        codes = set_codes(seq)                                               # [n, 2L]
        win = codes[:, (qs - pl + 1)[:, None] + np.arange(pl)[None, :]]      # [n, nq, pl]: the windows ending at qs
        valid = ((qs - pl + 1) >= L)[None, :] | pvalid[:, None]
        keys = context_hash(win, (qs % L)[None, :])                          # [n, nq]
        ti, qi = np.nonzero(valid)
        if ti.size == 0:
            return
        slots = self.store.slots(keys[ti, qi].tolist())
        keep = slots >= 0
        ti, qi, slots = ti[keep], qi[keep], slots[keep]
        np.add.at(self.store.access, slots, np.int64(1))
        # every distance d = 1..h at once (each count grows by the same 1.0: the order is free)
        tgt = qs[qi][:, None] + np.arange(1, h + 1)[None, :]                 # [m, h]
        i, j = ((tgt >= L) & (tgt < 2 * L)).nonzero()
        if i.size:
            row = slots[i] * h + j
            np.add.at(self.store.n.reshape(-1), row, _ONE)
            ex = seq[ti[i], tgt[i, j]]                                        # [m', k]
            np.add.at(self.store.counts.reshape(-1), (row[:, None] * self.E + ex).ravel(), _ONE)
        mark = np.zeros(self.store.capacity, dtype=bool)
        mark[slots] = True
        touched = np.flatnonzero(mark)  # patterns whose counts changed: refresh their cache
        st = self.store
        st.trusted[touched] = st.n[touched, 0] >= p.min_pattern_frequency
        st.lq[touched] = self._log1m(st.counts[touched], st.n[touched][..., None],
                                     p.confidence_fraction * p.min_pattern_frequency)

    def _log1m(self, c: np.ndarray, n: np.ndarray, min_count: float) -> np.ndarray:
        """log(1 - p) of the conditional probability p = c / n, 0 where c < min_count or
        p < min_confidence (the expert is then not predicted by this entry)."""
        prob = c / np.maximum(n, _ONE)
        keep = ((c >= min_count) & (prob >= self.params.min_confidence)).ravel().nonzero()[0]
        out = np.zeros_like(prob)  # (flat indices: the same elements, in order, as a boolean mask; faster)
        out.put(keep, np.log1p(-np.minimum(prob.take(keep), np.float32(1.0 - 1e-6))))
        return out
