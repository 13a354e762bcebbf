#!/usr/bin/env bash
# Issue 24 item 5, selection after alignment, at k = 8 on Qwen2.5-Coder-0.5B: align all 24 layers' mixers at once,
# let the search score the hybrid those mixers make (objective hybrid-agreement) instead of the skip-draft, then
# give the layers it picks the same align -> KD budget as bench/align_ablation.sh's split arm on section 4's
# searched layers. The search's settings are the claims preset's (agreement, 24 trials, 32 new tokens, the first
# 8 built-in prompts), only the objective differs. Every command resumes (re-run after a stop).
#
#   bash bench/align_selection.sh OUT [ALIGN_STEPS KD_STEPS]
set -euo pipefail
OUT=${1:?usage: bench/align_selection.sh OUT [ALIGN_STEPS KD_STEPS]}
AL=${2:-70}; KD=${3:-16}
RAD=${RAD:-rad}; PY=${PY:-python}
D="--data gsm8k+mbpp --seq-len 256 --max-examples 4000 --seed 0"
mkdir -p "$OUT"
resume() { [ -d "$1/checkpoints" ] && echo --resume || true; }
[ -f "$OUT/all/rad_conversion.json" ] || $RAD convert qwen2.5-coder-0.5b --layers first:24 --init rad --out "$OUT/all"
[ -f "$OUT/all-align/summary.json" ] || $RAD align "$OUT/all" $D --steps "$AL" --batch 4 --eval-sequences 8 \
  --eval-every "$AL" --no-kl --save-every 20 --no-progress --no-tensorboard $(resume "$OUT/all-align") --out "$OUT/all-align"
$PY -c "from rad.search.prompts import DEFAULT_PROMPTS; import json; print('\n'.join(json.dumps({'prompt': p}) for p in DEFAULT_PROMPTS[:8]))" > "$OUT/prompts.jsonl"
[ -f "$OUT/search/search.json" ] || $RAD search qwen2.5-coder-0.5b --k 8 --objective hybrid-agreement \
  --aligned "$OUT/all-align" --trials 24 --max-new-tokens 32 --prompts "$OUT/prompts.jsonl" --no-baselines \
  $( [ -d "$OUT/search" ] && echo --resume ) --out "$OUT/search"
[ -f "$OUT/hybrid/rad_conversion.json" ] || $RAD convert qwen2.5-coder-0.5b --layers-from "$OUT/search" --init rad \
  --out "$OUT/hybrid"
[ -f "$OUT/align$AL/summary.json" ] || $RAD align "$OUT/hybrid" $D --steps "$AL" --batch 4 --eval-sequences 8 \
  --eval-every "$AL" --no-kl --save-every 20 --no-progress --no-tensorboard $(resume "$OUT/align$AL") --out "$OUT/align$AL"
[ -f "$OUT/align${AL}_kd$KD/student/config.json" ] || $RAD distill "$OUT/align$AL/student" $D --micro-batch 4 \
  --steps "$KD" --eval-every "$KD" --eval-sequences 8 --save-every 8 --no-progress \
  $(resume "$OUT/align${AL}_kd$KD") --out "$OUT/align${AL}_kd$KD"
