#!/bin/sh
# Regenerate traces/tiny-learned.parquet (needs torch and transformers; ~4-8 CPU minutes, 1 thread).
# Same as `moesim trace train-tiny -o traces/tiny-learned.parquet` (40 held-out requests by default).
exec python -m moesim.traces.tiny --seed 0 -o traces/tiny-learned.parquet "$@"
