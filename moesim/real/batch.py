"""The running static batch of a real run: its KV caches, each sequence's position, and which
token rows each needed expert computes."""
from __future__ import annotations

import numpy as np

from .kernels import KVCache, StepGeometry
from .torchutil import require_torch


class StaticBatch:
    """KV caches (one per attention block) and lengths of the sequences of the current static batch;
    a prefill step starts a new batch."""

    def __init__(self, shapes, dtype, device: str, blocks: int):
        self.shapes, self.dtype, self.device, self.blocks = shapes, dtype, device, blocks
        self.caches: list[KVCache] | None = None
        self.slot_of: dict[int, int] = {}
        self.lengths = np.zeros(0, dtype=np.int64)

    def geometry(self, plan, max_len: dict[int, int]) -> StepGeometry:
        """StepGeometry of a step (`max_len`: request id -> prompt + decode tokens)."""
        if plan.phase == "prefill":
            ids = [int(r) for r in plan.request_ids.tolist()]
            self.slot_of = {r: i for i, r in enumerate(ids)}
            longest = max(max_len[r] for r in ids) + 1
            self.caches = None
            self.caches = [KVCache(len(ids), longest, self.shapes, self.dtype, self.device)
                           for _ in range(self.blocks)]
            rows = plan.token_requests
            slot = np.array([self.slot_of[int(r)] for r in rows.tolist()], dtype=np.int64)
            starts = np.r_[0, np.flatnonzero(np.diff(rows)) + 1]
            pos = np.arange(len(rows)) - np.repeat(starts, np.diff(np.r_[starts, len(rows)]))
            self.lengths = np.zeros(len(ids), dtype=np.int64)
            np.maximum.at(self.lengths, slot, pos + 1)
            return StepGeometry(slot, pos, self.lengths[np.unique(slot)], self.device, True)
        slot = np.array([self.slot_of[int(r)] for r in plan.request_ids.tolist()], dtype=np.int64)
        pos = self.lengths[slot].copy()
        self.lengths[slot] += 1
        return StepGeometry(slot, pos, self.lengths[np.unique(slot)], self.device, False)


def token_groups(plan, layer: int, keys: np.ndarray, num_experts: int, top_k: int, dedup: bool, device: str):
    """Per needed key of `layer`: a tensor of the token rows routed to it (one row per key
    without dedup)."""
    torch = require_torch()
    flat = plan.routing[:, layer, :].reshape(-1).astype(np.int64) + layer * num_experts
    if not dedup:
        rows = np.arange(flat.size) // top_k
        return [torch.tensor([r], device=device) for r in rows.tolist()]
    order = np.argsort(flat, kind="stable")
    srt = flat[order]
    lo = np.searchsorted(srt, keys, "left")
    hi = np.searchsorted(srt, keys, "right")
    rows = order // top_k
    return [torch.as_tensor(rows[a:b], device=device) for a, b in zip(lo.tolist(), hi.tolist())]
