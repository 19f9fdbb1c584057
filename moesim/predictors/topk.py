"""Top-K frequency prefetching (seed 004 §5), and the per-layer look-ahead machinery that the
heuristic predictors (topk, multilook, intelligent, activation_matrix) share.

Per-layer adaptation used by all of them: at `on_gate(view, l)` the routing of layers `<= l` of
this step is known; they predict layers `l+1 ... l+h` (`h = lookahead_layers`). Layers past the
last one wrap to the first layers of the next step (`step + 1`), which in decode is the next token
of the same requests. `on_step_start` predicts layers `0 ... h-1` of the step from what is known
before its first gate (the requests' previous tokens, global statistics). Predictions are for the
batch as a whole: a union over its tokens, ranked by score and capped at `max_per_layer` per layer.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
from pydantic import Field, model_validator

from .base import Predictor, PredictorParams, Prefetch, Ranked
from .registry import register

# ---------------------------------------------------------------------------------------------
# shared machinery
# ---------------------------------------------------------------------------------------------


class AheadParams(PredictorParams):
    """Parameters of every per-layer look-ahead heuristic."""

    lookahead_layers: int = Field(1, ge=1, le=4096,
                                  description="predict this many layers ahead of the gate (wraps to the next step)")
    max_per_layer: int = Field(32, ge=1, description="at most this many experts prefetched per predicted layer")


class RequestMemory:
    """What a predictor remembers per request id, bounded: the least recently seen are forgotten."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._d: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, rid) -> bool:
        return rid in self._d

    def get(self, rid, default=None):
        return self._d.get(rid, default)

    def put(self, rid, value) -> None:
        d = self._d
        d[rid] = value
        d.move_to_end(rid)
        while len(d) > self.capacity:
            d.popitem(last=False)

    def pop(self, rid, default=None):
        return self._d.pop(rid, default)

    def keys(self):
        return list(self._d.keys())


def row_owners(view, tokens: int) -> np.ndarray:
    """Index into `view.request_ids` of the request each routing row belongs to.

    From `view.token_request_ids` when the view has it (the engine's does). Otherwise: decode row i
    is request i; prefill rows are split into equal contiguous chunks, request after request."""
    n = len(view.request_ids)
    if n <= 1:  # (every row is the one request's)
        return np.zeros(tokens, dtype=np.int64)
    owners = getattr(view, "token_request_ids", None)
    if owners is not None and len(owners) == tokens:  # the engine says exactly whose row it is
        order = np.argsort(view.request_ids, kind="stable")
        return order[np.searchsorted(view.request_ids[order], owners)].astype(np.int64)
    if tokens == n:
        return np.arange(n, dtype=np.int64)
    if n == 1:
        return np.zeros(tokens, dtype=np.int64)
    base, extra = divmod(tokens, n)
    sizes = np.full(n, base, dtype=np.int64)
    sizes[:extra] += 1
    return np.repeat(np.arange(n, dtype=np.int64), sizes)


def last_rows(owners: np.ndarray, n: int) -> np.ndarray:
    """Per request (0..n-1): the index of its last routing row, or -1 if it has none."""
    out = np.full(n, -1, dtype=np.int64)
    out[owners] = np.arange(len(owners), dtype=np.int64)  # later rows overwrite earlier ones
    return out


def sample_rows(tokens: int, limit: int) -> np.ndarray | None:
    """None (use every row) or an evenly spaced, deterministic sample of `limit` row indices."""
    if tokens <= limit:
        return None
    return np.unique(np.linspace(0, tokens - 1, limit).round().astype(np.int64))


class LayerAheadPredictor(Predictor):
    """Base of the per-layer heuristics: look-ahead targets, emission, per-step bookkeeping."""

    Params = AheadParams

    def __init__(self, params, model, rng):
        super().__init__(params, model, rng)
        self.L, self.E, self.K = model.num_layers, model.num_experts, model.top_k
        h, L = params.lookahead_layers, self.L
        # from layer l (-1 = step start): [(distance d, step offset, target layer)]
        self._targets = {l: [(d, (l + d) // L, (l + d) % L) for d in range(1, h + 1)]
                         for l in range(-1, L)}
        # from layer l: the targets' positions in [this step's layers | the next steps' layers]
        self._target_pos = {l: np.array([off * L + lay for _d, off, lay in t], dtype=np.int64)
                            for l, t in self._targets.items()}
        self._cur_step: int | None = None
        self._cap = getattr(params, "max_per_layer", None) or 2 * self.K  # per-layer budget
        self._h = h
        self._emit_rows = np.arange(h)[:, None]  # row index of a [targets, E] score table

    # -- per-step bookkeeping --

    def _begin(self, view) -> None:
        if view.step != self._cur_step:
            self._cur_step = view.step
            self._new_step(view)

    def _new_step(self, view) -> None:
        """Called once per step, before its first hook answers."""

    # -- emission --

    def _emit_all(self, view, layer: int, scores: np.ndarray) -> Ranked:
        """Emit scores[i] ([targets, E]) for the i-th target after `layer`: the `max_per_layer`
        best experts with a positive score each (ties: lower id first, the engine's issue order)."""
        cap = min(self._cap, self.E)
        order = (-scores).argsort(axis=1, kind="stable")[:, :cap]
        vals = np.take_along_axis(scores, order, axis=1) if scores.shape[0] != self._h else scores[self._emit_rows, order]
        step, out = view.step, Ranked()
        npos = (vals > 0).sum(axis=1).tolist()  # (each row is sorted: its positive scores lead)
        for (_d, off, lay), es, vs, n in zip(self._targets[layer], order.tolist(), vals.tolist(), npos):
            if vs and vs[-1] <= 0:
                es, vs = es[:n], vs[:n]
            out.add(step + off, lay, es, vs)
        return out


class HistoryParams(AheadParams):
    """Look-ahead heuristics that remember each request's previous token."""

    max_requests: int = Field(4096, ge=1, description="requests whose last token is remembered (least recently seen forgotten)")
    max_tokens: int = Field(256, ge=1, description="steps with more tokens (prefill) are read through an evenly spaced sample of this many")


class HistoryPredictor(LayerAheadPredictor):
    """Adds a bounded memory of each request's previous token's routing ([layers, top_k])."""

    Params = HistoryParams

    def __init__(self, params, model, rng):
        super().__init__(params, model, rng)
        self.memory = RequestMemory(params.max_requests)
        self._routing = None  # (view, step, its routing): _step_routing's last answer

    def _new_step(self, view) -> None:
        self._prev, self._pvalid = self._prev_routing(view)

    def _prev_routing(self, view) -> tuple[np.ndarray, np.ndarray]:
        """Decode: per row, the routing [L, k] of the request's previous token (zeros where
        unknown) and whether it is known. Prefill rows have no usable previous token at a gate."""
        n = len(view.request_ids)
        prev = np.zeros((n, self.L, self.K), dtype=np.int64)
        valid = np.zeros(n, dtype=bool)
        if view.phase == "prefill":
            return prev[:0], valid[:0]
        get = self.memory.get
        for i, rid in enumerate(view.request_ids.tolist()):
            r = get(rid)
            if r is not None:
                prev[i] = r
                valid[i] = True
        return prev, valid

    # -- hooks: predict at the step's start (and at each gate: subclasses), learn from the whole step at its end

    def on_step_start(self, view) -> list[Prefetch]:
        self._begin(view)
        return self._predict(view, -1)

    def on_step_end(self, view) -> None:
        self._begin(view)
        routing = self._step_routing(view)
        if routing.shape[0] == 0:
            return
        self._learn(view, routing, *self._learn_rows(view, routing))

    def _learn(self, view, routing: np.ndarray, rows, prev, pvalid, owners) -> None:
        """Learn from the step's routing [T, L, k] and the rows `_learn_rows` picked (subclasses)."""
        raise NotImplementedError

    def _step_routing(self, view) -> np.ndarray:
        """The step's whole routing [T, L, k] (call once every layer has been gated; read once per
        step: on_gates and on_step_end share it)."""
        got = self._routing
        if got is not None and got[0] is view and got[1] == view.step:
            return got[2]
        routing = np.array(view.routing(), dtype=np.int64, order="C")
        self._routing = (view, view.step, routing)
        return routing

    def _learn_rows(self, view, routing: np.ndarray):
        """Rows to learn from (sampled when there are many) with each row's previous token.

        Returns (rows [T', L, k], prev [T', L, k], prev_valid [T'], owners [T] of all rows)."""
        T = routing.shape[0]
        owners = row_owners(view, T)
        if view.phase == "prefill":
            prev = np.empty_like(routing)
            prev[1:] = routing[:-1]
            valid = np.zeros(T, dtype=bool)
            valid[1:] = owners[1:] == owners[:-1]
            if T:
                prev[0] = 0
        else:
            self._begin(view)
            prev, valid = self._prev, self._pvalid
        idx = sample_rows(T, self.params.max_tokens)
        if idx is not None:
            return routing[idx], prev[idx], valid[idx], owners
        return routing, prev, valid, owners

    def _remember(self, view, routing: np.ndarray, owners: np.ndarray) -> None:
        ids = view.request_ids.tolist()
        if len(ids) == 1:  # (every row is the one request's: its last is the step's last)
            self.memory.put(ids[0], routing[-1].copy())
            return
        last = last_rows(owners, len(ids))
        for i, rid in enumerate(ids):
            if last[i] >= 0:
                self.memory.put(rid, routing[last[i]].copy())


# ---------------------------------------------------------------------------------------------
# Top-K frequency
# ---------------------------------------------------------------------------------------------


class TopKParams(PredictorParams):
    """Seed §5: `k=32`, `decay_factor=0.999`, `update_frequency=100`, `min_count_threshold=1.0`;
    adaptive K ("Advanced Variations"): `target_hit_rate=0.95`, `k_adjustment_period=500`, +4 / -2,
    K within [8, num_experts // 2], mean hit rate of the last 10 measurements, band ±0.02."""

    lookahead_layers: int = Field(1, ge=1, le=4096,
                                  description="predict this many layers ahead of the gate (wraps to the next step)")
    k: int = Field(32, ge=1, description="experts prefetched per layer (the per-layer budget): the K most frequent")
    decay_factor: float = Field(0.999, gt=0, le=1, description="counts are multiplied by this per token")
    update_frequency: int = Field(100, ge=1, description="recompute the top-K sets every this many tokens")
    min_count: float = Field(1.0, ge=0, description="experts with a decayed count below this are never in a top-K set")
    adaptive_k: bool = Field(False, description="adapt K to reach target_hit_rate (seed's AdaptiveTopKStrategy)")
    target_hit_rate: float = Field(0.95, gt=0, le=1, description="adaptive_k: wanted share of needed experts in the set")
    k_adjust_period: int = Field(500, ge=1, description="adaptive_k: adjust K every this many tokens")
    k_step_up: int = Field(4, ge=0, description="adaptive_k: K grows by this when the hit rate is too low")
    k_step_down: int = Field(2, ge=0, description="adaptive_k: K shrinks by this when it is too high")
    k_min: int = Field(8, ge=1, description="adaptive_k: lower bound of K")
    k_max: int | None = Field(None, ge=1, description="adaptive_k: upper bound of K (default num_experts // 2)")
    hit_rate_window: int = Field(10, ge=1, description="adaptive_k: steps averaged for the hit rate")

    @model_validator(mode="after")
    def _check(self):
        if self.k_max is not None and self.k_max < self.k_min:
            raise ValueError(f"k_max ({self.k_max}) is below k_min ({self.k_min})")
        return self


@register
class TopK(LayerAheadPredictor):
    """Prefetch, for the next `lookahead_layers` layers, the K experts of that layer with the
    highest exponentially decayed use count. The sets are recomputed every `update_frequency`
    tokens (not at every call), as in the seed, so nothing is prefetched before the first
    `update_frequency` tokens. With `adaptive_k`, the "hit rate" that steers K is the share of each
    step's needed (layer, expert) pairs that the sets held (the predictor cannot see the cache)."""

    name = "topk"
    Params = TopKParams

    def __init__(self, params, model, rng):
        super().__init__(params, model, rng)
        p, L, E = params, self.L, self.E
        self.counts = np.zeros((L, E), dtype=np.float64)
        self.k = min(p.k, E)
        if p.adaptive_k:
            self.k_lo = min(p.k_min, E)
            self.k_hi = max(self.k_lo, min(E, p.k_max if p.k_max is not None else E // 2))
            self.k = int(np.clip(self.k, self.k_lo, self.k_hi))
        self.tokens = 0
        self._next_recompute = p.update_frequency
        self._next_adjust = p.k_adjust_period
        self.hit_rates: list[float] = []
        self.sets = np.zeros((L, E), dtype=bool)          # current top-K membership per layer
        self.scores = np.zeros((L, E), dtype=np.float64)  # share of the layer's count, members only
        self._lists: list[tuple[list[int], list[float]]] = [([], [])] * L

    def _recompute(self) -> None:
        c, k = self.counts, self.k
        order = np.argsort(-c, axis=1, kind="stable")[:, :k]
        members = np.zeros_like(self.sets)
        np.put_along_axis(members, order, True, axis=1)
        members &= c >= self.params.min_count
        self.sets = members
        tot = c.sum(axis=1, keepdims=True)
        self.scores = np.where(members, c / np.where(tot > 0, tot, 1.0), 0.0)
        lists = []
        for l in range(self.L):
            idx = order[l][members[l, order[l]]]
            ranked = sorted(zip(self.scores[l, idx].tolist(), idx.tolist()), key=lambda t: (-t[0], t[1]))
            lists.append(([e for _s, e in ranked], [s for s, _e in ranked]))  # in the engine's issue order
        self._lists = lists

    def _predict(self, view, layer: int) -> Ranked:
        out, step, lists = Ranked(), view.step, self._lists
        for _d, off, lay in self._targets[layer]:
            experts, scores = lists[lay]
            out.add(step + off, lay, experts, scores)  # (the lists are shared, read-only)
        return out

    def on_step_start(self, view) -> list[Prefetch]:
        return self._predict(view, -1)

    def on_gate(self, view, layer: int) -> list[Prefetch]:
        return self._predict(view, layer)

    def on_step_end(self, view) -> None:
        p, L, E = self.params, self.L, self.E
        routing = np.stack([np.asarray(view.token_experts(l)) for l in range(L)], axis=1)  # [T, L, k]
        T = routing.shape[0]
        if T == 0:
            return
        flat = (routing.astype(np.int64) + (np.arange(L, dtype=np.int64) * E)[None, :, None]).ravel()
        used = np.bincount(flat, minlength=L * E).reshape(L, E)
        if p.adaptive_k:
            needed = used > 0
            n = int(needed.sum())
            if n:
                self.hit_rates.append(float((needed & self.sets).sum()) / n)
                del self.hit_rates[:-p.hit_rate_window]
        self.counts *= p.decay_factor ** T
        self.counts += used
        self.tokens += T
        if p.adaptive_k and self.tokens >= self._next_adjust:
            self._next_adjust = (self.tokens // p.k_adjust_period + 1) * p.k_adjust_period
            self._adapt_k()
        if self.tokens >= self._next_recompute:
            self._next_recompute = (self.tokens // p.update_frequency + 1) * p.update_frequency
            self._recompute()

    def _adapt_k(self) -> None:
        p = self.params
        if len(self.hit_rates) < p.hit_rate_window:
            return
        rate = float(np.mean(self.hit_rates))
        if rate < p.target_hit_rate - 0.02:
            self.k = min(self.k + p.k_step_up, self.k_hi)
        elif rate > p.target_hit_rate + 0.02:
            self.k = max(self.k - p.k_step_down, self.k_lo)
        self._recompute()
