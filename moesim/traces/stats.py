"""Statistics of a trace (`moesim trace info`), computed in one streaming pass over its requests.

- popularity: per-layer entropy of the expert-selection frequencies (bits, and normalised by
  log2(num_experts): 1 = uniform).
- reuse distance: for each (layer, expert) access of a request, tokens since the same request last
  used that (layer, expert); percentiles over all re-accesses (first touches are counted apart).
- temporal locality: how often a token's top-1 expert at a layer equals the previous token's
  (Mixtral paper §5's "repetition"), and the mean overlap of consecutive tokens' top-k sets.
- transition predictability: accuracy of the best first-order predictor of a token's top-1 expert at
  layer l+1 from its top-1 at layer l (argmax of the joint counts, fitted and scored on the same
  trace, so an upper bound when tokens are few relative to num_experts²), next to the popularity-only
  baseline (always guess layer l+1's most used expert); a 2-fold held-out variant (fit on even
  request ids, score on odd, and back); conditional entropy H(e_{l+1} | e_l) in bits.
"""
from __future__ import annotations

import numpy as np

from .io import TraceReader


def _entropy_bits(counts: np.ndarray, axis=-1) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    tot = counts.sum(axis=axis, keepdims=True)
    p = np.divide(counts, tot, out=np.zeros_like(counts), where=tot > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
    return terms.sum(axis=axis)


def _pct(hist: np.ndarray, q: float) -> float | None:
    total = hist.sum()
    if total == 0:
        return None
    cdf = np.cumsum(hist)
    return int(np.searchsorted(cdf, q * total, side="left"))


def _r(x, nd=4):
    if x is None:
        return None
    if isinstance(x, np.ndarray):
        return [round(float(v), nd) for v in x]
    return round(float(x), nd)


class _Counts:
    """What one streaming pass over a trace's requests accumulates (module docstring)."""

    def __init__(self, L: int, E: int):
        self.L, self.E = L, E
        self.counts = np.zeros(L * E, dtype=np.int64)
        self.pairs = max(L - 1, 0)
        self.joint = np.zeros((2, self.pairs * E * E), dtype=np.int64)
        self.reuse = np.zeros(1, dtype=np.int64)
        self.first_touch = 0
        self.repeat = np.zeros(L, dtype=np.int64)
        self.top1_counts = np.zeros(L * E, dtype=np.int64)
        self.overlap = np.zeros(L, dtype=np.int64)
        self.steps = 0
        self.requests = self.prefill = self.decode = 0
        self.lay_off = (np.arange(L, dtype=np.int64) * E)[None, :, None]
        self.pair_off = (np.arange(self.pairs, dtype=np.int64) * E * E)[None, :]

    def add(self, r) -> None:
        self.requests += 1
        self.prefill += r.prompt_len
        self.decode += r.decode_len
        ex = r.experts.astype(np.int64)                       # [T, L, K]
        keys = (ex + self.lay_off).reshape(-1)                # (layer, expert) ids
        self.counts += np.bincount(keys, minlength=self.L * self.E)
        top1 = ex[:, :, 0]
        self.top1_counts += np.bincount((top1 + self.lay_off[:, :, 0]).reshape(-1), minlength=self.L * self.E)
        if self.pairs:
            jp = top1[:, :-1] * self.E + top1[:, 1:] + self.pair_off
            self.joint[r.request_id % 2] += np.bincount(jp.reshape(-1), minlength=self.pairs * self.E * self.E)
        self._add_reuse(ex, keys)
        T = ex.shape[0]
        if T > 1:
            self.repeat += (top1[1:] == top1[:-1]).sum(axis=0)
            self.overlap += (ex[1:, :, :, None] == ex[:-1, :, None, :]).any(axis=-1).sum(axis=(0, 2))
            self.steps += T - 1

    def _add_reuse(self, ex: np.ndarray, keys: np.ndarray) -> None:
        """Reuse distances within the request: tokens between two accesses of one (layer, expert)."""
        T = ex.shape[0]
        tt = np.broadcast_to(np.arange(T, dtype=np.int64)[:, None, None], ex.shape).reshape(-1)
        order = np.lexsort((tt, keys))
        ks, ts = keys[order], tt[order]
        same = ks[1:] == ks[:-1]
        d = (ts[1:] - ts[:-1])[same]
        self.first_touch += int(keys.size - same.sum()) if keys.size else 0
        if d.size:
            h = np.bincount(d)
            if h.size > self.reuse.size:
                self.reuse = np.concatenate([self.reuse, np.zeros(h.size - self.reuse.size, dtype=np.int64)])
            self.reuse[: h.size] += h


def trace_info(path) -> dict:
    """Statistics of the trace at `path` (a JSON-serialisable dict)."""
    reader = TraceReader(path)
    m = reader.meta
    L, E, K = m.num_layers, m.num_experts, m.top_k
    c = _Counts(L, E)
    for r in reader.iter_requests(pre_attn=False, scores=False):
        c.add(r)
    tokens = c.prefill + c.decode
    return {
        "file": str(path),
        "model": m.model,
        "source": m.source,
        "seed": m.seed,
        "num_layers": L,
        "num_experts": E,
        "top_k": K,
        "rows": reader.num_rows,
        "requests": c.requests,
        "tokens": tokens,
        "prefill_tokens": c.prefill,
        "decode_tokens": c.decode,
        "expert_accesses": int(tokens * L * K),
        "popularity": _popularity(c.counts.reshape(L, E)),
        "reuse_distance": _reuse(c.reuse, c.first_touch),
        "temporal": _temporal(c, tokens, K),
        "transition": _transition(c.joint, L, E),
    }


def _popularity(counts: np.ndarray) -> dict:
    E = counts.shape[1]
    ent = _entropy_bits(counts)
    norm = ent / np.log2(E) if E > 1 else np.ones(counts.shape[0])
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return {
        "entropy_bits": _r(float(ent.mean())),
        "entropy_normalised": _r(float(norm.mean())),
        "max_entropy_bits": _r(np.log2(E)),
        "entropy_bits_per_layer": _r(ent),
        "entropy_normalised_per_layer": _r(norm),
        "hottest_expert_share": _r(float(share.max(axis=1).mean())),  # mean over layers
    }


def _reuse(reuse: np.ndarray, first_touch: int) -> dict:
    return {
        "p50": _pct(reuse, 0.5), "p90": _pct(reuse, 0.9), "p99": _pct(reuse, 0.99),
        "mean": _r(float((np.arange(reuse.size) * reuse).sum() / reuse.sum())) if reuse.sum() else None,
        "reaccesses": int(reuse.sum()),
        "first_touches": int(first_touch),
        "unit": "tokens",
    }


def _temporal(c: _Counts, tokens: int, K: int) -> dict:
    steps, L = c.steps, c.L
    t1 = c.top1_counts.reshape(L, c.E) / max(tokens, 1)
    return {
        "top1_repeat": _r(c.repeat.sum() / (steps * L)) if steps else None,
        "top1_repeat_per_layer": _r(c.repeat / steps) if steps else None,
        # chance level under the observed top-1 popularity: mean over layers of sum_e p(e)^2
        "top1_repeat_chance": _r(float((t1 ** 2).sum(axis=1).mean())) if steps else None,
        "topk_overlap": _r(c.overlap.sum() / (steps * L * K)) if steps else None,
    }


def _transition(joint: np.ndarray, L: int, E: int) -> dict:
    pairs = max(L - 1, 0)
    if pairs == 0:
        return {"accuracy": None, "popularity_baseline": None, "conditional_entropy_bits": None,
                "note": "single-layer trace"}
    J = joint.reshape(2, pairs, E, E)               # [fold, pair, a (layer l), b (layer l+1)]
    A = J.sum(axis=0)
    N = A.sum(axis=(1, 2)).astype(np.float64)
    N1 = np.maximum(N, 1)
    acc = A.max(axis=2).sum(axis=1) / N1
    nxt = A.sum(axis=1)                              # [pair, b] marginal of layer l+1
    base = nxt.max(axis=1) / N1
    h_joint = _entropy_bits(A.reshape(pairs, E * E))
    h_prev = _entropy_bits(A.sum(axis=2))
    h_next = _entropy_bits(nxt)
    cond = h_joint - h_prev
    # 2-fold held-out: fit on one fold, score on the other
    held = held_base = None
    if (J.sum(axis=(1, 2, 3)) > 0).all():
        hit = hitb = 0
        for f in (0, 1):
            fit, test = J[f], J[1 - f]
            marg = fit.sum(axis=1)                                   # [pair, b]
            pop = marg.argmax(axis=1)                                # [pair]
            pred = np.where(fit.sum(axis=2) > 0, fit.argmax(axis=2), pop[:, None])   # [pair, a]
            hit += np.take_along_axis(test, pred[:, :, None], axis=2).sum()
            hitb += np.take_along_axis(test.sum(axis=1), pop[:, None], axis=1).sum()
        tot = J.sum()
        held, held_base = hit / tot, hitb / tot
    return {
        "accuracy": _r(acc.mean()),
        "popularity_baseline": _r(base.mean()),
        "heldout_accuracy": _r(held),
        "heldout_popularity_baseline": _r(held_base),
        "conditional_entropy_bits": _r(cond.mean()),
        "next_layer_entropy_bits": _r(h_next.mean()),
        "accuracy_per_layer": _r(acc),
        "popularity_baseline_per_layer": _r(base),
        "conditional_entropy_bits_per_layer": _r(cond),
        "predictor": "top-1 expert at layer l+1 from top-1 at layer l (first order, fitted in-sample)",
    }
