"""Configurations and named presets of the two learned predictors (no torch here).

- `SpeculationConfig`: the inter-layer speculation transformer of seeds 000/001/002.
- `PreAttentionConfig`: the per-layer pre-attention router of seed 003.
- `TrainConfig`: optimiser, schedule, split and stopping settings shared by both.

A preset is a pair (model overrides, training overrides); the trace fills in the shape
(`num_layers`, `num_experts`, `top_k`, and for pre-attention `input_dim`).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ...errors import InputError, pydantic_message

KINDS = ("speculation", "pre_attention")


class _Cfg(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SpeculationConfig(_Cfg):
    """Expert + layer + token-position embeddings of the `context_length` most recent routed layers,
    a transformer encoder over them, cross-layer attention from the most recent one (one query per
    look-ahead offset 1..`horizon`, carrying the target layer's embedding), an expert head and a
    confidence head."""

    kind: Literal["speculation"] = "speculation"
    num_layers: int = Field(gt=0)
    num_experts: int = Field(gt=0)
    top_k: int = Field(gt=0)
    context_length: int = Field(3, ge=1, description="routed layers the prediction sees (seed: 3)")
    horizon: int = Field(2, ge=1, description="predict offsets 1..horizon layers past the newest context layer "
                                              "(seed: 2, one offset only)")
    model_dim: int = Field(256, ge=2)
    num_heads: int = Field(8, ge=1)
    ff_dim: int = Field(1024, ge=1)
    num_attention_layers: int = Field(4, ge=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    per_layer_experts: bool = Field(
        True, description="one embedding row per (layer, expert); false: the seed's one row per expert id "
                          "shared by all layers (expert ids of different layers are different experts)")
    per_layer_head: bool = Field(True, description="one output matrix per target layer; false: one shared head")
    cross_token: bool = Field(True, description="a decode token's context reaches back into the previous "
                                                "token's last layers, and the last layers predict the next token's first")
    prev_tokens: int = Field(0, ge=0, description="extension (0 = the seeds' per-token context): also see the "
                             "layers a-C+1..a+H of the request's P previous tokens (their routing at the "
                             "target layers: temporal locality)")
    loss: Literal["auto", "ce", "bce"] = Field(
        "auto", description="ce: softmax cross-entropy with label smoothing (top_k > 1: against the routed set "
                            "as a uniform distribution); bce: multi-label binary cross-entropy on the routed set; "
                            "auto: ce for top_k = 1, bce for top_k > 1")
    label_smoothing: float = Field(0.06, ge=0, lt=1)
    confidence_weight: float = Field(0.1, ge=0, description="weight of the confidence head's BCE "
                                                           "(target: the top-1 prediction is in the routed set)")

    @model_validator(mode="after")
    def _check(self):
        if self.model_dim % self.num_heads:
            raise ValueError(f"model_dim ({self.model_dim}) must be a multiple of num_heads ({self.num_heads})")
        if self.top_k > self.num_experts:
            raise ValueError("top_k exceeds num_experts")
        if self.loss == "auto":
            object.__setattr__(self, "loss", "ce" if self.top_k == 1 else "bce")
        if self.context_length > self.num_layers:
            raise ValueError(f"context_length ({self.context_length}) exceeds num_layers ({self.num_layers})")
        if self.horizon >= self.num_layers:
            raise ValueError(f"horizon ({self.horizon}) must be below num_layers ({self.num_layers})")
        return self


class PreAttentionConfig(_Cfg):
    """One small network per MoE layer on the pre-attention hidden state (seed 003 §4.3).

    arch 1: Linear(d, hidden) – BatchNorm1d – GELU – Dropout – Linear(hidden, E)
    arch 2: Linear(d, hidden) – SiLU – Linear(hidden, E)
    """

    kind: Literal["pre_attention"] = "pre_attention"
    num_layers: int = Field(gt=0)
    num_experts: int = Field(gt=0)
    top_k: int = Field(gt=0)
    input_dim: int = Field(gt=0, description="width of the trace's pre_attn vectors")
    arch: Literal[1, 2] = 2
    hidden: int = Field(2048, ge=1, description="seed: 2048")
    dropout: float = Field(0.1, ge=0, lt=1, description="arch 1 only (seed: 0.1)")
    loss: Literal["mse", "wbce", "focal", "ranking"] = Field(
        "wbce", description="mse: regress gate scores; wbce: weighted BCE (3.0 top-10 / 0.5 rest); focal; "
                            "ranking: wbce (3.0 / 1.5 / 0.5 tiers) + lambda x pairwise margin ranking")
    ranking_lambda: float = Field(0.3, ge=0, description="seed: 0.3")
    ranking_margin: float = Field(0.1, ge=0, description="seed: 0.1")
    focal_gamma: float = Field(2.0, ge=0)
    focal_alpha: float = Field(0.25, gt=0, lt=1)

    @model_validator(mode="after")
    def _check(self):
        if self.top_k > self.num_experts:
            raise ValueError("top_k exceeds num_experts")
        return self


class TrainConfig(_Cfg):
    """How to train (both kinds). Splits are by request: `test_fraction` of the trace's requests
    are held out for `eval`, `val_fraction` for early stopping / LR schedule / best checkpoint."""

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(0.8, gt=0, description="max gradient norm (seed: 0.8)")
    warmup_steps: int = Field(0, ge=0, description="linear LR warm-up over this many optimiser steps")
    plateau_patience: int = Field(2, ge=0, description="ReduceLROnPlateau patience in epochs (seed: 8)")
    plateau_factor: float = Field(0.5, gt=0, lt=1, description="seed: 0.5")
    early_stop_patience: int = Field(5, ge=1, description="stop after this many epochs without a better "
                                                          "validation score (seed: 25)")
    test_fraction: float = Field(0.2, gt=0, lt=1)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    max_train_samples: int | None = Field(None, ge=1, description="use a seeded random subset of the training "
                                                                  "samples per epoch (None: all)")
    seed: int = 0
    overprovision: int | None = Field(None, ge=0, description="extra experts for the over-provisioned hit rate "
                                                             "(default max(1, top_k // 2))")


# ---- presets ------------------------------------------------------------------------------------
# (model overrides, training overrides). Seed sizes: 000 §4.1.1 / 002 "Model Specifications".

SPECULATION_PRESETS: dict[str, tuple[dict, dict]] = {
    "tiny": (dict(model_dim=32, num_heads=2, ff_dim=64, num_attention_layers=1, dropout=0.0),
             dict(epochs=8, batch_size=256, lr=3e-3, weight_decay=0.01)),
    "small": (dict(model_dim=128, num_heads=4, ff_dim=512, num_attention_layers=2, dropout=0.1),
              dict(epochs=20, batch_size=256, lr=1e-3, weight_decay=0.01)),
    # seed "Baseline": 256d, 8 heads, 1024 ff, 4 layers
    "baseline": (dict(model_dim=256, num_heads=8, ff_dim=1024, num_attention_layers=4, dropout=0.1),
                 dict(epochs=50, batch_size=256, lr=5e-4, weight_decay=0.01, warmup_steps=200,
                      plateau_patience=8, early_stop_patience=25)),
    # seed "Extended Improved": 320d, 10 heads, 1280 ff, 5 layers, dropout 0.12, wd 0.012, clip 0.8, ls 0.06
    "extended": (dict(model_dim=320, num_heads=10, ff_dim=1280, num_attention_layers=5, dropout=0.12,
                      label_smoothing=0.06),
                 dict(epochs=120, batch_size=256, lr=3e-4, weight_decay=0.012, grad_clip=0.8, warmup_steps=800,
                      plateau_patience=8, early_stop_patience=25)),
    # seed "Enhanced": 512d, 16 heads, 2048 ff, 6 layers, dropout 0.15, wd 0.02, clip 0.5, ls 0.1
    "enhanced": (dict(model_dim=512, num_heads=16, ff_dim=2048, num_attention_layers=6, dropout=0.15,
                      label_smoothing=0.1),
                 dict(epochs=100, batch_size=256, lr=2e-4, weight_decay=0.02, grad_clip=0.5, warmup_steps=2000,
                      plateau_patience=8, early_stop_patience=25)),
}

PRE_ATTENTION_PRESETS: dict[str, tuple[dict, dict]] = {
    "tiny": (dict(arch=2, hidden=32, loss="wbce"), dict(epochs=15, batch_size=256, lr=3e-3)),
    "small": (dict(arch=1, hidden=256, loss="ranking"), dict(epochs=20, batch_size=256, lr=1e-3)),
    # seed 003: architecture 1 with the ranking-aware BCE, architecture 2 with weighted BCE, hidden 2048
    "arch1": (dict(arch=1, hidden=2048, loss="ranking"), dict(epochs=30, batch_size=512, lr=1e-3)),
    "arch2": (dict(arch=2, hidden=2048, loss="wbce"), dict(epochs=30, batch_size=512, lr=1e-3)),
}

PRESETS = {"speculation": SPECULATION_PRESETS, "pre_attention": PRE_ATTENTION_PRESETS}
DEFAULT_PRESET = {"speculation": "small", "pre_attention": "small"}


def build_configs(kind: str, shape: dict, preset: str | None = None, model_overrides: dict | None = None,
                  train_overrides: dict | None = None):
    """(model config, train config) for `kind` from a preset, the trace's shape and overrides."""
    if kind not in PRESETS:
        raise InputError(f"unknown predictor kind {kind!r} (known: {', '.join(KINDS)})", field="kind")
    table = PRESETS[kind]
    preset = preset or DEFAULT_PRESET[kind]
    if preset not in table:
        raise InputError(f"unknown {kind} preset {preset!r} (known: {', '.join(table)})", field="--preset")
    m_over, t_over = table[preset]
    m = {**m_over, **(model_overrides or {}), **shape}
    t = {**t_over, **(train_overrides or {})}
    cls = SpeculationConfig if kind == "speculation" else PreAttentionConfig
    try:
        mc = cls(**m)
    except ValidationError as e:
        raise pydantic_message(e, prefix="model") from None
    try:
        tc = TrainConfig(**t)
    except ValidationError as e:
        raise pydantic_message(e, prefix="train") from None
    return mc, tc


def model_config_from_dict(d: dict):
    kind = d.get("kind")
    if kind == "speculation":
        return SpeculationConfig(**d)
    if kind == "pre_attention":
        return PreAttentionConfig(**d)
    raise ValueError(f"unknown model kind {kind!r}")


def overprovision(train: TrainConfig, top_k: int) -> int:
    return train.overprovision if train.overprovision is not None else max(1, top_k // 2)
