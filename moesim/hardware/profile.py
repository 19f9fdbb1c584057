"""HardwareProfile: GPU, PCIe host-to-device link, disk and host DRAM, loaded from YAML.

Every numeric field of a section must have an entry in that section's `source:` mapping
(a datasheet, a paper, or "measured by moesim profile <date> on <machine>").
"""
from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from ..errors import InputError, build
from ..yamlsafe import safe_load

PROFILE_DIR = Path(__file__).resolve().parents[2] / "hardware_profiles"


class _Sourced(BaseModel):
    """A section whose every number names where it comes from."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    source: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _every_number_sourced(self):
        for name, info in type(self).model_fields.items():
            if name in ("source", "name"):
                continue
            if getattr(self, name) is not None and name not in self.source:
                raise ValueError(f"{name} has no entry in source:")
        return self


class GPU(_Sourced):
    name: str = ""
    memory_gb: float = Field(gt=0)
    hbm_bandwidth_gbps: float = Field(gt=0)
    peak_bf16_tflops: float = Field(gt=0, description="dense (no sparsity) bf16 tensor-core peak")
    kernel_launch_us: float = Field(ge=0)


class Link(_Sourced):
    bandwidth_gbps: float = Field(gt=0, description="sustained pinned host-to-device, 1e9 bytes/s")
    latency_us: float = Field(ge=0)
    copy_engines: int = Field(1, ge=1)


class IdleExtra(BaseModel):
    """Extra time of a read that starts after the disk has been idle: `extra_us[i]` once the idle time
    reaches `idle_ms[i]` (a step table: the largest `idle_ms` reached wins; below the first, none)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    idle_ms: list[float] = Field(min_length=1, description="idle thresholds, strictly increasing, > 0")
    extra_us: list[float] = Field(min_length=1, description="a read's extra time once idle that long")

    @model_validator(mode="after")
    def _check(self):
        if len(self.idle_ms) != len(self.extra_us):
            raise ValueError(f"idle_ms has {len(self.idle_ms)} points but extra_us has {len(self.extra_us)}")
        if self.idle_ms[0] <= 0 or any(b <= a for a, b in zip(self.idle_ms, self.idle_ms[1:])):
            raise ValueError("idle_ms must be > 0 and strictly increasing")
        if any(x < 0 for x in self.extra_us):
            raise ValueError("extra_us must be >= 0")
        return self

    def extra_s(self, idle_s: float) -> float:
        """The extra seconds of a read that follows `idle_s` seconds of disk idle."""
        idle_ms, extra = idle_s * 1e3, 0.0
        for thr, x in zip(self.idle_ms, self.extra_us):
            if idle_ms < thr:
                break
            extra = x
        return extra * 1e-6


class Disk(_Sourced):
    name: str = ""
    read_bandwidth_gbps: float = Field(gt=0)
    latency_us: float = Field(ge=0)
    queue_depth: int = Field(1, ge=1)
    idle_read_extra: IdleExtra | None = Field(None, description="a read after disk idle costs more (measured); "
                                                                "None: every read costs latency + bytes/bandwidth")

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        """Leave an unset `idle_read_extra` out, so that a profile without it echoes in summary.json as
        it did before the field existed."""
        d = handler(self)
        if isinstance(d, dict) and d.get("idle_read_extra", 0) is None:
            del d["idle_read_extra"]
        return d


class HostDRAM(_Sourced):
    capacity_gb: float = Field(gt=0)


class Table(BaseModel):
    """A measured curve, linearly interpolated (and linearly extrapolated past the last point)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    tokens: list[float] = Field(min_length=1)
    ms: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self):
        if len(self.tokens) != len(self.ms):
            raise ValueError(f"tokens has {len(self.tokens)} points but ms has {len(self.ms)}")
        if any(b <= a for a, b in zip(self.tokens, self.tokens[1:])):
            raise ValueError("tokens must be strictly increasing")
        if any(m < 0 for m in self.ms):
            raise ValueError("ms must be >= 0")
        return self


class Measured(BaseModel):
    """Measured tables; they win over the roofline formulas for the model they were measured on."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str | None = Field(None, description="model preset/name the tables were measured for; "
                                                "None = applies to any model")
    expert_compute_ms: Table | None = None
    attention_ms: Table | None = None
    source: str


class HostCPU(_Sourced):
    """The host CPU as an expert executor (issue 17: `miss: cpu | auto`): its cores, and one routed
    expert's FFN time by tokens, per weight dtype, measured (`expert_ms`) and/or a roofline from a
    sourced peak FLOP/s and memory bandwidth. A measured table wins for the model it was measured on."""

    name: str = ""
    cores: int = Field(ge=1, description="physical cores the runtime's threads may use")
    threads_per_expert: int = Field(1, ge=1, description="cores one CPU expert kernel uses (as measured)")
    peak_tflops: float | None = Field(None, gt=0, description="dense FLOP/s of threads_per_expert cores, 1e12")
    memory_bandwidth_gbps: float | None = Field(None, gt=0, description="weight-streaming bandwidth, 1e9 B/s")
    model: str | None = Field(None, description="model the expert_ms tables were measured for (None: any)")
    expert_ms: dict[str, Table] | None = Field(None, description="dtype -> one expert's FFN ms by tokens")

    @model_validator(mode="after")
    def _some_timing(self):
        if not self.expert_ms and (self.peak_tflops is None or self.memory_bandwidth_gbps is None):
            raise ValueError("give expert_ms tables or both peak_tflops and memory_bandwidth_gbps")
        return self


class HardwareProfile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    description: str = ""
    gpu: GPU
    pcie_h2d: Link
    pcie_d2h: Link | None = Field(None, description="device-to-host link (activations out for miss: cpu)")
    disk: Disk
    host_dram: HostDRAM
    host_cpu: HostCPU | None = Field(None, description="the host CPU as an expert executor (miss: cpu | auto)")
    measured: Measured | None = None


def list_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def _resolve(name_or_path: str, base: Path | None = None) -> Path:
    cands = [Path(name_or_path)]
    if base is not None:
        cands.append(base / name_or_path)
    cands += [PROFILE_DIR / name_or_path, PROFILE_DIR / f"{name_or_path}.yaml"]
    for c in cands:
        if c.is_file():
            return c
    raise InputError(f"no hardware profile {name_or_path!r} (known: {', '.join(list_profiles())})",
                     field="hardware")


def profile_from_dict(data: dict, *, file: str | None = None, prefix: str = "") -> HardwareProfile:
    return build(HardwareProfile, data, file=file, prefix=prefix)


def load_profile(name_or_path: str, base: Path | None = None) -> HardwareProfile:
    path = _resolve(name_or_path, base)
    try:
        data = safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise InputError(f"malformed YAML: {e}".replace("\n", " "), file=str(path)) from None
    except RecursionError:
        raise InputError("malformed YAML: nested too deeply", file=str(path)) from None
    return profile_from_dict(data, file=str(path))
