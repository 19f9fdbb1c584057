"""The contention-free fast path: the engine's timing without SimPy, for runs where nothing competes
for the PCIe link across layers.

When the predictor issues no prefetches (it implements none of the prefetch hooks), there is no
DRAM tier, no host thread (runtime none or one that costs no host time), misses wait for their
copy (`miss: wait`), and neither low-bit stand-ins nor the KV cache take part, every copy on the
link is a demand load of the current layer and the layer waits for all of them. The link is idle
at each gate, its FIFO copies start one after another on its slots, and each completion time is a
running sum: copy ``i`` ends ``d`` after copy ``i - slots`` (or after the gate). The fast path
makes the same cache decisions, and the same floating-point sums, as the SimPy engine
(engine/sim.py), so it gives the same results bit for bit; the SimPy engine stays the reference
and the path for everything else. tests/test_engine_fast.py checks the two agree on random
scenarios.

With dedup (a layer's keys distinct) a step is one `Tier.access_step` call (`_layers`): the
tier makes the policy calls that hit_pin / reserve / complete / unpin would, in the same order,
without the per-key pin and in-flight bookkeeping. Without dedup `_layer` goes key by key.
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from itertools import accumulate, repeat

from ..cache.policies import FIFO, LRU
from ..predictors.base import Predictor
from .channels import DEMAND
from .fast_prefetch import FastPrefetch, unsupported as prefetch_unsupported
from .plan import StepPlan, flat_keys
from .sim import Simulation, _View

ENGINES = ("auto", "fast", "simpy")


def unsupported(sim: Simulation) -> str | None:
    """Why `sim` needs the SimPy engine (the first feature the fast paths do not model), or None
    when a fast path gives the same results (`fast_path` says which)."""
    if prefetches(sim):
        return prefetch_unsupported(sim)
    parts = ((sim.dram, "a DRAM tier (copies from the disk)"), (sim.host, "a runtime with host costs"),
             (sim.horizon, "a runtime's load_slowdown"), (sim.cpu, f"miss: {sim.cfg.miss}"),
             (sim.standin, "low-bit stand-ins"),
             (sim.kv, "the KV cache in the GPU budget"), (sim.writeback, "the write-back of evicted experts"))
    return next((why for part, why in parts if part is not None), None)


def prefetches(sim: Simulation) -> bool:
    """The predictor implements a prefetch hook (or reads the future): the prefetch path's case."""
    return any(sim._implements.values()) or sim.predictor.needs_future


def fast_path(sim: Simulation):
    """The fast path for a sim with nothing `unsupported`: when the predictor prefetches,
    FlatPrefetch (engine/flat_prefetch.py) where it runs the case, else FastPrefetch
    (engine/fast_prefetch.py); else FastPath."""
    if not prefetches(sim):
        return FastPath(sim)
    if flat_unsupported(sim) is None:
        from .flat_prefetch import FlatPrefetch  # (imports numba: only for the runs it takes)
        return FlatPrefetch(sim)
    return FastPrefetch(sim)


def flat_unsupported(sim: Simulation) -> str | None:
    """Why `sim` needs the general prefetch path, or None when the flat one runs it (which needs
    numba, a dependency: without it the general path runs, with the same results)."""
    why = prefetch_unsupported(sim)
    if why is not None:
        return why
    gpu, params, pred = sim.gpu, sim.predictor.params, sim.predictor
    parts = ((sim.dram is not None, "a DRAM tier"),
             (gpu.capacity is None, "an unbounded GPU tier"),
             (type(gpu._policies[0]) not in (LRU, FIFO), f"GPU policy {gpu.policy}"),
             (not sim.dedup, "batch.dedup off"),
             (params.runs_on == "cpu" and (params.latency_us != 0
                                           or type(pred).latency_for is not Predictor.latency_for),
              "a host-CPU predictor's latency"),
             (sim.cost.pcie_s(sim.eb) <= 0, "copies that take no time"),
             (importlib.util.find_spec("numba") is None, "numba not installed"))
    return next((why for bad, why in parts if bad), None)


class _Clock:
    """What the recorder reads of the SimPy environment at the end: the simulated time."""

    __slots__ = ("now",)

    def __init__(self, now: float):
        self.now = now


class FastPath:
    """Runs a Simulation's steps in plain Python (see the module docstring): `FastPath(sim).run()`
    in place of `sim.run()`, for a sim with nothing `unsupported`."""

    def __init__(self, sim: Simulation):
        why = unsupported(sim)
        if why is not None:
            raise ValueError(f"the fast path does not model {why}")
        self.sim = sim
        self.gpu, self.rec, self.cost, self.cfg, self.pcie = sim.gpu, sim.rec, sim.cost, sim.cfg, sim.pcie
        self.L, self.eb = sim.L, sim.eb
        self.pos = sim.pos
        self._slots = sim.pcie.slots
        self._d = sim.cost.pcie_s(sim.eb)  # every copy is one expert: the same duration
        self._ecs = _KernelTimes(sim.cost.expert_compute_s)  # tokens -> one expert kernel's time
        self._head = _KernelTimes(sim.cost.lm_head_s)  # tokens -> the LM head's time
        # (tokens, context, sequences) -> attention time: decode steps repeat the same few (a bounded cache)
        self._attn = lru_cache(maxsize=1 << 12)(sim.cost.attention_s)
        self._tables: dict[float, tuple[list[float], list[float]]] = {}  # (_one_token)

    def run(self):
        """Every step, as Simulation.run does; returns the Recorder."""
        sim = self.sim
        now = 0  # an int, as SimPy's clock starts (it shows in the first arrival time's dtype)
        sched, rec, cost, m = sim.sched, self.rec, self.cost, sim.model
        batched = self.cfg.dedup  # distinct keys per layer: one tier call per layer (_layers)
        while True:
            plan = sched.next_step(now)
            if plan is None:
                break
            if not isinstance(plan, StepPlan):  # nothing runnable: idle until the next arrival
                rec.idle_s += plan - now
                now = now + (plan - now)
                continue
            view = sim.view = _View(sim, plan)
            t_step = now
            rec.step_start(plan, t_step)
            attn = self._attn(plan.tokens, plan.context_tokens, len(plan.request_ids))  # (every layer's)
            dense = m.first_dense_layers * (attn + cost.dense_ffn_s(plan.tokens))
            if dense + 0.0 > 0:  # (+ 0.0: the on_step_start hook's time, as the SimPy driver adds it)
                rec.compute_s += dense + 0.0
                now = now + (dense + 0.0)
            if batched:
                now = self._layers(plan, now, attn)
            else:
                for layer in range(self.L):
                    now = self._layer(plan, layer, now, attn)
            view.gated = self.L - 1
            sim.predictor.on_step_end(view)
            head = self._head[plan.tokens]
            if head > 0:
                rec.compute_s += head
                now = now + head
            rec.step_end(plan, t_step, now)
        sim.pos = self.pos
        sim.env = _Clock(now)
        sim._release(None)
        rec.finish(sim)
        return rec

    def _layers(self, plan: StepPlan, now: float, attn: float) -> float:
        """Every MoE layer of a step from `now`, with one `Tier.access_step` call for the cache decisions (no
        time affects them here): what `_layer` does, for distinct keys (dedup). Copies end in issue order (copy
        j ends d after copy j - slots, or after the gate), so do the misses' kernels. Returns when the last ends."""
        sim, rec, pcie, d, slots, eb = self.sim, self.rec, self.pcie, self._d, self._slots, self.eb
        flat, fc, bounds = flat_keys(plan)
        sim.accessed.append(flat)
        allk, allc = flat.tolist(), fc.tolist()
        shared = self.cost.shared_compute_s(plan.tokens)
        one = plan.tokens == 1  # every key's count is 1: one kernel time, and the hits' sums from a table
        if one:
            cs, sums = self._one_token(shared, len(allk))
        else:
            costs = list(map(self._ecs.__getitem__, allc))
        needed = rec.pred_needed
        rows = []  # the step's rows (layer_rows)
        pos = self.pos
        log, name = pcie.log, pcie.name
        bt = pcie.busy_time
        missl, bypass, evicted = self.gpu.access_step(allk, bounds, slots, pos + 1)
        pos += len(allk)
        copies = saved_all = 0
        many_tokens = plan.tokens > 1
        attn_row = attn + 0.0  # (attention + the pre-attention hook's time, which costs nothing here)
        for layer, misses, o, o2 in zip(range(self.L), missl, bounds, bounds[1:]):
            nk = o2 - o
            t0 = now
            now = now + attn_row
            t_gate = now
            needed[layer] += nk
            nm = len(misses)
            if one:
                busy = sums[nk - nm]
            else:
                cs = costs[o:o2]
                busy = _hits_busy(shared, cs, misses)
            busy += 0.0  # the on_gate hook: not implemented, costs nothing
            cursor = t_gate + busy
            if nm:
                if slots == 1 and log is None:  # (the common case, without the list of ends)
                    e = t_gate
                    for i in misses:  # the copies, in issue order; each miss's kernel after it
                        s, e = e, e + d
                        bt += e - s
                        c = cs[i]
                        cursor = (e if e > cursor else cursor) + c
                        busy += c
                    now = e
                else:
                    ends: list[float] = []
                    ks = allk[o:o2]
                    for j, i in enumerate(misses):
                        s = t_gate if j < slots else ends[j - slots]
                        e = s + d
                        ends.append(e)
                        bt += e - s
                        c = cs[i]
                        cursor = (e if e > cursor else cursor) + c
                        busy += c
                        if log is not None:
                            log.append((name, ks[i], DEMAND, s, e))
                    now = ends[-1]
                copies += nm
                if many_tokens:  # dedup saved each copied expert's further tokens' copies
                    for i in misses:
                        saved_all += allc[o + i] - 1
            if cursor > now:
                now = now + (cursor - now)
            rows.append((t0, t_gate, now, busy, now - t_gate - busy, nm, nk))
        t0s, gates, ends_l, busys, stalls, nms, nks = zip(*rows)
        rec.layer_rows(plan, t0s, gates, ends_l, attn_row, busys, stalls, nms, nks)
        self.pos = pos
        pcie.busy_time = bt
        pcie.transfers += copies
        pcie.bytes += eb * copies
        rec.bypass += bypass
        rec.gpu_evictions += evicted  # (sim._evicted: no prefetch was ever unused here)
        rec.saved_loads += saved_all
        sim.gated = (plan.index, self.L - 1)
        return now

    def _one_token(self, shared: float, n: int) -> tuple[list[float], list[float]]:
        """A one-token step's kernel times (n copies of the one time) and the hits' busy sums:
        sums[m] = shared + m kernel times, added one at a time as the general loop adds them."""
        c = self._ecs[1]
        t = self._tables.get(shared)
        if t is None or len(t[0]) < n:
            t = self._tables[shared] = [c] * n, list(accumulate(repeat(c, n), initial=shared))
        return t

    def _layer(self, plan: StepPlan, layer: int, now: float, attn: float) -> float:
        """One MoE layer from `now` (its start): attention, gate, hits and demand copies, expert
        kernels; returns when it ends."""
        rec = self.rec
        t0 = now
        pre = 0.0
        now = now + (pre + attn)
        t_gate = now
        sim = self.sim
        sim.gated = (plan.index, layer)
        sim.view.gated = layer
        keys, counts = plan.keys[layer], plan.counts[layer]
        sim.accessed.append(keys)
        rec.pred_needed[layer] += len(keys) if self.cfg.dedup else len(set(keys.tolist()))
        busy, hit_keys, pending, copies, misses, saved = self._accesses(keys, counts,
                                                                        self.cost.shared_compute_s(plan.tokens))
        busy += 0.0  # the on_gate hook: not implemented, costs nothing
        cursor = t_gate + busy
        if pending:
            now = self._copies(copies, t_gate)
            pending.sort(key=_done)
            for cp, c in pending:
                cursor = max(cursor, cp.end) + c
                busy += c
        if cursor > now:
            now = now + (cursor - now)
        unpin = self.gpu.unpin
        for key in hit_keys:
            unpin(key)
        for cp in copies:
            if not cp.bypass:
                for _ in range(cp.refs):
                    unpin(cp.key)
        rec.saved_loads += saved
        rec.layer_row(plan, layer, t0, t_gate, now, attn + pre, busy, now - t_gate - busy, len(hit_keys),
                      len(pending) - misses, misses, len(keys))
        return now

    def _accesses(self, keys, counts, busy: float):
        """The layer's accesses in order: a hit is pinned at once; a miss starts a demand copy on a
        free slot (claiming its GPU slot at once) or queues it; a key already on its way is waited
        for (late). Returns (busy, hit keys, [(copy, kernel s)] waited on, the copies in issue
        order, misses, copies saved by dedup)."""
        gpu = self.gpu
        hit_pin, pin = gpu.hit_pin, gpu.pin
        cache = self._ecs
        dedup, slots, rec = self.cfg.dedup, self._slots, self.rec
        pos = self.pos
        hit_keys: list[int] = []
        pending: list[tuple[_Copy, float]] = []
        copies: list[_Copy] = []
        flying: dict[int, _Copy] = {}  # key -> its cached copy in flight
        misses = saved = 0
        for key, cnt in zip(keys.tolist(), counts.tolist()):
            pos += 1
            c = cache[cnt]
            if hit_pin(key, pos):
                busy += c
                hit_keys.append(key)
                continue
            cp = flying.get(key)
            if cp is not None and dedup:  # on its way: wait for it
                saved += cnt - 1
            else:  # without dedup a second token's copy is a transfer of its own (a bypass copy)
                misses += 1
                saved += cnt - 1
                cp = _Copy(key, cp is not None)
                if cp.bypass:
                    rec.bypass += 1
                else:
                    flying[key] = cp
                if len(copies) < slots:  # a free slot: the copy starts now
                    self._claim(cp, pos, flying)
                copies.append(cp)
            if not cp.bypass:
                cp.refs += 1
                if cp.claimed:
                    pin(key)
                else:
                    cp.pins += 1
            pending.append((cp, c))
        self.pos = pos
        return busy, hit_keys, pending, copies, misses, saved

    def _claim(self, cp: _Copy, pos: int, flying: dict | None) -> None:
        """The GPU slot of a copy as its PCIe copy starts (loads._claim_slot): with no evictable
        slot a demand copy goes through a transient buffer (bypass: not cached, its waiting pins
        dropped)."""
        cp.claimed = True
        if cp.bypass:
            return
        evicted = self.gpu.reserve(cp.key, pos)
        if evicted is None:
            cp.bypass = True
            self.rec.bypass += 1
            if flying is not None:
                del flying[cp.key]
            return
        self.sim._evicted(evicted)
        pin = self.gpu.pin
        for _ in range(cp.pins):
            pin(cp.key)

    def _copies(self, copies: list[_Copy], t_gate: float) -> float:
        """Run the layer's copies on the idle link (FIFO over its slots from the gate, in issue
        order: copy i ends d after copy i - slots); returns when the last ends. Each completion
        lands its key, then the next queued copy starts and claims its GPU slot (at the layer's
        last access), as the SimPy channel orders them."""
        pcie, gpu, d, eb, slots, pos = self.pcie, self.gpu, self._d, self.eb, self._slots, self.pos
        log = pcie.log
        n = len(copies)
        for i, cp in enumerate(copies):
            cp.start = t_gate if i < slots else copies[i - slots].end
            cp.end = cp.start + d
        for i, cp in enumerate(copies):
            pcie.busy_time += cp.end - cp.start
            pcie.transfers += 1
            pcie.bytes += eb
            if log is not None:
                log.append((pcie.name, cp.key, DEMAND, cp.start, cp.end))
            if not cp.bypass:
                gpu.complete(cp.key)
            if i + slots < n:
                self._claim(copies[i + slots], pos, None)
        return copies[-1].end


class _KernelTimes(dict):
    """tokens -> a per-token-count cost (one expert kernel's time, the LM head's), computed on first use."""

    def __init__(self, ecs):
        super().__init__()
        self._ecs = ecs

    def __missing__(self, tokens: int) -> float:
        c = self[tokens] = self._ecs(tokens)
        return c


def _hits_busy(busy: float, cs: list[float], misses: list[int]) -> float:
    """`busy` plus the layer's hits' kernel times (`cs` but the `misses`), one at a time in
    access order."""
    prev = 0
    for i in misses:
        for c in cs[prev:i]:
            busy += c
        prev = i + 1
    for c in cs[prev:]:
        busy += c
    return busy


def _done(p) -> float:
    return p[0].end


class _Copy:
    """One demand copy of the fast path: its key, its GPU slot and its pins, and its times."""

    __slots__ = ("bypass", "claimed", "end", "key", "pins", "refs", "start")

    def __init__(self, key: int, bypass: bool):
        self.key, self.bypass = key, bypass
        self.claimed = False  # its PCIe copy has started (and taken its GPU slot unless bypass)
        self.pins = 0         # pins waiting for the GPU slot
        self.refs = 0         # accesses holding a pin on it until the layer ends
        self.start = self.end = -1.0


ENGINE_JSON = "engine.json"


def engine_line(engine: dict) -> str:
    """The terminal line saying which engine ran a scenario, and why SimPy when it did."""
    if engine["engine"] == "fast" and engine.get("path") == "prefetch":
        return "engine: fast (prefetch path without SimPy, same results as the SimPy engine)"
    if engine["engine"] == "fast":
        return "engine: fast (contention-free path, same results as the SimPy engine)"
    return f"engine: simpy ({engine['reason']})"


def write_engine_json(out, engine: dict) -> None:
    """`engine.json` beside summary.json: {"engine": "fast" | "simpy", "reason": ...} (and "path":
    "prefetch" on the prefetch fast path). A file of its
    own, so summary.json stays what it was before the fast path existed."""
    import json
    from pathlib import Path

    Path(out, ENGINE_JSON).write_text(json.dumps(engine, indent=2) + "\n")
