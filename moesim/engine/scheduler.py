"""The batch scheduler: which requests take part in each step, decided at simulated time `now`.

The driver (engine.sim) asks `Scheduler.next_step(now)` for the step to run next and gets

* a `StepPlan` to run at once,
* a float `t > now`: nothing is runnable; idle (advance time) until `t` (the next arrival, or the
  end of a static batch's `max_wait_ms`) and ask again,
* `None`: every request has finished.

**Arrivals** (`ArrivalSource`). `closed`: fixed concurrency; a request arrives when the scheduler
can take it (its arrival is its admission: queueing delay 0, TTFT from the start of its first
step; this is what the engine always did). `poisson`: open loop, exponential gaps at `rate_per_s`
drawn from a seeded `numpy.random.Generator`. `trace`: the trace's `arrival_s` (seconds, one
value per request, non-decreasing in file order). Open-loop requests wait in a FIFO queue until
admitted; requests are read from the trace lazily, so a long trace still streams.

**Schedulers.** `static`: at a batch boundary take up to `size` waiting requests (with open
arrivals optionally waiting `max_wait_ms` for a full batch), run one prefill step with every
prompt, then decode steps until the last request is done; nobody joins a running batch.
`continuous` (iteration-level, Orca/vLLM style): every step, each running sequence in the
decode phase gets one token, unfinished prompts (chunked prefill) get what is left of
`max_tokens_per_step`, then waiting requests are admitted while there is room (`max_batch_size`
sequences) and budget. Without chunked prefill a prompt must fit the step's remaining budget
whole (FCFS: the queue waits behind it); a prompt larger than the whole budget runs in a step of
its own. Prefill and decode tokens share steps. Finished sequences leave at the end of their
last step, so their slots are free for the next step.

**Steps.** A step is a list of chunks `(sequence, new tokens)`: its routing rows are the chunks'
trace tokens in order, its attention reads `new tokens` and `context = tokens done + new` summed
over sequences. A sequence's first output token is made by the step that finishes its prompt;
each later step makes one more; it finishes with its last trace token. A step with any prompt
tokens has phase `prefill` (predictors treat its rows as prompt rows; `token_request_ids` gives
each row's request exactly), else `decode`.

**Looking ahead (oracles).** `peek(i, now)` forms the i-th step after the current one as the
scheduler would form it from the requests arrived by `now`, without committing it. The current
step's remaining layers are always exact; later steps are exact unless a request arrives before
they start (then the scheduler forms them afresh, and prefetches aimed at the peeked step are
mispredictions). With closed arrivals the step sequence does not depend on time, so the
look-ahead is exact (as before the scheduler existed).

**expert_affinity admission** (an experiment). A waiting request's signature is the expert
histogram of its prompt's routing (known to a real system only if, e.g., an earlier turn of the
conversation or a router-only pre-pass has run: an optimistic bound). The running batch's is the
histogram of its sequences' most recent tokens. Among the oldest `affinity_window` waiting
requests the one with the largest overlap (dot product) goes first; a request passed over
`affinity_window` times goes next regardless. Static batches are grouped around the oldest
waiting request the same way.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .plan import StepPlan, _dedup_flat, one_token_keys


class Seq:
    """One request inside the scheduler."""

    __slots__ = ("arrival", "keys", "order", "prompt", "req", "rid", "sig", "skipped", "total")

    def __init__(self, req, arrival: float, order: int):
        self.req, self.rid = req, int(req.request_id)
        self.prompt, self.total = int(req.prompt_len), int(req.prompt_len + req.decode_len)
        self.arrival = arrival    # NaN: closed arrivals (arrives when admitted)
        self.order = order        # arrival order
        self.sig: np.ndarray | None = None
        self.skipped = 0
        self.keys: tuple | None = None  # its next decode tokens' sorted keys (plan.one_token_keys)


class ArrivalSource:
    """The trace's requests in file order, each with its arrival time; read lazily."""

    def __init__(self, requests: Iterable, mode: str = "closed", rate_per_s: float | None = None,
                 rng: np.random.Generator | None = None, arrival_s: dict[int, float] | None = None,
                 file: str | None = None):
        if mode not in ("closed", "poisson", "trace"):
            raise ValueError(f"unknown arrivals {mode!r}")
        if mode == "poisson" and (rate_per_s is None or rng is None):
            raise ValueError("poisson arrivals need rate_per_s and rng")
        if mode == "trace" and arrival_s is None:
            raise ValueError("trace arrivals need arrival_s")
        self.mode, self.rate, self.rng, self.arrival_s, self.file = mode, rate_per_s, rng, arrival_s, file
        self.open = mode != "closed"
        self._it: Iterator = iter(requests)
        self._next: Seq | None = None
        self._t = 0.0
        self._n = 0
        self._done = False
        self._pull()

    def _pull(self) -> None:
        r = next(self._it, None)
        if r is None:
            self._next, self._done = None, True
            return
        if self.mode == "closed":
            t = math.nan
        elif self.mode == "poisson":
            self._t += float(self.rng.exponential(1.0 / self.rate))
            t = self._t
        else:
            t = self.arrival_s.get(int(r.request_id))
            if t is None:
                raise InputError(f"request {r.request_id} has no arrival_s", file=self.file, field="arrival_s")
            if t < self._t:
                raise InputError(f"request {r.request_id} arrives at {t:g} s, before the request before it "
                                 f"({self._t:g} s): arrival_s must not decrease in file (request) order",
                                 file=self.file, field="arrival_s")
            self._t = t
        self._next = Seq(r, t, self._n)
        self._n += 1

    def next_time(self) -> float | None:
        """Arrival time of the next request not yet taken (-inf if closed), None if none is left."""
        if self._next is None:
            return None
        return -math.inf if not self.open else self._next.arrival

    def pop(self) -> Seq:
        s = self._next
        self._pull()
        return s


@dataclass(frozen=True)
class _State:
    """What the scheduler carries from step to step (copied, never mutated: peeks branch off it)."""

    running: tuple = ()        # Seq, in admission order
    done: tuple = ()           # tokens already processed, per running Seq
    batch_no: int = -1         # static batch number
    excluded: frozenset = frozenset()  # Seqs admitted by peeked, not yet committed steps


class Scheduler:
    """Forms steps from arrived requests; see the module docstring."""

    def __init__(self, source: ArrivalSource, *, kind: str = "static", size: int = 1,
                 max_tokens_per_step: int | None = None, chunked_prefill: bool = False,
                 admission: str = "fcfs", affinity_window: int = 16, max_wait_s: float = 0.0,
                 num_experts: int, num_layers: int, dedup: bool = True):
        if kind not in ("static", "continuous"):
            raise ValueError(f"unknown scheduler {kind!r}")
        self.source, self.kind, self.size = source, kind, size
        self.budget = max_tokens_per_step if (kind == "continuous" and max_tokens_per_step) else None
        self.chunked = bool(chunked_prefill and self.budget is not None)
        self.affinity = admission == "expert_affinity"
        self.window = affinity_window
        self.max_wait = max_wait_s
        self.E, self.L, self.dedup = num_experts, num_layers, dedup
        self.queue: deque[Seq] = deque()   # arrived, waiting, in arrival order
        self.state = _State()
        self.index = 0                     # index of the next step
        self._buf: list[tuple] = []        # peeked steps: (plan, state after, admitted Seqs)
        self._epoch = self._buf_epoch = 0  # bumped when open-loop arrivals join the queue
        self._wake = -math.inf             # time the driver was told to idle until
        self._offs = (np.arange(num_layers, dtype=np.int64) * num_experts)[None, :]
        self.max_running = 0
        self.max_queue = 0

    # ---- the driver's interface ------------------------------------------------------------------

    @property
    def timed(self) -> bool:
        """Whether the steps it forms (and `peek`s) depend on the time: open-loop arrivals."""
        return self.source.open

    def next_step(self, now: float):
        """The step to run now (committed), a time to idle until, or None when all is done."""
        now = max(now, self._wake)
        self._intake(now)
        if self._buf and self._buf_epoch == self._epoch:
            plan, st, admitted = self._buf.pop(0)
        else:
            self._buf.clear()
            r = self._form(self.state, now, self.index)
            if not isinstance(r, tuple):
                if r is not None:
                    self._wake = r
                return r
            plan, st, admitted = r
        self._commit(st, admitted)
        self.index = plan.index + 1
        return plan

    def peek(self, i: int, now: float) -> StepPlan | None:
        """The i-th step after the current one (0 = next) as it would be formed now; None if none
        is runnable (all done, or idle until an arrival)."""
        now = max(now, self._wake)
        self._intake(now)
        if self._buf_epoch != self._epoch:
            self._buf.clear()
            self._buf_epoch = self._epoch
        while len(self._buf) <= i:
            st = self._buf[-1][1] if self._buf else self.state
            r = self._form(st, now, self.index + len(self._buf))
            if not isinstance(r, tuple):
                return None
            self._buf.append(r)
        return self._buf[i][0]

    # ---- arrivals and the queue ------------------------------------------------------------------

    def _intake(self, now: float) -> None:
        src = self.source
        if not src.open:
            return
        t = src.next_time()
        n = 0
        while t is not None and t <= now:
            self.queue.append(src.pop())
            n += 1
            t = src.next_time()
        if n:
            self._epoch += 1
            self.max_queue = max(self.max_queue, len(self.queue))

    def _waiting(self, st: _State, n: int) -> list[Seq]:
        """The first `n` waiting requests not admitted by a peeked step (closed: read more)."""
        out = []
        ex = st.excluded
        for s in self.queue:
            if s not in ex:
                out.append(s)
                if len(out) >= n:
                    return out
        src = self.source
        while not src.open and len(out) < n and src.next_time() is not None:
            s = src.pop()
            self.queue.append(s)
            out.append(s)
        return out

    def _commit(self, st: _State, admitted: list[Seq]) -> None:
        if admitted:
            adm = set(admitted)
            last = max(s.order for s in admitted)
            head, found = [], 0
            while found < len(adm):
                s = self.queue.popleft()
                if s in adm:
                    found += 1
                else:
                    head.append(s)
            if self.affinity:
                for s in head:
                    if s.order < last:
                        s.skipped += 1
            self.queue.extendleft(reversed(head))
        if st.excluded:  # everything it excludes was admitted by this step or a committed one
            st = _State(st.running, st.done, st.batch_no)
        self.state = st
        self.max_running = max(self.max_running, len(st.running))

    # ---- forming steps ---------------------------------------------------------------------------

    def _form(self, st: _State, now: float, index: int):
        if self.kind == "static":
            return self._form_static(st, now, index)
        return self._form_continuous(st, now, index)

    def _idle_or_done(self):
        t = self.source.next_time()
        return t if t is not None else None

    def _form_static(self, st: _State, now: float, index: int):
        if st.running:  # inside a batch: every running sequence decodes one token
            if all(d >= s.prompt for s, d in zip(st.running, st.done)):
                return self._decode_step(index, st)
            return self._build(index, st, [(s, d, 1) for s, d in zip(st.running, st.done)], [], st.batch_no)
        cands = self._waiting(st, max(self.size, self.window) if self.affinity else self.size)
        if not cands:
            return self._idle_or_done()
        nxt = self.source.next_time()
        if self.source.open and self.max_wait > 0 and len(cands) < self.size and nxt is not None:
            deadline = cands[0].arrival + self.max_wait
            if now < deadline:
                return min(deadline, nxt)
        pick = self._group(cands, self.size) if self.affinity else cands[:self.size]
        return self._build(index, st, [(s, 0, s.prompt) for s in pick], pick, st.batch_no + 1)

    def _form_continuous(self, st: _State, now: float, index: int):
        left = math.inf if self.budget is None else self.budget
        chunks = []
        n_dec = sum(1 for s, d in zip(st.running, st.done) if d >= s.prompt)
        left -= n_dec
        for s, d in zip(st.running, st.done):
            if d >= s.prompt:
                chunks.append((s, d, 1))
            else:  # a prompt still being prefilled (chunked): what the budget allows
                n = min(s.prompt - d, left)
                if n > 0:
                    chunks.append((s, d, n))
                    left -= n
        free = self.size - len(st.running)
        admitted: list[Seq] = []
        if free > 0:
            cands = self._waiting(st, max(free, self.window) if self.affinity else free)
            vec = self._recent(st) if self.affinity else None
            while free > 0 and cands:
                s = self._choose(cands, vec)
                if self.chunked:
                    if left <= 0:
                        break
                    n = min(s.prompt, left)
                else:
                    if s.prompt > left and chunks:
                        break  # does not fit this step: it (and, FCFS, the queue) waits
                    n = s.prompt
                cands.remove(s)
                chunks.append((s, 0, n))
                admitted.append(s)
                left -= n
                free -= 1
                if self.affinity:  # the admitted request joins the batch's experts
                    vec = self._sig(s) if vec is None else vec + self._sig(s)
        if not chunks:
            return self._idle_or_done()
        return self._build(index, st, chunks, admitted, -1)

    def _decode_step(self, index: int, st: _State):
        """`_build` of a static batch's decode step (each running sequence decodes one token, none
        is admitted): the same plan and state, without its general walks (it runs every step)."""
        seqs, dones = st.running, st.done
        n, req0 = len(seqs), seqs[0].req
        ids = np.array([seqs[0].rid], dtype=np.int64) if n == 1 else np.fromiter(
            (s.rid for s in seqs), dtype=np.int64, count=n)
        routing, flat = self._one_token_each(seqs, dones)
        finished, running, done = [], [], []
        for s, d in zip(seqs, dones):
            if d + 1 >= s.total:
                finished.append(s.rid)
            else:
                running.append(s)
                done.append(d + 1)
        keys, counts, flat = _dedup_flat(routing, self.E, self.dedup) if flat is None else flat
        plan = StepPlan(index, "decode", st.batch_no, ids, n, sum(dones) + n, routing, keys, counts,
                        n * routing.shape[2], None, np.array(finished, dtype=np.int64), n, ids)
        plan.flat = flat
        if req0.pre_attn is not None:
            plan.pre_attn = np.stack([s.req.pre_attn[d] for s, d in zip(seqs, dones)])
        if req0.scores is not None:
            plan.scores = np.concatenate([s.req.scores[d:d + 1] for s, d in zip(seqs, dones)], axis=0)
        return plan, _State(tuple(running), tuple(done), st.batch_no, st.excluded), []

    def _one_token_each(self, seqs, dones) -> tuple[np.ndarray, tuple | None]:
        """The routing of each sequence's next token (its token dones[i]), and one token's flat
        keys when there is one sequence and dedup is on (one_token_keys; None: made from routing)."""
        if len(seqs) == 1:  # (np.stack of one row, without its overhead)
            s, d = seqs[0], dones[0]
            flat = None
            if self.dedup:
                flat, s.keys = one_token_keys(s.req.experts, d, self.E, s.keys)
            return s.req.experts[d:d + 1].copy(), flat
        return np.stack([s.req.experts[d] for s, d in zip(seqs, dones)]), None

    def _build(self, index: int, st: _State, chunks: list, admitted: list[Seq], batch_no: int):
        """The StepPlan of `chunks` [(Seq, done, new tokens)] and the state after it."""
        ids = np.fromiter((s.rid for s, _, _ in chunks), dtype=np.int64, count=len(chunks))
        with_pre = chunks[0][0].req.pre_attn is not None
        pre_attn = None
        with_sc = chunks[0][0].req.scores is not None
        flat = None
        if all(n == 1 and d >= s.prompt for s, d, n in chunks):
            phase, prefill_tokens = "decode", 0
            routing, flat = self._one_token_each([s for s, _, _ in chunks], [d for _, d, _ in chunks])
            if with_pre:
                pre_attn = np.stack([s.req.pre_attn[d] for s, d, _ in chunks])
            token_requests = ids
        else:
            prefill_tokens = sum(min(n, s.prompt - d) for s, d, n in chunks if d < s.prompt)
            phase = "prefill" if prefill_tokens else "decode"
            routing = np.concatenate([s.req.experts[d:d + n] for s, d, n in chunks], axis=0)
            if with_pre:
                pre_attn = np.concatenate([s.req.pre_attn[d:d + n] for s, d, n in chunks], axis=0)
            token_requests = np.repeat(ids, [n for _, _, n in chunks])
        tokens = routing.shape[0]
        ctx = sum(d + n for _, d, n in chunks)
        first, finished, out_tokens = [], [], 0
        after: dict[int, int | None] = {}  # id(Seq) -> tokens done after this step (None: finished)
        for s, d, n in chunks:
            e = d + n
            if d < s.prompt <= e:
                first.append(s.rid)
            if e >= s.prompt:
                out_tokens += 1
            if e >= s.total:
                finished.append(s.rid)
                after[id(s)] = None
            else:
                after[id(s)] = e
        running, done = [], []
        for s, d in zip(st.running, st.done):  # admission order; one given no tokens keeps its place
            e = after.get(id(s), d)
            if e is not None:
                running.append(s)
                done.append(e)
        for s in admitted:
            e = after[id(s)]
            if e is not None:
                running.append(s)
                done.append(e)
        keys, counts, flat = _dedup_flat(routing, self.E, self.dedup) if flat is None else flat
        plan = StepPlan(index, phase, batch_no, ids, tokens, ctx, routing, keys, counts,
                        tokens * routing.shape[2],
                        np.array(first, dtype=np.int64) if first else None,
                        np.array(finished, dtype=np.int64),
                        out_tokens, token_requests)
        plan.prefill_tokens = prefill_tokens
        plan.pre_attn = pre_attn
        plan.flat = flat
        if with_sc:
            plan.scores = np.concatenate([s.req.scores[d:d + n] for s, d, n in chunks], axis=0)
        if admitted:
            plan.admitted = np.array([s.rid for s in admitted], dtype=np.int64)
            plan.admitted_arrivals = np.array([s.arrival for s in admitted], dtype=float)
        new = _State(tuple(running), tuple(done), batch_no if batch_no >= 0 else st.batch_no,
                     st.excluded | frozenset(admitted) if admitted else st.excluded)
        return plan, new, admitted

    # ---- expert affinity -----------------------------------------------------------------------

    def _sig(self, s: Seq) -> np.ndarray:
        if s.sig is None:
            keys = (s.req.experts[:s.prompt].astype(np.int64) + self._offs[:, :, None]).ravel()
            h = np.bincount(keys, minlength=self.L * self.E).astype(np.float64)
            s.sig = h / max(h.sum(), 1.0)
        return s.sig

    def _recent(self, st: _State) -> np.ndarray | None:
        """Expert histogram of the running sequences' most recent tokens (None: nothing running)."""
        rows = [s.req.experts[d - 1] for s, d in zip(st.running, st.done) if d > 0]
        if not rows:
            return None
        keys = (np.stack(rows).astype(np.int64) + self._offs[:, :, None]).ravel()
        return np.bincount(keys, minlength=self.L * self.E).astype(np.float64)

    def _choose(self, cands: list[Seq], vec: np.ndarray | None) -> Seq:
        head = cands[0]
        if vec is None or head.skipped >= self.window:
            return head
        window = cands[:self.window]
        scores = [float(self._sig(s) @ vec) for s in window]
        best = max(range(len(window)), key=lambda i: (scores[i], -i))
        return window[best]

    def _group(self, cands: list[Seq], size: int) -> list[Seq]:
        """A static batch: the oldest waiting request and the `size - 1` that overlap it most."""
        pick, rest = [cands[0]], list(cands[1:self.window])
        vec = self._sig(cands[0]).copy()
        while len(pick) < size and rest:
            s = self._choose(rest, vec)
            rest.remove(s)
            pick.append(s)
            vec += self._sig(s)
        return pick


def collect_keys(sched: Scheduler) -> Iterator[np.ndarray]:
    """Every step's per-layer cache keys in order, with time frozen at 0 (closed arrivals only:
    the step sequence must not depend on time). Used for Belady's next-use positions."""
    if sched.source.open:
        raise ValueError("the step sequence of open-loop arrivals depends on simulated time")
    while True:
        r = sched.next_step(0.0)
        if r is None:
            return
        yield from r.keys


class PlanSource:
    """A fixed sequence of StepPlans behind the scheduler's interface (time plays no part)."""

    def __init__(self, steps: Iterable[StepPlan]):
        from .plan import Lookahead

        self._steps = Lookahead(iter(steps), 0)

    def next_step(self, now: float) -> StepPlan | None:
        return next(self._steps, None)

    def peek(self, i: int, now: float) -> StepPlan | None:
        return self._steps.peek(i)

    timed = False  # (Scheduler.timed)
