"""The oracle with controlled mistakes: for "how accurate must a predictor be" sweeps.

For each predicted (step, layer) the true experts are each kept with probability `recall`, and
wrong experts are added — drawn uniformly among the layer's other experts, each with the same
probability — `false_positive_rate` per true expert on average. The draw is made once per
(step, layer) and reused by every hook that predicts that layer again (with a look-ahead of h
layers a layer is predicted h times; fresh draws would raise the effective recall). With
recall = 1 and false_positive_rate = 0 it answers exactly what `oracle` answers.
"""
from __future__ import annotations

import numpy as np
from pydantic import Field

from .base import Prefetch, Ranked
from .registry import register
from .simple import Oracle, OracleParams


class NoisyOracleParams(OracleParams):
    recall: float = Field(1.0, ge=0, le=1, description="probability that each true expert is predicted")
    false_positive_rate: float = Field(0.0, ge=0, description="expected wrong experts added per true expert")


@register
class NoisyOracle(Oracle):
    """Knows the routing ahead (like `oracle`), then forgets and invents experts at the set rates."""

    name = "noisy_oracle"
    Params = NoisyOracleParams
    needs_future = True

    def __init__(self, params, model, rng):
        super().__init__(params, model, rng)
        self._drawn: dict[tuple[int, int], np.ndarray] = {}
        self._exact = params.recall >= 1.0 and params.false_positive_rate <= 0.0

    def _noisy(self, step: int, layer: int, experts: np.ndarray) -> np.ndarray:
        key = (step, layer)
        got = self._drawn.get(key)
        if got is not None:
            return got
        p, E = self.params, self.model.num_experts
        true = np.asarray(experts, dtype=np.int64)
        kept = true[self.rng.random(true.size) < p.recall] if p.recall < 1.0 else true
        others = np.setdiff1d(np.arange(E, dtype=np.int64), true, assume_unique=True)
        wrong = others[:0]
        if p.false_positive_rate > 0 and others.size and true.size:
            q = min(1.0, p.false_positive_rate * true.size / others.size)
            wrong = others[self.rng.random(others.size) < q]
        got = np.union1d(kept, wrong)
        self._drawn[key] = got
        return got

    def on_gates(self, view) -> list[Ranked] | None:
        """The oracle's, when nothing is drawn; else None (the draws go gate by gate)."""
        return super().on_gates(view) if self._exact else None

    def _ahead(self, view, layer: int) -> list[Prefetch]:
        if self._exact:
            return super()._ahead(view, layer)
        if len(self._drawn) > 4 * (self.params.lookahead_layers + self.model.num_layers):
            now = (view.step, layer)
            self._drawn = {k: v for k, v in self._drawn.items() if k > now}
        out = Ranked()  # every score 1.0: each target's experts in id order (union1d sorts them)
        for step, lay, experts in view.future(self.params.lookahead_layers, after_layer=layer):
            es = self._noisy(step, lay, experts).tolist()
            out.add(step, lay, es, [1.0] * len(es))
        return out
