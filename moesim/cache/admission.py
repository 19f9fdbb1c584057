"""The second-touch admission filter, on any policy (``<policy>+second_touch``).

An expert must be resident to run, so a miss is always loaded; the filter decides whether it is
*kept*. A key requested for the first time (not in a history of the last ``capacity`` first-time
keys) is held on probation, outside the wrapped policy, and is the first to go; a hit while on
probation, or a miss of a key the history remembers, admits it to the wrapped policy. One-off
experts thus stop pushing reused ones out.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Container, Hashable

from .policies import Policy

__all__ = ["SecondTouch"]


class SecondTouch(Policy):
    """Wraps ``inner``: probation FIFO for first touches, history of ``capacity`` first touches."""

    __slots__ = ("inner", "_prob", "_seen", "_hist_cap", "name")

    def __init__(self, inner: Policy, capacity: int | None = None) -> None:
        self.inner = inner
        self.name = inner.name + "+second_touch"
        self._prob: OrderedDict[int, None] = OrderedDict()   # resident, not admitted; oldest first
        self._seen: OrderedDict[int, None] = OrderedDict()   # requested once, not admitted
        self._hist_cap = max(1, capacity or 1)

    def miss(self, key: int) -> None:
        if key in self._seen:
            self.inner.miss(key)

    def insert(self, key: int, next_use: float | None = None) -> None:
        if key in self:
            raise ValueError(f"key {key} is already resident")
        if self._seen.pop(key, 0) is None:
            self.inner.insert(key, next_use)
            return
        self._seen[key] = None
        if len(self._seen) > self._hist_cap:
            self._seen.popitem(last=False)
        self._prob[key] = None

    def touch(self, key: int, next_use: float | None = None) -> None:
        if self._prob.pop(key, 0) is None:
            self._seen.pop(key, None)
            self.inner.insert(key, next_use)
        else:
            self.inner.touch(key, next_use)

    def remove(self, key: int) -> None:
        if self._prob.pop(key, 0) is not None:
            self.inner.remove(key)

    def evict(self, key: int) -> None:
        if self._prob.pop(key, 0) is not None:
            self.inner.evict(key)

    def victim(self, excluded: Container[Hashable] = ()) -> int | None:
        for k in self._prob:
            if k not in excluded:
                return k
        return self.inner.victim(excluded)

    def __len__(self) -> int:
        return len(self._prob) + len(self.inner)

    def __contains__(self, key: object) -> bool:
        return key in self._prob or key in self.inner

    def keys(self) -> list[int]:
        return list(self._prob) + self.inner.keys()
