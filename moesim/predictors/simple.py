"""The two reference predictors: on-demand (prefetch nothing) and the oracle (knows the trace)."""
from __future__ import annotations

from pydantic import Field

from .base import Predictor, PredictorParams, Prefetch, Ranked
from .registry import register


@register
class OnDemand(Predictor):
    """Load every expert when the gate asks for it: the baseline every prefetcher must beat."""

    name = "on_demand"


class OracleParams(PredictorParams):
    lookahead_layers: int = Field(1, ge=1, description="prefetch this many layers ahead of the gate")


@register
class Oracle(Predictor):
    """Knows the routing of the next `lookahead_layers` layers, across step boundaries too:
    an upper bound on what any prefetcher with that look-ahead can achieve."""

    name = "oracle"
    Params = OracleParams
    needs_future = True

    def lookahead_steps(self) -> int:
        return -(-self.params.lookahead_layers // self.model.num_layers)

    def _ahead(self, view, layer: int) -> Ranked:
        out = Ranked()  # every score 1.0: each target's experts in id order
        for step, lay, experts in view.future(self.params.lookahead_layers, after_layer=layer):
            es = sorted(experts.tolist())
            out.add(step, lay, es, [1.0] * len(es))
        return out

    def on_step_start(self, view) -> list[Prefetch]:
        # Before layer 0's gate nothing is known; the oracle still knows layer 0 (and beyond).
        return self._ahead(view, -1)

    def on_gate(self, view, layer: int) -> list[Prefetch]:
        return self._ahead(view, layer)

    def on_gates(self, view) -> list[Ranked]:
        """Every gate's answer from one read of the trace ahead (gate l's: the `lookahead_layers`
        layers after l), each target's experts sorted once."""
        h, L = self.params.lookahead_layers, self.model.num_layers
        blocks = []
        for step, lay, experts in view.future(L - 1 + h, after_layer=0):
            es = sorted(experts.tolist())
            blocks.append((step, lay, es, [1.0] * len(es)))  # (shared by the gates' answers, read-only)
        out = []
        for layer in range(L):
            r = Ranked()
            r.blocks = [b for b in blocks[layer:layer + h] if b[2]]
            out.append(r)
        return out
