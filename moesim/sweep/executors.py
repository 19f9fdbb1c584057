"""Executors run sweep points and report each as it finishes. Registered by name (`--executor`).

- `local` (default): N workers over the cores of this machine (`--workers N`, default all): this
  process runs points itself while a pool of N-1 processes (reused across points, started from
  a forkserver that has moesim imported already) runs the others, so a sweep starts computing at
  once. The pool starts from a thread while this process runs points (so its start-up is off the
  critical path) and gets one point per worker once its workers are up; each is replaced as it
  finishes, from the pool's result thread (feed.py), so no worker waits for this process and none
  holds a queued point that this process, out of work, could have run (no idle tail). While the
  points this process has run show the rest would take under MIN_POOL_WORK_S one after another
  (at their mean time), it gets no more. With one worker the points run in this process, one after another. Workers exit
  when the sweep's main process dies, even by kill -9 (lifeline.py). With N > 1 workers each
  process that runs points (this one too, while the sweep runs) caps its inner thread pools (BLAS,
  OpenMP, Arrow, torch) at cores // N threads, so workers × threads ≤ cores; `OMP_NUM_THREADS`,
  when set, is that cap instead (moesim/threads.py).
- `ray`: Ray remote tasks (`ray.init(address=...)`: none starts a local Ray, `auto` joins the
  running cluster, `ray://host:port` a remote one). Ray is imported only when this executor is
  used. A task returns its result files to the driver, which writes them, so workers need no
  shared file system — but they need moesim installed and the trace file at the same path.

An executor calls `on_done(status)` in the driver for every point, in completion order, after the
point's directory is committed. A point whose worker dies is recorded as failed, never dropped.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, ClassVar

from ..errors import InputError
from ..threads import ENV as THREADS_ENV
from ..threads import inner_threads, limit, limited
from .feed import Feed
from .lifeline import watch_driver
from .worker import PointTask, commit_bundle, record_failure, run_point

EXECUTORS: dict[str, type["Executor"]] = {}

OnDone = Callable[[dict], None]


def register_executor(cls: type["Executor"]) -> type["Executor"]:
    EXECUTORS[cls.name] = cls
    return cls


def executor_names() -> list[str]:
    return list(EXECUTORS)


def get_executor(name: str, workers: int | None = None, address: str | None = None) -> "Executor":
    try:
        cls = EXECUTORS[name]
    except KeyError:
        raise InputError(f"unknown executor {name!r} (known: {', '.join(EXECUTORS)})", field="--executor") from None
    if workers is not None and workers < 1:
        raise InputError(f"must be ≥ 1 (got {workers})", field="--workers")
    return cls(workers=workers, address=address)


class Executor:
    """Runs point tasks; subclasses register under `name`."""

    name: ClassVar[str] = ""

    def __init__(self, workers: int | None = None, address: str | None = None):
        self.workers = workers
        self.address = address

    def describe(self, n_tasks: int) -> str:
        return self.name

    def run(self, tasks: list[PointTask], points_dir: Path, on_done: OnDone) -> None:
        raise NotImplementedError


def _start_method() -> str:
    # forkserver: no fork of a process that already runs pyarrow/numpy threads; spawn elsewhere
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


@register_executor
class LocalExecutor(Executor):
    """A pool of worker processes on this machine."""

    name = "local"

    def __init__(self, workers: int | None = None, address: str | None = None):
        if address is not None:
            raise InputError("--address applies to --executor ray only", field="--address")
        super().__init__(workers, None)
        inner_threads(1)  # a bad OMP_NUM_THREADS is an input error now, not once points run

    def pool_size(self, n_tasks: int) -> int:
        return max(1, min(self.workers or os.cpu_count() or 1, n_tasks))

    def describe(self, n_tasks: int) -> str:
        n = self.pool_size(n_tasks)
        if n == 1:
            return "local, 1 worker (in-process)"
        t = inner_threads(n)
        return f"local, {n} workers × {t} inner thread{'s' if t != 1 else ''} ({THREADS_ENV} to change)"

    def run(self, tasks: list[PointTask], points_dir: Path, on_done: OnDone) -> None:
        if not tasks:
            return
        n = min(self.pool_size(len(tasks)), len(tasks))
        if n == 1:
            for t in tasks:
                on_done(run_point(t, str(points_dir)))
            return
        threads = inner_threads(n)
        # The points this process runs share the cores too; a forkserver started now inherits the
        # limit's environment, so its BLAS starts no more threads than its workers may use.
        with limited(threads):
            pool = self._pool(n - 1, threads)
            feed = Feed(pool, list(tasks), str(points_dir))
            warm = _PoolStart(pool, n - 1, feed.start)
            try:
                self._drive(feed, points_dir, on_done)
            except BaseException:
                # Ctrl-C: cancel what has not started (explicitly: a collected pool would go on through
                # its queue). Points already running die with the signal or finish, and either way leave
                # a complete directory or none; wait for them unless interrupted again.
                try:
                    pool.shutdown(wait=True, cancel_futures=True)
                except KeyboardInterrupt:
                    pool.shutdown(wait=False, cancel_futures=True)
                raise
            if warm.close_later():
                pool.shutdown(wait=True)

    @staticmethod
    def _pool(size: int, threads: int) -> ProcessPoolExecutor:
        ctx = mp.get_context(_start_method())
        if ctx.get_start_method() == "forkserver":  # workers fork from a server with moesim imported
            ctx.set_forkserver_preload(_PRELOAD)
        return ProcessPoolExecutor(max_workers=size, mp_context=ctx, initializer=_init_worker,
                                   initargs=(os.getpid(), threads))

    @staticmethod
    def _drive(feed: Feed, points_dir: Path, on_done: OnDone) -> None:
        """This process runs points while the pool starts; once its workers are up the pool gets one
        point per worker, each replaced as it finishes (feed.py) while the rest would take
        MIN_POOL_WORK_S or more one after another at the mean time of the points this process has
        run so far (re-estimated after each: points may differ tenfold in cost). No point waits
        behind the pool's start-up."""
        ran, ran_s = 0, 0.0
        try:
            while True:
                for t, f in feed.finished():
                    on_done(_pool_outcome(points_dir, t, f))
                mine = feed.take()
                if mine is not None:  # this process computes too
                    t0 = time.perf_counter()
                    on_done(run_point(mine, str(points_dir)))
                    ran, ran_s = ran + 1, ran_s + time.perf_counter() - t0
                    feed.keep_feeding(ran_s / ran * feed.left() >= MIN_POOL_WORK_S)
                elif not feed.wait():
                    return
        except BaseException:
            feed.stop()
            raise


def _pool_outcome(points_dir: Path, task: PointTask, f) -> dict:
    """A pool point's status, or its failure recorded when the worker died (the pool is gone)."""
    try:
        return f.result()
    except Exception as e:  # BrokenProcessPool: a worker died
        return record_failure(points_dir, task, f"worker process failed ({type(e).__name__}: {e}); "
                              "killed or out of memory? (a script that starts a sweep needs "
                              "`if __name__ == '__main__':`) — rerun to retry")


def _init_worker(driver: int, threads: int) -> None:
    """A pool worker: exit with the driver; cap its inner thread pools for its lifetime."""
    watch_driver(driver)
    limit(threads)


class _PoolStart:
    """Starts the pool's workers from a thread: a pool's first submit blocks until the forkserver
    has imported moesim (about 0.6 s of CPU, seconds on a loaded machine), and this process runs
    points meanwhile. Once every worker has answered, `on_ready(workers)` (the feed gives each a
    point); a pool that fails to start is never used (this process runs every point)."""

    def __init__(self, pool: ProcessPoolExecutor, workers: int, on_ready: Callable[[int], None]):
        self.pool, self.on_ready = pool, on_ready
        self._lock = threading.Lock()
        self._over = self._closing = False
        threading.Thread(target=self._start, args=(workers,), name="moesim-pool-start", daemon=True).start()

    def _start(self, workers: int) -> None:
        ok = False
        try:
            for f in [self.pool.submit(os.getpid) for _ in range(workers)]:  # one process spawned per submit
                f.result()
            ok = True
        except BaseException:  # noqa: BLE001 (a broken or shut-down pool: the sweep runs without it)
            pass
        with self._lock:
            self._over, closing = True, self._closing
        if closing:
            self.pool.shutdown(wait=True, cancel_futures=True)
        elif ok:
            self.on_ready(workers)

    def close_later(self) -> bool:
        """True: the start is over and the caller shuts the pool down. False: it is still starting
        (the sweep needed none of it) and this thread shuts it down once it is up, so the sweep
        does not wait for it."""
        with self._lock:
            if self._over:
                return True
            self._closing = True
            return False


_PRELOAD = ["moesim.sweep.worker", "moesim.engine.run", "moesim.results"]
# The pool is fed beyond its first points when those left would take this long one after another:
# starting it costs about 0.6 s per worker on 2 shared cores (issue #16's measurement), several
# times over on a loaded machine.
MIN_POOL_WORK_S = 5.0


def _import_ray():
    try:
        import ray  # noqa: PLC0415
    except ImportError:
        raise InputError("the ray executor needs Ray, which is not installed: pip install moesim[ray]",
                         field="--executor") from None
    return ray


def _ray_point(task: PointTask) -> dict:
    return run_point(task, None)


@register_executor
class RayExecutor(Executor):
    """Ray remote tasks, at most `workers` in flight (default: all at once; Ray schedules them)."""

    name = "ray"

    def describe(self, n_tasks: int) -> str:
        where = self.address or "a local Ray"
        return f"ray at {where}" + (f", ≤ {self.workers} in flight" if self.workers else "")

    def run(self, tasks: list[PointTask], points_dir: Path, on_done: OnDone) -> None:
        ray = _import_ray()
        if not tasks:
            return
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=self.address, ignore_reinit_error=True, log_to_driver=False)
        remote = ray.remote(num_cpus=1, max_retries=0)(_ray_point)
        queue = list(tasks)
        pending: dict = {}
        limit = self.workers or len(tasks)
        try:
            while queue or pending:
                while queue and len(pending) < limit:
                    t = queue.pop(0)
                    pending[remote.remote(t)] = t
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    t = pending.pop(ref)
                    try:
                        st = commit_bundle(points_dir, ray.get(ref))
                    except Exception as e:  # the task or its worker failed outside run_point
                        st = record_failure(points_dir, t, f"ray task failed: {type(e).__name__}: {e}")
                    on_done(st)
        except BaseException:
            for ref in pending:
                try:
                    ray.cancel(ref, force=True)
                except Exception:
                    pass
            raise
        finally:
            if started_here:
                ray.shutdown()
