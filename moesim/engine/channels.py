"""SimPy channels: a PCIe link or a disk with a fixed number of parallel slots.

Each transfer holds one slot (copy engine / queue-depth entry) for `latency + bytes/bandwidth`.
Demand transfers are served before prefetches (non-preemptive priority); a queued prefetch can be
promoted to demand priority, or dropped when it is stale. One SimPy event per transfer. The
callbacks take the transfer itself, so an owner passes bound methods made once, not a closure per
copy (the engine's Load is its own Transfer, see engine/loads.py).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable

import simpy

DEMAND, PREFETCH = 0, 1


class Transfer:
    """One copy of one expert over one channel. `on_done(transfer)` runs at completion."""

    __slots__ = (
        "dropped",
        "end",
        "key",
        "load",
        "nbytes",
        "on_done",
        "on_start",
        "priority",
        "queued_at",
        "stale",
        "start",
    )

    def __init__(self, key: int, nbytes: int, priority: int, on_done: Callable[[Transfer], None],
                 stale: Callable[[Transfer], bool] | None = None, on_start: Callable[[Transfer], bool] | None = None,
                 load=None):
        """`stale(transfer)` true: a queued prefetch is dropped; `on_start(transfer)` false: dropped at start.
        `load`: the engine's load the copy belongs to (what the real replay's workers copy)."""
        self.key, self.nbytes, self.priority, self.on_done = key, nbytes, priority, on_done
        self.stale, self.on_start, self.load = stale, on_start, load
        self.queued_at = self.start = self.end = -1.0
        self.dropped = False


class Queues:
    """A channel's two-level queue and counters, shared with moesim.real's threaded channel.

    Subclasses give `_now()` (the clock) and `_wake()` (start queued transfers if a slot is free)."""

    def __init__(self, name: str, slots: int, on_drop: Callable[[Transfer], None] | None, log: list | None):
        self.name, self.slots = name, slots
        self.on_drop = on_drop
        self.log = log  # optional list of (resource, key, priority, start, end) for events.parquet
        self.queues = (deque(), deque())
        self.busy = 0
        self.busy_time = 0.0
        self.transfers = 0
        self.bytes = 0

    def submit(self, t: Transfer) -> None:
        t.queued_at = self._now()
        self.queues[t.priority].append(t)
        self._wake()

    def promote(self, t: Transfer) -> None:
        """Move a queued prefetch to demand priority (a demand access now waits on it)."""
        if t.start < 0 and t.priority == PREFETCH:
            try:
                self.queues[PREFETCH].remove(t)
            except ValueError:
                return
            t.priority = DEMAND
            self.queues[DEMAND].append(t)
            self._wake()

    prune: Callable[[deque], None] | None = None
    """Optional `prune(queue)`: drops the stale front of the prefetch queue in one call, as the loop
    of _next would one by one (its owner undoes their bookkeeping, as `on_drop` would)."""

    def _next(self) -> Transfer | None:
        for q in self.queues:
            if q and self.prune is not None and q is self.queues[PREFETCH]:
                self.prune(q)
            while q:
                t = q.popleft()
                if (t.priority == PREFETCH and t.stale is not None and t.stale(t)) or \
                        (t.on_start is not None and not t.on_start(t)):
                    t.dropped = True
                    if self.on_drop is not None:
                        self.on_drop(t)
                    continue
                return t
        return None

    def _finished(self, t: Transfer) -> None:
        """Free the slot of a copy that has ended at `t.end`, count it and run its `on_done`."""
        self.busy -= 1
        self.busy_time += t.end - t.start
        self.transfers += 1
        self.bytes += t.nbytes
        if self.log is not None:
            self.log.append((self.name, t.key, t.priority, t.start, t.end))
        t.on_done(t)

    def queued(self) -> int:
        return len(self.queues[0]) + len(self.queues[1])


class Channel(Queues):
    """A link with `slots` parallel transfers and a two-level priority queue."""

    def __init__(self, env: simpy.Environment, name: str, slots: int, duration_s: Callable[[int], float],
                 on_drop: Callable[[Transfer], None] | None = None, log: list | None = None,
                 idle_extra_s: Callable[[float], float] | None = None):
        """`idle_extra_s(idle)`: the extra seconds of a transfer that starts with the channel idle
        (nothing in flight) for `idle` seconds, idle since the last transfer ended or the run began."""
        super().__init__(name, slots, on_drop, log)
        self.env = env
        self.duration_s = duration_s
        self.idle_extra_s = idle_extra_s
        self.idle_since = 0.0

    def _now(self) -> float:
        return self.env.now

    def _dispatch(self) -> None:
        while self.busy < self.slots:
            t = self._next()
            if t is None:
                return
            now = self.env.now
            d = self.duration_s(t.nbytes)
            if self.idle_extra_s is not None and self.busy == 0:
                d += self.idle_extra_s(now - self.idle_since)
            self.busy += 1
            t.start, t.end = now, now + d
            ev = self.env.timeout(d, t)
            ev.callbacks.append(self._finish)

    _wake = _dispatch

    def _finish(self, ev) -> None:
        if self.busy == 1:  # the channel goes idle now (a copy its on_done submits starts after 0 idle)
            self.idle_since = self.env.now
        self._finished(ev.value)
        self._dispatch()
