"""Inner thread pools (BLAS, OpenMP, Arrow, torch) of a process that runs simulations.

A simulation is one thread (SimPy). Its matrix products are small (a synthetic trace's gate, a
predictor's scores), and OpenBLAS, by default one thread per core, splits them anyway and then
leaves its other threads spinning: CPU burnt for no speed. So a simulation runs on one BLAS thread
(`one_blas_thread`), and a sweep's workers each get cores // workers inner threads (`limited`), the
rule of joblib/loky and Ray, so that workers × threads ≤ cores. The user's `OMP_NUM_THREADS`, when
set, is the per-worker limit instead (as Ray honours it).
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from .errors import InputError

ENV = "OMP_NUM_THREADS"  # the override, read by the sweep's local executor
# Set in a process while limited, for libraries it loads later (torch reads OMP_NUM_THREADS when
# imported; OpenBLAS and MKL read theirs when loaded)
_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_OPENBLAS = "OPENBLAS_NUM_THREADS"


def inner_threads(workers: int, cores: int | None = None) -> int:
    """Inner threads per worker: `OMP_NUM_THREADS` if set, else cores // workers (at least 1)."""
    raw = os.environ.get(ENV, "").strip()
    if raw:
        first = raw.split(",")[0]  # OpenMP's nested form "4,2": the outer level
        if not first.isdigit() or int(first) < 1:
            raise InputError(f"expected a whole number ≥ 1 of threads per worker, found {raw!r}",
                             field=f"environment variable {ENV}")
        return int(first)
    return max(1, (cores or os.cpu_count() or 1) // max(1, workers))


def limit(n: int) -> Callable[[], None]:
    """Cap this process's inner thread pools at `n` threads: the native BLAS and OpenMP pools
    (threadpoolctl), Arrow's CPU pool, torch's intra-op pool if torch is loaded, and the
    environment for libraries loaded later. Returns the function that restores them all."""
    from threadpoolctl import threadpool_limits  # noqa: PLC0415 (only processes that run points)

    env = {k: os.environ.get(k) for k in _ENV_VARS}
    os.environ.update({k: str(n) for k in _ENV_VARS})
    native = threadpool_limits(limits=n)
    undo = [native.restore_original_limits]
    if "pyarrow" in sys.modules:
        pa = sys.modules["pyarrow"]
        undo.append(lambda c=pa.cpu_count(): pa.set_cpu_count(c))
        pa.set_cpu_count(n)
    if "torch" in sys.modules:  # never imported here: torch stays an optional, lazy extra
        torch = sys.modules["torch"]
        undo.append(lambda t=torch.get_num_threads(): torch.set_num_threads(t))
        torch.set_num_threads(n)

    def restore() -> None:
        for f in reversed(undo):
            f()
        _restore_env(env)

    return restore


def _restore_env(env: dict[str, str | None]) -> None:
    """Put these environment variables back as they were (None: unset)."""
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextmanager
def limited(n: int) -> Iterator[None]:
    """`limit(n)` for the duration of a block."""
    restore = limit(n)
    try:
        yield
    finally:
        restore()


_blas = None  # threadpoolctl's view of the BLAS libraries loaded (numpy's, scipy's), made once


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run a block on one BLAS thread (its products are too small to split), then restore. A BLAS
    library loaded in the block (scipy's, which numba loads) starts with one thread and keeps it:
    started with more, OpenBLAS's threads spin about 0.13 s of CPU each as they start."""
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController  # noqa: PLC0415

        _blas = ThreadpoolController().select(user_api="blas")
    env = {_OPENBLAS: os.environ.get(_OPENBLAS)}  # (not OMP_NUM_THREADS: torch, loaded in the block, would keep it)
    os.environ[_OPENBLAS] = "1"
    try:
        with _blas.limit(limits=1):
            yield
    finally:
        _restore_env(env)


def current() -> dict[str, int]:
    """This process's inner thread limits now: per native API (blas, openmp) the largest of its
    libraries', Arrow's CPU pool, and torch's intra-op pool if torch is loaded."""
    from threadpoolctl import threadpool_info  # noqa: PLC0415

    out: dict[str, int] = {}
    for lib in threadpool_info():
        out[lib["user_api"]] = max(out.get(lib["user_api"], 0), lib["num_threads"])
    if "pyarrow" in sys.modules:
        out["arrow"] = sys.modules["pyarrow"].cpu_count()
    if "torch" in sys.modules:
        out["torch"] = sys.modules["torch"].get_num_threads()
    return out
