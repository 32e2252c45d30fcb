#!/bin/bash
# Issue 18's cost goal: the calibrated start's `loftq init` time as a multiple of plain LoftQ's,
# SmolLM2-135M at NF2 r16 (5 iterations, randomized SVD), plain LoftQ and each calibration mode
# alternating ROUNDS times so that the machine's load falls on all of them. Prints each run's
# wall time (the report's `wall_seconds`) and the median ratio per mode, and appends them to
# bench/results/calibration/cost.tsv.
#
#   cargo xtask assets && cargo build -p loftq-cli
#   bench/calibration-cost.sh [ROUNDS] [TOKENS]     (defaults: 5 rounds, 2,048 tokens)
#
# Modes: quantized (the default), sequential; $MODES changes the list, a mode being
# --calibration-inputs' value, optionally with :F for --drift-correction F (e.g. quantized:0).
set -eu
# shellcheck source=bench/common.sh
. "$(dirname "$0")/common.sh"
rounds=${1:-5} tokens=${2:-2048}
modes=${MODES:-quantized sequential}
work=$(mktemp -d)
out=$ROOT/bench/results/calibration/cost.tsv
[ -f "$out" ] || printf 'commit\ttokens\trun\tround\tseconds\n' > "$out"
commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
secs() { python3 -c "import json,sys;print(round(json.load(open(sys.argv[1]))['totals']['wall_seconds'],2))" "$1"; }
for r in $(seq "$rounds"); do
  for run in loftq $modes; do
    rm -rf "$work/out"
    case $run in
      loftq) args=() ;;
      # shellcheck disable=SC2086
      *) args=(--calibration $CAL --calibration-tokens "$tokens" --calibration-inputs "${run%%:*}")
        [[ $run == *:* ]] && args+=(--drift-correction "${run#*:}") ;;
    esac
    $L init --model "$M" --out "$work/out" --bits nf2 --rank 16 "${args[@]}" --json \
      > "$work/report.json" 2> /dev/null
    printf '%s\t%s\t%s\t%s\t%s\n' "$commit" "$tokens" "$run" "$r" "$(secs "$work/report.json")" \
      | tee -a "$work/times.tsv"
  done
done
cat "$work/times.tsv" >> "$out"
median() { awk -v m="$1" '$3==m {print $5}' "$work/times.tsv" | sort -n \
  | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
base=$(median loftq)
for run in $modes; do
  m=$(median "$run")
  printf 'median %s: %s s, %.2fx plain LoftQ (%s s)\n' "$run" "$m" "$(echo "$m / $base" | bc -l)" "$base"
done
rm -rf "$work"
