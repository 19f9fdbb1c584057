"""Held-out evaluation of a checkpoint beside baselines on the same samples (torch for the model).

The samples are those of the checkpoint's held-out TEST requests (split by request at training
time, stored in the checkpoint) when the trace is the one it was trained on; on another trace,
every request (there is no training data in it). Baselines that learn (frequency, Markov) are fit
on the checkpoint's training + validation requests of the training trace only when evaluating on
that trace; on another trace there is nothing to fit them on but the evaluated requests, so they
are fit there (in-sample, which favours them) and the report says so.
"""
from __future__ import annotations

import numpy as np

from . import checkpoint as ckpt_io
from .config import TrainConfig, model_config_from_dict, overprovision
from .data import load_trace, pre_attention_samples, select_requests, speculation_samples
from .metrics import Frequency, Markov, Recency, Targets, bayes, columns, random_metrics, score_metrics


def _spec_targets(s, d: int) -> tuple[Targets, np.ndarray]:
    """Targets of offset d (1-based) and the indices of the samples that have it."""
    m = np.flatnonzero(s.tgt_mask[:, d - 1])
    f = s.flat
    g_anchor = f.offset[s.req[m]] + s.tok[m]
    tgt_g = s.tgt_tok[m, d - 1]
    t = Targets(f.routing, tgt_g, s.tgt_l[m, d - 1], g_anchor, s.anchor[m], np.ones(len(m), dtype=bool),
                tgt_g - f.offset[s.req[m]])
    return t, m


def _pre_targets(s) -> Targets:
    f = s.flat
    L = f.routing.shape[1]
    g = f.offset[s.req] + s.tok
    src_l = np.where(s.layer > 0, s.layer - 1, L - 1)
    src_g = np.where(s.layer > 0, g, g - 1)
    src_ok = (s.layer > 0) | (s.tok > 0)
    return Targets(f.routing, g, s.layer, np.maximum(src_g, 0), src_l, src_ok, s.tok)


def _training_trace(ck: dict) -> str | None:
    """The checkpoint's training trace if it is still where it was (same sha256), else None."""
    from pathlib import Path

    from ...traces.io import file_sha256

    tr = ck["trace"]
    for p in (tr.get("path"), tr.get("abs_path")):
        if p and Path(p).is_file() and file_sha256(p) == tr["fingerprint"]:
            return p
    return None


def evaluate(checkpoint, trace=None, split: str | None = None, device: str = "cpu", measure: bool = True) -> dict:
    """Evaluate a checkpoint (path) on `trace` (default: the one it was trained on). `split`:
    "test" (default on the training trace), "val", or "all" (default on another trace)."""
    import torch

    from .training import load_model, measure_latency, pre_predict, pre_tensors, spec_predict, spec_tensors

    ck = ckpt_io.load(checkpoint, field="checkpoint")
    kind = ck["kind"]
    mc = model_config_from_dict(ck["model_config"])
    tc = TrainConfig(**ck["train_config"])
    train_trace = _training_trace(ck)
    if trace is None:
        if train_trace is None:
            from ...errors import InputError
            tr, mcd = ck["trace"], ck["model_config"]
            raise InputError(f"the trace it was trained on ({tr.get('path')}) is not there (or has changed): give "
                             f"--trace, a trace of a {mcd['num_layers']}-layer, {mcd['num_experts']}-expert, "
                             f"top-{mcd['top_k']} model", file=str(checkpoint), field="--trace")
        trace = train_trace
    data = load_trace(trace, pre_attn=(kind == "pre_attention"), scores=False)
    L, E, K = data.shape
    if (L, E, K) != (mc.num_layers, mc.num_experts, mc.top_k):
        from ...errors import InputError
        raise InputError(f"trace shape {L} layers x {E} experts top-{K} differs from the checkpoint's "
                         f"{mc.num_layers} x {mc.num_experts} top-{mc.top_k}", file=str(trace), field="--trace")
    same = data.fingerprint == ck["trace"]["fingerprint"]
    sp = ck["split"]
    split = split or ("test" if same else "all")
    notes = []
    fit_data = data
    if split == "all":
        eval_ids = [r.request_id for r in data.requests]
        fit_ids = sp["train"] + sp["val"]
        if same:
            notes.append("split 'all' includes the training requests: the model's numbers are optimistic")
        elif train_trace is not None:
            fit_data = load_trace(train_trace, pre_attn=(kind == "pre_attention"))
            notes.append(f"another trace than the training one: the frequency/Markov baselines are fit on the "
                         f"model's own training requests ({train_trace}), every request here is unseen by both")
        else:
            fit_ids = eval_ids
            notes.append("another trace than the training one, and the training trace is not at hand: the "
                         "frequency/Markov baselines are fit on the evaluated requests themselves (in-sample, "
                         "favouring them)")
    else:
        if not same:
            from ...errors import InputError
            raise InputError(f"split {split!r} needs the trace the checkpoint was trained on "
                             "(use --split all for another trace)", file=str(trace), field="--split")
        eval_ids = sp[split]
        fit_ids = sp["train"] + sp["val"] if split == "test" else sp["train"]
    ev = select_requests(data, eval_ids)
    fit = select_requests(fit_data, fit_ids)
    delta = overprovision(tc, K)
    net = load_model(ck, device)
    tables = []
    if kind == "speculation":
        s = speculation_samples(ev, L, mc.context_length, mc.horizon, mc.cross_token, mc.prev_tokens)
        sf = speculation_samples(fit, L, mc.context_length, mc.horizon, mc.cross_token, mc.prev_tokens)
        logits, conf = spec_predict(net, spec_tensors(s), device)
        for d in range(1, mc.horizon + 1):
            t, m = _spec_targets(s, d)
            tf, _ = _spec_targets(sf, d)
            lg = logits[m, d - 1]
            ctx = np.concatenate([np.where(s.ctx_mask[m][..., None], s.ctx_e[m], -1).reshape(len(m), -1),
                                  np.where(s.ctx_mask[m], s.ctx_l[m], -1), s.tgt_l[m, d - 1:d]], axis=1)
            rows = _rows(lg, t, tf, L, E, K, delta, ctx)
            rows[0]["avg_confidence"] = float(conf[m, d - 1].mean()) if len(m) else None
            tables.append({"title": f"offset {d}: layer l+{d} predicted at the gate of layer l "
                                    f"(context {mc.context_length} layers)", "offset": d, "n": int(len(m)),
                           "rows": rows[0:1] + rows[1], "bayes": rows[2]})
    else:
        s = pre_attention_samples(ev)
        sf = pre_attention_samples(fit)
        scores = pre_predict(net, pre_tensors(s), device)
        t, tf = _pre_targets(s), _pre_targets(sf)
        rows = _rows(scores, t, tf, L, E, K, delta, None)
        tables.append({"title": "same layer, before attention (pre_attn of layer l -> experts of layer l)",
                       "offset": 0, "n": len(t), "rows": rows[0:1] + rows[1], "bayes": None})
    report = {
        "kind": kind, "checkpoint": str(checkpoint), "preset": ck.get("preset"), "parameters": ck.get("parameters"),
        "trace": str(trace), "same_trace": same, "split": split, "requests": eval_ids,
        "fit_requests": len(fit_ids), "shape": {"num_layers": L, "num_experts": E, "top_k": K},
        "overprovision": delta, "columns": columns(K, E, delta), "tables": tables, "notes": notes,
        "stored_latency": ck.get("latency"), "train_seconds": ck.get("train_seconds"),
        "best_epoch": ck.get("best_epoch"), "stopped": ck.get("stopped"),
        "model_config": ck["model_config"],
    }
    if measure:
        report["latency_here"] = measure_latency(net, device, repeats=20)
    del torch
    return report


def _rows(model_scores, t: Targets, tf: Targets, L, E, K, delta, ctx):
    first, sets = t.first, t.sets
    model = {"name": "model", **score_metrics(model_scores, model_scores, first, sets, delta)}
    freq = Frequency(tf, L, E)
    base = [{"name": "random (expected)", **random_metrics(K, E, delta), "n": len(t)}]
    for name, b in (("frequency", freq), ("recency", Recency(freq)), ("markov (1st order, layer to layer)",
                                                                        Markov(tf, L, E, freq))):
        s1, ss = b.scores(t)
        base.append({"name": name, **score_metrics(s1, ss, first, sets, delta)})
    bay = None
    if ctx is not None:
        bay = bayes(ctx, t, E, freq, delta)
        if bay:
            base.append({"name": "Bayes, same context, plug-in (optimistic)", **bay["plug_in"]})
            base.append({"name": "Bayes, same context, leave-one-out (pessimistic)", **bay["loo"]})
            base.append({"name": "2^-H(first | context) (a lower bound on Bayes top1)",
                         "top1": bay["two_pow_minus_h"], "n": len(t)})
    return [model, base, bay and {k: v for k, v in bay.items() if k not in ("plug_in", "loo")}]


def format_report(r: dict, width: int = 160) -> str:
    """The report as text tables (rich)."""
    import io

    from rich.console import Console
    from rich.table import Table

    buf = io.StringIO()
    con = Console(file=buf, width=width, force_terminal=False)
    sh = r["shape"]
    con.print(f"{r['kind']} checkpoint {r['checkpoint']} (preset {r['preset']}, {r['parameters']:,} parameters)")
    con.print(f"trace {r['trace']}: {sh['num_layers']} layers x {sh['num_experts']} experts, top-{sh['top_k']}; "
              f"split '{r['split']}': {len(r['requests'])} request(s) evaluated, baselines fit on "
              f"{r['fit_requests']} request(s)")
    for tb in r["tables"]:
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
        con.print(t)
        if b:
            con.print(f"  context = the routing the model sees + target layer: {b['contexts']:,} distinct contexts, "
                      f"{100 * b['singleton_share']:.1f}% of samples in a context seen once "
                      f"(plug-in counts those as always right). Plug-in H(first | context) = "
                      f"{b['entropy_bits']:.3f} bits.")
            if hollow:
                con.print("  n/a: nearly every context occurs once on this split, so the plug-in Bayes accuracy and "
                          "2^-H are ~100% by construction; the leave-one-out row is the (pessimistic) other end.")
        mrow = tb["rows"][0]
        if mrow.get("avg_confidence") is not None:
            con.print(f"  model's mean confidence: {mrow['avg_confidence']:.3f}")
    con.print("  (percent; top-n: first-choice expert among the n best; P@K = R@K: share of the routed set among "
              "the K best; exact: the K best are the routed set; R@K+n / all@K+n: share / all of the set among the "
              "K+n best; 1st∈set: the best is routed)")
    for lat, label in ((r.get("stored_latency"), "measured at training"), (r.get("latency_here"), "measured now")):
        if lat:
            pts = ", ".join(f"{n} tok {us:.0f} µs" for n, us in zip(lat["tokens"], lat["us"]))
            con.print(f"  forward latency {label} ({lat['device']}): {pts}")
    for n in r.get("notes", []):
        con.print(f"  note: {n}")
    return buf.getvalue()


def parameter_counts(shape: dict | None = None) -> list[dict]:
    """Parameter count of every preset for a trace shape (default OLMoE-like 16 x 64, top-8, d 2048)."""
    from .config import PRESETS, build_configs
    from .models import build_model, count_parameters

    shape = shape or {"num_layers": 16, "num_experts": 64, "top_k": 8, "input_dim": 2048}
    out = []
    for kind, table in PRESETS.items():
        sh = {k: v for k, v in shape.items() if kind == "pre_attention" or k != "input_dim"}
        for name in table:
            mc, tc = build_configs(kind, sh, name)
            out.append({"kind": kind, "preset": name, "parameters": count_parameters(build_model(mc)),
                        "model": {k: v for k, v in mc.model_dump().items()
                                  if k not in ("kind", "num_layers", "num_experts", "top_k", "input_dim")},
                        "train": {k: tc.model_dump()[k] for k in ("epochs", "batch_size", "lr")}})
    return out
