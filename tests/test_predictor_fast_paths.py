"""The predictors' cheap paths give exactly what the plain numpy algorithm gave: multilook's hashes
of a few rows in Python, its learning of every hop and distance in one add.at, the shared
emission, and intelligent's one-token masks (each compared bit for bit with a small reference)."""
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


class _PerHopMultiLook(MultiLook):
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
        self.hops_lq.reshape(-1, E)[touched] = self._log1m(
            self.hops.reshape(-1, E)[touched], self.occ.reshape(-1)[touched][:, None], self.params.min_pattern_frequency)

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
        st.lq[touched] = self._log1m(st.counts[touched], st.n[touched][..., None],
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
    for name in ("hops", "occ", "hops_lq", "temporal", "temporal_n"):
        np.testing.assert_array_equal(getattr(new, name), getattr(ref, name))
    for name in ("counts", "n", "lq", "trusted", "access"):
        np.testing.assert_array_equal(getattr(new.store, name), getattr(ref.store, name))
    assert new.store.index == ref.store.index


def test_intelligent_one_token_masks_match_the_union():
    rng = np.random.default_rng(11)
    pred = registry.create("intelligent", {"transition_k": 5, "pattern_k": 3}, MODEL, rng)
    E = MODEL.num_experts
    kth = [E - 5, E - 3]
    for enough in (None, np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64)):
        for _ in range(50):
            q = 1.2 * rng.random((1, E)) * (rng.random((1, E)) < 0.7)  # (past 1 too: the tie term clips)
            q[0, :3] = q[0, 3]  # ties at the k-th value
            a, b = np.zeros((4, E)), np.zeros((4, E))
            tie_a = pred._one_token_masks(a, q, kth, enough)
            tie_b = pred._union_masks(b, q, kth, enough)
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(tie_a, tie_b)
