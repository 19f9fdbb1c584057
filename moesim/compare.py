"""`moesim compare SIM_DIR REAL_DIR`: how far a simulation is from a real run of the same scenario.

Reads only result files (summary.json, steps.parquet). Errors are relative: (sim - real) / real,
so +10% means the simulator predicts 10% more (time) than was measured.

* totals: makespan, tokens/s, TPOT, TTFT, end-to-end latency, decode step time, stall, compute,
  hits/misses, bytes moved;
* per step: a step's time is from the end of the previous step's last layer to the end of its own
  (so it includes its dense blocks and the previous step's LM head; steps add up to the makespan);
* per layer: mean over steps of the layer's time, attention, expert compute and stall, by phase.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError
from .results import read_summary

TOTALS = [
    ("makespan_s", "makespan (s)"),
    ("tokens_per_s", "tokens/s"),
    ("tpot_ms.mean", "TPOT mean (ms)"),
    ("tpot_ms.p50", "TPOT p50 (ms)"),
    ("tpot_ms.p90", "TPOT p90 (ms)"),
    ("ttft_ms.mean", "TTFT mean (ms)"),
    ("e2e_ms.mean", "end-to-end mean (ms)"),
    ("decode_step_ms.mean", "decode step mean (ms)"),
    ("decode_step_ms.p50", "decode step p50 (ms)"),
    ("stall_s", "stall (s)"),
    ("compute_s", "compute (s)"),
    ("hits", "cache hits"),
    ("late_hits", "late hits"),
    ("misses", "misses"),
    ("dram_hit_rate", "DRAM hit rate"),
    ("bytes_pcie", "bytes over the link"),
    ("bytes_disk", "bytes from disk"),
    ("prefetch.issued", "prefetches issued"),
    ("prefetch.late", "late prefetches"),
]
SAME_SCENARIO = ("model", "cache", "predictor", "batch", "seed", "trace")


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def rel_err(sim, real) -> float | None:
    if sim is None or real is None:
        return None
    try:
        sim, real = float(sim), float(real)
    except (TypeError, ValueError):
        return None
    if real == 0:
        return 0.0 if sim == 0 else None
    return (sim - real) / real


def _read(d: Path) -> tuple[dict, pd.DataFrame]:
    if not d.is_dir():
        raise InputError("not a directory", file=str(d))
    s = read_summary(d)
    try:
        steps = pd.read_parquet(d / "steps.parquet")
    except FileNotFoundError:
        raise InputError("no steps.parquet", file=str(d)) from None
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds
        raise InputError(f"unreadable Parquet file: {e}", file=str(d / "steps.parquet")) from None
    return s, steps


def step_times(steps: pd.DataFrame, makespan: float) -> pd.DataFrame:
    """One row per step: phase, batch, tokens, start and end (s), time (ms)."""
    g = steps.groupby("step", sort=True)
    out = pd.DataFrame({"phase": g["phase"].first().astype(str), "batch": g["batch"].first(),
                        "tokens": g["tokens"].first(), "layers_end_s": g["end_s"].max()})
    ends = out["layers_end_s"].to_numpy()
    begins = np.r_[0.0, ends[:-1]]
    if len(ends):
        ends = ends.copy()
        ends[-1] = max(ends[-1], makespan)
    out["begin_s"] = begins
    out["end_s"] = ends
    out["ms"] = (ends - begins) * 1e3
    return out.drop(columns="layers_end_s")


def _layer_table(steps: pd.DataFrame) -> pd.DataFrame:
    st = steps.assign(layer_ms=(steps["end_s"] - steps["start_s"]) * 1e3, attention_ms=steps["attention_s"] * 1e3,
                      compute_ms=steps["compute_s"] * 1e3, stall_ms=steps["stall_s"] * 1e3,
                      phase=steps["phase"].astype(str))
    return st.groupby(["phase", "layer"])[["layer_ms", "attention_ms", "compute_ms", "stall_ms"]].mean()


def compare_dirs(sim_dir, real_dir) -> dict:
    sim_dir, real_dir = Path(sim_dir), Path(real_dir)
    s_sum, s_steps = _read(sim_dir)
    r_sum, r_steps = _read(real_dir)
    warnings = []
    for k in SAME_SCENARIO:
        a, b = _get(s_sum, f"scenario.{k}"), _get(r_sum, f"scenario.{k}")
        if a != b:
            warnings.append(f"scenario.{k} differs between the two runs")
    totals = []
    for key, label in TOTALS:
        a, b = _get(s_sum, key), _get(r_sum, key)
        totals.append({"metric": key, "label": label, "sim": a, "real": b, "error": rel_err(a, b)})
    # per step
    a = step_times(s_steps, float(s_sum["makespan_s"]))
    b = step_times(r_steps, float(r_sum["makespan_s"]))
    if len(a) != len(b):
        warnings.append(f"step counts differ: {len(a)} simulated, {len(b)} real (compared where both have a step)")
    j = pd.merge(a[["phase", "batch", "tokens", "ms"]], b[["ms"]], left_index=True, right_index=True, how="inner",
                 suffixes=("_sim", "_real"))
    j = j.rename(columns={"ms_sim": "sim_ms", "ms_real": "real_ms"})
    j["error"] = np.where(j["real_ms"] > 0, (j["sim_ms"] - j["real_ms"]) / j["real_ms"], np.nan)
    j = j.reset_index()

    def err_stats(df) -> dict:
        e = df["error"].abs().dropna()
        if not len(e):
            return {"steps": 0}
        return {"steps": len(e), "sim_ms": float(df["sim_ms"].sum()), "real_ms": float(df["real_ms"].sum()),
                "total_error": rel_err(df["sim_ms"].sum(), df["real_ms"].sum()),
                "mean_abs_error": float(e.mean()), "median_abs_error": float(e.median()),
                "p90_abs_error": float(np.percentile(e, 90)), "max_abs_error": float(e.max()),
                "mean_error": float(df["error"].mean())}
    per_step = {"all": err_stats(j), **{ph: err_stats(j[j["phase"] == ph]) for ph in ("prefill", "decode")}}
    # per layer
    la, lb = _layer_table(s_steps), _layer_table(r_steps)
    lj = pd.merge(la, lb, left_index=True, right_index=True, how="inner", suffixes=("_sim", "_real")).reset_index()
    layers = []
    for _, row in lj.iterrows():
        d = {"phase": row["phase"], "layer": int(row["layer"])}
        for c in ("layer_ms", "attention_ms", "compute_ms", "stall_ms"):
            d[f"{c}_sim"], d[f"{c}_real"] = float(row[f"{c}_sim"]), float(row[f"{c}_real"])
            d[f"{c}_error"] = rel_err(row[f"{c}_sim"], row[f"{c}_real"])
        layers.append(d)
    comp = {}
    for ph in ("prefill", "decode"):
        sa = s_steps[s_steps["phase"].astype(str) == ph]
        sb = r_steps[r_steps["phase"].astype(str) == ph]
        comp[ph] = {c: {"sim_s": float(sa[c].sum()), "real_s": float(sb[c].sum()),
                        "error": rel_err(sa[c].sum(), sb[c].sum())}
                    for c in ("attention_s", "compute_s", "stall_s")}
    return {"sim_dir": str(sim_dir), "real_dir": str(real_dir),
            "scenario": _get(r_sum, "scenario.name"), "model": _get(r_sum, "scenario.model.name"),
            "predictor": _get(r_sum, "scenario.predictor.name"), "batch": _get(r_sum, "scenario.batch.size"),
            "cache_experts": r_sum.get("gpu_cache_experts"), "sim_mode": s_sum.get("mode", "simulated"),
            "real_mode": r_sum.get("mode", "simulated"), "warnings": warnings, "totals": totals,
            "per_step": per_step, "components": comp, "per_layer": layers, "steps": j}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        return f"{v:.4g}"
    return str(v)


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:+.1f}%"


def markdown(cmp: dict) -> str:
    L = [(f"# compare: {cmp['scenario']} ({cmp['model']}, {cmp['predictor']}, batch {cmp['batch']}, "
         f"cache {cmp['cache_experts']} experts)"), "",
         (f"simulated: `{cmp['sim_dir']}` ({cmp['sim_mode']}); real: `{cmp['real_dir']}` ({cmp['real_mode']}). "
         "Error = (sim - real) / real."), ""]
    for w in cmp["warnings"]:
        L.append(f"**warning:** {w}  ")
    L += ["", "| metric | simulated | real | error |", "|---|---:|---:|---:|"]
    for t in cmp["totals"]:
        L.append(f"| {t['label']} | {_fmt(t['sim'])} | {_fmt(t['real'])} | {_pct(t['error'])} |")
    L += ["", "Per-step time (ms): error of each step's time.", "",
          "| steps | n | sim total | real total | total error | mean abs | median abs | p90 abs | max abs |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, d in cmp["per_step"].items():
        if d.get("steps"):
            L.append(f"| {k} | {d['steps']} | {d['sim_ms']:.1f} | {d['real_ms']:.1f} | {_pct(d['total_error'])} | "
                     f"{100 * d['mean_abs_error']:.1f}% | {100 * d['median_abs_error']:.1f}% | "
                     f"{100 * d['p90_abs_error']:.1f}% | {100 * d['max_abs_error']:.1f}% |")
    L += ["", "Time by component (s, summed over steps × layers).", "",
          "| phase | component | simulated | real | error |", "|---|---|---:|---:|---:|"]
    for ph, comps in cmp["components"].items():
        for c, d in comps.items():
            L.append(f"| {ph} | {c[:-2]} | {d['sim_s']:.4g} | {d['real_s']:.4g} | {_pct(d['error'])} |")
    L += ["", "Per layer (mean over steps, ms).", "",
          "| phase | layer | layer sim | layer real | error | attention sim/real | experts sim/real | stall sim/real |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for d in cmp["per_layer"]:
        L.append(f"| {d['phase']} | {d['layer']} | {d['layer_ms_sim']:.3g} | {d['layer_ms_real']:.3g} | "
                 f"{_pct(d['layer_ms_error'])} | {d['attention_ms_sim']:.3g} / {d['attention_ms_real']:.3g} | "
                 f"{d['compute_ms_sim']:.3g} / {d['compute_ms_real']:.3g} | "
                 f"{d['stall_ms_sim']:.3g} / {d['stall_ms_real']:.3g} |")
    return "\n".join(L) + "\n"


def write_comparison(cmp: dict, outdir) -> list[Path]:
    from .results import dump_json

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    js = {k: v for k, v in cmp.items() if k != "steps"}

    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list):
            return [clean(v) for v in o]
        return o
    p1 = out / "compare.json"
    p1.write_text(dump_json(clean(js)))
    p2 = out / "compare.md"
    p2.write_text(markdown(cmp))
    p3 = out / "compare_steps.parquet"
    cmp["steps"].to_parquet(p3, index=False)
    return [p1, p2, p3]
