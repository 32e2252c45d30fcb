#!/bin/bash
# The GPU checks of issue 23 in one run, for a borrowed GPU machine without Rust or network.
#
# Here (the tuned build recompiles Burn's stack the first time: about 20 minutes on 2 cores):
#   bench/gpu-check.sh prepare .device
# puts two stripped, xz-compressed `loftq-bench` builds into .device (13 and 15 MB): `plain`
# (`--features loftq-core/wgpu`, what CI tests) and `tuned` (plus `loftq-core/tuned`: Burn's
# fusion and autotuning), with the commit they were built from (the copy of the working tree
# on the device has no git history). `.device` is ignored by git; name it in the device call's
# `carry`.
#
# There (the folder carried beside the working tree, with the Vulkan loaders as the device
# notes say: carry .device and .gl, the .debs their `apt-get download` line fetches), within a
# 590 s limit; on 2026-12-04 this ran as is:
#   for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
#   export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
#   BUDGET=530 PACK=$OUT/gpu-check.tgz bash bench/gpu-check.sh run .device /tmp/gpu-check
# `run DIR OUT` runs, most important first, each step under its own time limit so that one
# slow step cannot take the others down: matrix-product rates with each build, the training
# step (SmolLM2-135M shapes, 4×128) on WGPU with the plain build and in PyTorch + PEFT on
# CUDA (if torch imports), 4096² LoftQ (NF4 r64 T5), whole-model init on SmolLM2's shapes with the plain build, the
# tuned build's training step (twice: the second process finds the first one's tuning in
# cubecl's persistent cache) and init, phase profiles (`LOFTQ_PROFILE=1`) of 4096² LoftQ and
# the training step, the step's and a 4096² LoftQ run's kernels with their GPU time (cubecl's
# profiler), the phase profile of whole-model init with the plain build, each build's
# quantizer, SVD and LoftQ suites, and the calibrated init. The whole run stops within
# BUDGET seconds (default 540: one device call is at most 600). Every record lands in OUT
# (with PACK set, also packed into that one archive after each step: a device call returns at
# most 8 files); `loftq-bench report --input OUT/suite-*.json --input
# bench/results/quick/suite-cpu.json --out DIR` puts them beside this project's 2-core CPU
# figures. With `run .device OUT smoke` every step uses the smallest sizes (a check of the
# script on lavapipe, where the tuned build's autotuning runs on the CPU). The device tests
# are not included (CI runs them on lavapipe; their binaries are too large to carry beside
# these).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)

prepare() {
  local dir=$1 target=${CARGO_TARGET_DIR:-$ROOT/target}
  mkdir -p "$dir"
  for v in plain tuned; do
    local f=loftq-core/wgpu
    [ "$v" = tuned ] && f=loftq-core/wgpu,loftq-core/tuned
    (cd "$ROOT" && cargo build -q -p loftq-bench --features "$f") || exit 1
    # xz: the two builds and the working tree must fit one device call's 64 MiB.
    strip -o "$dir/loftq-bench-$v" "$target/debug/loftq-bench" && xz -9e -f "$dir/loftq-bench-$v"
  done
  local dirty
  dirty=$(git -C "$ROOT" status --porcelain --untracked-files=no -- . ':!*.md' ':!bench/results')
  echo "$(git -C "$ROOT" rev-parse --short=10 HEAD)${dirty:+-dirty}" >"$dir/commit.txt"
  ls -l "$dir"
}

# step NAME SECONDS COMMAND...: runs COMMAND under a time limit (cut to what is left of
# BUDGET), its output in OUT/NAME.log.
step() {
  local name=$1 limit=$2 left=$((${BUDGET:-540} - SECONDS))
  shift 2
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    echo "!! $name: skipped, the budget is spent"
    return
  fi
  echo "== [$SECONDS s] $name (at most $limit s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 12 "$OUT/$name.log"
  [ $rc = 0 ] || echo "!! $name: exit $rc (124: out of time)"
  # A device call returns few files: with PACK set, everything so far as one archive.
  [ -n "${PACK:-}" ] && tar czf "$PACK" -C "$OUT" .
}

run() {
  local dir=$1 profile=${3:-quick}
  OUT=$2
  mkdir -p "$OUT"
  local bin=/tmp/loftq-gpu-check
  mkdir -p "$bin"
  for v in plain tuned; do
    { xz -dc "$dir/loftq-bench-$v.xz" 2>/dev/null || python3 -c 'import lzma, shutil, sys
shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' "$dir/loftq-bench-$v.xz"; } \
      >"$bin/$v" && chmod +x "$bin/$v" || exit 1
  done
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc
    echo "built from $(cat "$dir/commit.txt")"; } >"$OUT/machine.txt" 2>&1
  cat "$OUT/machine.txt"
  local shape=(--batch 4 --seq 128) synth=(--arch smollm2-135m) suite=$profile
  local big=4096x4096 dims="4096x4096x128 4096x4096x4096 1536x576x128"
  [ "$profile" = smoke ] && shape=(--batch 1 --seq 16) synth=(--arch smollm2-135m --layers 2) \
    big=256x256 dims="256x256x32 128x64x16"
  "$bin/plain" synth "${synth[@]}" --out /tmp/loftq-synth >/dev/null || exit 1
  local scratch=(--scratch /tmp/loftq-scratch)
  # Matrix-product rates: LoftQ's sketch products are 4096×4096 by 128 columns; the square
  # product shows the back end's ceiling.
  for v in plain tuned; do
    step "matmul-$v" 40 bash -c "for d in $dims; do
      '$bin/$v' matmul --dims \$d --device wgpu; done"
  done
  # The tuned build times kernels the first time it meets them: on the H200 its NF4 step
  # needed more than 90 s before one was timed.
  step train-wgpu-plain 80 "$bin/plain" train --model /tmp/loftq-synth "${shape[@]}" \
    --device wgpu --json "$OUT/train-wgpu-plain.json"
  # The issue's LoftQ case (4096² NF4 r64 T5, goal < 50 ms) timed without the profile's
  # waits, one matrix and 4 batched (per matrix), before the long steps can spend the budget.
  step loftq-wgpu-plain 60 "$bin/plain" loftq --shapes "$big" --bits 4 --ranks 64 --iters 5 \
    --no-exact --batch 4 --device wgpu --json "$OUT/loftq-wgpu-plain.json"
  # The base dequantized once on load (`loftq train --dense-base`): no dequantization per step.
  step train-wgpu-dense 60 "$bin/plain" train --model /tmp/loftq-synth "${shape[@]}" \
    --device wgpu --dense-base --json "$OUT/train-wgpu-dense.json"
  if python3 -c "import torch, peft, transformers; assert torch.cuda.is_available()" 2>/dev/null
  then
    step train-peft-cuda 60 python3 "$ROOT/bench/peft_loftq.py" --suites train \
      --profile "$([ "$profile" = smoke ] && echo smoke || echo quick)" --device cuda \
      --json "$OUT/train-peft-cuda.json"
  else
    echo "!! no torch with CUDA here: the PyTorch comparison is skipped"
  fi
  # Whole-model init, one suite per step: a suite writes its record only when it ends.
  step init-wgpu-plain 100 "$bin/plain" suite --profile "$suite" --device wgpu --only init \
    "${scratch[@]}" --json "$OUT/init-wgpu-plain.json"
  # The tuned build at cubecl's least autotuning (TUNE_LEVEL overrides: minimal, balanced,
  # extensive, full), so that its first step has a chance to end within the step's time.
  local tuned=(env CUBECL_AUTOTUNE_LEVEL="${TUNE_LEVEL:-minimal}" "$bin/tuned")
  step train-wgpu-tuned 150 "${tuned[@]}" train --model /tmp/loftq-synth "${shape[@]}" \
    --device wgpu --json "$OUT/train-wgpu-tuned.json"
  # Again: cubecl keeps what it tuned in a persistent cache, which a second process reuses.
  step train-wgpu-tuned-again 60 "${tuned[@]}" train --model /tmp/loftq-synth "${shape[@]}" \
    --device wgpu --json "$OUT/train-wgpu-tuned-again.json"
  step init-wgpu-tuned 100 "${tuned[@]}" suite --profile "$suite" --device wgpu --only init \
    "${scratch[@]}" --json "$OUT/init-wgpu-tuned.json"
  # Where the time goes (LOFTQ_PROFILE: each phase waits for the device), plain build.
  step profile-loftq 40 env LOFTQ_PROFILE=1 "$bin/plain" loftq --shapes "$big" --bits 4 \
    --ranks 64 --iters 5 --no-exact --batch 4 --device wgpu
  step profile-train 40 env LOFTQ_PROFILE=1 "$bin/plain" train --model /tmp/loftq-synth \
    "${shape[@]}" --repeats 1 --device wgpu
  # Kernels launched per step and the GPU time of each kind (cubecl's profiler times every
  # launch, so the step itself is slower here), both recompute modes; the tables only.
  step kernels-train 60 bash -c "rm -f /tmp/kernels-train.log; CUBECL_DEBUG_LOG=/tmp/kernels-train.log \
    CUBECL_DEBUG_OPTION=profile '$bin/plain' train --model /tmp/loftq-synth ${shape[*]} \
    --repeats 1 --device wgpu && grep -a '^|' /tmp/kernels-train.log | tr -s ' ' \
    >'$OUT/kernels-train.txt' && grep -a '| Total' '$OUT/kernels-train.txt'"
  # The same for one 4096² LoftQ run (T = 5): which of its kernels take the GPU's time.
  step kernels-loftq 40 bash -c "rm -f /tmp/kernels-loftq.log; CUBECL_DEBUG_LOG=/tmp/kernels-loftq.log \
    CUBECL_DEBUG_OPTION=profile '$bin/plain' loftq --shapes $big --bits 4 --ranks 64 --iters 5 \
    --no-exact --repeats 1 --device wgpu && grep -a '^|' /tmp/kernels-loftq.log | tr -s ' ' \
    >'$OUT/kernels-loftq.txt' && grep -a '| Total' '$OUT/kernels-loftq.txt'"
  step profile-init 60 env LOFTQ_PROFILE=1 "$bin/plain" suite --profile "$suite" \
    --device wgpu --only init "${scratch[@]}" --json /tmp/profile-init.json
  for v in tuned plain; do
    step "suite-wgpu-$v" 120 "$bin/$v" suite --profile "$suite" --device wgpu \
      --only quant,svd,loftq "${scratch[@]}" --json "$OUT/suite-wgpu-$v.json"
  done
  step suite-wgpu-calibrated 90 "$bin/plain" suite --profile "$suite" --device wgpu \
    --only calibrated "${scratch[@]}" --json "$OUT/suite-wgpu-calibrated.json"
  echo "== [$SECONDS s] done"
}

case ${1:-} in
  prepare) prepare "${2:?usage: bench/gpu-check.sh prepare DIR}" ;;
  run) run "${2:?usage: bench/gpu-check.sh run DIR OUT [smoke]}" "${3:?OUT}" "${4:-quick}" ;;
  *) echo "usage: bench/gpu-check.sh prepare DIR | run DIR OUT [smoke]" >&2; exit 2 ;;
esac
