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

from ...errors import InputError
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
    from .training import load_model, measure_latency

    ck = ckpt_io.load(checkpoint, field="checkpoint")
    kind = ck["kind"]
    mc = model_config_from_dict(ck["model_config"])
    tc = TrainConfig(**ck["train_config"])
    train_trace = _training_trace(ck)
    trace = _trace_to_evaluate(ck, checkpoint, trace, train_trace)
    data = load_trace(trace, pre_attn=(kind == "pre_attention"), scores=False)
    L, E, K = data.shape
    if (L, E, K) != (mc.num_layers, mc.num_experts, mc.top_k):
        raise InputError(f"trace shape {L} layers x {E} experts top-{K} differs from the checkpoint's "
                         f"{mc.num_layers} x {mc.num_experts} top-{mc.top_k}", file=str(trace), field="--trace")
    same = data.fingerprint == ck["trace"]["fingerprint"]
    split = split or ("test" if same else "all")
    eval_ids, fit_ids, fit_data, notes = _requests(ck, data, trace, split, same, train_trace)
    ev = select_requests(data, eval_ids)
    fit = select_requests(fit_data, fit_ids)
    net = load_model(ck, device)
    delta = overprovision(tc, K)
    tables = (_speculation_tables if kind == "speculation" else _pre_attention_tables)(
        net, mc, ev, fit, (L, E, K), delta, device)
    report = {
        "kind": kind, "checkpoint": str(checkpoint), "preset": ck.get("preset"), "parameters": ck.get("parameters"),
        "trace": str(trace), "same_trace": same, "split": split, "requests": eval_ids,
        "fit_requests": len(fit_ids), "shape": {"num_layers": L, "num_experts": E, "top_k": K},
        "overprovision": delta, "columns": columns(K, E, delta), "tables": tables,
        "notes": notes, "stored_latency": ck.get("latency"), "train_seconds": ck.get("train_seconds"),
        "best_epoch": ck.get("best_epoch"), "stopped": ck.get("stopped"),
        "model_config": ck["model_config"],
    }
    if measure:
        report["latency_here"] = measure_latency(net, device, repeats=20)
    return report


def _trace_to_evaluate(ck: dict, checkpoint, trace, train_trace):
    """`trace`, else the training trace; an InputError naming the checkpoint when neither is there."""
    if trace is not None:
        return trace
    if train_trace is None:
        tr, mcd = ck["trace"], ck["model_config"]
        raise InputError(f"the trace it was trained on ({tr.get('path')}) is not there (or has changed): give "
                         f"--trace, a trace of a {mcd['num_layers']}-layer, {mcd['num_experts']}-expert, "
                         f"top-{mcd['top_k']} model", file=str(checkpoint), field="--trace")
    return train_trace


def _requests(ck: dict, data, trace, split: str, same: bool, train_trace) -> tuple[list, list, object, list]:
    """(evaluated request ids, ids the baselines are fit on, the data those come from, notes) for `split`."""
    sp = ck["split"]
    notes = []
    fit_data = data
    if split != "all":
        if not same:
            raise InputError(f"split {split!r} needs the trace the checkpoint was trained on "
                             "(use --split all for another trace)", file=str(trace), field="--split")
        return sp[split], (sp["train"] + sp["val"] if split == "test" else sp["train"]), fit_data, notes
    eval_ids = [r.request_id for r in data.requests]
    fit_ids = sp["train"] + sp["val"]
    if same:
        notes.append("split 'all' includes the training requests: the model's numbers are optimistic")
    elif train_trace is not None:
        fit_data = load_trace(train_trace, pre_attn=(ck["kind"] == "pre_attention"))
        notes.append(f"another trace than the training one: the frequency/Markov baselines are fit on the "
                     f"model's own training requests ({train_trace}), every request here is unseen by both")
    else:
        fit_ids = eval_ids
        notes.append("another trace than the training one, and the training trace is not at hand: the "
                     "frequency/Markov baselines are fit on the evaluated requests themselves (in-sample, "
                     "favouring them)")
    return eval_ids, fit_ids, fit_data, notes


def _speculation_tables(net, mc, ev, fit, shape, delta, device) -> list[dict]:
    """One table per offset d: layer l+d predicted at the gate of layer l, beside the baselines and Bayes."""
    from .training import spec_predict, spec_tensors

    L, E, K = shape
    s = speculation_samples(ev, L, mc.context_length, mc.horizon, mc.cross_token, mc.prev_tokens)
    sf = speculation_samples(fit, L, mc.context_length, mc.horizon, mc.cross_token, mc.prev_tokens)
    logits, conf = spec_predict(net, spec_tensors(s), device)
    tables = []
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
    return tables


def _pre_attention_tables(net, mc, ev, fit, shape, delta, device) -> list[dict]:
    """One table: the same layer's experts predicted from its pre-attention hidden state."""
    from .training import pre_predict, pre_tensors

    L, E, K = shape
    s = pre_attention_samples(ev)
    sf = pre_attention_samples(fit)
    scores = pre_predict(net, pre_tensors(s), device)
    t, tf = _pre_targets(s), _pre_targets(sf)
    rows = _rows(scores, t, tf, L, E, K, delta, None)
    return [{"title": "same layer, before attention (pre_attn of layer l -> experts of layer l)",
             "offset": 0, "n": len(t), "rows": rows[0:1] + rows[1], "bayes": None}]


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
