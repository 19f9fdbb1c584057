"""Output locations, checked before any work is done: a `-o` under a file, on a read-only file
system or under /proc is one InputError up front, not a traceback after the simulation.

A run owns its directory: `claim_run_dir` refuses a directory holding files a run did not write,
and `results.write_result` replaces the run's files as a set (no stale file of an earlier run)."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from .errors import InputError

# every file `moesim run` writes into its directory (results.write_result, then report.render_run)
RUN_FILES = ("summary.json", "steps.parquet", "requests.parquet", "events.parquet", "report.html")
_LEFTOVER = re.compile(r"^\..+\.tmp-\d+$")   # an interrupted run's temporary file (results._atomic)


def _why(e: OSError) -> str:
    return e.strerror or type(e).__name__


def check_writable_dir(path, field: str = "-o/--output") -> Path:
    """Create `path` (and its parents) if needed and prove a file can be written in it."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError("exists and is not a directory", file=str(p), field=field)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".moesim-probe-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"cannot write an output directory here ({_why(e)})", file=str(p), field=field) from None
    return p


def check_writable_file(path, field: str = "-o/--output") -> Path:
    """An output file's directory must be writable and the name must not be a directory."""
    p = Path(path)
    if p.is_dir():
        raise InputError("is a directory; expected a file name", file=str(p), field=field)
    parent = p.parent if str(p.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise InputError(f"{parent} is not a directory", file=str(p), field=field)
    try:
        check_writable_dir(parent, field)
    except InputError as e:
        raise InputError(f"cannot write this file ({e.detail})", file=str(p), field=field) from None
    return p


def claim_run_dir(path, field: str = "-o/--output") -> Path:
    """A writable directory that is new, empty or an earlier run's: refuse one with other files in it."""
    p = check_writable_dir(path, field)
    foreign = sorted(f.name for f in p.iterdir() if f.name not in RUN_FILES and not _LEFTOVER.match(f.name))
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise InputError(f"holds files a run did not write ({', '.join(foreign[:3])}{more}); a run owns its "
                         "directory: give a new or empty one", file=str(p), field=field)
    return p
