"""The trace format (DESIGN §2): Arrow schema, `moesim.*` file metadata and `TraceMeta`.

One row per request × token × MoE layer, sorted by (request_id, token, layer):

| column       | Arrow type                  |                                              |
|--------------|-----------------------------|----------------------------------------------|
| request_id   | int32                       | sequence id                                  |
| token        | int32                       | position in the sequence, prompt tokens first|
| phase        | dictionary<int8, string>    | "prefill" or "decode"                        |
| layer        | int16                       | MoE layer index, 0-based                     |
| experts      | list<int16>                 | `top_k` routed experts, in gate-score order  |
| scores       | list<float32>, optional     | their gate weights (or all logits)           |
| pre_attn     | list<float16>, optional     | pre-attention hidden state                   |
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import pyarrow as pa

from ..errors import InputError

SCHEMA_VERSION = 1

PHASES = ("prefill", "decode")
PHASE_TYPE = pa.dictionary(pa.int8(), pa.string())

REQUIRED_COLUMNS = ("request_id", "token", "phase", "layer", "experts")
OPTIONAL_COLUMNS = ("scores", "pre_attn", "arrival_s")

FIELDS: dict[str, pa.Field] = {
    "request_id": pa.field("request_id", pa.int32(), nullable=False),
    "token": pa.field("token", pa.int32(), nullable=False),
    "phase": pa.field("phase", PHASE_TYPE, nullable=False),
    "layer": pa.field("layer", pa.int16(), nullable=False),
    "experts": pa.field("experts", pa.list_(pa.int16()), nullable=False),
    "scores": pa.field("scores", pa.list_(pa.float32())),
    "pre_attn": pa.field("pre_attn", pa.list_(pa.float16())),
    "arrival_s": pa.field("arrival_s", pa.float64()),  # request arrival time (same on all its rows)
}

# File-level metadata keys (Parquet key/value metadata, stored with the Arrow schema).
META_PREFIX = "moesim."
META_KEYS = ("schema_version", "model", "num_layers", "num_experts", "top_k", "source", "seed")
REQUIRED_META = ("schema_version", "model", "num_layers", "num_experts", "top_k", "source")


def trace_schema(scores: bool = False, pre_attn: bool = False, meta: "TraceMeta | None" = None,
                 arrival_s: bool = False) -> pa.Schema:
    """The Arrow schema of a trace with the optional columns asked for (and metadata if given)."""
    names = list(REQUIRED_COLUMNS) + [c for c, on in (("scores", scores), ("pre_attn", pre_attn),
                                                      ("arrival_s", arrival_s)) if on]
    schema = pa.schema([FIELDS[n] for n in names])
    return schema.with_metadata(meta.to_metadata()) if meta is not None else schema


#: The full schema (every optional column present).
TRACE_SCHEMA = trace_schema(scores=True, pre_attn=True)


@dataclass(frozen=True)
class TraceMeta:
    """What a trace file says about itself (the `moesim.*` metadata keys)."""

    model: str
    num_layers: int
    num_experts: int
    top_k: int
    source: str
    seed: int | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        for name in ("num_layers", "num_experts", "top_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"TraceMeta.{name} must be a positive int (got {v!r})")
        if self.top_k > self.num_experts:
            raise ValueError(f"TraceMeta.top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        if self.num_experts > 32767 or self.num_layers > 32767:
            raise ValueError("num_experts and num_layers must fit in int16")

    def to_metadata(self) -> dict[bytes, bytes]:
        d = asdict(self)
        d["seed"] = "none" if self.seed is None else self.seed
        return {f"{META_PREFIX}{k}".encode(): str(d[k]).encode() for k in META_KEYS}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_metadata(cls, metadata: dict | None, file: str | None = None) -> "TraceMeta":
        """Parse `moesim.*` keys; InputError naming the key when one is missing or invalid."""
        md = {(k.decode() if isinstance(k, bytes) else k): (v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
              for k, v in (metadata or {}).items()}

        def get(key: str) -> str | None:
            return md.get(META_PREFIX + key)

        for key in REQUIRED_META:
            if get(key) is None:
                raise InputError(f"missing trace metadata key (expected a moesim trace with schema version "
                                 f"{SCHEMA_VERSION})", file=file, field=META_PREFIX + key)

        def as_int(key: str, lo: int = 1) -> int:
            raw = get(key)
            try:
                v = int(raw)
            except (TypeError, ValueError):
                raise InputError(f"expected an integer, found {raw!r}", file=file, field=META_PREFIX + key) from None
            if v < lo:
                raise InputError(f"expected an integer >= {lo}, found {v}", file=file, field=META_PREFIX + key)
            return v

        version = as_int("schema_version")
        if version != SCHEMA_VERSION:
            raise InputError(f"unsupported trace schema version: expected {SCHEMA_VERSION}, found {version}",
                             file=file, field=META_PREFIX + "schema_version")
        num_layers, num_experts, top_k = as_int("num_layers"), as_int("num_experts"), as_int("top_k")
        if num_experts > 32767 or num_layers > 32767:
            raise InputError("num_layers/num_experts must fit in int16", file=file, field=META_PREFIX + "num_experts")
        if top_k > num_experts:
            raise InputError(f"top_k ({top_k}) exceeds num_experts ({num_experts})", file=file,
                             field=META_PREFIX + "top_k")
        raw_seed = get("seed")
        seed = None
        if raw_seed not in (None, "", "none", "None"):
            try:
                seed = int(raw_seed)
            except ValueError:
                raise InputError(f"expected an integer or 'none', found {raw_seed!r}", file=file,
                                 field=META_PREFIX + "seed") from None
        return cls(model=get("model"), num_layers=num_layers, num_experts=num_experts, top_k=top_k,
                   source=get("source"), seed=seed, schema_version=version)
