"""Closed-form bounds that let the search prune a hopeless configuration without simulating it.

A step of `b` sequences runs every MoE layer's attention and at least `top_k` routed experts one
after another on the compute stream. With roofline costs (launch + max(FLOPs/peak, bytes/HBM)),
spreading the b·top_k token-expert pairs over more experts only adds time (each extra expert
reads its weights again), so `top_k` experts of `b` tokens each is the cheapest routing. Hence
  step(b) >= layers · (attention(b) + top_k · expert(b) + shared(b)),
TPOT >= step(1), and tokens/s <= b / step(b) (a step makes at most one token per sequence).
Measured tables need not obey the roofline's shape, so with them there is no bound (None); nor
with `miss: cpu | auto`, where an expert may be computed on the host instead.
"""
from __future__ import annotations

from ..config import Scenario
from ..hardware.costs import CostModel


def step_lower_bound_s(sc: Scenario, b: int) -> float | None:
    """Least time a step of `b` sequences can take on the compute stream (None: no bound)."""
    cost = CostModel(sc.model, sc.hardware)
    if any(cost.uses_measured.values()) or sc.miss != "wait":  # a CPU-run expert skips the GPU's compute
        return None
    m = sc.model
    layer = cost.attention_s(b, b, b) + m.top_k * cost.expert_compute_s(b) + cost.shared_compute_s(b)
    return m.num_layers * layer


def tokens_per_s_upper_bound(sc: Scenario) -> float | None:
    """Most output tokens per second the scenario could reach (None: no bound)."""
    b = sc.batch.batch_limit
    lb = step_lower_bound_s(sc, b)
    return b / lb if lb else None


def tpot_ms_lower_bound(sc: Scenario) -> float | None:
    """Least time per output token any request can see (None: no bound)."""
    lb = step_lower_bound_s(sc, 1)
    return lb * 1e3 if lb is not None else None
