"""The prefetch path's bulk shortcuts give the key-by-key results: a protected block's pins in one
tier call and its new loads queued together while the PCIe link is busy (loads._issue_held,
Simulation._start_prefetches), the stale front of the prefetch queue dropped in one call with its
loads reused (Simulation._drop_stale), and multilook's learning in one call per step."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from moesim.cache.tiers import Tier
from moesim.engine.run import simulate
from moesim.engine.sim import Simulation
from moesim.predictors import registry
from tests.helpers import TINY_MODEL, fixed_profile, scenario, write_routing
from tests.test_predictor_fast_paths import PartByPart, _prob_numpy

MODEL = {**TINY_MODEL, "num_layers": 6, "num_experts": 16, "top_k": 3}
PREDICTORS = {
    "topk": {"k": 6, "update_frequency": 2, "lookahead_layers": 2},
    "multilook": {"min_pattern_frequency": 1, "min_confidence": 0.0, "lookahead_layers": 3},
    "oracle": {"lookahead_layers": 4},
    "intelligent": {"lookahead_layers": 2},
}


def test_pin_held_many_pins_the_keys_holding_a_slot_and_returns_the_rest():
    t = Tier("gpu", 4, "lru", num_experts=8, num_layers=1)
    t.reserve(0, 0)                      # in flight
    t.reserve(1, 1)
    t.complete(1)                        # ready
    held, rest = t.pin_held_many([2, 0, 1, 2, 1])
    assert held == [0, 1, 1] and rest == [2, 2]
    assert t.pin_count(0) == 1 and t.pin_count(1) == 2 and not t.is_pinned(2)
    t.check()
    assert t.reserve(2, 2) == [] and t.reserve(3, 3) == [] and t.reserve(4, 4) is None  # 1 pinned: no victim


def _run(tmp_path, name, dram):
    rng = np.random.default_rng(7)
    E, K, L = MODEL["num_experts"], MODEL["top_k"], MODEL["num_layers"]
    routing = np.stack([rng.permutation(E)[:K] for _ in range(3 * 24 * L)]).reshape(3, 24, L, K)
    trace = write_routing(tmp_path / "t.parquet", routing.astype(np.int16), 4, E)
    sc = scenario(trace, model=MODEL, hardware=fixed_profile(pcie_gbps=0.3, expert_ms=0.05),
                  gpu={"capacity_experts": 20}, dram={"capacity_experts": 40} if dram else None,
                  predictor={"name": name, **PREDICTORS[name]}, batch={"size": 2})
    return simulate(sc, record_events=True, engine="simpy")


@pytest.mark.parametrize("dram", [False, True], ids=["no-dram", "dram"])
@pytest.mark.parametrize("name", sorted(PREDICTORS))
def test_bulk_prefetch_path_equals_key_by_key(tmp_path, monkeypatch, name, dram):
    """The same summary, steps, requests and events with the shortcuts as with them all off."""
    used = {"held": 0, "dropped": 0}
    issue_held, drop_stale = Simulation._issue_held, Simulation._drop_stale

    def counted_held(self, keys, target):
        used["held"] += 1
        return issue_held(self, keys, target)

    def counted_drop(self, q):
        n = len(q)
        drop_stale(self, q)
        used["dropped"] += n - len(q)
    monkeypatch.setattr(Simulation, "_issue_held", counted_held)
    monkeypatch.setattr(Simulation, "_drop_stale", counted_drop)
    bulk = _run(tmp_path, name, dram)
    # the shortcuts did run (an oracle's prefetches are all needed: promoted at their gate, never stale)
    assert used["held"] > 0 and (dram or name == "oracle" or used["dropped"] > 0)
    monkeypatch.setattr(Simulation, "_pcie_full", lambda self: False)  # every block key by key
    monkeypatch.setattr(Simulation, "_drop_stale", lambda self, q: None)  # Queues._next drops one by one
    ref = _run(tmp_path, name, dram)
    assert json.dumps(bulk.summary, sort_keys=True) == json.dumps(ref.summary, sort_keys=True)
    for table in ("steps", "requests", "events"):
        pd.testing.assert_frame_equal(getattr(bulk, table), getattr(ref, table), check_exact=True)


def _learn_hops_per_hop(self, seq, pvalid):
    """The per-hop loop _learn_hops replaced (the reference)."""
    L, E = self.L, self.E
    for hop in range(self.hops.shape[0]):
        d = hop + 1
        qs = np.arange(max(0, L - d), 2 * L - d)
        valid = (qs >= L)[None, :] | pvalid[:, None]
        a, b = seq[:, qs][valid], seq[:, qs + d][valid]
        lay = np.broadcast_to((qs % L)[None, :], valid.shape)[valid].astype(np.int64)
        if a.shape[0] == 0:
            continue
        np.add.at(self.hops[hop].reshape(-1), ((lay[:, None, None] * E + a[:, :, None]) * E + b[:, None, :]).ravel(),
                  np.float32(1))
        src = (lay[:, None] * E + a).ravel()
        np.add.at(self.occ[hop].reshape(-1), src, np.float32(1))
        touched = np.unique(src)
        self.hops_p[hop].reshape(-1, E)[touched] = _prob_numpy(
            self, self.hops[hop].reshape(-1, E)[touched], self.occ[hop].reshape(-1)[touched][:, None],
            self.params.min_pattern_frequency)


def test_multilook_learns_as_the_per_hop_masked_form():
    """Tables and predictions bit for bit as learnt hop by hop with boolean masks."""
    from tests.test_predictors_heuristic import MODEL as model, STREAM, FakeView

    cls = registry.get("multilook")
    params = cls.Params(lookahead_layers=3, min_pattern_frequency=1, min_confidence=0.2)
    new, old = (cls(params, model, np.random.default_rng(0)) for _ in range(2))
    old._learn_hops = _learn_hops_per_hop.__get__(old)
    old._learn_tables = PartByPart._learn_tables.__get__(old)  # (learnt part by part: its own hops)
    for i in range(len(STREAM)):
        for p in (new, old):
            view = FakeView(STREAM, i, False)
            answers = [list(p.on_step_start(view))]
            for layer in range(model.num_layers):
                view.gated = layer
                answers.append(list(p.on_gate(view, layer)))
            p.on_step_end(view)
            p.answers = answers
        assert new.answers == old.answers
    assert new.hops.any() and new.store.p.any()
    for name in ("hops", "occ", "hops_p"):
        assert np.array_equal(getattr(new, name), getattr(old, name)), name
    assert np.array_equal(new.store.p, old.store.p)
