"""`moesim validate`: fast checks of the installed build against answers it did not compute —
closed-form timing on a profile whose tables fix every time, and cache replay against plain
reference implementations (and libcachesim when installed)."""
from __future__ import annotations

import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa

TINY_MODEL = dict(name="tiny", num_layers=4, num_experts=16, top_k=1, hidden_size=256,
                  expert_intermediate_size=512, gated=True, bytes_per_param=2.0,
                  num_heads=4, num_kv_heads=4, head_dim=64)


def fixed_profile(attn_ms=0.1, expert_ms=0.2, pcie_gbps=1.0, pcie_lat_us=10.0, disk_gbps=0.5,
                  disk_lat_us=100.0, copy_engines=1, queue_depth=1, launch_us=0.0) -> dict:
    """A hand-made profile whose measured tables make attention and expert compute constant."""
    def src(keys):
        return {k: "validation fixture" for k in keys}
    return {
        "name": "fixed", "description": "validation profile with fixed times",
        "gpu": {"name": "fixture", "memory_gb": 80, "hbm_bandwidth_gbps": 1000, "peak_bf16_tflops": 100,
                "kernel_launch_us": launch_us,
                "source": src(["memory_gb", "hbm_bandwidth_gbps", "peak_bf16_tflops", "kernel_launch_us"])},
        "pcie_h2d": {"bandwidth_gbps": pcie_gbps, "latency_us": pcie_lat_us, "copy_engines": copy_engines,
                     "source": src(["bandwidth_gbps", "latency_us", "copy_engines"])},
        "disk": {"name": "fixture", "read_bandwidth_gbps": disk_gbps, "latency_us": disk_lat_us,
                 "queue_depth": queue_depth, "source": src(["read_bandwidth_gbps", "latency_us", "queue_depth"])},
        "host_dram": {"capacity_gb": 512, "source": src(["capacity_gb"])},
        "measured": {"expert_compute_ms": {"tokens": [1, 100000], "ms": [expert_ms, expert_ms]},
                     "attention_ms": {"tokens": [1, 100000], "ms": [attn_ms, attn_ms]},
                     "source": "validation fixture"},
    }


def write_routing(path: Path, routing: np.ndarray, prompt_len: int, num_experts: int, model: str = "tiny") -> Path:
    """Write a trace from routing [requests, tokens, layers, top_k]; the first `prompt_len`
    tokens of each request are its prompt."""
    from .traces.io import write_trace
    from .traces.schema import TraceMeta

    R, T, L, K = routing.shape
    rid, tok, lay = np.meshgrid(np.arange(R), np.arange(T), np.arange(L), indexing="ij")
    phase = np.where(tok.ravel() < prompt_len, "prefill", "decode")
    table = pa.table({
        "request_id": pa.array(rid.ravel(), pa.int32()),
        "token": pa.array(tok.ravel(), pa.int32()),
        "phase": pa.array(phase).dictionary_encode(),
        "layer": pa.array(lay.ravel(), pa.int16()),
        "experts": pa.array(list(routing.reshape(-1, K).astype(np.int16)), pa.list_(pa.int16())),
    })
    meta = TraceMeta(model=model, num_layers=L, num_experts=num_experts, top_k=K, source="hand-made", seed=0)
    write_trace(path, table, meta)
    return path


def tiny_scenario(trace: Path, model=None, hardware=None, gpu=None, dram=None, predictor=None, batch=None, seed=0,
                  runtime=None):
    from .config import scenario_from_dict

    data = {"name": "validate", "seed": seed, "model": model or TINY_MODEL, "hardware": hardware or fixed_profile(),
            "trace": {"path": str(trace)}, "cache": {"gpu": gpu or {"capacity_experts": 1}},
            "predictor": predictor or {"name": "on_demand"}, "batch": batch or {"size": 1}}
    if dram is not None:
        data["cache"]["dram"] = dram
    if runtime is not None:
        data["runtime"] = runtime
    return scenario_from_dict(data, file="<validate>")


def _queue_reference(stream, cap, touch_on_hit):
    """LRU (a hit moves the key to the back) or FIFO (it does not), in plain Python."""
    od, misses = OrderedDict(), 0
    for x in stream:
        if x in od:
            if touch_on_hit:
                od.move_to_end(x)
            continue
        misses += 1
        if cap:
            if len(od) >= cap:
                od.popitem(last=False)
            od[x] = True
    return misses


def _belady_reference(stream, cap):
    stream = list(stream)
    res, misses = set(), 0
    for i, x in enumerate(stream):
        if x in res:
            continue
        misses += 1
        if not cap:
            continue
        if len(res) >= cap:
            def nxt(k):
                try:
                    return stream.index(k, i + 1)
                except ValueError:
                    return float("inf")
            res.discard(max(sorted(res), key=nxt))
        res.add(x)
    return misses


def checks() -> list[tuple[str, str, str, bool]]:
    """Run every check; rows of (check, expected, got, ok)."""
    from .cache.replay import replay
    from .engine.run import simulate
    from .hardware.costs import transfer_s

    rows = []

    def add(name, expected, got, rel=1e-9):
        ok = abs(got - expected) <= rel * max(abs(expected), 1e-30) if isinstance(expected, float) else got == expected
        rows.append((name, f"{expected:.9g}" if isinstance(expected, float) else str(expected),
                     f"{got:.9g}" if isinstance(got, float) else str(got), bool(ok)))

    A, C = 0.1e-3, 0.2e-3
    eb = 3 * 256 * 512 * 2
    tp, td = transfer_s(eb, 1.0, 10.0), transfer_s(eb, 0.5, 100.0)
    L = TINY_MODEL["num_layers"]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        routing = rng.integers(0, 16, size=(2, 6, L, 1)).astype(np.int16)
        tr = write_routing(Path(tmp) / "t.parquet", routing, 1, 16)
        s = simulate(tiny_scenario(tr)).summary
        add("on-demand, no reuse: makespan = Σ(attention + load + compute)", 12 * L * (A + tp + C), s["makespan_s"])
        add("bytes over PCIe = transfers × expert bytes", s["transfers_pcie"] * eb, s["bytes_pcie"])
        add("hits + late hits + misses = accesses", s["accesses"], s["hits"] + s["late_hits"] + s["misses"])
        s = simulate(tiny_scenario(tr, dram={"capacity_experts": 1})).summary
        add("disk-backed misses pay disk then PCIe", 12 * L * (A + td + tp + C), s["makespan_s"])
        s = simulate(tiny_scenario(tr, gpu={"capacity_experts": 16 * L})).summary
        n_unique = len({(layer, int(e)) for layer in range(L) for e in routing[:, :, layer, 0].ravel()})
        add("cache holding every expert: each loaded once", n_unique, s["misses"])
        add("... and stall = one load per distinct expert", n_unique * tp, s["stall_s"])
    add("one transfer of 1 GB at 25 GB/s + 5 µs", 5e-6 + 1 / 25, transfer_s(1e9, 25.0, 5.0))
    stream = rng.zipf(1.3, 3000) % 50
    refs = {"lru": lambda s, c: _queue_reference(s, c, True), "fifo": lambda s, c: _queue_reference(s, c, False),
            "belady": _belady_reference}
    for pol, ref in refs.items():
        for cap in (5, 20):
            add(f"replay {pol} capacity {cap}: misses vs reference", ref(stream.tolist(), cap),
                replay(stream, cap, pol).misses)
    from .cache.reference import libcachesim_misses

    try:
        ref = libcachesim_misses(stream, 20)
    except ImportError:
        ref = {}
        rows.append(("replay vs libcachesim", "libcachesim installed", "not installed (pip install moesim[test])",
                     True))
    for pol, want in ref.items():
        add(f"replay {pol} capacity 20: misses vs libcachesim", want, replay(stream, 20, pol).misses)
    return rows
