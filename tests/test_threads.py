"""Inner thread pools: the per-worker cap's rule and override, its application and undoing, and a
simulation's one BLAS thread (moesim/threads.py). The sweep's use of it: tests/test_sweep.py."""
from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from moesim.errors import InputError
from moesim.threads import current, inner_threads, limited, one_blas_thread


def test_workers_share_the_cores_and_omp_num_threads_overrides(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert inner_threads(2, cores=16) == 8
    assert inner_threads(3, cores=16) == 5
    assert inner_threads(4, cores=2) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    assert inner_threads(2, cores=16) == 6
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")  # OpenMP's nested form: the outer level
    assert inner_threads(2, cores=16) == 4


@pytest.mark.parametrize("bad", ["0", "many", "-2"])
def test_a_bad_omp_num_threads_names_the_variable(monkeypatch, bad):
    monkeypatch.setenv("OMP_NUM_THREADS", bad)
    with pytest.raises(InputError, match="OMP_NUM_THREADS"):
        inner_threads(2)


def test_sweep_cli_with_a_bad_omp_num_threads_exits_2(tmp_path, monkeypatch):
    from moesim.cli.sweep import sweep as sweep_cmd

    f = tmp_path / "s.yaml"
    f.write_text("name: s\nbase: {name: b, model: olmoe-1b-7b, hardware: rtx4090-pcie4,"
                 " trace: {synthetic: {requests: 1}}}\n")
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    r = CliRunner().invoke(sweep_cmd, [str(f), "-o", str(tmp_path / "o"), "--workers", "2"])
    assert r.exit_code == 2, r.output
    assert "OMP_NUM_THREADS" in r.output and "Traceback" not in r.output


def test_limited_caps_every_pool_and_the_environment_then_restores_them():
    import pyarrow as pa

    before = current()
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    with limited(3):
        now = current()
        assert now["blas"] == 3 and pa.cpu_count() == 3
        assert all(now[k] == 3 for k in now)
        assert all(os.environ[k] == "3" for k in env)
    assert current() == before
    assert {k: os.environ.get(k) for k in env} == env


def test_a_simulation_runs_on_one_blas_thread(tmp_path, monkeypatch):
    """Its products are small: OpenBLAS's other threads would only spin. The process's own limit
    is back afterwards."""
    import numpy as np

    import moesim.engine.run as run
    from tests.helpers import scenario, write_routing

    routing = np.random.default_rng(0).integers(0, 16, size=(2, 6, 4, 1))
    sc = scenario(write_routing(tmp_path / "t.parquet", routing, prompt_len=2, num_experts=16))

    seen = []
    real = run.open_trace

    def spy(*a, **kw):
        seen.append(current()["blas"])
        return real(*a, **kw)

    monkeypatch.setattr(run, "open_trace", spy)
    with limited(2):
        run.simulate(sc)
        assert seen == [1] and current()["blas"] == 2
    with limited(2), one_blas_thread():
        assert current()["blas"] == 1


def test_a_blas_library_loaded_in_the_block_starts_on_one_thread(monkeypatch):
    """OpenBLAS reads OPENBLAS_NUM_THREADS when it loads (scipy's, loaded by numba mid-run): with
    one thread it starts no spinning helpers. The variable is back afterwards, set or not."""
    for before in (None, "3"):
        if before is None:
            monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
        else:
            monkeypatch.setenv("OPENBLAS_NUM_THREADS", before)
        with one_blas_thread():
            assert os.environ["OPENBLAS_NUM_THREADS"] == "1"
        assert os.environ.get("OPENBLAS_NUM_THREADS") == before
