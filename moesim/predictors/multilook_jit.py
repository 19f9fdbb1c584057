"""The multilook predictor's per-gate scoring and per-step learning (predictors/multilook.py),
compiled: as numpy they were dozens of small calls per gate, costing more than their arithmetic.

The arithmetic is defined here, not inherited from a library. A learnt entry keeps its thresholded
conditional probability p (a float32 quotient of counts, 0 below a threshold; thresholds compared
in float32). A noisy-OR over several entries is 1 - prod (1 - p)^count, the product taken in
float64 in a fixed order (source experts ascending, patterns in lookup order, rows in order) with
p capped below 1, then rounded to float32 once. (Before, the same score was -expm1(sum of
count * log1p(-p)) with numpy's float32 logs and exps, SVML or libm by CPU, and a float32 BLAS
sum whose order and use of FMA depend on the CPU's kernel: the same scenario could rank ties
differently on two machines.) No transcendental function is left, so the result does not depend
on a math library either. Imported by MultiLook itself, so that runs without it never load numba.
"""
from __future__ import annotations

import numpy as np
from numba import njit

_CLAMP = np.float32(1.0 - 1e-6)  # (p is capped below 1: a factor 1 - p stays positive)
_ONE = np.float32(1.0)


@njit(cache=True, nogil=True, inline="always")
def _p(c, n, min_count, min_conf):
    """c / n as kept (float32), 0 where c < min_count or c / n < min_conf."""
    prob = c / n
    return prob if (c >= min_count) & (prob >= min_conf) else np.float32(0.0)  # (no branch: it vectorises)


@njit(cache=True, nogil=True, inline="always")
def _miss(p, count):
    """(1 - p)^count in float64 (p capped below 1), by squaring: the chance that none of `count`
    tokens needs an expert each needs with probability p."""
    f = 1.0 - np.float64(min(p, _CLAMP))
    if count == 1:
        return f
    out = 1.0
    while count:
        if count & 1:
            out *= f
        f *= f
        count >>= 1
    return out


@njit(cache=True, nogil=True)
def temporal_table(temporal, temporal_n, pos, L, h, min_count, min_conf):
    """The temporal component of a step: [L + h, E], for position j of [this step's layers | the
    next steps'] the noisy-OR over the rows of each expert's probability at the row's position
    (pos + j // L, modulo the period) and layer j % L."""
    period, _L, E = temporal.shape
    out = np.zeros((L + h, E), dtype=np.float32)
    miss = np.empty(E, dtype=np.float64)
    for j in range(L + h):
        lay, off = j % L, j // L
        miss.fill(1.0)
        for t in range(pos.shape[0]):
            slot = (pos[t] + off) % period
            nn = max(temporal_n[slot, lay], _ONE)
            for e in range(E):
                p = _p(temporal[slot, lay, e], nn, min_count, min_conf)
                if p > 0.0:
                    miss[e] *= _miss(p, 1)
        for e in range(E):
            if miss[e] != 1.0:
                out[j, e] = np.float32(1.0 - miss[e])
    return out


@njit(cache=True, nogil=True)
def predict(counts, has, srcs, t0s, key_slots, key_gate, trusted, access, stamp, mark, hops_p, hh, cooc, tt,
            store_p, cap):
    """Score and emit G gates' predictions (G = 1 for a single hook). Gate g: `counts[g]` [E] the
    batch's experts at its source layer srcs[g] (none if not has[g]), tt[t0s[g] + d] the temporal
    component of its d-th target (tt with no rows: none), and its pattern contexts' slots in the
    store (key_slots where key_gate == g, in order, ascending g; -1: not stored), each slot counted
    one access per gate (stamp[slot] = mark + g marks it counted) and used if trusted. A target's
    score is the best of its components' noisy-ORs: co-occurrence (d = 0, unless not `cooc`) and
    chains (d < hh) over the batch's (token, expert) pairs with hops_p [hh, L, E, E], temporal,
    and patterns over the trusted slots with store_p [S, h, E].
    Returns (experts, scores float32, ends [G * h]): target d of gate g emits
    experts[ends[g*h + d - 1]:ends[g*h + d]], its at most `cap` experts with a positive score,
    best first (ties: lower id first)."""
    G, E = counts.shape
    h = store_p.shape[1]
    width = min(cap, E)
    experts = np.empty(G * h * width, dtype=np.int64)
    scores = np.empty(G * h * width, dtype=np.float32)
    ends = np.empty(G * h, dtype=np.int64)
    score = np.empty((h, E), dtype=np.float32)
    miss = np.empty(E, dtype=np.float64)
    top_s = np.empty(width, dtype=np.float32)
    top_e = np.empty(width, dtype=np.int64)
    used = np.empty(key_slots.shape[0], dtype=np.int64)
    active = np.empty(E, dtype=np.int64)
    n_out = 0
    k = 0
    for g in range(G):
        score.fill(0.0)
        if has[g]:
            src = srcs[g]
            na = 0
            for a in range(E):  # (the source experts present, ascending)
                if counts[g, a]:
                    active[na] = a
                    na += 1
            for d in range(hh):
                if d == 0 and not cooc:
                    continue
                miss.fill(1.0)
                for i in range(na):
                    a = active[i]
                    c = counts[g, a]
                    if c == 1:  # (p = 0 multiplies by 1: exact, so no branch; it vectorises)
                        for e in range(E):
                            miss[e] *= 1.0 - np.float64(min(hops_p[d, src, a, e], _CLAMP))
                    else:
                        for e in range(E):
                            p = hops_p[d, src, a, e]
                            if p > 0.0:
                                miss[e] *= _miss(p, c)
                for e in range(E):
                    score[d, e] = np.float32(1.0 - miss[e])  # (0 where no factor: 1 - 1)
        if tt.shape[0]:
            t0 = t0s[g]
            for d in range(h):
                for e in range(E):
                    score[d, e] = max(score[d, e], tt[t0 + d, e])
        nu = 0
        while k < key_slots.shape[0] and key_gate[k] == g:
            s = key_slots[k]
            k += 1
            if s < 0:
                continue
            if stamp[s] != mark + g:
                stamp[s] = mark + g
                access[s] += 1
            if trusted[s]:
                used[nu] = s
                nu += 1
        if nu:
            for d in range(h):
                miss.fill(1.0)
                for i in range(nu):
                    for e in range(E):
                        miss[e] *= 1.0 - np.float64(min(store_p[used[i], d, e], _CLAMP))
                for e in range(E):
                    score[d, e] = max(score[d, e], np.float32(1.0 - miss[e]))
        for d in range(h):  # the best `width` positive scores, in order (ties: the lower id, seen first)
            n = 0
            for e in range(E):
                x = score[d, e]
                if not x > 0.0 or (n == width and not x > top_s[n - 1]):
                    continue
                if n < width:
                    n += 1
                j = n - 1
                while j > 0 and top_s[j - 1] < x:
                    top_s[j] = top_s[j - 1]
                    top_e[j] = top_e[j - 1]
                    j -= 1
                top_s[j] = x
                top_e[j] = e
            for j in range(n):
                experts[n_out + j] = top_e[j]
                scores[n_out + j] = top_s[j]
            n_out += n
            ends[g * h + d] = n_out
    return experts[:n_out], scores[:n_out], ends


@njit(cache=True, nogil=True)
def learn_hops(hops, occ, hops_p, seq, pvalid, qs, tgt, lay, late, min_count, min_conf):
    """Co-occurrence and chains: for each row of seq [n, 2L, k] (its previous token's layers, then
    its own) and each hop j, every expert a at position qs[j] -> every b at tgt[j] counted in
    hops[lay[j], a, b] and a in occ[lay[j], a] (hops and occ viewed as [hops * L, E, (E)]); the
    previous token's positions (not late[j]) only where pvalid. The touched rows' probabilities
    refreshed."""
    R, E = occ.shape
    mark = np.zeros(R * E, dtype=np.bool_)
    touched = np.empty(R * E, dtype=np.int64)
    nt = 0
    k = seq.shape[2]
    for t in range(seq.shape[0]):
        for j in range(qs.shape[0]):
            if not (late[j] or pvalid[t]):
                continue
            r = lay[j]
            for i in range(k):
                a = seq[t, qs[j], i]
                occ[r, a] += _ONE
                for i2 in range(k):
                    hops[r, a, seq[t, tgt[j], i2]] += _ONE
                ra = r * E + a
                if not mark[ra]:
                    mark[ra] = True
                    touched[nt] = ra
                    nt += 1
    for i in range(nt):
        r, a = divmod(touched[i], E)
        nn = max(occ[r, a], _ONE)
        for e in range(E):
            hops_p[r, a, e] = _p(hops[r, a, e], nn, min_count, min_conf)


@njit(cache=True, nogil=True)
def learn_temporal(temporal, temporal_n, slot, rows):
    """Each row's experts rows [n, L, k] counted at its position slot[n], layer by layer."""
    for t in range(rows.shape[0]):
        s = slot[t]
        for l in range(rows.shape[1]):
            temporal_n[s, l] += _ONE
            for i in range(rows.shape[2]):
                temporal[s, l, rows[t, l, i]] += _ONE


@njit(cache=True, nogil=True)
def learn_patterns(counts, n, prob, trusted, access, slots, ti, tq, seq, L, min_freq, min_count, min_conf):
    """Sequence patterns: context j (row ti[j], ending at position tq[j] of seq [n, 2L, k]) stored
    at slots[j] counts one access and, for each distance d = 1..h whose position lies in this
    token, one outcome (n[slot, d - 1]) and its experts (counts[slot, d - 1]). The touched
    patterns' trust (seen min_freq times) and probabilities refreshed."""
    S, h, E = counts.shape
    mark = np.zeros(S, dtype=np.bool_)
    touched = np.empty(slots.shape[0], dtype=np.int64)
    nt = 0
    k = seq.shape[2]
    for j in range(slots.shape[0]):
        s = slots[j]
        access[s] += 1
        if not mark[s]:
            mark[s] = True
            touched[nt] = s
            nt += 1
        for d in range(1, h + 1):
            q = tq[j] + d
            if q < L or q >= 2 * L:
                continue
            n[s, d - 1] += _ONE
            for i in range(k):
                counts[s, d - 1, seq[ti[j], q, i]] += _ONE
    for i in range(nt):
        s = touched[i]
        trusted[s] = n[s, 0] >= min_freq
        for d in range(h):
            nn = max(n[s, d], _ONE)
            for e in range(E):
                prob[s, d, e] = _p(counts[s, d, e], nn, min_count, min_conf)


@njit(cache=True, nogil=True)
def learn_step(prev, rows, pvalid, hops, occ, hops_p, hq, tgt, lay, late, hop_min, conf, temporal, temporal_n, slot,
               pq, pl, L, mult, hk, hv, shift, slot_key, used, free, top, counts, n, prob, trusted, access, trust_min,
               pattern_min):
    """A step's learning (MultiLook._learn_tables) in one call: the hops (`learn_hops`; none
    without hop positions hq), the temporal positions (`learn_temporal`; none without slots), the
    sequence patterns ending at positions pq (`learn_keys`, the store's `claim`, `learn_patterns`;
    none without). Returns 0, or, where the store has fewer free slots than new contexts, how many
    new ones there are, with the patterns not learnt: the store evicts first (PatternStore.slots).
    (One int: each array returned costs a boxing.)"""
    seq = np.concatenate((prev, rows), axis=1)
    if hq.shape[0]:
        learn_hops(hops, occ, hops_p, seq, pvalid, hq, tgt, lay, late, hop_min, conf)
    if slot.shape[0]:
        learn_temporal(temporal, temporal_n, slot, rows)
    if pq.shape[0]:
        keys, ti, tq = learn_keys(seq, pvalid, pq, pl, L, mult)
        if ti.shape[0]:
            slots, short = claim(hk, hv, shift, keys, slot_key, used, free, top)
            if short:
                return short
            learn_patterns(counts, n, prob, trusted, access, slots, ti, tq, seq, L, trust_min, pattern_min, conf)
    return 0


# ---- hashes (multilook.set_codes and context_hash, the same uint64 arithmetic) -------------------

_S29 = np.uint64(29)


@njit(cache=True, nogil=True)
def codes_into(rows, mult, out):
    """out[t, l] = the set code of rows[t, l] ([n, m, k] experts): sorted, multiplied by mult[:k]
    and summed (mod 2**64), mixed."""
    n, m, k = rows.shape
    s = np.empty(k, dtype=np.int64)
    for t in range(n):
        for l in range(m):
            for i in range(k):
                x = rows[t, l, i]
                j = i
                while j > 0 and s[j - 1] > x:
                    s[j] = s[j - 1]
                    j -= 1
                s[j] = x
            h = np.uint64(0)
            for i in range(k):
                h += np.uint64(s[i]) * mult[i]
            out[t, l] = h ^ (h >> _S29)


@njit(cache=True, nogil=True, inline="always")
def _context(a, lo, hi, layer, mult):
    """The context hash of the set codes a[lo:hi] ending at `layer`."""
    h = np.uint64(0)
    for i in range(hi - lo):
        h += a[lo + i] * mult[i]
    h += np.uint64(layer + 1) * mult[hi - lo]
    return h ^ (h >> _S29)


@njit(cache=True, nogil=True)
def gate_keys(rows, prev_codes, pvalid, use_prev, pl, mult, codes):
    """Every gate's pattern context: the set codes of rows [n, L, k] into codes [n, L]; then for
    each gate l (in order) and row (in order), the hash of the `pl` codes ending at layer l,
    reaching into the previous token's (prev_codes [n, L]) only where `use_prev` and pvalid.
    Returns (keys, the gate of each)."""
    n, L, _k = rows.shape
    codes_into(rows, mult[0], codes)
    keys = np.empty(n * L, dtype=np.uint64)
    gate = np.empty(n * L, dtype=np.int64)
    both = np.empty(2 * L, dtype=np.uint64)
    m = 0
    for l in range(L):
        start = L + l - pl + 1  # (position in [previous token | this token])
        if start >= L:
            for t in range(n):
                keys[m] = _context(codes[t], start - L, l + 1, l, mult[1])
                gate[m] = l
                m += 1
        elif start >= 0 and use_prev:
            for t in range(n):
                if pvalid[t]:
                    both[:L] = prev_codes[t]
                    both[L:] = codes[t]
                    keys[m] = _context(both, start, L + l + 1, l, mult[1])
                    gate[m] = l
                    m += 1
    return keys[:m], gate[:m]


@njit(cache=True, nogil=True)
def learn_keys(seq, pvalid, qs, pl, L, mult):
    """The pattern contexts a step learns: for each row of seq [n, 2L, k] (in order) and each
    position q of qs (in order) whose window of `pl` sets lies in this token or the row has a
    previous token (pvalid), the hash of the window ending at q (layer q % L). Returns (keys, their
    rows, their q)."""
    n = seq.shape[0]
    codes = np.empty((n, seq.shape[1]), dtype=np.uint64)
    codes_into(seq, mult[0], codes)
    nq = qs.shape[0]
    keys = np.empty(n * nq, dtype=np.uint64)
    ti = np.empty(n * nq, dtype=np.int64)
    tq = np.empty(n * nq, dtype=np.int64)
    m = 0
    for t in range(n):
        for j in range(nq):
            q = qs[j]
            if q - pl + 1 >= L or pvalid[t]:
                keys[m] = _context(codes[t], q - pl + 1, q + 1, q % L, mult[1])
                ti[m] = t
                tq[m] = q
                m += 1
    return keys[:m], ti[:m], tq[:m]


# ---- the pattern store's index (multilook.PatternStore) ---------------------------------------------
# An open-addressing hash table on two arrays (keys uint64, slots int64, -1: empty), linear probing,
# deletion by backward shift; at most half full. (A numba typed dict would do, but making one
# costs ~0.4 s of compiling in every process.)

_GOLD = np.uint64(0x9E3779B97F4A7C15)  # (Fibonacci hashing: the top bits of key * 2**64 / phi)


@njit(cache=True, nogil=True, inline="always")
def _home(key, shift):
    return np.int64((key * _GOLD) >> shift)


@njit(cache=True, nogil=True)
def _get(hk, hv, shift, key):
    mask = hv.shape[0] - 1
    i = _home(key, shift)
    while hv[i] >= 0:
        if hk[i] == key:
            return hv[i]
        i = (i + 1) & mask
    return np.int64(-1)


@njit(cache=True, nogil=True)
def find(hk, hv, shift, keys):
    """The slot of each key in the table, -1 where not stored."""
    out = np.empty(keys.shape[0], dtype=np.int64)
    for i in range(keys.shape[0]):
        out[i] = _get(hk, hv, shift, keys[i])
    return out


@njit(cache=True, nogil=True)
def claim(hk, hv, shift, keys, slot_key, used, free, top):
    """The slots of these keys, a free slot (free[:top[0]], the last first) given to each new
    key in order of first appearance. Returns (slots, 0), or (the slots found, how many new keys
    there are) without changing anything when there are more new keys than free slots."""
    n, mask = keys.shape[0], hv.shape[0] - 1
    out = np.empty(n, dtype=np.int64)
    new = np.empty(n, dtype=np.uint64)
    m = 0
    for i in range(n):
        out[i] = _get(hk, hv, shift, keys[i])
        if out[i] < 0:
            new[m] = keys[i]
            m += 1
    new = np.sort(new[:m])
    n_new = 0
    for i in range(m):  # (distinct new keys)
        n_new += i == 0 or new[i] != new[i - 1]
    if n_new > top[0]:
        return out, n_new
    for i in range(n):
        if out[i] < 0:
            s = _get(hk, hv, shift, keys[i])
            if s < 0:
                top[0] -= 1
                s = free[top[0]]
                j = _home(keys[i], shift)
                while hv[j] >= 0:
                    j = (j + 1) & mask
                hk[j], hv[j] = keys[i], s
                slot_key[s] = keys[i]
                used[s] = True
            out[i] = s
    return out, 0


@njit(cache=True, nogil=True)
def forget(hk, hv, shift, slot_key, used, free, top, victims):
    """Free the victims' slots, their keys out of the table; pushed on the free stack largest
    first, so that the smallest is given first."""
    mask = hv.shape[0] - 1
    for v in range(victims.shape[0] - 1, -1, -1):
        s = victims[v]
        i = _home(slot_key[s], shift)
        while hv[i] != s:
            i = (i + 1) & mask
        j = i
        while True:  # (backward shift: an entry after the hole moves in unless its home lies in (i, j])
            j = (j + 1) & mask
            if hv[j] < 0:
                break
            k = _home(hk[j], shift)
            if (k <= i or k > j) if j > i else (j < k <= i):
                hk[i], hv[i] = hk[j], hv[j]
                i = j
        hv[i] = -1
        used[s] = False
        free[top[0]] = s
        top[0] += 1


@njit(cache=True, nogil=True)
def start(prev, pvalid, prev_codes, known, pl, mult, hk, hv, shift, trusted, access, stamp, mark, hops_p, hh, cooc,
          tt, store_p, cap):
    """The step's first prediction (MultiLook._predict at layer -1) in one call: from the previous
    tokens (prev [n, L, k] where pvalid; none unless `known`) the experts of their last layer and
    the contexts of their last `pl` layers (prev_codes [n, L]), looked up in the pattern index
    (hk, hv, shift), then `predict` with G = 1 (its other arguments)."""
    n, L, k = prev.shape
    E = store_p.shape[2]
    counts = np.zeros((1, E), dtype=np.int64)
    keys = np.empty(n, dtype=np.uint64)
    m = 0
    if known:
        for t in range(n):
            if pvalid[t]:
                for i in range(k):
                    counts[0, prev[t, L - 1, i]] += 1
                if L - pl >= 0:
                    keys[m] = _context(prev_codes[t], L - pl, L, L - 1, mult[1])
                    m += 1
    has = np.ones(1, dtype=np.bool_)
    has[0] = known
    src = np.full(1, L - 1 if known else 0, dtype=np.int64)
    return predict(counts, has, src, np.zeros(1, dtype=np.int64), find(hk, hv, shift, keys[:m]),
                   np.zeros(m, dtype=np.int64), trusted, access, stamp, mark, hops_p, hh, cooc, tt, store_p, cap)


@njit(cache=True, nogil=True)
def gates(routing, rows, prev_codes, pvalid, use_prev, pl, mult, codes, hk, hv, shift, trusted, access, stamp, mark,
          hops_p, hh, cooc, tt, store_p, cap):
    """Every gate of a step in one call (MultiLook.on_gates): the batch's experts per layer
    (routing [T, L, k], every row), the contexts of the rows read (rows [n, L, k], their codes into
    codes [n, L]; pl = 0: no patterns) looked up in the pattern index, then `predict` with G = L
    (its other arguments)."""
    T, L, k = routing.shape
    E = store_p.shape[2]
    counts = np.zeros((L, E), dtype=np.int64)
    for t in range(T):
        for l in range(L):
            for i in range(k):
                counts[l, routing[t, l, i]] += 1
    if pl:
        keys, key_gate = gate_keys(rows, prev_codes, pvalid, use_prev, pl, mult, codes)
    else:
        keys, key_gate = np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    src = np.arange(L)
    return predict(counts, np.ones(L, dtype=np.bool_), src, src + 1, find(hk, hv, shift, keys), key_gate,
                   trusted, access, stamp, mark, hops_p, hh, cooc, tt, store_p, cap)
