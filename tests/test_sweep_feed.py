"""The local executor's feed (moesim/sweep/feed.py): a pool worker holds one point at a time and
gets the next from the pool's result thread as one finishes, never a queued point the sweep
process could have run. A thread pool stands in for the process pool; events, not timing."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

import moesim.sweep.feed as feed_mod
from moesim.sweep.feed import Feed


@pytest.fixture
def pool_points(monkeypatch):
    """The points the pool starts, in order, each held until released."""
    started, release = [], {i: threading.Event() for i in range(6)}
    cond = threading.Condition()

    def fake_run_point(task, points_dir):
        with cond:
            started.append(task.index)
            cond.notify_all()
        assert release[task.index].wait(30)
        return {"point_id": str(task.index), "status": "done"}

    def wait_started(n):
        with cond:
            assert cond.wait_for(lambda: len(started) >= n, 30), started

    monkeypatch.setattr(feed_mod, "run_point", fake_run_point)
    return started, release, wait_started


def tasks(n):
    return [SimpleNamespace(index=i) for i in range(n)]


def test_a_worker_gets_its_next_point_when_one_finishes_and_holds_no_queued_one(pool_points):
    started, release, wait_started = pool_points
    with ThreadPoolExecutor(1) as pool:
        feed = Feed(pool, tasks(5), "unused")
        feed.start(1)
        wait_started(1)
        assert started == [0] and feed.left() == 4  # one point handed to the one worker, no more
        assert feed.take().index == 1               # the sweep process runs the next itself
        release[0].set()                             # the pool's point finishes: its thread submits the next
        wait_started(2)
        assert started == [0, 2] and feed.left() == 2
        assert [(t.index, f.result()["status"]) for t, f in feed.finished()] == [(0, "done")]
        feed.keep_feeding(False)                     # the rest is small: no more for the pool
        release[2].set()
        assert [feed.take().index, feed.take().index, feed.take()] == [3, 4, None]
        assert feed.wait() and [t.index for t, _ in feed.finished()] == [2]
        assert not feed.wait() and started == [0, 2]


def test_the_sweep_process_never_waits_on_a_point_the_pool_has_not_started(pool_points):
    """Out of points of its own, the sweep process waits only for points that are running."""
    started, release, wait_started = pool_points
    with ThreadPoolExecutor(1) as pool:
        feed = Feed(pool, tasks(3), "unused")
        feed.start(1)
        wait_started(1)
        assert feed.take().index == 1 and feed.take().index == 2 and feed.take() is None
        release[0].set()
        assert feed.wait() and [t.index for t, _ in feed.finished()] == [0]
        assert not feed.wait() and started == [0]


def test_a_broken_pool_hands_its_points_back(pool_points):
    pool = ThreadPoolExecutor(1)
    pool.shutdown()
    feed = Feed(pool, tasks(2), "unused")
    feed.start(1)  # submit fails: the point goes back to the queue and the pool gets no more
    assert [feed.take().index, feed.take().index, feed.take()] == [0, 1, None]
    assert not feed.wait()
