"""`moesim advise`: the optuna search against an exhaustive grid, the recommended scenario against
the default configuration, resuming, pruning bounds, prices and bad input."""
from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from moesim.advise import advise_from_dict, run_search, write_outputs
from moesim.advise.bounds import tokens_per_s_upper_bound, tpot_ms_lower_bound
from moesim.advise.prices import price_for, price_table
from moesim.advise.space import Space
from moesim.cli import main
from moesim.config import apply_overrides, scenario_from_dict
from moesim.engine.run import simulate
from moesim.sweep import get_executor
from moesim.sweep.spec import override_strings

TINY_TRACE = {"synthetic": {"requests": 8, "prompt_len": 8, "decode_len": 8}}
# 4 cache sizes × 4 batch sizes × 3 policies = 48 configurations; the other knobs fixed
SMALL_SPACE = {"cache_fraction": [0.03, 0.06, 0.12, 0.25], "batch.size": [1, 2, 4, 8],
               "cache.gpu.policy": ["lru", "lfu", "fifo"], "cache.gpu.partition": ["global"],
               "predictor": ["on_demand"], "batch.scheduler": ["static"]}


def small(sampler: str, trials: int, **kw) -> dict:
    return {"name": "small", "model": "olmoe-1b-7b", "hardware": ["rtx4090-pcie4"], "trace": TINY_TRACE,
            "slo": {"tpot_ms": 1000}, "search": {"sampler": sampler, "trials": trials, "seed": 0},
            "space": SMALL_SPACE, **kw}


def search(data: dict, out):
    spec = advise_from_dict(data)
    return write_outputs(run_search(spec, out, get_executor("local", workers=1)), spec, out)


def test_tpe_finds_the_grid_best_in_fewer_simulations(tmp_path):
    """Exhaustive grid over the 48 points vs TPE allowed 17 simulations (seed 0): TPE finds the
    grid's best point itself (14 simulations get within 4.4 %, 10 within 17 %)."""
    grid = search(small("grid", 100), tmp_path / "grid")
    assert grid["simulations"] == 48 and grid["space_size"] == 48
    tpe = search(small("tpe", 17), tmp_path / "tpe")
    assert tpe["simulations"] == 17 < grid["simulations"]
    assert tpe["best"]["objective"] >= 0.98 * grid["best"]["objective"]
    # the grid's best really is the best of the 48 simulated points
    assert grid["best"]["objective"] == pytest.approx(max(r["objective"] for r in grid["pareto"]))


def test_recommended_scenario_runs_as_is_and_beats_the_default(tmp_path):
    f = tmp_path / "advise.yaml"
    f.write_text(yaml.safe_dump({**small("tpe", 10), "objective": "tokens_per_dollar"}))
    out = tmp_path / "adv"
    r = CliRunner().invoke(main, ["advise", str(f), "-o", str(out), "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert "recommended:" in r.output
    for name in ("advise.json", "trials.parquet", "recommended.yaml", "report.html", "optuna.journal"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "advise.json").read_text())
    (out / "report.html").unlink()
    r = CliRunner().invoke(main, ["report", str(out)])  # the report is rebuilt from the files
    assert r.exit_code == 0 and (out / "report.html").is_file(), r.output
    r = CliRunner().invoke(main, ["run", str(out / "recommended.yaml"), "-o", str(tmp_path / "rec"), "--quiet",
                                  "--no-report", "--no-why"])
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "rec" / "summary.json").read_text())["tokens_per_s"]
    assert rec == pytest.approx(doc["best"]["tokens_per_s"])
    # the default configuration, simulated apart from the search
    spec = advise_from_dict(small("tpe", 10))
    sp = Space(spec)
    data = apply_overrides(sp.base(), override_strings(sp.overrides(spec.default_config)))
    default = simulate(scenario_from_dict(data)).summary["tokens_per_s"]
    price = price_for("rtx4090-pcie4")[0]
    assert rec * 3600 / price == pytest.approx(doc["best"]["objective"])
    assert rec > 1.1 * default


def test_search_resumes(tmp_path):
    out = tmp_path / "adv"
    first = search(small("tpe", 5), out)
    assert first["simulations"] == 5
    spec = advise_from_dict(small("tpe", 8))
    outcome = run_search(spec, out, get_executor("local", workers=1))
    doc = write_outputs(outcome, spec, out)
    assert doc["simulations"] == 8 and doc["trials"] >= first["trials"]
    assert len(outcome.simulated) == 3  # the first five were not simulated again
    # a trial asked but never told (an interrupted run) is evaluated on the next run
    study = outcome.study
    left = study.ask(outcome.space.distributions())
    again = run_search(spec, out, get_executor("local", workers=1))  # the same budget: nothing new is asked
    assert all(t.state.is_finished() for t in again.study.trials)
    assert len(again.study.trials) == left.number + 1
    # resuming with another SLO would mix two searches' verdicts
    from moesim.errors import InputError

    with pytest.raises(InputError, match="different advise file"):
        run_search(advise_from_dict({**small("tpe", 9), "slo": {"tpot_ms": 500}}), out,
                   get_executor("local", workers=1))


def test_pruned_by_the_slo_bound_without_simulating(tmp_path):
    spec = advise_from_dict(small("tpe", 4))
    sc = scenario_from_dict(apply_overrides(Space(spec).base(), override_strings(
        Space(spec).overrides(spec.default_config))))
    lb = tpot_ms_lower_bound(sc)
    doc = search({**small("tpe", 4), "slo": {"tpot_ms": 0.5 * lb}}, tmp_path / "adv")
    assert doc["pruned"] == doc["trials"] == 20 and doc["simulations"] == 0 and doc["best"] is None
    assert not list((tmp_path / "adv" / "points").iterdir())


@pytest.mark.parametrize("batch,fraction", [(1, 0.03), (4, 0.25), (8, 1.0)])
def test_bounds_hold(batch, fraction):
    """The closed-form bounds the search prunes with never cut off what the simulator reaches."""
    spec = advise_from_dict(small("tpe", 1))
    sp = Space(spec)
    cfg = {**spec.default_config, "batch.size": batch, "cache_fraction": fraction}
    sc = scenario_from_dict(apply_overrides(sp.base(), override_strings(sp.overrides(cfg))))
    res = simulate(sc)
    assert res.summary["tokens_per_s"] <= tokens_per_s_upper_bound(sc)
    assert res.requests["tpot_ms"].min() >= tpot_ms_lower_bound(sc)


def test_prices_are_sourced_and_yours_win():
    for name, row in price_table().items():
        assert row["price_per_hour"] > 0 and row["source"] and row["date"], name
    assert price_for("rtx4090-pcie4", 0.5) == (0.5, "your price")
    assert price_for("a100-80gb-pcie4")[0] == price_table()["a100-80gb-pcie4"]["price_per_hour"]


@pytest.mark.parametrize("change,field", [
    ({"slo": None}, "slo"),
    ({"objective": "fastest"}, "objective"),
    ({"objective": "cost_at_throughput"}, "target_tokens_per_s"),
    ({"hardware": ["t4-pcie3"], "objective": "tokens_per_dollar"}, "hardware[0].price_per_hour"),
    ({"hardware": ["no-such-gpu"]}, "hardware"),
    ({"space": {"batch.size": []}}, "batch.size"),
])
def test_bad_advise_file_is_one_line_and_exit_2(tmp_path, change, field):
    data = {**small("tpe", 2), **change}
    data = {k: v for k, v in data.items() if v is not None}
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(data))
    r = CliRunner().invoke(main, ["advise", str(f), "-o", str(tmp_path / "o"), "--workers", "1"])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and field in r.output and r.output.startswith("error:")


def test_on_the_ray_executor_the_answer_is_the_same(tmp_path, monkeypatch):
    """Points go through the Ray executor's driver (Ray's API faked in-process, as in test_sweep)."""
    import sys

    from tests.test_sweep import _FakeRay

    local = search(small("tpe", 6), tmp_path / "local")
    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    spec = advise_from_dict(small("tpe", 6))
    doc = write_outputs(run_search(spec, tmp_path / "ray", get_executor("ray", workers=2, address="auto")),
                        spec, tmp_path / "ray")
    assert fake.address == "auto" and fake.max_in_flight == 2
    assert doc["simulations"] == 6 and doc["best"]["objective"] > 0
    pid = local["default"]["point_id"]  # the default configuration, simulated by both
    assert doc["default"]["point_id"] == pid
    assert (tmp_path / "ray" / "points" / pid / "summary.json").read_bytes() == \
        (tmp_path / "local" / "points" / pid / "summary.json").read_bytes()


def test_nsga2_and_cost_at_throughput(tmp_path):
    data = {**small("nsga2", 6), "objective": "cost_at_throughput", "target_tokens_per_s": 100,
            "hardware": ["rtx4090-pcie4", {"profile": "a100-80gb-pcie4", "price_per_hour": 0.5}]}
    data["search"]["pareto"] = ["cost_per_hour", "tpot_ms"]
    doc = search(data, tmp_path / "adv")
    assert doc["simulations"] == 6 and doc["prices"]["a100-80gb-pcie4"]["source"] == "your price"
    best = doc["best"]
    assert best["cost_per_hour"] == best["replicas"] * best["price_per_hour"]
    assert best["replicas"] * best["tokens_per_s"] >= 100 > (best["replicas"] - 1) * best["tokens_per_s"]
    costs = [r["cost_per_hour"] for r in doc["pareto"]]
    assert min(costs) == best["cost_per_hour"]


def test_defaults_need_only_a_model_a_gpu_and_an_slo():
    spec = advise_from_dict({"model": "olmoe-1b-7b", "hardware": "rtx4090-pcie4", "slo": {"tpot_ms": 200}})
    sp = Space(spec)
    assert sp.base()["trace"].endswith("traces/olmoe-sample.parquet")
    assert spec.search.sampler == "tpe" and spec.search.trials == 24 and sp.size == 720
    sc = scenario_from_dict(apply_overrides(sp.base(), override_strings(sp.overrides(spec.default_config))))
    assert sc.cache.gpu.capacity_experts == sp.cache_experts(sp.profile("rtx4090-pcie4"), 1.0, False)
    # a model without a shipped sample gets a small synthetic trace of its own preset
    mixtral = Space(advise_from_dict({"model": "mixtral-8x7b", "hardware": "a100-80gb-pcie4", "slo": {"tpot_ms": 1}}))
    assert mixtral.base()["trace"] == {"synthetic": {"requests": 8, "prompt_len": 32, "decode_len": 32}}


def test_precision_knob_sizes_the_cache_in_its_own_experts():
    """`model.bytes_per_param` in the space: a 4-bit Mixtral fits four times the experts of bf16."""
    spec = advise_from_dict({"model": "mixtral-8x7b", "hardware": "rtx4090-pcie4", "slo": {"tpot_ms": 1000},
                             "space": {"model.bytes_per_param": [2, 0.5]}})
    sp = Space(spec)
    cfg = dict(spec.default_config)
    n = {}
    for bpp in (2, 0.5):
        ov = sp.overrides({**cfg, "model.bytes_per_param": bpp})
        sc = scenario_from_dict(apply_overrides(sp.base(), override_strings(ov)))
        n[bpp] = sc.cache.gpu.capacity_experts
        assert sc.model.bytes_per_param == bpp
        assert n[bpp] * sc.model.expert_bytes + sc.model.resident_bytes <= sc.hardware.gpu.memory_gb * 1e9
    assert n[0.5] >= 4 * n[2]
