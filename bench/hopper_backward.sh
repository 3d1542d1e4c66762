#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The Hopper backward's check and sweep in one call on one sm_90 GPU (H100, H200):
#   1. builds the C++ project (sm_90a; float16, bfloat16; head dims 32, 64, 128),
#   2. runs the fused backward's GPU tests (default filter: every backward suite) and,
#      with --with-forward, the forward's smoke and table-entry tests,
#   3. times the backward alone (nbhd-bench --pass bwd) on the anchor problems with
#      the planner's key pass (wgmma) and with the mma.sync kernels
#      (NBHD_FUSED_NO_WGMMA=1), then forward+backward with the planner's choices,
#   4. compute-sanitizer memcheck and racecheck on the backward's Smoke suites.
# With --overlay DIR, a second build ("overlay") of this checkout with DIR's files
# laid over it (same relative paths) gets the same tests and backward-alone timings
# in the same run: an A/B of a kernel change on one card, without a second call.
# With --overlay-define NAME=VALUE (repeatable) instead of or beside it, the overlay
# build is also configured with -DNAME=VALUE: an A/B of a build option, e.g.
# NBHD_FUSED_FORWARD_OVERLAP=ON (the forward's overlap schedule).
# With --ab-env VAR=VALUE, the same build run with that variable set is the second
# variant ("env"), in the same rows: an A/B of a runtime switch (e.g.
# NBHD_FUSED_LOADS=tma against the default cp.async producers). --variant
# NAME:VAR=VALUE[,VAR=VALUE...] (repeatable) adds more such rows, named NAME (a NAME
# starting with "overlay" runs the overlay build, one starting with a --build's NAME
# that build); the values kv64 and kv128 of
# NBHD_FUSED_TILE stand for the best-ranked warp-specialized entry with 64- or
# 128-key tiles in that problem's `--dry-run` list.
# Writes build.log, tests.log, sanitizer.log, sweep.jsonl (one nbhd-bench JSON per
# line, with the variant) and sweep.txt (the table printed last) into $OUT (else
# ./hopper-backward-out). Needs .carry/ (scripts/carry) where GoogleTest is not
# installed.
#
#   bench/hopper_backward.sh [--skip-tests] [--skip-sanitizer] [--with-forward] [--only NAME,...]
#                            [--overlay DIR] [--overlay-define NAME=VALUE] [--ab-env VAR=VALUE]
#                            [--variant NAME:VAR=VALUE,...] [--build NAME:DEFINE,...]
#                            [--skip-mma-sync] [--pass fwd|bwd] [--repeat N]
# --build NAME:DEFINE[,DEFINE...] (repeatable) adds a build of this tree, configured
# with -DDEFINE for each, into build-hopper-NAME, timed as the variant NAME (no tests):
# several build options A/B'd in one call, e.g. --build overlap:NBHD_FUSED_FORWARD_OVERLAP=ON
# (rows "overlap", and "overlap-ws64" with --variant overlap-ws64:NBHD_FUSED_TILE=kv64).
# --repeat N runs each row's variants N times, odd rounds in reverse order, and
# writes summary.txt: the median over rounds per variant and its speed relative to
# wgmma (above 1: faster).
# --pass fwd times the forward instead of the backward in the A/B rows, --pass fwd,bwd
# both (with
# --with-forward, the overlay build runs the forward's tests too, and the sanitizers
# the forward's smoke suite).
#   HOPPER_BWD_FILTER='FusedBackwardWgmma*' bench/hopper_backward.sh
# Environment: HOPPER_BWD_FILTER, HOPPER_FWD_FILTER (the tests' gtest filters),
# HOPPER_HEAD_DIMS (the build's head dims, default "32;64;128"), HOPPER_TEST_TIMEOUT,
# HOPPER_SANITIZE_BACKWARD=0 (sanitizers on the forward only),
# HOPPER_OVERLAY_TESTS=0 (no tests of the overlay build), HOPPER_FWD_BWD=0 (no fwd+bwd rows).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/hopper-backward-out}"
mkdir -p "$out"
skip_tests=0 skip_sanitizer=0 with_forward=0 only="" overlay="" overlay_define="" ab_env="" skip_mma_sync=0 ab_pass=bwd
repeat=1
variants=()
builds=()
while [ $# -gt 0 ]; do
  case "$1" in
    --skip-tests) skip_tests=1 ;;
    --skip-sanitizer) skip_sanitizer=1 ;;
    --with-forward) with_forward=1 ;;
    --only) only="$2"; shift ;;
    --overlay) overlay="$(cd "$2" && pwd)"; shift ;;
    --overlay-define) overlay_define="$overlay_define -D$2"; shift ;;
    --ab-env) ab_env="$2"; shift ;;
    --variant) variants+=("$2"); shift ;;
    --build) builds+=("$2"); shift ;;
    --skip-mma-sync) skip_mma_sync=1 ;;
    --pass) ab_pass="$2"; shift ;;
    --repeat) repeat="$2"; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
build=build-hopper
start=$SECONDS
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader | tee "$out/device.txt"
# A snapshot (no .git of its own) names its commit: NBHD_GIT_COMMIT first.
commit="${NBHD_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
echo "commit $commit"

configure_and_build() {  # source build log [cmake define]
  {
    cmake -S "$1" -B "$2" -G Ninja -DCMAKE_BUILD_TYPE=Release -DNBHD_CUDA=ON -DNBHD_CUDA_ARCHS=90a \
      -DNBHD_DTYPES="float16;bfloat16" -DNBHD_HEAD_DIMS="${HOPPER_HEAD_DIMS:-32;64;128}" -DNBHD_BUILD_TESTS=ON ${4:-} \
      ${gtest_source:+-DNBHD_GTEST_SOURCE_DIR="$gtest_source"} &&
      cmake --build "$2" -j "$(nproc)" --target fused_backward_test fused_forward_test fused_tma_test nbhd-bench
  } > "$3" 2>&1 || { tail -40 "$3"; echo "build of $1 failed"; exit 1; }
  # ptxas serializing a kernel's wgmmas (C7518, C7520, ...) makes its timings meaningless.
  echo "$1: kernels with serialized wgmmas (ptxas): $(grep 'mma_async instructions are serialized' "$3" | sort -u | wc -l)"
}
gtest_source=""
[ -f .carry/googletest/CMakeLists.txt ] && gtest_source="$PWD/.carry/googletest"
configure_and_build . "$build" "$out/build.log"
if [ -n "$overlay_define" ] && [ -z "$overlay" ]; then
  overlay="$(mktemp -d)"  # no files: the same tree, configured with the define
fi
if [ -n "$overlay" ]; then
  overlay_source="$PWD/$build-overlay-source"
  rm -rf "$overlay_source" && mkdir -p "$overlay_source"
  tar -c --exclude='./build*' --exclude=./.git --exclude=./.carry . | tar -x -C "$overlay_source"
  cp -a "$overlay"/. "$overlay_source"/
  echo "overlay: $(cd "$overlay" && find . -type f | sort | tr '\n' ' ') ${overlay_define}"
  configure_and_build "$overlay_source" "$build-overlay" "$out/build-overlay.log" "$overlay_define"
fi
for spec in "${builds[@]}"; do
  defines=""
  IFS=, read -r -a list <<< "${spec#*:}"
  for d in "${list[@]}"; do defines="$defines -D$d"; done
  configure_and_build . "$build-${spec%%:*}" "$out/build-${spec%%:*}.log" "$defines"
done
echo "build: $((SECONDS - start)) s"
test_bin="$build/tests/cuda/fused_backward_test"
bench="$build/tools/nbhd-bench/nbhd-bench"
overlay_bench="$build-overlay/tools/nbhd-bench/nbhd-bench"

status=0
forward_filter="${HOPPER_FWD_FILTER:-FusedForwardSmoke*:FusedForwardWgmma*:FusedForwardConfigs*}"
if [ "$skip_tests" = 0 ]; then
  t=$SECONDS
  timeout "${HOPPER_TEST_TIMEOUT:-200}" "$test_bin" --gtest_filter="${HOPPER_BWD_FILTER:-FusedBackward*}" > "$out/tests.log" 2>&1 || status=1
  # The forward shares the wgmma wrappers: its smoke and every table entry.
  if [ "$with_forward" = 1 ]; then
    timeout 150 "$build/tests/cuda/fused_forward_test" --gtest_filter="$forward_filter" >> "$out/tests.log" 2>&1 || status=1
    timeout 60 "$build/tests/cuda/fused_tma_test" >> "$out/tests.log" 2>&1 || status=1
  fi
  grep -E "^\[  (PASSED|FAILED) |^\[==========\]|Failure|max error" "$out/tests.log" | head -40
  if [ -n "$overlay" ] && [ "${HOPPER_OVERLAY_TESTS:-1}" = 1 ]; then
    timeout "${HOPPER_TEST_TIMEOUT:-200}" "$build-overlay/tests/cuda/fused_backward_test" \
      --gtest_filter="${HOPPER_BWD_FILTER:-FusedBackward*}" > "$out/tests-overlay.log" 2>&1 || status=1
    if [ "$with_forward" = 1 ]; then
      timeout 150 "$build-overlay/tests/cuda/fused_forward_test" --gtest_filter="$forward_filter" \
        >> "$out/tests-overlay.log" 2>&1 || status=1
    fi
    echo "overlay:"
    grep -E "^\[  (PASSED|FAILED) |^\[==========\]|Failure|max error" "$out/tests-overlay.log" | head -40
  fi
  echo "tests: $((SECONDS - t)) s"
fi
# name | nbhd-bench problem flags (fp16). Fewer heads than the anchors (times scale
# with heads while the grid fills the card: >= 768 CTAs of 128 keys here) to keep
# nbhd-bench's host-side random inputs to seconds.
problems=(
  "1d-32k-w2048|--extent 32768 --kernel 2048 --heads 4 --dim 128"
  "1d-32k-w2048-causal|--extent 32768 --kernel 2048 --causal 1 --heads 4 --dim 128"
  "1d-32k-w2048-s2048|--extent 32768 --kernel 2048 --stride 2048 --heads 4 --dim 128"
  "1d-32k-w2048-d64|--extent 32768 --kernel 2048 --heads 4 --dim 64"
  "2d-128-k31|--extent 128x128 --kernel 31 --heads 6 --dim 128"
  "2d-128-k63|--extent 128x128 --kernel 63 --heads 6 --dim 128"
  "3d-16x48x80-k8x16x24|--extent 16x48x80 --kernel 8x16x24 --heads 4 --dim 128"
  "3d-16x48x80-k16x24x40|--extent 16x48x80 --kernel 16x24x40 --heads 4 --dim 128"
  "flux-256-k80-s16|--extent 256x256 --kernel 80 --stride 16 --heads 4 --dim 128"
  "2d-56-k7-d64|--extent 56x56 --kernel 7 --batch 64 --heads 4 --dim 64"
  # rpb and d rpb (the wgmma key pass has them at head dim 64).
  "1d-32k-w2048-d64-rpb|--extent 32768 --kernel 2048 --heads 4 --dim 64 --rpb"
  "2d-128-k31-d64-rpb|--extent 128x128 --kernel 31 --heads 6 --dim 64 --rpb"
  # The deterministic mode (dq pass instead of atomics; issue 18: at most 20% over the default).
  "1d-32k-w2048-det|--extent 32768 --kernel 2048 --heads 4 --dim 128 --deterministic"
  "2d-128-k31-det|--extent 128x128 --kernel 31 --heads 6 --dim 128 --deterministic"
  "3d-16x48x80-k8x16x24-det|--extent 16x48x80 --kernel 8x16x24 --heads 4 --dim 128 --deterministic"
  "2d-128-k31-p01|--extent 128x128 --kernel 31 --periodic 0x1 --heads 6 --dim 128"
  "2d-128-k31-p11|--extent 128x128 --kernel 31 --periodic 1x1 --heads 6 --dim 128"
  # Head dim 256 (build with HOPPER_HEAD_DIMS containing 256).
  "1d-32k-w2048-d256|--extent 32768 --kernel 2048 --heads 4 --dim 256"
  "flux-256-k80-s16-d256|--extent 256x256 --kernel 80 --stride 16 --heads 4 --dim 256"
  "3d-16x48x80-k8x16x24-d256|--extent 16x48x80 --kernel 8x16x24 --heads 4 --dim 256"
)
: > "$out/sweep.jsonl"
printf '%-24s %-9s %-8s %10s %9s\n' problem pass variant median_ms TFLOP/s | tee "$out/sweep.txt"
run() {  # name variant pass flags...
  local name="$1" variant="$2" pass="$3"
  shift 3
  local env=() binary="$bench" spec
  [ "$variant" = mma.sync ] && env=(NBHD_FUSED_NO_WGMMA=1)
  [ "$variant" = env ] && env=("$ab_env")
  for spec in "${variants[@]}"; do
    [ "${spec%%:*}" = "$variant" ] || continue
    IFS=, read -r -a env <<< "${spec#*:}"
    local i
    for i in "${!env[@]}"; do
      if [[ "${env[$i]}" =~ ^NBHD_FUSED_TILE=kv(64|128)$ ]]; then
        local index keys="${BASH_REMATCH[1]}"
        index="$("$bench" "$@" --dtype float16 --dry-run | grep -m1 "wgmma-ws, warps 8 x 1 boxes, kv $keys," |
                 sed -E 's/.*#([0-9]+) .*/\1/')"
        [ -n "$index" ] || { echo "$name $variant $pass: no $keys-key entry" | tee -a "$out/sweep.txt"; return; }
        env[$i]="NBHD_FUSED_TILE=$index"
      fi
    done
  done
  [[ "$variant" == overlay* ]] && binary="$overlay_bench"
  for spec in "${builds[@]}"; do
    [[ "$variant" == "${spec%%:*}" || "$variant" == "${spec%%:*}"-* ]] &&
      binary="$build-${spec%%:*}/tools/nbhd-bench/nbhd-bench"
  done
  local json
  json="$(env "${env[@]}" timeout 60 "$binary" "$@" --dtype float16 --backend fused --pass "$pass" --warmup 3 --iters 10 \
          --json 2>>"$out/sweep.err")" || { echo "$name $variant $pass: failed" | tee -a "$out/sweep.txt"; return; }
  echo "{\"name\": \"$name\", \"pass\": \"$pass\", \"variant\": \"$variant\", \"env\": \"${env[*]}\", \"commit\": \"$commit\", \"run\": $json}" >> "$out/sweep.jsonl"
  python3 - "$name" "$pass" "$variant" "$json" <<'EOF' | tee -a "$out/sweep.txt"
import json, sys
r = json.loads(sys.argv[4])
print(f"{sys.argv[1]:<24} {sys.argv[2]:<9} {sys.argv[3]:<8} {r['time_ms']['median']:10.3f} {r['tflops']:9.1f}")
EOF
}
t=$SECONDS
for entry in "${problems[@]}"; do
  name="${entry%%|*}"
  flags="${entry#*|}"
  [ -n "$only" ] && [[ ",$only," != *",$name,"* ]] && continue
  # shellcheck disable=SC2086  # the flags are words
  {
    for pass in ${ab_pass//,/ }; do
      order=(wgmma)
      [ -n "$overlay" ] && order+=(overlay)
      [ -n "$ab_env" ] && order+=(env)
      for spec in "${builds[@]}"; do order+=("${spec%%:*}"); done
      for spec in "${variants[@]}"; do order+=("${spec%%:*}"); done
      [ "$skip_mma_sync" = 0 ] && order+=(mma.sync)
      for ((round = 0; round < repeat; ++round)); do
        # Odd rounds run the variants in reverse, so that a variant's place in the
        # order (clocks, caches, the previous process) cannot pass for its speed.
        if ((round % 2)); then
          for ((i = ${#order[@]} - 1; i >= 0; --i)); do run "$name" "${order[$i]}" "$pass" $flags; done
        else
          for variant in "${order[@]}"; do run "$name" "$variant" "$pass" $flags; done
        fi
      done
    done
    [ "${HOPPER_FWD_BWD:-1}" = 1 ] && run "$name" wgmma fwd+bwd $flags
  }
done
echo "sweep: $((SECONDS - t)) s"
if [ "$repeat" -gt 1 ]; then  # the median over rounds of each variant's median, and its speed relative to wgmma
  python3 - "$out/sweep.jsonl" <<'EOF' | tee "$out/summary.txt"
import collections, json, statistics, sys
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows[(r["name"], r["pass"], r["variant"])].append(r["run"]["time_ms"]["median"])
print(f"{'problem':<24} {'pass':<9} {'variant':<8} {'median_ms':>10} {'spread':>7} {'vs wgmma':>8}")
for (name, pass_, variant), times in rows.items():
    base = rows.get((name, pass_, "wgmma"))
    m = statistics.median(times)
    ratio = f"{statistics.median(base) / m:8.3f}" if base else ""
    print(f"{name:<24} {pass_:<9} {variant:<8} {m:10.3f} {(max(times) - min(times)) / m:7.1%} {ratio}")
EOF
fi
if [ "$skip_sanitizer" = 0 ]; then
  t=$SECONDS
  : > "$out/sanitizer.log"
  for tool in memcheck racecheck; do
    if [ "${HOPPER_SANITIZE_BACKWARD:-1}" = 1 ]; then
      timeout 200 compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 "$test_bin" \
        --gtest_filter='FusedBackwardSmoke*' >> "$out/sanitizer.log" 2>&1 || status=1
    fi
    if [ "$with_forward" = 1 ]; then
      timeout 200 compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 \
        "$build/tests/cuda/fused_forward_test" --gtest_filter='FusedForwardSmoke*' >> "$out/sanitizer.log" 2>&1 || status=1
      timeout 100 compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 \
        "$build/tests/cuda/fused_tma_test" >> "$out/sanitizer.log" 2>&1 || status=1
    fi
  done
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|PASSED|FAILED" "$out/sanitizer.log"
  echo "sanitizer: $((SECONDS - t)) s"
fi

echo "total $((SECONDS - start)) s"
exit $status
