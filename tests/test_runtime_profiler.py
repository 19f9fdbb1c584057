"""The runtime YAML that `moesim profile` writes from its measurements (no torch needed): the
per-layer and per-expert host costs come from the line through two bookkeeping points."""
from __future__ import annotations

import pytest

from moesim.hardware.runtime import runtime_from_dict
from moesim.real.runtime_profiler import bookkeeping_fit, runtime_doc


def _st(median, **kw):
    return {"median": median, "p10": median * 0.9, "p90": median * 1.1, "n": 100, **kw}


def _meas(one=(30.0, 8), many=(100.0, 36)):
    grid = [{"batch": b, "context": c, **_st(1.0 + b + c / 100)} for b in (1, 8) for c in (32, 64, 128)]
    return {"layer_bookkeeping": _st(one[0], tokens=1, experts=one[1]),
            "layer_bookkeeping_batch": _st(many[0], tokens=8, experts=many[1]),
            "step_setup": _st(20.0), "readback": {"tolist": _st(1.0), "topk_and_tolist": _st(4.0)},
            "expert_dispatch": None, "lm_head": {1: _st(5.0), 16: _st(30.0)},
            "copy_slowdown": {"alone": _st(0.5), "while_copying": _st(0.6), "copies": 10, "copy_bytes": 1 << 20,
                              "slowdown": 1.2},
            "dequant": {"int8": {"packed_bytes": 1 << 20, **_st(1.0), "gbps": 1.0}},
            "attention_grid": grid}


def test_bookkeeping_fit_is_the_line_through_two_points():
    layer, per_expert = bookkeeping_fit({"median": 30.0, "experts": 8}, {"median": 100.0, "experts": 36})
    assert per_expert == pytest.approx(2.5) and layer == pytest.approx(10.0)
    assert bookkeeping_fit({"median": 30.0, "experts": 8}, {"median": 20.0, "experts": 36}) == (30.0, 0.0)
    assert bookkeeping_fit({"median": 30.0, "experts": 8}, {"median": 50.0, "experts": 8}) == (30.0, 0.0)


def test_cpu_runtime_doc_charges_per_expert_bookkeeping_and_validates():
    doc = runtime_doc(_meas(), "measured by test", "t-runtime", cuda=False)
    rt = runtime_from_dict(doc)
    assert rt.layer_host_us == pytest.approx(10.0) and rt.expert_dispatch_us == pytest.approx(2.5)
    assert rt.synchronous_compute and "per-expert slope" in rt.source["expert_dispatch_us"]
    assert rt.attention_grid.context == [32.0, 64.0, 128.0] and rt.attention_grid.sequences == [1.0, 8.0]
    assert rt.attention_grid.ms_at(8, 64) == pytest.approx(1.0 + 8 + 0.64)
    # without the second point (an older measurements file): the one-token time, no per-expert term
    m = _meas()
    del m["layer_bookkeeping_batch"]
    rt1 = runtime_from_dict(runtime_doc(m, "measured by test", "t-runtime", cuda=False))
    assert rt1.layer_host_us == pytest.approx(30.0) and rt1.expert_dispatch_us == 0.0


def _load(alone, busy):
    part = lambda m: _st(m)  # noqa: E731
    return {"bytes": 3 << 20, "io": "odirect", "phase_s": 0.4, "rounds": 3, "copy": "host memcpy (np.copyto)",
            "alone": {"read": part(alone * 0.8), "copy": part(alone * 0.2), "load": part(alone)},
            "busy": {"read": part(busy * 0.8), "copy": part(busy * 0.2), "load": part(busy)},
            "slowdown": busy / alone, "mean_slowdown": busy / alone}


def test_load_slowdown_is_written_with_its_source_and_clamped_at_1():
    m = {**_meas(), "load_slowdown": _load(1.6, 2.4)}
    rt = runtime_from_dict(runtime_doc(m, "measured by test", "t-runtime", cuda=False))
    assert rt.load_slowdown == pytest.approx(1.5)
    src = rt.source["load_slowdown"]
    assert src.startswith("measured by test") and "2.4 ms" in src and "1.6 ms" in src and "odirect" in src
    faster = runtime_from_dict(runtime_doc({**_meas(), "load_slowdown": _load(2.0, 1.8)}, "by", "t", cuda=False))
    assert faster.load_slowdown == 1.0  # noise below 1 is no speed-up
    assert runtime_from_dict(runtime_doc(_meas(), "by", "t", cuda=False)).load_slowdown == 1.0  # not measured
