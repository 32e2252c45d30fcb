#!/bin/bash
# One training step here against PyTorch + PEFT on the same CPU, in alternating rounds: each
# round runs `loftq-bench train` on a synthetic checkpoint with SmolLM2-135M's shapes and
# `bench/peft_loftq.py --suites train` with the same shapes (fresh r16 LoRA on every linear
# layer, AdamW, with and without layer recomputation), the order swapped every round, so
# that the slow swings of a shared machine fall on both. The summary gives, per shape and
# mode, each side's median step and the median and range of the per-round ratios.
#
#   cargo build -p loftq-bench
#   python3 -m venv ~/.cache/torchenv && ~/.cache/torchenv/bin/pip install torch transformers peft
#   bench/train-vs-peft.sh ~/.cache/torchenv/bin/python 6 bench/results/train-vs-peft
#
# PROFILE=full adds the 2×256 step to 4×128. About 70 s a round on 2 cores (quick).
set -eu
PY=${1:?usage: bench/train-vs-peft.sh PYTHON [ROUNDS] [OUT]}
ROUNDS=${2:-6}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${3:-$ROOT/bench/results/train-vs-peft}
B=${LOFTQ_BENCH:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/loftq-bench}
PROFILE=${PROFILE:-quick}
case $PROFILE in
  quick) SHAPES="4x128" ;;
  full) SHAPES="4x128 2x256" ;;
  *) echo "PROFILE must be quick or full" >&2; exit 2 ;;
esac
[ -x "$B" ] || { echo "no $B: run cargo build -p loftq-bench (or set LOFTQ_BENCH)" >&2; exit 2; }
"$PY" -c "import torch, peft, transformers" || { echo "$PY cannot import torch, peft, transformers" >&2; exit 2; }

CKPT=$(mktemp -d)
trap 'rm -rf "$CKPT"' EXIT
"$B" synth --arch smollm2-135m --out "$CKPT" >&2
mkdir -p "$OUT"

ours() {
  for s in $SHAPES; do
    "$B" train --model "$CKPT" --batch "${s%x*}" --seq "${s#*x}" --repeats 3 \
      --json "$OUT/ours-$1-$s.json" >&2
  done
}
theirs() {
  "$PY" "$ROOT/bench/peft_loftq.py" --suites train --profile "$PROFILE" \
    --json "$OUT/peft-$1.json" 2>&1 | grep -v -i warn >&2 || true
}
for r in $(seq "$ROUNDS"); do
  echo "round $r of $ROUNDS" >&2
  if [ $((r % 2)) = 1 ]; then ours "$r"; theirs "$r"; else theirs "$r"; ours "$r"; fi
done

python3 - "$OUT" "$ROUNDS" "$SHAPES" <<'EOF' | tee "$OUT/summary.md"
import json, statistics, sys
out, rounds, shapes = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
rows = {}
for r in range(1, rounds + 1):
    peft = json.load(open(f"{out}/peft-{r}.json"))["cases"]
    for s in shapes:
        b, q = s.split("x")
        for c in json.load(open(f"{out}/ours-{r}-{s}.json")):
            mode = c["recompute"]
            name = f"{b}×{q} recompute={mode}"
            t = [p["timing"]["median_s"] for p in peft if p["name"].endswith(name)]
            rows.setdefault((s, mode), []).append((c["step"]["median_s"], t[0]))
print(f"Training step, ours against PyTorch + PEFT, {rounds} alternating rounds "
      "(median of each side's per-round medians; ratio: median and range over rounds)\n")
print("| batch × seq | recompute | ours | PyTorch + PEFT | ours / PyTorch | range |")
print("|---|---|---|---|---|---|")
for (s, mode), v in rows.items():
    ratios = [a / b for a, b in v]
    print(f"| {s.replace('x', ' × ')} | {mode} | {statistics.median(a for a, _ in v):.2f} s "
          f"| {statistics.median(b for _, b in v):.2f} s | {statistics.median(ratios):.2f} "
          f"| {min(ratios):.2f}–{max(ratios):.2f} |")
EOF
