"""The local executor's queue of points not yet run, shared by the sweep process and its pool.

The pool holds one point per worker and no more: when a pool point finishes, the pool's own result
thread submits the next one (a done callback). So a worker never waits for the sweep process,
which is busy computing its own points, to hand it work; and no worker holds a queued point the
sweep process, out of work, could have run instead (a point queued to a ProcessPoolExecutor is
past cancelling once it is in the call queue, and then the sweep's tail was one process running
two points while the other sat idle). Finished pool points wait in `finished()` for the sweep
process, which reports them (on_done runs in that process only).
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ProcessPoolExecutor

from .worker import PointTask, run_point


class Feed:
    """Points left to run; the pool is fed from here, and the sweep process takes from here."""

    def __init__(self, pool: ProcessPoolExecutor, tasks: list[PointTask], points_dir: str):
        self.pool, self.points_dir = pool, points_dir
        self._queue = tasks[::-1]  # pop() takes the next point in order
        self._changed = threading.Condition(threading.RLock())  # re-entered: a callback may run in submit
        self._running: dict[Future, PointTask] = {}
        self._done: list[tuple[PointTask, Future]] = []
        self._workers = 0
        self._refill = True   # False: a point that finishes in the pool is not replaced
        self._stopped = False

    def start(self, workers: int) -> None:
        """The pool's workers are up: give each a point (called from the thread that started them)."""
        with self._changed:
            if self._workers == 0 and not self._stopped:
                self._workers = workers
                self._top_up()

    def keep_feeding(self, refill: bool) -> None:
        """Whether a pool point that finishes is replaced (re-decided as points are timed)."""
        with self._changed:
            self._refill = refill
            if refill:
                self._top_up()

    def take(self) -> PointTask | None:
        """The next point, for the sweep process to run; None when every point is handed out."""
        with self._changed:
            return self._queue.pop() if self._queue else None

    def left(self) -> int:
        with self._changed:
            return len(self._queue)

    def finished(self) -> list[tuple[PointTask, Future]]:
        """The pool points finished since the last call, in point order."""
        with self._changed:
            out, self._done = self._done, []
        return sorted(out, key=lambda tf: tf[0].index)

    def wait(self) -> bool:
        """Block until a pool point finishes or a point is left to take; False when neither can
        happen any more (nothing queued, running or finished)."""
        with self._changed:
            while not self._done and not self._queue and self._running:
                self._changed.wait()
            return bool(self._done or self._queue or self._running)

    def stop(self) -> None:
        """Ctrl-C: feed nothing more and cancel what has not started."""
        with self._changed:
            self._stopped, self._refill = True, False
            running = list(self._running)
        for f in running:
            f.cancel()

    def _top_up(self) -> None:  # with the lock held
        while self._queue and len(self._running) < self._workers and not self._stopped:
            t = self._queue.pop()
            try:
                f = self.pool.submit(run_point, t, self.points_dir)
            except Exception:  # noqa: BLE001 (a broken or shut-down pool: the sweep process runs the rest)
                self._queue.append(t)
                self._stopped = True
                return
            self._running[f] = t
            f.add_done_callback(self._on_done)

    def _on_done(self, f: Future) -> None:
        """In the pool's result thread: hand the result over and give the worker its next point."""
        with self._changed:
            t = self._running.pop(f, None)
            if t is None:
                return
            self._done.append((t, f))
            if self._refill:
                self._top_up()
            self._changed.notify_all()
