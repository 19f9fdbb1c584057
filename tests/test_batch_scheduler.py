"""The batch scheduler on its own (no SimPy): token conservation, limits, the static schedule it
must reproduce exactly, look-ahead, arrivals, admission order."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.engine.plan import StepPlan, static_plan
from moesim.engine.scheduler import ArrivalSource, Scheduler
from moesim.traces.io import RequestTrace

L = 3


def make_requests(rng, n, E=8, K=2, prompt=(1, 6), decode=(0, 6)):
    out = []
    for rid in range(n):
        p, d = int(rng.integers(*prompt, endpoint=True)), int(rng.integers(*decode, endpoint=True))
        ex = np.stack([rng.permutation(E)[:K] for _ in range((p + d) * L)]).reshape(p + d, L, K)
        out.append(RequestTrace(rid, p, d, L, ex.astype(np.int16)))
    return out


def make_sched(reqs, *, kind="static", size=2, arrivals="closed", rate=None, seed=0, E=8, arrival_s=None,
               **kw):
    src = ArrivalSource(iter(reqs), arrivals, rate, np.random.default_rng(seed) if rate else None, arrival_s)
    return Scheduler(src, kind=kind, size=size, num_experts=E, num_layers=L, **kw)


def drive(sched, step_s=lambda p: 1e-3 + 1e-4 * p.tokens, peek=0):
    """Run the scheduler with a made-up step duration; returns [(start time, plan)]."""
    now, out = 0.0, []
    while True:
        for i in range(peek):
            sched.peek(i, now)
        r = sched.next_step(now)
        if r is None:
            return out
        if not isinstance(r, StepPlan):
            assert r > now
            now = r
            continue
        out.append((now, r))
        now += step_s(r)


def check_conservation(reqs, plans):
    """Every request takes part until done, processes exactly its trace's tokens in order, makes
    its first token once (when its prompt completes) and finishes exactly once."""
    by_id = {r.request_id: r for r in reqs}
    rows = {rid: [] for rid in by_id}
    first, finished = [], []
    out_tokens = 0
    for _, p in plans:
        assert p.routing.shape[0] == p.tokens == len(p.token_requests)
        for rid in np.unique(p.token_requests).tolist():
            rows[rid].append(p.routing[p.token_requests == rid])
        if p.first_token_requests is not None:
            first += p.first_token_requests.tolist()
        finished += p.finished_requests.tolist()
        out_tokens += p.output_tokens
    for rid, r in by_id.items():
        got = np.concatenate(rows[rid]) if rows[rid] else np.zeros((0, L, r.experts.shape[2]))
        assert np.array_equal(got, r.experts), f"request {rid}: tokens differ from its trace"
    assert sorted(first) == sorted(by_id) and sorted(finished) == sorted(by_id)
    assert out_tokens == sum(r.decode_len + 1 for r in reqs)
    assert [p.index for _, p in plans] == list(range(len(plans)))


def plan_fields(p: StepPlan):
    return (p.index, p.phase, p.batch, p.request_ids.tolist(), p.tokens, p.context_tokens, p.routing.tobytes(),
            [k.tolist() for k in p.keys], [c.tolist() for c in p.counts], p.pairs,
            None if p.first_token_requests is None else p.first_token_requests.tolist(),
            p.finished_requests.tolist(), p.output_tokens, p.token_requests.tolist())


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 9), st.integers(1, 4), st.booleans())
def test_static_closed_reproduces_the_static_plan(seed, n, size, dedup):
    """The engine's static schedule before the scheduler existed, step for step."""
    reqs = make_requests(np.random.default_rng(seed), n)
    want = [plan_fields(p) for p in static_plan(iter(reqs), size, 8, dedup)]
    sched = make_sched(reqs, size=size, dedup=dedup)
    got = [plan_fields(p) for _, p in drive(sched)]
    # the reference gives decode steps no first-token list and prefill steps all of theirs
    got = [g[:10] + ((g[10] or None),) + g[11:] for g in got]
    want = [w[:10] + ((w[10] or None),) + w[11:] for w in want]
    assert got == want


CONFIGS = st.fixed_dictionaries({
    "kind": st.sampled_from(["static", "continuous"]),
    "size": st.integers(1, 5),
    "arrivals": st.sampled_from(["closed", "poisson"]),
    "budget": st.sampled_from([None, 5, 8]),
    "chunked": st.booleans(),
    "admission": st.sampled_from(["fcfs", "expert_affinity"]),
    "window": st.integers(1, 4),
    "wait_ms": st.sampled_from([0.0, 3.0]),
    "peek": st.integers(0, 2),
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**16), st.integers(1, 10), CONFIGS)
def test_every_request_completes_once_with_its_tokens_and_limits_hold(seed, n, c):
    reqs = make_requests(np.random.default_rng(seed), n)
    budget = None if c["budget"] is None else max(c["budget"], c["size"])
    sched = make_sched(reqs, kind=c["kind"], size=c["size"], arrivals=c["arrivals"],
                       rate=500.0 if c["arrivals"] == "poisson" else None, seed=seed, max_tokens_per_step=budget,
                       chunked_prefill=c["chunked"] and budget is not None, admission=c["admission"],
                       affinity_window=c["window"], max_wait_s=c["wait_ms"] * 1e-3)
    plans = drive(sched, peek=c["peek"])
    check_conservation(reqs, plans)
    seen: dict[int, float] = {}
    for t, p in plans:
        assert len(p.request_ids) <= c["size"]
        assert len(set(p.request_ids.tolist())) == len(p.request_ids)
        if c["kind"] == "continuous" and budget is not None and c["chunked"]:
            assert p.tokens <= budget
        if c["kind"] == "continuous" and budget is not None and not c["chunked"] and p.tokens > budget:
            assert len(p.request_ids) == 1  # only a prompt larger than the whole budget runs alone
        if p.admitted is not None:
            for rid, a in zip(p.admitted.tolist(), p.admitted_arrivals.tolist()):
                assert rid not in seen
                seen[rid] = t
                assert math.isnan(a) if c["arrivals"] == "closed" else a <= t + 1e-12
        # per layer: unique keys <= min(requested pairs, experts)
        for k in p.keys:
            assert len(k) <= min(p.pairs, 8)
    assert sorted(seen) == sorted(r.request_id for r in reqs)


def test_static_batch_runs_to_completion_and_continuous_refills_slots():
    rng = np.random.default_rng(3)
    reqs = [RequestTrace(i, 2, d, L, rng.integers(0, 8, size=(2 + d, L, 1)).astype(np.int16))
            for i, d in enumerate([1, 6, 1, 1])]
    static = drive(make_sched(reqs, size=2, E=8))
    # batch 0 = requests 0, 1: request 2 waits until request 1's 6 decode steps are done
    admitted = {int(r): p.index for _, p in static if p.admitted is not None for r in p.admitted}
    assert admitted[2] == 7
    cont = drive(make_sched(reqs, kind="continuous", size=2, E=8))
    admitted = {int(r): p.index for _, p in cont if p.admitted is not None for r in p.admitted}
    assert admitted[2] == 2  # joins as soon as request 0 has left
    mixed = [p for _, p in cont if p.phase == "prefill" and p.prefill_tokens < p.tokens]
    assert mixed  # prefill and decode tokens share a step


def test_chunked_prefill_splits_a_long_prompt():
    rng = np.random.default_rng(0)
    long = RequestTrace(0, 20, 2, L, rng.integers(0, 8, size=(22, L, 1)).astype(np.int16))
    short = RequestTrace(1, 2, 8, L, rng.integers(0, 8, size=(10, L, 1)).astype(np.int16))
    plans = drive(make_sched([short, long], kind="continuous", size=2, max_tokens_per_step=6,
                             chunked_prefill=True))
    check_conservation([short, long], plans)
    assert all(p.tokens <= 6 for _, p in plans)
    with_long = [p for _, p in plans if 0 in p.token_requests.tolist() and p.prefill_tokens]
    assert len(with_long) >= 4  # 20 prompt tokens in chunks of at most 6 - 1 (the short one decodes)
    # without chunking the long prompt runs whole, alone, once the short request has finished
    plans = drive(make_sched([short, long], kind="continuous", size=2, max_tokens_per_step=6))
    check_conservation([short, long], plans)
    big = [p for _, p in plans if p.tokens > 6]
    assert len(big) == 1 and big[0].request_ids.tolist() == [0]


def test_context_tokens_sum_done_plus_new_over_sequences():
    rng = np.random.default_rng(1)
    reqs = [RequestTrace(i, 3, 4, L, rng.integers(0, 8, size=(7, L, 1)).astype(np.int16)) for i in range(3)]
    done = {i: 0 for i in range(3)}
    for _, p in drive(make_sched(reqs, kind="continuous", size=2, max_tokens_per_step=4, chunked_prefill=True)):
        ctx = 0
        for rid in p.request_ids.tolist():
            n = int((p.token_requests == rid).sum())
            done[rid] += n
            ctx += done[rid]
        assert p.context_tokens == ctx


def test_closed_lookahead_is_exact_and_open_lookahead_is_revised_on_arrival():
    rng = np.random.default_rng(2)
    reqs = make_requests(rng, 6)
    s = make_sched(reqs, kind="continuous", size=2)
    ahead = [s.peek(i, 0.0) for i in range(5)]
    got = [s.next_step(0.0) for _ in range(5)]
    assert all(a is g for a, g in zip(ahead, got))
    # open loop: request 1 arrives after the peek, before the next step starts
    reqs = make_requests(rng, 2, prompt=(2, 2), decode=(3, 3))
    s = make_sched(reqs, kind="continuous", size=2, arrivals="trace", arrival_s={0: 0.0, 1: 0.5})
    first = s.next_step(0.0)
    assert first.request_ids.tolist() == [0]
    peeked = s.peek(0, 0.1)
    assert peeked.request_ids.tolist() == [0]
    nxt = s.next_step(0.6)
    assert nxt.request_ids.tolist() == [0, 1] and nxt.index == peeked.index == 1


def test_idle_until_next_arrival_and_static_max_wait():
    rng = np.random.default_rng(4)
    reqs = make_requests(rng, 3, prompt=(2, 2), decode=(1, 1))
    s = make_sched(reqs, size=2, arrivals="trace", arrival_s={0: 1.0, 1: 1.002, 2: 5.0})
    assert s.next_step(0.0) == 1.0          # nothing yet: idle until the first arrival
    p = s.next_step(1.0)
    assert p.request_ids.tolist() == [0]    # max_wait 0: go with what is there
    s = make_sched(reqs, size=2, arrivals="trace", arrival_s={0: 1.0, 1: 1.002, 2: 5.0}, max_wait_s=0.01)
    assert s.next_step(0.0) == 1.0
    assert s.next_step(1.0) == 1.002        # wait for a fuller batch: here comes request 1
    assert s.next_step(1.002).request_ids.tolist() == [0, 1]


def test_poisson_arrivals_are_seeded_and_have_the_rate():
    reqs = make_requests(np.random.default_rng(0), 2000, prompt=(1, 1), decode=(0, 0))
    times = []
    for seed in (7, 7, 8):
        src = ArrivalSource(iter(reqs), "poisson", 50.0, np.random.default_rng(seed))
        t = []
        while src.next_time() is not None:
            t.append(src.pop().arrival)
        times.append(np.array(t))
    assert np.array_equal(times[0], times[1]) and not np.array_equal(times[0], times[2])
    gaps = np.diff(np.concatenate([[0.0], times[0]]))
    assert gaps.mean() == pytest.approx(1 / 50, rel=4 / np.sqrt(len(gaps)))
    assert np.all(gaps > 0)


def test_expert_affinity_prefers_overlapping_requests_and_does_not_starve():
    E = 8

    def req(rid, experts, d=4):
        ex = np.full((2 + d, L, 1), experts, dtype=np.int16)
        return RequestTrace(rid, 2, d, L, ex)
    # request 0 runs on expert 0; waiting: 1 (expert 5), 2 (expert 5), 3 (expert 0)
    reqs = [req(0, 0, d=8), req(1, 5), req(2, 5), req(3, 0)]
    plans = drive(make_sched(reqs, kind="continuous", size=2, E=E, admission="expert_affinity",
                             affinity_window=4))
    order = [int(r) for _, p in plans if p.admitted is not None for r in p.admitted]
    assert order[:2] == [0, 3]
    fcfs = drive(make_sched(reqs, kind="continuous", size=2, E=E))
    assert [int(r) for _, p in fcfs if p.admitted is not None for r in p.admitted] == [0, 1, 2, 3]
    # static: batches grouped around the oldest waiting request
    plans = drive(make_sched(reqs, size=2, E=E, admission="expert_affinity", affinity_window=4))
    batches = [sorted(p.request_ids.tolist()) for _, p in plans if p.phase == "prefill"]
    assert batches == [[0, 3], [1, 2]]
    # a request passed over `affinity_window` times goes next
    many = [req(0, 0, d=30)] + [req(1, 5)] + [req(i, 0, d=1) for i in range(2, 12)]
    plans = drive(make_sched(many, kind="continuous", size=2, E=E, admission="expert_affinity",
                             affinity_window=3))
    order = [int(r) for _, p in plans if p.admitted is not None for r in p.admitted]
    assert order[:5] == [0, 2, 3, 4, 1]  # passed over 3 times, then admitted


def _same_plan(a: StepPlan, b: StepPlan) -> None:
    for f in StepPlan.__dataclass_fields__:
        x, y = getattr(a, f), getattr(b, f)
        if f in ("keys", "counts"):
            assert [k.tolist() for k in x] == [k.tolist() for k in y], f
        elif f == "flat":
            assert (x is None) == (y is None), f
            if x is not None:
                assert x[0].tolist() == y[0].tolist() and x[1].tolist() == y[1].tolist() and list(x[2]) == list(y[2])
        elif isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            assert x is not None and y is not None and x.dtype == y.dtype and np.array_equal(x, y), f
        else:
            assert x == y, f


@pytest.mark.parametrize("size", [1, 2, 5])
@pytest.mark.parametrize("dedup", [True, False])
def test_the_decode_step_shortcut_builds_what_build_does(size, dedup):
    """A static batch's decode steps (Scheduler._decode_step) are the plans and states the general
    `_build` makes of the same sequences, request after request (repeated experts included)."""
    rng = np.random.default_rng(size)
    reqs = make_requests(rng, 9, decode=(1, 7))
    reqs[0].experts[:, 0, :] = 3  # (a token that repeats an expert in a layer: no one-token keys)
    shortcut = make_sched(reqs, size=size, dedup=dedup)
    decoded = 0
    while True:
        st, index = shortcut.state, shortcut.index
        if st.running:
            general = shortcut._build(index, st, [(s, d, 1) for s, d in zip(st.running, st.done)], [], st.batch_no)
            for s in st.running:
                s.keys = None  # (each makes its one-token key block anew)
            fast = shortcut._decode_step(index, st)
            _same_plan(fast[0], general[0])
            assert fast[1] == general[1] and fast[2] == general[2] == []
            decoded += 1
        if shortcut.next_step(0.0) is None:
            break
    assert decoded > 5
