"""`moesim trace train-tiny` (a smoke run of a shrunken recipe) and the shipped learned trace."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moesim.traces import TraceReader, read_requests

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "traces" / "tiny-learned.parquet"


def test_shipped_learned_trace():
    assert SHIPPED.stat().st_size < 4_500_000
    rd = TraceReader(SHIPPED)
    m = rd.meta
    assert (m.model, m.num_layers, m.num_experts, m.top_k, m.seed) == ("tiny-olmoe-stdlib", 4, 32, 2, 0)
    assert m.source.startswith("collected:tiny-olmoe-stdlib(train-tiny seed=0 steps=1000")
    assert rd.has_pre_attn and rd.has_scores
    reqs = read_requests(SHIPPED)
    assert len(reqs) == 40 and all((r.prompt_len, r.decode_len) == (64, 64) for r in reqs)
    r = reqs[0]
    assert r.pre_attn.shape == (128, 4, 128) and r.pre_attn.dtype == np.float16 and np.isfinite(r.pre_attn).all()
    # gate weights in gate-score order (OLMoE: softmax probabilities, not renormalised)
    assert (np.diff(r.scores, axis=-1) <= 0).all() and (r.scores.sum(-1) <= 1 + 1e-6).all()


def test_train_tiny_smoke_is_reproducible(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from click.testing import CliRunner

    from moesim.cli.trace_sources import _standalone

    args = ["train-tiny", "--steps", "3", "--layers", "2", "--experts", "4", "--hidden", "32", "--requests", "2",
            "--prompt-len", "16", "--decode-len", "3", "--seed", "7"]
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.parquet"
        res = CliRunner().invoke(_standalone, [*args, "-o", str(out), "--json", str(tmp_path / f"{name}.json")])
        assert res.exit_code == 0, res.output
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    rd = TraceReader(tmp_path / "a.parquet")
    assert (rd.meta.num_layers, rd.meta.num_experts, rd.meta.top_k, rd.meta.seed) == (2, 4, 2, 7)
    assert [(r.prompt_len, r.decode_len) for r in read_requests(tmp_path / "a.parquet")] == [(16, 3)] * 2
    res = CliRunner().invoke(_standalone, ["train-tiny", "--top-k", "9", "--experts", "4", "-o",
                                           str(tmp_path / "c.parquet")])
    assert res.exit_code == 2 and "top_k" in res.output
