"""Bottleneck analysis: one-at-a-time what-ifs around a run, each simulated, ranked by gain.

A what-if is a named scenario -> scenario transform (dotted-path overrides of the run's scenario)
with an applicability check; `WHATIFS` is the registry, so a new one is one
`register(WhatIf(...))`. The what-ifs run as sweep points under `RUN/whatif/points/` on a sweep executor, and `RUN/whatif.json` records the
gains and the sentence that names the binding constraint; the run report reads that file.
"""
from __future__ import annotations

import json
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import Scenario
from ..results import dump_json
from ..sweep.executors import Executor
from ..sweep.runner import make_tasks
from ..sweep.spec import Point, SweepSpec, point_id
from ..sweep.worker import is_done, read_status

WHATIF_JSON = "whatif.json"
WHATIF_DIR = "whatif"


@dataclass(frozen=True)
class WhatIf:
    """A named change to a scenario: `why_not` says why it does not apply (None: it does)."""

    name: str
    label: str          # as the verdict sentence says it: "a 2× link gives +71%"
    why_not: Callable[[Scenario], str | None]
    overrides: Callable[[Scenario], dict]


WHATIFS: dict[str, WhatIf] = {}


def register(w: WhatIf) -> WhatIf:
    WHATIFS[w.name] = w
    return w


def _gpu_experts(sc: Scenario) -> int:
    """Experts the GPU tier holds in all (per-layer capacity × layers with per_layer)."""
    g, m = sc.cache.gpu, sc.model
    n = g.experts(m.expert_bytes)
    return min(n * m.num_layers if g.partition == "per_layer" else n, m.total_experts)


def _all_resident(sc: Scenario) -> str | None:
    return "every expert is already resident on the GPU" if _gpu_experts(sc) >= sc.model.total_experts else None


def _room_for(sc: Scenario, experts: int) -> dict:
    """Raise the GPU's memory (a what-if) when `experts` cached experts would not fit it."""
    need = (experts * sc.model.expert_bytes + sc.model.resident_bytes) / 1e9
    return {"hardware.gpu.memory_gb": math.ceil(need * 1000) / 1000} if need > sc.hardware.gpu.memory_gb else {}


def _cache(sc: Scenario, per_tier: int) -> dict:
    g = sc.cache.gpu
    return {"cache.gpu": {"capacity_experts": per_tier, "policy": g.policy, "partition": g.partition}}


def _more_cache(sc: Scenario) -> dict:
    g, m = sc.cache.gpu, sc.model
    cap = m.num_experts if g.partition == "per_layer" else m.total_experts
    n = min(math.ceil(g.experts(m.expert_bytes) * 1.25), cap)
    total = n * m.num_layers if g.partition == "per_layer" else n
    return {**_cache(sc, n), **_room_for(sc, total)}


def _resident(sc: Scenario) -> dict:
    m = sc.model
    return {"cache.gpu": {"capacity_experts": m.num_experts, "policy": sc.cache.gpu.policy, "partition": "per_layer"},
            **_room_for(sc, m.total_experts)}


def _oracle(sc: Scenario) -> dict:
    ahead = sc.predictor.params.get("lookahead_layers", 1)
    return {"predictor": {"name": "oracle", "lookahead_layers": ahead}}


register(WhatIf("pcie_2x", "a 2× link", _all_resident,
                lambda sc: {"hardware.pcie_h2d.bandwidth_gbps": 2 * sc.hardware.pcie_h2d.bandwidth_gbps}))
register(WhatIf("cache_plus_25", "+25% GPU cache", _all_resident, _more_cache))
register(WhatIf("oracle", "an oracle predictor",
                lambda sc: "the predictor is already the oracle" if sc.predictor.name == "oracle" else _all_resident(sc),
                _oracle))
register(WhatIf("all_resident", "all experts resident", _all_resident, _resident))

HOST_FIELDS = ("step_host_us", "layer_host_us", "readback_us", "expert_dispatch_us")


def _no_host_cost(sc: Scenario) -> str | None:
    rt = sc.runtime
    if rt is None or not any(getattr(rt, f) for f in HOST_FIELDS):
        return "the scenario has no runtime host costs (runtime: none or all zero)"
    return None


def _half_host(sc: Scenario) -> dict:
    return {f"runtime.{f}": getattr(sc.runtime, f) / 2 for f in HOST_FIELDS if getattr(sc.runtime, f)}


register(WhatIf("half_host", "half the host overhead", _no_host_cost, _half_host))


def _no_cpu_miss(sc: Scenario) -> str | None:
    if sc.miss != "wait":
        return f"misses already may run on the CPU (miss: {sc.miss})"
    lacking = [s for s in ("host_cpu", "pcie_d2h") if getattr(sc.hardware, s) is None]
    if lacking:
        return f"the hardware profile has no {' or '.join(lacking)} section"
    return _all_resident(sc)


register(WhatIf("miss_auto", "CPU on a miss (auto)", _no_cpu_miss, lambda sc: {"miss": "auto"}))


def applicable(sc: Scenario) -> tuple[list[WhatIf], list[dict]]:
    """(the what-ifs that apply to `sc`, [{name, label, why}] of those that do not)."""
    run, skipped = [], []
    for w in WHATIFS.values():
        why = w.why_not(sc)
        if why is None:
            run.append(w)
        else:
            skipped.append({"name": w.name, "label": w.label, "why": why})
    return run, skipped


def verdict(base: dict, results: list[dict]) -> tuple[str, str]:
    """(kind, sentence) naming the binding constraint from the run's summary and the gains."""
    stall, gpu = base.get("stall_fraction") or 0.0, base.get("gpu_utilization") or 0.0
    link = "disk" if (base.get("disk_utilization") or 0) > (base.get("pcie_utilization") or 0) else "PCIe"
    host_wait = ((base.get("host") or {}).get("gpu_wait_on_host_s") or 0.0) / (base.get("makespan_s") or math.inf)
    if host_wait >= 0.5:
        kind, head = "host-bound", f"host-bound: the GPU waits {host_wait:.0%} of the time for the host"
    elif stall >= 0.5:
        kind = "disk-bound" if link == "disk" else "link-bound"
        head = f"{kind}: {stall:.0%} stalled on {link}"
    elif gpu >= 0.5:
        kind, head = "compute-bound", f"compute-bound: the GPU computes {gpu:.0%} of the time"
    else:
        kind = "latency-bound"
        head = f"latency-bound: {stall:.0%} stalled, the GPU computes {gpu:.0%} of the time"
    done = [r for r in results if r.get("gain") is not None]
    if not done:
        return kind, head
    parts = [f"{done[0]['label']} gives {done[0]['gain']:+.0%}"]
    parts += [f"{r['label']} {r['gain']:+.0%}" for r in done[1:3]]
    return kind, f"{head}; {', '.join(parts)}"


def run_whatifs(data: dict, sc: Scenario, summary: dict, outdir: str | Path, executor: Executor,
                file: str | None = None) -> dict:
    """Simulate every applicable what-if of the run `data` (its scenario mapping, after --set) on
    `executor`, write `outdir/whatif.json` and return it. Finished what-ifs are not rerun."""
    out = Path(outdir)
    todo, skipped = applicable(sc)
    spec = SweepSpec(name=f"{sc.name}-whatif", base=data, base_dir=sc.base_dir, file=file)
    points = [Point(point_id(w.overrides(sc)), i, w.overrides(sc)) for i, w in enumerate(todo)]
    pdir = out / WHATIF_DIR / "points"
    pdir.mkdir(parents=True, exist_ok=True)
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    fresh = [p for p in points if not is_done(pdir / p.id, spec.scenario_hash(p))]
    executor.run(make_tasks(spec, fresh, run_id), pdir, lambda st: None)
    base_tps = summary.get("tokens_per_s") or 0.0
    results = [_result(w, p, pdir, base_tps) for w, p in zip(todo, points)]
    results.sort(key=lambda r: -math.inf if r["gain"] is None else -r["gain"])
    kind, sentence = verdict(summary, results)
    doc = {"baseline": {k: summary.get(k) for k in ("tokens_per_s", "stall_fraction", "gpu_utilization",
                                                    "pcie_utilization", "disk_utilization", "makespan_s")},
           "kind": kind, "verdict": sentence, "whatifs": results, "skipped": skipped}
    tmp = out / f".{WHATIF_JSON}.tmp-{os.getpid()}"
    tmp.write_text(dump_json(doc))
    os.replace(tmp, out / WHATIF_JSON)
    return doc


def _result(w: WhatIf, p: Point, pdir: Path, base_tps: float) -> dict:
    st = read_status(pdir / p.id) or {}
    r = {"name": w.name, "label": w.label, "overrides": p.overrides, "point_id": p.id, "status": st.get("status"),
         "tokens_per_s": None, "gain": None, "error": st.get("error")}
    if st.get("status") == "done":
        s = json.loads((pdir / p.id / "summary.json").read_text())
        r["tokens_per_s"] = s.get("tokens_per_s")
        r["stall_fraction"] = s.get("stall_fraction")
        if base_tps and r["tokens_per_s"] is not None:
            r["gain"] = r["tokens_per_s"] / base_tps - 1.0
    return r
