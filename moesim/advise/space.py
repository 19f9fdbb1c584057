"""The search space: knobs (optuna distributions) and how a configuration becomes a scenario.

A configuration maps each knob to a value; `Space.overrides` turns it into dotted-path overrides of
one base scenario (as a sweep point), sizing the GPU cache from the chosen GPU's memory.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import _resolve_model
from ..errors import InputError
from ..hardware.profile import load_profile
from .spec import AdviseSpec

SAMPLE_TRACES = {"olmoe-1b-7b": "olmoe-sample.parquet", "switch-base-128": "switch-sample.parquet",
                 "tiny-olmoe-stdlib": "tiny-learned.parquet"}
TRACE_DIR = Path(__file__).resolve().parents[2] / "traces"


class Infeasible(Exception):
    """A configuration that cannot be built (a cache below top_k experts): pruned, never simulated."""


def label(v: Any) -> Any:
    """A knob value as optuna can store it: mappings and lists become compact JSON."""
    return json.dumps(v, sort_keys=True, separators=(",", ":")) if isinstance(v, (dict, list)) else v


@dataclass(frozen=True)
class Knob:
    """One searched knob. Numeric choices are ordinal (an integer index the sampler can order)."""

    path: str
    values: tuple

    @property
    def ordinal(self) -> bool:
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.values)

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, IntDistribution

        if self.ordinal:
            return IntDistribution(0, len(self.values) - 1)
        return CategoricalDistribution([label(v) for v in self.values])

    def value(self, param: Any) -> Any:
        if self.ordinal:
            return self.values[int(param)]
        return next(v for v in self.values if label(v) == param)

    def param(self, value: Any) -> Any:
        return self.values.index(value) if self.ordinal else label(value)


class Space:
    """The knobs of an advise file and the base scenario every configuration overrides."""

    def __init__(self, spec: AdviseSpec, file: str | None = None):
        self.spec, self.file = spec, file
        self.knobs = [Knob(k, tuple(v)) for k, v in spec.knobs.items()]
        self.model = _resolve_model(spec.model, file)
        self._profiles: dict[str, Any] = {}

    def distributions(self) -> dict:
        return {k.path: k.distribution() for k in self.knobs}

    def config(self, params: dict) -> dict:
        """Knob values of an optuna trial's params."""
        return {k.path: k.value(params[k.path]) for k in self.knobs}

    def params(self, config: dict) -> dict:
        return {k.path: k.param(config[k.path]) for k in self.knobs}

    def grid(self) -> dict:
        """optuna GridSampler's search space: every param value."""
        return {k.path: list(range(len(k.values))) if k.ordinal else [label(v) for v in k.values]
                for k in self.knobs}

    @property
    def size(self) -> int:
        n = 1
        for k in self.knobs:
            n *= len(k.values)
        return n

    def profile(self, name: str):
        if name not in self._profiles:
            try:
                self._profiles[name] = load_profile(name, Path(self.spec.base_dir))
            except InputError as e:
                raise InputError(e.detail, file=e.file or self.file, field=e.field or "hardware") from None
        return self._profiles[name]

    def trace(self) -> Any:
        """The scenario's trace: the file's, else the model's shipped sample, else a synthetic one."""
        t, w = self.spec.trace, self.spec.workload
        if t is None:
            sample = SAMPLE_TRACES.get(self.model.name)
            if sample and (TRACE_DIR / sample).is_file():
                return str(TRACE_DIR / sample)
            return {"synthetic": {"requests": w.requests, "prompt_len": w.prompt_len, "decode_len": w.decode_len}}
        if isinstance(t, str):
            p = Path(t)
            return str(p if p.is_absolute() else (Path(self.spec.base_dir) / p).resolve())
        return t

    def base(self) -> dict:
        """The scenario every configuration overrides (hardware and cache come from the knobs)."""
        s = self.spec
        batch: dict[str, Any] = {"arrivals": s.workload.arrivals,
                                 "slo": {k: v for k, v in (("tpot_ms", s.slo.tpot_ms), ("ttft_ms", s.slo.ttft_ms))
                                         if v is not None}}
        if s.workload.rate_per_s is not None:
            batch["rate_per_s"] = s.workload.rate_per_s
        return {"name": s.name, "seed": s.seed, "model": s.model, "hardware": s.hardware[0].profile,
                "trace": self.trace(), "cache": {"gpu": {"capacity_experts": self.model.top_k}},
                "predictor": "on_demand", "batch": batch}

    def longest_sequence(self) -> int:
        """Prompt + decode tokens of the trace's longest request (KV positions reserved per sequence
        when `cache.kv_cache` is searched)."""
        if not hasattr(self, "_longest"):
            t = self.trace()
            if isinstance(t, dict):
                syn = t["synthetic"]
                self._longest = syn["prompt_len"] + syn["decode_len"]
            else:
                from ..traces import TraceReader

                self._longest = max(r.prompt_len + r.decode_len for r in TraceReader(t).iter_requests(
                    pre_attn=False, scores=False))
        return self._longest

    def model_for(self, config: dict):
        """The model with the configuration's `model.*` knobs (precision, say) applied."""
        changes = {k.split(".", 1)[1]: v for k, v in config.items() if k.startswith("model.")}
        if not changes:
            return self.model
        raw = self.spec.model
        raw = {"preset": raw} if isinstance(raw, str) else dict(raw)
        return _resolve_model({**raw, **changes}, self.file)

    def cache_experts(self, hw, fraction: float, per_layer: bool, model=None) -> int:
        """Experts the GPU tier holds (per layer with per_layer): `fraction` of the free memory."""
        m, mem = model or self.model, self.spec.memory
        free = hw.gpu.memory_gb * 1e9 * (1 - mem.gpu_reserve_fraction) - m.resident_bytes
        n = int(max(free, 0) * fraction // m.expert_bytes)
        n = min(n, m.total_experts)
        return n // m.num_layers if per_layer else n

    def overrides(self, config: dict) -> dict:
        """Dotted-path overrides of `base()` for one configuration (Infeasible if it cannot be built)."""
        m = self.model_for(config)
        hw_name = config.get("hardware", self.spec.hardware[0].profile)
        hw = self.profile(hw_name)
        gpu = {k.split(".", 2)[2]: v for k, v in config.items() if k.startswith("cache.gpu.")}
        per_layer = gpu.get("partition") == "per_layer"
        n = self.cache_experts(hw, float(config.get("cache_fraction", 1.0)), per_layer, m)
        if n < m.top_k:
            raise Infeasible(f"{hw_name}: a cache of {n} expert(s){' per layer' if per_layer else ''} is below "
                             f"top_k={m.top_k}")
        if config.get("miss", "wait") != "wait" and (hw.host_cpu is None or hw.pcie_d2h is None):
            raise Infeasible(f"{hw_name}: miss: {config['miss']} needs the profile's host_cpu and pcie_d2h sections")
        out: dict[str, Any] = {"hardware": hw_name, "cache.gpu": {"capacity_experts": n, **gpu}}
        if config.get("cache.kv_cache") and "batch.max_context" not in config:
            out["batch.max_context"] = self.longest_sequence()
        if m.total_experts * m.expert_bytes > hw.host_dram.capacity_gb * 1e9:
            out["cache.dram"] = {"capacity_gb": round(hw.host_dram.capacity_gb * self.spec.memory.host_dram_fraction, 3)}
        for k, v in config.items():
            if k not in ("hardware", "cache_fraction") and not k.startswith("cache.gpu."):
                out[k] = v
        return out
