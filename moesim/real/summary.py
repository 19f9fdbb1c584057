"""The summary of a real run: the simulator's summary of the recorded steps, plus a `real` section
describing how it was run (device, dtype, threads, what each tier is, how the disk was read)."""
from __future__ import annotations

import os

from ..version import __version__
from .store import cached_fraction
from .torchutil import device_description

TIER_ROLES = {
    "cpu": {"gpu": "bounded expert cache in RAM that the CPU computes from (the scenario's gpu tier)",
            "dram": "host staging buffers in RAM filled from the expert file (the scenario's dram tier)",
            "pcie": "host memcpy from a host buffer into the RAM expert cache",
            "disk": "reads of the expert file with the page cache bypassed"},
    "cuda": {"gpu": "expert cache in GPU memory (the scenario's gpu tier)",
             "dram": "pinned host buffers filled from the expert file (the scenario's dram tier)",
             "pcie": "host-to-device copy on a dedicated CUDA stream",
             "disk": "reads of the expert file with the page cache bypassed"},
}

IO_NOTES = {"odirect": "O_DIRECT reads into page-aligned buffers: the page cache is bypassed",
            "fadvise": "posix_fadvise(DONTNEED) before and after each read: the page cache "
                       "is dropped for the range, so each read goes to the device",
            "buffered": "plain buffered reads: NOT bypassing the page cache"}


def loadavg() -> float | None:
    """The machine's 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def real_section(ex, load_before: float | None, scaling: dict | None) -> dict:
    """The summary's `real` section for a finished RealExecutor `ex`."""
    s = ex.shapes
    size = os.path.getsize(ex.path)
    sample = min(s.slot_bytes * 4, size)
    return {
        "device": device_description(ex.device),
        "dtype": ex.dtype_name,
        "torch_threads": ex.threads,
        "roles": TIER_ROLES["cuda" if ex.cuda else "cpu"],
        "expert_file": {"path": str(ex.path), "bytes": size, "slot_bytes": s.slot_bytes,
                        "expert_bytes_in_dtype": s.expert_nbytes},
        "io": {"method": ex.reader.method,
               "page_cache_after_run": cached_fraction(ex.path, 0, sample),
               "note": IO_NOTES[ex.reader.method]},
        "channels": {"pcie": ex.pcie.slots, "disk": ex.disk.slots},
        "transient_buffers": {"staging": ex.staging.allocated, "bypass": ex.dev_pool.allocated},
        "setup_s": ex.setup_s,
        "load_average": {"before": load_before, "after": loadavg(), "cores": os.cpu_count(),
                         "note": "1-minute load average of the machine: other processes compete for the cores"},
        "scaling": scaling or {},
    }


def run_summary(sc, rec, ex, info: dict) -> dict:
    """summary.json of a real run: the simulator's keys, then how it was timed and run."""
    from ..engine.run import scenario_echo

    slo = getattr(sc.batch, "slo", None)
    figures = rec.summary(ex.decode_tokens, slo) if slo is not None else rec.summary(ex.decode_tokens)
    return {"moesim_version": __version__, "scenario": scenario_echo(sc), **figures,
            "timing_source": {"expert_compute": "real", "attention": "real"},
            "expert_bytes": sc.model.expert_bytes,
            "gpu_cache_experts": ex.gpu_capacity,
            "mode": "real",
            "real": info}
