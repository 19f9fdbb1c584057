"""Hook answers in the engine's issue order (predictors.base.Ranked) and the Tier calls the
prefetch path makes in bulk (pin_held, unpin_all)."""
from __future__ import annotations

import numpy as np
import pytest

from moesim.cache.tiers import Tier
from moesim.predictors import Prefetch, registry
from moesim.predictors.base import Ranked, issue_order, ranked_blocks
from tests.test_predictors_heuristic import MODEL, STREAM, FakeView

PARAMS = {
    "topk": {"k": 5, "lookahead_layers": 3, "update_frequency": 4},
    "multilook": {"lookahead_layers": 3, "max_per_layer": 4, "min_pattern_frequency": 1, "min_confidence": 0.0},
    "intelligent": {"lookahead_layers": 3, "max_per_layer": 6},
    "activation_matrix": {"lookahead_layers": 3, "max_per_layer": 3},
    "oracle": {"lookahead_layers": 9},
    "noisy_oracle": {"lookahead_layers": 4, "recall": 0.7, "false_positive_rate": 0.2},
}


def _answers(name: str):
    """Every hook answer of predictor `name` driven over the test stream."""
    cls = registry.get(name)
    pred = cls(cls.Params(**PARAMS[name]), MODEL, np.random.default_rng(0))
    for i in range(len(STREAM)):
        view = FakeView(STREAM, i, pred.needs_future)
        yield pred.on_step_start(view)
        for layer in range(MODEL.num_layers):
            view.gated = layer
            yield pred.on_gate(view, layer)
        pred.on_step_end(view)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_answers_are_in_issue_order(name):
    """A Ranked answer iterates exactly as the engine would sort it, one block per target."""
    ranked = requests = 0
    for ans in _answers(name):
        reqs = list(ans)
        assert all(isinstance(p, Prefetch) for p in reqs)
        assert reqs == sorted(reqs, key=issue_order)
        blocks = ranked_blocks(ans)
        targets = [(s, l) for s, l, _e, _v in blocks]
        assert targets == sorted(set(targets))
        assert blocks == ranked_blocks(reqs)  # the same blocks a plain list of the requests gives
        ranked += isinstance(ans, Ranked)
        requests += len(reqs)
    assert ranked and requests  # the answers were Ranked, and not all empty


def test_ranked_blocks_sorts_and_groups_a_plain_list():
    reqs = [Prefetch(1, 0, 5, 0.5), Prefetch(0, 2, 3, 0.9), Prefetch(1, 0, 2, 0.5), Prefetch(1, 0, 7, 0.8),
            Prefetch(0, 2, 1, 0.9)]
    assert ranked_blocks(reqs) == [(0, 2, [1, 3], [0.9, 0.9]), (1, 0, [7, 2, 5], [0.8, 0.5, 0.5])]
    r = Ranked()
    r.add(0, 2, [1, 3], [0.9, 0.9])
    r.add(1, 1, [], [])  # an empty block is no block
    assert len(r) == 2 and r == sorted(reqs[1::3], key=issue_order) and ranked_blocks(r) is r.blocks


def test_pin_held_pins_only_a_key_that_holds_a_slot():
    t = Tier("gpu", 1, "lru", num_experts=4, num_layers=1)
    assert not t.pin_held(0) and not t.is_pinned(0)  # absent: nothing changes
    t.reserve(0, 0)
    assert t.pin_held(0) and t.pin_count(0) == 1     # in flight
    t.complete(0)
    assert t.pin_held(0) and t.pin_count(0) == 2     # ready
    assert t.reserve(1, 1) is None                   # pinned: never the victim
    t.unpin_all([0, 0])
    assert not t.is_pinned(0) and t.reserve(1, 2) == [0]
    t.check()


def test_unpin_all_unpins_in_order_and_names_an_unpinned_key():
    t = Tier("gpu", 4, "lru", num_experts=4, num_layers=1)
    for k in (0, 1):
        t.reserve(k, k)
        t.complete(k)
    t.pin(0)
    t.pin(0)
    t.pin(1)
    t.unpin_all([0, 1])
    assert t.pin_count(0) == 1 and not t.is_pinned(1)
    with pytest.raises(KeyError, match="key 1 is not pinned"):
        t.unpin_all([0, 1])
    assert not t.is_pinned(0)  # the keys before the bad one were unpinned
    t.check()
