"""The report of one run, from its result files only: summary.json, steps.parquet and, when
present, requests.parquet and events.parquet."""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..errors import InputError
from ..results import read_summary
from .html import Page, fmt, kv_table, pct

COLORS = {"attention": "#7f7f7f", "experts": "#1f77b4", "compute": "#1f77b4", "stall": "#d62728",
          "other": "#bcbd22", "demand": "#ff7f0e", "prefetch": "#2ca02c", "hits": "#2ca02c",
          "late": "#ffbb00", "misses": "#d62728"}
MAX_TIMELINE_STEPS = 3


# ---- reading -------------------------------------------------------------------------------------

def read_run(outdir: str | Path) -> tuple[dict, pd.DataFrame | None, pd.DataFrame | None]:
    """summary.json, steps.parquet, requests.parquet of a run dir (InputError if unreadable)."""
    d = Path(outdir)
    return read_summary(d), _table(d, "steps"), _table(d, "requests")


def _table(d: Path, name: str, **kw) -> pd.DataFrame | None:
    p = d / f"{name}.parquet"
    if not p.is_file():
        return None
    try:
        return pd.read_parquet(p, **kw)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
        raise InputError(f"unreadable Parquet file: {type(e).__name__}: {e}", file=str(p)) from None


def _events_between(d: Path, t0: float, t1: float) -> pd.DataFrame | None:
    """Transfers overlapping [t0, t1] (filtered in the Parquet reader: events can be large)."""
    return _table(d, "events", filters=[("end_s", ">", t0), ("start_s", "<", t1)])


# ---- sections ------------------------------------------------------------------------------------

def _summary_rows(s: dict) -> list[tuple[str, str]]:
    def lat(d: Any) -> str:
        if not isinstance(d, dict) or d.get("mean") is None:
            return "-"
        return f"{d['mean']:.3f} (p50 {d['p50']:.3f}, p99 {d['p99']:.3f})"

    pf = s.get("prefetch") or {}
    rows = [
        ("tokens/s (output)", fmt(s.get("tokens_per_s"), 4)),
        ("TPOT ms mean", lat(s.get("tpot_ms"))),
        ("TTFT ms mean", lat(s.get("ttft_ms"))),
        ("end-to-end ms mean", lat(s.get("e2e_ms"))),
        ("decode step ms mean", lat(s.get("decode_step_ms"))),
        ("makespan", f"{fmt(s.get('makespan_s'), 5)} s"),
        ("requests / steps / output tokens", f"{fmt(s.get('requests'))} / {fmt(s.get('steps'))} / "
                                             f"{fmt(s.get('output_tokens'))}"),
        ("GPU hit rate", pct(s.get("gpu_hit_rate"))),
        ("DRAM hit rate", pct(s.get("dram_hit_rate"))),
        ("hits / late hits / misses", f"{fmt(s.get('hits'))} / {fmt(s.get('late_hits'))} / {fmt(s.get('misses'))}"),
        ("stall", f"{fmt(s.get('stall_s'), 5)} s ({pct(s.get('stall_fraction'))} of makespan)"),
        ("GPU / PCIe / disk utilisation", f"{pct(s.get('gpu_utilization'))} / {pct(s.get('pcie_utilization'))} / "
                                          f"{pct(s.get('disk_utilization'))}"),
        ("bytes over PCIe / disk", f"{(s.get('bytes_pcie') or 0) / 1e9:.3f} GB / {(s.get('bytes_disk') or 0) / 1e9:.3f} GB"),
        ("prefetch issued / used / late / wasted / dropped",
         " / ".join(fmt(pf.get(k)) for k in ("issued", "used", "late", "wasted", "dropped"))),
        ("dedup ratio", pct(s.get("dedup_ratio"))),
        ("GPU cache", f"{fmt(s.get('gpu_cache_experts'))} experts × {(s.get('expert_bytes') or 0) / 1e6:.2f} MB"),
    ]
    ev = s.get("evictions")
    if isinstance(ev, dict):
        rows.append(("evictions GPU / DRAM", f"{fmt(ev.get('gpu'))} / {fmt(ev.get('dram'))}"))
    ts = s.get("timing_source")
    if isinstance(ts, dict) and ts:
        rows.append(("timing source", ", ".join(f"{k}: {v}" for k, v in ts.items())))
    return rows


def _scenario_rows(sc: dict) -> list[tuple[str, str]]:
    def tier(t: Any) -> str:
        if not isinstance(t, dict):
            return "every expert in host memory" if t is None else str(t)
        cap = (f"{t['capacity_experts']} experts" if t.get("capacity_experts") is not None
               else f"{t.get('capacity_gb')} GB")
        return f"{cap}, {t.get('policy', 'lru')}, {t.get('partition', 'global')}"

    model, hw = sc.get("model") or {}, sc.get("hardware") or {}
    trace = sc.get("trace") or {}
    pred = dict(sc.get("predictor") or {})
    pname = pred.pop("name", "?")
    batch = sc.get("batch") or {}
    return [
        ("scenario", str(sc.get("name", "-"))),
        ("model", f"{model.get('name', '?')}: {model.get('num_layers')} MoE layers × {model.get('num_experts')} "
                  f"experts, top-{model.get('top_k')}"),
        ("hardware", str(hw.get("name", "?"))),
        ("trace", str(trace.get("path") or json.dumps(trace.get("synthetic")))),
        ("GPU cache", tier((sc.get("cache") or {}).get("gpu"))),
        ("DRAM tier", tier((sc.get("cache") or {}).get("dram"))),
        ("predictor", pname + (f" {json.dumps(pred)}" if pred else "")),
        ("batch", ", ".join(f"{k}={v}" for k, v in batch.items())),
        ("seed", str(sc.get("seed"))),
    ]


def fig_layer_breakdown(steps: pd.DataFrame) -> go.Figure:
    """Time per layer, summed over steps: attention, expert compute, stall, other; one panel per phase."""
    phases = [p for p in ("prefill", "decode") if (steps["phase"] == p).any()] or ["all"]
    fig = make_subplots(rows=1, cols=len(phases), shared_yaxes=True,
                        subplot_titles=[f"{p} ({int(steps[steps['phase'] == p]['step'].nunique())} steps)"
                                        if p != "all" else p for p in phases])
    for i, ph in enumerate(phases, start=1):
        d = steps if ph == "all" else steps[steps["phase"] == ph]
        g = d.assign(span=d["end_s"] - d["start_s"]).groupby("layer")[
            ["attention_s", "compute_s", "stall_s", "span"]].sum()
        other = (g["span"] - g["attention_s"] - g["compute_s"] - g["stall_s"]).clip(lower=0)
        for name, col, vals in (("attention", "attention", g["attention_s"]), ("expert compute", "compute", g["compute_s"]),
                                ("stall (waiting for experts)", "stall", g["stall_s"]), ("other", "other", other)):
            fig.add_trace(go.Bar(x=g.index, y=vals * 1e3, name=name, marker_color=COLORS[col],
                                 legendgroup=name, showlegend=i == 1,
                                 hovertemplate=f"layer %{{x}}<br>{name}: %{{y:.3f}} ms<extra>{ph}</extra>"),
                          row=1, col=i)
        fig.update_xaxes(title_text="MoE layer", row=1, col=i)
    fig.update_yaxes(title_text="time summed over steps (ms)", row=1, col=1)
    fig.update_layout(barmode="stack", height=420, title="Time per layer: compute vs stall")
    return fig


def choose_steps(steps: pd.DataFrame, n: int = MAX_TIMELINE_STEPS) -> list[tuple[int, str]]:
    """A few steps worth looking at: the first prefill, the first decode, the slowest decode."""
    span = steps.groupby("step").agg(start=("start_s", "min"), end=("end_s", "max"), phase=("phase", "first"))
    span["dur"] = span["end"] - span["start"]
    chosen: list[tuple[int, str]] = []

    def add(step, why):
        if step is not None and all(step != s for s, _ in chosen) and len(chosen) < n:
            chosen.append((int(step), why))

    pre, dec = span[span["phase"] == "prefill"], span[span["phase"] == "decode"]
    add(pre.index.min() if len(pre) else None, "first prefill step")
    add(dec.index.min() if len(dec) else None, "first decode step")
    add(dec["dur"].idxmax() if len(dec) else None, "slowest decode step")
    if len(dec) > 2:
        add(dec.index[len(dec) // 2], "a middle decode step")
    if not chosen and len(span):
        add(span.index.min(), "first step")
    return chosen


def _lanes(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Interval partitioning: the lowest free lane for each interval (in start order)."""
    order = np.argsort(starts, kind="stable")
    lane_end: list[float] = []
    out = np.zeros(len(starts), dtype=int)
    for i in order:
        for k, e in enumerate(lane_end):
            if e <= starts[i] + 1e-15:
                lane_end[k] = ends[i]
                out[i] = k
                break
        else:
            lane_end.append(ends[i])
            out[i] = len(lane_end) - 1
    return out


def fig_timeline(steps: pd.DataFrame, outdir: Path, step: int, why: str) -> tuple[go.Figure, bool]:
    """Gantt of one step: the GPU stream (attention, experts per layer) and every transfer on the
    PCIe and disk channels overlapping it. Returns (figure, had events)."""
    s = steps[steps["step"] == step].sort_values("layer")
    t0, t1 = float(s["start_s"].min()), float(s["end_s"].max())
    fig = go.Figure()
    ms = 1e3
    rows_order: list[str] = []
    # GPU compute stream
    gpu = "GPU stream"
    rows_order.append(gpu)
    attn_end = s["gate_s"] if "gate_s" in s else s["start_s"] + s["attention_s"]
    fig.add_trace(go.Bar(
        y=[gpu] * len(s), base=(s["start_s"] - t0) * ms, x=(attn_end - s["start_s"]) * ms, orientation="h",
        name="attention + gate", marker_color=COLORS["attention"], text=[f"L{l}" for l in s["layer"]],
        textposition="inside", insidetextanchor="middle",
        customdata=np.stack([s["layer"], s["attention_s"] * ms], axis=1),
        hovertemplate="layer %{customdata[0]}: attention %{customdata[1]:.3f} ms<extra></extra>"))
    fig.add_trace(go.Bar(
        y=[gpu] * len(s), base=(attn_end - t0) * ms, x=(s["end_s"] - attn_end) * ms, orientation="h",
        name="experts (compute + stall)", marker_color=COLORS["experts"],
        customdata=np.stack([s["layer"], s["compute_s"] * ms, s["stall_s"] * ms, s["hits"], s["late_hits"],
                             s["misses"]], axis=1),
        hovertemplate=("layer %{customdata[0]}: expert compute %{customdata[1]:.3f} ms, stall "
                       "%{customdata[2]:.3f} ms<br>hits %{customdata[3]}, late %{customdata[4]}, "
                       "misses %{customdata[5]}<extra></extra>")))
    stalled = s[s["stall_s"] > 0]
    if len(stalled):
        fig.add_trace(go.Bar(
            y=["stall"] * len(stalled), base=(stalled["end_s"] - stalled["stall_s"] - t0) * ms,
            x=stalled["stall_s"] * ms, orientation="h", name="stall (summed, drawn at layer end)",
            marker_color=COLORS["stall"], customdata=stalled["layer"],
            hovertemplate="layer %{customdata}: stall %{x:.3f} ms<extra></extra>"))
        rows_order.append("stall")
    ev = _events_between(outdir, t0, t1)
    had = ev is not None
    if ev is not None and len(ev):
        for res in ("pcie", "disk"):
            e = ev[ev["resource"] == res].reset_index(drop=True)
            if not len(e):
                continue
            lane = _lanes(e["start_s"].to_numpy(), e["end_s"].to_numpy())
            names = [f"{'PCIe' if res == 'pcie' else 'disk'} {k}" for k in lane]
            for k in sorted(set(names)):
                rows_order.append(k)
            e = e.assign(lane=names)
            for kind in ("demand", "prefetch"):
                k = e[e["kind"] == kind] if "kind" in e else e
                if not len(k):
                    continue
                fig.add_trace(go.Bar(
                    y=k["lane"], base=(k["start_s"] - t0) * ms, x=(k["end_s"] - k["start_s"]) * ms, orientation="h",
                    name=f"{res} {kind}", marker_color=COLORS[kind], marker_line_width=0.5,
                    marker_line_color="white", opacity=0.9 if res == "pcie" else 0.6,
                    customdata=np.stack([k["layer"], k["expert"]], axis=1),
                    hovertemplate=(f"{res} {kind}: layer %{{customdata[0]}} expert %{{customdata[1]}}"
                                   "<br>%{base:.3f} → %{x:.3f} ms long<extra></extra>")))
    fig.update_yaxes(categoryorder="array", categoryarray=list(reversed(rows_order)))
    fig.update_xaxes(title_text=f"ms since step start (t = {t0:.6f} s)", range=[0, (t1 - t0) * ms])
    phase = s["phase"].iloc[0]
    fig.update_layout(barmode="overlay", height=180 + 34 * len(rows_order), bargap=0.25,
                      title=f"Timeline of step {step} ({why}, {phase}, {int(s['tokens'].iloc[0])} tokens, "
                            f"{(t1 - t0) * ms:.3f} ms)",
                      legend=dict(yanchor="top", y=1, xanchor="left", x=1.01))  # right of the plot: clear of the x title
    return fig, had


def fig_hit_rates(s: dict, steps: pd.DataFrame | None) -> go.Figure:
    """GPU accesses by outcome, DRAM lookups by outcome, and the GPU hit rate per layer."""
    fig = make_subplots(rows=1, cols=2, column_widths=[0.35, 0.65],
                        subplot_titles=["per tier", "GPU tier per layer"])
    acc = (s.get("hits") or 0) + (s.get("late_hits") or 0) + (s.get("misses") or 0)
    tiers = ["GPU"]
    dh = s.get("dram_hit_rate")
    if dh is not None:
        tiers.append("DRAM")
    gpu_vals = {"hit": (s.get("hits") or 0) / acc if acc else 0,
                "late prefetch": (s.get("late_hits") or 0) / acc if acc else 0,
                "miss": (s.get("misses") or 0) / acc if acc else 0}
    for name, col in (("hit", "hits"), ("late prefetch", "late"), ("miss", "misses")):
        y = [gpu_vals[name]]
        if dh is not None:
            y.append(dh if name == "hit" else (1 - dh if name == "miss" else 0))
        fig.add_trace(go.Bar(x=tiers, y=y, name=name, marker_color=COLORS[col], legendgroup=name,
                             hovertemplate=f"%{{x}} {name}: %{{y:.1%}}<extra></extra>"), row=1, col=1)
    if steps is not None and len(steps):
        g = steps.groupby("layer")[["hits", "late_hits", "misses"]].sum()
        tot = (g["hits"] + g["late_hits"] + g["misses"]).replace(0, np.nan)
        fig.add_trace(go.Scatter(x=g.index, y=g["hits"] / tot, mode="lines+markers", name="GPU hit rate",
                                 line_color=COLORS["hits"]), row=1, col=2)
        fig.add_trace(go.Scatter(x=g.index, y=g["late_hits"] / tot, mode="lines+markers", name="late prefetch",
                                 line_color=COLORS["late"], showlegend=False), row=1, col=2)
        fig.update_xaxes(title_text="MoE layer", row=1, col=2)
    fig.update_yaxes(tickformat=".0%", range=[0, 1.02])
    fig.update_layout(barmode="stack", height=380, title="Hit rates")
    return fig


def fig_prefetch(s: dict) -> go.Figure:
    pf = s.get("prefetch") or {}
    keys = [k for k in ("issued", "used", "late", "wasted", "dropped", "unused_at_end") if k in pf]
    colors = {"issued": "#1f77b4", "used": COLORS["hits"], "late": COLORS["late"], "wasted": COLORS["misses"],
              "dropped": "#9467bd", "unused_at_end": "#7f7f7f"}
    fig = go.Figure(go.Bar(x=keys, y=[pf[k] for k in keys], marker_color=[colors[k] for k in keys],
                           text=[fmt(pf[k]) for k in keys], textposition="outside",
                           hovertemplate="%{x}: %{y}<extra></extra>"))
    issued = pf.get("issued") or 0
    sub = (f"used {pf.get('used', 0) / issued:.1%} of issued, wasted {pf.get('wasted', 0) / issued:.1%}"
           if issued else "no prefetches issued")
    fig.update_layout(height=360, title=f"Prefetch outcomes ({sub})", yaxis_title="prefetches")
    return fig


def fig_unique_experts(steps: pd.DataFrame, num_experts: int | None) -> go.Figure:
    """Unique experts needed per layer and step (what dedup loads), mean and max per phase."""
    fig = go.Figure()
    colors = {"prefill": "#9467bd", "decode": "#1f77b4"}
    for ph in [p for p in ("prefill", "decode") if (steps["phase"] == p).any()]:
        g = steps[steps["phase"] == ph].groupby("layer")["unique_experts"]
        mean, lo, hi = g.mean(), g.min(), g.max()
        fig.add_trace(go.Scatter(x=mean.index, y=mean, mode="lines+markers", name=f"{ph} mean",
                                 line_color=colors[ph],
                                 error_y=dict(type="data", symmetric=False, array=hi - mean, arrayminus=mean - lo,
                                              thickness=1),
                                 hovertemplate=f"{ph} layer %{{x}}: mean %{{y:.2f}}<extra>bars: min..max</extra>"))
    if num_experts:
        fig.add_hline(y=num_experts, line_dash="dot", line_color="#888",
                      annotation_text=f"{num_experts} experts per layer")
    fig.update_layout(height=360, title="Unique experts per layer and step (error bars: min..max)",
                      xaxis_title="MoE layer", yaxis_title="unique experts", yaxis_rangemode="tozero")
    return fig


def fig_step_times(steps: pd.DataFrame) -> go.Figure:
    g = steps.groupby("step").agg(start=("start_s", "min"), end=("end_s", "max"), phase=("phase", "first"),
                                  stall=("stall_s", "sum"), batch=("batch", "first"))
    fig = go.Figure()
    for ph, color in (("prefill", "#9467bd"), ("decode", "#1f77b4")):
        d = g[g["phase"] == ph]
        if len(d):
            fig.add_trace(go.Scatter(x=d.index, y=(d["end"] - d["start"]) * 1e3, mode="markers", name=ph,
                                     marker=dict(color=color, size=4),
                                     customdata=np.stack([d["stall"] * 1e3, d["batch"]], axis=1),
                                     hovertemplate=("step %{x}: %{y:.3f} ms, stall %{customdata[0]:.3f} ms, "
                                                    "batch %{customdata[1]}<extra></extra>")))
    fig.update_layout(height=340, title="Step time", xaxis_title="step", yaxis_title="ms",
                      yaxis_rangemode="tozero")
    return fig


# ---- why: the bottleneck analysis (whatif.json, written by `moesim run --why`) ----------------------

def read_whatif(d: Path, s: dict) -> dict | None:
    """whatif.json of a run dir, when present and made for this run's summary."""
    p = d / "whatif.json"
    if not p.is_file():
        return None
    try:
        doc = json.loads(p.read_text())
    except ValueError as e:
        raise InputError(f"unreadable JSON: {e}", file=str(p)) from None
    if (doc.get("baseline") or {}).get("tokens_per_s") != s.get("tokens_per_s"):
        return None  # left by another run of the same dir
    return doc


def fig_whatif(doc: dict) -> go.Figure:
    """Gain in tokens/s of each what-if, largest first."""
    rows = [r for r in doc.get("whatifs") or [] if r.get("gain") is not None]
    fig = go.Figure(go.Bar(
        y=[r["label"] for r in rows], x=[100 * r["gain"] for r in rows], orientation="h",
        marker_color=[COLORS["hits"] if r["gain"] >= 0 else COLORS["misses"] for r in rows],
        text=[f"{r['gain']:+.0%}" for r in rows], textposition="outside",
        customdata=[r["tokens_per_s"] for r in rows],
        hovertemplate="%{y}: %{x:+.1f}% (%{customdata:.2f} tokens/s)<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(height=140 + 40 * len(rows), title="Gain in tokens/s from one change at a time",
                      xaxis_title="gain over this run (%)")
    return fig


def why_section(page: Page, doc: dict) -> None:
    page.h2("Why: bottleneck analysis")
    page.html(f'<p class="verdict"><b>{html.escape(doc.get("verdict", ""))}</b></p>')
    page.fig(fig_whatif(doc))
    rows = [(r["label"], "failed: " + str(r.get("error")) if r.get("gain") is None
             else f"{r['tokens_per_s']:.4g} tokens/s ({r['gain']:+.1%})") for r in doc.get("whatifs") or []]
    rows += [(r["label"], f"not run: {r['why']}") for r in doc.get("skipped") or []]
    page.html(kv_table(rows))
    page.note("each what-if is this run's scenario with one change, simulated (whatif/points/); "
              "all experts resident and +25% cache raise the GPU's memory where the cache would not fit it")


# ---- the page ------------------------------------------------------------------------------------

def build_run_page(outdir: str | Path) -> Page:
    d = Path(outdir)
    s, steps, requests = read_run(d)
    sc = s.get("scenario") or {}
    model = sc.get("model") or {}
    page = Page(f"moesim run: {sc.get('name', d.name)}",
                f"{model.get('name', '?')} on {(sc.get('hardware') or {}).get('name', '?')}, predictor "
                f"{(sc.get('predictor') or {}).get('name', '?')}, batch {(sc.get('batch') or {}).get('size', '?')}"
                f" — moesim {s.get('moesim_version', '?')}, from {d}")
    page.h2("Summary")
    page.html(f'<div class="cols">{kv_table(_summary_rows(s))}{kv_table(_scenario_rows(sc))}</div>')
    why = read_whatif(d, s)
    if why is not None:
        why_section(page, why)
    else:
        page.note("no bottleneck analysis for this run: `moesim run --why` adds one (what-ifs: 2× PCIe, +25% "
                  "cache, an oracle predictor, all experts resident)")
    if steps is None or not len(steps):
        page.note("no steps.parquet: the per-layer, timeline and expert figures need it")
    else:
        page.h2("Time per layer")
        page.fig(fig_layer_breakdown(steps))
        page.fig(fig_step_times(steps))
        page.h2("Timeline")
        if not (d / "events.parquet").is_file():
            page.note("no events.parquet: only the GPU stream is drawn (run with --events for every transfer)")
        else:
            page.note("PCIe and disk lanes: one per copy engine / queue slot in use; transfers that started in "
                      "an earlier step but overlap this one are drawn too")
        for step, why in choose_steps(steps):
            fig, _ = fig_timeline(steps, d, step, why)
            page.fig(fig)
    page.h2("Hit rates")
    page.fig(fig_hit_rates(s, steps))
    page.h2("Prefetch")
    page.fig(fig_prefetch(s))
    if steps is not None and len(steps):
        page.h2("Unique experts per layer")
        page.note(f"dedup ratio {pct(s.get('dedup_ratio'))}: the share of token × expert pairs a batch "
                  "did not have to load separately")
        page.fig(fig_unique_experts(steps, model.get("num_experts")))
    if requests is not None and len(requests):
        page.h2("Requests")
        page.fig(fig_requests(requests))
    return page


def fig_requests(req: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    for col, name in (("ttft_ms", "TTFT"), ("e2e_ms", "end-to-end")):
        if col in req:
            fig.add_trace(go.Box(y=req[col], name=name, boxpoints="all" if len(req) <= 200 else "outliers",
                                 jitter=0.3))
    fig.update_layout(height=340, title=f"Request latency ({len(req)} requests)", yaxis_title="ms",
                      showlegend=False)
    return fig


def render_run(outdir: str | Path) -> Path:
    """Write `outdir/report.html` from the run's result files; returns its path."""
    d = Path(outdir)
    return build_run_page(d).write(d / "report.html")
