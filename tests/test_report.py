"""Reports: self-contained HTML (plotly.js inlined once, one div per figure), built from files only."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from moesim.errors import InputError
from moesim.report import detect, render_run, render_sweep
from moesim.cli.report import report as report_cmd
from moesim.report.sweep import pareto_front
from moesim.sweep import get_executor, load_sweep, run_sweep

PLOTLY_JS = re.compile(r"\* plotly\.js v\d")


def figures(html: str) -> int:
    return html.count('class="plotly-graph-div"')


def check_page(html: str) -> None:
    assert html.startswith("<!DOCTYPE html>")
    assert len(PLOTLY_JS.findall(html)) == 1, "plotly.js must be inlined exactly once"
    assert '<script src=' not in html  # nothing to fetch: opens offline
    assert figures(html) >= 1
    assert html.count("Plotly.newPlot(") == figures(html)
    ids = re.findall(r'<div id="(fig-\d+)" class="plotly-graph-div"', html)
    assert ids == [f"fig-{i}" for i in range(1, figures(html) + 1)]


@pytest.fixture(scope="module")
def sweepdir(tmp_path_factory):
    """A small 2-axis × 2-predictor sweep with events, run once for all report tests."""
    from tests.helpers import TINY_MODEL, fixed_profile, write_routing

    d = tmp_path_factory.mktemp("rep")
    routing = np.random.default_rng(1).integers(0, 16, size=(4, 10, 4, 1))
    trace = write_routing(d / "trace.parquet", routing, prompt_len=4, num_experts=16)
    base = {"name": "tiny", "model": TINY_MODEL, "hardware": fixed_profile(copy_engines=2),
            "trace": {"path": str(trace)}, "cache": {"gpu": {"capacity_experts": 2}, "dram": {"capacity_experts": 24}},
            "predictor": {"name": "on_demand"}}
    f = d / "rep.yaml"
    f.write_text(yaml.safe_dump({"base": base, "events": True, "grid": {
        "cache.gpu.capacity_experts": [2, 4, 8], "batch.size": [1, 2], "predictor.name": ["on_demand", "oracle"]},
        "zip": {"cache.gpu.policy": ["lru", "no_such_policy"]}}, sort_keys=False))
    out = d / "out"
    res = run_sweep(load_sweep(f), out, get_executor("local", workers=2), progress=False, echo=lambda m: None)
    assert len(res.failed) == 12 and len(res.ran) == 24
    return out


def a_point(sweepdir, predictor="oracle"):
    res = pd.read_parquet(sweepdir / "results.parquet")
    row = res[(res["status"] == "done") & (res["predictor.name"] == predictor)].iloc[0]
    return sweepdir / "points" / row["point_id"]


def test_run_report_has_every_section(sweepdir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(a_point(sweepdir), run)
    p = render_run(run)
    assert p == run / "report.html"
    html = p.read_text()
    check_page(html)
    for text in ("Summary", "tokens/s", "Time per layer", "Timeline of step", "PCIe", "Hit rates",
                 "Prefetch outcomes", "Unique experts per layer", "GPU hit rate", "DRAM"):
        assert text in html, text
    # layer breakdown, step times, ≤ 3 timelines, hit rates, prefetch, unique experts, requests
    assert 6 <= figures(html) <= 9
    # a transfer appears on the timeline with its layer and expert
    assert "pcie demand" in html or "pcie prefetch" in html


def test_run_report_without_events_or_steps(sweepdir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(a_point(sweepdir, "on_demand"), run)
    (run / "events.parquet").unlink()
    html = render_run(run).read_text()
    check_page(html)
    assert "no events.parquet" in html and "Timeline of step" in html
    (run / "steps.parquet").unlink()
    html = render_run(run).read_text()
    check_page(html)
    assert "no steps.parquet" in html and figures(html) == 3  # hit rates, prefetch, requests


def test_sweep_report_has_lines_heatmap_and_pareto(sweepdir):
    html = render_sweep(sweepdir).read_text()
    check_page(html)
    html = html.replace("\\u00d7", "×").replace("\\u002f", "/")  # as plotly's JSON escapes them
    # one line figure per axis that varies among the done points besides the predictor (capacity, batch
    # size: the policy axis has only failed points on its second value), one heatmap, one Pareto front
    assert figures(html) == 4
    for text in ("vs cache.gpu.capacity_experts", "vs batch.size", "over cache.gpu.capacity_experts × batch.size",
                 "Pareto front", "on_demand", "oracle", "no_such_policy", "unknown eviction policy"):
        assert text in html, text


def test_pareto_front_keeps_undominated_points():
    x = np.array([1.0, 1.0, 2.0, 3.0, 4.0, 2.0])
    y = np.array([10.0, 12.0, 11.0, 20.0, 15.0, 30.0])
    assert sorted(pareto_front(x, y).tolist()) == [1, 5]


def test_moesim_report_rerenders_from_saved_files(sweepdir, tmp_path):
    d = tmp_path / "sw"
    shutil.copytree(sweepdir, d)
    (d / "report.html").unlink(missing_ok=True)
    (d / "results.parquet").unlink()  # rebuilt from the point directories
    assert detect(d) == "sweep"
    r = CliRunner().invoke(report_cmd, [str(d), "--points"])
    assert r.exit_code == 0, r.output
    check_page((d / "report.html").read_text())
    assert (d / "results.parquet").is_file()
    done = pd.read_parquet(d / "results.parquet").query("status == 'done'")["point_id"]
    assert all((d / "points" / pid / "report.html").is_file() for pid in done)
    run = d / "points" / done.iloc[0]
    (run / "report.html").unlink()
    assert detect(run) == "run"
    r = CliRunner().invoke(report_cmd, [str(run)])
    assert r.exit_code == 0 and (run / "report.html").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert f"{summary['tokens_per_s']:.4g}".split("e")[0][:4] in (run / "report.html").read_text()


def test_report_of_a_dir_without_results_exits_2(tmp_path):
    r = CliRunner().invoke(report_cmd, [str(tmp_path)])
    assert r.exit_code == 2 and "expected summary.json" in r.output
    with pytest.raises(InputError):
        detect(tmp_path / "nope")
    (tmp_path / "summary.json").write_text("{not json")
    r = CliRunner().invoke(report_cmd, [str(tmp_path)])
    assert r.exit_code == 2 and "unreadable JSON" in r.output and "Traceback" not in r.output
