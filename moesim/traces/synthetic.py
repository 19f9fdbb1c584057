"""Synthetic routing traces from a latent-gate model (DESIGN §2, "Synthetic traces").

Per request r, token t and MoE layer l a hidden vector h (dimension d) drives the gate:

    innovations  ε_l(t) = τ·ε_l(t-1) + sqrt(1-τ²)·ξ_l(t)          (AR(1) across tokens: temporal locality)
    residual     u_0(t) = ε_0(t),  u_l(t) = ρ·u_{l-1}(t) + sqrt(1-ρ²)·ε_l(t)   (AR(1) across layers)
    hidden       h_l(t) = sqrt(1-w)·u_l(t) + sqrt(w)·c_r              (c_r: the request's topic vector)
    gate         experts_l(t) = topk( W_l·(h_l(t) + a·η_l(t)) / sqrt(1+a²) + b_l )

with ξ, η, c ~ N(0, I) i.i.d. So h_0(t) = τ·h_0(t-1) + sqrt(1-τ²)·noise (+ topic), every h_l has unit
variance per dimension, corr(h_l(t), h_{l+1}(t)) ≈ ρ and corr(h_l(t), h_l(t-1)) ≈ τ (before the topic).

- ρ (`rho`) sets inter-layer predictability: h_l is what a speculative (next-layer) predictor sees.
- `attention_noise` a is what attention adds after the pre-attention point: `pre_attn` = h_l, so a
  same-layer pre-attention predictor's accuracy falls as a grows.
- `popularity_skew` s gives the bias b_l[e] = -s·ln(rank_l(e)) (a random rank per layer; Zipf-like:
  s = 0 is uniform popularity).
- τ (`tau`) and the topic weight w (`topic_weight`) set temporal locality: token-to-token reuse, and
  a per-request working set (MoE-Infinity's "sparse activation per request").

- `gate_affinity` κ relates consecutive routers: W_{l+1}[π_l(e)] = κ·W_l[e] + sqrt(1-κ²)·fresh rows
  (π_l a random permutation), so expert e at layer l has a likely successor π_l(e) at l+1 — the
  inter-layer expert affinity of real models (ExFlow). With independent routers (κ = 0) ρ alone
  barely moves the first-order "top-1 at l -> top-1 at l+1" predictability; with κ > 0 it does
  (ρ = 0 still means no inter-layer predictability, whatever κ).

Phase structure (fitted presets; off by default): `prompt_tau` gives prompt tokens their own locality
(logit(prompt_tau) + tau_spread·z_r), so tau_r shapes the decode; `loop_share` makes decode tokens repeat the
latent state of the token loop_period_r back (greedy-decode loops, period drawn per request); `tail_prob` samples
a token's k-th expert from softmax(logits / tail_temperature) over the experts not among its first k-1 (a
low-confidence last choice: one-off experts). Their draws come after the others from each request's generator.

W_l (rows N(0, I/d)) and b_l are fixed per layer and drawn first from the generator, then the
per-request lengths, then one seed per request; each request's noise comes from its own seeded
generator, so output does not depend on how requests are chunked. Same generator state → the
same rows → byte-identical files.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Iterator

import numpy as np
import pyarrow as pa
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import InputError, pydantic_message
from .io import DEFAULT_ROW_GROUP_ROWS, write_trace
from .routing_targets import MIXTRAL_TABLE5_SOURCE, knot_skews
from .schema import TraceMeta
from .synthetic_chunk import _chunk


class SyntheticParams(BaseModel):
    """Knobs of the latent-gate generator."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rho: float = Field(0.8, ge=0.0, le=1.0, description="layer-to-layer correlation of the hidden state")
    tau: float = Field(0.5, ge=0.0, le=1.0, description="token-to-token correlation of the hidden state")
    attention_noise: float = Field(0.5, ge=0.0, description="std of what attention adds after pre_attn")
    popularity_skew: Annotated[float, Field(ge=0.0)] | tuple[Annotated[float, Field(ge=0.0)], ...] = Field(
        0.3, description="Zipf-like exponent of the per-layer gate bias: one for every layer, or one per layer")
    hidden_dim: int = Field(32, ge=2, le=1024, description="dimension of the latent vector h")
    topic_weight: float = Field(0.2, ge=0.0, le=1.0, description="share of h's variance from a per-request topic")
    gate_affinity: float = Field(0.8, ge=0.0, le=1.0,
                                 description="correlation of layer l+1's gate rows with a permutation of layer l's")
    tau_spread: float = Field(0.0, ge=0.0, le=10.0,
                              description="requests differ in locality: request r uses tau_r = sigmoid(logit(tau) + "
                                          "tau_spread·z_r), z_r ~ N(0, 1) (0: every request uses tau)")
    # phase structure (fitted presets): an exploring prompt, greedy-decode loops, and low-confidence last
    # choices. At their defaults nothing is drawn or changed (the existing presets' bytes and source strings stay).
    prompt_tau: float | None = Field(None, ge=0.0, le=1.0,
                                     description="prompt tokens use sigmoid(logit(prompt_tau) + tau_spread·z_r) "
                                                 "instead of tau_r (None: tau_r throughout)")
    loop_share: float = Field(0.0, ge=0.0, lt=1.0,
                              description="greedy-decode loops: each decode token, with this probability, takes the "
                                          "latent state of the token loop_period_r back (a repeat) instead of an "
                                          "AR(1) step; loop_period_r is drawn per request, uniform in loop_period "
                                          "(0: no loops)")
    loop_period: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] = Field(
        (4, 16), description="(min, max) loop period in tokens")
    tail_prob: float = Field(0.0, ge=0.0, lt=1.0,
                             description="low-confidence last choice: each token's k-th expert, with this "
                                         "probability, is instead sampled from softmax(logits / tail_temperature) "
                                         "over the experts not among its first k-1 (0: never)")
    tail_temperature: float = Field(3.0, gt=0.0, le=100.0, description="temperature of a tail_prob draw")
    # fitted presets (`moesim trace fit`): the popularity shape a Zipf exponent cannot give (dead experts,
    # flat heads). `describe()` leaves tau_spread out at 0 and shows rank_bias as its shape, so the
    # existing presets' source strings (and the sample traces' bytes) are unchanged.
    rank_bias: tuple[tuple[float, ...], ...] | None = Field(
        None, description="per layer, a gate-bias correction for each popularity rank (most popular first), "
                          "added to the Zipf term")

    @model_validator(mode="after")
    def _period_order(self):
        if self.loop_period[0] > self.loop_period[1]:
            raise ValueError(f"loop_period: expected (min, max) with min <= max, got {self.loop_period}")
        return self

    def describe(self) -> str:
        d = self.model_dump()
        if not d["tau_spread"]:
            del d["tau_spread"]
        if not d["tail_prob"]:
            del d["tail_prob"], d["tail_temperature"]
        if d["prompt_tau"] is None:
            del d["prompt_tau"]
        if not d["loop_share"]:
            del d["loop_share"], d["loop_period"]
        rb = d.pop("rank_bias")
        if rb is not None:
            d["rank_bias"] = f"{len(rb)}x{len(rb[0]) if rb else 0}"
        return ",".join(f"{k}={_fmt(v)}" for k, v in d.items())


def _fmt(v) -> str:
    if isinstance(v, (tuple, list)):
        return "/".join(_fmt(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


DEFAULT_PARAMS = SyntheticParams()

# ---- presets, keyed by MODEL preset name: data in synthetic_presets.yaml, with their sources ----
PRESETS_FILE = Path(__file__).with_name("synthetic_presets.yaml")


def _preset_params(d: dict) -> SyntheticParams:
    """A preset's SyntheticParams; a popularity_skew of {knots, layers} is per layer (knot_skews)."""
    skew = d.get("popularity_skew")
    if isinstance(skew, dict):
        d = {**d, "popularity_skew": knot_skews(tuple(skew["knots"]), skew["layers"])}
    return SyntheticParams(**d)


def _load_presets() -> tuple[dict[str, SyntheticParams], dict[str, str], dict[str, str]]:
    """(params, source, model) by preset name, from synthetic_presets.yaml."""
    with open(PRESETS_FILE, encoding="utf-8") as f:
        table = yaml.safe_load(f)
    return ({name: _preset_params(e["params"]) for name, e in table.items()},
            {name: e["source"].replace("{MIXTRAL_TABLE5_SOURCE}", MIXTRAL_TABLE5_SOURCE) for name, e in table.items()},
            {name: e["model"] for name, e in table.items() if "model" in e})


# PRESET_MODELS: synthetic presets not named after a model preset -> the model whose shape they route
PRESETS, PRESET_SOURCES, PRESET_MODELS = _load_presets()


def resolve_params(spec_name: str, params=None, preset: str | None = None) -> tuple[str, SyntheticParams]:
    """(preset label, params): explicit params win; else the preset (default: the model's name).

    A model without a synthetic preset gets DEFAULT_PARAMS (label "default", uncalibrated); naming a
    preset that does not exist is an error.
    """
    name = preset or spec_name
    if isinstance(params, SyntheticParams):
        return (preset or "custom"), params
    base = PRESETS.get(name)
    if base is None:
        if preset is not None and preset != spec_name:
            raise InputError(f"unknown synthetic preset {preset!r} (known: {', '.join(sorted(PRESETS))})",
                             field="preset")
        base, name = DEFAULT_PARAMS, "default"
    if params is None:
        return name, base
    if not isinstance(params, dict):
        raise TypeError(f"params must be SyntheticParams, a dict or None, got {type(params).__name__}")
    try:
        return name, SyntheticParams(**{**base.model_dump(), **params})
    except ValidationError as e:
        raise pydantic_message(e, prefix="synthetic") from None


def _lengths(value, n: int, rng: np.random.Generator, name: str, lo_ok: int) -> np.ndarray:
    if isinstance(value, np.ndarray):   # one length per request (draws nothing)
        if value.shape != (n,) or value.dtype.kind not in "iu" or (n and int(value.min()) < lo_ok):
            raise InputError(f"expected {n} integers >= {lo_ok}, one per request (got shape {value.shape}, "
                             f"dtype {value.dtype})", field=name)
        return value.astype(np.int64)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if value < lo_ok:
            raise InputError(f"must be >= {lo_ok} (got {value})", field=name)
        return np.full(n, int(value), dtype=np.int64)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, (int, np.integer)) for v in value):
        lo, hi = int(value[0]), int(value[1])
        if lo < lo_ok or hi < lo:
            raise InputError(f"expected (min, max) with {lo_ok} <= min <= max (got {tuple(value)})", field=name)
        return rng.integers(lo, hi + 1, size=n).astype(np.int64)
    raise InputError(f"expected an int or a (min, max) pair (got {value!r})", field=name)


def _longest(value) -> int:
    """The most tokens a length argument (int, (min, max) or an array per request) can give."""
    if isinstance(value, np.ndarray):
        return int(value.max()) if value.size and value.dtype.kind in "iu" else 0
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, (int, np.integer)) for v in value):
        return int(value[1])
    return int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else 0


def check_memory(spec, p: "SyntheticParams", requests: int, prompt_len, decode_len, field_prefix: str = "") -> None:
    """Refuse, before allocating, a trace whose generation would not fit in memory (budget.py)."""
    from .. import budget

    L, E, K = _shape(spec)
    longest = _longest(prompt_len) + _longest(decode_len)
    need = budget.synthetic_bytes(L, E, K, p.hidden_dim, requests, longest)
    one = need - budget.synthetic_bytes(L, E, K, p.hidden_dim, requests, 0)
    if one > budget.synthetic_bytes(L, E, K, p.hidden_dim, requests, 0):   # one long request dominates
        budget.check(need, f"one synthetic request of {longest:,} tokens ({L} layers, hidden {p.hidden_dim})",
                     "the generator holds a whole request at once, so it cannot be streamed: use shorter "
                     "prompt_len / decode_len", field=f"{field_prefix}prompt_len")
    else:
        budget.check(need, f"a synthetic trace of {requests:,} requests",
                     "it keeps a few numbers per request and streams the rows to disk a chunk of requests at a "
                     "time: generate fewer requests per file (moesim trace generate --requests N --seed S, one "
                     "seed per part)", field=f"{field_prefix}requests")


def _shape(spec) -> tuple[int, int, int]:
    return int(spec.num_layers), int(spec.num_experts), int(spec.top_k)


def iter_generate(spec, params=None, requests: int = 8, prompt_len=32, decode_len=64,
                  rng: np.random.Generator | None = None, pre_attn: bool = False, scores: bool = False,
                  preset: str | None = None, budget: int = 1 << 22,
                  model_rng: np.random.Generator | None = None, field_prefix: str = "") -> Iterator[pa.Table]:
    """The rows of `generate`, as a sequence of tables of whole requests (bounded memory; a trace
    whose generation would not fit is refused first, naming `field_prefix` + the field)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError("rng must be a numpy.random.Generator (e.g. numpy.random.default_rng(seed))")
    if model_rng is not None and not isinstance(model_rng, np.random.Generator):
        raise TypeError("model_rng must be a numpy.random.Generator or None")
    mrng = rng if model_rng is None else model_rng
    _, p = resolve_params(spec.name, params, preset)
    if not isinstance(requests, (int, np.integer)) or requests <= 0:
        raise InputError(f"must be > 0 (got {requests!r})", field=f"{field_prefix}requests")
    check_memory(spec, p, int(requests), prompt_len, decode_len, field_prefix)
    L, E, K = _shape(spec)
    d = p.hidden_dim
    # model-level draws first: they depend on the seed only, not on the request count
    W = mrng.standard_normal((L, E, d)) / math.sqrt(d)
    if p.gate_affinity > 0:
        # W_{l+1}[perm_l(e)] = κ·W_l[e] + sqrt(1-κ²)·fresh: expert e at layer l has a "successor"
        k, kc = p.gate_affinity, math.sqrt(max(0.0, 1.0 - p.gate_affinity**2))
        for l in range(1, L):
            perm = mrng.permutation(E)
            W[l, perm] = k * W[l - 1] + kc * W[l, perm]
    ranks = np.stack([mrng.permutation(E) for _ in range(L)]) + 1
    if isinstance(p.popularity_skew, tuple):
        if len(p.popularity_skew) != L:
            raise InputError(f"expected one value per MoE layer ({L}), found {len(p.popularity_skew)}",
                             field="popularity_skew")
        bias = -np.asarray(p.popularity_skew, dtype=np.float64)[:, None] * np.log(ranks)
    else:
        bias = -p.popularity_skew * np.log(ranks)
    if p.rank_bias is not None:
        rb = np.asarray(p.rank_bias, dtype=np.float64)
        if rb.shape != (L, E):
            raise InputError(f"expected {L} layers x {E} experts (one value per popularity rank), found shape "
                             f"{rb.shape}", field="rank_bias")
        bias = bias + np.take_along_axis(rb, ranks - 1, axis=1)
    bias -= bias.mean(axis=1, keepdims=True)
    prompts = _lengths(prompt_len, requests, rng, "prompt_len", 1)
    decodes = _lengths(decode_len, requests, rng, "decode_len", 0)
    seeds = rng.integers(0, 2**63 - 1, size=requests)
    totals = prompts + decodes

    # chunks of whole requests with C * Tmax * L * max(d, E) <= budget (at least one request)
    width = L * max(d, E)
    start = 0
    while start < requests:
        end, tmax = start + 1, int(totals[start])
        while end < requests and (end - start + 1) * max(tmax, int(totals[end])) * width <= budget:
            tmax = max(tmax, int(totals[end]))
            end += 1
        yield _chunk(range(start, end), totals, prompts, seeds, W, bias, p, K, pre_attn, scores)
        start = end


def generate(spec, params=None, requests: int = 8, prompt_len=32, decode_len=64,
             rng: np.random.Generator | None = None, pre_attn: bool = False, scores: bool = False,
             preset: str | None = None, model_rng: np.random.Generator | None = None) -> pa.Table:
    """A synthetic trace as one Arrow table (rows sorted by request, token, layer).

    `params`: SyntheticParams, a dict of overrides of the preset, or None (the preset named `preset`,
    by default the model's name). `prompt_len`/`decode_len`: an int, a (min, max) range drawn per
    request, or a numpy integer array with one length per request. `pre_attn=True` writes h_l as
    float16; `scores=True` writes the softmax gate probabilities of the chosen experts (softmax over
    all experts, not renormalised). `model_rng`: draw the model (gate rows W, popularity ranks) from it
    and only the requests from `rng` (default: both from `rng`).
    """
    parts = list(iter_generate(spec, params, requests, prompt_len, decode_len, rng, pre_attn, scores, preset,
                               model_rng=model_rng))
    return pa.concat_tables(parts)


def source_string(spec_name: str, params=None, preset: str | None = None, model_seed: int | None = None) -> str:
    name, p = resolve_params(spec_name, params, preset)
    ms = "" if model_seed is None else f",model_seed={model_seed}"
    return f"synthetic:latent-gate(preset={name}{ms},{p.describe()})"


def generate_to_file(path, spec, params=None, *, preset: str | None = None, requests: int = 8, prompt_len=32,
                     decode_len=64, rng: np.random.Generator | None = None, seed: int | None = None,
                     pre_attn: bool = False, scores: bool = False,
                     row_group_rows: int = DEFAULT_ROW_GROUP_ROWS, model_seed: int | None = None,
                     field_prefix: str = "") -> Path:
    """Generate and write a trace (streamed, atomically). `seed` is recorded in the metadata only:
    the draws come from `rng`. `model_seed`: draw the model from default_rng(model_seed), the requests
    from `rng` (default: both from `rng`)."""
    model_rng = None if model_seed is None else np.random.default_rng(model_seed)
    L, E, K = _shape(spec)
    meta = TraceMeta(model=spec.name, num_layers=L, num_experts=E, top_k=K,
                     source=source_string(spec.name, params, preset, model_seed), seed=seed)
    return write_trace(path, iter_generate(spec, params, requests, prompt_len, decode_len, rng, pre_attn, scores,
                                           preset, model_rng=model_rng, field_prefix=field_prefix), meta,
                       row_group_rows=row_group_rows)


# ---- fitted presets (YAML, written by `moesim trace fit`) -----------------------------------------

PRESET_FILE_FORMAT = "moesim-synthetic-preset/1"


def load_preset_file(path) -> tuple[SyntheticParams, dict]:
    """Read a preset YAML written by `moesim trace fit`: (its `params` as SyntheticParams, the whole
    document). The document also names the routing shape (`num_layers`, `num_experts`, `top_k`), the
    `model` and typical request lengths (`generate`). Errors are InputError naming the file."""
    import yaml

    from ..yamlsafe import safe_load

    file = str(path)
    try:
        with open(path) as f:
            doc = safe_load(f)
    except FileNotFoundError:
        raise InputError("preset file not found", file=file) from None
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"cannot read as YAML: {str(e).splitlines()[0]}", file=file) from None
    except (RecursionError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read as YAML: {type(e).__name__}", file=file) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("params"), dict):
        raise InputError("expected a mapping with a 'params' mapping (a preset written by `moesim trace fit`)",
                         file=file, field="params")
    fmt = doc.get("format", PRESET_FILE_FORMAT)
    if fmt != PRESET_FILE_FORMAT:
        raise InputError(f"unsupported format {fmt!r} (expected {PRESET_FILE_FORMAT!r})", file=file, field="format")
    for k in ("num_layers", "num_experts", "top_k"):
        v = doc.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise InputError(f"expected a positive integer, found {v!r}", file=file, field=k)
    try:
        params = SyntheticParams(**doc["params"])
    except ValidationError as e:
        raise pydantic_message(e, file=file, prefix="params") from None
    L, E = doc.get("num_layers"), doc.get("num_experts")
    if isinstance(params.popularity_skew, tuple) and L is not None and len(params.popularity_skew) != L:
        raise InputError(f"expected {L} values (num_layers), found {len(params.popularity_skew)}", file=file,
                         field="params.popularity_skew")
    if params.rank_bias is not None and L is not None and E is not None and (
            len(params.rank_bias) != L or any(len(row) != E for row in params.rank_bias)):
        raise InputError(f"expected {L} rows of {E} values (num_layers x num_experts)", file=file,
                         field="params.rank_bias")
    return params, doc
