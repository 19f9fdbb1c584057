"""The host thread of a runtime (issue 15): one serial resource beside the GPU stream and the links.

The host runs the stack's program in order (per-step set-up, per-layer Python work, router
readback, one dispatch per expert kernel). Kernel launches are asynchronous: the host issues a
kernel and goes on; the GPU stream runs it when both the stream and the issue are done. A
blocking readback makes the host wait until the GPU reaches the gate. The resource is a clock
(`free_at`) the engine's driver advances in the host's program order, and the driver yields SimPy
time whenever the GPU or a load has to wait for the host.
"""
from __future__ import annotations

from ..hardware.runtime import RuntimeCosts


class HostThread:
    """The host's single thread: when it is next free, and how long it has worked or waited."""

    def __init__(self, rt: RuntimeCosts):
        self.rt = rt
        self.step_s = rt.step_host_us * 1e-6
        self.layer_s = rt.layer_host_us * 1e-6
        self.readback_s = rt.readback_us * 1e-6
        self.dispatch_s = rt.expert_dispatch_us * 1e-6
        # the host gates each expert kernel (or a copy slows them): the engine times them one by one
        self.paces_kernels = self.dispatch_s > 0 or rt.blocking_loads or rt.synchronous_compute or \
            rt.copy_slowdown != 1.0
        self.free_at = 0.0
        self.busy_s = 0.0       # host work charged (set-up, layer work, readbacks, dispatches)
        self.sync_wait_s = 0.0  # host blocked on the GPU or a load (readbacks, blocking loads, end of step)
        self.gpu_wait_s = 0.0   # GPU stream idle, waiting for the host to issue its next kernel

    def work(self, seconds: float, not_before: float = 0.0) -> float:
        """Do `seconds` of host work starting when the host is free (and not before `not_before`);
        returns when it ends."""
        if not_before > self.free_at:
            self.sync_wait_s += not_before - self.free_at
        self.free_at = max(self.free_at, not_before) + seconds
        self.busy_s += seconds
        return self.free_at

    def sync(self, t: float) -> float:
        """The host blocks until the GPU reaches time `t` (a stream synchronisation)."""
        if t > self.free_at:
            self.sync_wait_s += t - self.free_at
            self.free_at = t
        return self.free_at

    def routing_known(self, gate_t: float) -> float:
        """When the loads of a layer whose gate finished at `gate_t` on the GPU can be issued: after a
        blocking readback the host holds them back until it has synced and read the routing;
        otherwise they follow the gate after `readback_us` and the host does not wait."""
        if self.rt.blocking_readback or self.rt.synchronous_compute:
            self.sync(gate_t)
            return self.work(self.readback_s)
        return gate_t + self.readback_s

    def summary(self) -> dict:
        return {"busy_s": self.busy_s, "sync_wait_s": self.sync_wait_s, "gpu_wait_on_host_s": self.gpu_wait_s}
