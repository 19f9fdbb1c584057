"""CPU execution of a missing expert (issue 17: `miss: cpu | auto`), as Fiddler, kTransformers and
llama.cpp's CPU offload do it: the expert's input activations cross the link device->host, the
host CPU computes the expert from host memory, and its output crosses back host->device.

The host CPU is a resource with `workers` expert kernels running at once (its cores divided by
the cores one kernel uses; a runtime host thread holds one core, and a kernel left fewer cores
than it was timed with runs proportionally longer). Jobs start in the
order their activations arrive, on the worker free first, so the CPU's queue is a list of
free-at times. `auto` compares, per expert, when a copy would land and be computed on the GPU
with when the CPU path would return, given what both links and the CPU already have queued.
"""
from __future__ import annotations

from functools import lru_cache

from ..errors import InputError
from .channels import DEMAND, Channel, Transfer
from ..hardware.costs import _interp_ms, transfer_s
from ..models import ModelSpec

DTYPES = {2.0: "bfloat16", 4.0: "float32"}  # expert bytes per parameter -> the table's dtype name


class CpuJob:
    """A missing expert computed on the host: quacks like a Load for the driver's pending list."""

    __slots__ = ("key", "tokens", "done_t", "waiters", "bypass", "prefetch")

    def __init__(self, key: int, tokens: int):
        self.key, self.tokens = key, tokens
        self.done_t = -1.0
        self.waiters: list = []
        self.bypass, self.prefetch = True, False


def cpu_expert_s(model: ModelSpec, host_cpu, tokens: int) -> float:
    """One routed expert's FFN over `tokens` tokens on the host CPU: the measured table for the
    experts' dtype when it applies to this model, else the roofline max(FLOPs/peak, bytes/bandwidth)."""
    bpp = model.component_bytes_per_param("experts")
    dtype = DTYPES.get(float(bpp))
    tables = host_cpu.expert_ms or {}
    if dtype in tables and (host_cpu.model is None or host_cpu.model == model.name):
        return _interp_ms(tables[dtype], tokens) * 1e-3
    if host_cpu.peak_tflops is None or host_cpu.memory_bandwidth_gbps is None:
        have = ", ".join(sorted(tables)) or "none"
        raise InputError(f"no CPU expert time for {model.name} experts at {bpp:g} bytes/param: the measured "
                         f"tables ({have}{'' if host_cpu.model is None else ' for ' + host_cpu.model}) do not "
                         "apply and there is no roofline (peak_tflops, memory_bandwidth_gbps)",
                         field="hardware.host_cpu")
    p = model.expert_params
    return max(2.0 * tokens * p / (host_cpu.peak_tflops * 1e12), p * bpp / (host_cpu.memory_bandwidth_gbps * 1e9))


class CpuExecutor:
    """Runs CPU jobs over the D2H link, the CPU workers and the H2D link; decides `auto` misses."""

    def __init__(self, sim, mode: str, host_thread: bool):
        hw, self.sim, self.mode = sim.cost.hw, sim, mode
        cpu, d2h = hw.host_cpu, hw.pcie_d2h
        usable = max(1, cpu.cores - (1 if host_thread else 0))  # a runtime's host thread holds one core
        self.workers = max(1, usable // cpu.threads_per_expert)
        # fewer cores than a kernel was measured/rated with: it runs proportionally longer
        self.slowdown = max(1.0, cpu.threads_per_expert / usable)
        self.free_at = [0.0] * self.workers   # when each worker finishes the jobs it has started
        self.planned = [0.0] * self.workers   # ... and the jobs still on their way to it (for auto)
        self.act_bytes_per_token = sim.model.hidden_size * 2  # one bf16 hidden state
        self.d2h = Channel(sim.env, "pcie_d2h", d2h.copy_engines,
                           lambda b: transfer_s(b, d2h.bandwidth_gbps, d2h.latency_us), None, sim.events_log)
        self.compute_s = lru_cache(maxsize=None)(lambda n: cpu_expert_s(sim.model, cpu, n) * self.slowdown)
        self.compute_s(1)  # a profile that cannot time the CPU fails before the run
        self.experts = self.tokens = self.h2d_transfers = 0
        self.busy_s = self.h2d_bytes = 0.0
        self._acts: dict[str, list[Transfer]] = {"pcie": [], "pcie_d2h": [], "disk": []}  # activation copies

    # ---- the CPU path ------------------------------------------------------------------------

    def submit(self, key: int, tokens: int) -> CpuJob:
        """Send `tokens` activations of expert `key` to the host; the job lands when they are back."""
        job = CpuJob(key, tokens)
        self.experts += 1
        self.tokens += tokens
        nbytes = tokens * self.act_bytes_per_token
        i = min(range(self.workers), key=self.planned.__getitem__)
        self.planned[i] = max(self._d2h_end(nbytes), self.planned[i]) + self.compute_s(tokens)
        self._send(self.d2h, Transfer(key, nbytes, DEMAND, lambda _t, j=job: self._on_host(j)))
        return job

    def _on_host(self, job: CpuJob) -> None:
        env = self.sim.env
        i = min(range(self.workers), key=self.free_at.__getitem__)
        start = max(env.now, self.free_at[i])
        c = self.compute_s(job.tokens)
        self.free_at[i] = start + c
        self.busy_s += c
        if self.sim.events_log is not None:
            self.sim.events_log.append(("host_cpu", job.key, DEMAND, start, start + c))
        ev = env.timeout(start + c - env.now)
        ev.callbacks.append(lambda _e, j=job: self._back(j))

    def _back(self, job: CpuJob) -> None:
        nbytes = job.tokens * self.act_bytes_per_token
        self.h2d_transfers += 1
        self.h2d_bytes += nbytes
        self._send(self.sim.pcie, Transfer(job.key, nbytes, DEMAND, lambda _t, j=job: self._landed(j)))

    def _send(self, channel, t: Transfer) -> None:
        self._acts[channel.name].append(t)
        channel.submit(t)

    def _landed(self, job: CpuJob) -> None:
        job.done_t = self.sim.env.now
        for w in job.waiters:
            w()

    # ---- auto: which path finishes first -----------------------------------------------------

    def prefers_cpu(self, key: int, tokens: int, gpu_compute_s: float) -> bool:
        """`cpu`: always; `auto`: when the CPU path returns before a demand copy would land and be
        computed, given the links' and the CPU's queues now."""
        if self.mode == "cpu":
            return True
        sim, now = self.sim, self.sim.env.now
        nbytes = tokens * self.act_bytes_per_token
        cpu_end = max(self._d2h_end(nbytes), min(self.planned)) + self.compute_s(tokens)
        pcie_free = _link_free(sim.pcie, now, self._inflight(sim.pcie))
        cpu_done = max(cpu_end, pcie_free) + sim.pcie.duration_s(nbytes)
        copy_start = pcie_free
        if sim.dram is not None and not sim.dram.is_ready(key):  # the copy reads the disk first
            copy_start = max(copy_start, _link_free(sim.disk, now, self._inflight(sim.disk))
                             + sim.disk.duration_s(sim.eb))
        wait_done = copy_start + sim.pcie.duration_s(sim.eb) + gpu_compute_s
        return cpu_done < wait_done

    def _d2h_end(self, nbytes: int) -> float:
        """When activations of `nbytes` sent now would reach the host."""
        return _link_free(self.d2h, self.sim.env.now, self._inflight(self.d2h)) + self.d2h.duration_s(nbytes)

    def _inflight(self, channel) -> list[float]:
        """End times of the copies `channel` is carrying now (expert loads and activations)."""
        now = self.sim.env.now
        mine = self._acts[channel.name] = [t for t in self._acts[channel.name] if t.start < 0 or t.end > now]
        ends = [t.end for t in mine if t.start >= 0]
        ends += [ld.transfer.end for ld in self.sim.loads.values()
                 if ld.channel is channel and ld.transfer is not None and ld.transfer.start >= 0
                 and ld.transfer.end > now]
        return ends

    def summary(self, makespan: float) -> dict:
        d2h = self.d2h
        return {"cpu_experts": self.experts, "cpu_tokens": self.tokens, "cpu_workers": self.workers,
                "cpu_busy_s": self.busy_s,
                "cpu_utilization": self.busy_s / (makespan * self.workers) if makespan > 0 else None,
                "activation_bytes_d2h": d2h.bytes, "activation_bytes_h2d": self.h2d_bytes,
                "activation_transfers_h2d": self.h2d_transfers,
                "d2h_utilization": d2h.busy_time / (makespan * d2h.slots) if makespan > 0 else None}


def _link_free(channel, now: float, inflight_ends: list[float]) -> float:
    """When a new demand copy on `channel` would start: the slots' in-flight copies end, then the
    demand copies already queued run on whichever slot frees first (prefetches wait behind)."""
    slots = sorted(inflight_ends + [now] * max(0, channel.slots - len(inflight_ends)))[:channel.slots]
    for t in channel.queues[DEMAND]:
        slots[0] += channel.duration_s(t.nbytes)
        slots.sort()
    return slots[0]
