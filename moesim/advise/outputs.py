"""What a search leaves in its directory: trials.parquet, advise.json and recommended.yaml.

    trials.parquet     one row per optuna trial: state, knob values, metrics, why pruned
    advise.json        the recommendation, the default configuration's score, the Pareto set,
                       optuna's parameter importances, counts (trials, simulations, pruned), prices
    recommended.yaml   the recommended configuration as a scenario that `moesim run` takes as is
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pandas as pd
import yaml

from ..config import apply_overrides
from ..errors import InputError
from ..results import dump_json
from ..sweep.spec import override_strings
from .objective import OBJECTIVE_METRIC, better, objective_direction, objective_value, pareto_front
from .prices import price_for
from .search import SearchOutcome
from .spec import AdviseSpec

ADVISE_JSON = "advise.json"
TRIALS = "trials.parquet"
RECOMMENDED = "recommended.yaml"


def trial_rows(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if not t.state.is_finished():
            continue
        m = json.loads(t.user_attrs.get("metrics", "null") or "null") or {}
        rows.append({"trial": t.number, "state": t.state.name.lower(), "default": bool(t.user_attrs.get("default")),
                     "point_id": t.user_attrs.get("point_id"), "reason": t.user_attrs.get("reason"),
                     "config": json.loads(t.user_attrs.get("config", "{}")), **m})
    return rows


def _importances(study, spec: AdviseSpec) -> dict[str, float]:
    """optuna's PED-ANOVA importances of the knobs for the objective ({} when too few trials)."""
    import optuna

    sign = 1.0 if objective_direction(spec) == "minimize" else -1.0  # PED-ANOVA looks for low targets

    def target(t):
        return sign * objective_value(json.loads(t.user_attrs["metrics"]), spec)

    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if len(done) < 2:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "importances ... for low target": the sign above
            imp = optuna.importance.get_param_importances(
                study, target=target, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
    except (RuntimeError, ValueError):
        return {}
    return {k: float(v) for k, v in imp.items()}


def _pick(rows: list[dict], spec: AdviseSpec) -> dict | None:
    """The best objective; among equals the lowest TPOT, then the earliest trial."""
    best = None
    for r in rows:
        if best is None or better(objective_value(r, spec), objective_value(best, spec), spec) or (
                objective_value(r, spec) == objective_value(best, spec) and (r["tpot_ms"] or 0) < (best["tpot_ms"] or 0)):
            best = r
    return best


def _summary_of(r: dict | None, spec: AdviseSpec) -> dict | None:
    if r is None:
        return None
    keys = ["tokens_per_s", "tokens_per_dollar", "cost_per_hour", "price_per_hour", "tpot_ms", "ttft_ms",
            "gpu_hit_rate", "stall_fraction", "slo_ok", "replicas"]
    return {"trial": r["trial"], "point_id": r["point_id"], "config": r["config"],
            "objective": objective_value(r, spec), **{k: r.get(k) for k in keys if k in r}}


def write_recommended(outcome: SearchOutcome, config: dict, outdir: Path, spec: AdviseSpec) -> Path:
    """The configuration as a standalone scenario (trace path relative to this file)."""
    sp = outcome.space
    data = apply_overrides(sp.base(), override_strings(sp.overrides(config)))
    data["name"] = f"{spec.name}-recommended"
    if isinstance(data.get("trace"), str):
        data["trace"] = os.path.relpath(data["trace"], outdir.resolve())
    head = (f"# moesim advise {spec.name}: the configuration with the best {spec.objective} that meets the SLO\n"
            f"# run it:  moesim run {outdir / RECOMMENDED}\n")
    p = outdir / RECOMMENDED
    p.write_text(head + yaml.safe_dump(data, sort_keys=False))
    return p


def _front(feasible: list[dict], spec: AdviseSpec) -> list[dict]:
    """The Pareto set, one row per distinct point, by the first Pareto metric."""
    front, seen = [], set()
    for i in pareto_front(feasible, spec.search.pareto):
        key = tuple(feasible[i][k] for k in spec.search.pareto)
        if key not in seen:
            seen.add(key)
            front.append(feasible[i])
    return sorted(front, key=lambda r: r[spec.search.pareto[0]])


def _per_hardware(unique: list[dict], spec: AdviseSpec) -> dict:
    """Per candidate GPU: configurations simulated, the best that met the SLO, the lowest TPOT."""
    out = {}
    for c in spec.hardware:
        mine = [r for r in unique if r["config"].get("hardware", spec.hardware[0].profile) == c.profile]
        ok = _pick([r for r in mine if r.get("slo_ok")], spec)
        fastest = min((r for r in mine if r.get("tpot_ms") is not None), key=lambda r: r["tpot_ms"], default=None)
        out[c.profile] = {"simulated": len(mine), "best": _summary_of(ok, spec),
                          "lowest_tpot_ms": fastest and fastest["tpot_ms"]}
    return out


def _prices(spec: AdviseSpec) -> dict:
    out = {}
    for c in spec.hardware:
        try:
            out[c.profile] = dict(zip(("price_per_hour", "source"), price_for(c.profile, c.price_per_hour)))
        except InputError:
            out[c.profile] = None
    return out


def write_outputs(outcome: SearchOutcome, spec: AdviseSpec, outdir: str | Path) -> dict:
    out = Path(outdir)
    rows = trial_rows(outcome.study)
    frame = pd.DataFrame([{**{k: v for k, v in r.items() if k not in ("config", "slo_excess")},
                           **{f"knob:{k}": json.dumps(v) if isinstance(v, (dict, list)) else str(v)
                              for k, v in r["config"].items()}} for r in rows])
    frame.to_parquet(out / TRIALS, index=False)
    complete = [r for r in rows if r["state"] == "complete"]
    firsts: dict[str, dict] = {}
    for r in complete:  # a configuration asked again is the same point: keep its first trial
        firsts.setdefault(r["point_id"], r)
    unique = list(firsts.values())
    feasible = [r for r in unique if r.get("slo_ok")]
    best = _pick(feasible, spec)
    default = next((r for r in rows if r["default"]), None)
    front = _front(feasible, spec)
    per_hw = _per_hardware(unique, spec)
    prices = _prices(spec)
    doc = {"name": spec.name, "objective": spec.objective, "objective_metric": OBJECTIVE_METRIC[spec.objective],
           "target_tokens_per_s": spec.target_tokens_per_s, "slo": spec.slo.model_dump(),
           "sampler": spec.search.sampler, "space": {k.path: list(k.values) for k in outcome.space.knobs},
           "space_size": outcome.space.size, "trials": len(rows),
           "simulations": len({r["point_id"] for r in rows if r["state"] in ("complete", "fail")}),
           "simulated_this_run": len(outcome.simulated),
           "pruned": sum(r["state"] == "pruned" for r in rows), "failed": sum(r["state"] == "fail" for r in rows),
           "feasible": len(feasible), "best": _summary_of(best, spec),
           "default": _summary_of(default, spec) if default and default["state"] == "complete" else None,
           "default_state": default and {"state": default["state"], "reason": default["reason"],
                                         "config": default["config"]},
           "pareto_metrics": spec.search.pareto, "pareto": [_summary_of(r, spec) for r in front],
           "per_hardware": per_hw, "importances": _importances(outcome.study, spec), "prices": prices}
    if best is not None:
        doc["recommended"] = str(write_recommended(outcome, best["config"], out, spec).name)
    (out / ADVISE_JSON).write_text(dump_json(doc))
    return doc
