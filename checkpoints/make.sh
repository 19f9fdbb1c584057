#!/bin/sh
# Train the learned predictors that scenarios/compare-predictors.yaml uses, one per model, on a
# synthetic trace of that model's preset: the same synthetic model as the comparison's
# (--model-seed 0, its trace.synthetic.model_seed) but other requests (--seed 1; the comparison
# replays seed 0's), so no predictor is scored on a request it saw. Needs torch; ~1 CPU minute
# per model.
#   sh checkpoints/make.sh            # from the repository root
# Weights are the same on every run (seeded, one torch thread); the stored forward latency is
# measured on the machine that runs this.
set -e
dir=$(dirname "$0")
tmp=${TMPDIR:-/tmp}
for model in switch-base-128 qwen1.5-moe-a2.7b; do
    trace="$tmp/moesim-train-$model.parquet"
    moesim trace generate --preset "$model" --requests 64 --prompt-len 32 --decode-len 96 --seed 1 \
        --model-seed 0 --pre-attn -o "$trace"
    moesim predictor train speculation --trace "$trace" --preset tiny --seed 0 --threads 1 \
        --no-train-state --quiet -o "$dir/$model-speculation.pt"
    moesim predictor train pre_attention --trace "$trace" --preset tiny --seed 0 --threads 1 \
        --no-train-state --quiet -o "$dir/$model-pre_attention.pt"
done
