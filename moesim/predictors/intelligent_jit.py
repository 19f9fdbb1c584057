"""The intelligent predictor's per-gate fusion and per-step learning (predictors/intelligent.py),
compiled: as numpy they were dozens of small calls, costing more than their arithmetic.

Each value is the one the numpy code gave, bit for bit (tests/test_predictor_fast_paths.py): the
token scores in float32 (numpy keeps a Python float operand in the array's precision), the fused
scores summed as `w @ masks` sums them (weight by weight, from the first), each ranking as numpy's
stable argsort (ties: the lower id), here by picking the best left k times instead of sorting.
Imported by Intelligent itself, so that runs without it never load numba.
"""
from __future__ import annotations

import numpy as np
from numba import njit

_TIE = np.float32(1e-9)  # (scale of the transition tie-break; a float32, as numpy applied it to q)
_ONE = np.float32(1.0)


@njit(cache=True, nogil=True)
def fuse(q, masks, tie, w, thr_t, thr_p, kth_t, kth_p, pattern_ok, cap):
    """One target's fused prediction. q [T', E] float32: each token's best transition probability
    per expert (T' = 0: no token to carry); masks [4, E] float64, rows 1-2 (frequency, recency) set:
    rows 0 (transition) and 3 (pattern) are set here, as the union over the tokens of the experts
    above the component's threshold and at least the `kth`-th smallest of the token's values (the
    pattern only over the tokens with `pattern_ok`); tie [E] float64: the frequency tie-break,
    to which the tokens' summed q (scaled) is added. Returns (the experts to prefetch, best fused
    score first (ties: lower id), at most `cap`, each with a positive fused score; their scores)."""
    T, E = q.shape
    key = tie.copy()  # (the tie-breaks, then the sort key -(fused + tie))
    if T:
        s = np.empty(E, dtype=np.float32)
        row = np.empty(E, dtype=np.float32)
        picks = E - min(kth_t, kth_p)
        for t in range(T):
            row[:] = q[t]
            vt = vp = row[0]
            for i in range(picks):  # the largest values one by one: the i-th is sorted q's [E - 1 - i]
                best = 0
                for e in range(1, E):
                    if row[e] > row[best]:
                        best = e
                if i == E - 1 - kth_t:
                    vt = row[best]
                if i == E - 1 - kth_p:
                    vp = row[best]
                row[best] = -np.inf
            for e in range(E):
                x = q[t, e]
                if x > thr_t and x >= vt:
                    masks[0, e] = 1.0
                if pattern_ok[t] and x > thr_p and x >= vp:
                    masks[3, e] = 1.0
                s[e] = x if t == 0 else s[e] + x
        for e in range(E):
            x = s[e] if s[e] < _ONE else _ONE
            key[e] += _TIE * x
    fused = np.empty(E, dtype=np.float64)
    for e in range(E):
        f = 0.0
        for c in range(4):  # (w @ masks: each weight added in turn)
            f += w[c] * masks[c, e]
        fused[e] = f
        key[e] = -(f + key[e])
    # numpy's stable argsort of the key, cut at `cap` and at the first score <= 0: the best left,
    # picked one by one (ties: the lower id)
    out = np.empty(min(cap, E), dtype=np.int64)
    n = 0
    while n < out.size:
        best = 0
        for e in range(1, E):
            if key[e] < key[best]:
                best = e
        if not fused[best] > 0 or key[best] == np.inf:
            break
        key[best] = np.inf
        out[n] = best
        n += 1
    for i in range(1, n):  # best fused score first, ties: the lower id (insertion sort: n is small)
        a = out[i]
        j = i - 1
        while j >= 0 and (fused[out[j]] < fused[a] or (fused[out[j]] == fused[a] and out[j] > a)):
            out[j + 1] = out[j]
            j -= 1
        out[j + 1] = a
    keep = out[:n]
    return keep, fused[keep]


@njit(cache=True, nogil=True)
def adapt(masks, te, w, w0, lr, f1):
    """Intelligent._evaluate: the fusion weights after scoring each component's prediction for a
    layer (`masks` [4, E], 0/1) against the experts it routed, `te` [T, k]. f1: w += lr (F1 - 0.5),
    at least 0, renormalised (`w0` if all are 0); else an EMA towards 1 / (1 - F1 + 0.1),
    normalised. (The same float operations, in the same order, as the Python code it replaced.)"""
    E, C = masks.shape[1], masks.shape[0]
    routed = np.zeros(E, dtype=np.bool_)
    for t in range(te.shape[0]):
        for j in range(te.shape[1]):
            routed[te[t, j]] = True
    n_act = 0.0
    for e in range(E):
        n_act += routed[e]
    tp, made = np.zeros(C), np.zeros(C)  # (counts of 0/1 masks: exact in any order)
    for c in range(C):
        for e in range(E):
            made[c] += masks[c, e]
            if routed[e]:
                tp[c] += masks[c, e]
    out = w.copy()
    if f1:
        for c in range(C):
            if made[c] > 0:
                x = out[c] + lr * (2.0 * tp[c] / (made[c] + n_act) - 0.5)  # F1 = 2TP/(|P|+|A|)
                out[c] = x if x > 0.0 else 0.0
        tot = 0.0
        for c in range(C):
            tot += out[c]
        return out / tot if tot > 0 else w0.copy()
    target = np.empty(C)
    for c in range(C):
        target[c] = 1.0 / ((1.0 - 2.0 * tp[c] / (made[c] + n_act) if made[c] > 0 else 1.0) + 0.1)
    tt = 0.0
    for c in range(C):
        tt += target[c]
    for c in range(C):
        out[c] = (1 - lr) * w[c] + lr * target[c] / tt
    return out


@njit(cache=True, nogil=True)
def first_hop(P, src, te):
    """[T, E] float32: per token of `te` [T, k] at layer `src`, each expert's best transition
    probability from the token's experts (P[src][te].max(axis=1), in one pass)."""
    T, k = te.shape
    E = P.shape[2]
    q = np.empty((T, E), dtype=np.float32)
    for t in range(T):
        q[t] = P[src, te[t, 0]]
        for j in range(1, k):
            row = P[src, te[t, j]]
            for e in range(E):
                if row[e] > q[t, e]:
                    q[t, e] = row[e]
    return q


@njit(cache=True, nogil=True)
def _mark_top(v, k, used, out):
    """out[e] = 1 for the `k` largest of v (ties: the lower id; numpy's stable argsort of -v, cut
    at k) among them those `used` (> 0): k picks of the best left, fewer steps than a sort."""
    taken = np.zeros(v.size, dtype=np.bool_)
    for _ in range(k):
        best = -1
        for e in range(v.size):
            if not taken[e] and (best < 0 or v[e] > v[best]):
                best = e
        taken[best] = True
        if used[best] > 0:
            out[best] = 1.0


@njit(cache=True, nogil=True)
def refresh(freq, last_used, tot, freq_k, recency_k):
    """Intelligent._refresh after learning, per layer: the frequency tie-breaks (1e-12 x each
    expert's share of the layer's uses, `tot` [L] the layer's total) and the component masks before
    the transitions' [L, 4, E]: row 1 the `freq_k` most used experts (used at all), row 2 the
    `recency_k` most recently used (ties: the larger share; used at all). Ties: the lower id."""
    L, E = freq.shape
    tie = np.empty((L, E))
    masks = np.zeros((L, 4, E))
    for l in range(L):
        share = freq[l] / (tot[l] if tot[l] > 0 else 1.0)
        tie[l] = 1e-12 * share
        _mark_top(freq[l], freq_k, freq[l], masks[l, 1])
        _mark_top(last_used[l] + 0.5 * share, recency_k, last_used[l], masks[l, 2])
    return tie, masks


@njit(cache=True, nogil=True)
def learn(trans, rowsum, P, freq, last_used, rows, prev, pvalid, inc, finc, clock):
    """Intelligent._learn's counting, as numpy's add.at did it (every addition of one call adds the
    same amount, so their order does not change the sums). Each transition of `rows` [T', L, k]
    (layer l -> l+1, and from the request's previous token's last layer, `prev`, to layer 0 where
    `pvalid`) adds `inc` to its count in trans [L, E, E] and to the row's sum; the changed rows of
    P become trans / rowsum (float32); each use adds `finc` to freq [L, E] and stamps last_used
    with `clock`."""
    T, L, k = rows.shape
    E = freq.shape[1]
    touched = np.zeros((L, E), dtype=np.bool_)
    for t in range(T):
        for l in range(L - 1):
            for j in range(k):
                a = rows[t, l, j]
                for i in range(k):
                    trans[l, a, rows[t, l + 1, i]] += inc
                    rowsum[l, a] += inc
                touched[l, a] = True
    for t in range(T):
        if pvalid[t]:
            for j in range(k):
                a = prev[t, L - 1, j]
                for i in range(k):
                    trans[L - 1, a, rows[t, 0, i]] += inc
                    rowsum[L - 1, a] += inc
                touched[L - 1, a] = True
    for l in range(L):
        for a in range(E):
            if touched[l, a]:
                for b in range(E):
                    P[l, a, b] = trans[l, a, b] / rowsum[l, a]
    for t in range(T):
        for l in range(L):
            for j in range(k):
                freq[l, rows[t, l, j]] += finc
                last_used[l, rows[t, l, j]] = clock
