"""Regenerate the sample traces in this folder, byte for byte:  python traces/make_samples.py

Both come from the latent-gate generator (moesim.traces.synthetic) with the synthetic preset named
after the model, seed 0. Only the routing shape of the model (num_layers, num_experts, top_k) enters
the generator, so the shapes are fixed here rather than read from the model presets (which are
checked to agree when they exist). Rows equal `moesim trace generate --preset <model> --seed 0`
(with --pre-attn for OLMoE); the bytes differ only in the row-group size, kept small here so that
requests straddle row groups and readers exercise streaming.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from moesim.models import ModelSpec, get_preset
from moesim.traces.synthetic import generate_to_file

HERE = Path(__file__).resolve().parent
ROW_GROUP_ROWS = 5000

# name -> (num_layers, num_experts, top_k, the rest of a ModelSpec: published config.json values)
SHAPES = {
    "olmoe-1b-7b": dict(num_layers=16, num_experts=64, top_k=8, hidden_size=2048, expert_intermediate_size=1024,
                        num_heads=16, num_kv_heads=16, head_dim=128),
    "switch-base-128": dict(num_layers=12, num_experts=128, top_k=1, hidden_size=768, expert_intermediate_size=3072,
                            gated=False, num_heads=12, num_kv_heads=12, head_dim=64),
}

SAMPLES = [
    # file, model, generator arguments
    ("olmoe-sample.parquet", "olmoe-1b-7b", dict(requests=8, prompt_len=32, decode_len=64, pre_attn=True)),
    ("switch-sample.parquet", "switch-base-128", dict(requests=8, prompt_len=32, decode_len=64)),
]
SEED = 0


def spec_for(name: str) -> ModelSpec:
    spec = ModelSpec(name=name, source="traces/make_samples.py routing shape", **SHAPES[name])
    try:
        preset = get_preset(name)
    except KeyError:
        return spec
    for f in ("num_layers", "num_experts", "top_k"):
        if getattr(preset, f) != getattr(spec, f):
            print(f"warning: model preset {name} has {f}={getattr(preset, f)}, the sample uses "
                  f"{getattr(spec, f)}", file=sys.stderr)
    return spec


def main(out: Path = HERE) -> list[Path]:
    written = []
    for fname, model, kw in SAMPLES:
        path = generate_to_file(out / fname, spec_for(model), preset=model, rng=np.random.default_rng(SEED),
                                seed=SEED, row_group_rows=ROW_GROUP_ROWS, **kw)
        print(f"wrote {path} ({path.stat().st_size} bytes)")
        written.append(path)
    return written


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
