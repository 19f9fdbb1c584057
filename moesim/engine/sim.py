"""The simulation: a SimPy model of the per-step, per-layer pipeline of DESIGN §3.

One driver process walks the steps and layers on the GPU compute stream. It asks the scheduler
(engine/scheduler.py) for each step at the simulated time the step starts, and idles (advances
time; loads in flight carry on) when nothing is runnable before the next arrival. Expert loads are
transfers on the PCIe and disk channels (one SimPy event each); a GPU-tier hit costs no event.
Within a layer, expert compute starts as soon as the expert is resident and kernels run one after
another, so the layer's end is computed from the load completion times once they are known.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import simpy

from ..cache.tiers import Tier
from ..hardware.channels import DEMAND, PREFETCH, Channel, Transfer
from ..hardware.costs import CostModel
from ..models import ModelSpec
from ..predictors.base import Predictor, Prefetch
from .metrics import Recorder
from .pins import PinLedger
from .plan import StepPlan
from .scheduler import PlanSource


@dataclass(frozen=True)
class EngineConfig:
    """Plain (non-pydantic) settings the engine needs, taken from the scenario."""

    gpu_capacity: int | None          # experts (per layer if per_layer); None = unbounded
    gpu_policy: str = "lru"
    gpu_partition: str = "global"
    dram_capacity: int | None = None  # None with has_dram=False: host memory holds every expert
    dram_policy: str = "lru"
    dram_partition: str = "global"
    has_dram: bool = False
    dedup: bool = True
    record_events: bool = False


class _Load:
    """An expert on its way to the GPU (demand or prefetch), possibly via the disk."""

    __slots__ = ("key", "prefetch", "target", "bypass", "transfer", "channel", "done_t", "waiters",
                 "from_disk", "dram_reserved", "pinned_dram", "counted_inflight", "reserved", "pins")

    def __init__(self, key: int, prefetch: bool, target: tuple[int, int], bypass: bool):
        self.key, self.prefetch, self.target, self.bypass = key, prefetch, target, bypass
        self.transfer: Transfer | None = None
        self.channel: Channel | None = None
        self.done_t = -1.0
        self.waiters: list = []
        self.from_disk = self.dram_reserved = self.pinned_dram = False
        self.counted_inflight = prefetch  # counts against max_inflight until it lands or drops
        self.reserved = False  # holds a GPU slot (from the start of its PCIe copy)
        self.pins = 0          # pins waiting for the slot


class _View:
    """The read-only StepView predictors see."""

    def __init__(self, sim: Simulation, plan: StepPlan):
        self._sim, self._plan = sim, plan
        self.step, self.phase, self.request_ids = plan.index, plan.phase, plan.request_ids
        self.token_request_ids = plan.token_requests
        self.gated = -1  # last layer whose gate has run
        self.pre_attn_layer = -1  # last layer whose pre-attention hook has run

    def _check(self, layer: int) -> None:
        if layer > self.gated:
            raise LookupError(f"layer {layer} is not routed yet (gate ran up to layer {self.gated})")

    def experts(self, layer: int) -> np.ndarray:
        self._check(layer)
        E = self._sim.E
        return np.unique(self._plan.keys[layer]) - layer * E

    def pre_attn(self, layer: int) -> np.ndarray:
        """[tokens, d] pre-attention hidden states of `layer` (known from its pre-attention hook on)."""
        if layer > self.pre_attn_layer:
            raise LookupError(f"layer {layer}'s pre-attention state is not computed yet")
        if self._plan.pre_attn is None:
            raise LookupError("this run has no pre_attn states (the predictor class must set needs_pre_attn)")
        return self._plan.pre_attn[:, layer, :]

    def token_experts(self, layer: int) -> np.ndarray:
        self._check(layer)
        return self._plan.routing[:, layer, :]

    def future(self, n_layers: int, after_layer: int) -> list[tuple[int, int, np.ndarray]]:
        """Oracle only: the unique experts of the next `n_layers` layers after `after_layer`.
        The rest of this step is exact; later steps are as the scheduler would form them from the
        requests arrived so far (exact with closed arrivals; see engine/scheduler.py)."""
        if not self._sim.predictor.needs_future:
            raise PermissionError("only predictors with needs_future may read the trace ahead")
        L, E = self._sim.L, self._sim.E
        out, plan, ahead, layer = [], self._plan, 0, after_layer
        for _ in range(n_layers):
            layer += 1
            if layer >= L:
                plan, layer = self._sim.sched.peek(ahead, self._sim.env.now), 0
                ahead += 1
                if plan is None:
                    break
            keys = plan.keys[layer]  # unique already, unless dedup is off
            out.append((plan.index, layer, (keys if self._sim.cfg.dedup else np.unique(keys)) - layer * E))
        return out


class Simulation(PinLedger):
    """Runs the steps of a scheduler through the timing model and records metrics.

    `steps`: a Scheduler (anything with `next_step(now)` and `peek(i, now)`), or an iterable of
    StepPlans run back to back."""

    def __init__(self, model: ModelSpec, cost: CostModel, cfg: EngineConfig, predictor: Predictor,
                 steps, next_use=None):
        self.model, self.cost, self.cfg, self.predictor = model, cost, cfg, predictor
        self.E, self.L = model.num_experts, model.num_layers
        self.eb = model.expert_bytes
        self.env = simpy.Environment()
        self.sched = steps if hasattr(steps, "next_step") else PlanSource(steps)
        self.gpu = Tier("gpu", cfg.gpu_capacity, cfg.gpu_policy, cfg.gpu_partition, self.E, self.L, next_use)
        self.dram = (Tier("dram", cfg.dram_capacity, cfg.dram_policy, cfg.dram_partition, self.E, self.L, next_use)
                     if cfg.has_dram else None)
        self.events_log: list | None = [] if cfg.record_events else None
        self.pcie = Channel(self.env, "pcie", cost.hw.pcie_h2d.copy_engines, cost.pcie_s, self._dropped,
                            self.events_log)
        self.disk = Channel(self.env, "disk", cost.hw.disk.queue_depth, cost.disk_s, self._dropped, self.events_log)
        self.rec = Recorder(model)
        self.loads: dict[int, _Load] = {}
        self.prefetched_unused: set[int] = set()
        self.pos = -1              # index of the latest access (the cache clock; Belady next-use index)
        self.gated = (-1, -1)      # (step, layer) whose gate ran last: prefetches at or before are stale
        self.view: _View | None = None
        self.protected: dict[tuple[int, int], list[int]] = {}  # target (step, layer) -> pinned keys
        self.predicted: dict[tuple[int, int], set[int]] = {}   # target -> every key predicted for it
        self.prefetch_bytes: dict[tuple[int, int], int] = {}   # target -> prefetched bytes (bounded)
        self.prefetch_inflight = 0
        self._implements = {h: getattr(type(predictor), h) is not getattr(Predictor, h)
                            for h in ("on_step_start", "on_pre_attention", "on_gate")}
        self.stale_pins: dict[int, int] = {}  # key -> unpins to ignore (pins of loads that never got a slot)

    # ---- loads -------------------------------------------------------------------------------

    def _start_load(self, key: int, prefetch: bool, target: tuple[int, int], bypass: bool = False) -> _Load:
        """Queue the copy chain of `key` (SSD → DRAM → PCIe → GPU as needed). The GPU slot is
        taken when the PCIe copy starts (see _claim_slot), so a queued prefetch evicts nothing."""
        load = _Load(key, prefetch, target, bypass)
        if bypass:
            self.rec.bypass += 1
        else:
            self.loads[key] = load
        dram = self.dram
        if dram is None:
            self._copy(load, self.pcie)
        elif dram.hit(key, self.pos):
            self.rec.dram_hits += 1
            dram.pin(key)
            load.pinned_dram = True
            self._copy(load, self.pcie)
        else:
            self.rec.dram_misses += 1
            load.from_disk = True
            if not dram.in_flight(key):  # else a bypass copy is already reading it: read it again
                ev = dram.reserve(key, self.pos)
                if ev is not None:
                    load.dram_reserved = True
                    self.rec.dram_evictions += len(ev)
            self._copy(load, self.disk)
        return load

    def _claim_slot(self, load: _Load) -> bool:
        """At the start of the PCIe copy: reserve the GPU slot, evicting the policy's victim.
        No evictable slot: a prefetch is dropped (False); a demand copy goes through a transient
        buffer and is not cached (bypass)."""
        if load.bypass:
            return True
        key = load.key
        evicted = self.gpu.reserve(key, self.pos)
        if evicted is None:
            if load.prefetch:
                return False
            load.bypass = True
            self.rec.bypass += 1
            del self.loads[key]
            self._forget_pins(load)
            return True
        self._evicted(evicted)
        load.reserved = True
        for _ in range(load.pins):
            self.gpu.pin(key)
        load.pins = 0
        return True

    def _copy(self, load: _Load, channel: Channel) -> None:
        pcie = channel is self.pcie
        t = Transfer(load.key, self.eb, PREFETCH if load.prefetch else DEMAND,
                     lambda tr, ld=load: (self._pcie_done if pcie else self._disk_done)(ld),
                     (lambda ld=load: ld.prefetch and ld.target <= self.gated) if load.prefetch else None,
                     (lambda ld=load: self._claim_slot(ld)) if pcie else None)
        load.transfer, load.channel = t, channel
        channel.submit(t)

    def _disk_done(self, load: _Load) -> None:
        if load.dram_reserved:
            self.dram.complete(load.key)
            self.dram.pin(load.key)
            load.pinned_dram = True
        self._copy(load, self.pcie)

    def _pcie_done(self, load: _Load) -> None:
        key = load.key
        if load.pinned_dram:
            self.dram.unpin(key)
        load.done_t = self.env.now
        if load.counted_inflight:
            self.prefetch_inflight -= 1
        if not load.bypass:
            self.gpu.complete(key)
            del self.loads[key]
            if load.prefetch and not load.waiters:
                self.prefetched_unused.add(key)
        for w in load.waiters:
            w()

    def _dropped(self, t: Transfer) -> None:
        """A prefetch left a queue without being copied (stale, or no slot): undo its bookkeeping."""
        load = self.loads.pop(t.key)
        if load.counted_inflight:
            self.prefetch_inflight -= 1
        self._forget_pins(load)
        if load.channel is self.disk:
            if load.dram_reserved:
                self.dram.cancel(t.key)
        elif load.pinned_dram:
            self.dram.unpin(t.key)
        self.rec.prefetch_dropped += 1

    # ---- prefetch ----------------------------------------------------------------------------

    def _issue(self, reqs: list[Prefetch]) -> None:
        if not reqs:
            return
        E, gpu, cur, eb = self.E, self.gpu, self.gated, self.eb
        params = self.predictor.params
        protect, max_inflight, max_bytes = params.protect, params.max_inflight, params.max_bytes_per_layer
        predicted = self.predicted
        for r in sorted(reqs, key=lambda p: (p.step, p.layer, -p.score, p.expert)):
            target = (r.step, r.layer)
            if target <= cur:
                continue
            key = r.layer * E + r.expert
            pset = predicted.get(target)
            if pset is None:
                pset = predicted[target] = set()
            pset.add(key)
            if key in gpu or key in self.loads:  # resident or on its way: at most protect it
                if protect:
                    self._protect(key, target)
                continue
            if max_inflight is not None and self.prefetch_inflight >= max_inflight:
                continue
            if max_bytes is not None and (self.prefetch_bytes.get(target, 0) + eb > max_bytes):
                continue
            self._start_load(key, True, target)
            self.rec.prefetch_issued += 1
            self.prefetch_inflight += 1
            if max_bytes is not None:
                self.prefetch_bytes[target] = self.prefetch_bytes.get(target, 0) + eb
            if protect and key in self.loads:  # (a copy with no slot to land in was dropped at once)
                self._protect(key, target)

    def _score_predictions(self, target: tuple[int, int], needed: np.ndarray) -> None:
        """Precision/recall of everything predicted for `target` against what it needed."""
        pset = self.predicted.pop(target, None)
        layer = target[1]
        self.rec.pred_needed[layer] += len(needed)
        if pset:
            hit = len(pset.intersection(needed.tolist()))
            self.rec.pred_made[layer] += len(pset)
            self.rec.pred_correct[layer] += hit
        self.prefetch_bytes.pop(target, None)

    def _protect(self, key: int, target: tuple[int, int]) -> None:
        """Pin a predicted expert until its target layer has run (see _release)."""
        self._pin(key)
        self.protected.setdefault(target, []).append(key)

    def _release(self, upto: tuple[int, int] | None) -> None:
        """Unpin protections whose target layer is at or before `upto` (None: all)."""
        for target in [t for t in self.protected if upto is None or t <= upto]:
            for key in self.protected.pop(target):
                self._unpin(key)

    def _hook(self, reqs: list[Prefetch], hook: str, tokens: int) -> float:
        """Act on a predictor's answer; returns GPU-stream time the predictor costs. Only hooks the
        predictor implements cost time (the base class's hooks do nothing)."""
        if not self._implements[hook]:
            return 0.0
        lat = self.predictor.latency_for(tokens) * 1e-6
        self.rec.predictor_s += lat
        on_gpu = self.predictor.params.runs_on == "gpu"
        if on_gpu or lat == 0:
            self._issue(reqs)
            return lat if on_gpu else 0.0
        if reqs:  # host CPU: the requests are issued once the predictor has finished
            ev = self.env.timeout(lat)
            ev.callbacks.append(lambda _e, r=reqs: self._issue(r))
        return 0.0

    # ---- the pipeline ------------------------------------------------------------------------

    def run(self):
        self.env.process(self._driver())
        self.env.run()
        self._release(None)
        self.rec.finish(self)
        return self.rec

    def _driver(self):
        env, cost, m, rec = self.env, self.cost, self.model, self.rec
        pred, gpu = self.predictor, self.gpu
        ecs = cost.expert_compute_s
        dedup = self.cfg.dedup
        sched = self.sched
        while True:
            plan = sched.next_step(env.now)
            if plan is None:
                break
            if not isinstance(plan, StepPlan):  # nothing runnable: idle until the next arrival
                rec.idle_s += plan - env.now
                yield env.timeout(plan - env.now)
                continue
            view = self.view = _View(self, plan)
            t_step = env.now
            rec.step_start(plan, t_step)
            gpu_extra = self._hook(pred.on_step_start(view), "on_step_start", plan.tokens)
            # dense blocks before the first MoE block: resident weights, compute only
            dense = m.first_dense_layers * (cost.attention_s(plan.tokens, plan.context_tokens, len(plan.request_ids))
                                            + cost.dense_ffn_s(plan.tokens))
            if dense + gpu_extra > 0:
                rec.compute_s += dense + gpu_extra
                yield env.timeout(dense + gpu_extra)
            attn = cost.attention_s(plan.tokens, plan.context_tokens, len(plan.request_ids))
            for layer in range(self.L):
                t0 = env.now
                view.pre_attn_layer = layer
                pre = self._hook(pred.on_pre_attention(view, layer), "on_pre_attention", plan.tokens)
                yield env.timeout(pre + attn)
                t_gate = env.now
                self.gated = (plan.index, layer)
                view.gated = layer
                gate_reqs = pred.on_gate(view, layer)
                keys, counts = plan.keys[layer], plan.counts[layer]
                self._score_predictions(self.gated, keys if dedup else np.unique(keys))
                busy = cost.shared_compute_s(plan.tokens)  # shared experts: always resident
                hits = late = misses = saved = 0
                pending: list[tuple[_Load, float]] = []
                pinned = []
                unused = self.prefetched_unused
                for key, cnt in zip(keys.tolist(), counts.tolist()):
                    self.pos += 1
                    c = ecs(cnt)
                    if gpu.hit(key, self.pos):
                        hits += 1
                        busy += c
                        if key in unused:
                            unused.discard(key)
                            rec.prefetch_used += 1
                        gpu.pin(key)
                        pinned.append(key)
                        continue
                    load = self.loads.get(key)
                    if load is not None and (dedup or load.prefetch):  # on its way: wait for it
                        late += 1
                        saved += cnt - 1  # without dedup each further token would copy it again
                        if load.prefetch:
                            rec.prefetch_late += 1
                            load.prefetch = False
                            load.channel.promote(load.transfer)
                    else:  # without dedup a second token's copy is a transfer of its own
                        misses += 1
                        saved += cnt - 1
                        load = self._start_load(key, False, (plan.index, layer), bypass=load is not None)
                    if not load.bypass:
                        self._pin(key)
                        pinned.append(key)
                    pending.append((load, c))
                # The layer's own experts are pinned and their loads queued before the predictor's
                # prefetches for later layers, so a prefetch never evicts what this layer needs.
                post = self._hook(gate_reqs, "on_gate", plan.tokens)
                busy += post
                cursor = t_gate + busy
                if pending:
                    waiting = [ld for ld, _ in pending if ld.done_t < 0]
                    if waiting:
                        ev = env.event()
                        left = [len(waiting)]

                        def arrived(ev=ev, left=left):
                            left[0] -= 1
                            if left[0] == 0:
                                ev.succeed()
                        for ld in waiting:
                            ld.waiters.append(arrived)
                        yield ev
                    pending.sort(key=lambda p: p[0].done_t)
                    for ld, c in pending:
                        cursor = max(cursor, ld.done_t) + c
                        busy += c
                if cursor > env.now:
                    yield env.timeout(cursor - env.now)
                for key in pinned:
                    self._unpin(key)
                if self.protected:
                    self._release((plan.index, layer))
                rec.saved_loads += saved
                rec.layer_row(plan, layer, t0, t_gate, env.now, attn + pre, busy,
                              env.now - t_gate - busy, hits, late, misses, len(keys))
            view.gated = self.L - 1
            pred.on_step_end(view)
            head = cost.lm_head_s(plan.tokens)
            if head > 0:
                rec.compute_s += head
                yield env.timeout(head)
            rec.step_end(plan, t_step, env.now)
