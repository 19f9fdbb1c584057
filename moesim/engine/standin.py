"""Low-bit stand-ins for missing experts (issue 17, as in HOBBIT, arXiv 2411.01433): a missing
expert whose gate score is low is served by a lower-precision copy, fewer bytes over the link.

A key's score in a step is the largest gate weight any of its tokens gave it (one token that leans
on the expert keeps it at full precision). The stand-in is a demand copy of `bits`/16 of a bf16
expert's bytes (the model's expert bytes scaled by bits over its expert bits), computed at the
GPU's usual expert time and not cached: the full-precision expert is what the tier holds. moesim
measures no model quality: what a stand-in costs in accuracy is outside what it reports.
"""
from __future__ import annotations

import numpy as np

from .channels import DEMAND, Transfer
from .cpu_exec import CpuJob


def key_scores(routing: np.ndarray, scores: np.ndarray, layer: int, num_experts: int) -> np.ndarray:
    """[num_experts] the largest gate weight each expert of `layer` got from a token this step
    (scores of width top_k are the chosen experts' weights; of width num_experts, all logits,
    turned into softmax probabilities first)."""
    s = scores[:, layer, :].astype(np.float64)
    if s.shape[1] == num_experts and s.shape[1] != routing.shape[2]:
        z = np.exp(s - s.max(axis=1, keepdims=True))
        s = np.take_along_axis(z / z.sum(axis=1, keepdims=True), routing[:, layer, :].astype(np.int64), axis=1)
    out = np.zeros(num_experts)
    np.maximum.at(out, routing[:, layer, :].astype(np.int64).ravel(), s.ravel())
    return out


class StandIns:
    """Serves low-score misses with a low-bit copy over the PCIe channel; counts what it served."""

    def __init__(self, sim, bits: float, threshold: float):
        self.sim, self.threshold = sim, threshold
        m = sim.model
        self.nbytes = int(-(-m.expert_params * bits / 8 // 1))
        self.experts = self.tokens = 0
        self._scores: np.ndarray | None = None

    def layer(self, plan, layer: int) -> None:
        """Take the gate scores of `layer` in `plan` (none: every miss loads at full precision)."""
        sc = getattr(plan, "scores", None)
        self._scores = None if sc is None else key_scores(plan.routing, sc, layer, self.sim.E)

    def serves(self, key: int) -> bool:
        return self._scores is not None and self._scores[key % self.sim.E] < self.threshold

    def submit(self, key: int, tokens: int) -> CpuJob:
        job = CpuJob(key, tokens)
        self.experts += 1
        self.tokens += tokens
        self.sim.pcie.submit(Transfer(key, self.nbytes, DEMAND, lambda _t, j=job: self._landed(j)))
        return job

    def _landed(self, job: CpuJob) -> None:
        job.done_t = self.sim.env.now
        for w in job.waiters:
            w()

    def summary(self) -> dict:
        return {"standin_experts": self.experts, "standin_tokens": self.tokens, "standin_bytes": self.nbytes,
                "threshold": self.threshold,
                "note": "moesim measures no model quality: the accuracy a stand-in costs is not modelled"}
