"""Scale a scenario down so a real run fits a small machine: fewer layers, smaller experts.

`--scale F` multiplies the number of MoE layers (and dense layers), every FFN width (routed,
shared and dense experts) and the vocabulary by F; the hidden size and attention shape are kept.
`--layers N` sets the number of MoE layers outright. The routing is the original trace's, cut
to the first N MoE layers (and to the first `--requests` requests).

Cache capacities are first converted to whole experts of the *unscaled* model; a `global` tier is
then scaled by layers'/layers, so it holds the same fraction of all experts; a `per_layer` tier
keeps its per-layer count. A capacity that would fall below top_k is raised to top_k (noted).

The scaled scenario (`scenario.yaml`, inline model, `trace.parquet` beside it) is written to the
output dir, so `moesim run OUT/scenario.yaml` simulates exactly what was replayed.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml

from ..config import load_scenario, scenario_from_dict
from ..errors import InputError
from ..models import ModelSpec


def _width(w: int | None, f: float) -> int | None:
    if w is None:
        return None
    return max(16, round(w * f / 16) * 16) if f != 1 else w


def scaled_model(spec: ModelSpec, scale: float = 1.0, layers: int | None = None,
                 bytes_per_param: float | None = None) -> ModelSpec:
    """The model with layers and FFN widths scaled (name gets an `@F` suffix when F != 1);
    `bytes_per_param` set to that of the dtype the real run computes in."""
    if not 0 < scale <= 1:
        raise InputError(f"must be in (0, 1], got {scale!r}", field="--scale")
    if layers is not None and layers < 1:
        raise InputError(f"must be >= 1, got {layers!r}", field="--layers")
    d = spec.model_dump()
    if scale != 1:
        d["name"] = f"{spec.name}@{scale:g}"
        d["num_layers"] = max(1, round(spec.num_layers * scale))
        d["first_dense_layers"] = round(spec.first_dense_layers * scale)
        d["expert_intermediate_size"] = _width(spec.expert_intermediate_size, scale)
        d["shared_expert_intermediate_size"] = _width(spec.shared_expert_intermediate_size, scale)
        d["dense_intermediate_size"] = _width(spec.dense_intermediate_size, scale)
        d["vocab_size"] = round(spec.vocab_size * scale)
        d["source"] = f"{spec.source}; scaled by {scale:g} (layers, FFN widths, vocabulary) by moesim"
    if layers is not None:
        if layers > spec.num_layers:
            raise InputError(f"the model has only {spec.num_layers} MoE layers, got {layers}", field="--layers")
        d["num_layers"] = layers
    if bytes_per_param is not None:
        d["bytes_per_param"] = bytes_per_param
    return ModelSpec(**d)


def _tier(tier, orig: ModelSpec, new: ModelSpec, notes: list[str], name: str) -> dict:
    n = tier.experts(orig.expert_bytes)
    if tier.partition == "global" and new.num_layers != orig.num_layers:
        n2 = round(n * new.num_layers / orig.num_layers)
    else:
        n2 = n
    if n2 < new.top_k:
        notes.append(f"cache.{name}: {n2} experts raised to top_k={new.top_k}")
        n2 = new.top_k
    if n2 != n or tier.capacity_experts is None:
        notes.append(f"cache.{name}: {tier.capacity_experts if tier.capacity_experts is not None else str(tier.capacity_gb) + ' GB'}"
                     f" -> {n2} experts{' per layer' if tier.partition == 'per_layer' else ''}")
    return {"capacity_experts": n2, "policy": tier.policy, "partition": tier.partition}


def _lists(values: np.ndarray, width: int, typ) -> pa.ListArray:
    """Rows of `width` values each as an Arrow list column."""
    offsets = pa.array(np.arange(0, values.size + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), typ))


def _trace_pieces(reader, layers: int, max_requests: int | None):
    """The trace cut to its first `layers` MoE layers and `max_requests` requests; its pre_attn
    column too when it has one (the pre-attention predictor reads it)."""
    for i, r in enumerate(reader.iter_requests(scores=False)):
        if max_requests is not None and i >= max_requests:
            return
        ex = r.experts[:, :layers, :]
        T, L, K = ex.shape
        tok, lay = np.meshgrid(np.arange(T), np.arange(L), indexing="ij")
        phase = np.where(tok.ravel() < r.prompt_len, "prefill", "decode")
        cols = {
            "request_id": pa.array(np.full(T * L, r.request_id), pa.int32()),
            "token": pa.array(tok.ravel(), pa.int32()),
            "phase": pa.array(phase).dictionary_encode(),
            "layer": pa.array(lay.ravel(), pa.int16()),
            "experts": _lists(ex.astype(np.int16), K, pa.int16()),
        }
        if r.pre_attn is not None:
            pre = r.pre_attn[:, :layers, :]
            cols["pre_attn"] = _lists(np.ascontiguousarray(pre, dtype=np.float16), pre.shape[2], pa.float16())
        yield pa.table(cols)


def prepare(scenario_path, outdir, overrides=(), scale: float = 1.0, layers: int | None = None,
            max_requests: int | None = None, hardware: str | None = None, bytes_per_param: float | None = None):
    """Write OUT/scenario.yaml + OUT/trace.parquet (the scaled scenario) and load it.

    Returns (scaled Scenario, original Scenario, notes)."""
    from ..engine.run import open_trace
    from ..traces.io import write_trace
    from ..traces.schema import TraceMeta

    if max_requests is not None and max_requests < 1:
        raise InputError(f"must be >= 1, got {max_requests}", field="--requests")
    orig = load_scenario(scenario_path, overrides)
    b = orig.batch
    if getattr(b, "scheduler", "static") != "static" or getattr(b, "arrivals", "closed") != "closed":
        raise InputError("moesim replay runs static batches with closed arrivals only (got scheduler "
                         f"{getattr(b, 'scheduler', 'static')!r}, arrivals {getattr(b, 'arrivals', 'closed')!r})",
                         file=str(scenario_path), field="batch")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    new = scaled_model(orig.model, scale, layers, bytes_per_param)
    notes: list[str] = []
    if bytes_per_param is not None and bytes_per_param != orig.model.bytes_per_param:
        notes.append(f"model.bytes_per_param: {orig.model.bytes_per_param:g} -> {bytes_per_param:g} "
                     f"(the dtype the real run computes in)")
    with tempfile.TemporaryDirectory(prefix="moesim-scale-") as tmp:
        reader = open_trace(orig, Path(tmp))
        meta = TraceMeta(model=new.name, num_layers=new.num_layers, num_experts=new.num_experts,
                         top_k=new.top_k, seed=reader.meta.seed,
                         source=f"{reader.meta.source} | MoE layers 0..{new.num_layers - 1}"
                                f"{f', first {max_requests} requests' if max_requests else ''} (moesim replay)")
        write_trace(out / "trace.parquet", _trace_pieces(reader, new.num_layers, max_requests), meta)
    cache = {"gpu": _tier(orig.cache.gpu, orig.model, new, notes, "gpu")}
    if orig.cache.dram is not None:
        cache["dram"] = _tier(orig.cache.dram, orig.model, new, notes, "dram")
    hw = str(Path(hardware).resolve()) if hardware and Path(hardware).is_file() else hardware
    data = {
        "name": orig.name,
        "seed": orig.seed,
        "model": {k: v for k, v in new.model_dump(mode="json").items() if v is not None},
        "hardware": hw or orig.hardware.model_dump(mode="json", exclude_none=True),
        "trace": {"path": "trace.parquet"},
        "cache": cache,
        "predictor": {"name": orig.predictor.name, **orig.predictor.params},
        "batch": orig.batch.model_dump(mode="json"),
    }
    if orig.runtime is not None:  # the software costs go with the scenario (its sim uses them)
        data["runtime"] = orig.runtime.model_dump(mode="json", exclude_none=True)
    text = ("# Scaled scenario written by `moesim replay` (simulate it with `moesim run` on this file).\n"
            + "".join(f"# {n}\n" for n in notes)
            + yaml.safe_dump(data, sort_keys=False))
    path = out / "scenario.yaml"
    path.write_text(text)
    sc = scenario_from_dict(yaml.safe_load(text), file=str(path), base_dir=out)
    return sc, orig, notes
