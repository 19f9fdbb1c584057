"""Intelligent Adaptive prefetching (seed 004 §6): four components — layer-to-layer transitions,
decayed frequency, recency, and high-confidence transition patterns — fused with weights that are
adapted online from each component's F1 against the routing that actually happened.

Per-layer adaptation: the seed's "transition matrix" (expert of token t -> expert of token t+1)
becomes one matrix per layer, expert at layer l -> expert at layer l+1 of the same token (the last
layer's matrix maps to layer 0 of the request's next token). Frequency and recency are kept per
layer. A component's prediction for the batch is the union of its per-token predictions.

- transition: per token, the experts whose row-normalised transition probability from any of the
  token's experts at the gated layer exceeds `transition_threshold`, at most `transition_k`
  (farther layers: the rows are carried on through the next layers' matrices).
- pattern: as the seed codes it, the same transitions at the stricter `pattern_threshold`, at
  most `pattern_k`, for tokens with `pattern_min_history` layers of history.
- frequency: the layer's `frequency_k` experts with the highest decayed use count.
- recency: the layer's `recency_k` most recently used experts.

Fusion: an expert's score is the summed weight of the components that predict it; the best
`max_per_layer` are prefetched. When a layer's gate runs, each component's prediction for it
(made one layer earlier) is scored by F1 against the experts actually routed, and the weights
move (`weight_update`). Transitions and frequencies decay by `decay_rate` per token; the decay is
applied lazily (one global scale), which leaves probabilities and rankings unchanged.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from .base import GateBlocks, Prefetch, Ranked
from .registry import register
from .topk import HistoryParams, HistoryPredictor, sample_rows

COMPONENTS = ("transition", "frequency", "recency", "pattern")


class IntelligentParams(HistoryParams):
    """Defaults from seed §6 (`IntelligentStrategy.__init__`, the component `_predict_from_*`
    methods and `StrategyConfig.intelligent_params`)."""

    lookahead_layers: int = Field(1, ge=1, le=4096, description="predict this many layers ahead of the gate")
    max_per_layer: int = Field(32, ge=1, description="fused prediction size per layer (seed: max_predictions)")
    adaptation_rate: float = Field(0.1, gt=0, description="added to a transition count per observed pair")
    decay_rate: float = Field(0.99, gt=0, le=1, description="transitions and frequencies decay by this per token")
    transition_weight: float = Field(0.4, ge=0, description="initial fusion weight")
    frequency_weight: float = Field(0.3, ge=0, description="initial fusion weight")
    recency_weight: float = Field(0.2, ge=0, description="initial fusion weight")
    pattern_weight: float = Field(0.1, ge=0, description="initial fusion weight")
    weight_learning_rate: float = Field(0.01, ge=0, le=1, description="step of the online weight update")
    weight_update: Literal["f1", "inverse_error"] = Field(
        "f1", description="f1: w += lr*(F1-0.5), renormalised (seed _adapt_fusion_weights); "
                          "inverse_error: EMA towards 1/(1-F1+0.1) (seed adaptive_weight_update)")
    transition_threshold: float = Field(0.05, ge=0, le=1, description="transition probability to predict an expert")
    transition_k: int = Field(12, ge=1, description="transition predictions per token")
    frequency_k: int = Field(8, ge=1, description="most frequent experts predicted")
    recency_k: int = Field(6, ge=1, description="most recently used experts predicted")
    pattern_threshold: float = Field(0.1, ge=0, le=1, description="transition probability for the pattern component")
    pattern_k: int = Field(8, ge=1, description="pattern predictions per token")
    pattern_min_history: int = Field(3, ge=1, description="layers of history a token needs for the pattern component")

    @model_validator(mode="after")
    def _check(self):
        if self.transition_weight + self.frequency_weight + self.recency_weight + self.pattern_weight <= 0:
            raise ValueError("the initial fusion weights must not all be zero")
        return self


@register
class Intelligent(HistoryPredictor):
    """Seed §6 on per-layer routing; see the module docstring."""

    name = "intelligent"
    Params = IntelligentParams

    def __init__(self, params, model, rng):
        super().__init__(params, model, rng)
        L, E = self.L, self.E
        self.trans = np.zeros((L, E, E), dtype=np.float64)  # raw; true value = raw / self._inv
        self.freq = np.zeros((L, E), dtype=np.float64)      # same scale as trans
        self.last_used = np.zeros((L, E), dtype=np.float64)  # token clock at last use (0 = never)
        self.clock = 0
        self._inv = 1.0  # 1 / (product of decays so far): lazy global decay
        w = np.array([params.transition_weight, params.frequency_weight,
                      params.recency_weight, params.pattern_weight], dtype=np.float64)
        self._w0 = w / w.sum()
        self.weights = self._w0.copy()
        self._rowsum = np.full((L, E), 1e-300)                 # row sums of trans (never 0)
        self.P = np.zeros((L, E, E), dtype=np.float32)          # trans, rows normalised
        self._pending: dict[tuple[int, int], np.ndarray] = {}  # (step, layer) -> component masks [4, E]
        from . import intelligent_jit as jit  # (numba: loaded by the runs that use this predictor only)
        self._fuse, self._adapt, self._first_hop = jit.fuse, jit.adapt, jit.first_hop
        self._refresh_jit, self._learn_jit = jit.refresh, jit.learn_refresh
        self._gates, self._start = jit.gates, jit.start
        # the thresholds in q's precision, and per token at most transition_k / pattern_k experts:
        # the k-th largest q of each token's row
        self._fuse_args = (np.float32(params.transition_threshold), np.float32(params.pattern_threshold),
                           E - min(params.transition_k, E), E - min(params.pattern_k, E))
        self._no_q = np.zeros((0, E), dtype=np.float32)  # (no token to carry)
        self._no_token = np.zeros(0, dtype=np.bool_)
        self._no_masks = np.zeros((4, E), dtype=np.float64)
        self._top_k = (min(params.frequency_k, E), min(params.recency_k, E))
        # each gate's first target: its step offset and layer
        self._next_off, self._next_lay = (list(x) for x in zip(*[self._targets[l][0][1:] for l in range(L)]))
        self._refresh()

    @property
    def fusion_weights(self) -> dict[str, float]:
        return dict(zip(COMPONENTS, self.weights.tolist()))

    # -- prediction --

    def _context(self, view, layer: int, te: np.ndarray | None = None):
        """(experts [T', k] at the source layer, source layer, rows with enough history (None:
        all)) or None."""
        L, need = self.L, self.params.pattern_min_history
        if layer >= 0:
            te = np.asarray(view.token_experts(layer)) if te is None else te
            if te.shape[0] > self.params.max_tokens:
                te = te[sample_rows(te.shape[0], self.params.max_tokens)]
            if layer + 1 >= need:
                return te, layer, None
            if view.phase != "prefill" and self._pvalid.shape[0] == te.shape[0]:
                return te, layer, np.flatnonzero(self._pvalid & (layer + 1 + L >= need))
            return te, layer, np.zeros(0, dtype=np.int64)
        if view.phase == "prefill" or not self._pvalid.any():
            return None
        return self._prev[self._pvalid, L - 1, :], L - 1, (None if L >= need else np.zeros(0, dtype=np.int64))

    def _predict(self, view, layer: int, te: np.ndarray | None = None) -> list[Prefetch]:
        p, L = self.params, self.L
        ctx = self._context(view, layer, te)
        te, ok = None, self._no_token
        if ctx is not None and ctx[0].shape[0]:
            te, src, enough = ctx
            if enough is None:
                ok = np.ones(te.shape[0], dtype=np.bool_)
            else:
                ok = np.zeros(te.shape[0], dtype=np.bool_)
                ok[enough] = True
        out = Ranked()
        w, fuse, q, rows = self.weights, self._fuse, self._no_q, None
        for d, off, lay in self._targets[layer]:
            masks = self._masks0[lay].copy()  # frequency and recency rows set
            if te is not None:  # per token, each expert's best transition probability d layers on
                if d == 1:
                    q = self._first_hop(self.P, src, te)                     # [T', E]
                else:
                    rows = (self.P[src][te] if rows is None else rows) @ self.P[(src + d - 1) % L]  # [T', k, E]
                    q = rows.max(axis=1)
            step = view.step + off
            if d == 1:
                self._pending[(step, lay)] = masks
            keep, fused = fuse(q, masks, self._tie[lay], w, *self._fuse_args, ok, p.max_per_layer)
            out.add(step, lay, keep.tolist(), fused.tolist())
        return out

    # -- online weight adaptation --

    def _evaluate(self, view, layer: int, te: np.ndarray) -> None:
        key = (view.step, layer)
        masks = self._pending.pop(key, None)
        if len(self._pending) > 8:  # targets never reached (trace ended, batch changed): forget
            self._pending = {k: v for k, v in self._pending.items() if k > key}
        if masks is None:
            return
        p = self.params
        self.weights = self._adapt(masks, te, self.weights, self._w0, p.weight_learning_rate, p.weight_update == "f1")

    def _refresh(self) -> None:
        """The per-layer frequency / recency top sets (fixed within a step), and the frequency
        share that breaks fused-score ties (intelligent_jit.refresh; after learning: learn_refresh)."""
        self._tie, self._masks0 = self._refresh_jit(self.freq, self.last_used, *self._top_k)

    # -- hooks --

    def on_step_start(self, view) -> list[Prefetch]:
        if self._h != 1:
            return super().on_step_start(view)
        self._begin(view)
        p, step = self.params, view.step  # (one layer ahead: compiled, intelligent_jit.start)
        keep, fused, self._pending[(step, 0)] = self._start(
            self.P, self._prev, self._pvalid, self.L >= p.pattern_min_history, self._masks0, self._tie, self.weights,
            *self._fuse_args, p.max_per_layer)
        out = Ranked()
        out.add(step, 0, keep.tolist(), fused.tolist())
        return out

    def on_gate(self, view, layer: int) -> list[Prefetch]:
        self._begin(view)
        te = np.asarray(view.token_experts(layer))
        self._evaluate(view, layer, te)
        return self._predict(view, layer, te)

    def on_gates(self, view) -> GateBlocks | None:
        """Every gate hook of the step at once (Predictor.on_gates), compiled
        (intelligent_jit.gates), with one layer of look-ahead; else None (the engine asks on_gate
        layer by layer). Also None where the gates' forgetting rule (_evaluate) would act: more
        than 8 other predictions pending, or one for a later layer of this step."""
        pending, step = self._pending, view.step
        others = len(pending) - ((step, 0) in pending)
        if self._h != 1 or others > 8 or (others and any(k[0] == step and k[1] for k in pending)):
            return None
        self._begin(view)
        p = self.params
        routing = self._step_routing(view)
        T = routing.shape[0]
        idx = sample_rows(T, p.max_tokens)
        rows = routing if idx is None else routing[idx]
        n = rows.shape[0]  # (_context: the previous token's layers count where known, in decode)
        pvalid = self._pvalid if view.phase != "prefill" and self._pvalid.shape[0] == n else np.zeros(n, np.bool_)
        masks = pending.pop((step, 0), None)
        keep, fused, ends, self.weights, last = self._gates(
            self.P, routing, rows, pvalid, p.pattern_min_history, self._masks0, self._tie, self.weights, self._w0,
            p.weight_learning_rate, p.weight_update == "f1", self._no_masks if masks is None else masks,
            masks is not None, *self._fuse_args, p.max_per_layer)
        pending[(step + 1, 0)] = last
        return GateBlocks([step + off for off in self._next_off], self._next_lay, keep, fused, ends.tolist())

    def _learn(self, view, routing: np.ndarray, rows, prev, pvalid, owners) -> None:
        p = self.params
        T = routing.shape[0]
        weight = T / rows.shape[0]
        fade = p.decay_rate ** T
        if fade < 1e-100:  # everything learnt so far has decayed away
            self.trans[:] = 0.0
            self.freq[:] = 0.0
            self.P[:] = 0.0
            self._rowsum[:] = 1e-300
            self._inv = 1.0
        else:
            self._inv /= fade
        if self._inv > 1e100:
            self.trans /= self._inv
            self.freq /= self._inv
            self._rowsum = np.maximum(self._rowsum / self._inv, 1e-300)
            self._inv = 1.0
        self.clock += T
        # transitions (layer l -> l+1 within the token, last layer -> layer 0 of the next token),
        # frequencies and last uses
        self._remember(view, routing, owners)
        self._tie, self._masks0 = self._learn_jit(
            self.trans, self._rowsum, self.P, self.freq, self.last_used, rows, prev, pvalid,
            np.float64(p.adaptation_rate * weight * self._inv), np.float64(weight * self._inv), float(self.clock),
            *self._top_k)
