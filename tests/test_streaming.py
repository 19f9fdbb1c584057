"""Step rows stream to Parquet during a run: the table and the summary are the same as from the
whole table in memory, however the rows are chunked."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

import moesim.engine.metrics as metrics
from moesim.config import load_scenario
from moesim.engine.run import simulate

ROOT = Path(__file__).resolve().parents[1]


def _from_table(steps: pd.DataFrame) -> dict:
    """The summary's step statistics as the whole table gives them (pandas group-bys)."""
    dec = steps[steps["phase"] == "decode"]
    by = dec.groupby("seqs", observed=True)["unique_experts"].mean()
    d = dec.groupby("step")
    return {"decode_step_ms": metrics.percentiles(d["end_s"].max() - d["start_s"].min(), 1e3),
            "unique_experts_per_layer": float(steps["unique_experts"].mean()),
            "unique_experts_per_layer_decode": float(dec["unique_experts"].mean()),
            "unique_experts_by_batch_size": {str(int(k)): float(v) for k, v in by.items()},
            "mean_decode_batch": float(d["seqs"].first().mean())}


def _stats(summary: dict) -> dict:
    dd = summary["dedup"]
    return {"decode_step_ms": summary["decode_step_ms"], **{k: dd[k] for k in (
        "unique_experts_per_layer", "unique_experts_per_layer_decode", "unique_experts_by_batch_size",
        "mean_decode_batch")}}


def test_small_chunks_give_the_same_table_and_summary(monkeypatch, tmp_path):
    sc = load_scenario(ROOT / "scenarios" / "quickstart.yaml", ["batch.size=3"])
    whole = simulate(sc)
    monkeypatch.setattr(metrics, "_CHUNK", 37)  # many row groups, a step split across chunks
    chunked = simulate(sc)
    assert chunked.summary == whole.summary
    pd.testing.assert_frame_equal(chunked.steps, whole.steps, check_exact=True)
    assert len(whole.steps) > 37 * 3
    assert _stats(chunked.summary) == _from_table(chunked.steps)


def test_spill_file_is_removed_with_the_result():
    sc = load_scenario(ROOT / "scenarios" / "quickstart.yaml")
    res = simulate(sc)
    path = Path(res.steps_file)
    assert path.is_file() and len(res.steps) == pd.read_parquet(path).shape[0]
    del res
    import gc

    gc.collect()
    assert not path.exists()


def test_key_log_keeps_every_key_in_order():
    log = metrics.KeyLog(chunk=1000)  # most keys spilled to the file, some appends larger than the buffer
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 10_000, size=int(n)) for n in rng.integers(0, 3000, size=20)] + [np.arange(7)]
    for p in parts:
        log.append(p)
    whole = np.concatenate(parts)
    assert np.array_equal(log.array(), whole) and len(log) == len(whole)
    assert log._spilled > 0 and log._n > 0
    for a, b in [(0, 1), (0, log._spilled), (log._spilled - 3, log._spilled + 5), (log._spilled, len(log)),
                 (len(log) - 1, len(log) + 10), (7, 7), (5, 2)] + [tuple(sorted(rng.integers(0, len(log), 2)))
                                                                  for _ in range(20)]:
        got = log[a:b]
        assert got.dtype == np.int32 and np.array_equal(got, whole[a:b]), (a, b)
    log.close()
    assert log._file is None


def test_key_log_slices_are_copies_of_the_buffer():
    log = metrics.KeyLog(chunk=8)
    log.append(np.arange(5))
    head = log[0:5]
    log.append(np.arange(100, 106))  # spills the buffer and refills it
    assert head.tolist() == [0, 1, 2, 3, 4] and log[:].tolist() == list(range(5)) + list(range(100, 106))


def test_key_log_leaves_no_file_behind(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    log = metrics.KeyLog(chunk=16)
    log.append(np.arange(100))
    assert log._file is not None and list(tmp_path.iterdir()) == []  # unlinked from the start
    log.close()
    assert list(tmp_path.iterdir()) == []


def test_gap_report_from_a_spilled_key_log_is_the_same(monkeypatch):
    """A run whose key log spills every few keys reports the same policy gap (and summary)."""
    sc = load_scenario(ROOT / "scenarios" / "quickstart.yaml", ["batch.size=3", "cache.gpu.capacity_gb=2"])
    whole = simulate(sc)
    monkeypatch.setattr(metrics, "_KEY_CHUNK", 50)
    spilled = simulate(sc)
    gap = whole.summary["policy_gap"]
    assert gap is not None and gap["lru_misses"] > gap["belady_misses"] > 0
    assert gap["accesses"] == whole.summary["accesses"] > 50 * 10
    assert spilled.summary == whole.summary


def test_a_failure_after_the_run_leaves_no_spill_file(monkeypatch, tmp_path):
    """The step rows' spill file belongs to the Result; when the summary fails to build (here the gap
    report), the run removes it instead of leaving it in the temporary directory."""
    import moesim.engine.run as run

    sc = load_scenario(ROOT / "scenarios" / "quickstart.yaml", ["batch.size=3"])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def broken(*a, **k):
        raise RuntimeError("gap report failed")
    monkeypatch.setattr(run, "policy_gap", broken)
    try:
        simulate(sc)
    except RuntimeError as e:
        assert "gap report failed" in str(e)
    else:
        raise AssertionError("simulate did not raise")
    assert not list(tmp_path.glob("moesim-steps-*")), list(tmp_path.iterdir())
