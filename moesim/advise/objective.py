"""What a configuration scores: throughput, price, latency at the SLO percentile, and the objective."""
from __future__ import annotations

import math

from .spec import AdviseSpec

# metric -> optuna direction
DIRECTIONS = {"tokens_per_s": "maximize", "tokens_per_dollar": "maximize", "cost_per_hour": "minimize",
              "tpot_ms": "minimize", "ttft_ms": "minimize", "price_per_hour": "minimize"}
OBJECTIVE_METRIC = {"tokens_per_s": "tokens_per_s", "tokens_per_dollar": "tokens_per_dollar",
                    "cost_at_throughput": "cost_per_hour"}


def metrics(summary: dict, spec: AdviseSpec, price_per_hour: float | None) -> dict:
    """The scored numbers of one run's summary.json (latencies at the SLO's percentile; the dollar
    figures are None without a price)."""
    pct = spec.slo.percentile
    tps = summary.get("tokens_per_s") or 0.0
    out = {"tokens_per_s": tps, "price_per_hour": price_per_hour,
           "tokens_per_dollar": tps * 3600 / price_per_hour if price_per_hour else None,
           "tpot_ms": (summary.get("tpot_ms") or {}).get(pct), "ttft_ms": (summary.get("ttft_ms") or {}).get(pct),
           "gpu_hit_rate": summary.get("gpu_hit_rate"), "stall_fraction": summary.get("stall_fraction")}
    if spec.target_tokens_per_s is not None and price_per_hour:
        replicas = math.ceil(spec.target_tokens_per_s / tps) if tps > 0 else None
        out["replicas"] = replicas
        out["cost_per_hour"] = replicas * price_per_hour if replicas else math.inf
    else:
        out["cost_per_hour"] = price_per_hour
    out["slo_excess"] = slo_excess(out, spec)
    out["slo_ok"] = all(x <= 0 for x in out["slo_excess"])
    return out


def slo_excess(m: dict, spec: AdviseSpec) -> list[float]:
    """Relative excess over each SLO target (<= 0 when met): optuna's constraint values."""
    out = []
    for key, target in (("tpot_ms", spec.slo.tpot_ms), ("ttft_ms", spec.slo.ttft_ms)):
        if target is not None:
            got = m.get(key)
            out.append(0.0 if got is None else got / target - 1.0)
    return out


def objective_value(m: dict, spec: AdviseSpec) -> float:
    return m[OBJECTIVE_METRIC[spec.objective]]


def objective_direction(spec: AdviseSpec) -> str:
    return DIRECTIONS[OBJECTIVE_METRIC[spec.objective]]


def better(a: float, b: float, spec: AdviseSpec) -> bool:
    """Is objective value `a` better than `b`?"""
    return a > b if objective_direction(spec) == "maximize" else a < b


def pareto_front(rows: list[dict], keys: list[str]) -> list[int]:
    """Indices of the rows no other row dominates on `keys` (each in its DIRECTIONS sense)."""
    sign = {k: (1 if DIRECTIONS[k] == "maximize" else -1) for k in keys}

    def vec(r):
        return [sign[k] * r[k] for k in keys]

    vs = [vec(r) for r in rows]
    front = []
    for i, v in enumerate(vs):
        dominated = any(all(a >= b for a, b in zip(w, v)) and any(a > b for a, b in zip(w, v))
                        for j, w in enumerate(vs) if j != i)
        if not dominated:
            front.append(i)
    return front
