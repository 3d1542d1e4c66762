#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Issue 21's box-vs-segment timing in one GPU call: builds nbhd-bench (float16, head
# dim 128 only: ~20 s on 16 cores), prints the planner's choice for both problems
# (--dry-run) and times them, forward and forward+backward: a HunyuanVideo middle
# rank's 43-column segment (30x48x43, k 18x24x24, 24 heads) against its own 20
# columns (--query-box 0:30x0:48x12:32). Writes box-*.json and dry-run-*.txt into
# $OUT (else ./query-box-out).
#
#   bench/query_box.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/query-box-out}"
mkdir -p "$out"
source scripts/lib.sh
build="$(mktemp -d)"
SECONDS=0
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DNBHD_CUDA=ON -DNBHD_CUDA_ARCHS="$(arch=$(nbhd_gpu_arch); echo "${arch:-90a}")" \
  -DNBHD_DTYPES=float16 -DNBHD_HEAD_DIMS=128 -DNBHD_BUILD_TESTS=OFF >"$out/build.log" 2>&1 &&
  ninja -C "$build" nbhd-bench >>"$out/build.log" 2>&1 || { tail -20 "$out/build.log"; exit 1; }
echo "nbhd-bench built ($SECONDS s)"
bench="$build/tools/nbhd-bench/nbhd-bench"
problem=(--extent 30x48x43 --kernel 18x24x24 --heads 24 --dim 128 --dtype float16 --backend fused)
for box in "" "--query-box 0:30x0:48x12:32"; do
  name="segment"
  [ -n "$box" ] && name="box"
  "$bench" "${problem[@]}" $box --dry-run >"$out/dry-run-$name.txt" 2>&1
  grep -E "fused +CHOSEN|key pass CHOSEN|dq pass +CHOSEN" "$out/dry-run-$name.txt"
  for pass_ in fwd fwd+bwd; do
    "$bench" "${problem[@]}" $box --pass "$pass_" --json "$out/box-$name-${pass_/+/-}.json" 2>&1 | grep -E "^(time|rate)"
  done
done
echo "done ($SECONDS s)"
