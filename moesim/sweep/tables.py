"""The sweep's tables (manifest.parquet, results.parquet), rebuilt from the point directories'
status.json and summary.json. It reads result files only, so reports use it without the engine."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import InputError
from .spec import format_value

STATUS = "status.json"
POINTS = "points"
SWEEP_JSON = "sweep.json"

# (column, path into summary.json)
HEADLINE: list[tuple[str, tuple[str, ...]]] = [
    ("tokens_per_s", ("tokens_per_s",)),
    ("tpot_ms_mean", ("tpot_ms", "mean")),
    ("tpot_ms_p50", ("tpot_ms", "p50")),
    ("tpot_ms_p99", ("tpot_ms", "p99")),
    ("ttft_ms_mean", ("ttft_ms", "mean")),
    ("ttft_ms_p99", ("ttft_ms", "p99")),
    ("gpu_hit_rate", ("gpu_hit_rate",)),
    ("dram_hit_rate", ("dram_hit_rate",)),
    ("stall_s", ("stall_s",)),
    ("stall_fraction", ("stall_fraction",)),
    ("bytes_pcie", ("bytes_pcie",)),
    ("bytes_disk", ("bytes_disk",)),
    ("pcie_utilization", ("pcie_utilization",)),
    ("gpu_utilization", ("gpu_utilization",)),
    ("prefetch_issued", ("prefetch", "issued")),
    ("prefetch_used", ("prefetch", "used")),
    ("prefetch_wasted", ("prefetch", "wasted")),
    ("prefetch_late", ("prefetch", "late")),
    ("prefetch_dropped", ("prefetch", "dropped")),
    ("prediction_precision", ("prediction", "precision")),
    ("prediction_recall", ("prediction", "recall")),
    ("dedup_ratio", ("dedup_ratio",)),
    ("dedup_bytes_saved", ("dedup", "bytes_saved")),
    ("unique_experts_per_layer_decode", ("dedup", "unique_experts_per_layer_decode")),
    ("requests_per_s", ("requests_per_s",)),
    ("queue_ms_mean", ("queue_ms", "mean")),
    ("queue_ms_p99", ("queue_ms", "p99")),
    ("slo_attainment", ("slo", "attainment")),
    ("makespan_s", ("makespan_s",)),
    ("output_tokens", ("output_tokens",)),
    ("gpu_cache_experts", ("gpu_cache_experts",)),
    ("expert_bytes", ("expert_bytes",)),
    ("misses", ("misses",)),
    ("gap_captured", ("policy_gap", "captured")),
    ("replay_misses", ("policy_gap", "policy_misses")),
    ("replay_lru_misses", ("policy_gap", "lru_misses")),
    ("replay_belady_misses", ("policy_gap", "belady_misses")),
]


def _get(d: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def headline(summary: dict) -> dict:
    """The numbers results.parquet keeps of one point's summary.json (None where absent)."""
    row = {col: _get(summary, path) for col, path in HEADLINE}
    sc = summary.get("scenario") or {}
    cache_gpu = _get(sc, ("cache", "gpu")) or {}
    n, eb = row["gpu_cache_experts"], row["expert_bytes"]
    if n is not None and eb is not None:
        layers = _get(sc, ("model", "num_layers")) or 1
        row["gpu_cache_bytes"] = n * eb * (layers if cache_gpu.get("partition") == "per_layer" else 1)
    else:
        row["gpu_cache_bytes"] = None
    row["predictor_name"] = _get(sc, ("predictor", "name"))
    row["batch_size"] = _get(sc, ("batch", "size"))
    return row


def _axis_series(values: list) -> pd.Series:
    """Override values as one Parquet-friendly column: numbers stay numbers, booleans booleans,
    lists/mappings become JSON strings, and a column mixing kinds becomes strings."""
    vals = [format_value(v) if isinstance(v, (dict, list)) else v for v in values]
    present = [v for v in vals if v is not None]
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        if len(present) == len(vals) and all(isinstance(v, int) for v in present):
            return pd.Series(vals, dtype="int64")
        return pd.Series([float("nan") if v is None else float(v) for v in vals], dtype="float64")
    if present and len(present) == len(vals) and all(isinstance(v, bool) for v in present):
        return pd.Series(vals, dtype=bool)
    if all(isinstance(v, str) for v in present):
        return pd.Series(vals, dtype=object)
    return pd.Series([None if v is None else format_value(v) for v in vals], dtype=object)


def collect_rows(sweepdir: Path, points: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(manifest, results) frames from the point directories; `points` as in sweep.json."""
    pdir = Path(sweepdir) / POINTS
    axes = []
    for p in points:
        for k in p["overrides"]:
            if k not in axes:
                axes.append(k)
    man, res = [], []
    for p in points:
        st = read_status(pdir / p["id"]) or {}
        status = st.get("status", "pending")
        summary: dict = {}
        if status == "done":
            try:
                summary = json.loads((pdir / p["id"] / "summary.json").read_text())
            except (OSError, ValueError):
                status = "pending"  # results deleted (or damaged) since: the next run redoes it
        error = st.get("error") if status == "failed" else None
        man.append({"point_id": p["id"], "status": status, "error": error, "label": p.get("label"),
                    "wall_s": st.get("wall_s"), "started_at": st.get("started_at"),
                    "finished_at": st.get("finished_at"), "run": st.get("run"), "host": st.get("host"),
                    "overrides": json.dumps(p["overrides"], sort_keys=True)})
        row = {"point_id": p["id"], "status": status, **{k: p["overrides"].get(k) for k in axes},
               "repeat": p.get("repeat"), **headline(summary), "wall_s": st.get("wall_s"), "error": error}
        res.append(row)
    manifest = pd.DataFrame(man, columns=["point_id", "status", "error", "label", "wall_s", "started_at",
                                          "finished_at", "run", "host", "overrides"])
    for c in ("wall_s", "started_at", "finished_at"):
        manifest[c] = pd.to_numeric(manifest[c], errors="coerce").astype("float64")
    results = pd.DataFrame(res)
    if len(results):
        for k in axes:
            results[k] = _axis_series(results[k].tolist())
        for c in [c for c, _ in HEADLINE] + ["gpu_cache_bytes", "wall_s", "batch_size"]:
            results[c] = pd.to_numeric(results[c], errors="coerce").astype("float64")
        if results["repeat"].isna().all():
            results = results.drop(columns=["repeat"])
        else:
            results["repeat"] = results["repeat"].astype("Int64")
    return manifest, results


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_sweep_json(sweepdir: Path) -> dict:
    p = Path(sweepdir) / SWEEP_JSON
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError("not a sweep directory (no sweep.json)", file=str(p.parent)) from None
    except ValueError as e:
        raise InputError(f"unreadable sweep.json: {e}", file=str(p)) from None


def write_tables(sweepdir: str | Path, points: list[dict] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rebuild manifest.parquet and results.parquet from the point directories."""
    d = Path(sweepdir)
    if points is None:
        points = read_sweep_json(d)["points"]
    manifest, results = collect_rows(d, points)
    _write_parquet(manifest, d / "manifest.parquet")
    _write_parquet(results, d / "results.parquet")
    return manifest, results


def read_status(point_dir: Path) -> dict | None:
    """The point's status.json, or None when it has none (never run, or deleted)."""
    import json

    p = Path(point_dir) / STATUS
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None
