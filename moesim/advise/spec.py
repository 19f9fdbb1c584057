"""The advise file: a model, a trace, candidate GPUs, a workload, an SLO and an objective.

    name: mixtral-24-vs-80          # default: the file's stem
    model: mixtral-8x7b             # a preset, or a mapping as in a scenario
    hardware: [rtx4090-pcie4, {profile: a100-80gb-pcie4, price_per_hour: 1.9}]
    trace: traces/x.parquet         # or {synthetic: {...}}; default: the model's shipped sample, else synthetic
    workload: {arrivals: closed, requests: 8, prompt_len: 32, decode_len: 32}
    slo: {tpot_ms: 2000, percentile: p99}
    objective: tokens_per_dollar    # tokens_per_s | tokens_per_dollar | cost_at_throughput (+ target_tokens_per_s)
    search: {trials: 24, sampler: tpe, seed: 0}
    space: {batch.size: [1, 4, 16]} # replaces the default choices of these knobs only; any scenario path
                                    # may be added, e.g. miss: [wait, auto] or cache.kv_cache: [false, true]

Every field has a default except `model`, `hardware` and `slo`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..config import read_yaml
from ..errors import InputError, pydantic_message

OBJECTIVES = ("tokens_per_s", "tokens_per_dollar", "cost_at_throughput")
METRICS = ("tokens_per_s", "tokens_per_dollar", "cost_per_hour", "tpot_ms", "ttft_ms", "price_per_hour")

# The knobs searched unless the file's `space:` says otherwise. `cache_fraction` is the share of the
# GPU memory left after the resident weights and the reserve that holds experts; the others are
# dotted scenario paths. Predictors are the deployable ones (no oracle: it reads the future).
DEFAULT_SPACE: dict[str, list] = {
    "cache_fraction": [0.25, 0.5, 0.75, 1.0],
    "cache.gpu.policy": ["lru", "lfu", "fifo"],
    "cache.gpu.partition": ["global", "per_layer"],
    "predictor": ["on_demand", "topk", "intelligent"],
    "batch.size": [1, 2, 4, 8, 16],
    "batch.scheduler": ["static", "continuous"],
}
# What a user gets without advise: moesim's scenario defaults, the whole free GPU memory as cache.
DEFAULT_CONFIG: dict[str, Any] = {"cache_fraction": 1.0, "cache.gpu.policy": "lru", "cache.gpu.partition": "global",
                                  "predictor": "on_demand", "batch.size": 1, "batch.scheduler": "static"}


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class Candidate(_Strict):
    """One GPU to consider: a hardware profile and, optionally, your own price for it."""

    profile: str = Field(description="a profile in hardware_profiles/ or a path")
    price_per_hour: float | None = Field(None, gt=0, description="USD per GPU-hour; overrides prices.yaml")


class Workload(_Strict):
    arrivals: Literal["closed", "poisson"] = Field("closed", description="closed batch or open-loop Poisson")
    rate_per_s: float | None = Field(None, gt=0, description="poisson: mean arrivals per second")
    requests: int = Field(8, gt=0, description="synthetic trace: requests")
    prompt_len: int = Field(32, gt=0, description="synthetic trace: prompt tokens per request")
    decode_len: int = Field(32, gt=0, description="synthetic trace: decode tokens per request")

    @model_validator(mode="after")
    def _rate(self):
        if (self.arrivals == "poisson") != (self.rate_per_s is not None):
            raise ValueError("rate_per_s goes with arrivals: poisson, and only with it")
        return self


class SLO(_Strict):
    tpot_ms: float | None = Field(None, gt=0, description="time per output token target")
    ttft_ms: float | None = Field(None, gt=0, description="time to first token target")
    percentile: Literal["mean", "p50", "p90", "p99"] = Field("p99", description="which request percentile must meet it")

    @model_validator(mode="after")
    def _one(self):
        if self.tpot_ms is None and self.ttft_ms is None:
            raise ValueError("give tpot_ms and/or ttft_ms")
        return self


class Search(_Strict):
    trials: int = Field(24, ge=1, description="configurations to simulate; pruned ones and repeats are free "
                        "(at most 5 asks of the sampler per configuration)")
    sampler: Literal["tpe", "nsga2", "random", "grid"] = Field(
        "tpe", description="tpe: the objective; nsga2: the Pareto metrics as several objectives; grid: every point")
    seed: int = Field(0, description="seed of the sampler")
    pareto: list[Literal[METRICS]] = Field(["tokens_per_s", "tpot_ms"], min_length=2,
                                           description="metrics of the Pareto set (and of nsga2's objectives)")


class Memory(_Strict):
    gpu_reserve_fraction: float = Field(0.1, ge=0, lt=1, description="GPU memory kept for activations and KV "
                                        "cache (a choice, not a measurement)")
    host_dram_fraction: float = Field(0.9, gt=0, le=1, description="share of host DRAM the dram tier may use when "
                                      "host memory cannot hold every expert")


class AdviseSpec(_Strict):
    name: str = Field("advise", description="names the output dir and the recommended scenario")
    seed: int = Field(0, description="scenario seed (synthetic trace, arrivals, predictors)")
    model: str | dict = Field(description="a model preset, or a mapping as in a scenario")
    hardware: list[Candidate] = Field(min_length=1, description="candidate GPUs (profile names or mappings)")
    trace: str | dict | None = Field(None, description="a Parquet path or {synthetic: ...}; default: the model's "
                                     "shipped sample, else a synthetic trace of the workload's shape")
    workload: Workload = Field(Workload(), description="arrivals and the synthetic trace's shape")
    slo: SLO = Field(description="latency targets every recommended configuration meets")
    objective: Literal[OBJECTIVES] = Field("tokens_per_s", description="what the search maximises (or, for "
                                           "cost_at_throughput, minimises)")
    target_tokens_per_s: float | None = Field(None, gt=0, description="cost_at_throughput: the throughput to buy")
    search: Search = Field(Search(), description="sampler, budget, seed, Pareto metrics")
    space: dict[str, list] = Field(default_factory=dict, description="dotted path -> choices, replacing defaults")
    memory: Memory = Field(Memory(), description="how much GPU and host memory the caches may use")
    output: str | None = Field(None, description="default output dir (-o wins)")
    base_dir: str = Field(".", description="directory relative paths are resolved against")

    @model_validator(mode="after")
    def _check(self):
        if (self.objective == "cost_at_throughput") != (self.target_tokens_per_s is not None):
            raise ValueError("target_tokens_per_s goes with objective: cost_at_throughput, and only with it")
        for k, v in self.space.items():
            if not v:
                raise ValueError(f"space.{k}: give at least one value")
        return self

    @property
    def knobs(self) -> dict[str, list]:
        """The searched knobs: defaults with the file's `space:` on top, and `hardware` when several."""
        out = {**DEFAULT_SPACE, **self.space}
        if len(self.hardware) > 1:
            out = {"hardware": [c.profile for c in self.hardware], **out}
        return out

    @property
    def default_config(self) -> dict[str, Any]:
        """The default configuration, on the first GPU, restricted to the knobs searched."""
        d = {"hardware": self.hardware[0].profile, **DEFAULT_CONFIG}
        knobs = self.knobs
        return {k: (v if v in knobs[k] else knobs[k][0]) for k, v in d.items() if k in knobs}


def advise_from_dict(data: Any, *, file: str | None = None, base_dir: Path | None = None,
                     default_name: str = "advise") -> AdviseSpec:
    if not isinstance(data, dict):
        raise InputError(f"expected a mapping at top level, got {type(data).__name__}", file=file)
    data = dict(data)
    data.setdefault("name", default_name)
    data.setdefault("base_dir", str(base_dir or Path(".")))
    hw = data.get("hardware")
    if isinstance(hw, (str, dict)):
        hw = [hw]
    if isinstance(hw, list):
        data["hardware"] = [{"profile": h} if isinstance(h, str) else h for h in hw]
    try:
        return AdviseSpec(**data)
    except ValidationError as e:
        raise pydantic_message(e, file=file) from None


def load_advise(path: str | Path) -> AdviseSpec:
    """Read and check an advise YAML file (InputError naming the field when it is bad)."""
    p = Path(path)
    return advise_from_dict(read_yaml(p), file=str(p), base_dir=p.parent, default_name=p.stem)
