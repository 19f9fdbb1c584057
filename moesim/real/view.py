"""The read-only StepView predictors see over a real run (as engine.sim._View), and the steps'
pre-attention states for predictors that read them."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice

import numpy as np

from ..engine.sim import _View as SimView


class RealView(SimView):
    """The StepView of one step of a real run: the simulator's view (the routing of the gated
    layers, the pre-attention states of the layers whose pre-attention hook has run), over the
    executor (`E`, `L`, `dedup`, `predictor`, `steps`); only the steps ahead come from its plan."""

    def future(self, n_layers: int, after_layer: int) -> list[tuple[int, int, np.ndarray]]:
        """Oracle only: the unique experts of the next `n_layers` layers after `after_layer`
        (later steps from the static plan, which is exact: arrivals are closed)."""
        ex = self._sim
        if not ex.predictor.needs_future:
            raise PermissionError("only predictors with needs_future may read the trace ahead")
        return [(plan.index, layer, (plan.keys[layer] if ex.dedup else np.unique(plan.keys[layer])) - layer * ex.E)
                for plan, layer in islice(self._layers_after(after_layer), n_layers)]

    def _layers_after(self, after_layer: int) -> Iterator:
        """(plan, layer) of every layer after `after_layer` of this step, then of the steps ahead."""
        for layer in range(after_layer + 1, self._sim.L):
            yield self._plan, layer
        ahead = 0
        while (plan := self._sim.steps.peek(ahead)) is not None:
            ahead += 1
            for layer in range(self._sim.L):
                yield plan, layer


def with_pre_attn(steps: Iterable, requests: dict) -> Iterator:
    """The steps of engine.plan.static_plan with `pre_attn` set ([tokens, layers, d], rows in the
    order of the step's routing rows, as the engine's scheduler sets it). `requests`: request id ->
    RequestTrace read with its pre_attn, filled as the plan reads them; finished ones are dropped."""
    pos: dict[int, int] = {}
    for plan in steps:
        ids = plan.request_ids.tolist()
        if plan.phase == "prefill":
            plan.pre_attn = np.concatenate([requests[r].pre_attn[:requests[r].prompt_len] for r in ids], axis=0)
            pos.update((r, requests[r].prompt_len) for r in ids)
        else:
            plan.pre_attn = np.stack([requests[r].pre_attn[pos[r]] for r in ids])
            for r in ids:
                pos[r] += 1
        for r in plan.finished_requests.tolist():
            requests.pop(r, None)
            pos.pop(r, None)
        yield plan
