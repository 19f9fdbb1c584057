"""Expert-activation-matrix prefetching, after MoE-Infinity (Xue et al., 2024): "request-level
tracing of expert activation".

Each running request keeps an expert activation matrix (EAM): [layers x experts] counts of its
tokens routed to each expert so far (prompt and generated tokens). Finished requests' matrices are
kept in a bounded collection (EAMC). At every gate the request's partial matrix is compared with
each stored one by cosine similarity — per layer, averaged over the layers (as MoE-Infinity's
tracer does) — and the best match's activation ratios at the next layers are prefetched, scaled by
MoE-Infinity's layer-proximity factor `1 - (l' - l) / (L + 1)`. The batch's prefetches are the
union over its requests, ranked by summed score. When the collection is full, a new matrix
replaces the least often matched one (MoE-Infinity's `collection_access` rule).

The similarity is kept incrementally: a gate changes one row of each request's matrix, so only
that row's cosine with the stored rows is recomputed (one [batch, E] x [E, capacity] product).

A request counts as finished when a decode step runs without it (a decode step carries every
running request); its matrix then enters the collection.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
from pydantic import Field

from .base import Prefetch
from .registry import register
from .topk import AheadParams, LayerAheadPredictor, row_owners


class ActivationMatrixParams(AheadParams):
    """Not in the seed; defaults are this implementation's choices (MoE-Infinity's EAMC size is
    a configuration value, not a published constant)."""

    lookahead_layers: int = Field(3, ge=1, le=4096, description="predict this many layers ahead")
    max_per_layer: int | None = Field(None, ge=1, description="at most this many experts per predicted layer "
                                                              "(default: 2 x top_k)")
    capacity: int = Field(256, ge=1, description="matrices of finished requests kept (EAMC size)")
    max_requests: int = Field(512, ge=1, description="running requests tracked at once (least recently seen dropped)")
    min_ratio: float = Field(0.0, ge=0, le=1, description="predict experts whose activation ratio in the match exceeds this")


def _unit_rows(m: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm over the last axis (zero rows stay zero)."""
    return m / np.maximum(np.sqrt(np.einsum("...e,...e->...", m, m)), 1e-30)[..., None]


@register
class ActivationMatrix(LayerAheadPredictor):
    """MoE-Infinity's activation-matrix matching; see the module docstring."""

    name = "activation_matrix"
    Params = ActivationMatrixParams

    def __init__(self, params, model, rng):
        super().__init__(params, model, rng)
        L, E, C, R = self.L, self.E, params.capacity, params.max_requests
        self.store_unit = np.zeros((L, E, C), dtype=np.float32)   # unit rows, [layer] -> [E, C]
        self.store_ratio = np.zeros((C, L, E), dtype=np.float32)  # rows / row sums
        self.filled = np.zeros(C, dtype=bool)
        self.access = np.zeros(C, dtype=np.int64)
        self._n_filled = 0
        self.counts = np.zeros((R, L, E), dtype=np.float32)       # running requests' matrices
        self.sim = np.zeros((R, C), dtype=np.float64)             # sum over layers of row cosines
        self.active: OrderedDict[int, int] = OrderedDict()        # request id -> pool slot
        self._free = list(range(R - 1, -1, -1))
        # MoE-Infinity's layer decay by distance d (kept positive past one model's depth)
        self._decay = np.maximum(1.0 - np.arange(L + 1 + 4096) / (L + 1), 1.0 / (L + 1))
        self._batch: set = set()
        self._target_lay = {l: np.array([lay for _d, _o, lay in t], dtype=np.int64) for l, t in self._targets.items()}
        self._slots = np.zeros(0, dtype=np.int64)
        self._owners = None

    # -- collection --

    def _finish(self, rid: int) -> None:
        slot = self.active.pop(rid)
        self._free.append(slot)
        m = self.counts[slot]
        if m.sum() <= 0:
            return
        if self._n_filled < self.filled.size:
            c = self._n_filled
            self._n_filled += 1
        else:
            c = int(np.argmin(self.access))
        rs = m.sum(axis=1, keepdims=True)
        self.store_ratio[c] = np.divide(m, rs, out=np.zeros_like(m), where=rs > 0)
        self.store_unit[:, :, c] = _unit_rows(m)
        self.filled[c] = True
        self.access[c] = 1
        if self.active:  # refresh the running requests' similarity to the replaced entry
            slots = np.fromiter(self.active.values(), dtype=np.int64)
            u = _unit_rows(self.counts[slots])                       # [n, L, E]
            self.sim[slots, c] = np.einsum("nle,le->n", u, self.store_unit[:, :, c])

    def _slot(self, rid: int) -> int:
        s = self.active.get(rid)
        if s is not None:
            self.active.move_to_end(rid)
            return s
        if not self._free:
            lru = next(iter(self.active))
            if lru in self._batch:  # the batch alone outgrows the pool: grow it
                self._grow()
            else:
                self._finish(lru)  # least recently seen
        s = self._free.pop()
        self.active[rid] = s
        self.counts[s] = 0
        self.sim[s] = 0
        return s

    def _grow(self) -> None:
        R = self.counts.shape[0]
        self.counts = np.concatenate([self.counts, np.zeros_like(self.counts)])
        self.sim = np.concatenate([self.sim, np.zeros_like(self.sim)])
        self._free.extend(range(2 * R - 1, R - 1, -1))

    # -- per step --

    def _new_step(self, view) -> None:
        ids = view.request_ids.tolist()
        self._batch = set(ids)
        if view.phase != "prefill":
            present = set(ids)
            for rid in [r for r in self.active if r not in present]:
                self._finish(rid)
        self._slots = np.array([self._slot(r) for r in ids], dtype=np.int64)
        self._owners = None

    def _best(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per request: index of the best-matching stored matrix, and which requests have one."""
        if not self._n_filled or slots.size == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(slots.size, dtype=bool)
        s = self.sim[slots, :self._n_filled]  # filled entries are 0 .. n_filled-1
        best = np.argmax(s, axis=1)
        ok = s[np.arange(slots.size), best] > 0
        return best, ok

    def _predict(self, view, layer: int, best: np.ndarray, ok: np.ndarray) -> list[Prefetch]:
        if not ok.any():
            return []
        b = best[ok]
        np.add.at(self.access, b, np.int64(1))
        r = self.store_ratio[b[:, None], self._target_lay[layer][None, :]]   # [n, h, E]
        if self.params.min_ratio > 0:
            r = np.where(r > self.params.min_ratio, r, 0.0)
        score = r.sum(axis=0) * self._decay[1:len(self._targets[layer]) + 1, None]
        return self._emit_all(view, layer, score)

    # -- hooks --

    def on_step_start(self, view) -> list[Prefetch]:
        self._begin(view)
        best, ok = self._best(self._slots)
        return self._predict(view, -1, best, ok)

    def on_gate(self, view, layer: int) -> list[Prefetch]:
        self._begin(view)
        te = np.asarray(view.token_experts(layer)).astype(np.int64)
        n, E = len(self._slots), self.E
        if n == 0:
            return []
        if self._owners is None or len(self._owners) != te.shape[0]:
            self._owners = row_owners(view, te.shape[0])
        own = np.repeat(self._owners, te.shape[1])
        add = np.bincount(own * E + te.ravel(), minlength=n * E).reshape(n, E).astype(np.float32)
        slots = self._slots
        old = self.counts[slots, layer]
        new = old + add
        self.counts[slots, layer] = new
        if self._n_filled:
            nf = self._n_filled
            self.sim[slots, :nf] += (_unit_rows(new) - _unit_rows(old)) @ self.store_unit[layer, :, :nf]
        best, ok = self._best(slots)
        return self._predict(view, layer, best, ok)
