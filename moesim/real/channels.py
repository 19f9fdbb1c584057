"""A link of the real executor: worker threads serving the simulator's two-level priority queue."""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from ..engine.channels import Queues

if TYPE_CHECKING:
    from .executor import RealExecutor


class RealChannel(Queues):
    """A link served by `slots` worker threads with the simulator's two-level priority queue."""

    def __init__(self, ex: RealExecutor, name: str, slots: int, work, on_drop):
        super().__init__(name, slots, on_drop, ex.events_log)
        self.ex, self.work = ex, work
        self.cond = threading.Condition(ex.lock)
        self.closed = False
        self.threads = [threading.Thread(target=self._worker, name=f"moesim-{name}-{i}", daemon=True)
                        for i in range(slots)]
        for t in self.threads:
            t.start()

    # called with the lock held ----------------------------------------------------------------
    def _now(self) -> float:
        return self.ex.now()

    def _wake(self) -> None:
        self.cond.notify()

    # the worker thread --------------------------------------------------------------------------
    def _worker(self) -> None:
        ex = self.ex
        while True:
            with ex.lock:
                while True:
                    if self.closed:
                        return
                    t = self._next()
                    if t is not None:
                        break
                    self.cond.wait()
                self.busy += 1
                t.start = ex.now()
            try:
                self.work(t)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                with ex.lock:
                    ex.error = e
                    ex.cond.notify_all()
                return
            with ex.lock:
                t.end = ex.now()
                self._finished(t)

    def close(self) -> None:
        with self.ex.lock:
            self.closed = True
            self.cond.notify_all()
        for t in self.threads:
            t.join(timeout=30)
