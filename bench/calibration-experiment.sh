#!/bin/bash
# The calibrated starts of docs/calibration.md: SmolLM2-135M, rank 16, 5 iterations, randomized
# SVD; calibration on the first 16,384 tokens of the first eight plays other than Hamlet (in
# name order); start perplexity on the first 2048 tokens of Hamlet and of the GPL-3 licence.
#
#   cargo xtask assets && cargo build -p loftq-cli --features loftq-core/wgpu
#   bench/calibration-experiment.sh loftq-nf2 calibrated-nf2 gptq-nf2 budget-3.0 ...
#
# Runs: {qlora,loftq,calibrated,gptq}-{nf2,nf3,nf4}, budget-<bits> (the allocator over its
# default candidates, calibrated adapters), fp (the model itself). Each appends one line
# (run, init seconds, peak RSS, ppl Hamlet, ppl GPL-3) to bench/results/calibration/runs.tsv.
# $CAL_TOKENS changes the calibration tokens (default 16384), $CANDIDATES the allocator's
# candidates, $EXTRA adds arguments to every init (e.g. "--block-size 1024 --double-quant"),
# $TAG is appended to the run's name in the results.
set -eu
# shellcheck source=bench/common.sh
. "$(dirname "$0")/common.sh"
WORK=${WORK:-$ROOT/bench/calibration-runs}
TOKENS=${CAL_TOKENS:-16384}
CAL="--calibration $(echo "$CAL" | tr '\n' ' ') --calibration-tokens $TOKENS"
OUT=$ROOT/bench/results/calibration
mkdir -p "$WORK" "$OUT"
[ -f "$OUT/runs.tsv" ] || printf 'run\tinit_seconds\tpeak_rss_gib\tppl_hamlet_2048\tppl_gpl3_2048\n' \
  > "$OUT/runs.tsv"
cd "$WORK"
for run in "$@"; do
  rm -rf "$run"
  case $run in
    fp)
      printf '%s\t-\t-\t%s\t%s\n' "$run" "$(ppl "$M" "" "$T/hamlet_gut.txt")" \
        "$(ppl "$M" "" "$OTHER")" >> "$OUT/runs.tsv"
      continue ;;
    qlora-*) args="--method qlora --bits ${run#qlora-}" ;;
    loftq-*) args="--method loftq --bits ${run#loftq-}" ;;
    calibrated-*) args="--method loftq --bits ${run#calibrated-} $CAL" ;;
    gptq-*) args="--method loftq --bits ${run#gptq-} $CAL --quantizer gptq" ;;
    budget-*) args="--method loftq --avg-bits ${run#budget-} $CAL ${CANDIDATES:+--candidates $CANDIDATES}" ;;
    *) echo "unknown run $run" >&2; exit 2 ;;
  esac
  # shellcheck disable=SC2086
  $L init --model "$M" --out "$run" $args ${EXTRA:-} --json > "$run.json" 2> "$run.err"
  secs=$(python3 -c "import json;t=json.load(open('$run.json'))['totals'];print(round(t['wall_seconds'],1))")
  rss=$(python3 -c "import json;t=json.load(open('$run.json'))['totals'];print(round(t['peak_rss_bytes']/2**30,2))")
  printf '%s\t%s\t%s\t%s\t%s\n' "$run${TAG:-}" "$secs" "$rss" "$(ppl "$run" "$run/adapter" "$T/hamlet_gut.txt")" \
    "$(ppl "$run" "$run/adapter" "$OTHER")" >> "$OUT/runs.tsv"
  cp "$run.json" "$OUT/$run${TAG:-}.report.json"
  rm -rf "$run"
done
