#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Issue 20's host-path measurements in one call on a GPU machine:
#   1. builds the Python package for this GPU with float16 and head dims 32, 64 (what
#      the NAT/DiNAT classifiers and the CUDA graph tests use) into a temporary target,
#   2. bench/host_overhead.py (host time per call: library, nbhd eager, SDPA),
#   3. examples/nat.py on NAT-Tiny and DiNAT-Tiny (fused), each twice in a row, so
#      that run-to-run noise shows beside any difference between the models,
#   4. tests/python/test_cuda.py (the CUDA graph, reduce-overhead and workspace tests
#      among them; its float32 and bfloat16 cases skip in this build),
#   5. bench/distributed.py at world size 1 (issue 21: the distributed path's overhead
#      over the plain call; HunyuanVideo's grid and window at head dim 64, 8 heads),
#      forward and forward+backward.
# Writes pip.log, host_overhead.json, nat-*.json and distributed-*.json into $OUT
# (else ./host-overhead-out).
#
#   bench/host_overhead.sh [--skip-nat]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/host-overhead-out}"
mkdir -p "$out"
skip_nat=0
[ "${1:-}" = "--skip-nat" ] && skip_nat=1
source scripts/lib.sh
arch="$(nbhd_gpu_arch)"
target="$(mktemp -d)"
SECONDS=0
CMAKE_ARGS="-DNBHD_CUDA=ON -DNBHD_CUDA_ARCHS=${arch:-90a} -DNBHD_DTYPES=float16 -DNBHD_HEAD_DIMS=32;64" \
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  python3 -m pip install --no-build-isolation --no-deps --no-index --target "$target" \
  --config-settings=build-dir="$target-build" . >"$out/pip.log" 2>&1 || { tail -20 "$out/pip.log"; exit 1; }
echo "package built ($SECONDS s)"
export PYTHONPATH="$target"
python3 bench/host_overhead.py --json "$out/host_overhead.json"
if [ "$skip_nat" = 0 ]; then
  for model in nat-tiny dinat-tiny; do
    for run in 1 2; do
      python3 examples/nat.py --model "$model" --backends fused --json "$out/nat-$model-$run.json" 2>&1 | tail -4
    done
  done
fi
python3 -m pytest -q -p no:cacheprovider -rs tests/python/test_cuda.py 2>&1 | tail -15
for pass_ in fwd fwd+bwd; do
  python3 bench/distributed.py --world-sizes 1 --modes spatial --heads 8 --dim 64 --pass "$pass_" \
    --json "$out/distributed-1gpu-${pass_/+/-}.json" 2>&1 | tail -4
done
echo "done ($SECONDS s)"
