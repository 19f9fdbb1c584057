"""The read-only StepView predictors see over a real run (as engine.sim._View), and the steps'
pre-attention states for predictors that read them."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from ..engine.sim import _View as SimView


class RealView(SimView):
    """The StepView of one step of a real run: the simulator's view (the routing of the gated
    layers, the pre-attention states of the layers whose pre-attention hook has run), over the
    executor (`E`, `L`, `dedup`, `predictor`, `steps`); only the steps ahead come from its plan."""

    def _steps_ahead(self, i: int):
        """The `i`-th step after this one, from the static plan (exact: arrivals are closed)."""
        return self._sim.steps.peek(i)

    def _dedup(self) -> bool:
        return self._sim.dedup


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
