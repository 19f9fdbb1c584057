"""`moesim profile`: measure this machine into a hardware profile with `measured` tables.

What is measured (medians over repeated calls after warm-up; spread = p10..p90):

* expert FFN time by tokens per expert (log-spaced, 1 … 4096) for the chosen model's expert shape and
  dtype, with the exact code the real executor runs (gather the routed rows, SwiGLU/ReLU MLP,
  weighted scatter-add), cycling through a pool of distinct experts larger than the caches so the
  weights come from memory, as a just-loaded or cached expert's do;
* attention block time by new tokens (norm, QKV, SDPA, O, residual, norm): up to 16 tokens a
  decode step of that many sequences at `--context` cached positions each, above one causal
  sequence of that many tokens (a prefill); and, for the record, a decode grid (batch × context);
  distinct attention blocks are cycled, as a model's layers are, so weights come from memory;
* large-GEMM throughput, GEMV weight-streaming bandwidth and per-op overhead (the roofline numbers
  the simulator uses for what the tables do not cover: LM head, shared experts, dense blocks);
* disk reads of 64 KiB … 64 MiB blocks (and one expert's size) with the page cache bypassed
  (O_DIRECT, else posix_fadvise DONTNEED), verified with mincore and against a cached read;
  the profile's latency is a least-squares intercept over all sizes and its bandwidth is chosen so
  that latency + expert_bytes / bandwidth equals the measured read of one expert (the simulator
  only ever moves experts, and the two-number model does not fit every size of this device);
* the link: on CUDA, pinned and pageable host-to-device copies of 64 KiB … 1 GiB with 1 and 2
  concurrent streams; on a CPU-only machine, host memcpy (np.copyto, what the real executor uses
  to move an expert from a host buffer into the RAM expert cache).

The compute tables are timed by profile_tables.py, the disk and the link by profile_io.py; this
module runs them and writes the YAML, which validates against moesim.hardware.profile; everything
else (every point with its spread, fits, verification, versions) goes to NAME.measurements.json
beside it.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import yaml

from ..hardware.profile import profile_from_dict
from ..models import ModelSpec
from .profile_io import measure_disk, measure_link_cpu, measure_link_cuda
from .profile_tables import DECODE_SHAPE_MAX, KiB, MiB, Profiler

__all__ = ["DECODE_SHAPE_MAX", "ProfileResult", "Profiler", "run_profile"]


def _sig(x: float, n: int = 4) -> float:
    if x == 0 or not math.isfinite(x):
        return float(x)
    return float(f"{x:.{n}g}")


@dataclass
class ProfileResult:
    profile: dict
    measurements: dict
    path: Path
    sidecar: Path
    lines: list[str] = field(default_factory=list)

    def summary_text(self) -> str:
        return "\n".join(self.lines)


def _token_points(quick: bool, top: int = 4096) -> list[int]:
    if quick:
        pts = [1, 4, 16, 64, 256, 1024, 4096]
    else:
        pts = [2 ** i for i in range(13)]
    return [p for p in pts if p <= top]


def run_profile(spec: ModelSpec, out: Path, *, scale: float = 1.0, device: str = "auto", dtype: str = "bfloat16",
                threads: int | None = None, quick: bool = False, disk_dir=None, io: str = "auto",
                name: str | None = None, context: int = 128, log=lambda m: None) -> ProfileResult:
    """Measure, write `out` (YAML) and `out` with .measurements.json, return both."""
    from .scale import scaled_model
    from .torchutil import DTYPES

    t_start = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    model = scaled_model(spec, scale, None, float(DTYPES[dtype]))
    p = Profiler(model, device, dtype, threads, quick, log)
    r = _describe(p, model, dtype, quick, context)
    log(f"profiling {r.dev_words}, {model.name}, {dtype}, {p.threads} torch threads{' (quick)' if quick else ''}")
    _measure(r, Path(disk_dir) if disk_dir else (out.parent if str(out.parent) else Path(".")), io, log)
    r.disk["expert_read_contexts"] = _expert_read_contexts(r)
    prof = _profile_doc(r, name or out.stem)
    from .cpu_profile import measure_host_cpu

    log("host CPU as an expert executor ...")
    prof["host_cpu"], host_meas = measure_host_cpu(spec, scale, None if p.cuda else p.threads, quick, log=log)
    hp = profile_from_dict(prof, file=str(out))  # must validate
    sidecar = out.with_name(out.stem + ".measurements.json")
    meas = _measurements(r, out, host_meas)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"# {h}\n" for h in _header(r, spec, scale, sidecar)) + yaml.safe_dump(
        hp.model_dump(mode="json", exclude_none=True), sort_keys=False, width=100)
    out.write_text(text)
    meas["moesim_profile_seconds"] = time.perf_counter() - t_start
    meas["load_average"] = {"before": load_before, "after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                            "cores": os.cpu_count()}
    from .runtime_profiler import runtime_doc

    rt_path = out.with_name(out.stem + ".runtime.yaml")
    rt_doc = runtime_doc(r.rt_meas, r.by, f"{name or out.stem}-runtime", p.cuda)
    rt_path.write_text(_runtime_text(rt_doc, rt_path, out, sidecar))
    meas["runtime"] = {"file": str(rt_path), **{k: v for k, v in r.rt_meas.items() if k != "attention_grid"}}
    sidecar.write_text(json.dumps(meas, indent=1, default=float) + "\n")
    return ProfileResult(prof, meas, out, sidecar, _summary_lines(r, rt_doc, rt_path, meas))


def _describe(p: Profiler, model: ModelSpec, dtype: str, quick: bool, context: int) -> SimpleNamespace:
    """The run's description: the device and versions in words, and the `by` every source starts with."""
    from .torchutil import device_description

    desc = device_description(p.device)
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    dev_words = (f"{desc['gpu']} (CUDA {desc.get('cuda')}, driver {desc.get('driver')})" if p.cuda
                 else f"CPU {desc['host_cpu']}, {p.threads} of {desc['host_cores']} cores computing")
    versions = f"torch {desc['torch']}, numpy {desc['numpy']}, Python {desc['python']}, {desc['os']}"
    by = f"measured by moesim profile {when} on {dev_words} ({versions})"
    return SimpleNamespace(p=p, model=model, dtype=dtype, quick=quick, context=context, desc=desc, when=when,
                           dev_words=dev_words, versions=versions, by=by)


def _measure(r: SimpleNamespace, ddir: Path, io: str, log) -> None:
    """Every measurement, into `r`: the tables, the roofline numbers, the runtime, the disk, the link."""
    p, quick = r.p, r.quick
    with p.torch.inference_mode():
        log("expert FFN table ...")
        r.tok = _token_points(quick)
        r.exp = p.expert_table(r.tok)
        log("attention table ...")
        r.atok = _token_points(quick, 1024 if quick else 2048)
        r.att = p.attention_table(r.atok, r.context)
        r.grid = p.attention_decode_grid([1, 8] if quick else [1, 8, 32],
                                         [128, 512] if quick else [128, 512, 2048])
        log("GEMM / GEMV / per-op overhead ...")
        r.roof = p.roofline_numbers()
    from .runtime_profiler import measure_runtime

    r.rt_meas = measure_runtime(p, r.grid, log, disk_dir=ddir, io=io)
    log("disk reads ...")
    r.disk = measure_disk(p, ddir, r.model.expert_bytes, io)
    log("link ...")
    r.link = measure_link_cuda(p, r.model.expert_bytes) if p.cuda else measure_link_cpu(p, r.model.expert_bytes)


def _profile_doc(r: SimpleNamespace, name: str) -> dict:
    """The hardware profile (a dict that validates against moesim.hardware.profile), every number sourced."""
    from .torchutil import host_memory_bytes

    p, desc = r.p, r.desc
    prof = {
        "name": name,
        "description": (f"Measured by moesim profile on this machine ({r.when}). Compute device: "
                        + (f"{desc['gpu']}." if p.cuda else
                           f"the CPU ({desc['host_cpu']}, {p.threads} torch threads, {r.dtype}); the 'gpu' section "
                           "describes the CPU computing from RAM, 'pcie_h2d' the host memcpy that moves an expert "
                           "into the RAM expert cache, 'disk' page-cache-bypassing reads of the expert file.")
                        + f" Tables for model {r.model.name} in {r.dtype}. {r.versions}."),
        "gpu": _gpu_section(r),
        "pcie_h2d": _link_section(r),
        "disk": _disk_section(r),
        "host_dram": {"capacity_gb": _sig(host_memory_bytes() / 1e9),
                      "source": {"capacity_gb": f"{r.by}: MemTotal of /proc/meminfo"}},
        "measured": _measured_section(r),
    }
    _optional_fields(prof, desc, r.dtype, p.threads, r.context, r.when, r.disk, r.link, p.cuda)
    return prof


def _gpu_section(r: SimpleNamespace) -> dict:
    from .torchutil import host_memory_bytes

    p, desc, by, dtype = r.p, r.desc, r.by, r.dtype
    gm, gv, go = r.roof["gemm"], r.roof["gemv"], r.roof["op_overhead"]
    gpu_mem = desc["gpu_memory_bytes"] if p.cuda else host_memory_bytes()
    gpu_name = (desc["gpu"] if p.cuda else
                f"CPU as the compute device: {desc['host_cpu']} ({p.threads} torch threads)")
    return {
        "name": gpu_name,
        "memory_gb": _sig(gpu_mem / 1e9),
        "hbm_bandwidth_gbps": _sig(gv["gbps"]),
        "peak_bf16_tflops": _sig(gm["tflops"]),
        "kernel_launch_us": _sig(go["us"]),
        "source": {
            "memory_gb": f"{by}: " + ("torch.cuda.get_device_properties().total_memory" if p.cuda else
                                      "MemTotal of /proc/meminfo (host RAM: the CPU's expert cache lives there)"),
            "hbm_bandwidth_gbps": f"{by}: effective weight-streaming bandwidth of a 1-token GEMV over a "
                                  f"{gv['bytes'] / MiB:.0f} MiB {dtype} matrix, {spread_d(gv)}",
            "peak_bf16_tflops": f"{by}: {gm['size']}^3 GEMM in {dtype} (not necessarily bf16: see dtype), "
                                f"{spread_d(gm)}",
            "kernel_launch_us": f"{by}: per-op cost of back-to-back tiny in-place adds "
                                f"({go['ops_per_sample']} per sample), {spread_d(go)}",
        },
    }


def _link_section(r: SimpleNamespace) -> dict:
    link, by = r.link, r.by
    fit_l = link["model"]
    copies = link.get("copies", [])
    copy_words = ", ".join(f"{c['bytes'] // KiB} KiB {c['median']:.3g} ms" for c in copies
                           if c.get("pinned", True) and c.get("streams", 1) == 1)
    return {
        "bandwidth_gbps": _sig(fit_l["bandwidth_gbps"]),
        "latency_us": _sig(max(fit_l["latency_us"], 0.0)),
        "copy_engines": 1,
        "source": {
            "bandwidth_gbps": f"{by}: {link['kind']}; medians {copy_words}"
                              + (" (pinned, 1 stream; pageable and 2-stream in the .measurements.json)"
                                 if r.p.cuda else "")
                              + f"; latency from a least-squares fit t = latency + bytes/bandwidth over all sizes "
                                f"(which gives {link['fit']['bandwidth_gbps']:.3g} GB/s), bandwidth chosen so "
                                f"that latency + bytes/bandwidth equals the measured median for one expert "
                                f"({fit_l['anchored_at_bytes']} bytes)",
            "latency_us": f"{by}: intercept of the least-squares fit",
            "copy_engines": "moesim replay --real moves experts with one copy thread (CPU) / one copy "
                            "stream (CUDA); the fit is for one copy at a time",
        },
    }


def _disk_section(r: SimpleNamespace) -> dict:
    disk, by = r.disk, r.by
    fit_d, ver, er = disk["model"], disk["verification"], disk["expert_read"]
    method_words = {"odirect": "O_DIRECT reads into page-aligned buffers",
                    "fadvise": "buffered reads with posix_fadvise(DONTNEED) before each",
                    "buffered": "buffered reads (page cache NOT bypassed)"}[disk["method"]]
    reads = ", ".join(f"{x['bytes'] // KiB} KiB {x['median']:.3g} ms" for x in disk["reads"])
    frac = ver["page_cache_fraction_after_bypassed_reads"]
    return {
        "name": f"{disk['device']}, {disk['filesystem']}",
        "read_bandwidth_gbps": _sig(fit_d["bandwidth_gbps"]),
        "latency_us": _sig(max(fit_d["latency_us"], 0.0)),
        "queue_depth": 1,
        "source": {
            "read_bandwidth_gbps": f"{by}: {method_words} at random aligned offsets of a "
                                   f"{disk['file_bytes'] // MiB} MiB file in {disk['dir']}, medians {reads}; "
                                   f"latency from a least-squares fit over all sizes (which gives "
                                   f"{disk['fit']['bandwidth_gbps']:.3g} GB/s), bandwidth chosen so that latency + "
                                   f"bytes/bandwidth equals the median of "
                                   f"{er['n']} expert-sized reads ({fit_d['anchored_at_bytes']} bytes, "
                                   f"back to back at random offsets: {er['median']:.3g} ms, p10-p90 "
                                   f"{er['p10']:.3g}-{er['p90']:.3g}); page cache "
                                   f"after the reads: "
                                   f"{'?' if frac is None else format(frac, '.1%')}"
                                   f" (mincore), a cached read of the same size takes {ver['cached_read_ms']:.3g} ms; "
                                   f"the same read elsewhere in this profile (medians): "
                                   f"{_contexts_words(disk['expert_read_contexts'])}",
            "latency_us": f"{by}: intercept of the least-squares fit",
            "queue_depth": "one read outstanding at a time: moesim replay --real reads with one thread",
            "idle_read_extra": _idle_source(by, disk["idle_reads"]),
        },
        "idle_read_extra": {"idle_ms": [g["idle_ms"] for g in disk["idle_reads"]["gaps"]],
                            "extra_us": [_sig(max(g["extra_us"], 0.0), 3) for g in disk["idle_reads"]["gaps"]]},
    }


def _expert_read_contexts(r: SimpleNamespace) -> dict[str, float]:
    """The median ms of each set of expert-sized reads this profile made. On virtio disks they
    differed by up to 2x within a minute (benchmarks/gpu/README.md), and a disk-bound simulation
    inherits that spread: the profile says so beside the one it is anchored at."""
    d = r.disk
    out = {"back to back": d["expert_read"]["median"]}
    if d["expert_read_in_sweep"]["bytes"] == d["expert_read"]["bytes"]:
        out["in the size sweep"] = d["expert_read_in_sweep"]["median"]
    out["interleaved with idle gaps, back to back"] = d["idle_reads"]["back_to_back"]["median"]
    ls = (getattr(r, "rt_meas", None) or {}).get("load_slowdown")
    if ls:
        out["loader thread, alone"] = ls["alone"]["read"]["median"]
    return out


def _contexts_words(ctx: dict[str, float]) -> str:
    return (", ".join(f"{k} {v:.3g} ms" for k, v in ctx.items())
            + f" (max/min {max(ctx.values()) / min(ctx.values()):.2f}x)")


def _idle_source(by: str, idle: dict) -> str:
    """The source of `disk.idle_read_extra`: how it was measured and every case's numbers."""
    b = idle["back_to_back"]
    gaps = "; ".join(f"{g['idle_ms']:g} ms idle: {g['median']:.3g} ms (p10-p90 {g['p10']:.3g}-{g['p90']:.3g}), "
                     f"extra {g['extra_us']:.3g} us" for g in idle["gaps"])
    return (f"{by}: {idle['bytes']}-byte reads at random offsets of the same file, back to back and after each "
            f"idle gap, in {idle['rounds']} interleaved rounds of {idle['reads_per_round']} per case; extra = the "
            f"median over rounds of (the round's median after the gap - its median back to back), negative "
            f"ones written as 0. Back to back {b['median']:.3g} ms (p10-p90 {b['p10']:.3g}-{b['p90']:.3g}); {gaps}")


def _measured_section(r: SimpleNamespace) -> dict:
    model, tok, atok, exp, att = r.model, r.tok, r.atok, r.exp, r.att
    return {
        "model": model.name,
        "expert_compute_ms": {"tokens": [float(t) for t in tok], "ms": [_sig(exp[t].median * 1e3) for t in tok]},
        "attention_ms": {"tokens": [float(t) for t in atok], "ms": [_sig(att[t].median * 1e3) for t in atok]},
        "source": (f"{r.by}; dtype {r.dtype}, {r.p.threads} torch threads. expert_compute_ms: one routed expert "
                   f"({model.hidden_size}x{model.expert_intermediate_size}, "
                   f"{'SwiGLU' if model.gated else 'ReLU MLP'}) over N tokens: gather, MLP, weighted "
                   f"scatter-add, weights cycled through a pool larger than the caches. attention_ms: one "
                   f"attention block (norm, QKV, SDPA, O, residual, norm): for N <= {DECODE_SHAPE_MAX} a decode "
                   f"step of N sequences with {r.context} cached positions each, above a prefill of one causal "
                   f"sequence of N tokens. Medians of warmed-up repeats, points sampled round-robin in random "
                   f"order; spread in the .measurements.json"),
    }


def _measurements(r: SimpleNamespace, out: Path, host_meas: dict) -> dict:
    """The sidecar's content: every point with its spread, fits, verification, versions."""
    tok, atok, exp, att = r.tok, r.atok, r.exp, r.att
    return {
        "profile": str(out), "when": r.when, "moesim_profile_seconds": None, "quick": r.quick,
        "model": r.model.model_dump(), "dtype": r.dtype, "threads": r.p.threads, "device": r.desc,
        "attention_context": r.context, "attention_decode_shape_max_tokens": DECODE_SHAPE_MAX,
        "expert_compute": [{"tokens": t, **exp[t].as_dict()} for t in tok],
        "attention": [{"tokens": t, **att[t].as_dict()} for t in atok],
        "attention_decode_grid": r.grid,
        "roofline": r.roof, "disk": r.disk, "link": r.link, "host_cpu": host_meas,
    }


def _header(r: SimpleNamespace, spec: ModelSpec, scale: float, sidecar: Path) -> list[str]:
    """The YAML's comment lines: the command, the device, the versions, the spread of the tables."""
    tok, atok, exp, att = r.tok, r.atok, r.exp, r.att
    return [(f"Hardware profile measured by `moesim profile{' --quick' if r.quick else ''} --model {spec.name}"
             f"{f' --scale {scale:g}' if scale != 1 else ''} --dtype {r.dtype} --context {r.context}` on {r.when}."),
            f"Device: {r.dev_words}.", f"Versions: {r.versions}.",
            f"Every point with its spread (p10/p90/min/max, n): {sidecar.name}.",
            "Units: *_gbps = 1e9 bytes/s, *_gb = 1e9 bytes, *_tflops = 1e12 FLOP/s, *_us microseconds.",
            "Spread (p90-p10)/median of the tables: expert "
            + ", ".join(f"{t}:{exp[t].spread():.0%}" for t in tok)
            + "; attention " + ", ".join(f"{t}:{att[t].spread():.0%}" for t in atok) + "."]


def _summary_lines(r: SimpleNamespace, rt_doc: dict, rt_path: Path, meas: dict) -> list[str]:
    """What `moesim profile` prints: one line per measurement."""
    gm, gv, go = r.roof["gemm"], r.roof["gemv"], r.roof["op_overhead"]
    disk, fit_d, fit_l = r.disk, r.disk["model"], r.link["model"]
    ver, er = disk["verification"], disk["expert_read"]
    return [
        f"device        {r.dev_words}; {r.dtype}, {r.p.threads} torch threads; model {r.model.name}",
        "expert FFN    " + "  ".join(f"{t}:{r.exp[t].median * 1e3:.3g}ms" for t in r.tok),
        "attention     " + "  ".join(f"{t}:{r.att[t].median * 1e3:.3g}ms" for t in r.atok),
        (f"GEMM          {gm['tflops']:.3g} TFLOP/s ({gm['size']}^3);  GEMV stream {gv['gbps']:.3g} GB/s;  "
         f"per-op {go['us']:.3g} us"),
        (f"disk          {disk['method']}: {fit_d['bandwidth_gbps']:.3g} GB/s + {fit_d['latency_us']:.3g} us; expert "
         f"read ({er['bytes'] / MiB:.2f} MiB) {er['median']:.3g} ms "
         f"(p10-p90 {er['p10']:.3g}-{er['p90']:.3g}); cached "
         f"{ver['cached_read_ms']:.3g} ms; bypass verified: {ver['bypass_works']}"),
        ("disk idle     " + "  ".join(f"{g['idle_ms']:g}ms:{g['extra_us']:+.0f}us" for g in disk["idle_reads"]["gaps"])
         + " (a read's extra time after that much disk idle)"),
        f"disk spread   one expert's read: {_contexts_words(disk['expert_read_contexts'])}",
        f"link          {r.link['kind']}: {fit_l['bandwidth_gbps']:.3g} GB/s + {fit_l['latency_us']:.3g} us",
        (f"runtime       step set-up {rt_doc['step_host_us']:.3g} us, layer bookkeeping {rt_doc['layer_host_us']:.3g} "
         f"us, readback {rt_doc['readback_us']:.3g} us, copy slowdown {rt_doc['copy_slowdown']:.3g}x, load slowdown "
         f"{rt_doc.get('load_slowdown', 1.0):.3g}x, dequant "
         + ", ".join(f"{k} {v:.3g} GB/s" for k, v in rt_doc['dequant_gbps'].items()) + f" -> {rt_path.name}"),
        f"took          {meas['moesim_profile_seconds']:.1f} s",
    ]


def _runtime_text(doc: dict, path: Path, profile: Path, sidecar: Path) -> str:
    """The runtime YAML's text (validated first), with a header naming its profile."""
    from ..hardware.runtime import runtime_from_dict

    rt = runtime_from_dict(doc, file=str(path))
    head = (f"# Runtime (software-stack) costs measured by moesim profile beside {profile.name}; every point's\n"
            f"# spread is in {sidecar.name} (key: runtime). Use it as a scenario's `runtime:`.\n")
    return head + yaml.safe_dump(rt.model_dump(mode="json", exclude_none=True), sort_keys=False, width=100)


def _optional_fields(prof: dict, desc: dict, dtype: str, threads: int, context: int, when: str, disk: dict,
                     link: dict, cuda: bool) -> None:
    """Fields proposed for moesim.hardware.profile (a `device` section; `measured.dtype`,
    `measured.threads`, `measured.attention_context`, and the size tables `measured.h2d_ms` and
    `measured.disk_read_ms` as {bytes: [...], ms: [...]}): written only where the schema has them,
    so the YAML always validates."""
    from ..hardware.profile import HardwareProfile, Measured

    hf, mf = HardwareProfile.model_fields, Measured.model_fields
    if "device" in hf:
        versions = {k: str(desc[k]) for k in ("torch", "numpy", "python", "os", "cuda", "driver", "cudnn")
                    if desc.get(k) is not None}
        prof["device"] = {"kind": "cuda" if cuda else "cpu", "name": desc["name"], "threads": threads,
                          "versions": versions, "measured_at": when}
    m = prof["measured"]
    for key, val in (("dtype", dtype), ("threads", threads), ("attention_context", context)):
        if key in mf:
            m[key] = val
    if "h2d_ms" in mf:
        rows = [c for c in link["copies"] if c.get("pinned", True) and c.get("streams", 1) == 1]
        m["h2d_ms"] = {"bytes": [float(c["bytes"]) for c in rows], "ms": [_sig(c["median"]) for c in rows]}
    if "disk_read_ms" in mf:
        pts = {r["bytes"]: r["median"] for r in disk["reads"]}
        pts[disk["expert_read"]["bytes"]] = disk["expert_read"]["median"]  # the replay-like measurement
        xs = sorted(pts)
        m["disk_read_ms"] = {"bytes": [float(x) for x in xs], "ms": [_sig(pts[x]) for x in xs]}


def spread_d(d: dict) -> str:
    return f"median of {d['n']} (p10-p90 {d['p10']:.4g}-{d['p90']:.4g} ms)"
