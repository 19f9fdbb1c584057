"""benchmarks/published: every scenario and points file loads, every point is sourced, and the
fit/hold-out design holds (one fitted point per GPU/stack, one whole source never fitted per stack)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from moesim.config import load_scenario

PUB = Path(__file__).resolve().parents[1] / "benchmarks" / "published"
POINTS = sorted(PUB.glob("*.points.yaml"))
SCENARIOS = sorted((PUB / "scenarios").glob("*.yaml"))


def _spec(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _all_points() -> list[tuple[Path, dict]]:
    return [(pf, p) for pf in POINTS for p in _spec(pf)["points"]]


def _overrides(point: dict) -> list[str]:
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in (point.get("set") or {}).items()]


def _source_name(point: dict) -> str:
    """The publication a point comes from: its source up to the first comma or parenthesis."""
    return point["source"].split(",")[0].split(" (")[0]


def test_something_is_published():
    assert len(POINTS) >= 2 and len(SCENARIOS) >= 3


def test_three_published_sources():
    """Issue 15 item 5: at least three published sources, every one on a named GPU."""
    assert len({_source_name(p) for _, p in _all_points()}) >= 3


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_scenario_loads(path):
    sc = load_scenario(path)
    assert sc.batch.size == 1  # every published point here is a batch-1 decode


@pytest.mark.parametrize("path", POINTS, ids=lambda p: p.stem)
def test_points_file_shape(path):
    spec = _spec(path)
    assert set(spec) == {"name", "base_runtime", "free", "points"}
    assert spec["name"] == path.name.removesuffix(".points.yaml")
    names = [p["name"] for p in spec["points"]]
    assert len(names) == len(set(names)), "point names repeat"
    for bounds in (spec["free"] or {}).values():
        lo, hi = bounds
        assert 0 <= lo < hi


@pytest.mark.parametrize("path", POINTS, ids=lambda p: p.stem)
def test_each_point_names_a_source_a_group_and_one_measurement(path):
    for p in _spec(path)["points"]:
        measurement = "tpot_ms" if "tpot_ms" in p else "tokens_per_s"
        optional = {"throughput"} if measurement == "tokens_per_s" else set()
        assert {"name", "scenario", "set", "source", "group", "holdout", measurement} <= set(p), p["name"]
        assert set(p) - {"name", "scenario", "set", "source", "group", "holdout", measurement} <= optional, p["name"]
        assert len(p["source"]) > 40 and any(w in p["source"] for w in ("Table", "table")), p["name"]
        assert p["group"] and isinstance(p["holdout"], bool)
        value = p.get("tpot_ms", p.get("tokens_per_s"))
        assert isinstance(value, (int, float)) and value > 0
        assert (path.parent / p["scenario"]).is_file(), p["scenario"]


MULTI_MODEL = {"moeinfinity-a5000-4pt.points"}  # files allowed one fitted point per model on a GPU (see below)


@pytest.mark.parametrize("path", POINTS, ids=lambda p: p.stem)
def test_one_fitted_point_per_gpu_stack(path):
    """Every file fits something, never more points than one per GPU/stack, and frees at most as
    many runtime fields as it fits points; a file fitting on one point is one GPU. The one named
    exception, moeinfinity-a5000-4pt, fits two host terms of one stack on three models of one GPU
    (one point each), because one cell cannot separate a per-layer from a per-expert cost."""
    spec = _spec(path)
    fitted = [p for p in spec["points"] if not p["holdout"]]
    assert fitted and 1 <= len(spec["free"]) <= len(fitted)
    scs = [load_scenario(path.parent / p["scenario"]) for p in fitted]
    cells = [(sc.hardware.name, sc.model.name) if path.stem in MULTI_MODEL else sc.hardware.name for sc in scs]
    assert len(cells) == len(set(cells)), "two fitted points on one GPU"
    if len(fitted) == 1:
        assert len({load_scenario(path.parent / p["scenario"]).hardware.name for p in spec["points"]}) == 1


def test_fitted_points_are_the_same_cells_everywhere():
    """A point fitted in two files is the same published cell with the same scenario and overrides."""
    seen = {}
    for _, p in _all_points():
        if not p["holdout"]:
            key = {k: v for k, v in p.items() if k != "group"}
            assert seen.setdefault(p["name"], key) == key, p["name"]


def _stack(path: Path) -> str:
    """The software stack a points file calibrates: its base runtime."""
    return str(_spec(path)["base_runtime"])


def _sources_by_stack() -> dict[str, dict[str, list[bool]]]:
    """stack -> source -> the holdout flags of its points in that stack's files."""
    by_stack: dict = defaultdict(lambda: defaultdict(list))
    for pf, p in _all_points():
        by_stack[_stack(pf)][_source_name(p)].append(p["holdout"])
    return by_stack


def test_exactly_one_whole_source_is_held_out_per_stack():
    """The hold-out checks a stack (a base runtime), not a publication: a stack fitted on several
    sources keeps exactly one of them out of every fit; every stack fits something and predicts
    something. A source held out whole from one stack may be fitted by another stack's own file."""
    by_stack = _sources_by_stack()
    several = {st: srcs for st, srcs in by_stack.items() if len(srcs) > 1}
    assert several, "no stack is checked on a source it was never fitted on"
    for st, srcs in several.items():
        held_out = [s for s, flags in srcs.items() if all(flags)]
        assert len(held_out) == 1, (st, list(srcs))
    for st, srcs in by_stack.items():
        flags = [f for fl in srcs.values() for f in fl]
        assert any(flags) and not all(flags), st
    assert len({s for srcs in by_stack.values() for s in srcs}) >= 3


def test_the_mixtral_offloading_stack_never_fits_the_moe_infinity_readme():
    """The held-out design of README "Results": every MoE-Infinity README cell stays out of the
    pytorch-offload-loop fits, even though moeinfinity-a5000 fits one of them for MoE-Infinity."""
    seen = 0
    for pf, p in _all_points():
        if _source_name(p) == "MoE-Infinity README" and _stack(pf) == "pytorch-offload-loop":
            assert p["holdout"], (pf.name, p["name"])
            seen += 1
    assert seen >= 3
    assert {_stack(pf) for pf, p in _all_points() if _source_name(p) == "MoE-Infinity README"} >= \
        {"pytorch-offload-loop", "moe-infinity"}


def test_three_named_gpus_and_a_prefetch_ablation():
    gpus = set()
    ablation = False
    for pf in POINTS:
        pts = _spec(pf)["points"]
        for p in pts:
            gpus.add(load_scenario(pf.parent / p["scenario"]).hardware.gpu.name)
        preds = {(p["set"] or {}).get("predictor.name", "on_demand") for p in pts}
        ablation |= "on_demand" in preds and len(preds) > 1
    assert len(gpus) >= 3
    assert ablation, "no file has the same setting with and without prefetching"


@pytest.mark.parametrize("path", POINTS, ids=lambda p: p.stem)
def test_every_point_loads_with_its_overrides(path):
    for p in _spec(path)["points"]:
        sc = load_scenario(path.parent / p["scenario"], _overrides(p))
        for key, value in (p["set"] or {}).items():
            node = sc
            for part in key.split("."):
                if isinstance(node, dict):
                    node = node[part]
                elif part not in type(node).model_fields and hasattr(node, "params"):
                    node = node.params[part]
                else:
                    node = getattr(node, part)
            assert node == value, f"{p['name']}: {key}"


def test_each_group_has_at_most_one_fitted_cell():
    """A group is one source on one GPU within a stack: at most one cell of it is fitted; in a
    stack fitted on several sources exactly one group (the held-out source's) has none."""
    fitted, groups = defaultdict(set), defaultdict(set)
    for pf, p in _all_points():
        groups[_stack(pf)].add(p["group"])
        if not p["holdout"]:
            fitted[(_stack(pf), p["group"])].add(p["name"])
    several = {st for st, srcs in _sources_by_stack().items() if len(srcs) > 1}
    for st, gs in groups.items():
        assert all(len(fitted[(st, g)]) <= 1 for g in gs), st
        if st in several:
            assert sorted(len(fitted[(st, g)]) for g in gs).count(0) == 1, st


@pytest.mark.parametrize("path", POINTS, ids=lambda p: p.stem)
def test_points_file_loads_as_calibrate_reads_it(path):
    """`moesim calibrate`'s own loader accepts the file (measurement kinds, throughput, free fields)."""
    from moesim.calibrate import load_points

    spec, points = load_points(path)
    assert [p.spec.name for p in points] == [p["name"] for p in _spec(path)["points"]]


def test_end_to_end_points_run_one_batch_at_once():
    """An end-to-end tokens/s (prefill included, one generate() call of `batch` prompts) is
    compared with moesim's output tokens / makespan, so the trace must be exactly one batch."""
    seen = 0
    for pf, p in _all_points():
        if p.get("throughput") == "end_to_end":
            sc = load_scenario(pf.parent / p["scenario"], _overrides(p))
            assert sc.trace.synthetic.requests == sc.batch.size, p["name"]
            seen += 1
    assert seen


def test_end_to_end_points_match_their_csv_row():
    """Each end-to-end point simulates the run its quoted CSV row describes: `input_token` prompt
    tokens, `batch_size` prompts, and `output_token` new tokens from generate(), i.e. the prefill's
    token plus output_token - 1 decode steps (moesim's output tokens are decode_len + 1)."""
    import re

    seen = 0
    for pf, p in _all_points():
        if p.get("throughput") != "end_to_end":
            continue
        row = re.search(r"table row '([^']*)'", p["source"]).group(1)
        inp, out, batch = (int(x) for x in row.split(",")[:3])
        sc = load_scenario(pf.parent / p["scenario"], _overrides(p))
        syn = sc.trace.synthetic
        assert (syn.prompt_len, syn.decode_len + 1, sc.batch.size) == (inp, out, batch), p["name"]
        seen += 1
    assert seen >= 10
