"""The predictor interface: the engine calls hooks, a predictor answers with prefetch requests.

Predictors never touch SimPy or the cache; they see a read-only `StepView` of the routing that is
known at the hook (and, if `needs_future`, the trace's future: only oracles may ask for it).
"""
from __future__ import annotations

from typing import ClassVar, Literal, NamedTuple, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..models import ModelSpec


class Prefetch(NamedTuple):
    """Load `expert` of `layer` for absolute step `step`; higher `score` = more confident."""

    step: int
    layer: int
    expert: int
    score: float = 1.0


def issue_order(p: Prefetch) -> tuple:
    """The order the engine issues requests in: target, then best score first, then lower expert id."""
    return p.step, p.layer, -p.score, p.expert


class Ranked:
    """A hook's answer as one block per target, already in `issue_order`: targets ascending, each
    block's experts best score first (ties: lower id first). It reads as a sequence of Prefetch,
    but the engine walks the blocks and neither sorts nor builds a Prefetch per request."""

    __slots__ = ("blocks",)

    def __init__(self) -> None:
        self.blocks: list[tuple[int, int, list[int], list[float]]] = []

    def add(self, step: int, layer: int, experts: list[int], scores: list[float]) -> None:
        """Append the block of target (step, layer), after every block added so far."""
        if experts:
            self.blocks.append((step, layer, experts, scores))

    def __iter__(self):
        for step, layer, experts, scores in self.blocks:
            for e, s in zip(experts, scores):
                yield Prefetch(step, layer, e, s)

    def __len__(self) -> int:
        return sum(len(b[2]) for b in self.blocks)

    def __bool__(self) -> bool:
        return bool(self.blocks)

    def __getitem__(self, i):
        return list(self)[i]

    def __eq__(self, other) -> bool:
        return list(self) == list(other)

    def __repr__(self) -> str:
        return f"Ranked({list(self)!r})"


class GateBlocks:
    """`on_gates`' answer as arrays, `per_gate` targets per gate, gate after gate: block b
    predicts experts[ends[b - 1]:ends[b]] (best first; ends[-1] = 0) with their scores for
    (steps[b], layers[b]), and gate l answers blocks l * per_gate ... (l + 1) * per_gate - 1. It
    reads as the list of the gates' Ranked answers; the flat engine path packs the arrays without
    building them."""

    __slots__ = ("steps", "layers", "experts", "scores", "ends", "per_gate")

    def __init__(self, steps: list[int] | np.ndarray, layers: list[int] | np.ndarray, experts: np.ndarray,
                 scores: np.ndarray, ends: list[int] | np.ndarray, per_gate: int = 1) -> None:
        self.steps, self.layers, self.experts, self.scores, self.ends = steps, layers, experts, scores, ends
        self.per_gate = per_gate

    def __len__(self) -> int:
        return len(self.ends) // self.per_gate

    def __getitem__(self, gate: int) -> Ranked:
        out, ends = Ranked(), self.ends
        for b in range(gate * self.per_gate, (gate + 1) * self.per_gate):
            a = ends[b - 1] if b else 0
            out.add(int(self.steps[b]), int(self.layers[b]), self.experts[a:ends[b]].tolist(),
                    self.scores[a:ends[b]].tolist())
        return out

    def __iter__(self):
        return (self[g] for g in range(len(self)))


def ranked_blocks(reqs) -> list[tuple[int, int, list[int], list[float]]]:
    """Any hook answer as Ranked blocks: a Ranked's own, else its requests sorted by `issue_order`
    and grouped by target."""
    if type(reqs) is Ranked:
        return reqs.blocks
    blocks: list = []
    last, experts, scores = None, None, None
    for p in sorted(reqs, key=issue_order):
        if (p.step, p.layer) != last:
            last, experts, scores = (p.step, p.layer), [], []
            blocks.append((p.step, p.layer, experts, scores))
        experts.append(p.expert)
        scores.append(p.score)
    return blocks


class PredictorParams(BaseModel):
    """Parameters every predictor has; subclasses add their own (unknown keys are errors)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    latency_us: float = Field(0.0, ge=0, description="inference time charged per hook call")
    runs_on: Literal["cpu", "gpu"] = Field(
        "cpu", description="gpu: latency delays the compute stream; cpu: it delays the prefetches")
    protect: bool = Field(
        True, description="keep a predicted expert (resident or prefetched) from eviction until its layer has run")
    max_inflight: int | None = Field(
        None, ge=1, description="most prefetches queued or copying at once (None: no limit)")
    max_bytes_per_layer: float | None = Field(
        None, gt=0, description="most prefetched bytes for any one (step, layer) (None: no limit)")


class StepView(Protocol):
    """What the engine shows a predictor about the current step. Implemented by the simulator
    (engine.sim._View) and the real executor (real.view.RealView); tests/test_step_view.py checks
    that both have exactly these members with these signatures."""

    step: int                 # absolute step index
    phase: str                # "prefill" or "decode"
    request_ids: np.ndarray   # requests in this step's batch
    token_request_ids: np.ndarray  # request id of each token row of token_experts

    def experts(self, layer: int) -> np.ndarray:
        """Unique experts `layer` needs (LookupError before its gate has run)."""

    def token_experts(self, layer: int) -> np.ndarray:
        """[tokens, top_k] routing of `layer` (LookupError before its gate has run)."""

    def routing(self) -> np.ndarray:
        """[tokens, layers, top_k]: token_experts of every layer at once (LookupError before the
        last layer's gate has run)."""

    def pre_attn(self, layer: int) -> np.ndarray:
        """[tokens, d] pre-attention hidden states of `layer`, from its pre-attention hook on
        (LookupError before; and in a run whose predictor does not set `needs_pre_attn`)."""

    def future(self, n_layers: int, after_layer: int) -> list[tuple[int, int, np.ndarray]]:
        """Oracles only (`needs_future`, else PermissionError): (step, layer, unique experts) of the
        next `n_layers` layers after `after_layer` of this step, running on into later steps."""


class Predictor:
    """Base class: hooks return lists of Prefetch (or a Ranked); default is to prefetch nothing."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[PredictorParams]] = PredictorParams
    needs_future: ClassVar[bool] = False  # True only for oracles: they read the trace ahead
    needs_pre_attn: ClassVar[bool] = False  # True: the run reads the trace's pre_attn for view.pre_attn

    def __init__(self, params: PredictorParams, model: ModelSpec, rng: np.random.Generator):
        self.params, self.model, self.rng = params, model, rng

    def latency_for(self, tokens: int) -> float:
        """µs one hook call costs for a step of `tokens` tokens (default: `latency_us`)."""
        return self.params.latency_us

    def lookahead_steps(self) -> int:
        """How many steps past the current one the engine must plan ahead for `future`."""
        return 0

    def on_step_start(self, view: StepView) -> list[Prefetch]:
        return []

    def on_pre_attention(self, view: StepView, layer: int) -> list[Prefetch]:
        return []

    def on_gate(self, view: StepView, layer: int) -> list[Prefetch]:
        return []

    def on_gates(self, view: StepView) -> list | GateBlocks | None:
        """Optional: the answers of every `on_gate` of the step at once, in layer order, with the
        predictor's state after them as if each had been called in turn; or None (the default:
        the engine calls on_gate layer by layer). The view shows the whole step's routing, so the
        answer for layer l must read only layers <= l. The flat engine path asks it for predictors
        without a pre-attention hook (tests/test_on_gates.py holds it to the per-gate answers)."""
        return None

    def on_step_end(self, view: StepView) -> None:
        """Called after the last layer: learn from the step's now fully known routing."""
