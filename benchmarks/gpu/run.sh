#!/usr/bin/env bash
# The GPU measurements of this repo, in one script (run on a lent CUDA machine by the `device` tool;
# DEV=cpu QUICK=1 runs the same steps on a CPU as a smoke test). Every step has its own time limit
# and logs to $OUT/log.txt; all outputs are packed into $OUT/gpu-results.tar.gz.
#   OUT=/tmp/out bash benchmarks/gpu/run.sh   (STEPS=..., ROWS=..., SIMS=0, DEADLINE=s)
set -u
OUT=${OUT:-/tmp/gpu-out}; DEV=${DEV:-cuda}; QUICK=${QUICK:-0}; STEPS=${STEPS:-env,profile,neural,rows}; ROWS=${ROWS:-on_demand:64:1 oracle:64:1 on_demand:512:8}
W=${WORK:-/tmp/moesim-gpu}; mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ! python3 -c "import simpy, pydantic, plotly" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
M="python3 -m moesim.cli"
LOG=$OUT/log.txt
say() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }
# DEADLINE (s since the start): no step runs past it (a step's limit is cut to what is left, and one
# that would start later is skipped), so the results are packed in time
DEADLINE=${DEADLINE:-100000}
step() { local lim=$1 left=$((DEADLINE - SECONDS)); shift; [ "$lim" -gt "$left" ] && lim=$left
  if [ "$lim" -le 5 ]; then say "skipped (deadline): $*"; return 124; fi
  say "$*"; timeout "$lim" "$@" >>"$LOG" 2>&1; local rc=$?; say "rc=$rc"; return $rc; }
has() { [[ ",$STEPS," == *",$1,"* ]]; }
Q=(); [ "$QUICK" = 1 ] && Q=(--quick)
PROF=$W/h200-olmoe-1b-7b-x0.25.yaml

if has env; then
  step 30 nvidia-smi
  step 60 python3 -c "import torch, sys; print(sys.version); print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')"
  say "cpus $(nproc), load $(cat /proc/loadavg)"; df -h /tmp >>"$LOG" 2>&1
fi
if has profile; then
  step 240 $M profile --device "$DEV" --model olmoe-1b-7b --scale 0.25 --context 64 -o "$PROF" --disk-dir "$W" "${Q[@]}" \
    || step 200 $M profile --device "$DEV" --model olmoe-1b-7b --scale 0.25 --context 64 -o "$PROF" --disk-dir "$W" --quick
fi
if has neural; then
  TL=${TL:-30}; [ "$QUICK" = 1 ] && TL=5
  step 200 python3 benchmarks/bench_neural_train.py --device "$DEV" --presets tiny,small,baseline --time-limit $TL --threads 8
fi
if has rows; then
  SC=benchmarks/fidelity/scenarios/olmoe.yaml
  REQ=(); [ "$QUICK" = 1 ] && REQ=(--requests 2)
  for row in $ROWS; do
    IFS=: read -r pred cap b <<<"$row"; d=$W/rows/$pred-c$cap-b$b
    S=(--scale 0.25 --set predictor.name=$pred --set cache.gpu.capacity_experts=$cap --set batch.size=$b "${REQ[@]}" --quiet)
    for i in 1 2 3; do
      step 120 $M replay --real "$SC" "${S[@]}" --device "$DEV" --hardware "$PROF" -o "$d/real$i" --events \
        --workdir "$W/work" --keep-files || break
    done
    [ "${SIMS:-1}" = 1 ] || continue  # SIMS=0: only the real runs here (simulations need no GPU)
    step 60 $M replay "$SC" "${S[@]}" --hardware "$PROF" -o "$d/sim"
    step 60 $M replay "$SC" "${S[@]}" --hardware "$PROF" --set "runtime=${PROF%.yaml}.runtime.yaml" -o "$d/sim-rt"
    for s in sim sim-rt; do step 60 $M compare "$d/$s" "$d/real1" -o "$d/compare-$s" --quiet; done
  done
  rm -rf "$W/work"
fi
if has profile_quick; then
  step 120 $M profile --device "$DEV" --model olmoe-1b-7b --scale 0.25 --context 64 -o "$W/quick/h200-quick.yaml" --disk-dir "$W" --quick
fi
if has preattn; then  # replay --real with the pre-attention predictor: scaled trace, a tiny checkpoint, the real run
  SC=benchmarks/gpu/pre-attention.yaml; P=$W/preattn; PA=(--set predictor.name=pre_attention --set predictor.checkpoint=$P/p.pt --set predictor.latency_us=0)
  step 60 $M replay "$SC" --scale 0.25 -o "$P/sim0" --quiet &&
  step 120 $M predictor train pre_attention --trace "$P/sim0/trace.parquet" --preset tiny --epochs 3 -o "$P/p.pt" --device "$DEV" --quiet &&
  step 120 $M replay --real "$SC" --scale 0.25 --device "$DEV" "${PA[@]}" -o "$P/real" --quiet &&
  step 60 $M replay "$SC" --scale 0.25 "${PA[@]}" -o "$P/sim" --quiet
  rm -f "$P"/*/trace.parquet
fi
if has sweep2; then  # the 2-workers-vs-1 sweep target on quiet cores (points of >= 3 s with one worker)
  step 200 python3 benchmarks/bench_sweep.py --workers 2 --large ${LARGE:-48}
fi
if has benches; then  # the CPU benchmarks on this quiet machine (ratios against baselines in the same run)
  step 120 python3 benchmarks/bench_cache.py --universe 3000 --alpha 1.2
  step 200 python3 benchmarks/bench_sweep.py
  step 300 python3 benchmarks/bench_engine.py ${ENGINE_ARGS:-}
fi
say "done"
rm -f "$W"/*.bin "$W"/*.dat 2>/dev/null
find "$W" -name '*.bin' -size +10M -delete 2>/dev/null
tar czf "$OUT/gpu-results.tar.gz" -C "$W" --exclude='*.bin' --exclude=work . 2>>"$LOG"
ls -la "$OUT" >>"$LOG"
