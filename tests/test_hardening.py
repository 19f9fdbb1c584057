"""The defects of issue 14, one test each: an unusable -o is refused before simulating, an empty
trace is bad input, a reused output directory holds one run, oversized inputs are refused with a
memory estimate, YAML alias bombs are refused, batch sizes are bounded and explained, a garbage
checkpoint gets moesim's own message, and the help texts agree with their defaults."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from moesim.cli import main
from moesim.config import load_scenario
from moesim.errors import InputError
from moesim.yamlsafe import MAX_ALIAS_NODES, expanded_size

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "scenarios/quickstart.yaml")
SWITCH = {"name": "sw", "model": "switch-base-128", "hardware": "rtx4090-pcie4",
          "trace": str(ROOT / "traces/switch-sample.parquet"), "cache": {"gpu": {"capacity_experts": 64}}}


def cli(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def one_line_exit_2(r) -> str:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


@pytest.fixture
def switch_yaml(tmp_path):
    f = tmp_path / "sw.yaml"
    f.write_text(yaml.safe_dump(SWITCH))
    return f


@pytest.fixture
def no_simulation(monkeypatch):
    """Fail the test if a simulation starts (checks must come first)."""
    import moesim.engine.run as run

    def boom(*a, **k):
        raise AssertionError("simulated before the output location was checked")

    monkeypatch.setattr(run, "simulate", boom)


# ---- 1. -o under a file, under /proc -------------------------------------------------------------

@pytest.mark.parametrize("where", ["under_file", "proc"])
def test_unusable_output_dir_is_refused_before_simulating(tmp_path, switch_yaml, no_simulation, where):
    f = tmp_path / "f"
    f.write_text("x")
    out = {"under_file": f / "sub", "proc": Path("/proc/moesim-out")}[where]
    if where == "proc" and not Path("/proc/self").exists():
        pytest.skip("no /proc")
    line = one_line_exit_2(cli("run", switch_yaml, "-o", out))
    assert str(out) in line and "-o/--output" in line


def test_trace_generate_checks_its_output_first(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    line = one_line_exit_2(cli("trace", "generate", "--preset", "switch-base-128", "-o", f / "t.parquet"))
    assert "t.parquet" in line


# ---- 2. a trace with 0 rows --------------------------------------------------------------------

@pytest.mark.parametrize("quiet", [[], ["--quiet"]])
def test_empty_trace_is_bad_input(tmp_path, quiet):
    t = pq.read_table(ROOT / "traces/switch-sample.parquet")
    empty = tmp_path / "empty.parquet"
    pq.write_table(t.slice(0, 0), empty)
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({**SWITCH, "trace": str(empty)}))
    line = one_line_exit_2(cli("run", f, "-o", tmp_path / "out", *quiet))
    assert "empty.parquet" in line and "no rows" in line
    assert not (tmp_path / "out/summary.json").exists()


# ---- 3. a reused output directory ----------------------------------------------------------------

def test_a_rerun_replaces_the_earlier_runs_files(tmp_path, switch_yaml):
    d = tmp_path / "d"
    assert cli("run", switch_yaml, "-o", d, "--events", "--quiet").exit_code == 0
    assert (d / "events.parquet").exists()
    r = cli("run", switch_yaml, "-o", d, "--set", "batch.size=2", "--quiet", "--no-report")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in d.iterdir()) == ["engine.json", "requests.parquet", "steps.parquet",
                                                "summary.json"]
    assert cli("report", d).exit_code == 0
    html = (d / "report.html").read_text()
    assert "Timeline of step" in html and "pcie demand" not in html   # no transfers from the first run's events
    assert json.loads((d / "summary.json").read_text())["scenario"]["batch"]["size"] == 2


def test_a_directory_with_other_files_is_refused(tmp_path, switch_yaml, no_simulation):
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    line = one_line_exit_2(cli("run", switch_yaml, "-o", d))
    assert "notes.txt" in line and (d / "notes.txt").read_text() == "mine"


# ---- 4. size guards ------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("requests", 10**9), ("prompt_len", 2 * 10**9), ("decode_len", 10**12)])
def test_oversized_synthetic_trace_is_refused_with_an_estimate(tmp_path, field, value):
    f = tmp_path / "syn.yaml"
    f.write_text(yaml.safe_dump({**SWITCH, "trace": {"synthetic": {"requests": 2}}}))
    line = one_line_exit_2(cli("run", f, "-o", tmp_path / "o", "--set", f"trace.synthetic.{field}={value}"))
    assert "GB of memory" in line and f"trace.synthetic.{field}" in line and "limit" in line


def test_trace_generate_refuses_before_allocating(tmp_path):
    for args in (["--requests", 10**9], ["--prompt-len", 2 * 10**9]):
        line = one_line_exit_2(cli("trace", "generate", "--preset", "olmoe-1b-7b", *args, "-o", tmp_path / "t.parquet"))
        assert "GB of memory" in line
    assert not (tmp_path / "t.parquet").exists()


def test_memory_limit_applies_to_a_file_trace(tmp_path, switch_yaml, monkeypatch):
    """The estimate is made for every run, not only absurd ones: a tiny limit refuses the sample."""
    monkeypatch.setenv("MOESIM_MEMORY_LIMIT_GB", "0.0001")
    line = one_line_exit_2(cli("run", switch_yaml, "-o", tmp_path / "o"))
    assert "switch-sample.parquet" in line and "MOESIM_MEMORY_LIMIT_GB" in line
    monkeypatch.setenv("MOESIM_MEMORY_LIMIT_GB", "lots")
    assert "MOESIM_MEMORY_LIMIT_GB" in one_line_exit_2(cli("run", switch_yaml, "-o", tmp_path / "o"))


# ---- 5. YAML alias bombs -------------------------------------------------------------------------

def bomb(levels: int, fan: int = 9) -> str:
    """A list whose last element expands to fan ** (levels + 1) strings."""
    parts = [f"&a0 [{', '.join(['lol'] * fan)}]"]
    parts += [f"&a{i} [{', '.join([f'*a{i - 1}'] * fan)}]" for i in range(1, levels + 1)]
    return f"[{', '.join(parts)}]"


def test_alias_bomb_in_a_scenario_is_refused(tmp_path):
    f = tmp_path / "b.yaml"
    # 9^7 = 4.8 M strings in the field `name`: refused before anything expands it (without the
    # guard the error message alone would quote all of them)
    f.write_text(yaml.safe_dump({**SWITCH, "name": "PLACEHOLDER"}).replace("PLACEHOLDER", bomb(6)))
    with pytest.raises(InputError, match="an alias bomb") as e:
        load_scenario(f)
    assert len(str(e.value)) < 400
    g = tmp_path / "r.yaml"
    g.write_text(yaml.safe_dump(SWITCH) + "x: &r [1, *r]\n")
    with pytest.raises(InputError, match="refers to the node that contains it"):
        load_scenario(g)


def test_alias_counting_is_exact_and_small_aliases_still_load(tmp_path):
    # written: the mapping, keys a and b, x = [1, 2] (3 nodes), b's list: 7 nodes; expanded, b's
    # list holds x twice: 1 + 1 + 3 + 1 + (1 + 2 * 3) = 13
    assert expanded_size(yaml.compose("a: &x [1, 2]\nb: [*x, *x]\n")) == (7, 13)
    node = yaml.compose(bomb(4))   # 9 ** 5 strings
    assert expanded_size(node)[1] > 9 ** 5 > MAX_ALIAS_NODES
    f = tmp_path / "ok.yaml"
    f.write_text(yaml.safe_dump({k: v for k, v in SWITCH.items() if k != "cache"})
                 + "cache:\n  gpu: &g {capacity_experts: 64}\n  dram: *g\n")
    assert load_scenario(f).cache.dram.capacity_experts == 64   # a small alias is fine


def test_too_deep_yaml_is_one_line(tmp_path):
    f = tmp_path / "deep.yaml"
    f.write_text("a: " + "[" * 20000 + "]" * 20000 + "\n")
    assert "nested too deeply" in one_line_exit_2(cli("run", f))


# ---- 7. accepted silently ------------------------------------------------------------------------

def test_batch_size_is_bounded(tmp_path, switch_yaml):
    line = one_line_exit_2(cli("run", switch_yaml, "--set", "batch.size=1000000000000", "-o", tmp_path / "o"))
    assert "batch.size" in line


def test_a_batch_larger_than_the_trace_and_late_prefetches_are_explained(tmp_path, switch_yaml):
    r = CliRunner().invoke(main, ["run", str(switch_yaml), "--set", "batch.size=16", "--set", "predictor.name=oracle",
                                  "-o", str(tmp_path / "o"), "--no-report"])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "o/summary.json").read_text())
    assert "batch.size is 16 but at most 8 requests ran at once" in r.output
    late = s["prefetch"]["late"] > s["prefetch"]["issued"] / 2
    assert ("prefetches were late" in r.output) == late


def test_quickstart_oracle_notes_its_late_prefetches(tmp_path):
    r = cli("run", QUICK, "--set", "predictor.name=oracle", "-o", tmp_path / "o", "--no-report")
    assert r.exit_code == 0
    assert "prefetches were late" in r.output and "experts x 0.50 ms)" in r.output


# ---- 8. a garbage checkpoint -----------------------------------------------------------------------

def test_garbage_checkpoint_gets_moesims_message(tmp_path):
    torch = pytest.importorskip("torch")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 12)
    obj = tmp_path / "obj.pt"
    torch.save({"format": "moesim-predictor", "thing": Path("x")}, obj)   # a zip, but not weights-only
    for f in (junk, obj):
        line = one_line_exit_2(cli("predictor", "eval", f))
        assert "not a readable checkpoint" in line and "file an issue" not in line and "weights_only" not in line


# ---- docs: help that agrees with its default --------------------------------------------------------

def test_help_texts():
    assert "List the profiles" in cli("hardware", "--help").output
    h = " ".join(cli("profile", "--help").output.split())
    assert "(up to 16 tokens)" not in h and "default: 128" in h


def test_eval_without_trace_says_which_trace_and_what_to_give():
    pytest.importorskip("torch")
    line = one_line_exit_2(cli("predictor", "eval", ROOT / "checkpoints/switch-base-128-speculation.pt"))
    assert "give --trace" in line and "12-layer, 128-expert, top-1" in line


def test_sweep_output_under_a_file_is_one_line(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "s", "base": SWITCH, "grid": {"batch.size": [1, 2]}}))
    line = one_line_exit_2(cli("sweep", sweep, "-o", f / "sub", "--no-progress"))
    assert "f/sub" in line
