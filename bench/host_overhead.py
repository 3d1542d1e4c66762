# SPDX-License-Identifier: Apache-2.0
"""Host time per call: what a call costs the CPU, not the GPU (issue 20).

    python bench/host_overhead.py [--device cuda|cpu] [--calls 300] [--json out.json]

Each measurement enqueues `calls` calls back to back behind a long GPU sleep
(torch.cuda._sleep), so the GPU never catches up and the CPU's time per call is the
host path alone: Python, dispatch, planning, launches. Rows:

  library forward / backward   _nbhd.forward / _nbhd.backward on prepared arrays (the
                               C++ library's host path plus the binding)
  nbhd forward (eager)         nbhd.na2d, no gradient
  nbhd forward+backward        nbhd.na2d(...).sum().backward()
  sdpa forward, fwd+bwd        torch's scaled_dot_product_attention on the same tokens
                               (dense: the same Python-to-launch path a peer pays)

Problems: NAT-Tiny's stage 4 (7x7 tokens, window 7, batch 128, 16 heads, head dim 32;
the issue's profile) and a tiny one (8x8, window 3, one image and head). On the CPU
(--device cpu) the same rows with the CPU backend, no sleep: a smoke run whose times
include the CPU kernels."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import nbhd
from nbhd import _core, _torch_ops

PROBLEMS = {
    "nat-stage4": dict(batch=128, grid=(7, 7), heads=16, dim=32, kernel=7),
    "tiny": dict(batch=1, grid=(8, 8), heads=1, dim=32, kernel=3),
}
SLEEP_CYCLES = 2_000_000_000  # ~1 s on a 1.7 GHz H100: longer than any row's enqueueing


def per_call_us(fn, calls: int, device: str, repeats: int = 5) -> tuple:
    """Median over `repeats` of the host time per call of `calls` back-to-back calls,
    and the number of calls it took.

    Valid only while the GPU is still asleep when the last call is enqueued: the
    driver's launch queue holds about a thousand pending launches, and a host that
    fills it waits for the GPU (at 300 forward+backward calls of ~10 launches each
    the rows read ~3.5 ms per call: the sleep's length over the calls). So an event
    recorded behind the sleep must still be pending at the end, else the row is
    measured again with half the calls."""
    for _ in range(20):
        fn()
    while True:
        times, caught_up = [], False
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda._sleep(SLEEP_CYCLES)
                asleep = torch.cuda.Event()
                asleep.record()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t0) / calls * 1e6)
            if device == "cuda":
                caught_up |= asleep.query()
                torch.cuda.synchronize()
        if not caught_up or calls <= 8:
            if caught_up:
                raise RuntimeError("the GPU caught up with 8 calls: the host path is slower than the sleep")
            return statistics.median(times), calls
        calls //= 2


def rows(name: str, spec: dict, device: str, calls: int) -> list:
    dtype = torch.float16 if device == "cuda" else torch.float32
    shape = (spec["batch"], *spec["grid"], spec["heads"], spec["dim"])
    q = torch.randn(shape, device=device, dtype=dtype)
    leaf = q.clone().requires_grad_()
    window = _core.make_window(2, spec["kernel"])
    p = _core.attention_problem(window, q.shape, q.shape, q.shape)
    p.dtype = str(dtype).replace("torch.", "")
    out, lse = torch.empty_like(q), torch.empty(q.shape[:-1], device=device, dtype=torch.float32)
    grads = [torch.empty_like(q) for _ in range(3)]
    d_out = torch.randn_like(q)
    launch = _torch_ops.TorchArrays.launch(q)
    export = _torch_ops.TorchArrays.export
    tokens = spec["grid"][0] * spec["grid"][1]
    dense = torch.randn(spec["batch"], spec["heads"], tokens, spec["dim"], device=device, dtype=dtype)
    dense_leaf = dense.clone().requires_grad_()

    def library_forward():
        nbhd._nbhd.forward(p, *export(q, q, q, out, lse), **launch)

    def library_backward():
        nbhd._nbhd.backward(p, *export(q, q, q, out, lse, d_out, *grads), **launch)

    library_forward()
    measured = {
        "library forward": library_forward,
        "library backward": library_backward,
        "nbhd forward (eager)": lambda: nbhd.na2d(q, q, q, spec["kernel"]),
        "nbhd forward+backward": lambda: nbhd.na2d(leaf, leaf, leaf, spec["kernel"]).sum().backward(),
        "sdpa forward": lambda: F.scaled_dot_product_attention(dense, dense, dense),
        "sdpa forward+backward": lambda: F.scaled_dot_product_attention(dense_leaf, dense_leaf,
                                                                        dense_leaf).sum().backward(),
    }
    results = []
    for row, fn in measured.items():
        us, used = per_call_us(fn, calls, device)
        results.append({"problem": name, "row": row, "host_us_per_call": round(us, 2), "calls": used})
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    results = []
    for name in args.problems.split(","):
        results += rows(name, PROBLEMS[name], args.device, args.calls)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"host time per call (us), {device}, up to {args.calls} calls back to back, median of 5")
    for r in results:
        print(f"  {r['problem']:<12} {r['row']:<24} {r['host_us_per_call']:>9.1f}  ({r['calls']} calls)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "calls": args.calls, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
