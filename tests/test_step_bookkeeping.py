"""The fast paths' per-step shortcuts give exactly what the per-layer reference code gives:
plan._counts' count table vs np.unique, Recorder.layer_rows and step_arrays vs layer_row per layer."""
import numpy as np
import pandas as pd
import pytest

from moesim.engine.metrics import _CHUNK, Recorder
from moesim.engine.plan import StepPlan, _counts, _dedup_flat, one_token_keys
from moesim.models import get_preset


@pytest.mark.parametrize("seed", range(40))
def test_dedup_counts_equals_unique(seed):
    rng = np.random.default_rng(seed)
    E, L = int(rng.integers(1, 70)), int(rng.integers(1, 20))
    k = int(rng.integers(1, min(E, 8) + 1))
    r = rng.integers(0, E, size=(int(rng.integers(1, 40)), L, k)).astype(rng.choice([np.int16, np.int32, np.int64]))
    keys = r.astype(np.int64) + (np.arange(L, dtype=np.int64) * E)[None, :, None]
    (ka, ca), (kb, cb) = _counts(keys, L * E, table=False), _counts(keys, L * E)
    assert kb.dtype == ka.dtype and np.array_equal(ka, kb)
    assert cb.dtype == ca.dtype and np.array_equal(ca, cb)


def _steps(rec_a: Recorder, rec_b: Recorder, n: int, rng, whole=lambda index: True, first: int = 0):
    """`n` random steps recorded layer by layer in `rec_a`, and in `rec_b` whole (layer_rows) where
    `whole(index)`, else layer by layer too."""
    m = rec_a.model
    for index in range(first, first + n):
        phase = "prefill" if index == 0 else "decode"
        plan = StepPlan(index, phase, 0, np.arange(3 if index < 3 else 2), 3, 10, np.zeros((3, 1, 1)))
        rec_a.prefetch_issued += 2
        rec_b.prefetch_issued += 2
        t = float(index)
        cols = [[], [], [], [], [], [], []]
        attn = float(rng.random())
        for layer in range(m.num_layers):
            busy, stall = float(rng.random()), float(rng.random())
            nk = int(rng.integers(1, 9))
            nm = int(rng.integers(0, nk + 1))
            t0, tg, te = t, t + attn, t + attn + busy + stall
            rec_a.layer_row(plan, layer, t0, tg, te, attn, busy, stall, nk - nm, 0, nm, nk)
            if not whole(index):
                rec_b.layer_row(plan, layer, t0, tg, te, attn, busy, stall, nk - nm, 0, nm, nk)
            for c, v in zip(cols, (t0, tg, te, busy, stall, nm, nk)):
                c.append(v)
            t = te
        if whole(index):
            rec_b.layer_rows(plan, *cols[:3], attn, *cols[3:])


def _same(a: Recorder, b: Recorder, rows: int) -> None:
    fa, fb = a.steps_frame(), b.steps_frame()
    assert len(fb) == rows
    pd.testing.assert_frame_equal(fa, fb, check_exact=True)
    for f in ("hits", "misses", "compute_s", "stall_s", "_rows_n", "_uniq_sum", "_dec_rows", "_dec_uniq",
              "_dec_by_seqs", "_dec_seqs_sum", "_cur", "_last_prefetch"):
        assert getattr(a, f) == getattr(b, f), f


def test_layer_rows_equals_layer_row_per_layer():
    m = get_preset("olmoe-1b-7b")
    a, b = Recorder(m), Recorder(m)
    _steps(a, b, 5, np.random.default_rng(1))
    _same(a, b, 5 * m.num_layers)


def test_layer_rows_mixed_with_layer_row_and_over_a_chunk(tmp_path):
    """Whole steps and single rows interleaved keep their order, across a compaction (_CHUNK rows),
    and stream to the same Parquet rows."""
    m = get_preset("olmoe-1b-7b")
    steps = _CHUNK // m.num_layers + 7
    a, b = Recorder(m), Recorder(m)
    _steps(a, b, steps, np.random.default_rng(2), whole=lambda i: i % 5 != 3)
    _same(a, b, steps * m.num_layers)
    a, b = Recorder(m, tmp_path / "a.parquet"), Recorder(m, tmp_path / "b.parquet")
    _steps(a, b, steps, np.random.default_rng(3), whole=lambda i: i < steps - 3)
    pd.testing.assert_frame_equal(pd.read_parquet(a.steps_file()), pd.read_parquet(b.steps_file()),
                                  check_exact=True)


def _array_steps(rec_a: Recorder, rec_b: Recorder, n: int, rng, whole=lambda index: True, first: int = 0):
    """`n` random steps with prefetches per layer recorded layer by layer in `rec_a`, and in `rec_b`
    as the flat prefetch path's arrays (step_arrays) where `whole(index)`, else layer by layer too."""
    m = rec_a.model
    for index in range(first, first + n):
        phase = "prefill" if index % 4 == 0 else "decode"
        plan = StepPlan(index, phase, 0, np.arange(3 if index % 3 else 1), 3, 10, np.zeros((3, 1, 1)))
        for r in (rec_a, rec_b):
            r.step_start(plan, float(index))
        t, attn = float(index), float(rng.random())
        F, I = np.empty((m.num_layers, 5)), np.empty((m.num_layers, 4), dtype=np.int64)
        uniq = rng.integers(1, 9, size=m.num_layers)
        for layer in range(m.num_layers):
            busy, stall = float(rng.random()), float(rng.random())
            nk = int(uniq[layer])
            nm, late = int(rng.integers(0, nk + 1)), int(rng.integers(0, 2))
            pf = int(rng.integers(0, 5))
            t0, tg, te = t, t + attn, t + attn + busy + stall
            F[layer], I[layer] = (t0, tg, te, busy, stall), (nk - nm, late, nm, pf)
            recs = (rec_a,) if whole(index) else (rec_a, rec_b)
            for r in recs:
                r.prefetch_issued += pf  # (layer_row: its prefetches are the issued count's growth)
                r.layer_row(plan, layer, t0, tg, te, attn, busy, stall, nk - nm, late, nm, nk)
            t = te
        if whole(index):
            rec_b.step_arrays(plan, attn, F, I, uniq)


def test_step_arrays_equals_layer_row_per_layer():
    m = get_preset("olmoe-1b-7b")
    a, b = Recorder(m), Recorder(m)
    _array_steps(a, b, 9, np.random.default_rng(4))
    b._last_prefetch = a._last_prefetch  # (the flat path counts its prefetches at the end of the run)
    _same(a, b, 9 * m.num_layers)
    assert a.late_hits == b.late_hits and a.late_hits > 0


def test_step_arrays_mixed_with_layer_rows_and_over_a_chunk(tmp_path):
    """Arrays, whole steps (layer_rows) and single rows interleaved keep their order, across a
    compaction, and stream to the same Parquet rows."""
    m = get_preset("olmoe-1b-7b")
    steps = _CHUNK // m.num_layers + 5
    rng = np.random.default_rng(5)
    a, b, c = Recorder(m), Recorder(m), Recorder(m, tmp_path / "c.parquet")
    ref = Recorder(m, tmp_path / "ref.parquet")
    for first in range(0, steps, 10):
        n = min(10, steps - first)
        if (first // 10) % 2:
            _steps(a, b, n, rng, whole=lambda i: i % 3 != 1, first=first)
        else:
            _array_steps(a, b, n, rng, whole=lambda i: i % 5 != 2, first=first)
    b._last_prefetch = a._last_prefetch
    _same(a, b, steps * m.num_layers)
    rng = np.random.default_rng(6)
    _array_steps(ref, c, steps, rng, whole=lambda i: i < steps - 2)
    pd.testing.assert_frame_equal(pd.read_parquet(ref.steps_file()), pd.read_parquet(c.steps_file()),
                                  check_exact=True)


@pytest.mark.parametrize("seed", range(10))
def test_one_token_keys_equals_dedup_flat(seed):
    """The per-block sorted keys of one-token steps give `_dedup_flat`'s triple for every token (and
    None where a token repeats an expert in a layer), whatever order the tokens are asked in."""
    rng = np.random.default_rng(seed)
    E, L = int(rng.integers(2, 70)), int(rng.integers(1, 20))
    k = int(rng.integers(1, min(E, 8) + 1))
    T = int(rng.integers(1, 200))
    experts = rng.integers(0, E, size=(T, L, k)).astype(np.int16)
    distinct = np.argsort(rng.random((T, L, E)), axis=2)[:, :, :k].astype(np.int16)  # top-k as routers give
    experts = np.where(rng.random(T)[:, None, None] < 0.8, distinct, experts)
    block = None
    order = list(range(len(experts))) + rng.integers(0, len(experts), size=20).tolist()
    for d in order:
        got, block = one_token_keys(experts, d, E, block)
        u, c, b = _dedup_flat(experts[d:d + 1].copy(), E, True)[2]
        srt = np.sort(experts[d], axis=1)
        if (srt[:, 1:] == srt[:, :-1]).any():
            assert got is None
            continue
        gu, gc, gb = got[2]
        assert gu.dtype == u.dtype and np.array_equal(gu, u) and np.array_equal(gc, c) and list(gb) == list(b)
        assert [x.tolist() for x in got[0]] == [x.tolist() for x in _dedup_flat(experts[d:d + 1].copy(), E, True)[0]]
