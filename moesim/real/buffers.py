"""Host and device memory of the real executor: page-aligned (pinned) host buffers, a pool of
transient buffers, the compute device's expert slots, and a load with the buffers it uses."""
from __future__ import annotations

import numpy as np

from ..engine.loads import Load
from .kernels import Shapes, expert_views
from .store import aligned_buffer
from .torchutil import require_torch


class HostBuf:
    """Host memory for one expert: a numpy uint8 view (for reads) and a torch view (for copies)."""

    __slots__ = ("np", "t")

    def __init__(self, arr: np.ndarray, t):
        self.np, self.t = arr, t


def host_block(n: int, nbytes: int, pinned: bool) -> list[HostBuf]:
    """`n` page-aligned host buffers of `nbytes` (pinned memory when `pinned`)."""
    torch = require_torch()
    if n == 0:
        return []
    if pinned:
        raw = torch.empty(n * nbytes + 4096, dtype=torch.uint8, pin_memory=True)
        off = (-raw.data_ptr()) % 4096
        big_t = raw[off: off + n * nbytes]
        big = big_t.numpy()
    else:
        big = aligned_buffer(n * nbytes)
        big_t = torch.from_numpy(big)
    return [HostBuf(big[i * nbytes:(i + 1) * nbytes], big_t[i * nbytes:(i + 1) * nbytes]) for i in range(n)]


class Pool:
    """Transient buffers (staging reads or bypass copies), grown on demand and reused."""

    def __init__(self, make):
        self._make, self._free = make, []
        self.allocated = 0

    def get(self):
        if self._free:
            return self._free.pop()
        self.allocated += 1
        return self._make()

    def put(self, b) -> None:
        self._free.append(b)


class DevSlots:
    """The compute device's expert slots: flat uint8 tensors and their (w1, w3, w2) views."""

    def __init__(self, n: int, shapes: Shapes, dtype, device: str):
        torch = require_torch()
        self.shapes, self.dtype, self.device = shapes, dtype, device
        self.cuda = device.startswith("cuda")
        nb = shapes.slot_bytes
        if self.cuda:
            self.flat = [torch.zeros(nb, dtype=torch.uint8, device=device) for _ in range(n)] if n else []
            self.np = [None] * n
        else:
            hb = host_block(n, nb, pinned=False)
            self.flat = [b.t for b in hb]
            self.np = [b.np for b in hb]
        self.views = [expert_views(f, shapes, dtype) for f in self.flat]

    def make_one(self):
        """A transient slot (for bypass copies): (flat tensor, numpy view or None, views)."""
        torch = require_torch()
        nb = self.shapes.slot_bytes
        if self.cuda:
            f = torch.zeros(nb, dtype=torch.uint8, device=self.device)
            a = None
        else:
            a = aligned_buffer(nb)
            f = torch.from_numpy(a)
        return f, a, expert_views(f, self.shapes, self.dtype)


class BufferedLoad(Load):
    """A load of engine.loads with the buffers it reads from and lands in. `waiters`: the main
    thread's accesses waiting on it (a count; they poll `done_t`)."""

    __slots__ = (
        "dev",
        "dev_dst",
        "dev_transient",
        "src",
        "staging",
    )

    def __init__(self, key: int, prefetch: bool, target: tuple[int, int], bypass: bool):
        super().__init__(key, prefetch, target, bypass)
        self.waiters = 0
        self.src: HostBuf | None = None      # where the link copy reads from
        self.staging: HostBuf | None = None  # transient host buffer to give back after the link copy
        self.dev = None                      # views of the device buffer the expert lands in
        self.dev_dst = None                  # (flat tensor, numpy view or None) of that buffer
        self.dev_transient = None            # a bypass copy's transient device slot
