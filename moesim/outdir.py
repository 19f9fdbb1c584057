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
RUN_FILES = ("summary.json", "steps.parquet", "requests.parquet", "events.parquet", "report.html", "whatif.json",
             "engine.json")
# folders a run keeps: `--why`'s what-if points (checked by scenario hash before reuse, advise/whatif.py)
RUN_DIRS = ("whatif",)
_LEFTOVER = re.compile(r"^\.(.+\.tmp-\d+|moesim-probe-.+)$")   # an interrupted run's temporary files


def _show(p: Path) -> str:
    """The path for a one-line message (repr when it holds a newline, NUL or other control)."""
    return str(p) if str(p).isprintable() else repr(str(p))


def _why(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _probe(d: Path) -> None:
    """Write and remove a temporary file in directory `d` (OSError when that is not possible)."""
    fd, probe = tempfile.mkstemp(prefix=".moesim-probe-", dir=d)
    os.close(fd)
    os.unlink(probe)


def check_writable_dir(path, field: str = "-o/--output") -> Path:
    """Prove that `path` is, or can be created as, a directory a file can be written in; nothing
    is created (a run that fails later leaves no directory behind)."""
    p = Path(path)
    try:
        if p.exists() and not p.is_dir():
            raise InputError("exists and is not a directory", file=_show(p), field=field)
        have = p.absolute()
        while not have.exists():   # the nearest existing ancestor must be a writable directory
            have = have.parent
        if not have.is_dir():
            raise InputError(f"{_show(have)} is a file, not a directory", file=_show(p), field=field)
        name_max = os.pathconf(have, "PC_NAME_MAX")
        long = [part for part in p.absolute().relative_to(have).parts if len(os.fsencode(part)) > name_max]
        if long:
            raise InputError(f"a name longer than {name_max} bytes", file=_show(p), field=field)
        _probe(have)
    except (OSError, ValueError) as e:  # not writable, /proc, a NUL byte
        raise InputError(f"cannot write an output directory here ({_why(e)})", file=_show(p), field=field) from None
    return p


def check_writable_file(path, field: str = "-o/--output") -> Path:
    """An output file's directory must be writable and the name must not be a directory."""
    p = Path(path)
    try:
        if p.is_dir():
            raise InputError("is a directory; expected a file name", file=_show(p), field=field)
    except (OSError, ValueError) as e:
        raise InputError(f"not a usable path ({_why(e)})", file=_show(p), field=field) from None
    parent = p.parent
    try:
        check_writable_dir(parent, field)
    except InputError as e:
        raise InputError(f"cannot write this file ({e.detail})", file=_show(p), field=field) from None
    return p


def claim_run_dir(path, field: str = "-o/--output") -> Path:
    """A writable directory that is new, empty or an earlier run's: refuse one with other files in it."""
    p = check_writable_dir(path, field)
    if not p.exists():
        return p
    try:
        names = [f.name for f in p.iterdir()]
    except OSError as e:
        raise InputError(f"cannot list the directory ({_why(e)})", file=_show(p), field=field) from None
    foreign = sorted(n for n in names if n not in RUN_FILES + RUN_DIRS and not _LEFTOVER.match(n))
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        shown = ", ".join(map(repr, foreign[:3]))
        raise InputError(f"holds files a run did not write ({shown}{more}); a run owns its directory: give a new "
                         "or empty one", file=_show(p), field=field)
    return p
