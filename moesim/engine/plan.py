"""Step plans: what each forward step computes, and the static-batch plan of a request stream.

A `StepPlan` is one forward step: the sequences taking part, the trace tokens they process (their
routing rows), and per MoE layer the deduplicated cache keys with `tokens_e` per key (or, with
dedup off, one key per token×expert pair). The engine gets its steps from the scheduler
(engine/scheduler.py), which forms them at simulated time. `static_plan` below is the static,
closed-arrival schedule written out directly: a static batch of `size` requests runs one prefill
step (all prompt tokens of the batch at once) and then decode steps (one token per still-running
request) until every request is done. The scheduler reproduces it exactly (tests/test_batch_*).
"""
from __future__ import annotations

import functools
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class StepPlan:
    index: int
    phase: str                       # "prefill" | "decode"
    batch: int                       # static batch number
    request_ids: np.ndarray          # requests taking part
    tokens: int                      # tokens processed in this step
    context_tokens: int              # KV positions read by attention, summed over sequences
    routing: np.ndarray              # [tokens, layers, top_k] expert ids
    keys: list[np.ndarray] = field(default_factory=list)    # per layer: cache keys needed (layer*E+e)
    counts: list[np.ndarray] = field(default_factory=list)  # per layer: tokens per needed key
    pairs: int = 0                   # token×expert pairs (accesses without dedup)
    first_token_requests: np.ndarray | None = None  # requests whose first output token this step makes
    finished_requests: np.ndarray | None = None     # requests whose last token this step makes
    output_tokens: int = 0
    token_requests: np.ndarray | None = None        # request id of each routing row
    pre_attn: np.ndarray | None = None              # [tokens, layers, d], when a predictor needs it
    scores: np.ndarray | None = None                # [tokens, layers, width] gate scores (low-bit stand-ins)
    prefill_tokens: int = -1                        # prompt tokens among `tokens` (-1: all if prefill)
    admitted: np.ndarray | None = None              # requests whose first step this is
    admitted_arrivals: np.ndarray | None = None     # their arrival times (NaN: closed, = step start)
    flat: tuple | None = None                       # (keys, counts) concatenated in layer order, and each
                                                    # layer's start in them (+ the end): None if not kept

    def __post_init__(self):
        if self.prefill_tokens < 0:
            self.prefill_tokens = self.tokens if self.phase == "prefill" else 0


_BINCOUNT_KEYS = 1 << 16  # layers × experts up to which a count table beats np.unique's sort


def _counts(keys: np.ndarray, n_keys: int, table: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(keys, return_counts=True), exactly: from a count table over the `n_keys` possible
    keys when it is small (a decode step has few keys, and the sort was most of step planning)."""
    if not table or n_keys > _BINCOUNT_KEYS:
        return np.unique(keys, return_counts=True)
    c = np.bincount(keys.ravel(), minlength=n_keys)
    u = np.flatnonzero(c)
    return u, c[u]


def _dedup(routing: np.ndarray, num_experts: int, dedup: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per layer: sorted unique cache keys and their token counts (or one key per pair)."""
    return _dedup_flat(routing, num_experts, dedup)[:2]


def _dedup_flat(routing: np.ndarray, num_experts: int, dedup: bool):
    """`_dedup`'s per-layer keys and counts, and (the same keys and counts as two flat arrays in
    layer order, each layer's start in them and the end): what the fast path walks."""
    t, layers, k = routing.shape
    offs = _offsets(layers, num_experts)
    if dedup and t == 1:  # one token (a decode step of one sequence): its top-k sorted, if distinct
        s = np.sort(routing[0], axis=1).astype(np.int64) + offs
        if not (s[:, 1:] == s[:, :-1]).any():
            return _split(s.ravel(), *_ones(layers, k))
    keys = (routing.astype(np.int64) + offs[None]).transpose(1, 0, 2).reshape(layers, t * k)
    if not dedup:
        ones = np.ones(t * k, dtype=np.int64)
        flat = (keys.ravel(), np.ones(layers * t * k, dtype=np.int64), [i * t * k for i in range(layers + 1)])
        return list(keys), [ones] * layers, flat
    # Keys of layer l lie in [l*E, (l+1)*E): one global count, then split at layer boundaries.
    u, c = _counts(keys, layers * num_experts)
    return _split(u, c, [0, *np.searchsorted(u, offs[1:, 0]).tolist(), len(u)])


def flat_keys(plan: StepPlan) -> tuple:
    """A step's (keys, counts, each layer's start in them and the end), as the fast paths walk them:
    the plan's own `flat`, or made from its per-layer keys (a plan not from the scheduler)."""
    if plan.flat is not None:
        return plan.flat
    return (np.concatenate(plan.keys), np.concatenate(plan.counts),
            [0, *np.cumsum([len(k) for k in plan.keys]).tolist()])


_BLOCK = 64  # decode tokens whose sorted keys one_token_keys prepares at a time


def one_token_keys(experts: np.ndarray, d: int, num_experts: int, block: tuple | None) -> tuple:
    """`_dedup_flat` (dedup on) of the one-token routing experts[d:d + 1], from `block`: the sorted
    keys of a run of tokens prepared at once (one sort per _BLOCK tokens instead of one per step),
    made anew when `d` is outside it. Returns (the triple, or None when token d repeats an expert
    in a layer: the general path then; the block to keep)."""
    if block is None or not block[0] <= d < block[0] + len(block[1]):
        r = experts[d:d + _BLOCK]
        t, layers, k = r.shape
        s = np.sort(r, axis=2).astype(np.int64) + _offsets(layers, num_experts)[None]
        s.flags.writeable = False  # (steps' keys are views of it)
        block = (d, s, ~(s[:, :, 1:] == s[:, :, :-1]).any(axis=(1, 2)))
    start, s, ok = block
    if not ok[d - start]:
        return None, block
    return _split(s[d - start].ravel(), *_ones(*s.shape[1:])), block


def _split(u: np.ndarray, c: np.ndarray, b: list[int]):
    """Per-layer views of flat keys `u` and counts `c` at layer starts `b`, and the flat triple."""
    return _Layers(u, b), _Layers(c, b), (u, c, b)


class _Layers(Sequence):
    """Per-layer views of a flat array at layer starts `b` (and the end), each made when asked for:
    the fast path walks the flat array and never asks."""

    __slots__ = ("_a", "_b")

    def __init__(self, a: np.ndarray, b: list[int]):
        self._a, self._b = a, b

    def __len__(self) -> int:
        return len(self._b) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self._b) - 1
        if not -n <= i < n:
            raise IndexError("layer index out of range")
        i %= n
        return self._a[self._b[i]:self._b[i + 1]]


@functools.cache
def _ones(layers: int, k: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """A one-token step's counts (all 1, read-only: shared by every such step) and layer starts."""
    ones = np.ones(layers * k, dtype=np.int64)
    ones.flags.writeable = False
    return ones, tuple(i * k for i in range(layers + 1))


@functools.cache
def _offsets(layers: int, num_experts: int) -> np.ndarray:
    """[layers, 1] int64: each layer's first cache key (read-only: shared by every step)."""
    offs = (np.arange(layers, dtype=np.int64) * num_experts)[:, None]
    offs.flags.writeable = False
    return offs


def batch_steps(requests: list, batch_no: int, first_index: int, num_experts: int,
                dedup: bool) -> Iterator[StepPlan]:
    """The steps of one static batch. `requests` are RequestTrace objects."""
    ids = np.array([r.request_id for r in requests], dtype=np.int64)
    prompts = np.array([r.prompt_len for r in requests], dtype=np.int64)
    decodes = np.array([r.decode_len for r in requests], dtype=np.int64)
    routing = np.concatenate([r.experts[: r.prompt_len] for r in requests], axis=0)
    keys, counts = _dedup(routing, num_experts, dedup)
    done = ids[decodes == 0]
    yield StepPlan(first_index, "prefill", batch_no, ids, int(prompts.sum()), int(prompts.sum()), routing,
                   keys, counts, routing.shape[0] * routing.shape[2], ids, done, len(ids), np.repeat(ids, prompts),
                   admitted=ids, admitted_arrivals=np.full(len(ids), np.nan))
    index = first_index + 1
    for j in range(1, int(decodes.max(initial=0)) + 1):
        active = np.flatnonzero(decodes >= j)
        routing = np.stack([requests[i].experts[requests[i].prompt_len + j - 1] for i in active])
        keys, counts = _dedup(routing, num_experts, dedup)
        ctx = int((prompts[active] + j).sum())
        finished = ids[active[decodes[active] == j]]
        yield StepPlan(index, "decode", batch_no, ids[active], len(active), ctx, routing, keys, counts,
                       routing.shape[0] * routing.shape[2], None, finished, len(active), ids[active])
        index += 1


def static_plan(requests: Iterable, size: int, num_experts: int, dedup: bool = True) -> Iterator[StepPlan]:
    """Group a request stream into static batches of `size` and yield every step in order."""
    index, batch_no, pending = 0, 0, []
    for r in requests:
        pending.append(r)
        if len(pending) == size:
            for st in batch_steps(pending, batch_no, index, num_experts, dedup):
                index = st.index + 1
                yield st
            batch_no, pending = batch_no + 1, []
    if pending:
        for st in batch_steps(pending, batch_no, index, num_experts, dedup):
            yield st


class Lookahead:
    """An iterator of steps that can peek `depth` steps ahead (for oracles)."""

    def __init__(self, steps: Iterator[StepPlan], depth: int):
        self._it, self._buf, self.depth = steps, deque(), depth

    def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            nxt = next(self._it, None)
            if nxt is None:
                return
            self._buf.append(nxt)

    def __iter__(self):
        return self

    def __next__(self) -> StepPlan:
        self._fill(1)
        if not self._buf:
            raise StopIteration
        return self._buf.popleft()

    def peek(self, i: int) -> StepPlan | None:
        """The i-th step after the current one (0 = next)."""
        self._fill(i + 1)
        return self._buf[i] if i < len(self._buf) else None
