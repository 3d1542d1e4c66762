#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Nsight Compute profiles of the Hopper kernels on one sm_90 GPU, in one call: builds
# nbhd-bench (sm_90a, float16, head dims 32, 64 and 128), then profiles one launch of
# each kernel of a problem's set: "hopper" (the forward's kernel and the backward's
# wgmma key pass) or "small" (the forward's kernel and the mma.sync key and dq passes,
# which the small windows and head dims run) on each problem below (nbhd-bench
# --pass bwd runs the forward once first, so the filters pick by name).
# Writes <name>-<kernel>.ncu-rep and summary.txt (every section's table, per report)
# into $OUT (else ./profile-out). Needs .carry/ where GoogleTest is not installed
# (the configure step looks for it even with tests off).
#
#   bench/profile_hopper.sh [NAME ...]     default: every problem below
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/profile-out}"
mkdir -p "$out"
build=build-hopper
start=$SECONDS
gtest_source=""
[ -f .carry/googletest/CMakeLists.txt ] && gtest_source="$PWD/.carry/googletest"
{
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DNBHD_CUDA=ON -DNBHD_CUDA_ARCHS=90a \
    -DNBHD_DTYPES=float16 -DNBHD_HEAD_DIMS="32;64;128" -DNBHD_BUILD_TESTS=ON \
    ${gtest_source:+-DNBHD_GTEST_SOURCE_DIR="$gtest_source"} &&
    cmake --build "$build" -j "$(nproc)" --target nbhd-bench
} > "$out/build.txt" 2>&1 || { tail -30 "$out/build.txt"; echo "build failed"; exit 1; }
echo "build: $((SECONDS - start)) s"
bench="$build/tools/nbhd-bench/nbhd-bench"
ncu="$(command -v ncu || echo /usr/local/cuda/bin/ncu)"
# The sections that say where a kernel's time goes: tensor-pipe and memory rates,
# issue-slot use, why warps stall, the instruction mix.
sections=(--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis
          --section SchedulerStats --section WarpStateStats --section InstructionStats
          --section LaunchStats --section Occupancy)
problems=(  # name|kernel set|flags
  "flux-k80-s16|hopper|--extent 256x256 --kernel 80 --stride 16 --heads 2 --dim 128"
  "1d-w2048|hopper|--extent 32768 --kernel 2048 --heads 2 --dim 128"
  "2d-k31|hopper|--extent 128x128 --kernel 31 --heads 2 --dim 128"
  "nat-56-k7-d32|small|--extent 56x56 --kernel 7 --batch 64 --heads 4 --dim 32"
  "dinat-56-k7-dil4-d32|small|--extent 56x56 --kernel 7 --dilation 4 --batch 64 --heads 4 --dim 32"
)
declare -A kernel_sets=(  # tag|kernel|nbhd-bench pass, space-separated
  [hopper]="fwd|fused_forward_kernel|fwd bwd|fused_backward_key_wgmma_kernel|bwd"
  [small]="fwd|fused_forward_kernel|fwd bwd-key|fused_backward_key_kernel|bwd bwd-dq|fused_backward_dq_kernel|bwd"
)
[ $# -gt 0 ] && wanted=" $* " || wanted=""
: > "$out/summary.txt"
for entry in "${problems[@]}"; do
  IFS='|' read -r name set flags <<< "$entry"
  [ -n "$wanted" ] && [[ "$wanted" != *" $name "* ]] && continue
  for k in ${kernel_sets[$set]}; do
    IFS='|' read -r tag kernel pass <<< "$k"
    report="$out/$name-$tag"
    # shellcheck disable=SC2086  # the flags are words
    timeout 240 "$ncu" "${sections[@]}" --kernel-name "$kernel" --launch-skip 1 --launch-count 1 -f -o "$report" \
      "$bench" $flags --dtype float16 --backend fused --pass "$pass" --warmup 1 --iters 1 > "$out/ncu.log" 2>&1 ||
      { tail -5 "$out/ncu.log"; echo "$name $tag: ncu failed"; continue; }
    { echo "===== $name $tag ($kernel)"; "$ncu" --import "$report.ncu-rep" --page details; } >> "$out/summary.txt"
  done
done
rm -f "$out/ncu.log"
grep -E "^=====|Duration|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|No Eligible|Registers Per" "$out/summary.txt"
echo "total $((SECONDS - start)) s"
