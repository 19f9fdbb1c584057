"""The KV cache in the GPU budget (issue 17, `cache.kv_cache: true`).

GPU memory holds the resident weights, the step's activations, the batch's KV cache and the expert
tier; the tier gets what the other three leave, so it shrinks as sequences grow and grows back as
they finish. Evictions that a shrink forces are counted apart from the policy's own. Admission
reserves `max_context` KV positions per sequence: the batch is limited to the sequences whose
worst-case KV cache still leaves room for one layer's top-k experts.

KV bytes = tokens x blocks x (2 x kv_heads x head_dim, or an MLA model's compressed width) x 2 (bf16).
Activations of a step = tokens x (2 + top_k) x hidden x 2 bytes (the residual, the block input
and the top-k expert outputs, bf16) + tokens x 2 x expert_intermediate x 2 bytes (one expert's
gate/up product at a time).
"""
from __future__ import annotations

from ..errors import InputError
from ..models import ModelSpec


def activation_bytes(model: ModelSpec, tokens: int) -> int:
    """Live activations of one MoE block over `tokens` tokens (see the module docstring)."""
    return tokens * 2 * ((2 + model.top_k) * model.hidden_size + 2 * model.expert_intermediate_size)


class KvBudget:
    """How many experts the GPU tier may hold for a step, and the evictions that forces."""

    def __init__(self, model: ModelSpec, gpu_memory_gb: float, configured: int):
        self.model, self.configured = model, configured
        self.eb, self.per_token = model.expert_bytes, model.kv_bytes_per_token
        self.free_bytes = gpu_memory_gb * 1e9 - model.resident_bytes
        self.kv_evictions = 0
        self.min_capacity = configured
        self.overcommitted_steps = 0
        self.peak_kv_bytes = 0

    def capacity(self, kv_tokens: int, step_tokens: int) -> int:
        """Experts the tier may hold with `kv_tokens` KV positions and a step of `step_tokens` tokens
        (the configured capacity at most; never below top_k: a step that would need that counts as
        overcommitted)."""
        left = self.free_bytes - kv_tokens * self.per_token - activation_bytes(self.model, step_tokens)
        return min(self.configured, max(0, int(left // self.eb)))

    def admit_limit(self, max_context: int, field: str = "cache.kv_cache", file: str | None = None) -> int:
        """Most sequences whose KV caches at `max_context` positions (and one decode token each)
        still leave one layer's top-k experts; an InputError with the numbers when not even one does."""
        m, need = self.model, self.model.top_k * self.eb
        per_seq = max_context * self.per_token + activation_bytes(m, 1)
        n = int((self.free_bytes - need) // per_seq) if self.free_bytes >= need else 0
        if n < 1:
            raise InputError(
                f"the KV cache leaves no room for one layer's top-k experts: GPU memory "
                f"{(self.free_bytes + m.resident_bytes) / 1e9:.3f} GB - resident weights {m.resident_bytes / 1e9:.3f} GB - one sequence's KV cache at "
                f"{max_context} positions {max_context * self.per_token / 1e9:.3f} GB ({self.per_token} B/token) "
                f"- activations {activation_bytes(m, 1) / 1e9:.6f} GB leaves "
                f"{(self.free_bytes - per_seq) / 1e9:.3f} GB, but top_k={m.top_k} experts need {need / 1e9:.3f} GB",
                field=field, file=file)
        return n

    def step(self, kv_tokens: int, step_tokens: int, tier) -> list[int]:
        """Resize the GPU tier for a step; returns the experts the KV growth evicted."""
        cap = self.capacity(kv_tokens, step_tokens)
        if cap < self.model.top_k:
            self.overcommitted_steps += 1
            cap = min(self.configured, self.model.top_k)
        self.peak_kv_bytes = max(self.peak_kv_bytes, kv_tokens * self.per_token)
        self.min_capacity = min(self.min_capacity, cap)
        evicted = tier.resize(cap)
        self.kv_evictions += len(evicted)
        return evicted

    def summary(self) -> dict:
        return {"kv_evictions": self.kv_evictions, "gpu_capacity_min": self.min_capacity,
                "gpu_capacity_configured": self.configured, "peak_kv_gb": self.peak_kv_bytes / 1e9,
                "kv_bytes_per_token": self.per_token, "overcommitted_steps": self.overcommitted_steps}
