"""Headless Chromium opens a run report and a sweep report: every figure renders (plotly adds its
SVG to each figure div), the console shows nothing (no errors, no warnings) and no two pieces of a
figure's text (titles, axis titles, legend entries, subplot titles) are drawn over each other.
Skipped when Chromium is not installed (`.ci/run` installs Debian's chromium)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from moesim.cli import main

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")


def open_in_browser(html: Path, profile: Path) -> tuple[str, list[str]]:
    """The DOM after scripts ran, and the console messages."""
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
                        "--virtual-time-budget=15000", "--dump-dom", html.resolve().as_uri()],
                       capture_output=True, text=True, timeout=120)
    console = [ln for ln in r.stderr.splitlines() if ":CONSOLE" in ln]
    return r.stdout, console


def check_rendered(dom: str, console: list[str]) -> int:
    assert not console, console
    divs = re.findall(r'<div id="(fig-\d+)"[^>]*class="([^"]*)"', dom)
    assert divs, "no figure divs"
    for fig_id, cls in divs:
        assert "js-plotly-plot" in cls, f"{fig_id} was not rendered by plotly"
    assert dom.count('class="main-svg"') >= len(divs)
    return len(divs)


# logs every pair of a figure's text boxes (titles, legend entries, subplot titles) that intersect
OVERLAP_JS = """<script>
window.addEventListener('load', () => setTimeout(() => {
  document.querySelectorAll('.js-plotly-plot').forEach(fig => {
    const boxes = [...fig.querySelectorAll('.legendtext, .xtitle, .ytitle, .gtitle, .annotation-text')]
      .filter(e => e.textContent.trim()).map(e => [e.textContent.trim(), e.getBoundingClientRect()])
      .filter(([t, r]) => r.width > 0 && r.height > 0);
    for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
      const [ta, a] = boxes[i], [tb, b] = boxes[j];
      if (a.left < b.right - 1 && b.left < a.right - 1 && a.top < b.bottom - 1 && b.top < a.bottom - 1)
        console.log('OVERLAP ' + fig.id + ': "' + ta + '" over "' + tb + '"');
    }
  });
}, 1000));
</script>"""


def open_with_overlap_check(html: Path, profile: Path) -> tuple[str, list[str], list[str]]:
    """DOM, console messages and the pairs of text drawn over each other in the page's figures
    (a copy of the page that runs OVERLAP_JS)."""
    probe = html.with_name(f"overlap-{html.name}")
    probe.write_text(html.read_text().replace("</body>", OVERLAP_JS + "</body>"))
    dom, console = open_in_browser(probe, profile)
    return dom, [c for c in console if "OVERLAP" not in c], [c for c in console if "OVERLAP" in c]


def test_overlap_check_can_fail(tmp_path):
    """A legend placed over the x-axis title (the timelines' old layout) is seen."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(x=[1, 2], y=["a", "b"], orientation="h", name="stall (summed, drawn at layer end)"))
    fig.add_trace(go.Bar(x=[1], y=["a"], orientation="h", name="pcie demand"))
    fig.update_xaxes(title_text="ms since step start (t = 0.123456 s)")
    fig.update_layout(height=180 + 34 * 2, legend=dict(orientation="h", y=-0.25))
    page = tmp_path / "bad.html"
    page.write_text(f"<html><body>{fig.to_html(full_html=False, include_plotlyjs=True)}</body></html>")
    assert any("ms since step start" in c for c in open_with_overlap_check(page, tmp_path / "profile")[2])


def test_console_capture_works(tmp_path):
    """The check can fail: a page that throws is seen."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>throw new Error('boom')</script></body></html>")
    _, console = open_in_browser(bad, tmp_path / "profile")
    assert any("boom" in c for c in console)


def test_run_and_sweep_reports_render(tmp_path):
    run_dir = tmp_path / "run"
    r = CliRunner().invoke(main, ["run", str(ROOT / "scenarios/oracle-ssd.yaml"), "-o", str(run_dir), "--quiet",
                                  "--events"])
    assert r.exit_code == 0, r.output
    dom, console, overlaps = open_with_overlap_check(run_dir / "report.html", tmp_path / "p1")
    assert check_rendered(dom, console) >= 6
    assert not overlaps
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"""name: tiny-sweep
base: {ROOT / 'scenarios/quickstart.yaml'}
grid:
  cache.gpu.capacity_gb: [2, 8]
  batch.size: [1, 4]
  predictor.name: [on_demand, oracle]
""")
    r = CliRunner().invoke(main, ["sweep", str(sweep), "-o", str(tmp_path / "sw"), "--workers", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    dom, console, overlaps = open_with_overlap_check(tmp_path / "sw" / "report.html", tmp_path / "p2")
    assert check_rendered(dom, console) >= 3
    assert not overlaps


def test_run_report_shows_the_bottleneck_analysis(tmp_path):
    """`moesim run --why`: the Why section (verdict + gains figure) renders in the browser."""
    run_dir = tmp_path / "run"
    r = CliRunner().invoke(main, ["run", str(ROOT / "scenarios/quickstart.yaml"), "-o", str(run_dir), "--quiet",
                                  "--why", "--set", "trace={synthetic: {requests: 4, prompt_len: 8, decode_len: 16}}"])
    assert r.exit_code == 0, r.output
    dom, console = open_in_browser(run_dir / "report.html", tmp_path / "p3")
    check_rendered(dom, console)
    assert "Why: bottleneck analysis" in dom
    verdict = re.search(r'class="verdict"><b>([^<]+)</b>', dom).group(1)
    assert verdict.startswith("link-bound: ") and "gives +" in verdict
    assert "Gain in tokens/s from one change at a time" in dom  # the figure's title, drawn by plotly


def test_advise_report_renders(tmp_path):
    f = tmp_path / "advise.yaml"
    f.write_text("""model: olmoe-1b-7b
hardware: [rtx4090-pcie4, a100-80gb-pcie4]
trace: {synthetic: {requests: 4, prompt_len: 8, decode_len: 8}}
slo: {tpot_ms: 1000}
objective: tokens_per_dollar
search: {trials: 6}
""")
    r = CliRunner().invoke(main, ["advise", str(f), "-o", str(tmp_path / "adv"), "--workers", "1"])
    assert r.exit_code == 0, r.output
    n = check_rendered(*open_in_browser(tmp_path / "adv" / "report.html", tmp_path / "p4"))
    assert n >= 4
