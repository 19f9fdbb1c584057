"""The flat prefetch path's state and its moves: the GPU tier's slots and pins, the PCIe link's
queues and copies, the loads, and the predictor's prefetches, in plain dicts, sets and deques
(engine/flat_prefetch.py's driver runs them; LoadChain, PinLedger, Tier and Channel are the
general versions these follow, decision for decision).

Why no heap is needed: every copy is one expert, so each takes the same `d` seconds; copies start
at the current time, which never goes back, so copies in flight end in the order they started,
and those with equal ends were started (and made their heap entries) in that order too. The heap
of FastPrefetch (engine/fast_prefetch.py) is thus the deque `fly` of copies in flight plus the
driver's one wake-up; the counter `seq` numbers both as that heap does, which decides ties at
equal times.
"""
from __future__ import annotations

from collections import OrderedDict, deque

from ..cache.policies import LRU
from .channels import DEMAND, PREFETCH
from .fast_prefetch import _Env
from .loads import LoadChain
from .sim import Simulation, _Memo


class _Load:
    """An expert on its way to the GPU: a demand load from when it is queued, a prefetch from its
    copy's start or its promotion (queued, it is a plain (key, target)); copying: `start`, `end`,
    and `seq`, its place in the heap order."""

    __slots__ = ("key", "prefetch", "prio", "target", "counted", "bypass", "waited",
                 "done_t", "start", "end", "seq")

    def __init__(self, key: int, prefetch: bool, target: tuple[int, int]):
        self.key, self.prefetch, self.target = key, prefetch, target
        self.prio = PREFETCH if prefetch else DEMAND
        self.counted = prefetch  # issued as a prefetch: counts against max_inflight until it lands
        self.bypass = self.waited = False
        self.done_t = self.start = -1.0


class FlatLink:
    """The state and its moves (see the module docstring); FlatPrefetch drives them."""

    def __init__(self, sim: Simulation):
        self.sim, self.rec, self.cost = sim, sim.rec, sim.cost
        self.env = sim.env = _Env()  # (its clock only: no heap here)
        self._ecs = _Memo(sim.cost.expert_compute_s)  # tokens -> one expert kernel's seconds
        self._shared = _Memo(sim.cost.shared_compute_s)
        self.d = sim.cost.pcie_s(sim.eb)  # every copy's seconds (one expert each)
        self.slots = sim.pcie.slots
        self.log = sim.events_log
        # the GPU tier: per partition (one, or one per layer), every key holding a slot in eviction
        # order (READY and IN_FLIGHT) and its capacity; the READY keys; IN_FLIGHT keys are those of
        # loads copying
        gpu = sim.gpu
        self.per_layer = gpu.partition == "per_layer"
        self.caps: list[int] = list(gpu._caps)
        self.lru = type(gpu._policies[0]) is LRU
        self.ods: list[OrderedDict[int, None]] = [OrderedDict.fromkeys(p._od) for p in gpu._policies]  # (preloaded)
        self.od, self.cap = self.ods[0], self.caps[0]  # (the one partition of a global tier)
        self.ready = set().union(*self.ods)
        # key -> its pins: on its GPU slot, or (no slot yet) waiting on its load until it claims one
        # (PinLedger keeps the waiting ones on the Load; a key with a load waiting has no slot)
        self.pins = [0] * (sim.L * sim.E)
        # key -> its load until it lands (a bypassed one leaves at its start): a queued prefetch's
        # (key, target) in the prefetch queue, a _Load once copying or demanded
        self.loads: dict[int, _Load | tuple] = {}
        self.stale_pins: dict[int, int] = {}  # key -> unpins to ignore (pins of loads that never got a slot)
        self.protected: dict[tuple[int, int], list[int]] = {}
        self.predicted = sim.predicted  # target -> every key predicted for it
        self.unused = sim.prefetched_unused  # prefetched keys not accessed yet
        self.dq: deque[_Load] = deque()  # the link's demand queue
        self.pq: deque[tuple] = deque()  # its prefetch queue, of (key, target)
        self.fly: deque[_Load] = deque()  # copies in flight, in start (= end) order
        self.busy = self.transfers = 0
        self.busy_time = 0.0
        self.seq = 0
        self.left = 0  # waited loads not landed yet
        self.wake = -1  # the seq of the driver's wake-up when the last waited load landed (-1: none)
        self.gated = (-1, -1)
        self.E, self.predictor = sim.E, sim.predictor
        params = sim.predictor.params
        self.max_inflight, self.max_bytes = params.max_inflight, params.max_bytes_per_layer
        self.budgets = self.max_inflight is not None or self.max_bytes is not None
        self.inflight = 0  # prefetches queued or copying that count against max_inflight (read with budgets only)
        self.pbytes: dict[tuple[int, int], int] = {}  # target -> bytes prefetched for it (max_bytes_per_layer)
        self.on_gpu = sim.predictor.params.runs_on == "gpu"
        self.lat = 0.0  # seconds one hook call costs in the current step (Predictor.latency_for)

    # ---- the clock ---------------------------------------------------------------------------

    def _sleep(self, dt: float) -> None:
        """The driver sleeps `dt`: copies that end before its wake-up (or at it, made before it) land."""
        env, fly = self.env, self.fly
        self.seq += 1
        ws, t = self.seq, env.now + dt
        while fly:
            ld = fly[0]
            if ld.end < t or (ld.end == t and ld.seq < ws):
                fly.popleft()
                env.now = ld.end
                self._finish(ld)
            else:
                break
        env.now = t

    def _wait_loads(self, pending: list) -> None:
        """Land copies until every load of `pending` has, then those before the driver's wake-up."""
        waiting = [ld for ld, _ in pending if ld.done_t < 0]
        if not waiting:
            return
        for ld in waiting:
            ld.waited = True
        self.left, self.wake = len(waiting), -1
        env, fly = self.env, self.fly
        while self.wake < 0:
            ld = fly.popleft()
            env.now = ld.end
            self._finish(ld)
        t, ws = env.now, self.wake
        while fly and fly[0].end == t and fly[0].seq < ws:
            self._finish(fly.popleft())

    # ---- the link ----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Start queued copies on free slots: demand first; a stale or slotless prefetch is dropped
        (its waiting pins become stale ones, as LoadChain._dropped). A queued prefetch is a plain
        (key, target) until its copy starts."""
        dq, pq, fly, now = self.dq, self.pq, self.fly, self.env.now
        while self.busy < self.slots:
            if dq:
                ld = dq.popleft()
                if not self._slot(ld.key):  # no slot: the demand copy bypasses the cache
                    ld.bypass = True
                    self.rec.bypass += 1
                    self._forget(ld.key)
            else:
                gated, loads, pins, dropped = self.gated, self.loads, self.pins, 0
                while pq:
                    key, target = pq.popleft()
                    if target > gated and self._slot(key):
                        ld = loads[key] = _Load(key, True, target)
                        break
                    if pins[key]:
                        self._forget(key)
                    else:  # (_forget, inlined: most dropped prefetches hold no pin)
                        del loads[key]
                    dropped += 1
                else:
                    self.rec.prefetch_dropped += dropped
                    self.inflight -= dropped
                    return
                self.rec.prefetch_dropped += dropped
                self.inflight -= dropped
            self.busy += 1
            ld.start, ld.end = now, now + self.d
            self.seq += 1
            ld.seq = self.seq
            fly.append(ld)

    def _slot(self, key: int) -> bool:
        """Tier.reserve at a copy's start: a GPU slot for `key`, evicting the oldest READY key not
        pinned when the tier is full; False, changing nothing, when none can be evicted."""
        if self.per_layer:
            od, cap = self.ods[key // self.E], self.caps[key // self.E]
        else:
            od, cap = self.od, self.cap
        if len(od) >= cap:
            v = None
            if cap:
                pins, ready = self.pins, self.ready
                for k in od:  # (IN_FLIGHT keys are not READY)
                    if not pins[k] and k in ready:
                        v = k
                        break
            if v is None:
                return False
            del od[v]
            self.ready.discard(v)
            unused = self.unused
            if v in unused:
                unused.discard(v)
                self.rec.prefetch_wasted += 1
            self.rec.gpu_evictions += 1
        od[key] = None  # (the pins waiting on its load are the slot's now)
        return True

    def _forget(self, key: int) -> None:
        """The load of `key` leaves without a slot: its waiting pins go with it (stale: their
        unpins become no-ops)."""
        del self.loads[key]
        pins = self.pins
        if pins[key]:
            self.stale_pins[key] = self.stale_pins.get(key, 0) + pins[key]
            pins[key] = 0

    def _finish(self, ld: _Load) -> None:
        """The copy of `ld` has ended (now): free its link slot, land it, start what is queued."""
        self.busy -= 1
        self.busy_time += ld.end - ld.start
        self.transfers += 1
        if self.log is not None:
            self.log.append(("pcie", ld.key, ld.prio, ld.start, ld.end))
        ld.done_t = ld.end  # (now)
        if ld.counted:
            self.inflight -= 1
        if not ld.bypass:
            key = ld.key
            self.ready.add(key)
            del self.loads[key]
            if ld.prefetch:
                self.unused.add(key)
        if ld.waited:
            self.left -= 1
            if self.left == 0:
                self.seq += 1
                self.wake = self.seq
        if self.dq or self.pq:
            self._dispatch()

    # ---- pins --------------------------------------------------------------------------------

    def _unpin_all(self, keys: list[int]) -> None:
        """PinLedger._unpin_all: each unpin cancels a stale pin first, else one of the key's pins."""
        pins, stale_pins = self.pins, self.stale_pins
        if not stale_pins:
            for key in keys:
                pins[key] -= 1
            return
        for key in keys:
            s = stale_pins.get(key)
            if s:
                if s == 1:
                    del stale_pins[key]
                else:
                    stale_pins[key] = s - 1
            else:
                pins[key] -= 1

    # ---- prefetch ----------------------------------------------------------------------------

    def _hooked(self, reqs) -> float:
        """Simulation._hook for a hook the predictor implements, issuing at once: count its latency
        (`lat`, this step's), issue its answer; returns its GPU-stream seconds."""
        lat = self.lat
        self.rec.predictor_s += lat
        if reqs:
            self._issue(reqs)
        return lat if self.on_gpu else 0.0

    _issue = LoadChain._issue  # (its walk of a hook's answer, target by target: with this class's
    # _pcie_full, _issue_held and _issue_keys, and `E`, `gated`, `predictor`, `predicted`, `protected`)

    def _pcie_full(self) -> bool:
        """No copy starts (none claims a GPU slot) before simulated time passes."""
        return self.busy >= self.slots

    def _issue_keys(self, keys: list[int], target: tuple[int, int], protect: bool) -> list[int]:
        """One target's keys in order: pin what is on its way or resident (with protect), queue a
        prefetch for the rest within the budgets (started at once while a slot is free). Returns
        the keys protected."""
        loads, ready, pq, pins, rec = self.loads, self.ready, self.pq, self.pins, self.rec
        plist: list[int] = []
        for key in keys:
            if key in loads or key in ready:  # on its way (copying: in flight), or resident
                if protect:
                    pins[key] += 1
                    plist.append(key)
                continue
            if self.budgets and not self._budget(target):
                continue
            loads[key] = e = (key, target)
            pq.append(e)
            rec.prefetch_issued += 1
            if self.busy < self.slots:
                self._dispatch()
            if protect and key in loads:  # (a prefetch with no slot to land in was dropped at once)
                pins[key] += 1
                plist.append(key)
        return plist

    def _budget(self, target: tuple[int, int]) -> bool:
        """Whether one more prefetch for `target` fits max_inflight and max_bytes_per_layer; if so,
        it is counted against them (LoadChain._issue_keys)."""
        if self.max_inflight is not None and self.inflight >= self.max_inflight:
            return False
        if self.max_bytes is not None:
            b = self.pbytes.get(target, 0) + self.sim.eb
            if b > self.max_bytes:
                return False
            self.pbytes[target] = b
        self.inflight += 1
        return True

    def _issue_held(self, keys: list[int], target: tuple[int, int]) -> list[int]:
        """_issue_keys with protect while no copy can start (LoadChain._issue_held): every key
        resident or on its way is pinned, and the others queued and pinned (within the budgets).
        Returns the keys protected."""
        if self.budgets:
            return self._issue_keys(keys, target, True)  # (nothing starts: the same walk)
        ready, pins, loads, pq = self.ready, self.pins, self.loads, self.pq
        queued = 0
        for key in keys:
            pins[key] += 1
            if key not in ready and key not in loads:
                loads[key] = e = (key, target)
                pq.append(e)
                queued += 1
        self.rec.prefetch_issued += queued
        return keys
