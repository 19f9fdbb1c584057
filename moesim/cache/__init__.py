"""The expert cache: eviction policies, pure replay, per-layer allocation, the LRU -> Belady gap
report, and the tiers the engine drives.

No SimPy here: the engine asks the cache and acts.
"""
from .policies import FIFO, LFU, LRU, POLICIES, Belady, Policy, get_policy
from .replay import NextUse, ReplayResult, miss_flags, next_use_positions, replay, replay_incremental, replay_steps
from .tiers import PARTITIONS, Tier

__all__ = ["Policy", "LRU", "LFU", "FIFO", "Belady", "POLICIES", "get_policy",
           "replay", "replay_incremental", "replay_steps", "miss_flags", "ReplayResult", "next_use_positions",
           "NextUse",
           "Tier", "PARTITIONS"]
