"""Runtime (software-stack) costs: the host work between the hardware operations (issue 15).

A runtime is a YAML under `runtimes/`, a path, an inline mapping, or `none` (the pure-hardware
model). Every number that differs from its default names its `source` (a cited measurement, or
the points `moesim calibrate` fitted it to), as hardware profiles do.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from ..errors import InputError, build
from .profile import Table

RUNTIME_DIR = Path(__file__).resolve().parents[2] / "runtimes"


class AttentionGrid(BaseModel):
    """Measured attention time of one block by sequences in the step and cached positions per
    sequence (bilinear interpolation, clamped at the edges)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    sequences: list[float] = Field(min_length=1)
    context: list[float] = Field(min_length=1)
    ms: list[list[float]] = Field(description="ms[i][j]: sequences[i] sequences, context[j] positions each")

    @model_validator(mode="after")
    def _shape(self):
        for name in ("sequences", "context"):
            xs = getattr(self, name)
            if any(b <= a for a, b in zip(xs, xs[1:])):
                raise ValueError(f"{name} must be strictly increasing")
        if len(self.ms) != len(self.sequences) or any(len(r) != len(self.context) for r in self.ms):
            raise ValueError(f"ms must be {len(self.sequences)} rows of {len(self.context)} values")
        return self

    def ms_at(self, sequences: float, context: float) -> float:
        import numpy as np

        rows = [float(np.interp(context, self.context, r)) for r in self.ms]
        return float(np.interp(sequences, self.sequences, rows))


class RuntimeCosts(BaseModel):
    """Host-thread and kernel-efficiency costs of one software stack (see README, timing model)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    name: str = "inline"
    description: str = ""
    step_host_us: float = Field(0.0, ge=0, description="host set-up per step (host thread), before the first layer")
    layer_host_us: float = Field(0.0, ge=0, description="host work per layer (Python dispatch, bookkeeping), "
                                                        "before the layer's attention is issued")
    blocking_readback: bool = Field(False, description="true: the host waits for the gate (a GPU sync) and reads "
                                                       "the routing back before it issues loads and expert kernels")
    readback_us: float = Field(0.0, ge=0, description="reading the router decision back to the host; with "
                                                      "blocking_readback false a latency before loads are issued")
    blocking_loads: bool = Field(False, description="true: the host waits for each demand load to land before it "
                                                    "dispatches that expert (synchronous copies, offload hooks)")
    synchronous_compute: bool = Field(False, description="true: the host runs each kernel itself or waits for it "
                                                         "(a CPU device): host work and compute never overlap")
    expert_dispatch_us: float = Field(0.0, ge=0, description="host time to dispatch one expert's kernels")
    evict_writeback: Literal["none", "same_stream", "d2h_stream"] = Field(
        "none", description="an expert evicted from the GPU for a load is copied back to host memory (the stack "
                            "keeps one copy of each expert): same_stream, right after the load's own copy on its "
                            "link slot (one CUDA stream: the two serialise); d2h_stream, on the profile's pcie_d2h "
                            "link while the load's copy runs (full duplex). The load is usable when both are done")
    copy_slowdown: float = Field(1.0, ge=1, description="expert kernels take this many times longer while a copy "
                                                        "of their layer is in flight (shared memory bandwidth)")
    load_slowdown: float = Field(1.0, ge=1, description="expert loads (disk reads and copies) progress this many "
                                                        "times slower while compute runs (the host thread and the "
                                                        "loader share cores, memory bandwidth, the GPU's host side)")
    lm_head_ms: float | None = Field(None, ge=0, description="LM head per step (None: roofline)")
    lm_head_table: Table | None = Field(None, description="measured LM head by tokens in the step (wins over "
                                                          "lm_head_ms)")
    attention_grid: AttentionGrid | None = Field(None, description="measured attention by sequences and context "
                                                                   "(wins over the profile's table and the roofline)")
    dequant_gbps: dict[str, float] = Field(default_factory=dict, description="GPU dequantisation throughput "
                                           "per weight format, 1e9 packed bytes/s (model.precision.formats)")
    expert_efficiency: float = Field(1.0, gt=0, le=1, description="achieved fraction of roofline, expert FFNs")
    attention_efficiency: float = Field(1.0, gt=0, le=1, description="achieved fraction of roofline, attention")
    lm_head_efficiency: float = Field(1.0, gt=0, le=1, description="achieved fraction of roofline, LM head")
    source: dict[str, str] = Field(default_factory=dict, description="where each non-default number comes from")

    @model_validator(mode="after")
    def _checks(self):
        bad = [f for f, v in self.dequant_gbps.items() if not v > 0]
        if bad:
            raise ValueError(f"dequant_gbps.{bad[0]} must be > 0")
        for name, info in type(self).model_fields.items():
            if name in ("name", "description", "source"):
                continue
            if getattr(self, name) != info.get_default(call_default_factory=True) and name not in self.source:
                raise ValueError(f"{name} has no entry in source:")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        """Leave `load_slowdown` out when it is unset (its default, no source), so that a run with a
        runtime that does not set it echoes the same scenario in summary.json as before the field existed."""
        d = handler(self)
        if isinstance(d, dict) and d.get("load_slowdown") == 1.0 and "load_slowdown" not in self.source:
            del d["load_slowdown"]
        return d

    @property
    def costs_host(self) -> bool:
        """Whether any host-thread cost is non-zero (else the host never delays the GPU)."""
        return bool(self.step_host_us or self.layer_host_us or self.readback_us or self.expert_dispatch_us
                    or self.blocking_readback or self.blocking_loads or self.synchronous_compute
                    or self.copy_slowdown != 1.0)

    def dequant_s(self, fmt: str | None, nbytes: float) -> float:
        """GPU time to dequantise `nbytes` packed bytes of format `fmt` (0 if no speed is given)."""
        if fmt is None or fmt not in self.dequant_gbps:
            return 0.0
        return nbytes / (self.dequant_gbps[fmt] * 1e9)


def list_runtimes() -> list[str]:
    return sorted(p.stem for p in RUNTIME_DIR.glob("*.yaml"))


def runtime_from_dict(data: Any, *, file: str | None = None, prefix: str = "") -> RuntimeCosts:
    return build(RuntimeCosts, data, file=file, prefix=prefix)


def _resolve(name_or_path: str, base: Path | None) -> Path | None:
    cands = [Path(name_or_path)]
    if base is not None:
        cands.append(base / name_or_path)
    cands += [RUNTIME_DIR / name_or_path, RUNTIME_DIR / f"{name_or_path}.yaml"]
    return next((c for c in cands if c.is_file()), None)


def load_runtime(raw: Any, *, file: str | None = None, base: Path | None = None) -> RuntimeCosts | None:
    """`none`/None -> None (pure hardware); a preset name or path -> its YAML; a mapping -> inline
    (a `preset:` key in it starts from that preset). Errors name `file` and the field."""
    if raw is None or raw == "none":
        return None
    if isinstance(raw, str):
        path = _resolve(raw, base)
        if path is None:
            raise InputError(f"unknown runtime {raw!r}: not a file and not a preset "
                             f"(known: none, {', '.join(list_runtimes())})", file=file, field="runtime")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise InputError(f"malformed YAML: {' '.join(str(e).split())}", file=str(path)) from None
        return runtime_from_dict(data, file=str(path))
    if isinstance(raw, dict):
        raw = dict(raw)
        preset = raw.pop("preset", None)
        if preset is not None:
            start = load_runtime(preset, file=file, base=base)
            merged = start.model_dump() if start is not None else {}
            own = raw.pop("source", {})
            if not isinstance(own, dict):
                raise InputError(f"expected a mapping, got {type(own).__name__}", file=file, field="runtime.source")
            raw = {**merged, **raw, "source": {**merged.get("source", {}), **own}}
        return runtime_from_dict(raw, file=file, prefix="runtime")
    raise InputError(f"expected none, a preset name, a path or a mapping, got {type(raw).__name__}",
                     file=file, field="runtime")
