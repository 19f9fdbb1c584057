"""The fast path's per-step shortcuts give exactly what the per-layer reference code gives:
plan._counts' count table vs np.unique, Recorder.layer_rows vs layer_row per layer."""
import numpy as np
import pytest

from moesim.engine.metrics import Recorder
from moesim.engine.plan import StepPlan, _counts
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


def test_layer_rows_equals_layer_row_per_layer():
    rng = np.random.default_rng(1)
    m = get_preset("olmoe-1b-7b")
    a, b = Recorder(m), Recorder(m)
    for index in range(5):
        phase = "prefill" if index == 0 else "decode"
        plan = StepPlan(index, phase, 0, np.arange(3 if index < 3 else 2), 3, 10, np.zeros((3, 1, 1)))
        a.prefetch_issued += 2
        b.prefetch_issued += 2
        t = float(index)
        cols = [[], [], [], [], [], [], []]
        attn = float(rng.random())
        for layer in range(m.num_layers):
            busy, stall = float(rng.random()), float(rng.random())
            nk = int(rng.integers(1, 9))
            nm = int(rng.integers(0, nk + 1))
            t0, tg, te = t, t + attn, t + attn + busy + stall
            a.layer_row(plan, layer, t0, tg, te, attn, busy, stall, nk - nm, 0, nm, nk)
            for c, v in zip(cols, (t0, tg, te, busy, stall, nm, nk)):
                c.append(v)
            t = te
        b.layer_rows(plan, *cols[:3], attn, *cols[3:])
    assert a._cols == b._cols and len(b._cols[0]) == 5 * m.num_layers
    for f in ("hits", "misses", "compute_s", "stall_s", "_rows_n", "_uniq_sum", "_dec_rows", "_dec_uniq",
              "_dec_by_seqs", "_dec_seqs_sum", "_cur", "_last_prefetch"):
        assert getattr(a, f) == getattr(b, f), f
