"""`moesim compare`: the error table of a simulation against a real run (here: simulated runs,
so no torch is needed)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from moesim.compare import compare_dirs, rel_err, step_times
from moesim.engine.run import simulate
from moesim.cli.replay import compare
from moesim.results import write_result
from moesim.validate import tiny_scenario, write_routing


@pytest.fixture
def run_dir(tmp_path):
    rng = np.random.default_rng(0)
    tr = write_routing(tmp_path / "t.parquet", rng.integers(0, 16, size=(4, 8, 4, 1)).astype(np.int16), 3, 16)
    sc = tiny_scenario(tr, gpu={"capacity_experts": 8}, batch={"size": 2})
    d = tmp_path / "sim"
    write_result(simulate(sc), d)
    return d


def test_compare_with_itself_is_zero_error(run_dir, tmp_path):
    r = CliRunner().invoke(compare, [str(run_dir), str(run_dir), "-o", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert "makespan" in r.output
    c = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert not c["warnings"]
    for t in c["totals"]:
        assert t["error"] in (0.0, None), t
    assert c["per_step"]["all"]["max_abs_error"] == 0 and c["per_step"]["all"]["total_error"] == 0
    assert all(d["layer_ms_error"] == 0 for d in c["per_layer"])
    steps = pd.read_parquet(tmp_path / "c" / "compare_steps.parquet")
    assert (steps["error"] == 0).all()
    assert (tmp_path / "c" / "compare.md").read_text().startswith("# compare")


def test_compare_scaled_times_give_the_expected_error(run_dir, tmp_path):
    """A "real" run whose every time is 25% longer: the simulation is 20% short everywhere."""
    real = tmp_path / "real"
    shutil.copytree(run_dir, real)
    s = json.loads((real / "summary.json").read_text())
    s["makespan_s"] *= 1.25
    s["tpot_ms"] = {k: v * 1.25 for k, v in s["tpot_ms"].items()}
    (real / "summary.json").write_text(json.dumps(s))
    st = pd.read_parquet(real / "steps.parquet")
    for c in ("start_s", "gate_s", "end_s", "attention_s", "compute_s", "stall_s"):
        st[c] *= 1.25
    st.to_parquet(real / "steps.parquet", index=False)
    c = compare_dirs(run_dir, real)
    tot = {t["metric"]: t["error"] for t in c["totals"]}
    assert tot["makespan_s"] == pytest.approx(-0.2) and tot["tpot_ms.mean"] == pytest.approx(-0.2)
    assert tot["misses"] == 0
    assert c["per_step"]["all"]["mean_abs_error"] == pytest.approx(0.2)
    assert c["per_step"]["decode"]["total_error"] == pytest.approx(-0.2)


def test_step_times_add_up_to_the_makespan(run_dir):
    s = json.loads((run_dir / "summary.json").read_text())
    t = step_times(pd.read_parquet(run_dir / "steps.parquet"), s["makespan_s"])
    assert t["ms"].sum() == pytest.approx(s["makespan_s"] * 1e3) and len(t) == s["steps"]


def test_rel_err_and_bad_dirs(tmp_path):
    assert rel_err(11, 10) == pytest.approx(0.1) and rel_err(0, 0) == 0 and rel_err(1, 0) is None
    r = CliRunner().invoke(compare, [str(tmp_path), str(tmp_path)])
    assert r.exit_code == 2 and "summary.json" in r.output
