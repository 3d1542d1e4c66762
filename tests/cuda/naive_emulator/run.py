#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Runs the naive backend's GPU tests on the CPU, through the emulated CUDA runtime
of cuda_runtime.h beside this file: the kernels of src/cuda/naive/*.cu, with their
launches rewritten as calls, compiled by the host compiler with the library and
tests/cuda/naive_test.cpp. For machines without a GPU; it checks indexing and
arithmetic (with --sanitize, out-of-bounds accesses too), not speed.

  tests/cuda/naive_emulator/run.py [--sanitize] [--build-dir DIR] [-- gtest args]
"""
import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
HERE = os.path.dirname(os.path.abspath(__file__))
# The library's host sources (the CUDA backends other than naive stay out: registry.cpp
# is compiled with NBHD_BACKEND_NAIVE only), the test helpers and the test.
LIBRARY_DIRS = ["src/core", "src/dispatch", "src/cpu"]
TESTS = ["tests/cpp/testing.cpp", "tests/cuda/naive_test.cpp"]
LAUNCH = re.compile(r"(\w+(?:<[^<>;]*>)?)<<<(.*?)>>>\((\w+)\)", re.S)
SHUFFLING = re.compile(r"pn_kernel|softmax")  # kernels that use warp shuffles


def split_top(text):
    """Splits at the commas outside parentheses."""
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
        kernel, config, arg = m.groups()
        grid, block = split_top(config)[:2]
        fn = "launch_lockstep" if SHUFFLING.search(kernel) else "launch"
        return f"::emu::{fn}(&{kernel}, {grid}, {block}, {arg})"
    out, n = LAUNCH.subn(launch, source)
    return out, n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sanitize", action="store_true", help="AddressSanitizer + UBSan (a memcheck stand-in)")
    ap.add_argument("--build-dir", default=os.path.join(ROOT, "build-naive-emulator"))
    ap.add_argument("--cxx", default=os.environ.get("CXX", "g++"))
    ap.add_argument("--cuda-include", default=os.environ.get("CUDA_INCLUDE", "/usr/local/cuda/include"))
    ap.add_argument("-j", type=int, default=os.cpu_count() or 2)
    ap.add_argument("gtest_args", nargs="*")
    args = ap.parse_args()

    build = os.path.abspath(args.build_dir)
    os.makedirs(os.path.join(build, "src"), exist_ok=True)
    sources = sorted(os.path.join(ROOT, d, f) for d in LIBRARY_DIRS for f in os.listdir(os.path.join(ROOT, d))
                     if f.endswith(".cpp"))
    sources += [os.path.join(ROOT, s) for s in TESTS]
    naive = os.path.join(ROOT, "src", "cuda", "naive")
    for name in sorted(os.listdir(naive)):
        if not name.endswith(".cu"):
            continue
        with open(os.path.join(naive, name)) as f:
            text, launches = rewrite(f.read())
        if "<<<" in text:
            sys.exit(f"run.py: a launch in {name} was not rewritten")
        dst = os.path.join(build, "src", name[:-3] + ".cpp")
        if not os.path.exists(dst) or open(dst).read() != text:
            with open(dst, "w") as f:
                f.write(text)
        sources.append(dst)

    flags = ["-std=c++20", "-O1", "-g", "-pthread", "-fopenmp-simd", "-DNBHD_BACKEND_NAIVE=1", "-DNBHD_WITH_CUDA=1",
             "-I", HERE, "-I", os.path.join(ROOT, "include"), "-I", os.path.join(ROOT, "src"),
             "-I", os.path.join(ROOT, "tests", "cpp"), "-I", os.path.join(ROOT, "tests", "cuda"),
             "-isystem", args.cuda_include, "-Wno-unknown-pragmas"]
    if args.sanitize:
        flags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]

    def compile_one(src):
        obj = os.path.join(build, os.path.relpath(src, ROOT).replace(os.sep, "_").replace("..", "up") + ".o")
        if args.sanitize:
            obj += ".asan"
        deps = [src] + [os.path.join(HERE, "cuda_runtime.h")]
        if os.path.exists(obj) and all(os.path.getmtime(obj) >= os.path.getmtime(d) for d in deps) and \
                not headers_newer(obj):
            return obj
        subprocess.run([args.cxx, *flags, "-c", src, "-o", obj], check=True)
        return obj

    newest_header = max(os.path.getmtime(os.path.join(dp, f)) for top in ("include", "src", "tests")
                        for dp, _, fs in os.walk(os.path.join(ROOT, top)) for f in fs
                        if f.endswith((".hpp", ".cuh", ".h")))

    def headers_newer(obj):
        return os.path.getmtime(obj) < newest_header

    with concurrent.futures.ThreadPoolExecutor(args.j) as pool:
        objects = list(pool.map(compile_one, sources))
    exe = os.path.join(build, "naive_test" + ("_sanitized" if args.sanitize else ""))
    subprocess.run([args.cxx, *flags, *objects, "-o", exe, "-lgtest", "-lgtest_main", "-pthread"], check=True)
    env = dict(os.environ)
    if args.sanitize:
        env.setdefault("ASAN_OPTIONS", "detect_leaks=0")
        env.setdefault("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1")
    sys.exit(subprocess.run([exe, *args.gtest_args], env=env).returncode)


if __name__ == "__main__":
    main()
