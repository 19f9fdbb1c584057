"""Write-back of evicted experts (runtime `evict_writeback`, issue 15).

A stack that keeps each expert in exactly one place (GPU or host, as mixtral-offloading's
`ExpertCache._swap` does) copies the expert it evicts back to host memory for every load that
evicts: `same_stream` queues that device-to-host copy right after the load's own copy on the slot
that ran it (one CUDA stream runs them in order, ahead of copies queued later); `d2h_stream` runs it
on the profile's `pcie_d2h` link while the load's copy runs (a second stream, the other copy engine:
full duplex). Either way the load lands when its copy and its write-backs have all finished. A
demand load that finds no evictable slot (every resident expert pinned by its layer: moesim copies
it through a transient buffer, not cached) writes one expert back too: the stack swaps every load
into a full cache, so each of its copies in has a copy out.
"""
from __future__ import annotations

from .channels import DEMAND, Channel, Transfer
from ..hardware.costs import transfer_s


class WriteBack:
    """Wraps a Simulation's PCIe callbacks so each load's evictions are copied back to the host."""

    def __init__(self, sim, mode: str):
        self.sim, self.mode, self.eb = sim, mode, sim.eb
        if mode == "same_stream":
            self.channel = sim.pcie
        elif sim.cpu is not None:  # miss: cpu already runs the D2H link: share it
            self.channel = sim.cpu.d2h
        else:
            d2h = sim.cost.hw.pcie_d2h
            self.channel = Channel(sim.env, "pcie_d2h", d2h.copy_engines,
                                   lambda b: transfer_s(b, d2h.bandwidth_gbps, d2h.latency_us), None, sim.events_log)
        self.copies = 0
        self.busy_s = 0.0
        self.parts: dict = {}     # load -> copies of its swap still running (its own + write-backs)
        self._owed: dict = {}     # load -> keys it evicted, written back after its copy (same_stream)
        self._keys: list = []     # keys the eviction hook saw during the current slot claim
        claim, self._done = sim._claim_slot, sim._pcie_done
        sim._evicted = self._evicted_hook(sim._evicted)  # this simulation only: see the evictions
        cb = sim._callbacks()
        sim._cb = (self._pcie_done, self._claim(claim), *cb[2:])

    def _evicted_hook(self, evicted):
        def hook(keys):
            self._keys.extend(keys)
            evicted(keys)
        return hook

    def _claim(self, claim):
        def claim_slot(load) -> bool:
            self._keys = []
            ok = claim(load)
            keys, self._keys = self._keys, []
            if ok and not keys and load.bypass:  # no evictable slot: the stack swaps it in all the same,
                keys = [load.key]                # and writes an expert back (this one, once used)
            if ok and keys:
                self.parts[load] = 1 + len(keys)
                if self.mode == "same_stream":
                    self._owed[load] = keys
                else:
                    for key in keys:
                        self.channel.submit(self._transfer(key, load))
            return ok
        return claim_slot

    def _transfer(self, key: int, load) -> Transfer:
        return Transfer(key, self.eb, DEMAND, self._written, load=load)

    def _pcie_done(self, load) -> None:
        """The load's own copy ended: same_stream puts its write-backs first on the freed slot."""
        keys = self._owed.pop(load, None)
        if keys:
            queue, now = self.channel.queues[DEMAND], self.sim.env.now
            for key in reversed(keys):  # the channel dispatches after this callback returns
                t = self._transfer(key, load)
                t.queued_at = now
                queue.appendleft(t)
        self._part_done(load)

    def _written(self, t: Transfer) -> None:
        self.copies += 1
        self.busy_s += t.end - t.start
        self._part_done(t.load)

    def _part_done(self, load) -> None:
        left = self.parts.get(load)
        if left is None:
            self._done(load)
        elif left == 1:
            del self.parts[load]
            self._done(load)
        else:
            self.parts[load] = left - 1

    def summary(self) -> dict:
        return {"mode": self.mode, "link": self.channel.name, "copies": self.copies,
                "bytes": self.copies * self.eb, "busy_s": self.busy_s}
