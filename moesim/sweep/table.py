"""The table `moesim sweep` prints: one row per point, the axes, the headline numbers, and the
speedup over the on-demand point that shares every other axis value."""
from __future__ import annotations

import json

import pandas as pd

SHOWN = [("tokens_per_s", "tokens/s", "{:.1f}"), ("speedup", "vs on_demand", "{:.2f}×"),
         ("gpu_hit_rate", "GPU hit", "{:.1%}"), ("bytes_pcie", "PCIe GB", "{:.2f}"),
         ("prediction_precision", "precision", "{:.2f}"), ("prediction_recall", "recall", "{:.2f}"),
         ("stall_fraction", "stall", "{:.0%}"),
         # the gap report, when the points vary the eviction policy
         ("misses", "misses", "{:,.0f}"), ("replay_misses", "replay misses", "{:,.0f}"),
         ("replay_belady_misses", "belady", "{:,.0f}"), ("gap_captured", "gap closed", "{:.0%}")]
WHEN_POLICY_VARIES = {"misses", "replay_misses", "replay_belady_misses", "gap_captured"}


def with_speedup(results: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """Add `speedup` = tokens/s ÷ tokens/s of the on_demand point with the same other axes."""
    df = results[results["status"] == "done"].copy()
    pred_axes = [a for a in axes if a == "predictor" or a.startswith("predictor.")]
    others = [a for a in axes if a not in pred_axes] + (["repeat"] if "repeat" in df else [])
    if "predictor_name" not in df or not (df["predictor_name"] == "on_demand").any():
        df["speedup"] = None
        return df
    keys = df[others].astype(str).agg("|".join, axis=1) if others else pd.Series("", index=df.index)
    base = df[df["predictor_name"] == "on_demand"].assign(_k=keys).groupby("_k")["tokens_per_s"].first()
    df["speedup"] = df["tokens_per_s"] / keys.map(base)
    return df


def _cell(v) -> str:
    """An axis value as a short label: a predictor mapping becomes name(k=v, ...)."""
    if isinstance(v, str) and v.startswith("{"):
        try:
            v = json.loads(v)
        except ValueError:
            return v
    if isinstance(v, dict):
        rest = ", ".join(f"{k}={x}" for k, x in v.items() if k != "name")
        return f"{v.get('name', '')}({rest})" if rest else str(v.get("name", v))
    return str(v)


def table_rows(results: pd.DataFrame, axes: list[str]) -> tuple[list[str], list[str], list[list[str]]]:
    """The sweep table as data: the axis column titles, the number column titles (right-aligned when
    drawn) and one row of formatted cells per done point; all empty when no point is done."""
    df = with_speedup(results, axes)
    if df.empty:
        return [], [], []
    shown_axes = [a for a in axes if df[a].astype(str).nunique() > 1] if axes else []
    if "predictor_name" in df and not any(a.startswith("predictor") for a in shown_axes):
        shown_axes.append("predictor_name")
    shown = [c for c in SHOWN if c[0] not in WHEN_POLICY_VARIES or "cache.gpu.policy" in shown_axes]
    rows = []
    for _, row in df.iterrows():
        cells = [_cell(row[a]) for a in shown_axes]
        for col, _, fmt in shown:
            v = row.get(col)
            cells.append("-" if v is None or pd.isna(v) else fmt.format(v / 1e9 if col == "bytes_pcie" else v))
        rows.append(cells)
    return shown_axes, [title for _, title, _ in shown], rows
