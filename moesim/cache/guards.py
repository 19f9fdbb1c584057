"""Warnings for cache sizes that are legal but will thrash (said before a run, never an error)."""
from __future__ import annotations

__all__ = ["thrash_warnings"]


def thrash_warnings(tier: str, capacity, partition: str, top_k: int, num_layers: int) -> list[str]:
    """A shared cache smaller than one token's ``top_k x layers`` accesses, or a per-layer one
    smaller than ``top_k``: LRU-like policies evict every expert before a single stream reuses
    it. Says by how much."""
    if capacity is None:
        return []
    caps = list(capacity) if not isinstance(capacity, int) else [capacity]
    if partition == "global":
        need = top_k * num_layers
        c = caps[0]
        if c < need:
            return [f"cache.{tier}: a shared cache of {c} experts is smaller than one token's {need} expert "
                    f"accesses (top_k {top_k} x {num_layers} layers), {need - c} short ({c / need:.0%} of "
                    f"them): a recency policy evicts each expert before its next use and will miss on "
                    f"nearly every access; give it >= {need} or use partition: per_layer"]
        return []
    short = [i for i, c in enumerate(caps if len(caps) > 1 else caps * num_layers) if c < top_k]
    if short:
        return [f"cache.{tier}: {len(short)} layer(s) hold fewer than top_k={top_k} experts "
                f"(layers {short[:8]}{'...' if len(short) > 8 else ''}): every token of them misses"]
    return []
