"""ModelSpec: the shapes of an MoE model that matter for expert offloading, and named presets.

`expert_bytes` is derived from the shapes and `bytes_per_param`, never typed by hand, so a
quantized variant is one field away (`{preset: mixtral-8x7b, bytes_per_param: 0.5}`).
"""
from __future__ import annotations

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


# Presets: published configs (HF config.json of each model), with the source named.
#
# Conventions (apply to every entry):
# - Numbers are copied from the model's config.json; the comment above each entry maps ModelSpec
#   fields to config keys. Each was checked against stored copies of the config (HF hub pages,
#   transformers code, third-party test fixtures); where a value could not be checked, the
#   comment says so.
# - `num_layers` counts MoE blocks only; `first_dense_layers` the dense blocks before them.
# - `gated=True` means SwiGLU-style experts (gate, up, down: 3 matrices); ReLU/GELU MLPs are 2.
# - `bytes_per_param` is left at 2 (bf16/fp16 weights) for every preset, so presets compare
#   like with like; quantized variants are one override away (see gpt-oss-20b).
# - Sanity check (tests/test_models.py): total parameters recomputed from these fields
#   (experts + shared + dense FFN + attention + embeddings) match each model card's total.
PRESETS: dict[str, dict] = {
    # --- google/switch-base-128 ------------------------------------------------------------
    # T5 encoder-decoder (num_layers=12 encoder + num_decoder_layers=12 decoder blocks),
    # d_model 768, d_ff 3072, num_heads 12, d_kv 64, vocab 32128, dense_act_fn "relu"
    # (is_gated_act false -> gated=False: wi, wo only), num_experts 128, top-1 routing.
    # num_sparse_encoder_layers = num_sparse_decoder_layers = 6 (encoder/decoder_sparse_step 2):
    # transformers makes block i sparse when i % 2 == 1, so blocks 1,3,...,11 of each stack are
    # MoE -> 6 + 6 = 12 MoE layers. The other 12 blocks (0,2,...,10 of each stack) have a dense
    # 3072-wide ReLU FFN; ModelSpec can only place dense blocks *before* the MoE ones, so they are
    # counted in first_dense_layers=12 (same per-step compute; their position is not modelled).
    # Not modelled: decoder cross-attention, and the encoder/decoder split itself (the engine
    # runs one decoder-only stack over all 12 MoE layers). The HF checkpoint is stored in fp32
    # (torch_dtype float32); bytes_per_param=2 models fp16/bf16 inference.
    # Verified: switch-base-8/-32/-64/-256 config.json (identical except num_experts) and
    # transformers' SwitchTransformers config/model code; the switch-base-128 file itself was
    # not readable in the stored copies.
    "switch-base-128": dict(
        num_layers=12, first_dense_layers=12, dense_intermediate_size=3072,
        num_experts=128, top_k=1, num_shared_experts=0,
        hidden_size=768, expert_intermediate_size=3072, gated=False,
        num_heads=12, num_kv_heads=12, head_dim=64, vocab_size=32128,
        source="huggingface.co/google/switch-base-128 config.json",
    ),
    # --- Qwen/Qwen1.5-MoE-A2.7B ---------------------------------------------------------------
    # num_hidden_layers 24 (decoder_sparse_step 1: all MoE), num_experts 60, num_experts_per_tok 4,
    # hidden_size 2048, moe_intermediate_size 1408, one shared expert (Qwen2MoeSparseMoeBlock
    # .shared_expert, sigmoid-gated) of shared_expert_intermediate_size 5632, num_attention_heads
    # 16, num_key_value_heads 16, head_dim 2048/16 = 128, vocab 151936, hidden_act silu (SwiGLU).
    "qwen1.5-moe-a2.7b": dict(
        num_layers=24, num_experts=60, top_k=4,
        num_shared_experts=1, shared_expert_intermediate_size=5632,
        hidden_size=2048, expert_intermediate_size=1408, gated=True,
        num_heads=16, num_kv_heads=16, head_dim=128, vocab_size=151936,
        source="huggingface.co/Qwen/Qwen1.5-MoE-A2.7B config.json",
    ),
    # --- Qwen/Qwen3-30B-A3B -------------------------------------------------------------------
    # num_hidden_layers 48 (decoder_sparse_step 1, mlp_only_layers []: all MoE), num_experts 128,
    # num_experts_per_tok 8, hidden_size 2048, moe_intermediate_size 768, no shared expert
    # (intermediate_size 6144 is unused), num_attention_heads 32, num_key_value_heads 4,
    # head_dim 128 (explicit; 32*128 != hidden_size), vocab 151936, silu (SwiGLU).
    "qwen3-30b-a3b": dict(
        num_layers=48, num_experts=128, top_k=8, num_shared_experts=0,
        hidden_size=2048, expert_intermediate_size=768, gated=True,
        num_heads=32, num_kv_heads=4, head_dim=128, vocab_size=151936,
        source="huggingface.co/Qwen/Qwen3-30B-A3B config.json",
    ),
    # --- deepseek-ai/DeepSeek-V2-Lite ---------------------------------------------------------
    # num_hidden_layers 27, first_k_dense_replace 1 (block 0 dense, intermediate_size 10944),
    # moe_layer_freq 1 -> 26 MoE blocks; n_routed_experts 64, num_experts_per_tok 6,
    # moe_intermediate_size 1408, hidden_size 2048, vocab 102400, silu (SwiGLU).
    # Shared experts: n_shared_experts 2 of width 1408; DeepseekV2MoE runs them as ONE MLP of
    # width 1408*2 = 2816, so we model 1 shared expert of width 2816 (identical bytes and FLOPs,
    # and the kernel count the real code launches).
    # Attention is MLA (q_lora_rank null, kv_lora_rank 512, qk_nope_head_dim 128,
    # qk_rope_head_dim 64, v_head_dim 128, 16 heads). ModelSpec only knows MHA/GQA, so we pick
    # the GQA shape whose derived quantities are closest:
    #   projection weights: true q_proj 2048x3072 + kv_a 2048x576 + kv_b 512x4096 + o 2048x2048
    #     = 13.76M/layer; modelled 2048*(2*24*128 + 2*2*128) = 13.63M (-1%).
    #   KV cache per token per layer: true 512 + 64 = 576 values (compressed latent + rope key);
    #     modelled 2*2*128 = 512 (-11%).
    #   score FLOPs per context token: modelled 4*24*128 = 12288 vs 2*16*(192+128) = 10240 for
    #     the unabsorbed form (+20%); absorbed-MLA decode kernels do more (2*16*(576+512)).
    # Hence num_heads=24 and num_kv_heads=2 are NOT the model's head counts (16); they are an
    # equivalent shape for the cost model.
    "deepseek-v2-lite": dict(
        num_layers=26, first_dense_layers=1, dense_intermediate_size=10944,
        num_experts=64, top_k=6,
        num_shared_experts=1, shared_expert_intermediate_size=2816,
        hidden_size=2048, expert_intermediate_size=1408, gated=True,
        num_heads=24, num_kv_heads=2, head_dim=128, vocab_size=102400, kv_values_per_token=576,
        source="huggingface.co/deepseek-ai/DeepSeek-V2-Lite config.json "
               "(MLA attention approximated as GQA, see models.py)",
    ),
    # --- mistralai/Mixtral-8x7B-v0.1 ----------------------------------------------------------
    # num_hidden_layers 32 (all MoE), num_local_experts 8, num_experts_per_tok 2, hidden_size 4096,
    # intermediate_size 14336 (per expert: w1, w2, w3), num_attention_heads 32,
    # num_key_value_heads 8, head_dim 4096/32 = 128, vocab 32000, silu (SwiGLU).
    "mixtral-8x7b": dict(
        num_layers=32, num_experts=8, top_k=2, num_shared_experts=0,
        hidden_size=4096, expert_intermediate_size=14336, gated=True,
        num_heads=32, num_kv_heads=8, head_dim=128, vocab_size=32000,
        source="huggingface.co/mistralai/Mixtral-8x7B-v0.1 config.json",
    ),
    # --- allenai/OLMoE-1B-7B-0924 -------------------------------------------------------------
    # num_hidden_layers 16 (all MoE), num_experts 64, num_experts_per_tok 8, hidden_size 2048,
    # intermediate_size 1024 (OLMoE stores the per-expert width here; no moe_intermediate_size),
    # num_attention_heads 16, num_key_value_heads 16, head_dim 128, vocab 50304, silu (SwiGLU).
    # Verified via the -Instruct derivative's config.json (same architecture) and fixtures.
    "olmoe-1b-7b": dict(
        num_layers=16, num_experts=64, top_k=8, num_shared_experts=0,
        hidden_size=2048, expert_intermediate_size=1024, gated=True,
        num_heads=16, num_kv_heads=16, head_dim=128, vocab_size=50304,
        source="huggingface.co/allenai/OLMoE-1B-7B-0924 config.json",
    ),
    # --- microsoft/Phi-3.5-MoE-instruct -------------------------------------------------------
    # num_hidden_layers 32 (all MoE), num_local_experts 16, num_experts_per_tok 2, hidden_size
    # 4096, intermediate_size 6400 (per expert: w1, w2, w3 -> SwiGLU), num_attention_heads 32,
    # num_key_value_heads 8, head_dim 128, vocab 32064.
    "phi-3.5-moe": dict(
        num_layers=32, num_experts=16, top_k=2, num_shared_experts=0,
        hidden_size=4096, expert_intermediate_size=6400, gated=True,
        num_heads=32, num_kv_heads=8, head_dim=128, vocab_size=32064,
        source="huggingface.co/microsoft/Phi-3.5-MoE-instruct config.json",
    ),
    # --- openai/gpt-oss-20b -------------------------------------------------------------------
    # num_hidden_layers 24 (all MoE), num_local_experts 32, num_experts_per_tok (experts_per_token)
    # 4, hidden_size 2880, intermediate_size 2880 (fused gate_up_proj 2880x5760 + down_proj: a
    # clamped SwiGLU -> gated=True; per-expert biases, 8640 values, are ignored), num_attention_heads
    # 64, num_key_value_heads 8, head_dim 64 (64*64 = 4096 != hidden_size), vocab 201088.
    # Not modelled: every other layer uses a 128-token sliding window (layer_types), so KV
    # traffic is overstated for long contexts; attention sinks.
    # The released checkpoint stores expert weights in MXFP4 (4-bit E2M1 values + one 8-bit scale
    # per 32 -> 4.25 bits = 0.53125 bytes/param; attention, router, embeddings stay bf16). This
    # preset is bf16 like the others; for the release set bytes_per_param: 0.53125 (note that
    # ModelSpec applies bytes_per_param to the attention weights as well).
    "gpt-oss-20b": dict(
        num_layers=24, num_experts=32, top_k=4, num_shared_experts=0,
        hidden_size=2880, expert_intermediate_size=2880, gated=True,
        num_heads=64, num_kv_heads=8, head_dim=64, vocab_size=201088,
        source="huggingface.co/openai/gpt-oss-20b config.json",
    ),
    # --- Qwen/Qwen2-57B-A14B ------------------------------------------------------------------
    # num_hidden_layers 28 (decoder_sparse_step 1: all MoE), num_experts 64, num_experts_per_tok 8,
    # hidden_size 3584, moe_intermediate_size 2560, one shared expert of
    # shared_expert_intermediate_size 20480, num_attention_heads 28, num_key_value_heads 4,
    # head_dim 3584/28 = 128, vocab 151936, silu (SwiGLU).
    "qwen2-57b-a14b": dict(
        num_layers=28, num_experts=64, top_k=8,
        num_shared_experts=1, shared_expert_intermediate_size=20480,
        hidden_size=3584, expert_intermediate_size=2560, gated=True,
        num_heads=28, num_kv_heads=4, head_dim=128, vocab_size=151936,
        source="huggingface.co/Qwen/Qwen2-57B-A14B config.json",
    ),
    # --- tiny-olmoe-stdlib: the small MoE LM `moesim trace train-tiny` trains on the Python standard
    # library (moesim/routing/tiny.py, transformers OlmoeConfig, seed 0); routing in
    # traces/tiny-learned.parquet. Its experts are 98 KB, so transfers are latency-dominated.
    "tiny-olmoe-stdlib": dict(
        num_layers=4, num_experts=32, top_k=2, num_shared_experts=0,
        hidden_size=128, expert_intermediate_size=128, gated=True,
        num_heads=4, num_kv_heads=4, head_dim=32, vocab_size=256,
        source="moesim trace train-tiny (traces/tiny-learned.parquet; OlmoeConfig, seed 0)",
    ),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> ModelSpec:
    if name not in PRESETS:
        raise KeyError(name)
    return ModelSpec(name=name, **PRESETS[name])
