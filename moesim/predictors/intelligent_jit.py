"""The intelligent predictor's per-gate fusion and per-step learning (predictors/intelligent.py),
compiled: as numpy they were dozens of small calls, costing more than their arithmetic.

Each value is the one the numpy code gave, bit for bit (tests/test_predictor_fast_paths.py): the
token scores in float32 (numpy keeps a Python float operand in the array's precision), the fused
scores summed as `w @ masks` sums them (weight by weight, from the first), each ranking as numpy's
stable argsort (ties: the lower id), here by keeping the best few in order instead of sorting.
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
    E = q.shape[1]
    out, fused = np.empty(min(cap, E), dtype=np.int64), np.empty(E, dtype=np.float64)
    n = _fuse_into(q, masks, tie, w, thr_t, thr_p, kth_t, kth_p, pattern_ok, out, fused, np.empty(E),
                   np.empty(E, dtype=np.float32), np.empty(E, dtype=np.float32))
    keep = out[:n]
    return keep, fused[keep]


@njit(cache=True, nogil=True)
def _fuse_into(q, masks, tie, w, thr_t, thr_p, kth_t, kth_p, pattern_ok, out, fused, key, s, top):
    """fuse, into `out` (its experts, [min(cap, E)]: returns how many) and `fused` [E] (every
    expert's fused score), with scratch space `key` [E] float64, `s` and `top` [E] float32."""
    T, E = q.shape
    key[:] = tie  # (the tie-breaks, then the sort key -(fused + tie))
    if T:
        kt, kp = E - kth_t, E - kth_p  # (the kt-th largest value is sorted q's [kth_t])
        size = max(kt, kp)  # top[:size]: the token's largest values, descending
        for t in range(T):
            n = 0
            for e in range(E):
                x = q[t, e]
                if n < size:
                    n += 1
                elif not x > top[n - 1]:
                    continue
                j = n - 1
                while j > 0 and top[j - 1] < x:
                    top[j] = top[j - 1]
                    j -= 1
                top[j] = x
            vt, vp = top[kt - 1], top[kp - 1]
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
    zk, zi = np.inf, E  # the first expert with no positive score in key order (ties: the lower id)
    for e in range(E):
        f = 0.0
        for c in range(4):  # (w @ masks: each weight added in turn)
            f += w[c] * masks[c, e]
        fused[e] = f
        key[e] = -(f + key[e])
        if not f > 0 and key[e] < zk:
            zk, zi = key[e], e
    # numpy's stable argsort of the key, cut at `cap` and where the first score <= 0 stands: the
    # experts before that one, the `cap` with the lowest keys (ties: the lower id), in key order
    n = 0
    for e in range(E):
        k = key[e]
        if not fused[e] > 0 or k > zk or (k == zk and e > zi):
            continue
        if n == out.size:
            if not k < key[out[n - 1]]:
                continue
        else:
            n += 1
        j = n - 1
        while j > 0 and key[out[j - 1]] > k:
            out[j] = out[j - 1]
            j -= 1
        out[j] = e
    for i in range(1, n):  # best fused score first, ties: the lower id (insertion sort: n is small)
        a = out[i]
        j = i - 1
        while j >= 0 and (fused[out[j]] < fused[a] or (fused[out[j]] == fused[a] and out[j] > a)):
            out[j + 1] = out[j]
            j -= 1
        out[j + 1] = a
    return n


@njit(cache=True, nogil=True)
def adapt(masks, te, w, w0, lr, f1):
    """Intelligent._evaluate: the fusion weights after scoring each component's prediction for a
    layer (`masks` [4, E], 0/1) against the experts it routed, `te` [T, k]. f1: w += lr (F1 - 0.5),
    at least 0, renormalised (`w0` if all are 0); else an EMA towards 1 / (1 - F1 + 0.1),
    normalised. (The same float operations, in the same order, as the Python code it replaced.)"""
    out = np.empty(w.size)
    _adapt_into(masks, te, w, w0, lr, f1, out, np.empty(masks.shape[1], dtype=np.bool_), np.empty((3, w.size)))
    return out


@njit(cache=True, nogil=True)
def _adapt_into(masks, te, w, w0, lr, f1, out, routed, tmp):
    """adapt, into `out` (may be `w` itself), with scratch space `routed` [E] and `tmp` [3, C]."""
    E, C = masks.shape[1], masks.shape[0]
    routed[:] = False
    for t in range(te.shape[0]):
        for j in range(te.shape[1]):
            routed[te[t, j]] = True
    n_act = 0.0
    for e in range(E):
        n_act += routed[e]
    tp, made, target = tmp[0], tmp[1], tmp[2]  # (counts of 0/1 masks: exact in any order)
    tp[:] = 0.0
    made[:] = 0.0
    for c in range(C):
        for e in range(E):
            made[c] += masks[c, e]
            if routed[e]:
                tp[c] += masks[c, e]
    if f1:
        for c in range(C):
            x = w[c]
            if made[c] > 0:
                x = x + lr * (2.0 * tp[c] / (made[c] + n_act) - 0.5)  # F1 = 2TP/(|P|+|A|)
                x = x if x > 0.0 else 0.0
            out[c] = x
        tot = 0.0
        for c in range(C):
            tot += out[c]
        for c in range(C):
            out[c] = out[c] / tot if tot > 0 else w0[c]
        return
    for c in range(C):
        target[c] = 1.0 / ((1.0 - 2.0 * tp[c] / (made[c] + n_act) if made[c] > 0 else 1.0) + 0.1)
    tt = 0.0
    for c in range(C):
        tt += target[c]
    for c in range(C):
        out[c] = (1 - lr) * w[c] + lr * target[c] / tt


@njit(cache=True, nogil=True)
def first_hop(P, src, te):
    """[T, E] float32: per token of `te` [T, k] at layer `src`, each expert's best transition
    probability from the token's experts (P[src][te].max(axis=1), in one pass)."""
    q = np.empty((te.shape[0], P.shape[2]), dtype=np.float32)
    _first_hop_into(P, src, te, q)
    return q


@njit(cache=True, nogil=True)
def _first_hop_into(P, src, te, q):
    """first_hop, into `q` [T, E]."""
    T, k = te.shape
    E = P.shape[2]
    for t in range(T):
        row = P[src, te[t, 0]]
        for e in range(E):
            q[t, e] = row[e]
        for j in range(1, k):
            row = P[src, te[t, j]]
            for e in range(E):
                if row[e] > q[t, e]:
                    q[t, e] = row[e]


@njit(cache=True, nogil=True)
def start(P, prev, pvalid, pattern, masks0, tie, w, thr_t, thr_p, kth_t, kth_p, cap):
    """Intelligent._predict at a step's start, one layer ahead: layer 0's fused prediction from the
    last layer of each row's previous token (`prev` [n, L, k], the rows where `pvalid`), all of
    them in the pattern component if `pattern`. Returns (experts, scores, the component masks:
    the prediction pending for layer 0's gate)."""
    n, L, k = prev.shape
    m = 0
    for i in range(n):
        m += pvalid[i]
    te = np.empty((m, k), dtype=np.int64)
    j = 0
    for i in range(n):
        if pvalid[i]:
            te[j] = prev[i, L - 1]
            j += 1
    masks = masks0[0].copy()
    ok = np.full(m, pattern, dtype=np.bool_)
    keep, fused = fuse(first_hop(P, L - 1, te), masks, tie[0], w, thr_t, thr_p, kth_t, kth_p, ok, cap)
    return keep, fused, masks


@njit(cache=True, nogil=True)
def gates(P, routing, rows, pvalid, need, masks0, tie, w, w0, lr, f1, pending, has_pending, thr_t, thr_p, kth_t,
          kth_p, cap):
    """Intelligent.on_gate at each layer of a step in turn, with one layer of look-ahead: score the
    prediction made one layer earlier (`pending` [4, E] for layer 0, if `has_pending`) against the
    layer's routing (`routing` [T, L, k]) and adapt the weights `w`; then predict the next layer
    from the layer's rows `rows` [T', L, k] (the sampled tokens; those with `need` layers of history
    are the pattern component's, counting the previous token's layers where `pvalid` [T']).
    Returns (the experts of every layer's prediction in turn, their fused scores, where each
    layer's end [L], the weights after the last layer, and the last layer's component masks: the
    pending prediction for the next step's layer 0)."""
    T, L, k = routing.shape
    E = P.shape[2]
    C = min(cap, E)
    keep_all = np.empty(L * C, dtype=np.int64)
    fused_all = np.empty(L * C, dtype=np.float64)
    ends = np.empty(L, dtype=np.int64)
    w = w.copy()
    routed, tmp = np.empty(E, dtype=np.bool_), np.empty((3, w.size))
    fused, key = np.empty(E), np.empty(E)
    s, top = np.empty(E, dtype=np.float32), np.empty(E, dtype=np.float32)
    q = np.empty((rows.shape[0], E), dtype=np.float32)
    ok = np.empty(rows.shape[0], dtype=np.bool_)
    masks = np.empty((2, 4, E))  # (this layer's prediction, and the one before it)
    masks[1] = pending
    have, n = has_pending, 0
    for l in range(L):
        cur, prev = masks[l % 2], masks[1 - l % 2]
        if have:
            _adapt_into(prev, routing[:, l, :], w, w0, lr, f1, w, routed, tmp)
        lay = (l + 1) % L
        cur[:] = masks0[lay]
        _first_hop_into(P, l, rows[:, l, :], q)
        for t in range(ok.size):
            ok[t] = l + 1 >= need or (pvalid[t] and l + 1 + L >= need)
        out = keep_all[n:n + C]
        m = _fuse_into(q, cur, tie[lay], w, thr_t, thr_p, kth_t, kth_p, ok, out, fused, key, s, top)
        for i in range(m):
            fused_all[n + i] = fused[out[i]]
        n += m
        ends[l] = n
        have = True
    return keep_all[:n], fused_all[:n], ends, w, masks[(L - 1) % 2].copy()


@njit(cache=True, nogil=True)
def _mark_top(v, k, used, out, top):
    """out[e] = 1 for the `k` largest of v (ties: the lower id; numpy's stable argsort of -v, cut
    at k) among them those `used` (> 0): the best k kept in order in one pass, in `top` [>= k]."""
    n = 0
    for e in range(v.size):
        x = v[e]
        if n == k:
            if not x > v[top[n - 1]]:
                continue
        else:
            n += 1
        j = n - 1
        while j > 0 and v[top[j - 1]] < x:  # (after the equal ones: they have lower ids)
            top[j] = top[j - 1]
            j -= 1
        top[j] = e
    for i in range(n):
        if used[top[i]] > 0:
            out[top[i]] = 1.0


@njit(cache=True, nogil=True)
def _pairwise_leaf(a, lo, n):
    """numpy's pairwise_sum of a[lo:lo + n] for n <= 128: a plain sum below 8 values, else eight
    running sums combined as a tree, then the rest one by one."""
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[lo + i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    while i < n - n % 8:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@njit(cache=True, nogil=True)
def _pairwise_sum(a, lo, n):
    """The sum of a[lo:lo + n] as numpy sums a contiguous row, bit for bit: leaves of at most 128
    values, halves (rounded down to a multiple of 8) above, added left + right. (Its recursion
    unrolled on a stack: numba's cache does not hold recursive functions.)"""
    if n <= 128:
        return _pairwise_leaf(a, lo, n)
    los, ns = np.empty(64, dtype=np.int64), np.empty(64, dtype=np.int64)
    left, waiting = np.empty(64), np.zeros(64, dtype=np.bool_)  # waiting: for the right half
    d, los[0], ns[0], out = 0, lo, n, 0.0
    while d >= 0:
        if ns[d] > 128 and not waiting[d]:  # descend into the left half
            half = ns[d] // 2
            half -= half % 8
            los[d + 1], ns[d + 1], waiting[d + 1] = los[d], half, False
            d += 1
            continue
        v = _pairwise_leaf(a, los[d], ns[d])  # (a leaf: an inner node on top always still needs its left half)
        d -= 1
        while d >= 0:  # hand v up: a left half waits for its right one, a right half completes its parent
            if not waiting[d]:
                left[d], waiting[d] = v, True
                half = ns[d] // 2
                half -= half % 8
                los[d + 1], ns[d + 1], waiting[d + 1] = los[d] + half, ns[d] - half, False
                d += 1
                break
            v = left[d] + v
            d -= 1
        if d < 0:
            out = v
    return out


@njit(cache=True, nogil=True)
def learn_refresh(trans, rowsum, P, freq, last_used, rows, prev, pvalid, inc, finc, clock, freq_k, recency_k):
    """learn, then refresh: a step's learning in one call."""
    learn(trans, rowsum, P, freq, last_used, rows, prev, pvalid, inc, finc, clock)
    return refresh(freq, last_used, freq_k, recency_k)


@njit(cache=True, nogil=True)
def refresh(freq, last_used, freq_k, recency_k):
    """Intelligent._refresh after learning, per layer: the frequency tie-breaks (1e-12 x each
    expert's share of the layer's uses) and the component masks before the transitions' [L, 4, E]:
    row 1 the `freq_k` most used experts (used at all), row 2 the `recency_k` most recently used
    (ties: the larger share; used at all). Ties: the lower id."""
    L, E = freq.shape
    tie = np.empty((L, E))
    masks = np.zeros((L, 4, E))
    top = np.empty(max(freq_k, recency_k), dtype=np.int64)
    rec = np.empty(E)
    for l in range(L):
        tot = _pairwise_sum(freq[l], 0, E)  # (the layer's total, as freq.sum(axis=1) gave it)
        d = tot if tot > 0 else 1.0
        for e in range(E):
            share = freq[l, e] / d
            tie[l, e] = 1e-12 * share
            rec[e] = last_used[l, e] + 0.5 * share
        _mark_top(freq[l], freq_k, freq[l], masks[l, 1], top)
        _mark_top(rec, recency_k, last_used[l], masks[l, 2], top)
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
