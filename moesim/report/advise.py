"""The report of a deployment search, from its files only: advise.json and trials.parquet."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from ..errors import InputError
from .html import Page, grid_table, kv_table

STATE_COLORS = {"feasible": "#2ca02c", "misses the SLO": "#ff7f0e", "pruned": "#bbbbbb", "fail": "#d62728"}


def read_advise(d: Path) -> tuple[dict, pd.DataFrame]:
    p = d / "advise.json"
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError("no advise.json: not an advise output dir", file=str(d)) from None
    except ValueError as e:
        raise InputError(f"unreadable JSON: {e}", file=str(p)) from None
    return doc, pd.read_parquet(d / "trials.parquet")


def _status(df: pd.DataFrame) -> pd.Series:
    ok = df["slo_ok"] if "slo_ok" in df else pd.Series(False, index=df.index)
    return df["state"].where(df["state"] != "complete", ok.map({True: "feasible", False: "misses the SLO"}))


def fig_history(doc: dict, df: pd.DataFrame) -> go.Figure:
    """The objective of every trial, and the best feasible one so far."""
    metric = doc["objective_metric"]
    st = _status(df)
    fig = go.Figure()
    for name, color in STATE_COLORS.items():
        d = df[st == name]
        if len(d) and metric in d:
            fig.add_trace(go.Scatter(x=d["trial"], y=d[metric], mode="markers", name=name, marker_color=color,
                                     hovertemplate=f"trial %{{x}}: {metric} %{{y:.4g}}<extra>{name}</extra>"))
    feas = df[st == "feasible"].sort_values("trial")
    if len(feas):
        best = feas[metric].cummin() if metric == "cost_per_hour" else feas[metric].cummax()
        fig.add_trace(go.Scatter(x=feas["trial"], y=best, mode="lines", line_shape="hv", name="best so far",
                                 line_color="#1f77b4"))
    fig.update_layout(height=380, title=f"Search history: {metric} per trial (pruned trials were not simulated)",
                      xaxis_title="trial", yaxis_title=metric)
    return fig


def fig_importances(doc: dict) -> go.Figure:
    imp = doc.get("importances") or {}
    fig = go.Figure(go.Bar(x=list(imp.values()), y=list(imp), orientation="h", marker_color="#1f77b4",
                           hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(height=140 + 30 * len(imp), title="Which knobs mattered (optuna PED-ANOVA importance "
                      f"for {doc['objective_metric']})", xaxis_title="importance")
    return fig


def fig_pareto(doc: dict, df: pd.DataFrame) -> go.Figure:
    x, y = doc["pareto_metrics"][:2]
    st = _status(df)
    fig = go.Figure()
    for name in ("misses the SLO", "feasible"):
        d = df[st == name]
        if len(d):
            fig.add_trace(go.Scatter(x=d[x], y=d[y], mode="markers", name=name, marker_color=STATE_COLORS[name],
                                     customdata=d["trial"],
                                     hovertemplate=f"trial %{{customdata}}: {x} %{{x:.4g}}, {y} %{{y:.4g}}<extra></extra>"))
    front = pd.DataFrame(doc.get("pareto") or [])
    if len(front):
        fig.add_trace(go.Scatter(x=front[x], y=front[y], mode="lines+markers", name="Pareto set",
                                 marker=dict(color="#d62728", size=10, symbol="diamond")))
    fig.update_layout(height=420, title=f"Pareto set: {x} vs {y}", xaxis_title=x, yaxis_title=y)
    return fig


def fig_knob(doc: dict, df: pd.DataFrame, knob: str) -> go.Figure:
    """The objective against one knob's values (simulated trials)."""
    metric, col = doc["objective_metric"], f"knob:{knob}"
    d = df[df["state"] == "complete"]
    st = _status(d)
    fig = go.Figure()
    for name in ("misses the SLO", "feasible"):
        e = d[st == name]
        if len(e):
            fig.add_trace(go.Box(x=e[col], y=e[metric], name=name, boxpoints="all", jitter=0.3,
                                 marker_color=STATE_COLORS[name]))
    order = [json.dumps(v) if isinstance(v, (dict, list)) else str(v) for v in (doc.get("space") or {}).get(knob, [])]
    fig.update_layout(height=320, title=f"{metric} by {knob}", boxmode="group", xaxis_title=knob,
                      yaxis_title=metric, xaxis_type="category")
    if order:  # the knob's own order (batch 1, 2, 4, ...), not the order trials came in
        fig.update_xaxes(categoryorder="array", categoryarray=order)
    return fig


def _cfg(c: dict | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (c or {}).items())


def build_advise_page(outdir: str | Path) -> Page:
    d = Path(outdir)
    doc, df = read_advise(d)
    slo = ", ".join(f"{k} ≤ {doc['slo'][k]:g}" for k in ("tpot_ms", "ttft_ms") if doc["slo"].get(k))
    page = Page(f"moesim advise: {doc['name']}", f"objective {doc['objective']}, SLO {doc['slo']['percentile']} "
                f"{slo}, sampler {doc['sampler']}, from {d}")
    best, default = doc.get("best"), doc.get("default")
    rows = [("trials", f"{doc['trials']} ({doc['simulations']} simulated, {doc['pruned']} pruned, "
                       f"{doc['failed']} failed) of a {doc['space_size']}-configuration space"),
            ("met the SLO", str(doc["feasible"])),
            ("recommended", _cfg(best["config"]) if best else "none met the SLO"),
            ("recommended " + doc["objective_metric"], f"{best['objective']:.4g}" if best else "-"),
            ("default configuration", _cfg((doc.get("default_state") or {}).get("config"))),
            ("default " + doc["objective_metric"], f"{default['objective']:.4g}" if default else "-"),
            ("scenario", doc.get("recommended", "-"))]
    rows += [(f"price {k}", f"${v['price_per_hour']:g}/h ({v['source']})" if v else "no price")
             for k, v in doc["prices"].items()]
    page.h2("Answer")
    page.html(kv_table(rows))
    page.h2("Pareto set")
    cols = ["configuration"] + doc["pareto_metrics"]
    page.html(grid_table(cols, [[_cfg(r["config"])] + [f"{r.get(k):.4g}" if r.get(k) is not None else "-"
                                                        for k in doc["pareto_metrics"]] for r in doc["pareto"]],
                         numeric=set(doc["pareto_metrics"])))
    page.fig(fig_pareto(doc, df))
    page.h2("Search")
    page.fig(fig_history(doc, df))
    if doc.get("importances"):
        page.fig(fig_importances(doc))
    for knob in [c[5:] for c in df.columns if c.startswith("knob:") and df[c].nunique() > 1]:
        page.fig(fig_knob(doc, df, knob))
    return page


def render_advise(outdir: str | Path) -> Path:
    """Write `outdir/report.html` for an advise run; returns its path."""
    d = Path(outdir)
    return build_advise_page(d).write(d / "report.html")
