#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Runs the fused backend's GPU tests on the CPU, through the emulated CUDA runtime
beside this file (cuda_runtime.h; cuda/common/ptx.cuh, cuda/common/wgmma.cuh and
cuda/fused/backward_ptx.cuh replace the PTX wrappers; the device reports compute
capability 9.0 unless EMU_DEVICE says otherwise, so the sm_90a wgmma kernels run too). The kernel headers are copied with their launches
rewritten as calls; everything is compiled by the host compiler. The forward test
runs too: the forward passed on an H200, so it checks the emulator itself.

  tests/cuda/fused_emulator/run.py [--sanitize] [--dims 32,64] [--dtypes float16]
                                   [--tests fused_backward_test] [-- gtest args]

Environment: EMU_CP_ASYNC=early|late (when cp.async copies land), EMU_SCHEDULE=reverse,
EMU_MMA_ROUND=zero (mma results rounded toward zero), EMU_DEVICE=a100 (compute
capability 8.0 and 163 KB of shared memory per block: the sm_80 paths), EMU_DEVICES=n
(devices, default 2: allocations remember theirs, a launch reading another device's
memory aborts, and opt-ins above 48 KB of shared memory are per device),
NBHD_TEST_SMALL=1 (smaller random problems; set by default here).
"""
import argparse
import concurrent.futures
import os
import re
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
HERE = os.path.dirname(os.path.abspath(__file__))
LIBRARY = ["src/core/problem.cpp", "src/core/tensor_checks.cpp", "src/core/unfold.cpp", "src/dispatch/api.cpp",
           "src/dispatch/registry.cpp",
           "src/cpu/reference.cpp", "src/cpu/tiled.cpp", "tests/cpp/testing.cpp", "src/cuda/fused/backend.cu",
           "src/cuda/fused/backward.cu", "src/cuda/fused/plan.cpp", "src/cuda/fused/backward_plan.cpp",
           "src/cuda/common/tensor_map.cpp"]
KERNEL_HEADERS = ["src/cuda/fused/forward_kernel.cuh", "src/cuda/fused/backward_kernel.cuh",
                  "src/cuda/fused/backward_wgmma_kernel.cuh"]
# Kernels of the tests themselves (rewritten like the headers, compiled into the tests).
TEST_KERNELS = ["tests/cuda/tma_probe.cu"]
LAUNCH = re.compile(r"([\w:]+(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\((.*?)\);", re.S)
SHARED = re.compile(r"extern\s+__shared__\s+__align__\(\d+\)\s+unsigned\s+char\s+(\w+)\[\];")
CTYPE = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float"}


def split_top(text):
    """Splits at the commas outside parentheses and angle brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        depth += ch in "(<"
        depth -= ch in ")>"
        cur += ch
    parts.append(cur.strip())
    return parts


def rewrite(source):
    def launch(m):
        kernel, config, args = m.groups()
        cfg = split_top(config)
        while len(cfg) < 4:
            cfg.append("0")
        return f"::emu::launch({kernel}, {cfg[0]}, {cfg[1]}, {cfg[2]}, {cfg[3]}, {args});"
    out = LAUNCH.sub(launch, source)
    out = SHARED.sub(r"unsigned char* \1 = ::emu::block->smem();", out)
    return out


def write_if_changed(path, text):
    if not os.path.exists(path) or open(path).read() != text:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def forward_configs(dim, dtype):
    # Mirrors src/cuda/fused/CMakeLists.txt (kernel_compiled() in plan.cpp), with
    # sm_90a: (warps, keys per tile, boxes per warp, wgmma).
    if dtype == "float32":
        return [] if dim == 256 else [(4, 32 if dim == 128 else 64, 1, "false")]
    if dim == 256:
        return [(4, 64, 1, "false")]
    wgmma = [(4, 64, 1, "true"), (8, 64, 1, "true")]
    if dim == 128:
        return [(4, 64, 1, "false"), (8, 64, 1, "false")] + wgmma
    configs = [(4, 64, 1, "false"), (8, 64, 1, "false"), (4, 128, 1, "false")]
    return configs + (wgmma if dim == 64 else [])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sanitize", action="store_true", help="AddressSanitizer + UBSan (a memcheck stand-in)")
    ap.add_argument("--build-dir", default=os.path.join(ROOT, "build-fused-emulator"))
    ap.add_argument("--cxx", default=os.environ.get("CXX", "g++"))
    ap.add_argument("--cuda-include", default=os.environ.get("CUDA_INCLUDE", "/usr/local/cuda/include"))
    ap.add_argument("--dims", default="32,64,128")
    ap.add_argument("--dtypes", default="float16,bfloat16,float32")
    ap.add_argument("--tests", default="fused_backward_test,fused_forward_test,fused_tma_test")
    ap.add_argument("-j", type=int, default=os.cpu_count() or 2)
    ap.add_argument("gtest_args", nargs="*")
    args = ap.parse_args()

    build = os.path.abspath(args.build_dir)
    override = os.path.join(build, "override")
    gen = os.path.join(build, "gen")
    for h in KERNEL_HEADERS:
        text = rewrite(open(os.path.join(ROOT, h)).read())
        if "<<<" in text or "extern __shared__" in text:
            sys.exit(f"run.py: a launch or shared declaration in {h} was not rewritten")
        write_if_changed(os.path.join(override, os.path.relpath(h, "src")), text)

    for k in TEST_KERNELS:
        text = rewrite(open(os.path.join(ROOT, k)).read())
        if "<<<" in text or "extern __shared__" in text:
            sys.exit(f"run.py: a launch or shared declaration in {k} was not rewritten")
        write_if_changed(os.path.join(gen, os.path.basename(k) + ".cpp"), text)

    dims = [int(d) for d in args.dims.split(",")]
    dtypes = args.dtypes.split(",")
    sources = [os.path.join(ROOT, s) for s in LIBRARY] + [os.path.join(gen, os.path.basename(k) + ".cpp")
                                                           for k in TEST_KERNELS]
    fwd_inc, bwd_inc = "", ""
    for dtype in dtypes:
        ctype = CTYPE[dtype]
        for dim in dims:
            body = '#include "cuda/fused/forward_kernel.cuh"\nnamespace nbhd::cuda::fused {\n'
            for w, kv, m, g in forward_configs(dim, dtype):
                body += (f"template cudaError_t launch_fused_forward<ForwardConfig<{ctype}, {dim}, {w}, {kv}, {m}, {g}>>"
                         "(const ForwardParams&, int64_t, cudaStream_t);\n")
                fwd_inc += f"NBHD_FUSED_FORWARD({ctype}, {dim}, {w}, {kv}, {m}, {g})\n"
            write_if_changed(os.path.join(gen, f"forward_{dtype}_d{dim}.cpp"), body + "}\n")
            sources.append(os.path.join(gen, f"forward_{dtype}_d{dim}.cpp"))
            if dim <= 128:
                write_if_changed(os.path.join(gen, f"backward_{dtype}_d{dim}.cpp"),
                                 '#include "cuda/fused/backward_kernel.cuh"\nnamespace nbhd::cuda::fused {\n'
                                 f"template cudaError_t launch_fused_backward<{ctype}, {dim}>(const BackwardParams&, "
                                 "cudaStream_t);\n}\n")
                sources.append(os.path.join(gen, f"backward_{dtype}_d{dim}.cpp"))
                bwd_inc += f"NBHD_FUSED_BACKWARD({ctype}, {dim})\n"
    write_if_changed(os.path.join(gen, "fused_forward_kernels.inc"), fwd_inc)
    write_if_changed(os.path.join(gen, "fused_backward_kernels.inc"), bwd_inc)
    tests = args.tests.split(",")

    flags = ["-std=c++20", "-O1", "-g", "-pthread", "-fopenmp-simd", "-DNBHD_BACKEND_FUSED=1", "-DNBHD_WITH_CUDA=1", "-DNBHD_FUSED_WGMMA=1",
             "-I", override, "-I", HERE, "-I", gen, "-I", os.path.join(ROOT, "include"), "-I", os.path.join(ROOT, "src"),
             "-I", os.path.join(ROOT, "tests", "cpp"), "-I", os.path.join(ROOT, "tests", "cuda"),
             "-isystem", args.cuda_include, "-Wno-unknown-pragmas", "-Wno-attributes"]
    if args.sanitize:
        flags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]

    newest_header = max(os.path.getmtime(os.path.join(dp, f)) for top in (os.path.join(ROOT, "include"),
                        os.path.join(ROOT, "src"), os.path.join(ROOT, "tests"), override, gen)
                        for dp, _, fs in os.walk(top) for f in fs if f.endswith((".hpp", ".cuh", ".h", ".inc")))

    def compile_one(src):
        obj = os.path.join(build, "obj", os.path.relpath(src, ROOT).replace(os.sep, "_").replace("..", "up") + ".o")
        if args.sanitize:
            obj += ".asan"
        os.makedirs(os.path.dirname(obj), exist_ok=True)
        if os.path.exists(obj) and os.path.getmtime(obj) >= max(os.path.getmtime(src), newest_header):
            return obj
        lang = ["-x", "c++"] if src.endswith(".cu") else []
        subprocess.run([args.cxx, *flags, *lang, "-c", src, "-o", obj], check=True)
        return obj

    test_sources = [os.path.join(ROOT, "tests", "cuda", t + ".cpp") for t in tests]
    with concurrent.futures.ThreadPoolExecutor(args.j) as pool:
        objects = list(pool.map(compile_one, sources + test_sources))
    library, test_objects = objects[:len(sources)], objects[len(sources):]
    env = dict(os.environ)
    env.setdefault("NBHD_TEST_SMALL", "1")
    if args.sanitize:
        env.setdefault("ASAN_OPTIONS", "detect_leaks=0")
        env.setdefault("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1")
    rc = 0
    for name, obj in zip(tests, test_objects):
        exe = os.path.join(build, name + ("_sanitized" if args.sanitize else ""))
        subprocess.run([args.cxx, *flags, *library, obj, "-o", exe, "-lgtest", "-lgtest_main", "-pthread"], check=True)
        rc |= subprocess.run([exe, *args.gtest_args], env=env).returncode
    sys.exit(rc)


if __name__ == "__main__":
    main()
