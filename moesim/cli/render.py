"""Terminal tables (rich) of what the library returns: two traces side by side (`trace info A B`), a
simulation against a real run (`compare`) and a learned predictor's evaluation (`predictor eval`)."""
from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

from moesim.compare import _fmt, _pct
from moesim.traces.compare_stats import _fmt as _stat, _fmt_list, label, rel_err, scalar_keys


def print_trace_comparison(d: dict, path_a, path_b, width: int = 200) -> None:
    """`traces.compare_stats.comparison(A, B)` as one table: both traces' statistics and their difference."""
    a, b = d["a"], d["b"]
    t = Table(title=f"A = {path_a}   B = {path_b}",
              caption="Markov and probe recalls are 2-fold over requests: a bigger trace trains a better predictor. "
                      "Miss rates: each layer's expert stream, requests one after another.")
    t.add_column("statistic")
    t.add_column("A", justify="right")
    t.add_column("B", justify="right")
    t.add_column("|B-A|/A", justify="right")
    t.add_column("A per layer")
    t.add_column("B per layer")
    for what, key in (("model", "model"), ("shape", None), ("requests", "requests"), ("tokens", "tokens")):
        if key is None:
            va = f"{a['num_layers']}x{a['num_experts']} top-{a['top_k']}"
            vb = f"{b['num_layers']}x{b['num_experts']} top-{b['top_k']}"
        else:
            va, vb = str(a[key]), str(b[key])
        t.add_row(what, va, vb, "", "", "")
    keys = scalar_keys(a)
    keys += [k for k in scalar_keys(b) if k not in keys]
    for k in keys:
        va, vb = a.get(k), b.get(k)
        e = rel_err(va, vb)
        t.add_row(label(k), _stat(va), _stat(vb), "-" if e is None else f"{100 * e:.1f}%",
                  _fmt_list(a["per_layer"].get(k)), _fmt_list(b["per_layer"].get(k)))
    Console(width=width).print(t)


def print_real_comparison(cmp: dict) -> None:
    """`compare.compare_dirs` as tables: totals, per-step time errors, per decode layer."""
    con = Console(width=140)
    for w in cmp["warnings"]:
        con.print(f"[yellow]warning:[/] {w}")
    t = Table(title=f"{cmp['scenario']}: simulated vs real ({cmp['model']}, {cmp['predictor']}, "
                    f"batch {cmp['batch']}, cache {cmp['cache_experts']})")
    for c in ("metric", "simulated", "real", "error"):
        t.add_column(c, justify="left" if c == "metric" else "right")
    for r in cmp["totals"]:
        t.add_row(r["label"], _fmt(r["sim"]), _fmt(r["real"]), _pct(r["error"]))
    con.print(t)
    t = Table(title="per-step time")
    for c in ("steps", "n", "total error", "mean |err|", "median |err|", "p90 |err|", "max |err|"):
        t.add_column(c, justify="right")
    for k, d in cmp["per_step"].items():
        if d.get("steps"):
            t.add_row(k, str(d["steps"]), _pct(d["total_error"]), f"{100 * d['mean_abs_error']:.1f}%",
                      f"{100 * d['median_abs_error']:.1f}%", f"{100 * d['p90_abs_error']:.1f}%",
                      f"{100 * d['max_abs_error']:.1f}%")
    con.print(t)
    t = Table(title="per layer, decode (mean ms)")
    for c in ("layer", "sim", "real", "error", "attn sim/real", "experts sim/real", "stall sim/real"):
        t.add_column(c, justify="right")
    for d in cmp["per_layer"]:
        if d["phase"] != "decode":
            continue
        t.add_row(str(d["layer"]), f"{d['layer_ms_sim']:.3g}", f"{d['layer_ms_real']:.3g}", _pct(d["layer_ms_error"]),
                  f"{d['attention_ms_sim']:.3g}/{d['attention_ms_real']:.3g}",
                  f"{d['compute_ms_sim']:.3g}/{d['compute_ms_real']:.3g}",
                  f"{d['stall_ms_sim']:.3g}/{d['stall_ms_real']:.3g}")
    con.print(t)


def _evaluation_table(r: dict, tb: dict) -> Table:
    t = Table(title=f"{tb['title']} — {tb['n']:,} samples")
    t.add_column("predictor")
    for c in r["columns"]:
        t.add_column(c, justify="right")
    b = tb.get("bayes")
    hollow = bool(b) and b["singleton_share"] >= 0.9   # plug-in estimates say nothing then
    for row in tb["rows"]:
        if hollow and ("plug-in" in row["name"] or row["name"].startswith("2^-H")):
            t.add_row(row["name"], *(["n/a"] * len(r["columns"])))
            continue
        t.add_row(row["name"], *[("-" if row.get(c) is None else f"{100 * row[c]:.2f}") for c in r["columns"]])
    return t


def format_evaluation(r: dict, width: int = 160) -> str:
    """`predictors.neural.evaluation.evaluate`'s report as text tables."""
    buf = io.StringIO()
    con = Console(file=buf, width=width, force_terminal=False)
    sh = r["shape"]
    con.print(f"{r['kind']} checkpoint {r['checkpoint']} (preset {r['preset']}, {r['parameters']:,} parameters)")
    con.print(f"trace {r['trace']}: {sh['num_layers']} layers x {sh['num_experts']} experts, top-{sh['top_k']}; "
              f"split '{r['split']}': {len(r['requests'])} request(s) evaluated, baselines fit on "
              f"{r['fit_requests']} request(s)")
    for tb in r["tables"]:
        con.print(_evaluation_table(r, tb))
        b = tb.get("bayes")
        if b:
            con.print(f"  context = the routing the model sees + target layer: {b['contexts']:,} distinct contexts, "
                      f"{100 * b['singleton_share']:.1f}% of samples in a context seen once "
                      f"(plug-in counts those as always right). Plug-in H(first | context) = "
                      f"{b['entropy_bits']:.3f} bits.")
            if b["singleton_share"] >= 0.9:
                con.print("  n/a: nearly every context occurs once on this split, so the plug-in Bayes accuracy and "
                          "2^-H are ~100% by construction; the leave-one-out row is the (pessimistic) other end.")
        mrow = tb["rows"][0]
        if mrow.get("avg_confidence") is not None:
            con.print(f"  model's mean confidence: {mrow['avg_confidence']:.3f}")
    con.print("  (percent; top-n: first-choice expert among the n best; P@K = R@K: share of the routed set among "
              "the K best; exact: the K best are the routed set; R@K+n / all@K+n: share / all of the set among the "
              "K+n best; 1st∈set: the best is routed)")
    for lat, name in ((r.get("stored_latency"), "measured at training"), (r.get("latency_here"), "measured now")):
        if lat:
            pts = ", ".join(f"{n} tok {us:.0f} µs" for n, us in zip(lat["tokens"], lat["us"]))
            con.print(f"  forward latency {name} ({lat['device']}): {pts}")
    for n in r.get("notes", []):
        con.print(f"  note: {n}")
    return buf.getvalue()


def print_sweep_table(results, axes: list[str], width: int = 200) -> None:
    """`sweep.table.table_rows` drawn: one row per done point; nothing when no point is done."""
    from moesim.sweep.table import table_rows

    axis_cols, number_cols, rows = table_rows(results, axes)
    if not rows:
        return
    t = Table()
    for a in axis_cols:
        t.add_column(a)
    for title in number_cols:
        t.add_column(title, justify="right")
    for cells in rows:
        t.add_row(*cells)
    Console(width=width).print(t)
