# shellcheck shell=bash
# Shared by scripts/setup, scripts/test, scripts/run-main and .ci/run (sourced, not
# run). The one place that says how the project is configured, so every script
# builds the same thing.
#
# Environment overrides:
#   NBHD_BUILD_DIR   C++ build directory (default: build)
#   NBHD_VENV        Python virtual environment (default: .venv)
#   NBHD_CMAKE_ARGS  extra arguments for the C++ configure (e.g. -DNBHD_CUDA=OFF)
#   CI=true          build CUDA with the small filters below even where a GPU is

NBHD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NBHD_BUILD_DIR="${NBHD_BUILD_DIR:-$NBHD_ROOT/build}"
NBHD_VENV="${NBHD_VENV:-$NBHD_ROOT/.venv}"
NBHD_JOBS="${NBHD_JOBS:-$(nproc 2>/dev/null || echo 2)}"

# nvcc lives outside PATH on some machines.
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi

nbhd_log() { printf '[%s] %s\n' "$(basename "$0")" "$*"; }
nbhd_die() { printf '[%s] error: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

# Seconds since the script started, for the timings each step prints.
nbhd_elapsed() { echo "$SECONDS s"; }

# A usable NVIDIA GPU: nvidia-smi runs and lists one.
nbhd_has_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '
}

# The GPU's architecture in NBHD_CUDA_ARCHS spelling (90a for compute capability
# 9.0: the fused kernels need the `a` target there), or nothing when unknown.
nbhd_gpu_arch() {
  local cap
  cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ')"
  case "$cap" in
    9.0) echo 90a ;;
    10.0) echo 100a ;;
    [0-9]*.[0-9]*) echo "${cap%%.*}${cap#*.}" ;;
  esac
}

# Cache entries of the C++ configure, one NAME=VALUE a line. Without a GPU (and in
# CI) the CUDA backends are built for one arch, one head dim, and float16 and
# float32 (whose tensor-core paths differ in more than the type; +25 s of compile):
# every CUDA source and both paths still compile, in a fraction of the full set's time.
nbhd_cmake_defines() {
  echo "CMAKE_BUILD_TYPE=Release"
  if [ "${CI:-}" = "true" ] || ! nbhd_has_gpu; then
    echo "NBHD_CUDA_ARCHS=90a"
    echo "NBHD_DTYPES=float16;float32"
    echo "NBHD_HEAD_DIMS=64"
  else
    local arch
    arch="$(nbhd_gpu_arch)"
    [ -n "$arch" ] && echo "NBHD_CUDA_ARCHS=$arch"
  fi
}

# The same configuration for the Python package's build (scikit-build-core). No GPU:
# the package is built for the CPU only (its tests cannot run CUDA code anyway).
nbhd_pip_config_settings() {
  local define
  while IFS= read -r define; do
    [ "${define%%=*}" = CMAKE_BUILD_TYPE ] && continue
    echo "-Ccmake.define.$define"
  done < <(nbhd_cmake_defines)
  nbhd_has_gpu || echo "-Ccmake.define.NBHD_CUDA=OFF"
}

nbhd_configure() {
  local args=(-S "$NBHD_ROOT" -B "$NBHD_BUILD_DIR" -G Ninja)
  local define
  while IFS= read -r define; do args+=("-D$define"); done < <(nbhd_cmake_defines)
  # shellcheck disable=SC2206  # word splitting of the user's extra flags is wanted
  [ -n "${NBHD_CMAKE_ARGS:-}" ] && args+=($NBHD_CMAKE_ARGS)
  cmake "${args[@]}"
}

nbhd_python() { "$NBHD_VENV/bin/python" "$@"; }

# Counts of a JUnit XML report (ctest --output-junit, pytest --junitxml) as
# "PASSED FAILED SKIPPED".
nbhd_junit_counts() {
  python3 - "$1" <<'PY'
import sys
import xml.etree.ElementTree as ET
passed = failed = skipped = 0
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    kinds = {child.tag for child in case}
    if kinds & {"failure", "error"}:
        failed += 1
    elif "skipped" in kinds or case.get("status") in ("notrun", "disabled"):
        skipped += 1
    else:
        passed += 1
print(passed, failed, skipped)
PY
}
