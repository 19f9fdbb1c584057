"""Ranking metrics and the baselines every learned predictor is compared with (numpy only).

A predictor here is a pair of score matrices over the experts of each sample's target layer:
`first` ranks candidates for the first-choice expert, `set` ranks them for membership of the routed
set (for top-1 models both are the same). Metrics:

- top-n (n = 1, 3, 5, 10): the first-choice expert is among the n best by `first`;
- P@K = R@K: share of the K routed experts among the K best by `set` (equal when both sets have K);
- exact: the K best by `set` are exactly the routed set (seed 003's "exact-match");
- R@K+n: share of the routed experts among the K+n best (over-provisioning, seed 003);
- all@K+n: every routed expert is among the K+n best (the hit rate of seed 003's over-provisioning);
- 1st∈set: the single best by `set` is one of the routed experts (seed 003's "top-1").

Baselines (fit on the training requests, scored on the same held-out samples):
random (expected values, exact), frequency (per target layer), recency (the request's experts at
the target layer in its previous tokens, most recent first), first-order layer-to-layer Markov
(P(target layer's experts | the experts of the one source layer), counts summed over the source's
K experts), and the empirical Bayes accuracy of the exact context (plug-in and leave-one-out).
"""
from __future__ import annotations

import math

import numpy as np

TOPN = (1, 3, 5, 10)
TINY = 1e-6


def columns(K: int, E: int, delta: int) -> list[str]:
    cols = [f"top{n}" for n in TOPN if n <= E]
    if K > 1:
        cols += ["P@K", "exact", f"R@K+{delta}", f"all@K+{delta}", "1st∈set"]
    return cols


def score_metrics(s_first: np.ndarray, s_set: np.ndarray | None, first: np.ndarray, sets: np.ndarray,
                  delta: int) -> dict:
    """Metrics of score matrices [N, E] against first-choice experts [N] and routed sets [N, K]."""
    N, E = s_first.shape
    K = sets.shape[1]
    out: dict = {"n": int(N)}
    if N == 0:
        return out
    nmax = min(max(TOPN), E)
    top = _topn(s_first, nmax)
    hit = top == first[:, None]
    for n in TOPN:
        if n <= E:
            out[f"top{n}"] = float(hit[:, :n].any(axis=1).mean())
    if K > 1:
        s_set = s_first if s_set is None else s_set
        m = min(K + delta, E)
        tops = _topn(s_set, m)
        member = (tops[:, :, None] == sets[:, None, :]).any(axis=2)     # [N, m]
        inK = member[:, :K].sum(axis=1)
        inKd = member.sum(axis=1)
        out["P@K"] = float((inK / K).mean())
        out["exact"] = float((inK == K).mean())
        out[f"R@K+{delta}"] = float((inKd / K).mean())
        out[f"all@K+{delta}"] = float((inKd == K).mean())
        out["1st∈set"] = float(member[:, 0].mean())
    return out


def _topn(s: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest scores per row, best first (ties: lower index first)."""
    E = s.shape[1]
    if n >= E:
        return np.argsort(-s, axis=1, kind="stable")
    part = np.argpartition(-s, n - 1, axis=1)[:, :n]
    vals = np.take_along_axis(s, part, axis=1)
    o = np.lexsort((part, -vals), axis=1)   # by score, then by index
    return np.take_along_axis(part, o, axis=1)


def random_metrics(K: int, E: int, delta: int) -> dict:
    """Expected metrics of a uniformly random ranking (exact, not sampled)."""
    out: dict = {}
    for n in TOPN:
        if n <= E:
            out[f"top{n}"] = n / E
    if K > 1:
        m = min(K + delta, E)
        out["P@K"] = K / E
        out["exact"] = 1.0 / math.comb(E, K)
        out[f"R@K+{delta}"] = m / E
        out[f"all@K+{delta}"] = math.comb(E - K, m - K) / math.comb(E, m)
        out["1st∈set"] = K / E
    return out


# ---- count-based baselines -----------------------------------------------------------------------

class Targets:
    """What a set of samples asks for: per sample the target (global token, layer) and an optional
    source (global token, layer) for the Markov baseline."""

    def __init__(self, routing: np.ndarray, tgt_g: np.ndarray, tgt_l: np.ndarray, src_g: np.ndarray,
                 src_l: np.ndarray, src_ok: np.ndarray, tok_in_req: np.ndarray):
        self.routing = routing
        self.tgt_g, self.tgt_l = tgt_g, tgt_l
        self.src_g, self.src_l, self.src_ok = src_g, src_l, src_ok
        self.tok_in_req = tok_in_req  # target token's index within its request (for recency)
        self.sets = routing[tgt_g, tgt_l]       # [N, K]
        self.first = self.sets[:, 0]

    def __len__(self) -> int:
        return int(self.tgt_g.shape[0])


class Frequency:
    def __init__(self, fit: Targets, L: int, E: int):
        self.first = np.zeros((L, E))
        self.set = np.zeros((L, E))
        np.add.at(self.first, (fit.tgt_l, fit.first), 1.0)
        np.add.at(self.set, (fit.tgt_l[:, None], fit.sets), 1.0)
        # layers never seen as a target: fall back to all layers' counts
        for a in (self.first, self.set):
            empty = a.sum(axis=1) == 0
            a[empty] = a.sum(axis=0)
        self.first /= np.maximum(self.first.sum(axis=1, keepdims=True), 1)
        self.set /= np.maximum(self.set.sum(axis=1, keepdims=True), 1)

    def scores(self, t: Targets) -> tuple[np.ndarray, np.ndarray]:
        return self.first[t.tgt_l], self.set[t.tgt_l]


class Markov:
    """Counts of (source layer expert -> target layer expert) per (source layer, target layer)."""

    def __init__(self, fit: Targets, L: int, E: int, freq: Frequency):
        self.E, self.freq = E, freq
        ok = fit.src_ok
        src = fit.routing[fit.src_g[ok], fit.src_l[ok]]            # [n, K]
        sl, tl = fit.src_l[ok], fit.tgt_l[ok]
        self.pairs = {}
        pair_id = sl * L + tl
        self._pair_index = {}
        uniq = np.unique(pair_id)
        for i, p in enumerate(uniq.tolist()):
            self._pair_index[p] = i
        P = len(uniq)
        self.c_first = np.zeros((max(P, 1), E, E))
        self.c_set = np.zeros((max(P, 1), E, E))
        pidx = np.searchsorted(uniq, pair_id)
        sets = fit.sets[ok]
        np.add.at(self.c_first, (pidx, src[:, 0], sets[:, 0]), 1.0)
        K = src.shape[1]
        for i in range(K):
            for j in range(K):
                np.add.at(self.c_set, (pidx, src[:, i], sets[:, j]), 1.0)
        self.uniq, self.L = uniq, L

    def scores(self, t: Targets) -> tuple[np.ndarray, np.ndarray]:
        f1, fs = self.freq.scores(t)
        N = len(t)
        s1, ss = np.zeros((N, self.E)), np.zeros((N, self.E))
        pair = t.src_l * self.L + t.tgt_l
        pos = np.searchsorted(self.uniq, pair)
        known = t.src_ok & (pos < len(self.uniq)) & (self.uniq[np.minimum(pos, len(self.uniq) - 1)] == pair)
        idx = np.flatnonzero(known)
        if idx.size:
            src = t.routing[t.src_g[idx], t.src_l[idx]]              # [n, K]
            p = pos[idx]
            s1[idx] = self.c_first[p, src[:, 0]]
            ss[idx] = self.c_set[p[:, None], src].sum(axis=1)
        # unseen rows / no source: frequency (it also breaks ties)
        return s1 + TINY * f1, ss + TINY * fs


class Recency:
    """The request's experts at the target layer in its `window` previous tokens, weighted 2^-lag
    (first-choice scores: the first choices only); frequency breaks ties and fills in."""

    def __init__(self, freq: Frequency, window: int = 16):
        self.freq, self.window = freq, window

    def scores(self, t: Targets) -> tuple[np.ndarray, np.ndarray]:
        f1, fs = self.freq.scores(t)
        N, E = f1.shape
        s1, ss = np.zeros((N, E)), np.zeros((N, E))
        for lag in range(1, self.window + 1):
            ok = np.flatnonzero(t.tok_in_req >= lag)
            if not ok.size:
                break
            w = 2.0 ** -lag
            prev = t.routing[t.tgt_g[ok] - lag, t.tgt_l[ok]]        # [n, K]
            cur1 = s1[ok, prev[:, 0]]
            s1[ok, prev[:, 0]] = np.maximum(cur1, w)
            for j in range(prev.shape[1]):
                cur = ss[ok, prev[:, j]]
                ss[ok, prev[:, j]] = np.maximum(cur, w * (1 - 0.01 * j))
        return s1 + TINY * f1, ss + TINY * fs


def bayes(context: np.ndarray, t: Targets, E: int, freq: Frequency, delta: int) -> dict:
    """Empirical Bayes accuracy of predictors that see exactly `context` ([N, c] ints), on these
    samples: plug-in (each context's own empirical distribution, including the sample scored:
    optimistic, very much so when contexts are rare) and leave-one-out (the other samples with the
    same context; frequency when there are none: pessimistic). Also the seeds' 2^-H(first | context)
    (plug-in entropy), which is a LOWER bound on the Bayes accuracy, not a ceiling."""
    N = len(t)
    K = t.sets.shape[1]
    if N == 0:
        return {}
    _, grp, cnt = np.unique(context, axis=0, return_inverse=True, return_counts=True)
    grp = grp.ravel()
    G = cnt.shape[0]
    c1 = np.zeros((G, E))
    cs = np.zeros((G, E))
    np.add.at(c1, (grp, t.first), 1.0)
    np.add.at(cs, (grp[:, None], t.sets), 1.0)
    f1, fs = freq.scores(t)
    plug1, plugs = c1[grp] + TINY * f1, cs[grp] + TINY * fs
    own1 = np.zeros((N, E))
    own1[np.arange(N), t.first] = 1.0
    owns = np.zeros((N, E))
    owns[np.arange(N)[:, None], t.sets] = 1.0
    loo1, loos = c1[grp] - own1, cs[grp] - owns
    alone = cnt[grp] == 1
    loo1[alone] = 0.0
    loos[alone] = 0.0
    loo1 += TINY * f1
    loos += TINY * fs
    plug = score_metrics(plug1, plugs, t.first, t.sets, delta)
    loo = score_metrics(loo1, loos, t.first, t.sets, delta)
    if K > 1:
        # exact-set Bayes: the most frequent set of each context (plug-in)
        keyset = np.sort(t.sets, axis=1)
        _, sgrp = np.unique(np.concatenate([grp[:, None], keyset], axis=1), axis=0, return_inverse=True)
        sgrp = sgrp.ravel()
        scnt = np.bincount(sgrp)
        best = np.zeros(G)
        np.maximum.at(best, grp, scnt[sgrp])
        plug["exact"] = float(best.sum() / N)
    # entropy of the first choice given the context (plug-in)
    p = c1 / cnt[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log2(p), 0.0).sum(axis=1)
    H = float((cnt * h).sum() / N)
    return {"plug_in": plug, "loo": loo, "entropy_bits": H, "two_pow_minus_h": 2.0 ** -H,
            "contexts": int(G), "singleton_share": float(alone.mean())}
