"""Every bad input of DESIGN §6: exit status 2, one line naming file and field, no traceback,
and nothing already written is lost."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from moesim.cli import main
from tests.helpers import write_routing

ROOT = Path(__file__).resolve().parents[1]
GOOD = (ROOT / "scenarios/quickstart.yaml").read_text().replace("../traces/", str(ROOT / "traces") + "/")


def run_cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def check_error(code, out, *needles):
    assert code == 2, out
    assert "Traceback" not in out
    lines = [ln for ln in out.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    for n in needles:
        assert n in out, (n, out)


@pytest.mark.parametrize("edit,needles", [
    (lambda s: s + "bogus_key: 1\n", ["bogus_key", "unknown key"]),
    (lambda s: s.replace("name: on_demand", "name: crystal_ball"), ["predictor.name", "crystal_ball"]),
    (lambda s: s.replace("{capacity_gb: 6, policy: lru}", "{capacity_experts: -3}"),
     ["cache.gpu.capacity_experts"]),
    (lambda s: s.replace("{capacity_gb: 6, policy: lru}", "{capacity_experts: 4, partition: per_layer}"),
     ["cache.gpu", "top_k"]),
    (lambda s: s.replace("{capacity_gb: 6, policy: lru}", "{capacity_gb: 400}"), ["cache.gpu", "GPU memory"]),
    (lambda s: s.replace("{capacity_gb: 6, policy: lru}", "{capacity_experts: 1024}").replace(
        "olmoe-1b-7b", "{preset: olmoe-1b-7b, vocab_size: 2000000}"), ["cache.gpu", "resident weights"]),
    (lambda s: s.replace("policy: lru", "policy: random_walk"), ["cache.gpu.policy", "random_walk"]),
    (lambda s: s.replace("model: olmoe-1b-7b", "model: gpt-17"), ["model", "gpt-17"]),
    (lambda s: s.replace("hardware: rtx4090-pcie4", "hardware: abacus"), ["hardware", "abacus"]),
    (lambda s: s.replace("model: olmoe-1b-7b", "model: qwen1.5-moe-a2.7b"), ["olmoe-sample.parquet", "num_layers"]),
    (lambda s: s.replace("size: 4", "size: 0"), ["batch.size"]),
    (lambda s: s.replace("predictor: {name: on_demand}", "predictor: {name: oracle, lookahead_layers: 0}"),
     ["predictor.lookahead_layers"]),
    (lambda s: s.replace("predictor: {name: on_demand}", "predictor: {name: oracle, foresight: 2}"),
     ["predictor.foresight"]),
    (lambda s: s + "cache: [\n", ["malformed YAML"]),
])
def test_bad_scenario(tmp_path, edit, needles):
    f = tmp_path / "bad.yaml"
    f.write_text(edit(GOOD))
    code, out = run_cli("run", f, "-o", tmp_path / "out")
    names_file = [] if needles[0].endswith(".parquet") else [str(f)]  # a trace error names the trace
    check_error(code, out, *names_file, *needles)
    assert not (tmp_path / "out").exists()


def test_missing_files(tmp_path):
    check_error(*run_cli("run", tmp_path / "nope.yaml"), "nope.yaml", "not found")
    f = tmp_path / "s.yaml"
    f.write_text(GOOD.replace(str(ROOT / "traces/olmoe-sample.parquet"), "missing.parquet"))
    check_error(*run_cli("run", f), "missing.parquet", "trace")


def test_truncated_trace(tmp_path):
    data = (ROOT / "traces/olmoe-sample.parquet").read_bytes()
    t = tmp_path / "trunc.parquet"
    t.write_bytes(data[: len(data) // 2])
    f = tmp_path / "s.yaml"
    f.write_text(GOOD.replace(str(ROOT / "traces/olmoe-sample.parquet"), str(t)))
    check_error(*run_cli("run", f), "trunc.parquet")


def test_expert_id_out_of_range_keeps_earlier_results(tmp_path):
    """A bad row deep in the trace fails the run with exit 2; the results of an earlier run in the
    same output directory are untouched."""
    good_trace = write_routing(tmp_path / "good.parquet", np.zeros((2, 4, 4, 1), np.int16), 1, 16)
    routing = np.zeros((2, 4, 4, 1), np.int16)
    routing[1, 3, 2, 0] = 16  # expert id == num_experts
    bad_trace = write_routing(tmp_path / "bad.parquet", routing, 1, 16)
    sc = tmp_path / "s.yaml"
    body = ("model: {name: tiny, num_layers: 4, num_experts: 16, top_k: 1, hidden_size: 64, "
            "expert_intermediate_size: 128, num_heads: 2, num_kv_heads: 2, head_dim: 32}\n"
            "hardware: a100-80gb-pcie4\ncache: {gpu: {capacity_experts: 4}}\n")
    sc.write_text(body + f"trace: {good_trace}\n")
    out = tmp_path / "out"
    code, text = run_cli("run", sc, "-o", out, "--quiet", "--no-why")
    assert code == 0, text
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    sc.write_text(body + f"trace: {bad_trace}\n")
    code, text = run_cli("run", sc, "-o", out, "--quiet")
    check_error(code, text, "bad.parquet", "16")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_trace_generate_bad_args(tmp_path):
    check_error(*run_cli("trace", "generate", "--preset", "nope", "-o", tmp_path / "x.parquet"), "--preset")
    check_error(*run_cli("trace", "generate", "--preset", "mixtral-8x7b", "--requests", "0",
                         "-o", tmp_path / "x.parquet"), "--requests")
