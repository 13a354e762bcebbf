#!/usr/bin/env bash
# Issue 24's k = 8 ablation at equal training wall clock: align only / KD only / align -> KD, on
# Qwen2.5-Coder-0.5B's searched k = 8 layers (docs/results.md section 4), `rad` init, seed 0.
# Step counts come from the quiet-machine step costs of bench/distill_precision.py (KD, bf16) and
# bench/align_step.py (align, streaming bf16 teacher) on the machine that ran it (docs/results.md section 5):
# each arm gets ~8 minutes of optimiser steps. Every command resumes (re-run the script after a stop).
#
#   bash bench/align_ablation.sh OUT [KD_STEPS ALIGN_STEPS SPLIT_ALIGN_STEPS SPLIT_KD_STEPS]
set -euo pipefail
OUT=${1:?usage: bench/align_ablation.sh OUT [KD_STEPS ALIGN_STEPS SPLIT_ALIGN_STEPS SPLIT_KD_STEPS]}
KD=${2:-32}; AL=${3:-140}; SPLIT_AL=${4:-70}; SPLIT_KD=${5:-16}
RAD=${RAD:-rad}
D="--data gsm8k+mbpp --seq-len 256 --max-examples 4000 --seed 0"
mkdir -p "$OUT"
H="$OUT/hybrid"
[ -f "$H/rad_conversion.json" ] || $RAD convert qwen2.5-coder-0.5b --layers 4,7,9,13,16,18,20,22 --init rad --out "$H"
timed() {  # timed NAME CMD...: runs CMD unless NAME's wall clock is recorded; appends "NAME seconds" to OUT/times.txt
  local name=$1; shift
  grep -q "^$name " "$OUT/times.txt" 2>/dev/null && return 0
  local t0; t0=$(date +%s.%N)
  "$@"
  echo "$name $(echo "$(date +%s.%N) - $t0" | bc)" >> "$OUT/times.txt"
}
resume() { [ -d "$1/checkpoints" ] && echo --resume || true; }
timed kd$KD $RAD distill "$H" $D --micro-batch 4 --steps "$KD" --eval-every "$KD" --eval-sequences 8 \
  --save-every 8 --no-progress $(resume "$OUT/kd$KD") --out "$OUT/kd$KD"
timed align$AL $RAD align "$H" $D --steps "$AL" --batch 4 --eval-sequences 8 --eval-every "$AL" --no-kl \
  --save-every 20 --no-progress --no-tensorboard $(resume "$OUT/align$AL") --out "$OUT/align$AL"
timed align$SPLIT_AL $RAD align "$H" $D --steps "$SPLIT_AL" --batch 4 --eval-sequences 8 --eval-every "$SPLIT_AL" \
  --no-kl --save-every 20 --no-progress --no-tensorboard $(resume "$OUT/align$SPLIT_AL") --out "$OUT/align$SPLIT_AL"
timed align${SPLIT_AL}_kd$SPLIT_KD $RAD distill "$OUT/align$SPLIT_AL/student" $D --micro-batch 4 --steps "$SPLIT_KD" \
  --eval-every "$SPLIT_KD" --eval-sequences 8 --save-every 8 --no-progress \
  $(resume "$OUT/align${SPLIT_AL}_kd$SPLIT_KD") --out "$OUT/align${SPLIT_AL}_kd$SPLIT_KD"
cat "$OUT/times.txt"
