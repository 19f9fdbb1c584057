"""Per-layer allocation (uniform / proportional / optimal), the LRU -> Belady gap report, and the
cache-size guards (the exit-2 error for a per-layer capacity above a layer's experts, and the
thrash warnings)."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

from moesim.cache import replay
from moesim.cache.replay import replay_steps
from moesim.cache.allocation import allocate, effective_experts, miss_curve, optimal, proportional
from moesim.cache.gap import captured, gap_report
from moesim.cache.guards import thrash_warnings
from moesim.cli import main

ROOT = Path(__file__).resolve().parents[1]
TRACES = sorted((ROOT / "traces").glob("*.parquet"))
GOOD = (ROOT / "scenarios/quickstart.yaml").read_text().replace("../traces/", str(ROOT / "traces") + "/")


def layer_streams(path, steps: bool = False):
    """Each layer's keys in trace order; with ``steps`` also cut into one group per token."""
    from moesim.traces.io import TraceReader

    r = TraceReader(path)
    E, L, k = r.meta.num_experts, r.meta.num_layers, r.meta.top_k
    reqs = [q.experts.astype(np.int64) + (np.arange(q.experts.shape[1]) * E)[None, :, None]
            for q in r.iter_requests(pre_attn=False, scores=False)]
    s = np.concatenate([q.ravel() for q in reqs])
    streams = [s[s // E == i] for i in range(L)]
    if steps:
        return streams, [[tok[i] for q in reqs for tok in q] for i in range(L)], E, L, k
    return streams, E, L, k


def total_misses(streams, caps, policy):
    return sum(replay(s, c, policy).misses for s, c in zip(streams, caps))


# ---- miss curves and the allocators ----------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 9), max_size=150))
def test_one_pass_lru_curve_equals_replay_at_every_capacity(stream):
    curve = miss_curve(stream, "lru", 12)
    assert curve.tolist() == [replay(stream, c, "lru").misses for c in range(13)]


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 4).flatmap(lambda n: st.tuples(
    st.lists(st.lists(st.integers(0, 50), min_size=6, max_size=6), min_size=n, max_size=n),
    st.integers(n, 5 * n))))
def test_optimal_equals_brute_force(case):
    """Any curves (not only convex or monotone ones), capacities in [1, 5]."""
    rows, budget = case
    curves = [np.array([np.inf] + r[1:], dtype=float) for r in rows]
    caps = optimal(curves, budget, 1, 5)
    assert sum(caps) <= budget and all(1 <= c <= 5 for c in caps)
    best = min(sum(c[x] for c, x in zip(curves, xs)) for xs in itertools.product(range(1, 6), repeat=len(rows))
               if sum(xs) <= budget)
    assert sum(c[x] for c, x in zip(curves, caps)) == best


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 100), min_size=1, max_size=10), st.integers(0, 200))
def test_proportional_spends_the_budget_within_bounds(w, extra):
    n, lo, hi = len(w), 2, 16
    budget = n * lo + extra
    caps = proportional(w, budget, lo, hi)
    assert all(lo <= c <= hi for c in caps) and sum(caps) == min(budget, n * hi)


def test_effective_experts_is_one_for_a_single_expert_and_E_for_uniform():
    assert effective_experts([3] * 10, 8) == pytest.approx(1.0)
    assert effective_experts(list(range(8)) * 5, 8) == pytest.approx(8.0)


@pytest.mark.parametrize("path", TRACES, ids=lambda p: p.stem)
def test_optimal_never_worse_than_uniform_on_shipped_traces(path):
    """At every tested budget (per-layer capacity top_k .. E), for lru and s3fifo: the optimal
    split's replay misses <= the uniform split's, and proportional stays inside the bounds."""
    streams, E, L, k = layer_streams(path)
    per = sorted({k, (k + E) // 4, (k + E) // 2, E - 1} - {0})
    for policy in ("lru", "s3fifo"):
        curves = [miss_curve(s, policy, E, k) for s in streams]   # what allocate("optimal") computes
        for c in per:
            uni = total_misses(streams, [c] * L, policy)
            opt = optimal(curves, c * L, k, E)
            assert sum(opt) <= c * L and min(opt) >= k
            assert total_misses(streams, opt, policy) <= uni, (policy, c)
            prop = allocate("proportional", streams, c * L, k, E, policy, E)
            assert sum(prop) == c * L and k <= min(prop) and max(prop) <= E


@pytest.mark.parametrize("path", TRACES, ids=lambda p: p.stem)
def test_optimal_never_worse_than_uniform_in_the_pinned_step_replay(path):
    """The same, for the replay the engine plans on (a step's experts pinned; here one step per
    token, as for open-loop arrivals), lru."""
    streams, groups, E, L, k = layer_streams(path, steps=True)
    curves = [miss_curve(s, "lru", E, k, g) for s, g in zip(streams, groups)]
    for c in sorted({k, (k + E) // 4, E - 1}):
        opt = optimal(curves, c * L, k, E)
        assert sum(replay_steps(g, x, "lru").misses for g, x in zip(groups, opt)) <= \
            sum(replay_steps(g, c, "lru").misses for g in groups), c


# ---- gap report ------------------------------------------------------------------------------

def test_captured():
    assert captured(100, 60, 100) == 0 and captured(100, 60, 60) == 1 and captured(100, 60, 80) == 0.5
    assert captured(50, 50, 50) is None and captured(100, 60, 120) == -0.5


@pytest.mark.parametrize("partition", ["global", "per_layer"])
def test_gap_report_adds_up(partition):
    rng = np.random.default_rng(0)
    E, L = 16, 4
    s = np.concatenate([[layer * E + int(rng.zipf(1.3)) % E for layer in range(L)] for _ in range(1500)])
    cap = 20 if partition == "global" else [3, 5, 6, 7]
    r = gap_report(s, "arc", partition, cap, E, L)
    want = {p: (replay(s, cap, p).misses if partition == "global"
                else sum(replay(s[s // E == i], c, p).misses for i, c in enumerate(cap)))
            for p in ("lru", "belady", "arc")}
    assert (r["lru_misses"], r["belady_misses"], r["policy_misses"]) == (want["lru"], want["belady"], want["arc"])
    assert sum(x["policy_misses"] for x in r["layers"]) == r["policy_misses"]
    assert sum(x["accesses"] for x in r["layers"]) == len(s)
    assert all(x["belady_misses"] <= x["lru_misses"] for x in r["layers"]) or partition == "global"


def test_every_run_reports_gap_and_allocation(tmp_path):
    out = tmp_path / "r"
    code = CliRunner().invoke(main, ["run", str(_scenario(tmp_path, "{capacity_experts: 16, partition: per_layer, "
                                                        "allocation: optimal, policy: sieve}")),
                                     "-o", str(out), "--no-report", "--quiet"]).exit_code
    assert code == 0
    import json

    s = json.loads((out / "summary.json").read_text())
    a = s["cache_allocation"]["gpu"]
    assert sum(a["per_layer"]) <= 16 * 16 and min(a["per_layer"]) >= 8
    assert a["replay_misses"]["optimal"] <= a["replay_misses"]["uniform"]
    g = s["policy_gap"]
    assert g["policy"] == "sieve" and len(g["layers"]) == 16 and g["accesses"] == s["accesses"]


# ---- guards ----------------------------------------------------------------------------------

def _scenario(tmp_path, gpu: str) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(GOOD.replace("{capacity_gb: 6, policy: lru}", gpu))
    return p


def test_per_layer_capacity_above_the_layer_is_an_error(tmp_path):
    r = CliRunner().invoke(main, ["run", str(_scenario(tmp_path, "{capacity_experts: 128, partition: per_layer}")),
                                  "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.strip().splitlines() == [
        f"error: {tmp_path / 's.yaml'}: cache.gpu.capacity_experts: with partition: per_layer the capacity is "
        "per layer: 128 experts per layer, but a layer has only 64 (for 128 experts in all, use 8 per layer, "
        "or partition: global)"]


def test_allocation_needs_per_layer(tmp_path):
    r = CliRunner().invoke(main, ["run", str(_scenario(tmp_path, "{capacity_experts: 64, allocation: optimal}")),
                                  "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "cache.gpu" in r.output and "needs partition: per_layer" in r.output


def test_admission_on_belady_is_an_error(tmp_path):
    r = CliRunner().invoke(main, ["run", str(_scenario(tmp_path, "{capacity_experts: 64, policy: belady, "
                                                                 "admission: second_touch}")), "-o", str(tmp_path)])
    assert r.exit_code == 2 and "cache.gpu.admission" in r.output


def test_thrash_warnings_say_by_how_much():
    # Mixtral-8x7B: 32 layers x top-2 = 64 accesses per token; DeepSeek-V2-Lite: 26 x top-6 = 156
    assert thrash_warnings("gpu", 51, "global", 2, 32) == [
        "cache.gpu: a shared cache of 51 experts is smaller than one token's 64 expert accesses (top_k 2 x 32 "
        "layers), 13 short (80% of them): a recency policy evicts each expert before its next use and will "
        "miss on nearly every access; give it >= 64 or use partition: per_layer"]
    assert "156 expert accesses" in thrash_warnings("gpu", 32, "global", 6, 26)[0]
    assert thrash_warnings("gpu", 64, "global", 2, 32) == [] and thrash_warnings("dram", None, "global", 2, 32) == []
    assert thrash_warnings("gpu", (2, 1, 3), "per_layer", 2, 3) == [
        "cache.gpu: 1 layer(s) hold fewer than top_k=2 experts (layers [1]): every token of them misses"]
    assert thrash_warnings("gpu", 2, "per_layer", 2, 3) == []


def test_thrash_warning_reaches_the_terminal_and_the_summary(tmp_path):
    r = CliRunner().invoke(main, ["run", str(_scenario(tmp_path, "{capacity_experts: 51}")),
                                                  "-o", str(tmp_path / "o"), "--no-report", "--quiet"])
    assert r.exit_code == 0
    assert r.stderr.startswith("warning: cache.gpu: a shared cache of 51 experts is smaller than one token's 128")
    import json

    assert json.loads((tmp_path / "o" / "summary.json").read_text())["warnings"][0] in r.stderr


def test_sweep_report_plots_the_gap_by_policy():
    import pandas as pd

    from moesim.report.sweep import fig_gap_by_policy

    df = pd.DataFrame({"cache.gpu.policy": ["lru", "arc", "lru", "arc"], "model": ["a", "a", "b", "b"],
                       "gap_captured": [0.0, 0.25, 0.0, 0.5]})
    fig = fig_gap_by_policy(df, ["model"])
    assert [t.name for t in fig.data] == ["a", "b"]
    assert [list(t.x) for t in fig.data] == [["lru", "arc"]] * 2
    assert [list(t.y) for t in fig.data] == [[0.0, 0.25], [0.0, 0.5]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 9), max_size=120), st.integers(1, 8), st.sampled_from(["lru", "s3fifo", "arc", "lfu"]))
def test_replay_steps_with_one_key_per_step_is_replay(stream, cap, policy):
    assert replay_steps([[x] for x in stream], cap, policy) == replay(stream, cap, policy)


def test_replay_steps_pins_the_step_and_bypasses_when_it_is_full():
    # a step of 3 distinct keys into 2 slots: the third cannot evict the step's own keys
    assert replay_steps([[0, 1, 2]], 2, "lru").misses == 3
    assert replay_steps([[0, 1, 2], [2]], 2, "lru").misses == 4     # 2 was not cached (bypass)
    assert replay([0, 1, 2, 2], 2, "lru").misses == 3                # unpinned, 2 evicts 0 and stays
    # a step's hits are pinned too: with 1 and 0 hit, 2 cannot evict either, so 1 is still there
    assert replay_steps([[0, 1], [1, 0, 2], [1]], 2, "lru").misses == 3
    assert replay([0, 1, 1, 0, 2, 1], 2, "lru").misses == 4


def test_replay_steps_serves_a_steps_hits_before_its_misses():
    # 1 is the least recent but hit in the second step; served first, it is pinned before 2
    # needs a slot, so 2 evicts 0 (in request order 2 would evict 1, then 1 would miss)
    assert replay_steps([[1, 0], [2, 1], [1]], 2, "lru").misses == 3
    assert replay([1, 0, 2, 1, 1], 2, "lru").misses == 4
    assert replay_steps([[0], [0, 1, 1]], 2, "lru") == replay([0, 0, 1, 1], 2, "lru")  # repeats hit
