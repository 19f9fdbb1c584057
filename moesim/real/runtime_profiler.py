"""`moesim profile`'s runtime part (issue 15): the software costs of this machine's stack.

Measured with the profiler's timing helpers, on the profile's model shapes and dtype:
- per-layer host bookkeeping: the replay loop's per-layer work without its kernels (grouping the
  routed tokens by expert with numpy, one index tensor per expert, cache look-ups under a lock);
- per-step set-up: the replay's step geometry (slots, positions, index tensors);
- router readback: the top-k choice of a gate, copied to a Python list (a sync on CUDA);
- per-expert dispatch: on CUDA the host time to launch one expert's kernels (not waiting for
  them); on the CPU the kernels run on the host thread, so the dispatch is inside the expert table;
- the LM head by tokens; attention by (sequences, context);
- expert FFN time alone and while a background thread copies expert-sized blocks (the slowdown);
- the converse: an expert load (a page-cache-bypassing read, then the copy into a cache slot) on a
  loader thread alone and while the main thread computes decode layers back to back;
- dequantisation throughput of the formats torch runs here (int8 and packed int4 to the dtype).
"""
from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

MiB = 1 << 20
BOOKKEEPING_BATCH = 8        # tokens of the second bookkeeping point (its distinct experts give the per-expert term)
SHORT_CONTEXTS = (32, 64)    # attention grid contexts added below the profiler's grid


def _us(stats) -> float:
    return stats.median * 1e6


def layer_bookkeeping(p, tokens: int = 1) -> dict:
    """The replay's per-layer host work for `tokens` tokens, without attention or expert kernels:
    grouping the routed tokens by expert, one index tensor per expert, the cache tier's hit and pin
    under a lock, the per-kernel timer and sync, and the unpins (every expert resident)."""
    from ..cache.tiers import Tier

    torch, m = p.torch, p.model
    K, E = m.top_k, m.num_experts
    rng = np.random.default_rng(0)
    routing = rng.integers(0, E, size=(tokens, K)).astype(np.int64)
    lock = threading.Lock()
    tier = Tier("gpu", E, "lru", "global", E, 1)
    for k in range(E):
        tier.reserve(k, -1)
        tier.complete(k)
    distinct = int(np.unique(routing).size)

    def layer():
        flat = routing.reshape(-1)
        keys = np.unique(flat)
        order = np.argsort(flat, kind="stable")
        srt = flat[order]
        lo, hi = np.searchsorted(srt, keys, "left"), np.searchsorted(srt, keys, "right")
        rows = order // K
        groups = [torch.as_tensor(rows[a:b], device=p.device) for a, b in zip(lo.tolist(), hi.tolist())]
        pinned = []
        with lock:
            for pos, k in enumerate(keys.tolist()):
                if tier.hit(k, pos):
                    tier.pin(k)
                    pinned.append(k)
        for _ in groups:  # the replay's per-kernel timer (the kernel itself is in the expert table)
            t = time.perf_counter()
            p.sync()
            time.perf_counter() - t
        with lock:
            for k in pinned:
                tier.unpin(k)
        return groups
    return {"tokens": tokens, "experts": distinct,
            **p.bench(layer, warmup=20, repeats=400, budget=p.budget).as_dict(1e6)}


def bookkeeping_fit(one: dict, many: dict) -> tuple[float, float]:
    """(per-layer us, per-expert us) through two bookkeeping points with different expert counts."""
    dn = many["experts"] - one["experts"]
    per_expert = max(0.0, (many["median"] - one["median"]) / dn) if dn > 0 else 0.0
    return max(0.0, one["median"] - per_expert * one["experts"]), per_expert


def step_setup(p, sequences: int = 1, context: int = 128) -> dict:
    """The replay's per-step geometry: slot and position arrays and their device index tensors."""
    from .kernels import StepGeometry

    slot_of = {r: r for r in range(sequences)}
    lengths = np.full(sequences, context, dtype=np.int64)

    def step():
        slot = np.array([slot_of[r] for r in range(sequences)], dtype=np.int64)
        pos = lengths[slot].copy()
        return StepGeometry(slot, pos, lengths[np.unique(slot)] + 1, p.device, False)
    return {"sequences": sequences, **p.bench(step, warmup=20, repeats=400, budget=p.budget).as_dict(1e6)}


def readback(p) -> dict:
    """A gate's top-k over one token's logits, copied to the host as a list (syncs on CUDA)."""
    torch, m = p.torch, p.model
    logits = torch.randn(1, m.num_experts, device=p.device, dtype=p.dtype)
    idx = torch.topk(logits, m.top_k, dim=-1).indices
    with_topk = p.bench(lambda: torch.topk(logits, m.top_k, dim=-1).indices.flatten().tolist(),
                        warmup=20, repeats=400)
    copy_only = p.bench(lambda: idx.flatten().tolist(), warmup=20, repeats=400)
    return {"topk_and_tolist": with_topk.as_dict(1e6), "tolist": copy_only.as_dict(1e6)}


def expert_dispatch_cuda(p) -> dict:
    """CUDA only: host time to launch one 1-token expert's kernels (gather, FFN, scatter-add),
    without waiting for them; the stream is synchronised outside the timed region."""
    from .kernels import Shapes, expert_forward

    torch = p.torch
    s = Shapes(p.model, p.dtype_name)
    pool = p._expert_pool(s, 4 * s.slot_bytes)
    h = torch.randn(1, s.H, dtype=p.dtype, device=p.device)
    x = torch.zeros(1, s.H, dtype=p.dtype, device=p.device)
    idx = torch.arange(1, device=p.device)
    samples = []
    for i in range(200):
        p.sync()
        t = time.perf_counter()
        expert_forward(h, idx, pool[i % len(pool)], x, 0.125)
        samples.append(time.perf_counter() - t)
    p.sync()
    med = float(np.median(samples[20:]))
    return {"median": med * 1e6, "p10": float(np.percentile(samples[20:], 10)) * 1e6,
            "p90": float(np.percentile(samples[20:], 90)) * 1e6, "n": len(samples) - 20}


def lm_head_table(p, tokens: list[int]) -> dict:
    from .kernels import lm_head

    torch, m = p.torch, p.model
    if not m.vocab_size:
        return {}
    w = torch.randn(m.vocab_size, m.hidden_size, dtype=p.dtype, device=p.device) * 0.02
    calls = {}
    for t in tokens:
        x = torch.randn(t, m.hidden_size, dtype=p.dtype, device=p.device)
        calls[t] = lambda x=x: lm_head(x, w)
    return p.bench_points(calls, warmup=1)


def copy_slowdown(p) -> dict:
    """One-token expert FFN alone, and while a background thread copies expert-sized blocks (host
    memcpy on the CPU, pinned host-to-device copies on CUDA) without pause."""
    from .kernels import Shapes, expert_forward

    torch = p.torch
    s = Shapes(p.model, p.dtype_name)
    pool = p._expert_pool(s, (128 if p.quick else 256) * MiB)
    h = torch.randn(1, s.H, dtype=p.dtype, device=p.device)
    x = torch.zeros(1, s.H, dtype=p.dtype, device=p.device)
    idx = torch.arange(1, device=p.device)
    it = iter(range(10 ** 12))

    def call():
        expert_forward(h, idx, pool[next(it) % len(pool)], x, 0.125)
    alone = p.bench(call, warmup=3)
    src = torch.empty(s.slot_bytes, dtype=torch.uint8, pin_memory=p.cuda).fill_(1)
    dst = torch.empty(s.slot_bytes, dtype=torch.uint8, device=p.device)
    stop = threading.Event()
    copies = [0]

    def copier():  # a thread of its own: inference mode is per thread
        stream = torch.cuda.Stream() if p.cuda else None
        with torch.inference_mode():
            while not stop.is_set():
                if stream is not None:
                    with torch.cuda.stream(stream):
                        dst.copy_(src, non_blocking=True)
                    stream.synchronize()
                else:
                    dst.copy_(src)
                copies[0] += 1
    th = threading.Thread(target=copier, daemon=True)
    th.start()
    try:
        busy = p.bench(call, warmup=3)
    finally:
        stop.set()
        th.join()
    if copies[0] == 0:
        raise RuntimeError("the background copy thread made no copy")
    return {"alone": alone.as_dict(), "while_copying": busy.as_dict(), "copies": copies[0],
            "copy_bytes": s.slot_bytes, "slowdown": busy.median / alone.median}


def _load_calls(p, directory: Path, io: str, eb: int, rng: np.random.Generator):
    """(load() -> (read s, copy s), cleanup()) for one expert load as the replay does it: an
    expert-sized read at a random aligned offset of a fresh file, page cache bypassed, into a
    staging buffer (pinned on CUDA), then the copy into a cache slot (memcpy on the CPU, a
    host-to-device copy on a copy stream on CUDA)."""
    from .store import aligned_buffer, open_reader, write_random_file

    torch = p.torch
    n_exp = max(16, ((64 if p.quick else 256) * MiB) // eb)
    block = 4 * MiB
    n_blocks = -(-n_exp * eb // block)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".moesim-load-", suffix=".bin", dir=directory)
    os.close(fd)
    path = Path(tmp)
    rnd = rng.integers(0, 256, block, dtype=np.uint8)
    write_random_file(path, n_blocks, block, lambda i: rnd)
    reader = open_reader(path, io)
    offs = iter((rng.integers(0, n_exp, 10 ** 6) * eb).tolist())
    if p.cuda:
        stage_t = torch.empty(eb, dtype=torch.uint8, pin_memory=True)
        stage, slot = stage_t.numpy(), torch.empty(eb, dtype=torch.uint8, device=p.device)
        stream = torch.cuda.Stream(device=p.device)

        def copy():
            with torch.cuda.stream(stream):
                slot.copy_(stage_t, non_blocking=True)
            stream.synchronize()
    else:
        stage, slot = aligned_buffer(eb), aligned_buffer(eb)

        def copy():
            np.copyto(slot, stage)

    def load():
        t0 = time.perf_counter()
        reader.read(stage, next(offs), eb)
        t1 = time.perf_counter()
        copy()
        return t1 - t0, time.perf_counter() - t1

    def cleanup():
        reader.close()
        path.unlink(missing_ok=True)
    return load, cleanup, reader.method


def _decode_layer_call(p):
    """One decode layer's compute, one sequence at context 64: attention, a sync (the replay reads
    the routing back), then top-k one-token expert FFNs cycling through a pool, then a sync."""
    from .kernels import Shapes, expert_forward

    torch, m = p.torch, p.model
    s = Shapes(m, p.dtype_name)
    pool = p._expert_pool(s, (128 if p.quick else 256) * MiB)
    attn_pool = p._attention_pool(s, 3)
    ait = iter(range(10 ** 12))
    attn = p._attention_call(s, attn_pool, ait, 1, 64)
    h = torch.randn(1, s.H, dtype=p.dtype, device=p.device)
    x = torch.zeros(1, s.H, dtype=p.dtype, device=p.device)
    idx = torch.arange(1, device=p.device)
    it = iter(range(10 ** 12))

    def layer():
        attn()
        p.sync()
        for _ in range(m.top_k):
            expert_forward(h, idx, pool[next(it) % len(pool)], x, 0.125)
        p.sync()
    return layer


def load_slowdown(p, directory: Path, io: str = "auto") -> dict:
    """Expert loads on a loader thread, back to back, while the main thread alternately sleeps
    (alone) and computes decode layers back to back (busy), in alternating phases so that a
    change in the machine's speed hits both; a load counts for the phase it started and ended in.
    The slowdown is the busy median of a whole load (read + copy) over the alone median."""
    from .kernels import padded
    from .torchutil import Stats

    torch = p.torch
    eb = padded(p.model.expert_bytes)
    load, cleanup, method = _load_calls(p, directory, io, eb, np.random.default_rng(7))
    layer = _decode_layer_call(p)
    phase_s, rounds = (0.4, 3) if p.quick else (1.0, 4)
    phase, stop = ["warm"], threading.Event()
    samples = {"alone": [], "busy": []}

    def loader():  # a thread of its own: inference mode is per thread
        with torch.inference_mode():
            while not stop.is_set():
                before = phase[0]
                r, c = load()
                if phase[0] == before and before in samples:
                    samples[before].append((r, c))
    try:
        for _ in range(3):
            load()
            layer()
        th = threading.Thread(target=loader, daemon=True)
        th.start()
        try:
            for _ in range(rounds):
                phase[0] = "alone"
                time.sleep(phase_s)
                phase[0] = "busy"
                t_end = time.perf_counter() + phase_s
                layers = 0
                while time.perf_counter() < t_end:
                    layer()
                    layers += 1
        finally:
            phase[0] = "done"
            stop.set()
            th.join()
    finally:
        cleanup()
    if not samples["alone"] or not samples["busy"]:
        raise RuntimeError("the loader thread finished no load in one of the phases")
    out = {"bytes": eb, "io": method, "phase_s": phase_s, "rounds": rounds,
           "copy": "host-to-device copy on a copy stream" if p.cuda else "host memcpy (np.copyto)"}
    for ph, rows in samples.items():
        out[ph] = {part: Stats(col).as_dict() for part, col in
                   (("read", [r for r, _ in rows]), ("copy", [c for _, c in rows]),
                    ("load", [r + c for r, c in rows]))}
    out["slowdown"] = out["busy"]["load"]["median"] / out["alone"]["load"]["median"]
    mean = {ph: float(np.mean([r + c for r, c in rows])) for ph, rows in samples.items()}
    out["mean_slowdown"] = mean["busy"] / mean["alone"]  # for the record: the tail is heavier while busy
    return out


def dequant(p, nbytes: int) -> dict:
    """Throughput (1e9 packed bytes/s) of int8 and packed-int4 weights to the dtype, with one
    scale (and zero) per group of 64, as torch computes it here."""
    torch = p.torch
    g = 64
    out = {}
    q8 = torch.randint(-128, 127, (nbytes // g, g), dtype=torch.int8, device=p.device)
    sc8 = torch.rand(nbytes // g, 1, dtype=p.dtype, device=p.device)
    st = p.bench(lambda: q8.to(p.dtype) * sc8, warmup=2)
    out["int8"] = {"packed_bytes": nbytes, **st.as_dict(), "gbps": nbytes / st.median / 1e9}
    q4 = torch.randint(0, 255, (nbytes // (g // 2), g // 2), dtype=torch.uint8, device=p.device)
    sc4 = torch.rand(nbytes // (g // 2), 1, dtype=p.dtype, device=p.device)
    z4 = torch.full_like(sc4, 8)

    def int4():
        w = torch.stack(((q4 >> 4), (q4 & 15)), dim=-1).reshape(q4.shape[0], g).to(p.dtype)
        return (w - z4) * sc4
    st = p.bench(int4, warmup=2)
    out["int4"] = {"packed_bytes": nbytes, **st.as_dict(), "gbps": nbytes / st.median / 1e9}
    return out


def measure_runtime(p, contexts_grid: list[dict], log=lambda m: None, disk_dir: Path | None = None,
                    io: str = "auto") -> dict:
    """Every runtime measurement of this machine (a dict for the .measurements.json); the load
    slowdown reads a file it writes in `disk_dir` (not measured without one)."""
    log("runtime: host bookkeeping, readback, LM head, copy slowdown, dequant ...")
    with p.torch.inference_mode():
        meas = {
            "layer_bookkeeping": layer_bookkeeping(p),
            "layer_bookkeeping_batch": layer_bookkeeping(p, BOOKKEEPING_BATCH),
            "step_setup": step_setup(p),
            "readback": readback(p),
            "expert_dispatch": expert_dispatch_cuda(p) if p.cuda else None,
            "lm_head": {t: st.as_dict() for t, st in lm_head_table(p, [1, 4, 16, 64] if p.quick
                                                                      else [1, 4, 16, 64, 256]).items()},
            "copy_slowdown": copy_slowdown(p),
            "dequant": dequant(p, (8 if p.quick else 32) * MiB),
        }
    if disk_dir is not None:
        log("runtime: expert loads alone and while computing ...")
        meas["load_slowdown"] = load_slowdown(p, Path(disk_dir), io)
    grid = list(contexts_grid)
    have = {(r["batch"], r["context"]) for r in grid}
    batches = sorted({r["batch"] for r in grid})
    low = [c for c in SHORT_CONTEXTS if c < min(r["context"] for r in grid)] if grid else []
    if low:  # short contexts too, so that a decode at context 30-100 interpolates, not clamps
        log(f"runtime: attention at short contexts {low} ...")
        with p.torch.inference_mode():
            grid += [r for r in p.attention_decode_grid(batches, low) if (r["batch"], r["context"]) not in have]
    meas["attention_grid"] = grid
    return meas


def runtime_doc(meas: dict, by: str, name: str, cuda: bool) -> dict:
    """A runtime YAML (every number sourced) from `measure_runtime`'s measurements."""
    lb, ss, rb = meas["layer_bookkeeping"], meas["step_setup"], meas["readback"]
    lb8 = meas.get("layer_bookkeeping_batch")
    layer_us, per_expert_us = bookkeeping_fit(lb, lb8) if lb8 else (lb["median"], 0.0)
    cs, dq = meas["copy_slowdown"], meas["dequant"]
    grid = meas["attention_grid"]
    seqs = sorted({r["batch"] for r in grid})
    ctxs = sorted({r["context"] for r in grid})
    cell = {(r["batch"], r["context"]): r["median"] for r in grid}
    doc = {
        "name": name,
        "description": f"moesim replay --real's loop on this machine ({'CUDA' if cuda else 'CPU'}), measured by "
                       "moesim profile",
        "step_host_us": _sig(ss["median"]),
        "layer_host_us": _sig(layer_us),
        "blocking_readback": True,
        "readback_us": _sig(rb["tolist"]["median"]),
        "blocking_loads": False,
        "synchronous_compute": not cuda,
        "expert_dispatch_us": _sig(meas["expert_dispatch"]["median"] if cuda else per_expert_us),
        "copy_slowdown": _sig(max(1.0, cs["slowdown"])),
        **({"load_slowdown": _sig(max(1.0, meas["load_slowdown"]["slowdown"]))} if "load_slowdown" in meas else {}),
        "dequant_gbps": {k: _sig(v["gbps"]) for k, v in dq.items()},
    }
    if meas["lm_head"]:
        ts = sorted(meas["lm_head"])
        doc["lm_head_table"] = {"tokens": [float(t) for t in ts], "ms": [_sig(meas["lm_head"][t]["median"]) for t in ts]}
    doc["attention_grid"] = {"sequences": [float(b) for b in seqs], "context": [float(c) for c in ctxs],
                             "ms": [[_sig(cell[(b, c)]) for c in ctxs] for b in seqs]}
    src = {
        "step_host_us": f"{by}: the replay's step geometry for one sequence (slot/position arrays, index tensors), "
                        f"median of {ss['n']} (p10-p90 {ss['p10']:.3g}-{ss['p90']:.3g} us)",
        "layer_host_us": (f"{by}: the replay's per-layer bookkeeping without kernels (numpy grouping of routed "
                          f"tokens by expert, an index tensor, cache hit/pin/unpin under a lock and a kernel timer "
                          f"per expert): {lb['median']:.3g} us for 1 token ({lb.get('experts', '?')} experts, p10-p90 "
                          f"{lb['p10']:.3g}-{lb['p90']:.3g})"
                          + (f", {lb8['median']:.3g} us for {lb8['tokens']} tokens ({lb8['experts']} experts); the "
                             f"per-layer part of the line through the two" if lb8 else "")),
        "blocking_readback": "moesim replay --real synchronises after each layer's attention before it routes",
        "readback_us": f"{by}: top-k indices of one token copied to a Python list (.tolist()), median of "
                       f"{rb['tolist']['n']}; with the top-k itself {rb['topk_and_tolist']['median']:.3g} us",
        "synchronous_compute": ("the CPU computes on the replay's main thread: host work and kernels never overlap"
                                if not cuda else "CUDA kernels are launched asynchronously"),
        "copy_slowdown": f"{by}: one-token expert FFN while a background thread copies "
                         f"{cs['copy_bytes'] / MiB:.2f} MiB blocks without pause ({cs['copies']} copies; "
                         f"{cs['while_copying']['median']:.3g} ms) over alone ({cs['alone']['median']:.3g} ms)",
        "dequant_gbps": f"{by}: packed bytes per second, group size 64: "
                        + "; ".join(f"{k} {v['packed_bytes'] / MiB:.0f} MiB in {v['median']:.3g} ms" for k, v in dq.items()),
        "attention_grid": f"{by}: one attention block of a decode step (sequences x cached positions), medians",
    }
    if "load_slowdown" in meas:
        src["load_slowdown"] = _load_source(meas["load_slowdown"], by)
    if cuda:
        src["expert_dispatch_us"] = (f"{by}: host time to launch one 1-token expert's kernels without waiting, "
                                     f"median of {meas['expert_dispatch']['n']}")
    elif per_expert_us > 0:
        src["expert_dispatch_us"] = (f"{by}: the per-expert slope of the layer bookkeeping ({lb['experts']} and "
                                     f"{lb8['experts']} experts; the kernel itself is in the expert table)")
    if "lm_head_table" in doc:
        src["lm_head_table"] = f"{by}: final norm + vocabulary projection by tokens, medians"
    doc["source"] = src
    return doc


def _load_source(ls: dict, by: str) -> str:
    a, b = ls["alone"], ls["busy"]
    return (f"{by}: one expert load ({ls['bytes'] / MiB:.2f} MiB {ls['io']} read into a staging buffer, then "
            f"{ls['copy']} into a cache slot) on a loader thread while the main thread computes one-sequence "
            f"decode layers back to back (attention, sync, top-k expert FFNs), over alone; {ls['rounds']} "
            f"alternating {ls['phase_s']:g} s phases: load {b['load']['median']:.3g} ms (n={b['load']['n']}) vs "
            f"{a['load']['median']:.3g} ms (n={a['load']['n']}); read {b['read']['median']:.3g} vs "
            f"{a['read']['median']:.3g} ms, copy {b['copy']['median']:.3g} vs {a['copy']['median']:.3g} ms "
            "(below 1 is written as 1)")


def _sig(x: float, n: int = 4) -> float:
    return float(f"{x:.{n}g}")
