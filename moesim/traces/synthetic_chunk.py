"""The draws of `synthetic.iter_generate` for one chunk of whole requests: per-request noise, the AR(1)
processes across tokens and layers, the gate's top-k (with an optional sampled last choice), and the rows
as an Arrow table. The model-level draws (gates W, popularity bias) come from the caller."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from .schema import PHASES, trace_schema

if TYPE_CHECKING:
    from .synthetic import SyntheticParams


@dataclass
class _Noise:
    """A chunk's per-request draws, [C, Tm, ...] (zero past a request's end)."""

    xi: np.ndarray            # token innovations [C, Tm, L, d]
    eta: np.ndarray           # attention noise [C, Tm, L, d]
    topic: np.ndarray         # [C, d]
    z: np.ndarray             # per-request locality spread [C]
    loop: np.ndarray | None   # decode tokens that repeat `per` tokens back [C, Tm]
    per: np.ndarray           # loop period per request [C]
    tail: np.ndarray | None   # tokens whose last choice is sampled [C, Tm, L]
    tail_u: np.ndarray | None


def _chunk(reqs, totals, prompts, seeds, W, bias, p: SyntheticParams, K: int, want_pre: bool,
           want_scores: bool) -> pa.Table:
    L, E, d = W.shape
    reqs = list(reqs)
    Ts = totals[reqs]
    nz = _noise(reqs, Ts, seeds, p, L, d)
    _across_tokens(nz, p, prompts[reqs])
    h = _across_layers(nz, p)
    valid = np.arange(int(Ts.max()))[None, :] < Ts[:, None]          # [C, Tm]
    experts, sc = _route(h, nz, W, bias, p, K, valid, want_scores)
    return _table(reqs, Ts, prompts, experts, sc, h[valid] if want_pre else None, L, K, d)


def _noise(reqs: list, Ts: np.ndarray, seeds, p: SyntheticParams, L: int, d: int) -> _Noise:
    """Each request's draws from its own seed, in a fixed order (loops and tail choices last, so that
    without them the draws before are unchanged)."""
    C, Tm = len(reqs), int(Ts.max())
    nz = _Noise(np.zeros((C, Tm, L, d)), np.zeros((C, Tm, L, d)), np.zeros((C, d)), np.zeros(C),
                np.zeros((C, Tm), dtype=bool) if p.loop_share > 0 else None, np.zeros(C, dtype=np.int64),
                np.zeros((C, Tm, L), dtype=bool) if p.tail_prob > 0 else None,
                np.zeros((C, Tm, L)) if p.tail_prob > 0 else None)
    for i, r in enumerate(reqs):
        g = np.random.default_rng(int(seeds[r]))
        T = int(Ts[i])
        nz.topic[i] = g.standard_normal(d)
        nz.xi[i, :T] = g.standard_normal((T, L, d))
        nz.eta[i, :T] = g.standard_normal((T, L, d))
        if p.tau_spread > 0:
            nz.z[i] = g.standard_normal()
        if nz.loop is not None:
            nz.per[i] = g.integers(p.loop_period[0], p.loop_period[1] + 1)
            nz.loop[i, :T] = g.random(T) < p.loop_share
        if nz.tail is not None:
            nz.tail[i, :T] = g.random((T, L)) < p.tail_prob
            nz.tail_u[i, :T] = g.random((T, L))
    return nz


def _logistic_tau(t: float, spread: float, z: np.ndarray) -> np.ndarray:
    """Per-request tau: logit(t) shifted by spread·z, as [C, 1, 1]."""
    t0 = min(max(t, 1e-6), 1 - 1e-6)
    return (1.0 / (1.0 + np.exp(-(math.log(t0 / (1 - t0)) + spread * z))))[:, None, None]


def _across_tokens(nz: _Noise, p: SyntheticParams, pr_c: np.ndarray) -> None:
    """AR(1) across tokens, in place (xi becomes ε); prompt tokens at prompt_tau; loops copy a token `per` back."""
    xi, loop, per = nz.xi, nz.loop, nz.per
    C, Tm = xi.shape[:2]
    tau, a_t = p.tau, math.sqrt(max(0.0, 1.0 - p.tau**2))
    if p.tau_spread > 0:   # one tau per request
        tau = _logistic_tau(p.tau, p.tau_spread, nz.z)
        a_t = np.sqrt(1.0 - tau**2)
    if p.prompt_tau is not None:   # prompt tokens: logit(prompt_tau), with the request's spread
        tau_d = np.broadcast_to(np.asarray(tau, dtype=np.float64).reshape(-1), (C,)).copy()[:, None, None]
        tau_p = _logistic_tau(p.prompt_tau, p.tau_spread, nz.z)
    if loop is not None:
        loop &= np.arange(Tm)[None, :] >= np.maximum(pr_c, per)[:, None]   # decode tokens with a source
    for t in range(1, Tm):
        if p.prompt_tau is not None:
            tau = np.where((t >= pr_c)[:, None, None], tau_d, tau_p)
            a_t = np.sqrt(1.0 - tau**2)
        xi[:, t] *= a_t
        xi[:, t] += tau * xi[:, t - 1]
        if loop is not None and loop[:, t].any():
            rows = np.flatnonzero(loop[:, t])
            xi[rows, t] = xi[rows, t - per[rows]]


def _across_layers(nz: _Noise, p: SyntheticParams) -> np.ndarray:
    """AR(1) across layers, then the topic mixed in: the hidden states h (in place of xi)."""
    xi, L = nz.xi, nz.xi.shape[2]
    rho, a_l = p.rho, math.sqrt(max(0.0, 1.0 - p.rho**2))
    for l in range(1, L):
        xi[:, :, l] *= a_l
        xi[:, :, l] += rho * xi[:, :, l - 1]
    w = p.topic_weight
    h = xi
    h *= math.sqrt(1.0 - w)
    h += math.sqrt(w) * nz.topic[:, None, None, :]
    return h


def _route(h, nz: _Noise, W, bias, p: SyntheticParams, K: int, valid, want_scores: bool):
    """Each layer's top-k of the gate on h plus attention noise: (experts [n_tok, L, K], scores or None)."""
    L, E, _ = W.shape
    an = p.attention_noise
    n_tok = int(valid.sum())
    experts = np.empty((n_tok, L, K), dtype=np.int16)
    sc = np.empty((n_tok, L, K), dtype=np.float32) if want_scores else None
    for l in range(L):
        x = (h[:, :, l] + an * nz.eta[:, :, l]) / math.sqrt(1.0 + an * an)   # [C, Tm, d]
        logits = x[valid] @ W[l].T + bias[l]                                  # [n_tok, E]
        if K < E:
            idx = np.argpartition(-logits, K - 1, axis=1)[:, :K]
        else:
            idx = np.broadcast_to(np.arange(E), (n_tok, E)).copy()
        top = np.take_along_axis(logits, idx, axis=1)
        order = np.argsort(-top, axis=1, kind="stable")
        experts[:, l] = np.take_along_axis(idx, order, axis=1)
        if nz.tail is not None and K < E:
            _sample_last(experts, logits, nz.tail[:, :, l][valid], nz.tail_u[:, :, l][valid], l, K, E, p)
        if want_scores:
            m = logits.max(axis=1, keepdims=True)
            z = np.exp(logits - m)
            probs = z / z.sum(axis=1, keepdims=True)
            sc[:, l] = np.take_along_axis(probs, experts[:, l].astype(np.int64), axis=1)
    return experts, sc


def _sample_last(experts, logits, m, u_all, l: int, K: int, E: int, p: SyntheticParams) -> None:
    """The k-th choice of the tokens `m`: sampled from the gate's softmax at tail_temperature (the first k-1 out)."""
    if not m.any():
        return
    lg = logits[m] / p.tail_temperature
    pm = np.exp(lg - lg.max(axis=1, keepdims=True))
    np.put_along_axis(pm, experts[m, l, :K - 1].astype(np.int64), 0.0, axis=1)
    cs = np.cumsum(pm, axis=1)
    u = u_all[m] * cs[:, -1]
    experts[m, l, K - 1] = np.minimum((cs < u[:, None]).sum(axis=1), E - 1)


def _table(reqs: list, Ts, prompts, experts, sc, pre, L: int, K: int, d: int) -> pa.Table:
    """The rows in (request, token, layer) order."""
    n_tok = experts.shape[0]
    rid = np.repeat(np.asarray(reqs, dtype=np.int32), Ts)
    tok = np.concatenate([np.arange(T, dtype=np.int32) for T in Ts])
    pr = np.repeat(prompts[reqs], Ts)
    phase_tok = (tok >= pr).astype(np.int8)                              # 0 prefill, 1 decode
    n = n_tok * L
    cols = {
        "request_id": pa.array(np.repeat(rid, L), pa.int32()),
        "token": pa.array(np.repeat(tok, L), pa.int32()),
        "phase": pa.DictionaryArray.from_arrays(pa.array(np.repeat(phase_tok, L), pa.int8()), pa.array(PHASES)),
        "layer": pa.array(np.tile(np.arange(L, dtype=np.int16), n_tok), pa.int16()),
        "experts": _list(experts.reshape(n * K), K, pa.int16()),
    }
    if sc is not None:
        cols["scores"] = _list(sc.reshape(n * K), K, pa.float32())
    if pre is not None:
        cols["pre_attn"] = _list(pre.astype(np.float16).reshape(n * d), d, pa.float16())
    return pa.Table.from_pydict(cols, schema=trace_schema(scores=sc is not None, pre_attn=pre is not None))


def _list(values: np.ndarray, width: int, typ) -> pa.ListArray:
    offsets = np.arange(0, values.size + 1, width, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, typ))
