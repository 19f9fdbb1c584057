"""ModelSpec: the shapes of an MoE model that matter for expert offloading, and named presets
(model_presets.yaml).

`expert_bytes` is derived from the shapes and `bytes_per_param`, never typed by hand, so a
quantized variant is one field away (`{preset: mixtral-8x7b, bytes_per_param: 0.5}`).
"""
from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class Precision(BaseModel):
    """Effective bits per parameter by component (issue 15): what experts, attention and the dense
    parts (shared experts, dense FFNs, embeddings and LM head) occupy, move and are read as."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    experts: float = Field(16.0, gt=0, le=32, description="bits per routed-expert parameter")
    attention: float = Field(16.0, gt=0, le=32, description="bits per attention (QKV/O) parameter")
    dense: float = Field(16.0, gt=0, le=32, description="bits per shared-expert, dense-FFN and embedding "
                                                        "parameter")
    group_size: int | None = Field(None, gt=0, description="quantisation group size: each group of this many "
                                   "parameters carries a scale of scale_bits (applied to components below 16 bits)")
    scale_bits: float = Field(16.0, ge=0, description="bits of each group's scale (and zero point)")
    formats: dict[str, str] = Field(default_factory=dict, description="weight format by component, e.g. "
                                    "{experts: hqq3}: names the runtime's dequant_gbps entry that applies")

    @model_validator(mode="after")
    def _known_components(self):
        bad = set(self.formats) - {"experts", "attention", "dense"}
        if bad:
            raise ValueError(f"formats: unknown component {sorted(bad)[0]!r} (known: experts, attention, dense)")
        return self

    def bytes_per_param(self, component: str) -> float:
        """Bytes per parameter of `component`, group scales included (only for quantised parts)."""
        bits = getattr(self, component)
        if self.group_size and bits < 16:
            bits += self.scale_bits / self.group_size
        return bits / 8


class ModelSpec(BaseModel):
    """Architecture of an MoE transformer, as far as the timing model needs it."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: str
    num_layers: int = Field(gt=0, le=32767, description="MoE layers (transformer blocks with routed experts; "
                                                    "the trace format stores layer ids as int16)")
    first_dense_layers: int = Field(0, ge=0, description="dense (non-MoE) blocks before the MoE ones")
    num_experts: int = Field(gt=0, le=32767, description="routed experts per MoE layer (int16 ids in traces)")
    top_k: int = Field(gt=0, description="routed experts chosen per token")
    num_shared_experts: int = Field(0, ge=0, description="always-active experts per MoE layer")
    hidden_size: int = Field(gt=0)
    expert_intermediate_size: int = Field(gt=0, description="FFN width of one routed expert")
    shared_expert_intermediate_size: int | None = Field(
        None, gt=0, description="FFN width of one shared expert (default: expert_intermediate_size)")
    dense_intermediate_size: int | None = Field(
        None, gt=0, description="FFN width of the dense blocks (needed when first_dense_layers > 0)")
    gated: bool = Field(True, description="SwiGLU experts (3 matrices) rather than 2")
    bytes_per_param: float = Field(2.0, gt=0, description="2 = bf16/fp16, 0.5 = 4-bit (scales extra)")
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    vocab_size: int = Field(0, ge=0, description="LM-head size; 0 leaves the LM head out of the timing")
    kv_values_per_token: int | None = Field(
        None, gt=0, description="KV-cache values one token stores per block (None: 2 x num_kv_heads x head_dim; "
                                "MLA models: the compressed latent + rope key)")
    source: str = Field("inline", description="where these numbers come from")
    precision: Precision | None = Field(None, description="bits per parameter per component; None: every "
                                                          "component at bytes_per_param")

    @model_validator(mode="after")
    def _check(self):
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        if self.first_dense_layers and self.dense_intermediate_size is None:
            raise ValueError("first_dense_layers > 0 needs dense_intermediate_size")
        return self

    @property
    def matrices_per_expert(self) -> int:
        return 3 if self.gated else 2

    def component_bytes_per_param(self, component: str) -> float:
        """Bytes per parameter of "experts", "attention" or "dense" (precision, else bytes_per_param)."""
        return self.bytes_per_param if self.precision is None else self.precision.bytes_per_param(component)

    def weight_format(self, component: str) -> str | None:
        """The weight format named for `component` in precision.formats (its dequantisation speed
        comes from the runtime), or None."""
        return None if self.precision is None else self.precision.formats.get(component)

    @property
    def expert_params(self) -> int:
        return self.matrices_per_expert * self.hidden_size * self.expert_intermediate_size

    @property
    def expert_bytes(self) -> int:
        """Bytes of one routed expert's weights (derived; rounded up to whole bytes)."""
        return int(-(-self.expert_params * self.component_bytes_per_param("experts") // 1))

    @property
    def shared_expert_params(self) -> int:
        width = self.shared_expert_intermediate_size or self.expert_intermediate_size
        return self.matrices_per_expert * self.hidden_size * width

    @property
    def attention_params(self) -> int:
        """Q, K, V and O projection weights of one block."""
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        return self.hidden_size * (2 * q + 2 * kv)

    @property
    def resident_bytes(self) -> int:
        """Weights that always stay on the GPU: attention, shared experts, dense blocks, and the
        embedding + LM head (counted untied)."""
        blocks = self.num_layers + self.first_dense_layers
        dense = self.matrices_per_expert * self.hidden_size * (self.dense_intermediate_size or 0)
        params = (blocks * self.attention_params + self.num_layers * self.num_shared_experts * self.shared_expert_params
                  + self.first_dense_layers * dense + 2 * self.vocab_size * self.hidden_size)
        if self.precision is None:
            return int(params * self.bytes_per_param)
        attn = blocks * self.attention_params
        return int(attn * self.component_bytes_per_param("attention")
                   + (params - attn) * self.component_bytes_per_param("dense"))

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token holds across every block (bf16 values)."""
        per_block = self.kv_values_per_token or 2 * self.num_kv_heads * self.head_dim
        return per_block * (self.num_layers + self.first_dense_layers) * 2

    @property
    def total_experts(self) -> int:
        return self.num_layers * self.num_experts


# Presets: published configs, one ModelSpec's fields per model, in model_presets.yaml (data, with
# the provenance of every number in its comments).
PRESETS_FILE = Path(__file__).with_name("model_presets.yaml")


def _load_presets() -> dict[str, dict]:
    """ModelSpec fields by preset name, as model_presets.yaml writes them."""
    with open(PRESETS_FILE, encoding="utf-8") as f:
        return yaml.safe_load(f)


PRESETS: dict[str, dict] = _load_presets()


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> ModelSpec:
    if name not in PRESETS:
        raise KeyError(name)
    return ModelSpec(name=name, **PRESETS[name])
