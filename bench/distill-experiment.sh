#!/bin/bash
# The distillation experiment of docs/calibration.md ("Distillation"): SmolLM2-135M at NF2,
# rank 16, its adapters fitted to the full-precision model (`loftq train --distill-from`, KL
# at every position) for $STEPS (default 200) steps of 4×128-token random windows (seed 0) from
# the plays other than Hamlet; AdamW lr $LR (default 1e-3), 10 warm-up steps, cosine decay,
# gradient norm clipped to 1; $HIDDEN_WEIGHT (default 0) times the final hidden states' mean
# squared difference added to the KL. Then the start perplexity on the first 2048 tokens of Hamlet and
# of the GPL-3 licence, as bench/calibration-experiment.sh measures the undistilled starts.
#
#   cargo xtask assets && cargo build -p loftq-cli --features loftq-core/wgpu
#   bench/distill-experiment.sh calibrated-nf2 loftq-nf2 qlora-nf2
#   bench/distill-experiment.sh blockwise-kl-calibrated-nf2   # block-wise first, then the KL
#   SEED=1 STEPS=60 LR=5e-4 EVERY=20 bench/distill-experiment.sh budget-3.0
#
# budget-B distills the B-bit allocator's start of docs/calibration.md (NF2/NF3 in blocks
# of 64, 128, 256, double-quantized; rows weighed by the loss's sensitivity, damping 0.1; the
# same calibration text as bench/calibration-experiment.sh; $SEED, default 0, its seed;
# $DAMPING, default 0.1, its --damping).
# $EVERY (default 50) is the steps between validations and checkpoints.
#
# Each run appends (name, steps, lr, seconds, ppl Hamlet, ppl GPL-3) to
# bench/results/distill/runs.tsv and copies its history.json there as <name>.json, the name
# being <run>, then -lr<LR> and -hw<W> off the defaults, then $TAG. The distilled adapter stays in
# $WORK/distill-<name>; bench/train-experiment.sh distilled-nf2 starts from distill-calibrated-nf2.
set -eu
# shellcheck source=bench/common.sh
. "$(dirname "$0")/common.sh"
WORK=${WORK:-$ROOT/bench/train-runs}
STEPS=${STEPS:-200}
LR=${LR:-1e-3}
HW=${HIDDEN_WEIGHT:-0}
COMMON="--distill-from $M --text $FILES --val-text $T/hamlet_gut.txt --val-tokens 2048
  --steps $STEPS --batch 4 --seq 128 --lr $LR --warmup 10 --decay cosine --max-grad-norm 1
  --seed 0 --eval-every ${EVERY:-50} --save-every ${EVERY:-50} --no-recompute --json
  --hidden-weight $HW"
OUT=$ROOT/bench/results/distill
mkdir -p "$WORK" "$OUT"
[ -f "$OUT/runs.tsv" ] ||
  printf 'run\tsteps\tlr\tseconds\tppl_hamlet_2048\tppl_gpl3_2048\n' > "$OUT/runs.tsv"
cd "$WORK"
for run in "$@"; do
  name=$run; [ "$LR" = 1e-3 ] || name=$name-lr$LR; [ "$HW" = 0 ] || name=$name-hw$HW
  name=$name${TAG:-}
  from=''
  out=distill-$name
  case $run in
    loftq-nf2) init=init-nf2
      # The start of bench/train-experiment.sh loftq-nf2.
      [ -f $init/report.json ] || $L init --model $M --out $init --method loftq --bits nf2 \
        --rank 16 --alpha 16 --iters 5 --svd exact --init-scaling peft > $init.log 2>&1 ;;
    calibrated-nf2) init=init-calibrated-nf2
      # shellcheck disable=SC2086
      [ -f $init/report.json ] || $L init --model $M --out $init --method loftq --bits nf2 \
        --rank 16 --alpha 16 --iters 5 --calibration $CAL --calibration-tokens 16384 \
        --quantizer rtn > $init.log 2>&1 ;;
    blockwise-kl-calibrated-nf2) init=init-calibrated-nf2
      # The calibrated start (made by the calibrated-nf2 run) fitted block-wise first (16 rows,
      # 10 steps of 4 rows per layer), then distilled by the KL from there.
      [ -f $init/report.json ] || { echo "run calibrated-nf2 first" >&2; exit 2; }
      # shellcheck disable=SC2086
      [ -f bw-$init/blockwise.json ] || $L train --model $init --adapter $init/adapter \
        --distill-from "$M" --text $FILES --val-text "$T/hamlet_gut.txt" --blockwise \
        --blockwise-rows 16 --steps 10 --batch 4 --seq 128 --lr 1e-3 --seed 0 --json \
        --out bw-$init > bw-$init.jsonl 2> bw-$init.err
      from=bw-$init/adapter ;;
    budget-*) damp=${DAMPING:-0.1}; init=init-$run; [ "$damp" = 0.1 ] || init=$init-damp$damp
      init=$init-s${SEED:-0}; name=$name-s${SEED:-0}; [ "$damp" = 0.1 ] || name=${name/$run/$run-damp$damp}
      out=distill-$name
      if [ ! -f $init/report.json ]; then
        # shellcheck disable=SC2086
        $L init --model $M --out $init --method loftq --avg-bits "${run#budget-}" --calibration $CAL \
          --calibration-tokens 16384 --sensitivity rows --damping $damp --seed ${SEED:-0} \
          --candidates nf2-b64-dq,nf2-b128-dq,nf2-b256-dq,nf3-b64-dq,nf3-b128-dq,nf3-b256-dq \
          --json > $init.json 2> $init.log
        # The undistilled start, as step 0.
        printf '%s\t0\t-\t-\t%s\t%s\n' "$init" "$(ppl $init $init/adapter "$T/hamlet_gut.txt")" \
          "$(ppl $init $init/adapter "$OTHER")" >> "$OUT/runs.tsv"
      fi ;;
    qlora-nf2) init=init-qlora-nf2
      [ -f $init/report.json ] || $L init --model $M --out $init --method qlora --bits nf2 \
        --rank 16 --alpha 16 > $init.log 2>&1 ;;
    *) echo "unknown run $run (loftq-nf2|calibrated-nf2|blockwise-kl-calibrated-nf2|qlora-nf2|budget-<bits>)" >&2
      exit 2 ;;
  esac
  rm -rf $out
  start=$(date +%s)
  # shellcheck disable=SC2086
  $L train --model $init --adapter "${from:-$init/adapter}" $COMMON --out $out > $out.jsonl \
    2> $out.err
  secs=$(( $(date +%s) - start ))
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$STEPS" "$LR" "$secs" \
    "$(ppl $init $out/adapter "$T/hamlet_gut.txt")" "$(ppl $init $out/adapter "$OTHER")" \
    >> "$OUT/runs.tsv"
  cp $out/history.json "$OUT/$name.json"
done
