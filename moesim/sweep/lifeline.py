"""Worker processes of a sweep exit when the sweep's main process dies (kill -9 included).

A pool worker otherwise waits on its task queue for ever: it holds that queue's write end itself,
so it never sees end-of-file. `watch_driver` (the pool's initializer) starts a daemon thread that
waits for the driver process to exit — on a pidfd where Linux has one, else by polling — and then
ends the worker with os._exit. The forkserver and resource tracker exit by themselves once the
driver and the workers are gone."""
from __future__ import annotations

import os
import select
import threading
import time

POLL_S = 0.5   # the fallback's polling interval


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _wait_for_exit(pid: int) -> None:
    """Return once process `pid` has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3): poll
        while _alive(pid) and os.getppid() != 1:
            time.sleep(POLL_S)
        return
    try:
        select.select([fd], [], [])   # readable when the process exits
    finally:
        os.close(fd)


def _watch(pid: int) -> None:
    _wait_for_exit(pid)
    os._exit(1)


def watch_driver(pid: int) -> None:
    """Pool initializer: end this process when process `pid` (the sweep's driver) exits."""
    threading.Thread(target=_watch, args=(pid,), name="moesim-lifeline", daemon=True).start()
