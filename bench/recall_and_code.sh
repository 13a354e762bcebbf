#!/usr/bin/env bash
# Issue 26's measurements on Qwen2.5-Coder-0.5B: HumanEval (all 164), passkey recall and loss against position,
# teacher vs the k = 4 RAD student (section 4's searched layers 4,7,18,22, `rad` init, the KD-only bf16 recipe of
# docs/distill.md at section 5's 32 steps). Every command resumes: re-run the script after a stop.
#
#   bash bench/recall_and_code.sh OUT
set -euo pipefail
OUT=${1:?usage: bench/recall_and_code.sh OUT}
RAD=${RAD:-rad}
T=qwen2.5-coder-0.5b
D="--data gsm8k+mbpp --seq-len 256 --max-examples 4000 --seed 0"
mkdir -p "$OUT"
H="$OUT/hybrid4"
[ -f "$H/rad_conversion.json" ] || $RAD convert $T --layers 4,7,18,22 --init rad --out "$H"
S="$OUT/kd32_k4"
[ -f "$S/summary.json" ] || $RAD distill "$H" $D --micro-batch 4 --steps 32 --eval-every 32 --eval-sequences 8 \
  --save-every 8 --no-progress $( [ -d "$S/checkpoints" ] && echo --resume ) --out "$S"
# Passkey: 20 items at 1k and 4k (5 depths x 4 keys), bf16 generation
$RAD eval $T "$S/student" --tasks passkey --passkey-lengths 1024,4096 --passkey-repeats 4 --batch-size 4 \
  --generation-dtype auto --out "$OUT/passkey_short"
# Loss against position on two 8,192-token windows of CPython's standard library
$RAD eval $T "$S/student" --tasks "" --position-loss 8192 --position-windows 2 --out "$OUT/position"
# HumanEval: greedy, evalplus's chat prompt, generated in the loaded fp32 (the teacher's run too)
$RAD eval $T "$S/student" --tasks humaneval --batch-size 32 --out "$OUT/humaneval"
# Passkey at 8k: 10 items (5 depths x 2 keys)
$RAD eval $T "$S/student" --tasks passkey --passkey-lengths 8192 --passkey-repeats 2 --batch-size 2 \
  --generation-dtype auto --out "$OUT/passkey_8k"
