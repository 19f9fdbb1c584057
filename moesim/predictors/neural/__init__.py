"""Learned expert predictors (PyTorch, an optional extra imported lazily).

- `speculation`: inter-layer speculation transformer (seeds 000/001/002);
- `pre_attention`: per-layer router on the pre-attention hidden state (seed 003).

Importing this package registers both engine predictors without importing torch; torch is
imported when one is built (`registry.create`), trained (`train`) or evaluated (`evaluate`).

    from moesim.predictors.neural import train, evaluate
    ck = train("speculation", "traces/olmoe-sample.parquet", preset="small", output="spec.pt")
    report = evaluate("spec.pt")                  # held-out requests of the checkpoint's trace
"""
from __future__ import annotations

from .config import (
    PRE_ATTENTION_PRESETS,
    PRESETS,
    SPECULATION_PRESETS,
    PreAttentionConfig,
    SpeculationConfig,
    TrainConfig,
    build_configs,
)
from .predictors import PreAttention, PreAttentionParams, Speculation, SpeculationParams

_LAZY = {"train": "training", "load_model": "training", "measure_latency": "training", "evaluate": "evaluation",
         "parameter_counts": "evaluation"}


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)


__all__ = ["Speculation", "PreAttention", "SpeculationParams", "PreAttentionParams", "SpeculationConfig",
           "PreAttentionConfig", "TrainConfig", "PRESETS", "SPECULATION_PRESETS", "PRE_ATTENTION_PRESETS",
           "build_configs", "train", "evaluate", "load_model", "measure_latency",
           "parameter_counts"]
