"""The report of a sweep, from its files only: sweep.json (the axes) and results.parquet."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..errors import InputError
from .html import Page, fmt, grid_table

# (column, label); the first is the default measure
MEASURES: list[tuple[str, str]] = [
    ("tokens_per_s", "tokens/s"),
    ("tpot_ms_mean", "TPOT mean (ms)"),
    ("tpot_ms_p99", "TPOT p99 (ms)"),
    ("ttft_ms_mean", "TTFT mean (ms)"),
    ("gpu_hit_rate", "GPU hit rate"),
    ("stall_s", "stall (s)"),
    ("pcie_utilization", "PCIe utilisation"),
    ("bytes_pcie", "bytes over PCIe"),
    ("gap_captured", "LRU→Belady gap closed"),
]
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]
DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]


def read_sweep(sweepdir: str | Path) -> tuple[dict, pd.DataFrame]:
    d = Path(sweepdir)
    p = d / "sweep.json"
    try:
        meta = json.loads(p.read_text())
    except FileNotFoundError:
        meta = {}
    except ValueError as e:
        raise InputError(f"unreadable JSON: {e}", file=str(p)) from None
    r = d / "results.parquet"
    if not r.is_file():
        if not meta:
            raise InputError("no results.parquet or sweep.json: not a sweep dir", file=str(d))
        from ..sweep.tables import write_tables  # rebuild the tables from the point dirs

        _, results = write_tables(d, meta["points"])
    else:
        try:
            results = pd.read_parquet(r)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"unreadable Parquet file: {type(e).__name__}: {e}", file=str(r)) from None
    if not meta:  # results.parquet alone: take every override-like column as an axis
        fixed = {"point_id", "status", "error", "repeat", "wall_s", "predictor_name", "batch_size",
                 "gpu_cache_bytes"} | {c for c, _ in _headline_cols()}
        meta = {"name": d.name, "axes": [c for c in results.columns if c not in fixed]}
    return meta, results


def _headline_cols():
    from ..sweep.tables import HEADLINE

    return HEADLINE


def _order(values: pd.Series) -> list:
    """Axis values in a sensible order: numeric ascending, else first appearance."""
    u = list(dict.fromkeys(values.dropna().tolist()))
    if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in u):
        return sorted(u)
    return u


def _label(v: Any) -> str:
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def split_axes(meta: dict, df: pd.DataFrame) -> tuple[list[str], list[str], str]:
    """(predictor axes, other axes that vary, series column). Seeds of repeats are averaged over."""
    axes = [a for a in meta.get("axes", []) if a in df.columns]
    repeats = bool(meta.get("repeats"))
    axes = [a for a in axes if not (a == "seed" and repeats)]
    axes = [a for a in axes if df[a].nunique(dropna=True) > 1]
    pred = [a for a in axes if a == "predictor" or a.startswith("predictor.")]
    other = [a for a in axes if a not in pred]
    return pred, other, "series"


def _pretty_predictor(v: Any) -> str:
    """`{"name":"oracle","lookahead_layers":2}` → `oracle (lookahead_layers=2)`."""
    try:
        d = json.loads(v) if isinstance(v, str) else v
    except ValueError:
        return str(v)
    if isinstance(d, dict) and "name" in d:
        rest = ", ".join(f"{k}={format(x)}" for k, x in d.items() if k != "name")
        return f"{d['name']}" + (f" ({rest})" if rest else "")
    return str(v)


def _with_series(df: pd.DataFrame, pred_axes: list[str]) -> pd.DataFrame:
    df = df.copy()
    if pred_axes:
        if pred_axes == ["predictor.name"]:
            df["series"] = df["predictor.name"].astype(str)
        elif pred_axes == ["predictor"]:
            df["series"] = df["predictor"].map(_pretty_predictor)
        else:
            df["series"] = df[pred_axes].astype(str).agg(lambda r: ", ".join(
                f"{a}={v}" for a, v in zip(pred_axes, r)), axis=1)
    elif "predictor_name" in df:
        df["series"] = df["predictor_name"].fillna("?").astype(str)
    else:
        df["series"] = "all"
    return df


def _measures(df: pd.DataFrame) -> list[tuple[str, str]]:
    return [(c, l) for c, l in MEASURES if c in df and df[c].notna().any()]


def _dropdown(per_measure: list[dict], measures: list[tuple[str, str]], title: str, axis: str | None = "yaxis"
              ) -> list[dict]:
    """An updatemenu switching every trace's data between measures (per_measure[i] = restyle args);
    `title` has `{m}` where the measure's name goes."""
    buttons = []
    for (col, label), args in zip(measures, per_measure):
        layout = {"title.text": title.format(m=label)}
        if axis:
            layout[f"{axis}.title.text"] = label
        buttons.append(dict(label=label, method="update", args=[args, layout]))
    return [dict(buttons=buttons, direction="down", x=0, xanchor="left", y=1.18, yanchor="top", showactive=True)]


def fig_axis_lines(df: pd.DataFrame, axis: str, others: list[str], measures) -> go.Figure:
    """The measure against one axis: a line per predictor (colour) × setting of the other axes (dash);
    repeats are averaged, with their standard deviation as error bars."""
    xs = _order(df[axis])
    series = list(dict.fromkeys(df["series"]))
    rest = [a for a in others if a != axis]
    combos = (list(dict.fromkeys(map(tuple, df[rest].astype(str).to_numpy().tolist()))) if rest else [()])
    traces = []   # (name, color, dash, subset)
    for si, s in enumerate(series):
        for ci, combo in enumerate(combos):
            m = df["series"] == s
            for a, v in zip(rest, combo):
                m &= df[a].astype(str) == v
            sub = df[m]
            if not len(sub):
                continue
            name = s + ("" if not rest else " | " + ", ".join(f"{a}={_label_str(v)}" for a, v in zip(rest, combo)))
            traces.append((name, PALETTE[si % len(PALETTE)], DASHES[ci % len(DASHES)], sub))
    fig = go.Figure()
    per_measure = []
    for mi, (col, label) in enumerate(measures):
        ys, errs = [], []
        for _, _, _, sub in traces:
            g = sub.groupby(axis)[col]
            mean, std = g.mean(), g.std(ddof=0)
            ys.append([_num(mean.get(x)) for x in xs])
            errs.append([_num(std.get(x)) for x in xs] if g.size().max() > 1 else None)
        per_measure.append({"y": ys, "error_y": [dict(type="data", array=e, visible=e is not None) for e in errs]})
        if mi == 0:
            for (name, color, dash, _), y, e in zip(traces, ys, errs):
                fig.add_trace(go.Scatter(
                    x=[_label(x) for x in xs], y=y, name=name, mode="lines+markers",
                    line=dict(color=color, dash=dash), error_y=dict(type="data", array=e, visible=e is not None),
                    hovertemplate=f"{name}<br>{axis}=%{{x}}: %{{y:.4g}}<extra></extra>"))
    title = "{m} vs " + axis
    fig.update_layout(height=440, title=title.format(m=measures[0][1]), xaxis_title=axis,
                      yaxis_title=measures[0][1], updatemenus=_dropdown(per_measure, measures, title),
                      margin=dict(t=110), legend=dict(font=dict(size=10)))
    fig.update_xaxes(type="category")
    return fig


def _label_str(v: str) -> str:
    try:
        f = float(v)
        return str(int(f)) if f.is_integer() else v
    except ValueError:
        return v


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if np.isnan(x) else x


def fig_heatmap(df: pd.DataFrame, a: str, b: str, others: list[str], measures) -> go.Figure:
    """Measure over two axes, one panel per predictor; other axes and repeats averaged over."""
    series = list(dict.fromkeys(df["series"]))
    xa, yb = _order(df[a]), _order(df[b])
    fig = make_subplots(rows=1, cols=len(series), subplot_titles=series, horizontal_spacing=0.08)
    per_measure = []
    for mi, (col, label) in enumerate(measures):
        zs, texts = [], []
        for s in series:
            p = df[df["series"] == s].pivot_table(index=b, columns=a, values=col, aggfunc="mean")
            z = [[_num(p.at[y, x]) if (y in p.index and x in p.columns) else None for x in xa] for y in yb]
            zs.append(z)
            texts.append([[("" if v is None else f"{v:.3g}") for v in row] for row in z])
        # one colour scale per measure, shared by the panels
        flat = [v for z in zs for row in z for v in row if v is not None]
        lo, hi = (min(flat), max(flat)) if flat else (0, 1)
        per_measure.append({"z": zs, "text": texts, "zmin": [lo] * len(series), "zmax": [hi] * len(series),
                            "colorbar.title.text": [label] * len(series)})
        if mi == 0:
            for i, (z, t) in enumerate(zip(zs, texts), start=1):
                fig.add_trace(go.Heatmap(
                    x=[_label(x) for x in xa], y=[_label(y) for y in yb], z=z, text=t, texttemplate="%{text}",
                    zmin=lo, zmax=hi, colorscale="Viridis", showscale=i == 1, colorbar=dict(title=label),
                    hovertemplate=f"{a}=%{{x}}<br>{b}=%{{y}}<br>%{{z:.4g}}<extra>{series[i - 1]}</extra>"),
                    row=1, col=i)
                fig.update_xaxes(title_text=a, type="category", row=1, col=i)
                fig.update_yaxes(title_text=b if i == 1 else None, type="category", row=1, col=i)
    avg = [o for o in others if o not in (a, b)]
    title = f"{{m}} over {a} × {b}" + (f" (mean over {', '.join(avg)})" if avg else "")
    fig.update_layout(height=460, title=title.format(m=measures[0][1]), margin=dict(t=120),
                      updatemenus=_dropdown(per_measure, measures, title, axis=None))
    return fig


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats (less or equal memory and more tokens/s)."""
    order = np.lexsort((-y, x))  # memory ascending, then throughput descending
    best = -np.inf
    keep = []
    for i in order:
        if y[i] > best:
            keep.append(i)
            best = y[i]
    return np.array(keep, dtype=int)


def fig_pareto(df: pd.DataFrame, axes: list[str]) -> go.Figure:
    d = df[df["gpu_cache_bytes"].notna() & df["tokens_per_s"].notna()].copy()
    d["gb"] = d["gpu_cache_bytes"] / 1e9
    d["hover"] = d.apply(lambda r: "<br>".join(f"{a}={_label(r[a])}" for a in axes if a in r) + f"<br>id {r['point_id']}",
                         axis=1)
    fig = go.Figure()
    for si, s in enumerate(dict.fromkeys(d["series"])):
        sub = d[d["series"] == s]
        fig.add_trace(go.Scatter(x=sub["gb"], y=sub["tokens_per_s"], mode="markers", name=s,
                                 marker=dict(color=PALETTE[si % len(PALETTE)], size=9, opacity=0.8),
                                 text=sub["hover"],
                                 hovertemplate="%{x:.3f} GB, %{y:.4g} tokens/s<br>%{text}<extra></extra>"))
    if len(d):
        idx = pareto_front(d["gb"].to_numpy(), d["tokens_per_s"].to_numpy())
        f = d.iloc[idx]
        fig.add_trace(go.Scatter(x=f["gb"], y=f["tokens_per_s"], mode="lines", name="Pareto front",
                                 line=dict(color="black", shape="hv", width=1.5), hoverinfo="skip"))
    fig.update_layout(height=460, title="GPU cache memory vs throughput (Pareto front: less memory, more tokens/s)",
                      xaxis_title="GPU expert cache (GB)", yaxis_title="tokens/s")
    return fig


def _points_table(df: pd.DataFrame, axes: list[str]) -> str:
    cols = ["point_id", "status", *axes, "tokens_per_s", "tpot_ms_mean", "gpu_hit_rate", "stall_s", "wall_s", "error"]
    cols = [c for c in cols if c in df]
    rows = [[fmt(v) if not isinstance(v, str) else v for v in r] for r in df[cols].itertuples(index=False)]
    return grid_table(cols, rows, numeric={"tokens_per_s", "tpot_ms_mean", "gpu_hit_rate", "stall_s", "wall_s"},
                      row_class=["failed" if s == "failed" else "" for s in df["status"]])


def build_sweep_page(sweepdir: str | Path) -> Page:
    d = Path(sweepdir)
    meta, results = read_sweep(d)
    n = len(results)
    status = results["status"].value_counts().to_dict() if n else {}
    done = results[results["status"] == "done"] if n else results
    page = Page(f"moesim sweep: {meta.get('name', d.name)}",
                f"{n} points: {status.get('done', 0)} done, {status.get('failed', 0)} failed, "
                f"{status.get('pending', 0)} pending — axes: {', '.join(meta.get('axes', [])) or 'none'} — from {d}")
    pred_axes, others, _ = split_axes(meta, done)
    df = _with_series(done, pred_axes)
    measures = _measures(df)
    all_axes = [a for a in meta.get("axes", []) if a in results]
    if not len(df) or not measures:
        page.note("no finished points to plot yet")
    else:
        page.h2("Measures against each axis")
        if meta.get("repeats"):
            page.note(f"each value is the mean over {meta['repeats']} seeds; error bars: standard deviation")
        if others:
            for a in others:
                page.fig(fig_axis_lines(df, a, others, measures))
        else:
            page.fig(fig_by_series(df, measures))
        if len(others) >= 2:
            page.h2("Two axes at once")
            page.fig(fig_heatmap(df, others[0], others[1], others, measures))
        else:
            page.note("a heatmap needs two varied axes besides the predictor")
        if ({"cache.gpu.policy", "gap_captured"} <= set(df.columns) and df["gap_captured"].notna().any()
                and df["cache.gpu.policy"].nunique() > 1):
            page.h2("Eviction policies: the LRU→Belady gap each closes")
            page.fig(fig_gap_by_policy(df, [a for a in others if a != "cache.gpu.policy"]))
        page.h2("Memory vs throughput")
        if df["gpu_cache_bytes"].notna().any():
            page.fig(fig_pareto(df, all_axes))
        else:
            page.note("no GPU cache sizes in the results")
    page.h2("Points")
    failed = results[results["status"] == "failed"] if n else results
    if len(failed):
        page.html(f'<p class="failed">{len(failed)} point(s) failed; their errors are in the last column</p>')
    page.html(_points_table(results, all_axes) if n else "<p>no points</p>")
    return page


def fig_by_series(df: pd.DataFrame, measures) -> go.Figure:
    """Only the predictor varies (or nothing): one bar per predictor."""
    g = df.groupby("series", sort=False)
    fig = go.Figure()
    per_measure = []
    for mi, (col, label) in enumerate(measures):
        mean, std = g[col].mean(), g[col].std(ddof=0)
        per_measure.append({"y": [[_num(v) for v in mean]],
                            "error_y": [dict(type="data", array=[_num(v) for v in std], visible=g.size().max() > 1)]})
        if mi == 0:
            fig.add_trace(go.Bar(x=list(mean.index), y=[_num(v) for v in mean], marker_color=PALETTE[0],
                                 error_y=dict(type="data", array=[_num(v) for v in std],
                                              visible=bool(g.size().max() > 1))))
    fig.update_layout(height=400, title=f"{measures[0][1]} per predictor", yaxis_title=measures[0][1],
                      updatemenus=_dropdown(per_measure, measures, "{m} per predictor"), margin=dict(t=110))
    return fig


def fig_gap_by_policy(df: pd.DataFrame, others: list[str]) -> go.Figure:
    """Fraction of the LRU→Belady replay-miss gap each policy closes (1 = Belady, 0 = LRU), one
    group of bars per combination of the other axes."""
    fig = go.Figure()
    keys = df[others].astype(str).agg(", ".join, axis=1) if others else pd.Series("all", index=df.index)
    for i, (k, g) in enumerate(df.assign(_k=keys).groupby("_k", sort=False)):
        m = g.groupby("cache.gpu.policy", sort=False)["gap_captured"].mean()
        fig.add_trace(go.Bar(name=_label_str(k), x=list(m.index), y=[_num(v) for v in m],
                             marker_color=PALETTE[i % len(PALETTE)]))
    fig.update_layout(height=420, barmode="group", yaxis_title="gap closed (replay of each run's accesses)",
                      title="LRU→Belady miss gap closed, by policy")
    return fig


def render_sweep(sweepdir: str | Path) -> Path:
    """Write `sweepdir/report.html` from sweep.json and results.parquet; returns its path."""
    d = Path(sweepdir)
    return build_sweep_page(d).write(d / "report.html")
