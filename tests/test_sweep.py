"""Sweeps: expansion, stable ids, failure isolation, resume, parallel == serial, CLI exit codes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.config import apply_overrides
from moesim.errors import InputError
from moesim.sweep import get_executor, load_sweep, point_id, run_sweep, sweep_from_dict, write_tables
from moesim.cli.sweep import sweep as sweep_cmd
from moesim.sweep.spec import override_strings
from moesim.sweep.worker import read_status

BASE = {"name": "b", "model": "m", "hardware": "h", "trace": "t.parquet", "cache": {"gpu": {"capacity_experts": 4}},
        "seed": 10}


def spec_of(**kw):
    return sweep_from_dict({"base": BASE, **kw}, file="s.yaml")


# ---- expansion and ids (no simulation) ------------------------------------------------------------

def test_grid_zip_repeats_expand_to_the_full_product_in_order():
    s = spec_of(grid={"cache.gpu.capacity_experts": [2, 4, 8], "predictor.name": ["on_demand", "oracle"]},
                zip={"batch.size": [1, 4], "trace.synthetic.requests": [2, 8]}, repeats=2)
    pts = s.points()
    assert len(pts) == 3 * 2 * 2 * 2
    assert [p.index for p in pts] == list(range(24))
    # grid: last key fastest; zip varies together; repeats innermost, added to the base seed
    assert pts[0].overrides == {"cache.gpu.capacity_experts": 2, "predictor.name": "on_demand", "batch.size": 1,
                                "trace.synthetic.requests": 2, "seed": 10}
    assert pts[1].overrides["seed"] == 11 and pts[1].repeat == 1
    assert pts[2].overrides["batch.size"] == 4 and pts[2].overrides["trace.synthetic.requests"] == 8
    assert pts[4].overrides["predictor.name"] == "oracle"
    assert pts[8].overrides["cache.gpu.capacity_experts"] == 4
    assert {(p.overrides["batch.size"], p.overrides["trace.synthetic.requests"]) for p in pts} == {(1, 2), (4, 8)}
    assert s.axes == ["cache.gpu.capacity_experts", "predictor.name", "batch.size", "trace.synthetic.requests", "seed"]
    assert len({p.id for p in pts}) == len(pts)


def test_no_axes_is_one_point_and_repeats_alone_vary_the_seed():
    assert [p.overrides for p in spec_of().points()] == [{}]
    assert [p.overrides["seed"] for p in spec_of(repeats=3).points()] == [10, 11, 12]


def test_ids_are_stable_short_hashes_of_the_overrides():
    a = spec_of(grid={"batch.size": [1, 2], "cache.gpu.capacity_experts": [4, 8]}).points()
    b = spec_of(grid={"cache.gpu.capacity_experts": [4, 8], "batch.size": [1, 2]}).points()
    assert {p.id: p.overrides for p in a} == {p.id: p.overrides for p in b}  # axis order does not matter
    assert [p.id for p in a] == [p.id for p in spec_of(grid={"batch.size": [1, 2],
                                                             "cache.gpu.capacity_experts": [4, 8]}).points()]
    assert all(len(p.id) == 10 and int(p.id, 16) >= 0 for p in a)
    assert point_id({"batch.size": 1}) != point_id({"batch.size": 2}) != point_id({"batch.size": "2"})
    # the base is not part of the id (it is checked separately, by the scenario hash)
    other = sweep_from_dict({"base": {**BASE, "seed": 3}, "grid": {"batch.size": [1, 2]}}, file="s.yaml")
    assert [p.id for p in other.points()] == [p.id for p in spec_of(grid={"batch.size": [1, 2]}).points()]
    assert other.scenario_hash(other.points()[0]) != spec_of(grid={"batch.size": [1, 2]}).scenario_hash(
        spec_of(grid={"batch.size": [1, 2]}).points()[0])


scalars = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False),
                    st.booleans(), st.none(), st.text(max_size=12))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                   st.dictionaries(st.from_regex(r"[a-z]{1,5}", fullmatch=True), c,
                                                                   max_size=3)), max_leaves=6)


@settings(max_examples=150, deadline=None)
@given(values)
def test_override_values_reach_the_scenario_unchanged(v):
    out = apply_overrides({"a": {"b": 1}}, override_strings({"a.b": v}))
    assert out["a"]["b"] == v and type(out["a"]["b"]) is type(v)


@pytest.mark.parametrize("data, field", [
    ({"grid": {"batch.size": 4}}, "grid.batch.size"),
    ({"grid": {"batch.size": []}}, "grid.batch.size"),
    ({"grid": {"batch.size": [1, 1]}}, "grid.batch.size"),
    ({"zip": {"batch.size": [1, 2], "seed": [1]}}, "zip"),
    ({"grid": {"batch.size": [1]}, "zip": {"batch.size": [2]}}, "zip.batch.size"),
    ({"repeats": 0}, "repeats"),
    ({"repeats": "3"}, "repeats"),
    ({"grids": {}}, "grids"),
    ({"grid": {"bad path!": [1]}}, "grid.bad path!"),
    ({"events": "yes"}, "events"),
])
def test_bad_sweep_files_name_the_field(data, field):
    with pytest.raises(InputError) as e:
        spec_of(**data)
    assert e.value.field == field and e.value.file == "s.yaml"


def test_base_is_required_and_a_base_file_must_exist(tmp_path):
    with pytest.raises(InputError, match="missing required key"):
        sweep_from_dict({"grid": {}}, file="s.yaml")
    with pytest.raises(InputError, match="not found"):
        sweep_from_dict({"base": "nope.yaml"}, file="s.yaml", base_dir=tmp_path)


def test_base_file_is_relative_to_the_sweep_file_and_set_overrides_it(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "scen.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "sw.yaml").write_text(yaml.safe_dump({"base": "sub/scen.yaml", "grid": {"batch.size": [1, 2]}}))
    s = load_sweep(tmp_path / "sw.yaml", ["seed=5"])
    assert s.name == "sw" and s.base["seed"] == 5 and s.base_dir == str(tmp_path / "sub")
    assert s.base_file == str(tmp_path / "sub" / "scen.yaml")


def test_cli_bad_sweep_file_exits_2(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump({"base": BASE, "zip": {"a.b": [1, 2], "c.d": [1]}}))
    r = CliRunner().invoke(sweep_cmd, [str(f), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "zip lists must have equal lengths" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(sweep_cmd, [str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "file not found" in r.output


def test_cli_lists_points(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"base": BASE, "grid": {"batch.size": [1, 2, 3]}}))
    r = CliRunner().invoke(sweep_cmd, [str(f), "--list"])
    assert r.exit_code == 0 and r.output.count("batch.size=") == 3


def test_ray_executor_says_how_to_install_ray(tmp_path):
    try:
        import ray  # noqa: F401
        pytest.skip("ray is installed")
    except ImportError:
        pass
    with pytest.raises(InputError, match=r"pip install moesim\[ray\]"):
        get_executor("ray").run([object()], tmp_path, lambda st: None)
    with pytest.raises(InputError, match="--executor ray only"):
        get_executor("local", address="auto")


# ---- running sweeps ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model's trace and a base scenario mapping around it."""
    from tests.helpers import TINY_MODEL, fixed_profile, write_routing

    d = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    routing = rng.integers(0, 16, size=(4, 10, 4, 1))
    trace = write_routing(d / "trace.parquet", routing, prompt_len=4, num_experts=16)
    base = {"name": "tiny", "seed": 0, "model": TINY_MODEL, "hardware": fixed_profile(),
            "trace": {"path": str(trace)}, "cache": {"gpu": {"capacity_experts": 2}},
            "predictor": {"name": "on_demand"}, "batch": {"size": 2}}
    return d, base


def write_sweep(path: Path, base: dict, **kw) -> Path:
    path.write_text(yaml.safe_dump({"name": path.stem, "base": base, **kw}, sort_keys=False))
    return path


def statuses(out: Path) -> dict[str, dict]:
    return {p.name: read_status(p) for p in sorted((out / "points").iterdir()) if p.is_dir()}


def test_a_bad_point_is_recorded_and_the_others_finish(tiny, tmp_path):
    d, base = tiny
    f = write_sweep(tmp_path / "bad.yaml", base, grid={"predictor.name": ["on_demand", "oracle"]},
                    zip={"cache.gpu.capacity_experts": [2, 4, 8], "cache.gpu.policy": ["lru", "no_such_policy", "lfu"]})
    out = tmp_path / "out"
    r = CliRunner().invoke(sweep_cmd, [str(f), "-o", str(out), "--workers", "1", "--no-progress", "--no-report"])
    assert r.exit_code == 1, r.output
    assert "2 of 6 points failed" in r.output and "unknown eviction policy 'no_such_policy'" in r.output
    st = statuses(out)
    assert len(st) == 6
    bad = {k: v for k, v in st.items() if v["status"] == "failed"}
    assert len(bad) == 2
    for pid, v in bad.items():
        assert v["overrides"]["cache.gpu.policy"] == "no_such_policy"
        assert "cache.gpu.policy" in v["error"] and v["error_type"] == "InputError"
        assert not (out / "points" / pid / "summary.json").exists()
    for pid, v in st.items():
        if v["status"] == "done":
            assert (out / "points" / pid / "summary.json").is_file()
            assert (out / "points" / pid / "steps.parquet").is_file()
    res = pd.read_parquet(out / "results.parquet")
    assert len(res) == 6 and (res["status"] == "done").sum() == 4
    assert list(res.columns[:5]) == ["point_id", "status", "predictor.name", "cache.gpu.capacity_experts",
                                     "cache.gpu.policy"]
    for col in ("tokens_per_s", "tpot_ms_mean", "tpot_ms_p50", "tpot_ms_p99", "ttft_ms_mean", "gpu_hit_rate",
                "dram_hit_rate", "stall_s", "bytes_pcie", "pcie_utilization", "gpu_utilization", "prefetch_issued",
                "prefetch_used", "prefetch_wasted", "prefetch_late", "dedup_ratio", "makespan_s",
                "gpu_cache_experts", "expert_bytes", "gpu_cache_bytes"):
        assert col in res.columns, col
    ok = res[res["status"] == "done"]
    assert (ok["tokens_per_s"] > 0).all()
    assert (ok["gpu_cache_bytes"] == ok["cache.gpu.capacity_experts"] * ok["expert_bytes"]).all()
    assert res[res["status"] == "failed"]["error"].str.contains("no_such_policy").all()
    man = pd.read_parquet(out / "manifest.parquet")
    assert set(man["status"]) == {"done", "failed"} and man["wall_s"].notna().all()


def test_rerun_resumes_running_only_missing_or_failed_points(tiny, tmp_path):
    d, base = tiny
    f = write_sweep(tmp_path / "resume.yaml", base, grid={"cache.gpu.capacity_experts": [2, 4, 8]},
                    zip={"batch.size": [1, 2]})
    out = tmp_path / "out"
    spec = load_sweep(f)
    first = run_sweep(spec, out, get_executor("local", workers=1), progress=False, echo=lambda m: None)
    assert len(first.ran) == 6 and not first.failed
    before = statuses(out)
    victim = sorted(before)[2]
    shutil.rmtree(out / "points" / victim)
    msgs = []
    second = run_sweep(load_sweep(f), out, get_executor("local", workers=1), progress=False, echo=msgs.append)
    assert second.ran == [victim] and len(second.skipped) == 5
    assert "5 already done" in msgs[0]
    after = statuses(out)
    runs = {v["run"] for v in before.values()}
    assert len(runs) == 1
    for pid, v in after.items():
        if pid == victim:
            assert v["run"] not in runs
        else:
            assert v == before[pid]  # untouched: same run id, same timestamps
    # a third run has nothing to do; deleting only summary.json also counts as not done
    third = run_sweep(load_sweep(f), out, get_executor("local", workers=1), progress=False, echo=lambda m: None)
    assert third.ran == []
    (out / "points" / victim / "summary.json").unlink()
    _, results = write_tables(out)
    assert results.set_index("point_id").loc[victim, "status"] == "pending"
    fourth = run_sweep(load_sweep(f), out, get_executor("local", workers=1), progress=False, echo=lambda m: None)
    assert fourth.ran == [victim]
    # a changed base reruns every point (ids stay the same)
    fifth = run_sweep(load_sweep(f, ["seed=1"]), out, get_executor("local", workers=1), progress=False,
                      echo=msgs.append)
    assert len(fifth.ran) == 6 and "different base" in msgs[-1]


def test_small_points_feed_the_pool_no_more(tiny, tmp_path):
    """Points whose total work is below the pool's start-up threshold: the pool gets at most the one
    point per worker it was given at the start; this process runs the rest (and records CPU time)."""
    import os

    d, base = tiny
    f = write_sweep(tmp_path / "small.yaml", base, grid={"predictor.name": ["on_demand", "oracle"],
                                                          "cache.gpu.capacity_experts": [2, 4, 6]})
    r = run_sweep(load_sweep(f), tmp_path / "o", get_executor("local", workers=2), progress=False,
                  echo=lambda m: None)
    st = statuses(tmp_path / "o").values()
    assert not r.failed and len(st) == 6
    assert sum(s["pid"] != os.getpid() for s in st) <= 1
    assert all(0 < s["cpu_s"] for s in st)


def test_points_run_here_while_the_pool_starts(tiny, tmp_path, monkeypatch):
    """The pool's first submit blocks until its forkserver has imported moesim: the pool starts from
    a thread, so this process computes points meanwhile (and every point still finishes)."""
    import os
    import threading

    import moesim.sweep.executors as executors

    monkeypatch.setattr(executors, "MIN_POOL_WORK_S", 0.0)  # feed the pool however small the points
    booting = threading.Event()   # set by on_done: the pool "finishes booting" only after 2 points ran here
    waited_out = []
    real = executors.LocalExecutor._pool

    def slow_pool(size, threads):
        pool = real(size, threads)
        submit = pool.submit

        def slow_submit(*a, **kw):
            if not booting.is_set():
                waited_out.append(not booting.wait(60))  # True: nothing ran here while it "booted"
            return submit(*a, **kw)
        pool.submit = slow_submit
        return pool

    monkeypatch.setattr(executors.LocalExecutor, "_pool", staticmethod(slow_pool))
    d, base = tiny
    f = write_sweep(tmp_path / "s.yaml", base, grid={"cache.gpu.capacity_experts": [2, 3, 4, 5, 6, 7, 8, 9]})
    done = []

    def on_done(st):
        done.append(st)
        if len(done) == 2:
            booting.set()

    from moesim.sweep.runner import make_tasks

    spec = load_sweep(f)
    (tmp_path / "o").mkdir()
    executors.LocalExecutor(workers=2).run(make_tasks(spec, spec.points(), "r"), tmp_path / "o", on_done)
    assert waited_out == [False] and len(done) == 8 and all(s["status"] == "done" for s in done)
    assert [s["pid"] for s in done[:2]] == [os.getpid()] * 2


def test_every_process_that_runs_points_gets_the_thread_cap(tiny, tmp_path, monkeypatch):
    """With 2 workers, the pool's workers and this process run their points under the inner-thread
    cap (here OMP_NUM_THREADS=3: no library's default), and this process gets its own limits back."""
    import os

    import moesim.sweep.executors as executors
    from moesim.sweep.runner import make_tasks
    from moesim.sweep.worker import run_point
    from moesim.threads import current

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    before, env = current(), {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    pools, real = [], executors.LocalExecutor._pool

    def spy(size, threads):
        pools.append((size, threads))
        return real(size, threads)

    monkeypatch.setattr(executors.LocalExecutor, "_pool", staticmethod(spy))
    d, base = tiny
    f = write_sweep(tmp_path / "cap.yaml", base, grid={"cache.gpu.capacity_experts": [2, 3, 4, 5]})
    msgs = []
    r = run_sweep(load_sweep(f), tmp_path / "o", get_executor("local", workers=2), progress=False, echo=msgs.append)
    st = list(statuses(tmp_path / "o").values())
    assert not r.failed and len(st) == 4 and pools == [(1, 3)]
    assert any("2 workers × 3 inner threads" in m for m in msgs)
    assert any(s["pid"] == os.getpid() for s in st)  # this process runs the first point itself
    for s in st:  # here or in the pool
        assert s["threads"]["blas"] == 3 and s["threads"]["arrow"] == 3, s
    assert current() == before
    assert {k: os.environ.get(k) for k in env} == env
    # a pool worker, given a point for certain
    spec = load_sweep(f)
    task = make_tasks(spec, spec.points(), "r")[0]
    (tmp_path / "p").mkdir()
    pool = real(1, 3)
    try:
        st = pool.submit(run_point, task, str(tmp_path / "p")).result()
    finally:
        pool.shutdown()
    assert st["status"] == "done" and st["pid"] != os.getpid()
    assert st["threads"]["blas"] == 3 and st["threads"]["arrow"] == 3, st


def test_parallel_points_are_byte_identical_to_serial(tiny, tmp_path, monkeypatch):
    import moesim.sweep.executors as executors

    monkeypatch.setattr(executors, "MIN_POOL_WORK_S", 0.0)  # start the pool however small the points
    d, base = tiny
    f = write_sweep(tmp_path / "par.yaml", base, grid={"predictor.name": ["on_demand", "oracle"],
                                                        "cache.gpu.capacity_experts": [2, 6]}, repeats=2)
    a, b = tmp_path / "serial", tmp_path / "parallel"
    ra = run_sweep(load_sweep(f), a, get_executor("local", workers=1), progress=False, echo=lambda m: None)
    rb = run_sweep(load_sweep(f), b, get_executor("local", workers=2), progress=False, echo=lambda m: None)
    assert not ra.failed and not rb.failed and len(ra.ran) == len(rb.ran) == 8
    pids = {s["pid"] for s in statuses(b).values()}
    assert len(pids) >= 1 and all(s["status"] == "done" for s in statuses(b).values())
    for p in (a / "points").iterdir():
        assert (p / "summary.json").read_bytes() == (b / "points" / p.name / "summary.json").read_bytes()
    # and each equals running the same point on its own
    from moesim.config import scenario_from_dict
    from moesim.engine.run import simulate
    from moesim.results import write_result

    pt = load_sweep(f).points()[5]
    sc = scenario_from_dict(apply_overrides(load_sweep(f).base, override_strings(pt.overrides)), file=str(f),
                            base_dir=tmp_path)
    write_result(simulate(sc), tmp_path / "single")
    assert (tmp_path / "single" / "summary.json").read_bytes() == (b / "points" / pt.id / "summary.json").read_bytes()
    ra_res = pd.read_parquet(a / "results.parquet").drop(columns=["wall_s"])
    rb_res = pd.read_parquet(b / "results.parquet").drop(columns=["wall_s"])
    pd.testing.assert_frame_equal(ra_res, rb_res)
    assert list(ra_res["repeat"]) == [0, 1] * 4 and list(ra_res["seed"]) == [0, 1] * 4


def test_cli_sweep_writes_everything_and_exits_0(tiny, tmp_path):
    d, base = tiny
    f = write_sweep(tmp_path / "ok.yaml", base, grid={"cache.gpu.capacity_experts": [2, 4]}, events=True)
    out = tmp_path / "out"
    r = CliRunner().invoke(sweep_cmd, [str(f), "-o", str(out), "--workers", "2"])
    assert r.exit_code == 0, r.output
    assert "2 of 2 points done" in r.output
    for name in ("sweep.json", "manifest.parquet", "results.parquet", "report.html"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["axes"] == ["cache.gpu.capacity_experts"] and len(meta["points"]) == 2
    for p in meta["points"]:
        assert (out / "points" / p["id"] / "events.parquet").is_file()
    assert not list((out / "points").glob(".tmp-*"))
    r = CliRunner().invoke(sweep_cmd, [str(f), "-o", str(out), "--no-report"])
    assert r.exit_code == 0 and "2 already done" in r.output


def test_ray_executor_runs_a_sweep(tiny, tmp_path):
    pytest.importorskip("ray")
    d, base = tiny
    f = write_sweep(tmp_path / "ray.yaml", base, grid={"cache.gpu.capacity_experts": [2, 4]})
    res = run_sweep(load_sweep(f), tmp_path / "out", get_executor("ray", workers=2), progress=False,
                    echo=lambda m: None)
    assert len(res.ran) == 2 and not res.failed
    local = run_sweep(load_sweep(f), tmp_path / "local", get_executor("local", workers=1), progress=False,
                      echo=lambda m: None)
    assert len(local.ran) == 2
    for p in (tmp_path / "out" / "points").iterdir():  # identical per-point summaries
        assert (p / "summary.json").read_bytes() == (tmp_path / "local" / "points" / p.name / "summary.json").read_bytes()


class _FakeRay:
    """Just enough of Ray's API, run in-process, to test the Ray executor's driver side."""

    def __init__(self, crash_index=None):
        self.initialized, self.address, self.crash_index, self.max_in_flight = False, "unset", crash_index, 0
        self.in_flight = 0

    def is_initialized(self):
        return self.initialized

    def init(self, address=None, **kw):
        self.initialized, self.address = True, address

    def shutdown(self):
        self.initialized = False

    def remote(self, **opts):
        ray = self

        class _Ref:
            def __init__(self, fn, args):
                self.fn, self.args = fn, args

        class _Remote:
            def __init__(self, fn):
                self.fn = fn

            def remote(self, *args):
                ray.in_flight += 1
                ray.max_in_flight = max(ray.max_in_flight, ray.in_flight)
                return _Ref(self.fn, args)

        return _Remote

    def wait(self, refs, num_returns=1):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        self.in_flight -= 1
        if ref.args[0].index == self.crash_index:
            raise RuntimeError("worker node died")
        return ref.fn(*ref.args)

    def cancel(self, ref, force=False):
        pass


def test_ray_executor_driver_commits_returned_files(tiny, tmp_path, monkeypatch):
    import sys

    d, base = tiny
    fake = _FakeRay(crash_index=1)
    monkeypatch.setitem(sys.modules, "ray", fake)
    f = write_sweep(tmp_path / "ray.yaml", base, grid={"cache.gpu.capacity_experts": [2, 4, 8]})
    out = tmp_path / "out"
    res = run_sweep(load_sweep(f), out, get_executor("ray", workers=2, address="auto"), progress=False,
                    echo=lambda m: None)
    assert fake.address == "auto" and not fake.initialized and fake.max_in_flight == 2
    assert len(res.ran) == 3 and len(res.failed) == 1 and "worker node died" in res.failed[0]["error"]
    serial = tmp_path / "serial"
    run_sweep(load_sweep(f), serial, get_executor("local", workers=1), progress=False, echo=lambda m: None)
    for pid, st in statuses(out).items():
        if st["status"] == "done":
            assert (out / "points" / pid / "summary.json").read_bytes() == \
                (serial / "points" / pid / "summary.json").read_bytes()
            assert (out / "points" / pid / "steps.parquet").is_file()
    assert not list((out / "points").glob(".tmp-*"))


def test_ctrl_c_keeps_finished_points_and_leaves_no_partial_ones(tiny, tmp_path, monkeypatch):
    import moesim.engine.run as engine_run

    d, base = tiny
    f = write_sweep(tmp_path / "int.yaml", base, grid={"cache.gpu.capacity_experts": [2, 3, 4, 5]})
    real, calls = engine_run.simulate, []

    def interrupted_third(sc, record_events=False):
        calls.append(sc.cache.gpu.capacity_experts)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(sc, record_events)

    monkeypatch.setattr(engine_run, "simulate", interrupted_third)
    out = tmp_path / "out"
    res = run_sweep(load_sweep(f), out, get_executor("local", workers=1), progress=False, echo=lambda m: None)
    assert res.interrupted and len(res.ran) == 2
    assert sorted(statuses(out)) == sorted(res.ran) and not list((out / "points").glob(".tmp-*"))
    assert list(res.results["status"]) == ["done", "done", "pending", "pending"]
    monkeypatch.setattr(engine_run, "simulate", real)
    again = run_sweep(load_sweep(f), out, get_executor("local", workers=1), progress=False, echo=lambda m: None)
    assert len(again.skipped) == 2 and len(again.ran) == 2 and not again.interrupted


def test_the_example_sweep_expands_to_valid_scenarios():
    from moesim.config import scenario_from_dict

    root = Path(__file__).resolve().parents[1]
    spec = load_sweep(root / "scenarios" / "whatif-cache-batch.yaml")
    pts = spec.points()
    assert len(pts) == 40 and spec.axes == ["cache.gpu.capacity_gb", "batch.size", "predictor.name"]
    for p in pts:
        sc = scenario_from_dict(apply_overrides(spec.base, override_strings(p.overrides)), file=spec.file,
                                base_dir=Path(spec.base_dir))
        assert sc.model.name == "olmoe-1b-7b" and sc.predictor.name in ("on_demand", "oracle")
        assert sc.resolve(sc.trace.path).name == "olmoe-sample.parquet"
