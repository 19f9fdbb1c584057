"""The predictors' cheap paths give exactly what the plain numpy algorithm gave: multilook's hashes
of a few rows in Python, its learning of every hop and distance in one add.at, the shared
emission, and intelligent's compiled fusion (each compared bit for bit with a small reference)."""
from __future__ import annotations

import numpy as np
import pytest

from moesim.predictors import registry
from moesim.predictors.base import ranked_blocks
from moesim.predictors.multilook import _MULT, MultiLook, context_hash, context_keys, set_codes

from .test_predictors_heuristic import MODEL, FakeView, make_stream


def _set_codes_numpy(experts):
    s = np.sort(np.asarray(experts, dtype=np.int64), axis=-1).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = (s * _MULT[0, :s.shape[-1]]).sum(axis=-1, dtype=np.uint64)
    return h ^ (h >> np.uint64(29))


@pytest.mark.parametrize("shape", [(1, 8), (3, 2), (8, 8), (9, 8), (1, 6, 2), (2, 3, 64), (0, 6, 2), (40, 6, 2)])
def test_set_codes_match_the_numpy_hash(shape):
    e = np.random.default_rng(len(shape) * 7 + shape[0]).integers(0, 256, size=shape).astype(np.int16)
    got, want = set_codes(e), _set_codes_numpy(e)
    assert got.dtype == want.dtype == np.uint64 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_context_keys_match_context_hash():
    rng = np.random.default_rng(3)
    for rows in (1, 2, 8, 9):
        for pl in (1, 3, 6):
            win = rng.integers(0, 2**64, size=(rows, pl), dtype=np.uint64)  # products past 2**64 wrap
            for layer in (0, 5, 31):
                assert context_keys(win, layer) == context_hash(win, layer).tolist()


def _emit_reference(scores, cap):
    """The emission as first written: argsort, gather, count the positive values."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :cap]
    vals = scores[np.arange(scores.shape[0])[:, None], order]
    counts = (vals > 0).sum(axis=1).tolist()
    return [(es[:n], vs[:n]) if n else ([], []) for es, vs, n in zip(order.tolist(), vals.tolist(), counts)]


def test_emit_all_matches_the_reference():
    rng = np.random.default_rng(5)
    pred = registry.create("multilook", {"lookahead_layers": 3, "max_per_layer": 5}, MODEL, rng)
    view = FakeView([{"index": 7, "phase": "decode", "ids": np.array([0]), "routing": None}], 0, False)
    for _ in range(200):
        s = rng.random((3, MODEL.num_experts)).astype(np.float32)
        s[rng.random(s.shape) < 0.6] = 0.0
        s[rng.random(s.shape) < 0.1] = -0.0
        s[0, :4] = s[0, 4]  # ties: lower id first
        if rng.random() < 0.2:
            s[1] = 0.0
        got = {(st, lay): (es, vs) for st, lay, es, vs in ranked_blocks(pred._emit_all(view, 2, s))}
        for (_d, off, lay), ref in zip(pred._targets[2], _emit_reference(s, 5)):
            assert got.get((7 + off, lay), ([], [])) == ref


def _prob_numpy(pred, c, n, min_count):
    """The thresholded conditional probability as numpy computes it (the reference): c / max(n, 1)
    in float32, 0 below the count or the confidence threshold."""
    prob = c / np.maximum(n, np.float32(1.0))
    return np.where((c >= min_count) & (prob >= pred.params.min_confidence), prob, np.float32(0.0))


class PartByPart(MultiLook):
    """MultiLook learning its tables part by part, each compiled part called in turn (the
    reference for learn_step, which calls them all at once; subclasses swap in their own parts)."""

    def _learn_tables(self, prev, rows, pvalid, slot):
        seq = np.concatenate([prev, rows], axis=1)                 # [n, 2L, k]
        self._learn_hops(seq, pvalid)
        if slot.size:
            self._jit.learn_temporal(self.temporal, self.temporal_n, slot, rows)
        if self.params.use_sequences:
            self._learn_patterns(seq, prev, rows, pvalid)

    def _learn_hops(self, seq, pvalid):
        qs, tgt, lay, late = self._hop_q
        if qs.size:
            self._jit.learn_hops(self._hops3, self._occ2, self._hops_p3, seq, pvalid, qs, tgt, lay, late,
                                 self._hop_min, self._conf)


class _PerHopMultiLook(PartByPart):
    """MultiLook learning as first written: one add.at per hop and per distance."""

    def _learn_hops(self, seq, pvalid):
        L, E = self.L, self.E
        idx_parts, src_parts = [], []
        for hop in range(self.hops.shape[0]):
            d = hop + 1
            qs = np.arange(max(0, L - d), 2 * L - d)
            valid = (qs >= L)[None, :] | pvalid[:, None]
            a, b = seq[:, qs][valid], seq[:, qs + d][valid]
            lay = np.broadcast_to((qs % L)[None, :], valid.shape)[valid].astype(np.int64) + hop * L
            idx_parts.append(((lay[:, None, None] * E + a[:, :, None]) * E + b[:, None, :]).ravel())
            src_parts.append((lay[:, None] * E + a).ravel())
        src_rows = np.concatenate(src_parts)
        np.add.at(self.hops.reshape(-1), np.concatenate(idx_parts), np.float32(1))
        np.add.at(self.occ.reshape(-1), src_rows, np.float32(1))
        touched = np.unique(src_rows)
        self.hops_p.reshape(-1, E)[touched] = _prob_numpy(
            self, self.hops.reshape(-1, E)[touched], self.occ.reshape(-1)[touched][:, None],
            self.params.min_pattern_frequency)

    def _learn_patterns(self, seq, prev, rows, pvalid):
        p, L, h, E, st = self.params, self.L, self.h, self.E, self.store
        pl = p.pattern_length
        codes = np.concatenate([_set_codes_numpy(prev), _set_codes_numpy(rows)], axis=1)
        qs = np.arange(max(pl - 1, L - h), 2 * L - 1)
        win = np.lib.stride_tricks.sliding_window_view(codes, pl, axis=1)[:, qs - pl + 1]
        ti, qi = np.nonzero(((qs - pl + 1) >= L)[None, :] | pvalid[:, None])
        slots = st.slots(context_hash(win, (qs % L)[None, :])[ti, qi].tolist())
        keep = slots >= 0
        ti, qi, slots = ti[keep], qi[keep], slots[keep]
        np.add.at(st.access, slots, np.int64(1))
        for d in range(1, h + 1):
            tgt = qs[qi] + d
            m = (tgt >= L) & (tgt < 2 * L)
            s = slots[m] * h + (d - 1)
            np.add.at(st.n.reshape(-1), s, np.float32(1))
            np.add.at(st.counts.reshape(-1), (s[:, None] * E + seq[ti[m], tgt[m]]).ravel(), np.float32(1))
        touched = np.unique(slots)
        st.trusted[touched] = st.n[touched, 0] >= p.min_pattern_frequency
        st.p[touched] = _prob_numpy(self, st.counts[touched], st.n[touched][..., None],
                                     p.confidence_fraction * p.min_pattern_frequency)


def _drive(pred, steps):
    out = []
    for i in range(len(steps)):
        view = FakeView(steps, i, False)
        out.append(ranked_blocks(pred.on_step_start(view)))
        for layer in range(MODEL.num_layers):
            view.gated = layer
            out.append(ranked_blocks(pred.on_gate(view, layer)))
        pred.on_step_end(view)
    return out


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("params", [{}, {"lookahead_layers": 9, "pattern_length": 2, "max_patterns": 20,
                                         "min_pattern_frequency": 1}])
def test_multilook_learning_matches_the_per_hop_reference(batch, params):
    steps = make_stream(n_requests=12, batch=batch, noise=0.2, seed=batch)
    new = registry.create("multilook", params, MODEL, np.random.default_rng(0))
    ref = _PerHopMultiLook(MultiLook.Params(**params), MODEL, np.random.default_rng(0))
    got = _drive(new, steps)
    assert got == _drive(ref, steps) and any(got) and new.store.trusted.any()
    for name in ("hops", "occ", "hops_p", "temporal", "temporal_n"):
        np.testing.assert_array_equal(getattr(new, name), getattr(ref, name))
    for name in ("counts", "n", "p", "trusted", "access"):
        np.testing.assert_array_equal(getattr(new.store, name), getattr(ref.store, name))
    for st in (new.store, ref.store):  # (the index maps each used slot's key to the slot, and nothing else)
        used = np.flatnonzero(st.used)
        assert len(st) == used.size and st.find(st.slot_key[used]).tolist() == used.tolist()
    np.testing.assert_array_equal(new.store.slot_key[new.store.used], ref.store.slot_key[ref.store.used])


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("params", [{}, {"max_patterns": 6, "min_pattern_frequency": 1, "pattern_length": 2},
                                    {"use_temporal": False, "use_chains": False, "use_cooccurrence": False},
                                    {"use_sequences": False, "lookahead_layers": 9}])
def test_multilook_learns_in_one_call_as_part_by_part(batch, params):
    """learn_step (one compiled call, the patterns left to the store when it must evict) learns
    every table bit for bit as the parts called one by one, and so predicts the same."""
    steps = make_stream(n_requests=12, batch=batch, noise=0.2, seed=batch + 5)
    new = registry.create("multilook", params, MODEL, np.random.default_rng(0))
    ref = PartByPart(MultiLook.Params(**params), MODEL, np.random.default_rng(0))
    evicting = []
    new._learn_patterns = lambda *a: evicting.append(1) or MultiLook._learn_patterns(new, *a)
    got = _drive(new, steps)
    assert got == _drive(ref, steps) and any(got)
    assert bool(evicting) == (params.get("max_patterns") == 6)
    for name in ("hops", "occ", "hops_p", "temporal", "temporal_n"):
        np.testing.assert_array_equal(getattr(new, name), getattr(ref, name))
    for name in ("counts", "n", "p", "trusted", "access", "used", "slot_key", "free", "top", "_hk", "_hv"):
        np.testing.assert_array_equal(getattr(new.store, name), getattr(ref.store, name))


def _noisy_or_numpy(p_rows, counts):
    """A hop component's score as multilook_jit defines it: 1 - prod over the
    source experts a (ascending) of (1 - min(p[a], 1 - 1e-6))^counts[a] (by squaring), in float64,
    rounded to float32 once."""
    miss = np.ones(p_rows.shape[1])
    for a in np.flatnonzero(counts).tolist():
        f = 1.0 - np.minimum(p_rows[a], np.float32(1.0 - 1e-6)).astype(np.float64)
        out, c = np.ones_like(miss), int(counts[a])
        while c:
            if c & 1:
                out = out * f
            f, c = f * f, c >> 1
        miss = miss * out
    return (1.0 - miss).astype(np.float32)


@pytest.mark.parametrize("batch", [1, 4])
def test_multilook_hop_scores_are_the_noisy_or_of_the_tables(batch):
    """predict's co-occurrence and chain scores are the noisy-OR of the probability tables (hops_p)
    over the batch's experts, as multilook_jit defines it (ranked best first, ties: lower id)."""
    steps = make_stream(n_requests=12, batch=batch, noise=0.2, seed=7)
    pred = registry.create("multilook", {"lookahead_layers": 3, "use_sequences": False, "use_temporal": False,
                                         "min_pattern_frequency": 1, "max_per_layer": 64}, MODEL,
                           np.random.default_rng(0))
    _drive(pred, steps)
    nonzero = (pred.hops_p > 0).sum(axis=-1)
    assert (nonzero > 1).any() and (nonzero < pred.E).all()
    rng = np.random.default_rng(batch)
    E, L = pred.E, pred.L
    checked = 0
    for _ in range(30):
        src = int(rng.integers(0, L))
        counts = np.bincount(rng.integers(0, E, size=batch * MODEL.top_k), minlength=E).astype(np.int64)
        experts, scores, ends = pred._score(counts[None], np.array([True]), np.array([src]), np.array([src + 1]),
                                            np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
        a = 0
        for d, b in enumerate(ends.tolist()):
            want = _noisy_or_numpy(pred.hops_p[d, src], counts)
            order = np.lexsort((np.arange(E), -want))
            order = order[want[order] > 0]
            assert experts[a:b].tolist() == order.tolist() and scores[a:b].tolist() == want[order].tolist()
            checked += b - a
            a = b
    assert checked > 0


def _fuse_numpy(q, masks, tie, w, thr_t, thr_p, kth, enough, cap):
    """The numpy algorithm intelligent_jit.fuse replaced (one target; q float32 [T', E])."""
    if q.shape[0]:
        part = np.partition(q, kth, axis=1)
        masks[0] = ((q > thr_t) & (q >= part[:, kth[0], None])).any(axis=0)
        if enough is None or enough.size:
            mp = (q > thr_p) & (q >= part[:, kth[1], None])
            masks[3] = (mp if enough is None else mp[enough]).any(axis=0)
        tie = tie + 1e-9 * np.minimum(q.sum(axis=0), 1.0)
    fused = w @ masks
    best = (-(fused + tie)).argsort(kind="stable")[:cap]
    f = fused[best]
    stop = (f <= 0).nonzero()[0]
    n = int(stop[0]) if stop.size else f.size
    keep = best[:n][np.lexsort((best[:n], -f[:n]))]
    return keep.tolist(), fused[keep].tolist()


@pytest.mark.parametrize("tokens", [0, 1, 2, 5, 40])
def test_intelligent_compiled_fusion_matches_numpy(tokens):
    """Masks, tie-breaks, fused scores and ranking as the numpy code gave them, bit for bit: q at
    the thresholds' float32 values, ties at the k-th value and in the fused scores, q past 1."""
    from moesim.predictors.intelligent_jit import fuse

    rng = np.random.default_rng(11 + tokens)
    E, (tk, pk), thr = MODEL.num_experts, (5, 3), (0.05, 0.1)
    kth = [E - tk, E - pk]
    for case in range(200):
        q = (1.2 * rng.random((tokens, E)) * (rng.random((tokens, E)) < 0.7)).astype(np.float32)
        if tokens:
            q[:, :3] = q[:, 3:4]  # ties at the k-th value
            q[:, 4:6] = np.float32(thr[0]), np.float32(thr[1])  # exactly at the thresholds (as float32)
        w = rng.dirichlet(np.ones(4)) if case % 5 else np.array([0.4, 0.3, 0.2, 0.1])
        base = np.zeros((4, E))
        base[1:3] = rng.random((2, E)) < 0.15
        tie = 1e-12 * rng.integers(0, 3, E) / 3  # (equal tie-breaks: the order falls to the ids)
        rows = rng.random(tokens) < 0.5
        for enough in (None, np.flatnonzero(rows)):
            ok = np.ones(tokens, dtype=bool) if enough is None else rows
            a, b = base.copy(), base.copy()
            want = _fuse_numpy(q, a, tie, w, *thr, kth, enough, 8)
            keep, scores = fuse(q, b, tie, w, np.float32(thr[0]), np.float32(thr[1]), kth[0], kth[1], ok, 8)
            np.testing.assert_array_equal(b, a)
            assert (keep.tolist(), scores.tolist()) == want

def test_intelligent_compiled_refresh_matches_numpy():
    """The frequency / recency top sets and tie-breaks as numpy's stable argsorts gave them: ties in
    the counts and in the clock, unused experts, k >= E."""
    from moesim.predictors.intelligent_jit import refresh

    rng = np.random.default_rng(5)
    L, E = 3, MODEL.num_experts
    for case in range(100):
        f = rng.integers(0, 4, (L, E)) * rng.choice([0.5, 1.0, 1e-3])  # (ties, and a row of zeros sometimes)
        if case % 3 == 2:  # (sums whose rounding depends on the order of the additions)
            f = rng.random((L, E)) * 10.0 ** rng.integers(-8, 8, (L, E))
        f[case % L] *= case % 2
        last = rng.integers(0, 5, (L, E)).astype(np.float64)
        fk, rk = rng.integers(1, E + 1, 2)
        order = np.argsort(-f, axis=1, kind="stable")[:, :fk]
        top = np.zeros(f.shape, dtype=bool)
        np.put_along_axis(top, order, True, axis=1)
        tot = f.sum(axis=1, keepdims=True)
        share = f / np.where(tot > 0, tot, 1.0)
        order = np.argsort(-(last + 0.5 * share), axis=1, kind="stable")[:, :rk]
        rtop = np.zeros(f.shape, dtype=bool)
        np.put_along_axis(rtop, order, True, axis=1)
        tie, masks = refresh(f, last, fk, rk)
        np.testing.assert_array_equal(tie, 1e-12 * share)
        np.testing.assert_array_equal(masks[:, 1], top & (f > 0))
        np.testing.assert_array_equal(masks[:, 2], rtop & (last > 0))
        assert not masks[:, [0, 3]].any()


def test_the_compiled_row_sum_is_numpys():
    """intelligent_jit._pairwise_sum adds as numpy's pairwise sum of a contiguous row does, bit for
    bit: below 8 values, eight running sums up to 128, halves beyond (a plain running sum differs)."""
    from moesim.predictors.intelligent_jit import _pairwise_sum

    rng = np.random.default_rng(8)
    plain = 0
    for n in [*range(1, 140), 255, 256, 300, 1000]:
        for _ in range(10):
            x = rng.random(n) * 10.0 ** rng.integers(-6, 6, n)
            assert _pairwise_sum(x, 0, n) == x.sum()
            plain += sum(x.tolist()) != x.sum()
    assert plain > 100  # (the order matters on these values)


def _adapt_python(masks, te, w, w0, lr, f1):
    """Intelligent._evaluate's weight update as it was written in Python."""
    actual = np.zeros(masks.shape[1])
    actual[te.ravel()] = 1.0
    stats = ((masks @ actual).tolist(), masks.sum(axis=1).tolist())
    n_act = float(actual.sum())
    w = w.tolist()
    if f1:
        for c, (tp, n_pred) in enumerate(zip(*stats)):
            if n_pred > 0:
                w[c] = max(0.0, w[c] + lr * (2.0 * tp / (n_pred + n_act) - 0.5))
        tot = sum(w)
        return np.array(w) / tot if tot > 0 else w0.copy()
    target = [1.0 / ((1.0 - 2.0 * tp / (n_pred + n_act) if n_pred > 0 else 1.0) + 0.1) for tp, n_pred in zip(*stats)]
    tt = sum(target)
    return np.array([(1 - lr) * a + lr * b / tt for a, b in zip(w, target)])


@pytest.mark.parametrize("f1", [True, False])
def test_intelligent_compiled_weight_update_matches_python(f1):
    """The fusion weights after each gate's F1 scoring, bit for bit, over a run of updates (weights
    driven to 0 and renormalised, components that predicted nothing, repeated experts)."""
    from moesim.predictors.intelligent_jit import adapt

    rng = np.random.default_rng(3)
    E = MODEL.num_experts
    w0 = np.array([0.4, 0.3, 0.2, 0.1])
    got = want = w0.copy()
    for case in range(300):
        m = (rng.random((4, E)) < rng.choice([0.0, 0.05, 0.3])).astype(np.float64)
        te = rng.integers(0, E, (rng.integers(1, 4), 3)).astype(np.int16)
        lr = rng.choice([0.01, 0.3, 1.0])
        got, want = adapt(m, te, got, w0, lr, f1), _adapt_python(m, te, want, w0, lr, f1)
        assert got.tolist() == want.tolist()


def test_intelligent_compiled_learning_matches_numpy_add_at():
    """Transition counts, row sums, normalised rows, frequencies and clocks as numpy's add.at gave
    them: float64 sums that repeat an index, transitions from the previous token or not."""
    from moesim.predictors.intelligent_jit import learn

    rng = np.random.default_rng(9)
    L, E, k = 4, 6, 3
    trans, rowsum = rng.random((L, E, E)), rng.random((L, E)) + 1.0
    P, freq, last = (trans / rowsum[..., None]).astype(np.float32), rng.random((L, E)), np.zeros((L, E))
    ref = [a.copy() for a in (trans, rowsum, P, freq, last)]
    for clock in range(1, 30):
        T = int(rng.integers(1, 5))
        rows = rng.integers(0, E, (T, L, k))  # (experts repeat across tokens, and within one)
        prev = rng.integers(0, E, (T, L, k))
        pvalid = rng.random(T) < 0.5
        inc, finc = rng.random() * 10.0 ** rng.integers(-3, 3), rng.random()
        learn(trans, rowsum, P, freq, last, rows, prev, pvalid, inc, finc, float(clock))
        rt, rs, rp, rf, rl = ref
        lay = np.arange(L - 1)[None, :, None, None]
        idx = ((lay * E + rows[:, :-1, :, None]) * E + rows[:, 1:, None, :]).ravel()
        if pvalid.any():
            wrap = ((L - 1) * E + prev[pvalid, L - 1][:, :, None]) * E + rows[pvalid, 0][:, None, :]
            idx = np.concatenate([idx, wrap.ravel()])
        np.add.at(rt.reshape(-1), idx, inc)
        np.add.at(rs.reshape(-1), idx // E, inc)
        touched = np.unique(idx // E)
        rp.reshape(-1, E)[touched] = rt.reshape(-1, E)[touched] / rs.reshape(-1)[touched, None]
        fidx = (np.arange(L)[None, :, None] * E + rows).ravel()
        np.add.at(rf.reshape(-1), fidx, finc)
        rl.reshape(-1)[fidx] = clock
        for got, want in zip((trans, rowsum, P, freq, last), ref):
            np.testing.assert_array_equal(got, want)


def test_intelligent_compiled_fusion_cuts_where_numpy_did_at_tiny_weights():
    """Weights as small as the tie-breaks (the f1 update can drive one towards 0): a positive
    fused score can then sort after, or tie with, an expert of score 0, and numpy's ranking stops
    at the first score 0 (ties: the lower id first)."""
    from moesim.predictors.intelligent_jit import fuse

    rng = np.random.default_rng(2)
    E = MODEL.num_experts
    third = 1e-12 / 3
    q, ok = np.zeros((0, E), dtype=np.float32), np.zeros(0, dtype=bool)
    cut = 0
    for _case in range(300):
        tie = third * rng.integers(0, 3, E)
        w = np.array([0.0, third * rng.integers(1, 3), third * rng.integers(0, 3), 0.0])
        base = np.zeros((4, E))
        base[1:3] = rng.random((2, E)) < 0.3
        want = _fuse_numpy(q, base.copy(), tie, w, 0.05, 0.1, [E - 5, E - 3], None, 8)
        got = fuse(q, base.copy(), tie, w, np.float32(0.05), np.float32(0.1), E - 5, E - 3, ok, 8)
        assert (got[0].tolist(), got[1].tolist()) == want
        cut += len(want[0]) < min(8, int((w @ base > 0).sum()))
    assert cut > 10  # (cases where the first score 0 cut positive ones off)


class _DictStore:
    """PatternStore's index as first written, on a Python dict and list (the reference)."""

    def __init__(self, capacity):
        self.capacity, self.index, self.slot_key = capacity, {}, [None] * capacity
        self.access, self.used = np.zeros(capacity, dtype=np.int64), np.zeros(capacity, dtype=bool)
        self._free = list(range(capacity - 1, -1, -1))

    def slots(self, keys):
        get = self.index.get
        slots = np.fromiter((get(k, -1) for k in keys), dtype=np.int64, count=len(keys))
        missing = list(dict.fromkeys(k for k, s in zip(keys, slots.tolist()) if s < 0))
        if missing:
            if len(missing) > len(self._free):
                self._evict(len(missing) - len(self._free), keep=slots[slots >= 0])
            new = {}
            for k in missing:
                if not self._free:
                    break
                s = self._free.pop()
                self.index[k], self.slot_key[s], self.used[s], new[k] = s, k, True, s
            slots = np.array([new.get(k, s) if s < 0 else s for k, s in zip(keys, slots.tolist())], dtype=np.int64)
        return slots

    def _evict(self, need, keep):
        need = max(need, self.capacity // 10)
        acc = self.access.astype(np.float64)
        acc[keep] = np.inf
        acc[~self.used] = np.inf
        need = min(need, int(np.isfinite(acc).sum()))
        if need <= 0:
            return
        victims = np.argpartition(acc, need - 1)[:need] if need < acc.size else np.arange(acc.size)
        for s in sorted(victims[np.isfinite(acc[victims])].tolist(), reverse=True):
            del self.index[self.slot_key[s]]
            self.slot_key[s], self.used[s] = None, False
            self._free.append(s)
        self.access[victims] = 0


@pytest.mark.parametrize("capacity", [1, 3, 10, 40])
def test_pattern_store_claims_and_evicts_as_the_dict_store(capacity):
    """The typed-dict store gives every key the slot the dict-based one gave, evicting the same
    victims, also when a step has more new keys than the store holds (the first ones get slots)."""
    from moesim.predictors.multilook import PatternStore

    rng = np.random.default_rng(capacity)
    new, ref = PatternStore(capacity, 2, 4), _DictStore(capacity)
    pool = rng.integers(0, 2**64, size=60, dtype=np.uint64)  # (keys past 2**63 too)
    short = 0
    for _ in range(150):
        keys = pool[rng.integers(0, pool.size, size=int(rng.integers(1, 2 * capacity + 3)))].tolist()
        short += len(set(keys)) > capacity
        got, want = new.slots(keys), ref.slots(keys)
        assert got.tolist() == want.tolist()
        hit = got[got >= 0]
        new.access[hit] += 1
        ref.access[hit] += 1
        np.testing.assert_array_equal(new.used, ref.used)
        assert len(new) == len(ref.index)
        used = np.flatnonzero(ref.used)
        assert new.find([ref.slot_key[s] for s in used]).tolist() == used.tolist()
    assert short > 0
