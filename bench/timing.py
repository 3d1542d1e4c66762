# SPDX-License-Identifier: Apache-2.0
"""Timing one callable the way triton.testing.do_bench does, with a time budget.

On a GPU: one untimed call (compilation, planning, allocator warm-up), one timed call to
estimate, warm-up calls for about `warmup_ms`, then repeats for about `target_ms`, each
after zeroing a 256 MiB buffer (>= 4x the L2 of current GPUs, so no input stays in L2)
and between two CUDA events on the current stream; the median is reported. On the CPU
the same with wall-clock time and no flush (the smoke runs)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

FLUSH_BYTES = 256 << 20
FIRST_CALL_ALLOWANCE = 3  # compilation (FlexAttention's backward: tens of seconds) is not a kernel's time


class OverBudget(Exception):
    """The measurement would not fit in the time left; the message says by how much."""


@dataclass
class Settings:
    target_ms: float = 100.0   # total time of the timed repeats (do_bench's rep)
    warmup_ms: float = 25.0    # total time of the warm-up calls (do_bench's warmup)
    min_reps: int = 3
    max_reps: int = 100
    max_warmup: int = 25


class Timer:
    def __init__(self, device: str = "cuda", settings: Optional[Settings] = None):
        import torch

        self.torch = torch
        self.device = device
        self.settings = settings or Settings()
        self.flush = None
        if device == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0)
            self.flush = torch.empty(max(FLUSH_BYTES, 4 * l2), dtype=torch.uint8, device="cuda")

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def _timed(self, fn: Callable, count: int) -> list:
        """`count` calls, each after an L2 flush, timed one by one (ms)."""
        if self.device != "cuda":
            out = []
            for _ in range(count):
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e3)
            return out
        cuda = self.torch.cuda
        starts = [cuda.Event(enable_timing=True) for _ in range(count)]
        stops = [cuda.Event(enable_timing=True) for _ in range(count)]
        for start, stop in zip(starts, stops):
            self.flush.zero_()
            start.record()
            fn()
            stop.record()
        cuda.synchronize()
        return [start.elapsed_time(stop) for start, stop in zip(starts, stops)]

    def measure(self, fn: Callable, budget_s: float) -> dict:
        """Median time of `fn` in ms (with min, max, repeats); OverBudget when even a
        minimal measurement would take longer than `budget_s` seconds. The first call
        (which may compile) may take up to 3x the budget and is not counted in it."""
        s = self.settings
        t0 = time.perf_counter()
        fn()
        self.sync()
        first_s = time.perf_counter() - t0
        if first_s > FIRST_CALL_ALLOWANCE * budget_s:
            raise OverBudget(f"the first call took {first_s:.1f} s, over {FIRST_CALL_ALLOWANCE} x the "
                             f"{budget_s:.0f} s budget")
        t0 = time.perf_counter()
        estimate_ms = self._timed(fn, 1)[0]
        call_s = max(estimate_ms, 1e-3) * 1e-3
        left_s = budget_s - (time.perf_counter() - t0)
        warmup = 0 if s.warmup_ms <= 0 else int(min(s.max_warmup, max(1, round(s.warmup_ms / max(estimate_ms, 1e-3)))))
        reps = int(min(s.max_reps, max(s.min_reps, round(s.target_ms / max(estimate_ms, 1e-3)))))
        if (warmup + reps) * call_s > left_s:  # shrink to what the budget allows
            warmup = 1 if estimate_ms > s.warmup_ms else warmup
            reps = int(left_s / call_s) - warmup
            if reps < 1:
                raise OverBudget(f"one call takes {estimate_ms:.0f} ms; {left_s:.1f} s left of the budget")
        for _ in range(warmup):
            fn()
        times = self._timed(fn, reps)
        return {"ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps,
                "warmup": warmup, "first_call_s": round(first_s, 3)}
