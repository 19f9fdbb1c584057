"""Typed scenario configuration (pydantic) and YAML loading with path-precise errors.

Config objects are frozen and forbid unknown keys. `load_scenario(path, overrides)` resolves the
model preset, the hardware profile and relative paths, so the engine gets plain, checked objects.
"""
from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import InputError, pydantic_message
from .hardware.profile import HardwareProfile, load_profile, profile_from_dict
from .hardware.runtime import RuntimeCosts, load_runtime
from .models import ModelSpec, get_preset, preset_names
from .yamlsafe import safe_load as _safe_load


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class TierConfig(_Strict):
    """One cache tier: capacity in experts or in GB (not both), eviction policy, partitioning."""

    capacity_experts: int | None = Field(None, ge=0, description="experts held; per layer with per_layer")
    capacity_gb: float | None = Field(None, ge=0)
    policy: str = Field("lru", description="eviction policy (moesim validate lists them)")
    partition: Literal["global", "per_layer"] = "global"
    allocation: Literal["uniform", "proportional", "optimal"] = Field(
        "uniform", description="per_layer only: split the total (capacity x layers) evenly, by routing "
                               "entropy, or to minimise replay misses from each layer's miss curve")
    admission: Literal["none", "second_touch"] = Field(
        "none", description="second_touch: a first-time expert is kept on probation, first to go")
    preload: Literal["none", "popular"] = Field(
        "none", description="gpu only: fill the tier before the run with the experts the trace routes to most "
                            "(Fiddler's placement by offline popularity; profiled on the run's own trace, so an "
                            "optimistic placement)")

    @property
    def policy_name(self) -> str:
        """The policy as the cache names it (admission filter as a suffix)."""
        return self.policy + ("+second_touch" if self.admission == "second_touch" else "")

    @model_validator(mode="after")
    def _one_capacity(self):
        if self.allocation != "uniform" and self.partition != "per_layer":
            raise ValueError(f"allocation {self.allocation!r} needs partition: per_layer")
        if self.capacity_experts is not None and self.capacity_gb is not None:
            raise ValueError("give capacity_experts or capacity_gb, not both")
        if self.capacity_experts is None and self.capacity_gb is None:
            raise ValueError("give capacity_experts or capacity_gb")
        return self

    def experts(self, expert_bytes: int) -> int:
        """Capacity in whole experts (per layer with partition: per_layer)."""
        if self.capacity_experts is not None:
            return self.capacity_experts
        return int(self.capacity_gb * 1e9 // expert_bytes)


class CacheConfig(_Strict):
    gpu: TierConfig
    dram: TierConfig | None = Field(
        None, description="host-DRAM tier; leave out to hold every expert in host memory")
    kv_cache: bool = Field(False, description="the GPU tier holds at most what resident weights, activations "
                                              "and the batch's KV cache leave free (shrinks as sequences grow)")


class PredictorConfig(BaseModel):
    """`name` picks a registered predictor; other keys are its parameters (checked by it)."""

    model_config = ConfigDict(frozen=True, extra="allow")
    name: str = "on_demand"

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class SLOConfig(_Strict):
    """Per-request latency targets; a request attains the SLO when it meets every target given."""

    ttft_ms: float | None = Field(None, gt=0, description="time to first token, from arrival")
    tpot_ms: float | None = Field(None, gt=0, description="time per output token after the first")


MAX_BATCH = 65536   # sequences in one step; vLLM's default max_num_seqs is 256


class BatchConfig(_Strict):
    """The batch scheduler (engine/scheduler.py): arrivals, static or continuous batching, dedup."""

    size: int = Field(1, ge=1, le=MAX_BATCH, description="static: requests per batch; continuous: most running "
                                                          "sequences, unless max_batch_size is given (at most "
                                                          "65,536: far beyond what a serving engine batches)")
    scheduler: Literal["static", "continuous"] = Field(
        "static", description="static: fill a batch, run it to completion; continuous: iteration-level "
                              "(Orca/vLLM), admit waiting requests at every step")
    dedup: bool = Field(True, description="load each expert once per step and layer for the whole batch")
    arrivals: Literal["closed", "poisson", "trace"] = Field(
        "closed", description="closed: fixed concurrency, a request arrives when the scheduler can take it; "
                              "poisson: open loop at rate_per_s; trace: the trace's arrival_s column")
    rate_per_s: float | None = Field(None, gt=0, description="poisson: mean arrivals per second")
    max_batch_size: int | None = Field(None, ge=1, le=MAX_BATCH,
                                       description="continuous: most sequences in a step (default: size)")
    max_tokens_per_step: int | None = Field(
        None, ge=1, description="continuous: most tokens (prefill + decode) in a step (None: no limit)")
    chunked_prefill: bool = Field(False, description="continuous: split a prompt across steps to fit "
                                                     "max_tokens_per_step")
    admission: Literal["fcfs", "expert_affinity"] = Field(
        "fcfs", description="order waiting requests are taken in; expert_affinity prefers those whose "
                            "experts overlap the running batch's (an experiment)")
    affinity_window: int = Field(16, ge=1, description="expert_affinity: waiting requests considered "
                                                       "(oldest first); one passed over this often goes next")
    max_wait_ms: float = Field(0.0, ge=0, description="static with open arrivals: wait up to this long "
                                                      "after the oldest waiting request for a full batch")
    slo: SLOConfig | None = Field(None, description="latency targets for SLO attainment")
    max_context: int | None = Field(None, ge=1, description="cache.kv_cache: KV positions reserved per sequence "
                                                            "when admitting it (default: the longest sequence)")

    @model_validator(mode="after")
    def _check(self):
        if self.arrivals == "poisson" and self.rate_per_s is None:
            raise ValueError("arrivals: poisson needs rate_per_s")
        if self.arrivals != "poisson" and self.rate_per_s is not None:
            raise ValueError(f"rate_per_s is only used with arrivals: poisson (arrivals is {self.arrivals!r})")
        if self.scheduler == "continuous":
            if self.chunked_prefill and self.max_tokens_per_step is None:
                raise ValueError("chunked_prefill needs max_tokens_per_step (the chunk budget)")
            if self.max_tokens_per_step is not None and self.max_tokens_per_step < self.batch_limit:
                raise ValueError(f"max_tokens_per_step ({self.max_tokens_per_step}) is below the batch size "
                                 f"({self.batch_limit}): a step could not hold one decode token per sequence")
        return self

    @property
    def batch_limit(self) -> int:
        """Most sequences in a step: `size` (static), `max_batch_size` or `size` (continuous)."""
        return self.max_batch_size if self.scheduler == "continuous" and self.max_batch_size else self.size


class SyntheticTrace(_Strict):
    preset: str | None = None
    params_file: str | None = Field(None, description="a fitted preset YAML (`moesim trace fit`), relative to "
                                                      "the scenario file")
    requests: int = Field(8, gt=0)
    prompt_len: int = Field(32, gt=0)
    decode_len: int = Field(64, ge=0)
    pre_attn: bool = False
    model_seed: int | None = Field(None, ge=0, description="draw the synthetic model (gates, popularity) from this "
                                   "seed and only the requests from the scenario's seed; default: both from seed")


class TraceConfig(_Strict):
    path: str | None = None
    synthetic: SyntheticTrace | None = None

    @model_validator(mode="after")
    def _one(self):
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("give exactly one of path or synthetic")
        return self


class StandinConfig(_Strict):
    """Low-bit stand-ins (HOBBIT): a missing expert whose gate score is below `threshold` is loaded
    at `bits` per parameter instead (fewer bytes over the link); needs a trace with `scores`."""

    bits: float = Field(4.0, gt=0, description="bits per parameter of the stand-in copy")
    threshold: float = Field(0.1, ge=0, le=1, description="largest gate weight (probability) any token gave "
                                                          "the expert this step, below which it is stood in for")


class Scenario(_Strict):
    name: str = "scenario"
    seed: int = Field(0, ge=0, description="seeds every random draw of the run (numpy Generators)")
    model: ModelSpec
    hardware: HardwareProfile
    trace: TraceConfig
    cache: CacheConfig
    predictor: PredictorConfig = PredictorConfig()
    batch: BatchConfig = BatchConfig()
    runtime: RuntimeCosts | None = Field(None, description="software-stack costs (runtimes/ preset, path or "
                                                           "inline); None (`none`): the pure-hardware model")
    miss: Literal["wait", "cpu", "auto"] = Field(
        "wait", description="an expert not on the GPU: wait for its copy, compute it on the host CPU "
                            "(activations cross the link both ways), or per expert whichever finishes first")
    standin: StandinConfig | None = Field(None, description="low-bit stand-ins for low-score misses (HOBBIT)")
    output: str | None = None
    base_dir: str = Field(".", description="directory relative paths are resolved against")

    def resolve(self, p: str) -> Path:
        """A relative path is taken relative to the scenario file, else to the working directory."""
        q = Path(p)
        if q.is_absolute():
            return q
        beside = Path(self.base_dir) / q
        return beside if beside.exists() or not q.exists() else q


def _set_path(data: dict, dotted: str, value: Any, file: str | None) -> None:
    parts = dotted.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part) if isinstance(node, dict) else None
        if nxt is None:
            nxt = {}
            node[part] = nxt
        elif isinstance(nxt, str) and part in ("model", "hardware", "runtime"):
            nxt = {"profile": nxt} if part == "hardware" else {"preset": nxt}
            node[part] = nxt
        elif not isinstance(nxt, dict):
            raise InputError(f"cannot set {dotted}: {'.'.join(parts[:i + 1])} is not a mapping",
                             file=file, field=dotted)
        node = nxt
    node[parts[-1]] = value


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...], file: str | None = None) -> dict:
    """Apply `--set a.b.c=value` overrides; values are parsed as YAML scalars/lists."""
    data = copy.deepcopy(data)
    for item in overrides or ():
        if "=" not in item:
            raise InputError(f"--set expects path=value, got {item!r}", field="--set")
        key, raw = item.split("=", 1)
        try:
            value = _safe_load(raw)
        except yaml.YAMLError:
            value = raw
        _set_path(data, key.strip(), value, file)
    return data


def set_fields(data: dict, fields: dict[str, Any], file: str | None = None) -> dict:
    """A copy of `data` with each dotted path of `fields` set to its (already parsed) value."""
    data = copy.deepcopy(data)
    for key, value in (fields or {}).items():
        _set_path(data, str(key).strip(), value, file)
    return data


def _resolve_model(raw: Any, file: str | None) -> ModelSpec:
    try:
        if isinstance(raw, str):
            return get_preset(raw)
        if isinstance(raw, dict):
            raw = dict(raw)
            preset = raw.pop("preset", None)
            if preset is not None:
                base = get_preset(preset).model_dump()
                base.update(raw)
                return ModelSpec(**base)
            return ModelSpec(**raw)
    except KeyError as e:
        raise InputError(f"unknown model preset {e.args[0]!r} (known: {', '.join(preset_names())})",
                         file=file, field="model") from None
    except ValidationError as e:
        raise pydantic_message(e, file=file, prefix="model") from None
    raise InputError(f"expected a preset name or a mapping, got {type(raw).__name__}", file=file, field="model")


def _resolve_hardware(raw: Any, file: str | None, base: Path) -> HardwareProfile:
    if isinstance(raw, str):
        try:
            return load_profile(raw, base)
        except InputError as e:
            if e.file:
                raise
            raise InputError(e.detail, file=file, field="hardware") from None
    if isinstance(raw, dict):
        raw = dict(raw)
        prof = raw.pop("profile", None)
        if prof is not None:
            merged = load_profile(prof, base).model_dump()
            for sec, val in raw.items():  # shallow-per-section merge of overrides
                if isinstance(val, dict) and isinstance(merged.get(sec), dict):
                    merged[sec] = {**merged[sec], **val}
                else:
                    merged[sec] = val
            return profile_from_dict(merged, file=file, prefix="hardware")
        return profile_from_dict(raw, file=file, prefix="hardware")
    raise InputError(f"expected a profile name, path or mapping, got {type(raw).__name__}",
                     file=file, field="hardware")


def scenario_from_dict(data: Any, *, file: str | None = None, base_dir: Path | None = None) -> Scenario:
    """Validate a scenario mapping (after overrides) into a Scenario."""
    if not isinstance(data, dict):
        raise InputError(f"expected a mapping at top level, got {type(data).__name__}", file=file)
    base = Path(base_dir) if base_dir is not None else Path(".")
    data = dict(data)
    for required in ("model", "hardware", "trace", "cache"):
        if required not in data:
            raise InputError("missing required key", file=file, field=required)
    data["model"] = _resolve_model(data["model"], file)
    data["hardware"] = _resolve_hardware(data["hardware"], file, base)
    data["runtime"] = load_runtime(data.get("runtime"), file=file, base=base)
    if isinstance(data.get("trace"), str):
        data["trace"] = {"path": data["trace"]}
    if isinstance(data.get("predictor"), str):
        data["predictor"] = {"name": data["predictor"]}
    data.setdefault("base_dir", str(base))
    try:
        sc = Scenario(**data)
    except ValidationError as e:
        raise pydantic_message(e, file=file) from None
    check_scenario(sc, file)
    return sc


#: The module holding the checks against the registries above config (eviction policies, predictors): loaded
#: by name when a scenario is checked, so that config, the bottom layer, imports no package above it.
REGISTRY_CHECKS = "moesim.config_checks"


def _registry_checks() -> tuple:
    return importlib.import_module(REGISTRY_CHECKS).CHECKS


def check_scenario(sc: Scenario, file: str | None) -> None:
    """Cross-field checks: names against the registries (`config_checks`), then capacities against the model
    and the hardware."""
    for check in _registry_checks():
        check(sc, file)
    m, hw = sc.model, sc.hardware
    for tier_name in ("gpu", "dram"):
        tier = getattr(sc.cache, tier_name)
        if tier is None:
            continue
        field = f"cache.{tier_name}"
        if tier_name == "dram" and tier.preload != "none":
            raise InputError("preload applies to the gpu tier only", file=file, field="cache.dram.preload")
        n = tier.experts(m.expert_bytes)
        per = tier.partition == "per_layer"
        if per and n > m.num_experts:
            raise InputError(
                f"with partition: per_layer the capacity is per layer: {n} experts per layer, but a layer "
                f"has only {m.num_experts} (for {n} experts in all, use {max(m.top_k, n // m.num_layers)} "
                f"per layer, or partition: global)", file=file,
                field=f"{field}.{'capacity_experts' if tier.capacity_experts is not None else 'capacity_gb'}")
        if n < m.top_k:
            raise InputError(
                f"capacity of {n} expert(s){' per layer' if per else ''} is smaller than top_k={m.top_k}: "
                "a token's experts could not be resident together", file=file, field=field)
        if tier.capacity_gb is not None and tier.capacity_gb > (hw.gpu.memory_gb if tier_name == "gpu"
                                                               else hw.host_dram.capacity_gb):
            raise InputError(f"capacity_gb {tier.capacity_gb:g} exceeds the "
                             f"{'GPU memory' if tier_name == 'gpu' else 'host DRAM'} of profile {hw.name!r}",
                             file=file, field=f"{field}.capacity_gb")
        cache_bytes = min(n * (m.num_layers if per else 1), m.total_experts) * m.expert_bytes
        if tier_name == "gpu":
            need, have = cache_bytes + m.resident_bytes, hw.gpu.memory_gb
            what = f"{cache_bytes / 1e9:.2f} GB of cached experts + {m.resident_bytes / 1e9:.2f} GB of resident weights"
        else:
            need, have = cache_bytes, hw.host_dram.capacity_gb
            what = f"{cache_bytes / 1e9:.2f} GB of experts"
        if need > have * 1e9 and not (tier_name == "gpu" and sc.cache.kv_cache):  # kv_cache: a bound, sized per step
            raise InputError(f"{what} does not fit the {have:g} GB of "
                             f"{'GPU memory' if tier_name == 'gpu' else 'host DRAM'} in profile {hw.name!r}",
                             file=file, field=field)
    if sc.cache.dram is None and m.total_experts * m.expert_bytes > hw.host_dram.capacity_gb * 1e9:
        raise InputError(
            f"without a dram tier host memory must hold every expert "
            f"({m.total_experts * m.expert_bytes / 1e9:.1f} GB) but profile {hw.name!r} has "
            f"{hw.host_dram.capacity_gb:g} GB; add cache.dram with a capacity", file=file, field="cache.dram")
    if sc.standin is not None and sc.standin.bits >= 8 * m.component_bytes_per_param("experts"):
        raise InputError(f"a stand-in of {sc.standin.bits:g} bits is no smaller than the experts' "
                         f"{8 * m.component_bytes_per_param('experts'):g} bits", file=file, field="standin.bits")
    if sc.runtime is not None and sc.runtime.evict_writeback == "d2h_stream" and hw.pcie_d2h is None:
        raise InputError(f"evict_writeback: d2h_stream needs the hardware profile's pcie_d2h section, which profile "
                         f"{hw.name!r} lacks", file=file, field="runtime.evict_writeback")
    if sc.miss != "wait":
        for sec in ("host_cpu", "pcie_d2h"):
            if getattr(hw, sec) is None:
                raise InputError(f"miss: {sc.miss} needs the hardware profile's {sec} section, which profile "
                                 f"{hw.name!r} lacks", file=file, field=f"hardware.{sec}")

def read_yaml(path: str | Path) -> Any:
    p = Path(path)
    if not p.is_file():
        raise InputError("file not found", file=str(p))
    try:
        return _safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise InputError(f"malformed YAML: {' '.join(str(e).split())}", file=str(p)) from None
    except RecursionError:
        raise InputError("malformed YAML: nested too deeply", file=str(p)) from None
    except UnicodeDecodeError:
        raise InputError("not a text file", file=str(p)) from None


def load_scenario(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Scenario:
    """Load a scenario YAML, apply `--set` overrides, validate everything."""
    p = Path(path)
    data = read_yaml(p)
    if not isinstance(data, dict):
        raise InputError(f"expected a mapping at top level, got {type(data).__name__}", file=str(p))
    data = apply_overrides(data, overrides, str(p))
    data.setdefault("name", p.stem)
    return scenario_from_dict(data, file=str(p), base_dir=p.parent)


def scenario_json_schema() -> dict:
    return Scenario.model_json_schema()
