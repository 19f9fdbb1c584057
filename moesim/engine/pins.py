"""Pin and eviction bookkeeping shared by the simulator and the real replay.

A key's pins wait on its load until the load holds a GPU slot; a load that never gets one takes
its waiting pins with it, and their later unpins become no-ops. Needs `self.loads`, `self.gpu`,
`self.stale_pins`, `self.prefetched_unused`, `self.protected` and `self.rec` on the class that
mixes it in.
"""
from __future__ import annotations


class PinLedger:
    def _pin(self, key: int) -> None:
        load = self.loads.get(key)
        if load is not None and not load.reserved:
            load.pins += 1
        else:
            self.gpu.pin(key)

    def _unpin(self, key: int) -> None:
        stale = self.stale_pins.get(key)
        if stale:
            if stale == 1:  # none left: forget the key, so _unpin_all keeps its fast loop
                del self.stale_pins[key]
            else:
                self.stale_pins[key] = stale - 1
            return
        load = self.loads.get(key)
        if load is not None and not load.reserved:
            load.pins -= 1
        else:
            self.gpu.unpin(key)

    def _unpin_all(self, keys: list[int]) -> None:
        """`_unpin` each of `keys` in order (the end of a layer: one call, not one per key; the
        tier's unpins in one tier call)."""
        stale_pins, loads = self.stale_pins, self.loads
        tier: list[int] = []
        for key in keys:
            if stale_pins:  # (_unpin's first case, inlined: one call per layer, not one per key)
                stale = stale_pins.get(key)
                if stale:
                    if stale == 1:
                        del stale_pins[key]
                    else:
                        stale_pins[key] = stale - 1
                    continue
            load = loads.get(key)
            if load is not None and not load.reserved:
                load.pins -= 1
            else:
                tier.append(key)
        self.gpu.unpin_all(tier)

    def _forget_pins(self, load) -> None:
        """A load that never got a slot took its waiting pins with it."""
        if load.pins:
            self.stale_pins[load.key] = self.stale_pins.get(load.key, 0) + load.pins
            load.pins = 0

    def _evicted(self, keys: list[int]) -> None:
        """Count evictions; an evicted prefetch that was never used is wasted."""
        for k in keys:
            if k in self.prefetched_unused:
                self.prefetched_unused.discard(k)
                self.rec.prefetch_wasted += 1
        self.rec.gpu_evictions += len(keys)

    def _protect(self, key: int, target: tuple[int, int]) -> None:
        """Pin a predicted expert until its target layer has run (see _release)."""
        self._pin(key)
        self.protected.setdefault(target, []).append(key)

    def _layer_done(self, step: int, layer: int, pinned: list[int]) -> None:
        """After a layer ran: unpin its experts and release protections targeting it or earlier."""
        if self.loads.keys().isdisjoint(pinned) and self.stale_pins.keys().isdisjoint(pinned):
            self.gpu.unpin_all(pinned)  # (its loads have landed: _unpin_all would hand the tier every key)
        else:
            self._unpin_all(pinned)
        if self.protected:
            self._release((step, layer))

    def _release(self, upto: tuple[int, int] | None) -> None:
        """Unpin protections whose target layer is at or before `upto` (None: all)."""
        for target in [t for t in self.protected if upto is None or t <= upto]:
            self._unpin_all(self.protected.pop(target))
