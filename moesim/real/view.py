"""The read-only StepView predictors see over a real run (as engine.sim._View), and the steps'
pre-attention states for predictors that read them."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .executor import RealExecutor


class RealView:
    """The StepView of one step of a real run: the routing of the gated layers, the pre-attention
    states of the layers whose pre-attention hook has run, and (oracles only) the steps ahead."""

    def __init__(self, ex: RealExecutor, plan):
        self._ex, self._plan = ex, plan
        self.step, self.phase, self.request_ids = plan.index, plan.phase, plan.request_ids
        self.token_request_ids = plan.token_requests
        self.gated = -1  # last layer whose gate has run
        self.pre_attn_layer = -1  # last layer whose pre-attention hook has run

    def _check(self, layer: int) -> None:
        if layer > self.gated:
            raise LookupError(f"layer {layer} is not routed yet (gate ran up to layer {self.gated})")

    def experts(self, layer: int) -> np.ndarray:
        self._check(layer)
        return np.unique(self._plan.keys[layer]) - layer * self._ex.E

    def pre_attn(self, layer: int) -> np.ndarray:
        """[tokens, d] pre-attention hidden states of `layer` (known from its pre-attention hook on)."""
        if layer > self.pre_attn_layer:
            raise LookupError(f"layer {layer}'s pre-attention state is not computed yet")
        if self._plan.pre_attn is None:
            raise LookupError("this run has no pre_attn states (the predictor class must set needs_pre_attn)")
        return self._plan.pre_attn[:, layer, :]

    def token_experts(self, layer: int) -> np.ndarray:
        self._check(layer)
        return self._plan.routing[:, layer, :]

    def future(self, n_layers: int, after_layer: int) -> list[tuple[int, int, np.ndarray]]:
        """Oracle only: the unique experts of the next `n_layers` layers after `after_layer`
        (later steps from the static plan, which is exact: arrivals are closed)."""
        ex = self._ex
        if not ex.predictor.needs_future:
            raise PermissionError("only predictors with needs_future may read the trace ahead")
        L, E = ex.L, ex.E
        out, plan, ahead, layer = [], self._plan, 0, after_layer
        for _ in range(n_layers):
            layer += 1
            if layer >= L:
                plan, layer = ex.steps.peek(ahead), 0
                ahead += 1
                if plan is None:
                    break
            keys = plan.keys[layer]
            out.append((plan.index, layer, (keys if ex.dedup else np.unique(keys)) - layer * E))
        return out


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
