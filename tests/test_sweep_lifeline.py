"""kill -9 of a running `moesim sweep` leaves no process behind: its pool workers (and with them the
forkserver and resource tracker) exit when the main process dies."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table in /proc")


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _descendants(root: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            pp = _ppid(int(d.name))
            if pp is not None:
                kids.setdefault(pp, []).append(int(d.name))
    out, todo = set(), [root]
    while todo:
        for c in kids.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait(cond, limit_s: float) -> bool:
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


def test_kill_9_of_a_sweep_leaves_no_worker_running(tmp_path):
    sweep = {"name": "lifeline", "base": {
        "model": "olmoe-1b-7b", "hardware": "rtx4090-pcie4", "cache": {"gpu": {"capacity_gb": 4}},
        "trace": {"synthetic": {"requests": 64, "prompt_len": 32, "decode_len": 64}}},
        "grid": {"batch.size": [1, 2, 3, 4, 5, 6]}}
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump(sweep))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "moesim.cli", "sweep", str(f), "-o", str(tmp_path / "out"),
                             "--workers", "2", "--no-progress"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    seen: set[int] = set()
    try:
        # the pool is up once two processes run the point code (forkserver + workers + tracker)
        assert _wait(lambda: (seen.update(_descendants(proc.pid)) or len(seen) >= 3) and proc.poll() is None, 120), \
            "the sweep never started its worker pool"
        _wait(lambda: seen.update(_descendants(proc.pid)) or False, 1.0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert _wait(lambda: not any(_alive(p) for p in seen), 20), \
            f"still running after the sweep was killed: {sorted(p for p in seen if _alive(p))}"
    finally:
        for p in seen:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
