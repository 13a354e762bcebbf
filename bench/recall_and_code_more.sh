#!/usr/bin/env bash
# Issue 26, second round: recall at 8k across all depths (teacher and the k = 4 student of
# bench/recall_and_code.sh), and the k = 8 students of section 5 (docs/results.md): passkey 1k / 4k, HumanEval.
# KD32 is bench/align_ablation.sh's kd32/student (section 4's searched layers 4,7,9,13,16,18,20,22);
# SELECTED is bench/align_selection.sh's align70_kd16/student (layers 2,6,7,13,15,16,20,22, picked after
# alignment); and the converted, untrained hybrids (`rad` init: in_proj = 0, so each is the model with those
# layers' attention skipped, the search's draft) on the searched and on uniform layers at k = 4 and 8.
# Every command resumes: re-run after a stop.
#
#   bash bench/recall_and_code_more.sh OUT KD32_STUDENT SELECTED_STUDENT
set -euo pipefail
OUT=${1:?usage: bench/recall_and_code_more.sh OUT KD32_STUDENT SELECTED_STUDENT}
KD32=${2:?k = 8 KD-only student folder}
SEL=${3:?k = 8 selected-layers student folder}
RAD=${RAD:-rad}
T=qwen2.5-coder-0.5b
mkdir -p "$OUT/models"
ln -sfn "$(realpath "$OUT/kd32_k4/student")" "$OUT/models/k4-kd32"
ln -sfn "$(realpath "$KD32")" "$OUT/models/k8-kd32"
ln -sfn "$(realpath "$SEL")" "$OUT/models/k8-selected"
# Passkey at 8k, one key at each of the five depths, teacher and k = 4 student
$RAD eval $T "$OUT/models/k4-kd32" --tasks passkey --passkey-lengths 8192 --passkey-repeats 1 --batch-size 2 \
  --generation-dtype auto --out "$OUT/passkey_8k_depths"
# The k = 8 students at 1k and 4k: the same 40 items as the teacher's (bench/recall_and_code.sh)
$RAD eval "$OUT/models/k8-kd32" --tasks passkey --passkey-lengths 1024,4096 --passkey-repeats 4 --batch-size 4 \
  --generation-dtype auto --out "$OUT/passkey_short_k8"
$RAD eval "$OUT/models/k8-selected" --tasks passkey --passkey-lengths 1024,4096 --passkey-repeats 4 --batch-size 4 \
  --generation-dtype auto --out "$OUT/passkey_short_k8sel"
# The drafts: converted, not trained
for spec in k4-converted:4,7,18,22 k4-uniform-converted:5,11,17,23 k8-converted:4,7,9,13,16,18,20,22 \
            k8-uniform-converted:2,5,8,11,14,17,20,23; do
  name=${spec%%:*}; layers=${spec#*:}
  [ -f "$OUT/models/$name/rad_conversion.json" ] || $RAD convert $T --layers "$layers" --init rad --out "$OUT/models/$name"
done
$RAD eval "$OUT/models/k4-converted" "$OUT/models/k4-uniform-converted" "$OUT/models/k8-converted" \
  "$OUT/models/k8-uniform-converted" --tasks passkey --passkey-lengths 1024 --passkey-repeats 4 --batch-size 4 \
  --generation-dtype auto --out "$OUT/passkey_drafts"
# The search that keeps recall (docs/search.md): its layers' draft, and both objectives on the layer sets
[ -f "$OUT/search_recall_k8/search.json" ] || $RAD search $T --k 8 --objective agreement --trials 24 --recall 1024 \
  --max-new-tokens 8 --no-baselines --out "$OUT/search_recall_k8"
[ -f "$OUT/models/k8-recall-converted/rad_conversion.json" ] || \
  $RAD convert $T --layers-from "$OUT/search_recall_k8" --init rad --out "$OUT/models/k8-recall-converted"
$RAD eval "$OUT/models/k8-recall-converted" --tasks passkey --passkey-lengths 1024 --passkey-repeats 4 --batch-size 4 \
  --generation-dtype auto --out "$OUT/passkey_drafts"
python bench/search_objectives_on_masks.py "$OUT/objectives_on_masks.json" "$OUT/search_recall_k8"
$RAD eval "$OUT/models/k8-kd32" --tasks humaneval --batch-size 32 --out "$OUT/humaneval_k8"
