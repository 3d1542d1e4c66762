#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Issue 20's halo kernels on one GPU, in one call: builds nbhd-bench and the fused
# forward and backward tests (float16 and bfloat16, head dims 32 and 64, the GPU's own
# architecture), runs the halo kernels' tests (and compute-sanitizer memcheck on the
# smoke cases), then times each problem below: the forward with the planner's choice
# and with every halo entry forced (NBHD_FUSED_TILE; their indices from --dry-run),
# the backward with the planner's passes, with the halo dq pass
# (NBHD_FUSED_BACKWARD_DQ=halo) and with both halo passes (NBHD_FUSED_BACKWARD_KEY=halo
# too), medians of 30; and profiles the three halo kernels on NAT with ncu. Writes into $OUT (else ./small-windows-out): build.txt,
# tests.txt, times.txt, dry-run.txt, ncu-summary.txt.
# Needs .carry/ where GoogleTest is not installed.
#
#   bench/small_windows.sh [tests] [times] [ncu]     default: all three (the build always;
#                                                    on a warm machine it is incremental)
set -uo pipefail
steps=" ${*:-tests times ncu} "
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/small-windows-out}"
mkdir -p "$out"
build=build-small-windows
start=$SECONDS
arch="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)"
[ "$arch" = 90 ] && arch=90a
gtest_source=""
[ -f .carry/googletest/CMakeLists.txt ] && gtest_source="$PWD/.carry/googletest"
{
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DNBHD_CUDA=ON -DNBHD_CUDA_ARCHS="$arch" \
    -DNBHD_DTYPES="float16;bfloat16" -DNBHD_HEAD_DIMS="32;64" -DNBHD_BUILD_TESTS=ON \
    ${gtest_source:+-DNBHD_GTEST_SOURCE_DIR="$gtest_source"} &&
    cmake --build "$build" -j "$(nproc)" --target nbhd-bench fused_forward_test fused_backward_test
} > "$out/build.txt" 2>&1 || { tail -30 "$out/build.txt"; echo "build failed"; exit 1; }
echo "build: $((SECONDS - start)) s (sm_$arch)"
bench="$build/tools/nbhd-bench/nbhd-bench"
test_bin="$(find "$build" -name fused_forward_test -type f -perm -u+x | head -1)"
bwd_bin="$(find "$build" -name fused_backward_test -type f -perm -u+x | head -1)"

if [[ "$steps" == *" tests "* ]]; then
  {
    "$test_bin" --gtest_filter='FusedForwardHalo*:FusedForwardSmoke*:FusedForwardConfigs*'
    "$bwd_bin" --gtest_filter='FusedBackwardHalo*:FusedBackwardSmoke*'
    compute-sanitizer --tool memcheck --error-exitcode 1 "$test_bin" --gtest_filter='FusedForwardSmoke*'
    compute-sanitizer --tool memcheck --error-exitcode 1 "$bwd_bin" --gtest_filter='FusedBackwardHalo*'
  } > "$out/tests.txt" 2>&1
  grep -E '^\[  (PASSED|FAILED)|ERROR SUMMARY|Failure' "$out/tests.txt" | head -20
fi

problems=(  # name|flags (NAT and DiNAT anchors, NAT-Tiny's stages, a 1-D and a 3-D small window)
  "nat-56-k7-d32|--extent 56x56 --kernel 7 --batch 64 --heads 4 --dim 32"
  "nat-56-k7-d32-rpb|--extent 56x56 --kernel 7 --batch 64 --heads 4 --dim 32 --rpb"
  "dinat-56-k7-dil4-d32|--extent 56x56 --kernel 7 --dilation 4 --batch 64 --heads 4 --dim 32"
  "nat-tiny-s1|--extent 56x56 --kernel 7 --batch 128 --heads 2 --dim 32 --rpb"
  "nat-tiny-s2|--extent 28x28 --kernel 7 --batch 128 --heads 4 --dim 32 --rpb"
  "nat-tiny-s3|--extent 14x14 --kernel 7 --batch 128 --heads 8 --dim 32 --rpb"
  "nat-56-k7-d64|--extent 56x56 --kernel 7 --batch 64 --heads 2 --dim 64"
  "1d-4096-k13-d64|--extent 4096 --kernel 13 --batch 16 --heads 8 --dim 64"
  "3d-16x32x32-k5-d32|--extent 16x32x32 --kernel 5 --batch 2 --heads 4 --dim 32"
)
: > "$out/times.txt"
: > "$out/dry-run.txt"
for entry in "${problems[@]}"; do
  [[ "$steps" == *" times "* ]] || break
  IFS='|' read -r name flags <<< "$entry"
  # shellcheck disable=SC2086  # the flags are words
  "$bench" $flags --dtype float16 --backend fused --dry-run > "$out/dry.tmp" 2>&1
  { echo "===== $name"; cat "$out/dry.tmp"; } >> "$out/dry-run.txt"
  halo=$(grep -oE '#[0-9]+ [^(]*\(halo,' "$out/dry.tmp" | grep -oE '^#[0-9]+' | tr -d '#' | tr '\n' ' ')
  for tile in d $halo; do
    env=()
    [ "$tile" != d ] && env=(NBHD_FUSED_TILE="$tile")
    # shellcheck disable=SC2086
    line=$(env "${env[@]}" "$bench" $flags --dtype float16 --backend fused --pass fwd --warmup 5 --iters 30 2>&1 |
      grep -E '^time|TFLOP' | tr '\n' ' ')
    echo "$name tile $tile $line" | tee -a "$out/times.txt"
  done
  # The backward: the planner's passes, the halo dq pass, and both halo passes (with
  # --rpb nbhd-bench asks for d rpb, which the halo key pass bins in shared memory).
  for passes in planner dq-halo both-halo; do
    env=()
    [ "$passes" = dq-halo ] && env=(NBHD_FUSED_BACKWARD_DQ=halo)
    [ "$passes" = both-halo ] && env=(NBHD_FUSED_BACKWARD_DQ=halo NBHD_FUSED_BACKWARD_KEY=halo)
    # shellcheck disable=SC2086
    line=$(env "${env[@]}" "$bench" $flags --dtype float16 --backend fused --pass bwd --warmup 5 --iters 30 2>&1 |
      grep -E '^time|TFLOP' | tr '\n' ' ')
    echo "$name bwd $passes $line" | tee -a "$out/times.txt"
  done
done

if [[ "$steps" == *" ncu "* ]]; then
  ncu="$(command -v ncu || echo /usr/local/cuda/bin/ncu)"
  # The 4-warp halo entry (the faster on NAT, H100 2026-12-08): its index from --dry-run.
  halo=$("$bench" --extent 56x56 --kernel 7 --batch 64 --heads 4 --dim 32 --dtype float16 --backend fused --dry-run 2>&1 |
    grep -oE '#[0-9]+ [^(]*\(halo, warps 4' | head -1 | grep -oE '^#[0-9]+' | tr -d '#')
  sections=(--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis
            --section SchedulerStats --section WarpStateStats --section InstructionStats --section LaunchStats
            --section Occupancy)
  NBHD_FUSED_TILE="$halo" timeout 240 "$ncu" "${sections[@]}" --kernel-name fused_forward_halo_kernel --launch-skip 1 \
    --launch-count 1 -f -o "$out/nat-halo" "$bench" --extent 56x56 --kernel 7 --batch 64 --heads 4 --dim 32 \
    --dtype float16 --backend fused --pass fwd --warmup 1 --iters 1 > "$out/ncu.log" 2>&1 &&
    "$ncu" --import "$out/nat-halo.ncu-rep" --page details > "$out/ncu-summary.txt"
  NBHD_FUSED_BACKWARD_DQ=halo timeout 240 "$ncu" "${sections[@]}" --kernel-name fused_backward_dq_halo_kernel \
    --launch-skip 1 --launch-count 1 -f -o "$out/nat-dq-halo" "$bench" --extent 56x56 --kernel 7 --batch 64 --heads 4 \
    --dim 32 --dtype float16 --backend fused --pass bwd --warmup 1 --iters 1 > "$out/ncu-dq.log" 2>&1 &&
    "$ncu" --import "$out/nat-dq-halo.ncu-rep" --page details >> "$out/ncu-summary.txt"
  NBHD_FUSED_BACKWARD_DQ=halo NBHD_FUSED_BACKWARD_KEY=halo timeout 240 "$ncu" "${sections[@]}" \
    --kernel-name fused_backward_key_halo_kernel --launch-skip 1 --launch-count 1 -f -o "$out/nat-key-halo" "$bench" \
    --extent 56x56 --kernel 7 --batch 64 --heads 4 --dim 32 --dtype float16 --backend fused --pass bwd --warmup 1 \
    --iters 1 > "$out/ncu-key.log" 2>&1 &&
    "$ncu" --import "$out/nat-key-halo.ncu-rep" --page details >> "$out/ncu-summary.txt"
  grep -E 'Duration|Executed Instructions |Issue Slots Busy|Achieved Occupancy|Registers Per' "$out/ncu-summary.txt"
fi
echo "total: $((SECONDS - start)) s"
