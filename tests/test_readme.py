"""The README is true: every command it shows (the lines of its ```bash blocks, the `$ ` lines of
others) runs, some with smaller sizes, said where; its ```python blocks run, its scenario loads,
and the figures it quotes are what the commands print now, within the README's rounding.

A README command this file does not know FAILS `test_every_readme_command_is_known` until it is
added to COMMANDS below: run as written, run with an override (and why), or skipped (and why).
Commands run in a scratch directory that links the repository's data directories, so nothing is
written into the checkout; `moesim ...` commands run in-process (one Python start-up for all)."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from moesim.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
LINKED = ("scenarios", "traces", "hardware_profiles", "checkpoints", "benchmarks", "docs")


def _strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a # outside quotes, at the start or after a space)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


SHELL = ("bash", "sh", "shell")                             # blocks whose every line is a command
OTHER = ("", "console", "python", "yaml", "text", "json", "toml")  # output, code, data: a `$ ` line is a command


def fenced() -> list[tuple[str, str]]:
    """(language, text) of every fenced code block, in order."""
    return re.findall(r"^```([\w+-]*)\n(.*?)^```", README, flags=re.S | re.M)


def blocks(lang: str) -> list[str]:
    return [text for lg, text in fenced() if lg == lang]


def bash_commands() -> list[str]:
    """Every command the README shows, in order: the lines of its shell blocks and the `$ ` lines
    of other blocks (continuations joined, comments and blank lines dropped, spaces collapsed)."""
    out = []
    for lang, block in fenced():
        for line in re.sub(r"\\\n", " ", block).splitlines():
            if lang not in SHELL:
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            line = " ".join(_strip_comment(line.removeprefix("$ ")).split())
            if line:
                out.append(line)
    return out


# ---- what each README command does here --------------------------------------------------------

@dataclass(frozen=True)
class Cmd:
    run: tuple[str, ...] | None = None   # what runs instead of the line (None: the line as written)
    why: str = ""                        # why it is overridden or skipped
    skip: bool = False
    needs: str | None = None             # a module that must import (else the test skips, saying so)
    check: str | None = None             # name of a check_* function below, given (outputs, workdir)


def _q(**kw):
    return Cmd(**kw)


COMMANDS: dict[str, Cmd] = {
    # -- Quickstart
    "pip install -e . && moesim run scenarios/quickstart.yaml":
        _q(run=("moesim run scenarios/quickstart.yaml",), why="no pip install inside the tests (the package "
           "under test is imported from the checkout)", check="check_quickstart"),
    "pip install torch==2.13.0 && pip install -e '.[test]' && python -m pytest -q":
        _q(skip=True, why="the test suite itself (this file is part of it); .ci/run runs it"),
    "moesim run scenarios/quickstart.yaml":
        _q(skip=True, why="the `$ ` line of the quoted Quickstart output: that command runs (and its table "
           "is checked) in the first Quickstart line"),
    # -- Using it
    "moesim run SCENARIO.yaml [-o DIR] [--set path=value ...] [--events]":
        _q(skip=True, why="a synopsis with placeholders; `moesim run` runs in the Quickstart line"),
    "moesim models": _q(check="check_models"),
    "moesim hardware list | moesim hardware show rtx4090-pcie4":
        _q(run=("moesim hardware list", "moesim hardware show rtx4090-pcie4"),
           why="`|` separates two commands here", check="check_hardware"),
    "moesim trace generate --preset olmoe-1b-7b --requests 8 --prompt-len 32 --decode-len 64 --seed 0 -o t.parquet":
        _q(),
    "moesim trace info t.parquet": _q(check="check_trace_info"),
    "moesim schema": _q(check="check_schema"),
    # -- Real routing
    "pip install -e '.[collect]'": _q(skip=True, why="installs packages"),
    "moesim trace collect --model allenai/OLMoE-1B-7B-0924 --prompts prompts.txt --max-new-tokens 64 --pre-attn "
    "-o olmoe.parquet":
        _q(skip=True, why="downloads a 7B-parameter model from the Hugging Face hub (no network here); "
           "tests/test_collect_tiny.py runs collect on tiny random models of every family"),
    "moesim trace import routing.csv --format csv --model mixtral-8x7b --prompt-len 16 -o mixtral.parquet":
        _q(check="check_import", why="routing.csv is written first by the check's fixture (2 tokens)"),
    "moesim trace train-tiny -o traces/tiny-learned.parquet":
        _q(skip=True, why="~5 CPU minutes, and would overwrite the shipped trace; traces/make_tiny_learned.sh "
           "is its reproduction"),
    # -- Calibrating the generator
    "moesim trace fit traces/tiny-learned.parquet -o tiny-fit.yaml":
        _q(run=("moesim trace fit traces/tiny-learned.parquet -o tiny-fit.yaml --max-evals 5 --replicates 1 "
                "--eval-replicates 1 --quiet",), why="~30 s as written: 5 evaluations instead"),
    "moesim trace info traces/tiny-learned.parquet synthetic.parquet":
        _q(run=("moesim trace generate --preset-file tiny-fit.yaml -o synthetic.parquet",
                "moesim trace info traces/tiny-learned.parquet synthetic.parquet"),
           why="the README shows it before the generate line that writes synthetic.parquet"),
    "moesim trace generate --preset-file tiny-fit.yaml -o synthetic.parquet": _q(),
    # -- Learned predictors
    "pip install torch==2.13.0 && pip install -e '.[torch]'": _q(skip=True, why="installs packages"),
    "moesim predictor train speculation --trace traces/olmoe-sample.parquet --preset small -o spec.pt":
        _q(run=("moesim predictor train speculation --trace traces/olmoe-sample.parquet --preset tiny -o spec.pt "
                "--epochs 1 --max-train-samples 256 --quiet",), why="minutes as written: tiny, 1 epoch",
           needs="torch"),
    "moesim predictor train pre_attention --trace traces/olmoe-sample.parquet --preset small -o pre.pt":
        _q(run=("moesim predictor train pre_attention --trace traces/olmoe-sample.parquet --preset tiny -o pre.pt "
                "--epochs 1 --max-train-samples 256 --quiet",), why="tiny, 1 epoch", needs="torch"),
    "moesim predictor eval spec.pt": _q(needs="torch", check="check_eval"),
    "moesim predictor eval checkpoints/switch-base-128-speculation.pt --trace traces/switch-sample.parquet":
        _q(needs="torch", check="check_eval"),
    "moesim run scenarios/quickstart.yaml --set predictor.name=speculation --set predictor.checkpoint=spec.pt":
        _q(run=("moesim run scenarios/quickstart.yaml --set predictor.name=speculation "
                "--set predictor.checkpoint=spec.pt -o spec-run --no-report",),
           why="its own -o, so it does not replace the Quickstart's reports/quickstart", needs="torch"),
    # -- What-if sweeps and reports
    "moesim sweep scenarios/whatif-cache-batch.yaml":
        _q(run=("moesim sweep whatif/whatif-cache-batch.yaml -o reports/whatif-cache-batch --workers 1 "
                "--no-progress",),
           why="40 points as written: the 3 the README quotes (4, 6 and 8 GB at batch 4, on-demand), "
               "from a copy of the file with a smaller grid", check="check_whatif"),
    "moesim sweep SWEEP.yaml --executor ray --address auto":
        _q(skip=True, why="needs a running Ray cluster; tests/test_sweep.py runs the ray executor on a local Ray"),
    "moesim report reports/whatif-cache-batch": _q(),
    # -- Ground truth
    "pip install torch==2.13.0": _q(skip=True, why="installs packages"),
    "moesim profile --quick -o hardware_profiles/this-machine.yaml --model olmoe-1b-7b --scale 0.25":
        _q(skip=True, why="measures this machine for up to a minute; tests/test_profile.py runs it"),
    "moesim replay benchmarks/fidelity/scenarios/olmoe.yaml --real --scale 0.25 --hardware "
    "hardware_profiles/this-machine.yaml -o real/":
        _q(run=("moesim replay benchmarks/fidelity/scenarios/olmoe.yaml --real --scale 0.25 --hardware "
                "rtx4090-pcie4 --requests 1 --layers 2 -o real/ --quiet",),
           why="the profile line is skipped (a shipped profile instead); 1 request, 2 layers", needs="torch"),
    "moesim replay benchmarks/fidelity/scenarios/olmoe.yaml --sim --scale 0.25 --hardware "
    "hardware_profiles/this-machine.yaml -o sim/":
        _q(run=("moesim replay benchmarks/fidelity/scenarios/olmoe.yaml --sim --scale 0.25 --hardware "
                "rtx4090-pcie4 --requests 1 --layers 2 -o sim/ --quiet",), why="as the --real line"),
    "moesim compare sim/ real/": _q(needs="torch", check="check_compare"),
    # -- Software-stack costs: calibrating to this machine
    "moesim replay benchmarks/fidelity/scenarios/olmoe.yaml --real --scale 0.25 --requests 2 --hardware "
    "hardware_profiles/this-machine.yaml -o reports/this-machine-real/":
        _q(run=("moesim replay benchmarks/fidelity/scenarios/olmoe.yaml --real --scale 0.25 --hardware "
                "rtx4090-pcie4 --requests 1 --layers 2 -o reports/this-machine-real/ --quiet",),
           why="the profile line is skipped (a shipped profile instead); 1 request, 2 layers", needs="torch"),
    "moesim calibrate scenarios/calibrate-this-machine.yaml -o reports/this-machine.runtime.yaml":
        _q(run=("moesim calibrate calibrate-this-machine.yaml -o reports/this-machine.runtime.yaml",),
           why="the shipped points file starts from the skipped profile's runtime: a copy starting from "
               "none, on the replay above", needs="torch", check="check_calibrate"),
    # -- A C++ runtime preset: MoE-Infinity
    "moesim calibrate benchmarks/published/moeinfinity-a5000.points.yaml -o /tmp/moeinfinity-a5000.runtime.yaml":
        _q(run=("moesim run benchmarks/published/scenarios/moeinfinity-a5000-deepseek.yaml -o moeinfinity-ds --quiet "
                "--no-report --set predictor.name=on_demand --set cache.gpu.policy=lfu_history "
                "--set runtime=benchmarks/published/fitted/moeinfinity-a5000.runtime.yaml",),
           why="~45 s as written: the held-out point runs with the runtime that command wrote "
               "(benchmarks/published/fitted/), and the quoted fit and prediction are checked",
           check="check_moeinfinity"),
    # -- Advice
    "moesim advise scenarios/advise-mixtral.yaml": _q(check="check_advise"),
    "moesim advise ADVISE.yaml --executor ray --address auto":
        _q(skip=True, why="needs a running Ray cluster; tests/test_advise.py runs the ray executor path"),
    "moesim run SCENARIO.yaml --why":
        _q(skip=True, why="a synopsis with placeholders; tests/test_whatif.py runs `moesim run --why`"),
    # -- Development
    "python -m pytest -q -m slow": _q(skip=True, why="the long fuzzing, minutes"),
    "python benchmarks/bench_cache.py; python benchmarks/bench_engine.py; python benchmarks/bench_neural_train.py":
        _q(skip=True, why="benchmarks: minutes each, and their figures depend on the machine's load"),
}


# ---- running ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("readme")
    for name in LINKED:
        (d / name).symlink_to(ROOT / name)
    return d


def execute(cmd: str, cwd: Path) -> str:
    """Run one command in `cwd`: `moesim ...` in-process, anything else in a shell. Its output."""
    if cmd.startswith("moesim "):
        old = os.getcwd()
        os.chdir(cwd)
        try:
            r = CliRunner().invoke(main, shlex.split(cmd)[1:], env={"COLUMNS": "200"})
        finally:
            os.chdir(old)
        assert r.exit_code == 0, f"{cmd}\nexit {r.exit_code}\n{r.output}\n{r.exception!r}"
        return r.output
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{cmd}\nexit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def test_every_code_block_is_of_a_known_kind():
    unknown = sorted({lang for lang, _ in fenced() if lang not in SHELL + OTHER})
    assert not unknown, f"teach tests/test_readme.py what a ```{unknown[0]} block holds (SHELL or OTHER)"


def test_every_readme_command_is_known():
    lines = bash_commands()
    unknown = [c for c in lines if c not in COMMANDS]
    assert not unknown, ("README commands tests/test_readme.py does not know; add each to COMMANDS (run as "
                         "written, with an override, or skipped, with the reason):\n" + "\n".join(unknown))
    stale = [c for c in COMMANDS if c not in lines]
    assert not stale, "COMMANDS entries no longer in the README (remove them):\n" + "\n".join(stale)


def test_a_new_command_fails_until_it_is_listed(monkeypatch):
    """The check above can fail: a command added to the README (in any shell block, or as a `$ `
    line) and not in COMMANDS is reported; so is an unknown kind of block."""
    here = sys.modules[__name__]
    for extra in ("```bash\nmoesim frobnicate --all\n```\n", "```\n$ moesim frobnicate\n```\n"):
        monkeypatch.setattr(here, "README", README + "\n" + extra)
        with pytest.raises(AssertionError, match="frobnicate"):
            test_every_readme_command_is_known()
    monkeypatch.setattr(here, "README", README + "\n```fish\nmoesim models\n```\n")
    with pytest.raises(AssertionError, match="fish"):
        test_every_code_block_is_of_a_known_kind()


@pytest.mark.parametrize("line", list(dict.fromkeys(bash_commands())), ids=lambda s: s[:60])
def test_readme_command(line, workdir):
    spec = COMMANDS.get(line)
    if spec is None:
        pytest.fail(f"not in COMMANDS: {line}")
    if spec.skip:
        pytest.skip(spec.why)
    if spec.needs:
        pytest.importorskip(spec.needs)
    if spec.check in FIXTURES:
        FIXTURES[spec.check](workdir)
    outputs = [execute(c, workdir) for c in (spec.run or (line,))]
    if spec.check:
        globals()[spec.check](outputs, workdir)


def test_readme_python_blocks_run(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    code = blocks("python")
    assert code
    for src in code:
        exec(compile(src, "README.md", "exec"), {})


def test_readme_scenario_block_loads(workdir):
    from moesim.config import load_scenario

    scenarios = [b for b in blocks("yaml") if b.startswith("name:")]
    assert scenarios
    for i, text in enumerate(scenarios):
        d = workdir / f"readme-scenario-{i}"   # its trace path is relative to the scenario file's directory
        d.mkdir(exist_ok=True)
        (d / "s.yaml").write_text(text)
        sc = load_scenario(d / "s.yaml")
        assert sc.resolve(sc.trace.path).is_file()


# ---- fixtures a command needs before it runs ------------------------------------------------------

def _routing_csv(workdir: Path) -> None:
    rows = ["request_id,token,layer,experts"]
    rows += [f"0,{t},{layer},\"{layer % 8} {(layer + t + 1) % 8}\"" for t in range(2) for layer in range(32)]
    (workdir / "routing.csv").write_text("\n".join(rows) + "\n")


def _small_whatif(workdir: Path) -> None:
    doc = yaml.safe_load((ROOT / "scenarios/whatif-cache-batch.yaml").read_text())
    doc["grid"] = {"cache.gpu.capacity_gb": [4, 6, 8], "batch.size": [4], "predictor.name": ["on_demand"]}
    (workdir / "whatif").mkdir(exist_ok=True)
    (workdir / "whatif/whatif-cache-batch.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def _calibrate_points(workdir: Path) -> None:
    doc = yaml.safe_load((ROOT / "scenarios/calibrate-this-machine.yaml").read_text())
    doc["base_runtime"] = "none"
    doc["points"][0]["real"] = "reports/this-machine-real"
    (workdir / "calibrate-this-machine.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


FIXTURES: dict[str, Callable[[Path], None]] = {"check_import": _routing_csv, "check_whatif": _small_whatif,
                                               "check_calibrate": _calibrate_points}


# ---- checks of what the README says the commands print ------------------------------------------

def _numbers(s: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", s)]


def _table_rows(text: str) -> dict[str, str]:
    """metric -> value cell of a rich table drawn with │."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) == 4 and cells[1]:
            rows[cells[1]] = cells[2]
    return rows


def _near(quoted: str, value: float) -> bool:
    """`value` rounds to `quoted` at the number of decimals quoted."""
    decimals = len(quoted.split(".")[1]) if "." in quoted else 0
    return abs(value - float(quoted)) <= 0.5 * 10 ** -decimals + 1e-9


def _readme_after(pattern: str) -> re.Match:
    m = re.search(pattern, " ".join(README.split()))
    assert m, f"README no longer says: {pattern}"
    return m


def check_quickstart(outputs, workdir):
    out = outputs[0]
    block = re.search(r"^```\n\$ moesim run scenarios/quickstart.yaml\n(.*?)^```", README, flags=re.S | re.M)
    assert block, "the README's quoted quickstart output"
    quoted = block.group(1)
    title = quoted.splitlines()[0]
    assert " ".join(title.split()) in " ".join(out.split())
    want, got = _table_rows(quoted), _table_rows(out)
    assert len(want) == 12
    for metric, cell in want.items():
        assert metric in got, metric
        assert _numbers(got[metric]) == _numbers(cell), (metric, cell, got[metric])
    s = json.loads((workdir / "reports/quickstart/summary.json").read_text())
    m = _readme_after(r"with a ([\d.]+) GB GPU expert cache, batch (\d+)")
    assert _near(m.group(1), s["scenario"]["cache"]["gpu"]["capacity_gb"])
    assert int(m.group(2)) == s["scenario"]["batch"]["size"]
    m = _readme_after(r"the GPU computes (\d+) % of the time and waits on PCIe the rest; (\d+) % of expert "
                      r"accesses miss a ([\d.]+) GB LRU cache and every miss is ([\d.]+) MB over a (\d+) GB/s link")
    assert _near(m.group(1), 100 * s["gpu_utilization"])
    assert _near(m.group(2), 100 * (1 - s["gpu_hit_rate"]))
    assert _near(m.group(3), s["scenario"]["cache"]["gpu"]["capacity_gb"])
    assert _near(m.group(4), s["expert_bytes"] / 1e6)
    assert _near(m.group(5), s["scenario"]["hardware"]["pcie_h2d"]["bandwidth_gbps"])


def check_models(outputs, workdir):
    names = _readme_after(r"`moesim models` lists the presets \(([^)]*)\)").group(1)
    for n in [x.strip() for x in names.split(",")]:
        assert n in outputs[0], n


def check_hardware(outputs, workdir):
    names = _readme_after(r"`hardware_profiles/` holds ([^;]*?); every number").group(1)
    for n in re.split(r",\s*|\s+and\s+", names):
        assert n.strip() in outputs[0], n
    assert "source" in outputs[1] and "rtx4090" in outputs[1].lower()


def check_trace_info(outputs, workdir):
    assert "8 requests" in outputs[0] and "16 MoE layers × 64 experts, top-8" in outputs[0]


def check_schema(outputs, workdir):
    assert json.loads(outputs[0])["title"] == "Scenario"


def check_import(outputs, workdir):
    from moesim.traces import TraceReader

    r = TraceReader(workdir / "mixtral.parquet")
    assert (r.meta.model, r.num_rows) == ("mixtral-8x7b", 64)


def check_eval(outputs, workdir):
    for word in ("random", "frequency", "recency", "Markov"):
        assert word.lower() in outputs[0].lower(), word


def check_compare(outputs, workdir):
    assert "error" in outputs[0].lower()


def check_whatif(outputs, workdir):
    """at batch 4 a 4 GB cache (317 experts) gets 0 % hits ..., while 6 GB gets 57 % and 8 GB 72 %
    (43.7 and 66.8 tokens/s against 18.8)."""
    m = _readme_after(r"at batch 4 a ([\d.]+) GB cache \((\d+) experts\) gets (\d+) % hits .*? while ([\d.]+) GB "
                      r"gets (\d+) % and ([\d.]+) GB (\d+) % \(([\d.]+) and ([\d.]+) tokens/s against ([\d.]+)\)")
    res = pd.read_parquet(workdir / "reports/whatif-cache-batch/results.parquet")
    assert (res["status"] == "done").all()
    by = {float(r["cache.gpu.capacity_gb"]): r for _, r in res.iterrows()}
    small, mid, big = (by[float(m.group(i))] for i in (1, 4, 6))
    assert int(m.group(2)) == json.loads(
        (workdir / "reports/whatif-cache-batch/points" / small["point_id"] / "summary.json").read_text()
    )["gpu_cache_experts"]
    for quoted, row in ((m.group(3), small), (m.group(5), mid), (m.group(7), big)):
        assert _near(quoted, 100 * row["gpu_hit_rate"]), (quoted, row["gpu_hit_rate"])
    for quoted, row in ((m.group(8), mid), (m.group(9), big), (m.group(10), small)):
        assert _near(quoted, row["tokens_per_s"]), (quoted, row["tokens_per_s"])


def check_calibrate(outputs, workdir):
    doc = yaml.safe_load((workdir / "reports/this-machine.runtime.yaml").read_text())
    assert "layer_host_us" in doc and "layer_host_us" in doc["source"]
    assert "layer_host_us" in outputs[0]


def check_moeinfinity(outputs, workdir):
    """fits `layer_host_us = 1040` ... predicts its DeepSeek-V2-Lite point at 52.27 ms against 155 ms (−66.3 %)"""
    m = _readme_after(r"fits `layer_host_us = ([\d.]+)` on the MoE-Infinity README's Mixtral-8x7B A5000 point .*? "
                      r"predicts its DeepSeek-V2-Lite point at ([\d.]+) ms against ([\d.]+) ms \(([−+-][\d.]+) %\)")
    fitted = yaml.safe_load((ROOT / "benchmarks/published/fitted/moeinfinity-a5000.runtime.yaml").read_text())
    assert _near(m.group(1), fitted["layer_host_us"]) and fitted["name"] == "moeinfinity-a5000"
    tpot = json.loads((workdir / "moeinfinity-ds/summary.json").read_text())["tpot_ms"]["mean"]
    assert _near(m.group(2), tpot), tpot
    assert _near(m.group(4).replace("−", "-"), 100 * (tpot / float(m.group(3)) - 1))


def check_advise(outputs, workdir):
    """The quoted output's summary lines (trials, per-GPU answers, recommendation, default) are printed."""
    block = re.search(r"^```\n\$ moesim advise scenarios/advise-mixtral.yaml\n(.*?)^```", README, flags=re.S | re.M)
    assert block, "the README's quoted advise output"
    out = " ".join(outputs[0].split())
    lines = [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.lstrip().startswith(("┏", "┃", "┡", "│", "└", "scenario:"))]
    assert len(lines) >= 5
    for ln in lines:
        assert " ".join(ln.split()) in out, ln


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
