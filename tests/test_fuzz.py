"""Fuzzing the two doors bad input comes through: the scenario loader and the trace reader.
Any input gives a result or an InputError (exit 2 with a message) — never another exception.
The `slow` variants run many more examples: `pytest -m slow`."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.config import load_scenario
from moesim.errors import InputError
from moesim.traces.io import TraceReader, check_against_model
from moesim.models import get_preset

ROOT = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((ROOT / "scenarios/oracle-ssd.yaml").read_text())
BASE["trace"] = str(ROOT / "traces/switch-sample.parquet")
BASE["model"] = "switch-base-128"
PATHS = ["name", "seed", "model", "hardware", "trace", "cache", "cache.gpu", "cache.gpu.capacity_gb",
         "cache.gpu.policy", "cache.gpu.partition", "cache.dram", "cache.dram.capacity_gb", "predictor",
         "predictor.name", "predictor.lookahead_layers", "batch", "batch.size", "batch.dedup", "output",
         "model.num_layers", "hardware.gpu.memory_gb", "unknown_key", "cache.gpu.extra"]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                   st.lists(st.integers(-3, 3), max_size=3),
                   st.dictionaries(st.sampled_from(["name", "preset", "capacity_experts", "x"]),
                                   st.one_of(st.integers(-5, 500), st.text(max_size=6)), max_size=3),
                   st.sampled_from(["lru", "belady", "oracle", "on_demand", "per_layer", "olmoe-1b-7b",
                                    "rtx4090-pcie4", "nope", "-1", "1e400"]))


def _mutate(data, path, value, delete):
    node = data
    parts = path.split(".")
    for p in parts[:-1]:
        if not isinstance(node, dict) or not isinstance(node.get(p), dict):
            return
        node = node[p]
    if not isinstance(node, dict):
        return
    if delete:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value


def _check_scenario(tmp_path, edits):
    data = copy.deepcopy(BASE)
    for path, value, delete in edits:
        _mutate(data, path, value, delete)
    f = tmp_path / "fuzz.yaml"
    try:
        f.write_text(yaml.safe_dump(data, allow_unicode=True))
    except yaml.YAMLError:
        return
    try:
        load_scenario(f)
    except InputError as e:
        assert str(e).startswith(str(f)) or "hardware" in str(e) or "no hardware profile" in str(e)


EDITS = st.lists(st.tuples(st.sampled_from(PATHS), VALUES, st.booleans()), min_size=1, max_size=4)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(EDITS)
def test_scenario_loader_gives_scenario_or_input_error(tmp_path, edits):
    _check_scenario(tmp_path, edits)


@pytest.mark.slow
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(EDITS)
def test_scenario_loader_fuzz_long(tmp_path, edits):
    _check_scenario(tmp_path, edits)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_random_bytes_as_scenario(tmp_path, blob):
    f = tmp_path / "blob.yaml"
    f.write_bytes(blob)
    try:
        load_scenario(f)
    except InputError:
        pass


SAMPLE = (ROOT / "traces/switch-sample.parquet").read_bytes()


def _read_all(path):
    r = TraceReader(path)
    check_against_model(r.meta, get_preset("switch-base-128"), str(path))
    for req in r.iter_requests():
        assert req.experts.shape[1:] == (12, 1)
        assert int(req.experts.max()) < 128 and int(req.experts.min()) >= 0


def _check_trace(tmp_path, cut, flips):
    data = bytearray(SAMPLE[:cut])
    for pos, val in flips:
        if data:
            data[pos % len(data)] = val
    f = tmp_path / "fuzz.parquet"
    f.write_bytes(bytes(data))
    try:
        _read_all(f)
    except InputError as e:
        assert str(f) in str(e)


TRACE_EDITS = (st.integers(0, len(SAMPLE)), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                     max_size=8))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(*TRACE_EDITS)
def test_damaged_trace_gives_input_error_or_valid_data(tmp_path, cut, flips):
    _check_trace(tmp_path, cut, flips)


@pytest.mark.slow
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(*TRACE_EDITS)
def test_damaged_trace_fuzz_long(tmp_path, cut, flips):
    _check_trace(tmp_path, cut, flips)


# ---- the classes issue 14 added: output paths, empty and cut traces, oversized fields, alias bombs ----

SEGMENTS = st.sampled_from(["new", "file", "dir", "foreign", ".", "/proc", "x" * 300, "a\x00b", "a\nb",
                            "ü", "reports", "summary.json"])


def _check_output_path(tmp_path, segments):
    from moesim.outdir import claim_run_dir

    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir(exist_ok=True)
    (tmp_path / "foreign").mkdir(exist_ok=True)
    (tmp_path / "foreign" / "mine.txt").write_text("x")
    path = "/".join(segments)
    full = path if path.startswith("/") else f"{tmp_path}/{path}"
    try:
        d = claim_run_dir(full)
    except InputError as e:
        assert "\n" not in str(e) and "-o/--output" in str(e)
    else:
        assert not d.exists() or (d.is_dir() and not [f for f in d.iterdir() if f.name == "mine.txt"])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(SEGMENTS, min_size=1, max_size=4))
def test_output_paths_give_a_directory_or_input_error(tmp_path, segments):
    _check_output_path(tmp_path, segments)


def _check_cut_trace(tmp_path, rows):
    import pyarrow.parquet as pq

    from moesim.engine.run import open_trace

    t = pq.read_table(ROOT / "traces/switch-sample.parquet")
    f = tmp_path / "cut.parquet"
    pq.write_table(t.slice(0, rows), f)
    data = {**BASE, "trace": str(f), "predictor": {"name": "on_demand"}}
    s = tmp_path / "cut.yaml"
    s.write_text(yaml.safe_dump(data))
    try:
        reader = open_trace(load_scenario(s), tmp_path)
        assert reader.num_rows == rows > 0
    except InputError as e:
        assert str(f) in str(e)
        if rows == 0:
            assert "no rows" in str(e)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.just(0), st.integers(1, 12 * 130)))
def test_empty_and_cut_traces_open_or_give_input_error(tmp_path, rows):
    _check_cut_trace(tmp_path, rows)


BIG = st.one_of(st.integers(10**5, 10**19), st.integers(-10**19, -1))
SIZE_FIELDS = ["trace.synthetic.requests", "trace.synthetic.prompt_len", "trace.synthetic.decode_len",
               "batch.size", "batch.max_batch_size", "cache.gpu.capacity_experts", "seed",
               "predictor.lookahead_layers", "model.num_layers", "model.num_experts", "model.hidden_size"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(SIZE_FIELDS), BIG), min_size=1, max_size=3))
def test_oversized_fields_are_refused_before_allocating(tmp_path, monkeypatch, edits):
    """Huge numbers anywhere: a loaded scenario whose trace opens within a small memory limit, or an
    InputError — never a MemoryError, an overflow or a numpy traceback."""
    from moesim.engine.run import open_trace

    monkeypatch.setenv("MOESIM_MEMORY_LIMIT_GB", "0.05")   # what passes is small enough to generate
    data = {**copy.deepcopy(BASE), "trace": {"synthetic": {"requests": 2, "prompt_len": 4, "decode_len": 4}}}
    f = tmp_path / "big.yaml"
    f.write_text(yaml.safe_dump(data))
    try:
        open_trace(load_scenario(f, [f"{k}={v}" for k, v in edits]), tmp_path)
    except InputError:
        pass


def _alias_doc(levels, fan, where):
    parts = [f"&a0 [{', '.join(['x'] * fan)}]"]
    parts += [f"&a{i} [{', '.join([f'*a{i - 1}'] * fan)}]" for i in range(1, levels + 1)]
    bomb = f"[{', '.join(parts)}]"
    return yaml.safe_dump({**BASE, where: "PLACEHOLDER"}).replace("'PLACEHOLDER'", bomb).replace(
        "PLACEHOLDER", bomb)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 9), st.integers(1, 12), st.sampled_from(["name", "seed", "output", "model", "trace"]))
def test_alias_bombs_are_refused_when_they_expand_too_far(tmp_path, levels, fan, where):
    from moesim.yamlsafe import MAX_ALIAS_NODES

    f = tmp_path / "alias.yaml"
    f.write_text(_alias_doc(levels, fan, where))
    sizes = [1 + fan]                                    # a0 and its strings; level i holds fan copies of i-1
    for _ in range(levels):
        sizes.append(1 + fan * sizes[-1])
    extra = sum(sizes) - (1 + fan) - levels              # expanded nodes minus the nodes written
    try:
        load_scenario(f)
    except InputError as e:
        assert len(str(e)) < 500
        assert ("alias bomb" in str(e)) == (extra > MAX_ALIAS_NODES)
