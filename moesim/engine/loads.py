"""The load chain, a layer's access decision and prefetch issuing, shared by the simulator and
the real replay.

An expert load is a copy chain SSD → DRAM → PCIe → GPU over two channels (engine/channels.py);
its GPU slot is taken when the PCIe copy starts. The real replay (moesim/real/executor.py)
extends the steps that touch buffers (`_dram_reserve`, `_claim_slot`, `_pcie_done`, `_dropped`)
and gives `_disk_start`. The class that mixes this in provides `now()`, `_landed(load)`, `eb`,
`E`, `gpu`, `dram`, `pcie`, `disk`, `loads`, `pos`, `gated`, `dedup`, `predictor`, `predicted`,
`prefetch_bytes`, `prefetch_inflight` and what PinLedger needs. `_access_layer` is a layer's
access decision for both; they differ only in how time passes while its loads are waited for.
"""
from __future__ import annotations

import numpy as np

from .channels import DEMAND, PREFETCH, Transfer
from ..predictors.base import Prefetch, ranked_blocks
from .pins import PinLedger


class Load(Transfer):
    """An expert on its way to the GPU (demand or prefetch), possibly via the disk. It is its own
    channel Transfer (re-submitted from the disk to the PCIe channel), so a copy builds one object."""

    __slots__ = (
        "bypass",
        "channel",
        "counted_inflight",
        "done_t",
        "dram_reserved",
        "from_disk",
        "pinned_dram",
        "pins",
        "prefetch",
        "reserved",
        "target",
        "waiters",
    )

    def __init__(self, key: int, prefetch: bool, target: tuple[int, int], bypass: bool):
        self.key, self.prefetch, self.target, self.bypass = key, prefetch, target, bypass
        self.channel = None
        self.done_t = -1.0
        self.waiters: list = []
        self.from_disk = self.dram_reserved = self.pinned_dram = False
        self.counted_inflight = prefetch  # counts against max_inflight until it lands or drops
        self.reserved = False  # holds a GPU slot (from the start of its PCIe copy)
        self.pins = 0          # pins waiting for the slot
        self.queued_at = self.start = self.end = -1.0
        self.dropped = False

    @classmethod
    def queued_prefetch(cls, key: int, target: tuple[int, int], nbytes: int, cb: tuple, channel, now: float) -> Load:
        """A prefetch queued on `channel` with one waiting pin, built in one go (as __init__ then
        LoadChain._copy, with the callbacks `cb` of LoadChain._callbacks)."""
        load = cls.__new__(cls)
        load.key, load.prefetch, load.target, load.bypass = key, True, target, False
        load.nbytes, load.priority, load.on_done, load.on_start, load.stale = nbytes, PREFETCH, cb[0], cb[1], cb[4]
        load.channel, load.done_t, load.waiters = channel, -1.0, []
        load.from_disk = load.dram_reserved = load.pinned_dram = load.reserved = load.dropped = False
        load.counted_inflight, load.pins = True, 1
        load.queued_at, load.start, load.end = now, -1.0, -1.0
        return load

    @property
    def load(self) -> Load:
        """The load a channel copy belongs to: itself."""
        return self

    @property
    def transfer(self) -> Load:
        """The copy a channel queues: itself."""
        return self


def predicted_blocks(reqs, E: int, cur: tuple[int, int], predicted: dict):
    """A hook's answer target by target (its Ranked blocks), for targets after the gated one `cur`:
    (target, its keys best first), each key recorded in `predicted` (target -> keys predicted for
    it, scored at its gate)."""
    for step, layer, experts, _scores in ranked_blocks(reqs):
        target = (step, layer)
        if target <= cur:
            continue
        base = layer * E
        keys = [base + e for e in experts]
        record_predicted(predicted, target, keys)
        yield target, keys


def record_predicted(predicted: dict, target: tuple[int, int], keys: list[int]) -> None:
    """Add `keys` to the keys predicted for `target` (scored at its gate)."""
    pset = predicted.get(target)
    if pset is None:
        predicted[target] = set(keys)
    else:
        pset.update(keys)


class LoadChain(PinLedger):
    """Loads, their channel callbacks and prefetch issuing (see the module docstring)."""

    Load = Load
    _cb = None          # the channel callbacks, bound once (see _copy)
    _disk_start = None  # optional `_disk_start(load) -> bool`: on_start of a disk read

    # ---- loads -------------------------------------------------------------------------------

    def _start_load(self, key: int, prefetch: bool, target: tuple[int, int], bypass: bool = False) -> Load:
        """Queue the copy chain of `key` (SSD → DRAM → PCIe → GPU as needed). The GPU slot is
        taken when the PCIe copy starts (see _claim_slot), so a queued prefetch evicts nothing."""
        load = self.Load(key, prefetch, target, bypass)
        if bypass:
            self.rec.bypass += 1
        else:
            self.loads[key] = load
        dram = self.dram
        if dram is None:
            self._copy(load, self.pcie)
        elif dram.hit_pin(key, self.pos):  # held in DRAM until its PCIe copy is done
            self.rec.dram_hits += 1
            load.pinned_dram = True
            self._copy(load, self.pcie)
        else:
            self.rec.dram_misses += 1
            load.from_disk = True
            if not dram.in_flight(key):  # else a bypass copy is already reading it: read it again
                ev = self._dram_reserve(key)
                if ev is not None:
                    load.dram_reserved = True
                    self.rec.dram_evictions += len(ev)
            self._copy(load, self.disk)
        return load

    def _dram_reserve(self, key: int) -> list[int] | None:
        """A DRAM slot for `key` (the evicted keys), or None when none is free."""
        return self.dram.reserve(key, self.pos)

    def _claim_slot(self, load: Load) -> bool:
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
            self.gpu.pin_held(key)  # (reserved just now: it holds a slot)
        load.pins = 0
        return True

    def _copy(self, load: Load, channel) -> None:
        """Submit `load` itself as the next copy of its chain; its callbacks are bound methods made
        once per chain (no closure per copy)."""
        cb = self._cb
        if cb is None:
            cb = self._callbacks()
        load.nbytes = self.eb
        load.priority = PREFETCH if load.prefetch else DEMAND
        if channel is self.pcie:
            load.on_done, load.on_start = cb[0], cb[1]
        else:
            load.on_done, load.on_start = cb[2], cb[3]
        load.stale = cb[4]
        load.dropped = False
        load.start = load.end = -1.0
        load.channel = channel
        channel.submit(load)

    def _callbacks(self) -> tuple:
        """The channel callbacks (pcie done, claim slot, disk done, disk start, stale), bound once."""
        self._cb = (self._pcie_done, self._claim_slot, self._disk_done,
                    None if self._disk_start is None else self._disk_start, self._stale)
        return self._cb

    def _start_prefetch(self, key: int, target: tuple[int, int]) -> Load:
        """Queue a prefetch's copy chain (see Simulation for a cheaper one)."""
        return self._start_load(key, True, target)

    def _start_prefetches(self, keys: list[int], target: tuple[int, int]) -> None:
        """Queue a prefetch with one waiting pin for each of `keys` (none resident or on its way;
        a key twice gets one load and two pins) while no PCIe copy can start."""
        loads, rec = self.loads, self.rec
        for key in keys:
            load = loads.get(key)
            if load is None:
                load = self._start_prefetch(key, target)
                rec.prefetch_issued += 1
                self.prefetch_inflight += 1
            load.pins += 1

    def _stale(self, load: Load) -> bool:
        """A queued prefetch whose target layer has been gated already."""
        return load.prefetch and load.target <= self.gated

    def _disk_done(self, load: Load) -> None:
        if load.dram_reserved:
            self.dram.complete(load.key)
            self.dram.pin(load.key)
            load.pinned_dram = True
        self._copy(load, self.pcie)

    def _pcie_done(self, load: Load) -> None:
        key = load.key
        if load.pinned_dram:
            self.dram.unpin(key)
        load.done_t = self.now()
        if load.counted_inflight:
            self.prefetch_inflight -= 1
        if not load.bypass:
            self.gpu.complete(key)
            del self.loads[key]
            if load.prefetch and not load.waiters:
                self.prefetched_unused.add(key)
        self._landed(load)

    def _dropped(self, t: Transfer) -> None:
        """A prefetch left a queue without being copied (stale, or no slot): undo its bookkeeping."""
        load = self.loads.pop(t.key)
        if load.counted_inflight:
            self.prefetch_inflight -= 1
        if load.pins:  # (_forget_pins, inlined)
            self.stale_pins[load.key] = self.stale_pins.get(load.key, 0) + load.pins
            load.pins = 0
        if load.channel is self.disk:
            if load.dram_reserved:
                self.dram.cancel(t.key)
        elif load.pinned_dram:
            self.dram.unpin(t.key)
        self.rec.prefetch_dropped += 1

    # ---- a layer's accesses ------------------------------------------------------------------

    def _gate(self, plan, view, layer: int) -> list[Prefetch]:
        """The gate of `layer` has run: later prefetches for it are stale, the view may read its
        routing, and what was predicted for it is scored. Returns the predictor's on_gate answer."""
        self.gated = (plan.index, layer)
        view.gated = layer
        reqs = self.predictor.on_gate(view, layer)
        keys = plan.keys[layer]
        self._score_predictions(self.gated, keys if self.dedup else np.unique(keys))
        return reqs

    def _access_layer(self, step: int, layer: int, keys: list[int], counts: list[int], payloads,
                      divert=None) -> tuple:
        """The layer's expert accesses in order, one decision for the simulator and the real replay:
        a hit is pinned; an expert on its way is waited for (a queued prefetch is promoted); a miss
        is one `divert(key, count, payload)` serves without a copy (it returns (job, payload)), else
        a demand load. `payloads[i]` rides with `keys[i]` (kernel seconds in the simulator, token
        rows in the real replay). Adds the copies dedup saves to the record. Returns
        ((hits, late, misses), hit payloads, [(load, payload)] to wait for, pinned keys)."""
        rec, dedup, unused, loads = self.rec, self.dedup, self.prefetched_unused, self.loads
        hit_pin, pin = self.gpu.hit_pin, self._pin
        pos = self.pos
        hits = late = misses = saved = 0
        ready: list = []
        pending: list = []
        pinned: list[int] = []
        for key, cnt, pay in zip(keys, counts, payloads):
            pos += 1
            if hit_pin(key, pos):
                hits += 1
                ready.append(pay)
                if key in unused:
                    unused.discard(key)
                    rec.prefetch_used += 1
                pinned.append(key)
                continue
            load = loads.get(key)
            if load is not None and (dedup or load.prefetch):  # on its way: wait for it
                late += 1
                saved += cnt - 1  # without dedup each further token would copy it again
                if load.prefetch:
                    rec.prefetch_late += 1
                    load.prefetch = False
                    load.channel.promote(load.transfer)
            else:
                self.pos = pos
                job = None if divert is None else divert(key, cnt, pay)
                misses += 1
                if job is not None:  # served without a copy into the cache
                    pending.append(job)
                    continue
                saved += cnt - 1  # without dedup a second token's copy is a transfer of its own
                load = self._start_load(key, False, (step, layer), bypass=load is not None)
            if not load.bypass:
                pin(key)
                pinned.append(key)
            pending.append((load, pay))
        self.pos = pos
        rec.saved_loads += saved
        return (hits, late, misses), ready, pending, pinned

    # ---- prefetch ----------------------------------------------------------------------------

    def _issue(self, reqs: list[Prefetch]) -> None:
        """Start the prefetches of a predictor's answer, target by target, best first (its Ranked
        blocks, see predictors/base.py). A target already gated, an expert resident or on its way,
        or one over the in-flight/byte budget starts no copy (and builds nothing); with `protect`
        the predicted expert is pinned until its target layer has run (as _protect, inlined)."""
        if not reqs:
            return
        protect, protected = self.predictor.params.protect, self.protected
        for target, keys in predicted_blocks(reqs, self.E, self.gated, self.predicted):
            if protect and self._pcie_full():
                plist = self._issue_held(keys, target)
            else:
                plist = self._issue_keys(keys, target, protect)
            if plist:
                held = protected.get(target)
                if held is None:
                    protected[target] = plist
                else:
                    held.extend(plist)

    def _pcie_full(self) -> bool:
        """True when no PCIe copy can start (so no GPU slot is claimed) until time passes: a
        block's tier pins may then be made in one call. The real replay's threads say False."""
        return False

    def _issue_keys(self, keys: list[int], target: tuple[int, int], protect: bool) -> list[int]:
        """_issue for one target's keys, key by key; returns the keys it protected."""
        gpu, loads, rec, eb = self.gpu, self.loads, self.rec, self.eb
        params = self.predictor.params
        max_inflight, max_bytes = params.max_inflight, params.max_bytes_per_layer
        resident, pin_held, start = gpu.__contains__, gpu.pin_held, self._start_prefetch
        plist: list[int] = []
        for key in keys:
            load = loads.get(key)
            if load is not None:  # on its way: at most protect it (_pin, inlined)
                if protect:
                    if load.reserved:
                        pin_held(key)
                    else:
                        load.pins += 1
                    plist.append(key)
                continue
            if protect:
                if pin_held(key):  # resident: protected
                    plist.append(key)
                    continue
            elif resident(key):
                continue
            if max_inflight is not None and self.prefetch_inflight >= max_inflight:
                continue
            if max_bytes is not None and (self.prefetch_bytes.get(target, 0) + eb > max_bytes):
                continue
            load = start(key, target)
            rec.prefetch_issued += 1
            self.prefetch_inflight += 1
            if max_bytes is not None:
                self.prefetch_bytes[target] = self.prefetch_bytes.get(target, 0) + eb
            if protect and key in loads:  # (a copy with no slot to land in was dropped at once)
                if load.reserved:  # (_pin, inlined: `load` is the key's load)
                    pin_held(key)
                else:
                    load.pins += 1
                plist.append(key)
        return plist

    def _issue_held(self, keys: list[int], target: tuple[int, int]) -> list[int]:
        """_issue_keys with `protect` while no PCIe copy can start: every key holding a GPU slot
        (resident, or a load copying) is pinned in one tier call first; that is what the key-by-key
        walk does, as nothing it starts claims a slot meanwhile. Returns the keys it protected
        (those pinned in the tier, then the others: the same pins, released together)."""
        params = self.predictor.params
        plist, rest = self.gpu.pin_held_many(keys)
        if not rest:
            return plist
        if params.max_inflight is None and params.max_bytes_per_layer is None:  # no budget: all protected
            get, new = self.loads.get, []
            for key in rest:
                load = get(key)
                if load is None:
                    new.append(key)
                else:  # on its way, no slot yet: its pins wait for one
                    load.pins += 1
            if new:
                self._start_prefetches(new, target)
            return plist + rest
        return plist + self._issue_keys(rest, target, True)  # (a budget: key by key; none holds a slot)

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
