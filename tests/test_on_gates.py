"""A predictor's step-level hooks give exactly what its per-gate hooks give: intelligent's compiled
`on_step_start` and `on_gates` against `_predict` and `on_gate` asked layer by layer, answers and
state (weights, pending predictions, learnt transitions) compared after every step."""
from __future__ import annotations

import numpy as np
import pytest

from moesim.predictors import registry
from moesim.predictors.topk import HistoryPredictor

from .test_predictors_heuristic import MODEL, STICKY, STREAM, FakeView, make_stream

NOISY = make_stream(n_requests=12, batch=3, prompt=5, decode=8, noise=0.4, seed=3)


def _answers(reqs) -> list:
    return [tuple(p) for p in reqs]


def _step_both(ref, new, steps: list, i: int):
    """Step i of `steps` on a per-gate predictor (ref) and a step-level one (new), their step
    starts compared (ref's through the per-target `_predict`); returns (new's on_gates answer,
    ref's gate answers, ref's view, new's view)."""
    L = MODEL.num_layers
    view, nview = FakeView(steps, i, False), FakeView(steps, i, False)
    want = _answers(HistoryPredictor.on_step_start(ref, view))
    assert _answers(new.on_step_start(nview)) == want
    gates = []
    for layer in range(L):
        view.gated = layer
        gates.append(_answers(ref.on_gate(view, layer)))
    nview.gated = L - 1
    return new.on_gates(nview), gates, view, nview


def _run_both(params: dict, steps: list) -> tuple[int, int]:
    """Drive a per-gate and a step-level predictor over `steps`; returns (steps the step-level
    hook answered, gates answered non-empty)."""
    L = MODEL.num_layers
    ref = registry.create("intelligent", params, MODEL, np.random.default_rng(0))
    new = registry.create("intelligent", params, MODEL, np.random.default_rng(0))
    answered = nonempty = 0
    for i in range(len(steps)):
        got, gates, view, nview = _step_both(ref, new, steps, i)
        if got is not None:
            answered += 1
            assert [_answers(g) for g in got] == gates
            nonempty += sum(bool(g) for g in gates)
        else:  # (the engine then asks layer by layer)
            for layer in range(L):
                assert _answers(new.on_gate(nview, layer)) == gates[layer]
        np.testing.assert_array_equal(new.weights, ref.weights)
        assert new._pending.keys() == ref._pending.keys()
        for k, v in ref._pending.items():
            np.testing.assert_array_equal(new._pending[k], v)
        ref.on_step_end(view)
        new.on_step_end(nview)
    for name in ("trans", "P", "freq", "last_used", "_tie", "_masks0"):
        np.testing.assert_array_equal(getattr(new, name), getattr(ref, name))
    return answered, nonempty


@pytest.mark.parametrize("params", [
    {},
    {"pattern_min_history": 1},
    {"pattern_min_history": 9},       # layers short of history in decode: the previous token counts
    {"pattern_min_history": 40},      # more than two steps' layers: no token ever qualifies
    {"max_tokens": 2},                # prefill steps read through a sample of their rows
    {"weight_update": "inverse_error", "weight_learning_rate": 0.3},
    {"transition_threshold": 0.0, "transition_k": 2, "pattern_k": 1, "max_per_layer": 3},
    {"frequency_weight": 0.0, "recency_weight": 0.0, "pattern_weight": 0.0, "weight_learning_rate": 1.0},
])
@pytest.mark.parametrize("stream", ["chains", "sticky", "noisy"])
def test_intelligent_step_hooks_match_its_gate_hooks(params, stream):
    steps = {"chains": STREAM, "sticky": STICKY, "noisy": NOISY}[stream]
    answered, nonempty = _run_both(params, steps)
    assert answered == len(steps)  # (one layer ahead, consecutive steps: every step in one call)
    assert nonempty > len(steps)   # (the answers compared are not all empty)


def test_intelligent_step_hooks_defer_to_the_gates_past_one_layer():
    """Look-ahead past one layer: on_gates answers None and the per-gate hooks run."""
    answered, _ = _run_both({"lookahead_layers": 2}, STREAM[:6])
    assert answered == 0


def test_intelligent_step_hooks_keep_the_gates_forgetting_rule():
    """Predictions pending for targets never reached (gaps in the step index): up to 8 they stay,
    in both; past 8, the gate hooks forget them at the next gate, so on_gates defers to them."""
    gaps = [dict(s, index=3 * i) for i, s in enumerate(STREAM[:14])]
    answered, _ = _run_both({}, gaps)
    assert answered == 13  # (step i has i stale: step 9 has 9 and defers; its gates forget them all)


@pytest.mark.parametrize("name, params", [
    ("oracle", {}), ("oracle", {"lookahead_layers": 3}), ("oracle", {"lookahead_layers": 40}),
    ("noisy_oracle", {"recall": 1.0, "false_positive_rate": 0.0, "lookahead_layers": 2}),
])
def test_the_oracles_step_hook_matches_its_gate_hooks(name, params):
    """Every gate's look-ahead read at once, across step boundaries and past the trace's end."""
    L = MODEL.num_layers
    pred = registry.create(name, params, MODEL, np.random.default_rng(0))
    for i in range(len(STREAM)):
        view = FakeView(STREAM, i, True)
        gates = []
        for layer in range(L):
            view.gated = layer
            gates.append(_answers(pred.on_gate(view, layer)))
        got = pred.on_gates(view)
        assert [_answers(g) for g in got] == gates
    assert any(gates) and not gates[-1]  # (the last step's last gate looks past the trace)


def test_a_noisy_oracle_draws_gate_by_gate():
    pred = registry.create("noisy_oracle", {"recall": 0.5}, MODEL, np.random.default_rng(0))
    assert pred.on_gates(FakeView(STREAM, 0, True)) is None


def _pack_both(g, L, E, step, predicted, accessed=None):
    """FlatLink._pack_gates of `g`, and FlatLink._pack of each gate's answer in turn then
    FlatPrefetch._score of the step's layers (the reference); `accessed`: each layer's keys."""
    from types import SimpleNamespace

    from moesim.engine.flat_link import FlatLink
    from moesim.engine.flat_prefetch import FlatPrefetch

    accessed = accessed or [[layer * E] for layer in range(L)]
    bounds = np.cumsum([0] + [len(a) for a in accessed]).tolist()
    allk = [k for a in accessed for k in a]
    new = SimpleNamespace(L=L, E=E, predicted={k: set(v) for k, v in predicted.items()},
                          pred=np.zeros((3, L), dtype=np.int64))
    out, at = FlatLink._pack_gates(new, g, step, np.array(allk, dtype=np.int64), np.array(bounds, dtype=np.int64))
    needed, made, correct = new.pred.tolist()
    rec = SimpleNamespace(pred_needed=[0] * L, pred_made=[0] * L, pred_correct=[0] * L)
    ref = SimpleNamespace(L=L, E=E, predicted={k: set(v) for k, v in predicted.items()}, rec=rec)
    want, want_at = [0], []
    for layer in range(L):
        want_at += [len(want)] * 2
        ref.gated = (step, layer)
        FlatLink._pack(ref, g[layer], want)
    want_at.append(len(want))
    later = {k: v for k, v in ref.predicted.items() if k[0] != step}
    FlatPrefetch._score(ref, step, range(L), allk, bounds)
    assert out.dtype == at.dtype == np.int64
    assert (out.tolist(), at.tolist(), new.predicted) == (want, want_at, later)
    assert (needed, made, correct) == (rec.pred_needed, rec.pred_made, rec.pred_correct)
    return want, new.predicted, made, correct


def test_the_flat_path_packs_gate_blocks_as_it_packs_each_gates_answer():
    """FlatLink._pack_gates (the arrays at once) against FlatLink._pack of each gate's Ranked:
    the same blocks, gate starts and recorded predictions, targets at or before the gate dropped,
    a target predicted twice recorded once with the union of its keys."""
    from moesim.predictors.base import GateBlocks

    L, E, step = 4, 8, 5
    g = GateBlocks([5, 5, 6, 5], [1, 1, 0, 3], np.array([3, 1, 2, 6, 7, 0, 5, 6]),
                   np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]), [2, 3, 6, 8])
    out, predicted, made, correct = _pack_both(g, L, E, step, {(6, 0): {1}, (5, 1): {E + 5}},
                                               [[0], [E + 1, E + 5, E + 1], [2 * E], [3 * E]])
    assert predicted == {(6, 0): {1, 6, 7, 0}}  # (gates 1 and 3: their own layer)
    assert (made, correct) == ([0, 3, 0, 0], [0, 2, 0, 0])  # (E + 1 accessed twice: once)
    assert out == [0, 5 * L + 1, 2, E + 3, E + 1, 6 * L, 3, 6, 7, 0]


@pytest.mark.parametrize("seed", range(20))
def test_the_flat_path_packs_several_targets_per_gate_as_each_gates_answer(seed):
    """Random GateBlocks with 1-4 targets per gate, some empty, some at or before their gate."""
    from moesim.predictors.base import GateBlocks

    rng = np.random.default_rng(seed)
    L, E, step, per = 5, 6, 3, int(rng.integers(1, 5))
    steps, layers, experts, ends = [], [], [], []
    for gate in range(L):
        for _ in range(per):
            code = step * L + gate + int(rng.integers(-2, 2 * L))
            steps.append(code // L)
            layers.append(code % L)
            experts += rng.permutation(E)[:int(rng.integers(0, 4))].tolist()
            ends.append(len(experts))
    g = GateBlocks(steps, layers, np.array(experts, dtype=np.int64), np.linspace(1, 0, len(experts)), ends, per)
    assert len(g) == L
    accessed = [sorted({layer * E + int(e) for e in rng.integers(0, E, 3)}) for layer in range(L)]
    _pack_both(g, L, E, step, {(step + 1, 0): {2}, (step, 2): {2 * E + 1}}, accessed)


@pytest.mark.parametrize("params", [
    {},
    {"lookahead_layers": 1, "max_per_layer": 3},
    {"lookahead_layers": 9, "pattern_length": 2, "max_patterns": 20, "min_pattern_frequency": 1},
    {"pattern_length": 6, "min_pattern_frequency": 1, "min_confidence": 0.0},  # windows into the previous token
    {"pattern_length": 40, "min_pattern_frequency": 1},  # longer than two steps' layers: no pattern
    {"max_tokens": 2, "min_pattern_frequency": 1},  # prefill steps read through a sample of their rows
    {"use_chains": False, "use_temporal": False},
    {"use_cooccurrence": False, "use_chains": False, "use_sequences": False},
])
@pytest.mark.parametrize("stream", ["chains", "sticky", "noisy"])
def test_multilook_step_hook_matches_its_gate_hooks(params, stream):
    """Answers, pattern accesses and learnt tables the same, step after step."""
    steps = {"chains": STREAM, "sticky": STICKY, "noisy": NOISY}[stream]
    ref = registry.create("multilook", params, MODEL, np.random.default_rng(0))
    new = registry.create("multilook", params, MODEL, np.random.default_rng(0))
    nonempty = 0
    for i in range(len(steps)):
        got, gates, view, nview = _step_both(ref, new, steps, i)
        assert len(got) == MODEL.num_layers and [_answers(g) for g in got] == gates
        nonempty += sum(bool(g) for g in gates)
        np.testing.assert_array_equal(new.store.access, ref.store.access)
        ref.on_step_end(view)
        new.on_step_end(nview)
    assert nonempty > len(steps)
    for name in ("hops", "occ", "hops_p", "temporal", "temporal_n"):
        np.testing.assert_array_equal(getattr(new, name), getattr(ref, name))
    for name in ("counts", "n", "p", "trusted", "access"):
        np.testing.assert_array_equal(getattr(new.store, name), getattr(ref.store, name))
