"""Both step views, the simulator's (engine.sim._View) and the real executor's (real.view.RealView),
implement exactly the StepView that predictors/base.py declares (same members, same signatures),
and answer the same questions the same way on the same step."""
from __future__ import annotations

import inspect
from types import SimpleNamespace

import numpy as np
import pytest

from moesim.engine.plan import batch_steps
from moesim.engine.sim import _View as SimView
from moesim.predictors.base import Predictor, StepView
from moesim.real.view import RealView, with_pre_attn
from moesim.traces.io import RequestTrace

VIEWS = [SimView, RealView]
METHODS = sorted(n for n, v in vars(StepView).items() if inspect.isfunction(v) and not n.startswith("_"))
ATTRIBUTES = sorted(StepView.__annotations__)


def _public_methods(cls) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_") and inspect.isfunction(getattr(cls, n))}


def test_the_protocol_declares_what_predictors_use():
    assert METHODS == ["experts", "future", "pre_attn", "routing", "token_experts"]
    assert ATTRIBUTES == ["phase", "request_ids", "step", "token_request_ids"]
    assert Predictor.needs_pre_attn is False and Predictor.needs_future is False


@pytest.mark.parametrize("cls", VIEWS, ids=lambda c: c.__module__)
def test_view_has_the_protocols_methods_with_its_signatures(cls):
    assert _public_methods(cls) == set(METHODS)  # nothing missing, nothing undeclared
    for name in METHODS:
        assert str(inspect.signature(getattr(cls, name))) == str(inspect.signature(getattr(StepView, name))), name


def _requests():
    rng = np.random.default_rng(1)
    L, E, K, d = 3, 8, 2, 5
    reqs = []
    for rid, (p, n) in enumerate([(3, 2), (2, 3)]):
        r = RequestTrace(rid, p, n, L, rng.integers(0, E, (p + n, L, K)).astype(np.int16))
        r.pre_attn = rng.standard_normal((p + n, L, d)).astype(np.float16)
        reqs.append(r)
    return reqs, E


@pytest.mark.parametrize("cls", VIEWS, ids=lambda c: c.__module__)
def test_view_attributes_and_answers(cls):
    """Each view of a static batch's steps answers from the step's routing and pre_attn rows (the
    pre_attn rows of request r's token t are r.pre_attn[t], as the engine's scheduler sets them)."""
    reqs, E = _requests()
    owner = SimpleNamespace(E=E, L=3, dedup=True, predictor=SimpleNamespace(needs_future=False))
    steps = list(with_pre_attn(batch_steps(reqs, 0, 0, E, True), {r.request_id: r for r in reqs}))
    assert [s.phase for s in steps] == ["prefill", "decode", "decode", "decode"]
    for plan in steps:
        v = cls(owner, plan)
        for a in ATTRIBUTES:
            assert hasattr(v, a), a
        with pytest.raises(LookupError):
            v.experts(0)
        with pytest.raises(LookupError):
            v.pre_attn(0)
        v.gated = v.pre_attn_layer = 1
        assert np.array_equal(v.experts(1), np.unique(plan.routing[:, 1, :]))
        assert np.array_equal(v.token_experts(1), plan.routing[:, 1, :])
        if plan.phase == "prefill":
            want = np.concatenate([r.pre_attn[: r.prompt_len, 1] for r in reqs])
        else:
            t = plan.index - 1 + np.array([reqs[r].prompt_len for r in plan.request_ids])
            want = np.stack([reqs[r].pre_attn[tt, 1] for r, tt in zip(plan.request_ids, t)])
        assert np.array_equal(v.pre_attn(1), want)
        with pytest.raises(LookupError):
            v.token_experts(2)
        with pytest.raises(LookupError):  # (not every layer gated yet)
            v.routing()
        v.gated = 2
        assert np.array_equal(v.routing(), plan.routing)
        with pytest.raises(PermissionError):
            v.future(1, 0)
