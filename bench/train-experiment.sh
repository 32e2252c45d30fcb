#!/bin/bash
# The fine-tuning experiment of docs/results.md ("Fine-tuning"): SmolLM2-135M,
# LoRA r16 alpha16 on all linear layers, AdamW lr 3e-4 without weight decay, 10 warm-up steps
# then constant, no clipping, 200 steps of 4×128-token random windows (seed 0) from the plays
# other than Hamlet; perplexity of Hamlet's first 2048 tokens at steps 0, 100 and 200.
#
#   cargo xtask assets && cargo build -p loftq-cli --features loftq-core/wgpu
#   bench/train-experiment.sh loftq-nf2 qlora-nf2 lora loftq-nf4 qlora-nf4 calibrated-nf2
#   bench/train-experiment.sh distilled-nf2   # after bench/distill-experiment.sh calibrated-nf2
#
# Runs go to $WORK (default bench/train-runs); each run's history.json is copied to
# bench/results/train/<run>.json. About 25 minutes per run on 2 cores.
set -eu
# shellcheck source=bench/common.sh
. "$(dirname "$0")/common.sh"
WORK=${WORK:-$ROOT/bench/train-runs}
COMMON="--text $FILES --val-text $T/hamlet_gut.txt --val-tokens 2048 --steps 200 --batch 4
  --seq 128 --lr 3e-4 --warmup 10 --decay constant --weight-decay 0 --max-grad-norm 0 --seed 0
  --eval-every 100 --save-every 100 --no-recompute --json"
mkdir -p "$WORK" "$ROOT/bench/results/train"
cd "$WORK"
for run in "$@"; do
  case $run in
    loftq-nf2|loftq-nf4)
      bits=${run#loftq-}
      [ -f init-$bits/report.json ] || $L init --model $M --out init-$bits --method loftq \
        --bits $bits --rank 16 --alpha 16 --iters 5 --svd exact --init-scaling peft \
        > init-$bits.log 2>&1
      $L train --model init-$bits --adapter init-$bits/adapter $COMMON --out $run \
        > $run.jsonl 2> $run.err ;;
    calibrated-nf2|gptq-nf2)
      # The calibrated starts of docs/calibration.md (randomized SVD, the plays but Hamlet).
      bits=nf2; q=rtn; [ $run = gptq-nf2 ] && q=gptq
      # shellcheck disable=SC2086
      [ -f init-$run/report.json ] || $L init --model $M --out init-$run --method loftq \
        --bits $bits --rank 16 --alpha 16 --iters 5 --calibration $CAL \
        --calibration-tokens 16384 --quantizer $q > init-$run.log 2>&1
      $L train --model init-$run --adapter init-$run/adapter $COMMON --out $run \
        > $run.jsonl 2> $run.err ;;
    distilled-nf2)
      # The calibrated NF2 start distilled by bench/distill-experiment.sh calibrated-nf2.
      [ -f distill-calibrated-nf2/adapter/adapter_config.json ] || {
        echo "run bench/distill-experiment.sh calibrated-nf2 first" >&2; exit 2; }
      $L train --model init-calibrated-nf2 --adapter distill-calibrated-nf2/adapter $COMMON \
        --out $run > $run.jsonl 2> $run.err ;;
    qlora-nf2|qlora-nf4)
      $L train --model $M --quantize ${run#qlora-} --rank 16 --alpha 16 $COMMON --out $run \
        > $run.jsonl 2> $run.err ;;
    lora)
      $L train --model $M --rank 16 --alpha 16 $COMMON --out $run > $run.jsonl 2> $run.err ;;
    *) echo "unknown run $run (loftq-nf2|loftq-nf4|calibrated-nf2|gptq-nf2|distilled-nf2|qlora-nf2|qlora-nf4|lora)" >&2
       exit 2 ;;
  esac
  cp $run/history.json "$ROOT/bench/results/train/$run.json"
done
