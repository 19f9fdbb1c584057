"""`moesim profile` measures the host CPU as an expert executor (issue 17, `miss: cpu | auto`): one
routed expert's FFN on the CPU by tokens, per dtype, with the cores a CPU-offload stack would give
it. The result is a profile's `host_cpu` section (every number with its source) and its spread for
the .measurements.json.
"""
from __future__ import annotations

import datetime as _dt
import os

from ..models import ModelSpec

HOST_DTYPES = ("bfloat16", "float32")


def _points(quick: bool) -> list[int]:
    return [1, 4, 16, 64, 256] if quick else [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


def measure_host_cpu(spec: ModelSpec, scale: float = 1.0, threads: int | None = None, quick: bool = False,
                     dtypes=HOST_DTYPES, log=lambda m: None) -> tuple[dict, dict]:
    """(the `host_cpu` section, its measurements): expert FFN medians by tokens for each dtype on the
    CPU, with `threads` torch threads (default: the cores less one, as the replay leaves one to I/O)."""
    from .scale import scaled_model
    from .torchutil import DTYPES, cpu_model, default_threads, device_description
    from .profile_tables import Profiler

    n_threads = threads or default_threads("cpu")
    tok = _points(quick)
    tables, meas, model = {}, {}, None
    for dt in dtypes:
        model = scaled_model(spec, scale, None, float(DTYPES[dt]))
        p = Profiler(model, "cpu", dt, n_threads, quick, log)
        log(f"host CPU expert FFN {model.hidden_size}x{model.expert_intermediate_size} {dt}, {p.threads} threads ...")
        with p.torch.inference_mode():
            res = p.expert_table(tok)
        tables[dt] = {"tokens": [float(t) for t in tok], "ms": [float(f"{res[t].median * 1e3:.4g}") for t in tok]}
        meas[dt] = [{"tokens": t, **res[t].as_dict()} for t in tok]
    desc = device_description("cpu")
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    by = (f"measured by moesim profile {when} on CPU {cpu_model()} (torch {desc['torch']}, Python "
          f"{desc['python']}, {desc['os']})")
    cores = os.cpu_count() or 1
    spreads = "; ".join(f"{dt}: " + ", ".join(f"{r['tokens']}:{r['p10']:.3g}-{r['p90']:.3g}"
                                             for r in rows) for dt, rows in meas.items())
    section = {
        "name": cpu_model(), "cores": cores, "threads_per_expert": n_threads,
        "model": model.name,
        "expert_ms": tables,
        "source": {
            "cores": f"{by}: os.cpu_count()",
            "model": f"{by}: the expert shape timed is this model's (moesim profile --model, --scale)",
            "threads_per_expert": f"{by}: torch threads the expert FFN was timed with",
            "expert_ms": (f"{by}: one routed expert ({model.hidden_size}x{model.expert_intermediate_size}, "
                          f"{'SwiGLU' if model.gated else 'ReLU MLP'}) over N tokens on the CPU: gather, MLP, "
                          f"weighted scatter-add, weights cycled through a pool larger than the caches; medians "
                          f"of warmed-up repeats, points round-robin (p10-p90 ms by tokens: {spreads})"),
        },
    }
    return section, {"when": when, "threads": n_threads, "cores": cores, "expert_ms": meas}


def add_host_cpu(profile_path, section: dict, meas: dict) -> None:
    """Put a measured `host_cpu` section into an existing profile YAML (its comment header kept, the
    section validated with the rest) and its spread into the .measurements.json beside it."""
    import json
    from pathlib import Path

    import yaml

    from ..errors import InputError
    from ..hardware.profile import load_profile, profile_from_dict

    path = Path(profile_path)
    if not path.is_file():
        raise InputError("--section host_cpu adds to an existing profile: file not found", file=str(path))
    doc = load_profile(str(path)).model_dump(mode="json", exclude_none=True)
    doc["host_cpu"] = section
    hp = profile_from_dict(doc, file=str(path))
    head = "".join(ln + "\n" for ln in path.read_text().splitlines() if ln.startswith("#"))
    head += f"# host_cpu: measured by `moesim profile --section host_cpu` on {meas['when']}.\n"
    path.write_text(head + yaml.safe_dump(hp.model_dump(mode="json", exclude_none=True), sort_keys=False, width=100))
    side = path.with_name(path.stem + ".measurements.json")
    data = json.loads(side.read_text()) if side.is_file() else {}
    data["host_cpu"] = meas
    side.write_text(json.dumps(data, indent=1, default=float) + "\n")
