"""libCacheSim as the reference cache simulator (an optional, test-time dependency).

Count-based: every request has size 1 and the cache size is its capacity in objects. The trace is
written as an ORACLE_GENERAL_TRACE (uint32 time, uint64 id, uint32 size, int64 next access), since
libCacheSim's Belady needs next-access times (see shared/REFERENCES.md).
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from .replay import next_use_positions

LCS_NAME = {"lru": "LRU", "fifo": "FIFO", "lfu": "LFU", "belady": "Belady", "clock": "Clock", "sieve": "Sieve",
            "s3fifo": "S3FIFO", "twoq": "TwoQ", "slru": "SLRU", "arc": "ARC"}
# Smallest capacity at which libCacheSim's integer queue sizes leave the policy its design
# (below it S3FIFO's small queue, TwoQ's A1in round to nothing and they cache nothing) and the
# capacities at which moesim sizes queues as it does (SLRU: 4 equal segments).
LCS_MIN_CAPACITY = {"s3fifo": 20, "twoq": 4}
LCS_CAPACITY_MULTIPLE = {"slru": 4}


def lcs_comparable(policy: str, capacity: int) -> bool:
    """True if moesim's policy is meant to equal libCacheSim's exactly at this capacity."""
    return capacity >= LCS_MIN_CAPACITY.get(policy, 1) and capacity % LCS_CAPACITY_MULTIPLE.get(policy, 1) == 0
ORACLE = np.dtype([("t", "<u4"), ("id", "<u8"), ("size", "<u4"), ("next", "<i8")])


def write_oracle_trace(path, stream) -> None:
    s = np.asarray(stream, dtype=np.int64)
    rec = np.zeros(len(s), dtype=ORACLE)
    rec["t"] = np.arange(len(s))
    rec["id"] = s
    rec["size"] = 1
    rec["next"] = next_use_positions(s)
    rec.tofile(path)


def libcachesim_misses(stream, capacity: int, policies=("lru", "fifo", "lfu", "belady"), path=None) -> dict[str, int]:
    """Miss counts of libCacheSim's C loop (`process_trace`) per policy. ImportError without it."""
    import libcachesim as lcs

    own = path is None
    if own:
        fd, path = tempfile.mkstemp(suffix=".oracle")
        os.close(fd)
    try:
        write_oracle_trace(path, stream)
        out = {}
        for pol in policies:
            reader = lcs.TraceReader(str(path), lcs.TraceType.ORACLE_GENERAL_TRACE,
                                     lcs.ReaderInitParam(ignore_obj_size=True))
            cache = getattr(lcs, LCS_NAME.get(pol) or LCS_NEAR[pol])(capacity, hashpower=12)
            miss_ratio, _ = cache.process_trace(reader)
            out[pol] = round(miss_ratio * len(stream))
        return out
    finally:
        if own:
            os.unlink(path)


# libCacheSim has these too, but exact agreement is impossible (see moesim.cache.adaptive): they
# are compared for near-agreement only.
LCS_NEAR = {"lirs": "LIRS", "wtinylfu": "WTinyLFU", "lecar": "LeCaR"}
