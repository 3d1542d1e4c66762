#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""nbhd's benchmark suite: every nbhd backend and the peers a user would pick instead,
on a named set of problems, in one process on one GPU.

    python bench/suite.py                                  # the anchors set, fp16, fwd and fwd+bwd
    python bench/suite.py --set models
    python bench/suite.py --set paper --start 0 --limit 150
    python bench/suite.py --set anchors --only 2d-nat-56-k7,2d-128-k31 --peers sdpa-cudnn
    python bench/suite.py --device cpu --set tiny          # smoke run on the CPU (tests)

For each problem, dtype and pass (fwd, fwd+bwd) it times:
  - every nbhd backend built for the device (nbhd.neighborhood_attention(backend=...));
  - SDPA with the cuDNN and flash backends (self attention over all tokens: the cost to
    beat), and on the paper set the efficient (xFormers FMHA) one;
  - FlexAttention (torch.compile'd) with a neighborhood mask_mod, tokens in row-major
    order (flex-plain) and permuted so that each 128-token block is a compact spatial
    tile (flex-tiled; the permutation is not timed).
Before timing, every mask is checked against an independent dense reference on small
problems, and on sampled rows of each timed problem; every neighborhood result (nbhd and
Flex) is checked on sampled queries against exact attention over their neighbors.
The run also measures the card's ceilings (copy bandwidth, dense fp16/bf16/fp32 matmul,
cuDNN attention on a large problem) and from them each row's speed of light (SoL), and
the FA2-equivalent time (SDPA flash's time scaled by the fraction of pairs NA computes).

Output, under --out-dir (bench/results) with --tag (default <card>-<date>):
  TAG/PIECE.jsonl   one line per row as it is measured (a killed run keeps its rows)
  TAG.json, TAG.md, TAG-*.png   all pieces of TAG merged (summarize.py), rewritten after
                    each set; the Markdown tables of this run also go to stdout.
Timing: timing.py (CUDA events, L2 flushed, warm-up, median). Problems: problems.py.
Masks: masks.py. Paper-style tables: summarize.py."""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from typing import Dict, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import masks as M  # noqa: E402
import problems as P  # noqa: E402
import report as R  # noqa: E402
import summarize as S  # noqa: E402
import timing as T  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DTYPES = {"anchors": ("float16",), "models": ("float16",), "paper": ("float16", "float32"),
                  "tiny": ("float32",)}
DEFAULT_PEERS = {"anchors": ("sdpa-cudnn", "sdpa-flash", "flex-plain", "flex-tiled"),
                 "models": ("sdpa-cudnn", "sdpa-flash", "flex-plain", "flex-tiled"),
                 # the paper's baselines: FMHA (xFormers, SDPA's efficient backend) and FAv2
                 "paper": ("sdpa-cudnn", "sdpa-flash", "sdpa-efficient"),
                 "tiny": ("sdpa-math", "flex-plain", "flex-tiled")}
# do_bench's 100 ms of repeats after 25 ms of warm-up; the paper set's hundreds of
# problems get a quarter of that.
DEFAULT_TIMING = {"paper": T.Settings(target_ms=25, warmup_ms=10, min_reps=5),
                  "tiny": T.Settings(target_ms=5, warmup_ms=0, min_reps=2, max_reps=5)}
# Largest relative error (max |out - exact| / max |exact| over the checked queries) accepted.
CHECK_TOLERANCE = {"float16": 2e-2, "bfloat16": 4e-2, "float32": 2e-3, "float64": 1e-8}
SDPA_BACKENDS = {"sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-flash": "FLASH_ATTENTION",
                 "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH"}
# Small problems every mask must reproduce exactly before anything is timed: every rank,
# dilation dividing the extent and not, strides, causal axes, a full-attention axis,
# periodic axes, and grids that are not a multiple of the 128-token block.
MASK_CHECKS = [
    P.Problem("m1", (300,), (17,), dilation=(3,)),
    P.Problem("m2", (256,), (8,), dilation=(2,), stride=(3,), causal=(True,)),
    P.Problem("m3", (32, 16), (5, 7), dilation=(2, 1)),
    P.Problem("m4", (16, 24), (7, 5), dilation=(2, 1), stride=(3, 2), causal=(True, False)),
    P.Problem("m5", (8, 16, 16), (3, 5, 3), dilation=(1, 1, 2), causal=(False, True, False)),
    P.Problem("m6", (4, 8, 16), (4, 8, 5), stride=(2, 8, 1)),
    P.Problem("m7", (13, 11), (13, 3)),
    P.Problem("m8", (32, 32), (32, 9), dilation=(1, 3)),
    P.Problem("m9", (16, 33), (5, 7), dilation=(1, 2), stride=(2, 1), periodic=(True, True)),
]


class Skip(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


class Fatal(Exception):
    """The device is in an error state; nothing more can run in this process."""


def short(e: BaseException, n: int = 300) -> str:
    text = " ".join(str(e).split())
    return (text[:n] + "...") if len(text) > n else text


# ---- environment ----------------------------------------------------------------------------

def card_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; 'NVIDIA GeForce RTX 4090' -> 'rtx4090'."""
    words = [w for w in name.replace("-", " ").split() if w.lower() not in ("nvidia", "geforce", "tesla", "amd")]
    if not words:
        return "gpu"
    slug = words[0].lower()
    if slug.isalpha() and len(words) > 1:
        slug += words[1].lower()
    return "".join(c for c in slug if c.isalnum()) or "gpu"


def git_revision() -> str:
    """The commit measured: git's, else $NBHD_GIT_COMMIT (a copy of the tree without .git,
    as the GPU machine gets), else 'unknown'."""
    fallback = os.environ.get("NBHD_GIT_COMMIT", "")[:12] or "unknown"
    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "") if rev else fallback
    except (OSError, subprocess.SubprocessError):
        return fallback


def environment(torch, device: str) -> dict:
    import nbhd

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    card = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    return {"type": "run", "card": card, "card_slug": card_slug(card) if device == "cuda" else "cpu",
            "device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
            "python": platform.python_version(), "nbhd_version": getattr(nbhd, "__version__", "?"),
            "nbhd_backends": [b["name"] for b in nbhd.backends()], "git": git_revision(),
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python"] + sys.argv)}


# ---- ceilings -------------------------------------------------------------------------------------

def measure_ceilings(torch, timer: T.Timer, device: str) -> dict:
    """Copy bandwidth (read + write), dense matmul rates, and SDPA cuDNN's attention rate
    on a large problem (B1 H32 N16384 D128; on the CPU small sizes and SDPA math)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = device == "cuda"
    c: Dict[str, object] = {}
    n = (1 << 30) if cuda else (16 << 20)
    x = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    c["copy_gbps"] = 2 * n / (timer.measure(lambda: y.copy_(x), 60)["ms"] * 1e-3) / 1e9
    del x, y
    size = 8192 if cuda else 192
    c["matmul_tflops"] = {}
    for name in ("float16", "bfloat16", "float32"):
        a = torch.randn(size, size, device=device).to(getattr(torch, name))
        b = torch.randn(size, size, device=device).to(getattr(torch, name))
        c["matmul_tflops"][name] = 2 * size ** 3 / (timer.measure(lambda: a @ b, 60)["ms"] * 1e-3) / 1e12
        del a, b
    c["matmul_size"] = size
    c["float32_matmul_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32) if cuda else False
    B, H, N, D = (1, 32, 16384, 128) if cuda else (1, 2, 256, 32)
    backend = SDPBackend.CUDNN_ATTENTION if cuda else SDPBackend.MATH
    c["attention_problem"] = f"B{B} H{H} N{N} D{D}, SDPA {'cuDNN' if cuda else 'math'}"
    c["attention_tflops"] = {}
    fwd_flops = 4.0 * B * H * N * N * D
    for name in ("float16", "bfloat16") if cuda else ("float32",):
        dtype = getattr(torch, name)
        q, k, v, g = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(4))
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

        def fwd():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)

        def fwd_bwd():
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(qg, kg, vg)
            torch.autograd.grad(out, (qg, kg, vg), g)

        rates = {}
        for pass_, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            try:
                ms = timer.measure(fn, 120)["ms"]
                rates[pass_] = P.PASS_FLOPS[pass_] * fwd_flops / (ms * 1e-3) / 1e12
            except (RuntimeError, T.OverBudget) as e:
                rates[pass_] = None
                c.setdefault("errors", []).append(f"attention {name} {pass_}: {short(e, 160)}")
        c["attention_tflops"][name] = rates
        del q, k, v, g, qg, kg, vg
    if cuda:
        torch.cuda.empty_cache()
    return c


# ---- mask checks ----------------------------------------------------------------------------------

def check_masks(device: str) -> dict:
    """Every small problem of MASK_CHECKS in the plain and tiled orders: the mask_mod on
    all pairs equals the independent dense mask, the pair count equals problems.pairs,
    and the BlockMask's blocks are exactly the non-empty / full ones. Raises on mismatch."""
    import torch

    checked = []
    for p in MASK_CHECKS:
        dense = M.dense_mask(p)
        if dense.sum() != P.pairs(p):
            raise AssertionError(f"mask check {p.name}: dense mask has {dense.sum()} pairs, problems.pairs {P.pairs(p)}")
        tile, _ = M.pick_tile(p)
        layouts = [M.plain_layout(p)] + ([M.tiled_layout(p, tile)] if tile else [])
        for layout in layouts:
            fm = M.FlexMask(p, layout, device)
            pos = torch.arange(p.tokens, device=device)
            got = fm.evaluate(pos[:, None], pos[None, :]).cpu().numpy()
            want = dense[layout.order][:, layout.order]
            if not (got == want).all():
                bad = list(zip(*(got != want).nonzero()))[:3]
                raise AssertionError(f"mask check {p.name} ({layout.describe()}): mask_mod differs from the dense "
                                     f"reference at (query, key) positions {bad}")
            bm = fm.block_mask()
            blocks = -(-p.tokens // M.BLOCK)
            padded = torch.zeros(blocks * M.BLOCK, blocks * M.BLOCK, dtype=torch.bool)
            padded[:p.tokens, :p.tokens] = torch.from_numpy(want)
            view = padded.view(blocks, M.BLOCK, blocks, M.BLOCK)
            any_, all_ = view.any(3).any(1), view.all(3).all(1)
            if not (torch.equal(fm.blocks_any.cpu(), any_) and torch.equal(fm.blocks_all.cpu(), all_)
                    and torch.equal(bm.to_dense()[0, 0].cpu().bool(), any_)):
                raise AssertionError(f"mask check {p.name} ({layout.describe()}): BlockMask blocks are wrong")
            checked.append(f"{p.name} {P.describe(p)} {layout.describe()}")
    return {"problems": len(MASK_CHECKS), "layouts": len(checked), "passed": checked}


def check_mask_rows(fm: M.FlexMask, p: P.Problem, tokens) -> None:
    """The timed problem's mask on the rows of `tokens` (all keys) against the spec's
    neighbor lists; raises Skip('wrong') on a difference."""
    import torch

    order = torch.as_tensor(fm.layout.order, device=fm.device)
    position = torch.empty_like(order)
    position[order] = torch.arange(p.tokens, device=order.device)
    keys = torch.arange(p.tokens, device=order.device)
    for t in tokens:
        row = fm.evaluate(position[int(t)].view(1, 1), keys.view(1, -1))[0]
        got = torch.sort(order[row]).values.cpu().numpy()
        want = sorted(M.neighbor_tokens(p, int(t)).tolist())
        if len(got) != len(want) or list(got) != want:
            raise Skip("wrong", f"mask row of token {int(t)} has {len(got)} keys, the spec gives {len(want)}")


# ---- inputs and runners ---------------------------------------------------------------------------

class Inputs:
    """Random inputs of one (problem, dtype), never zero: q, k, v, d_out [B, X..., H, D]
    (nbhd's layout); [B, H, N, D] copies per token order on demand (SDPA, Flex)."""

    def __init__(self, torch, p: P.Problem, dtype: str, device: str, seed: int = 0):
        self.torch, self.p, self.device = torch, p, device
        self.dtype = getattr(torch, dtype)
        shape = (p.batch, *p.extent, p.heads, p.dim)
        gen = torch.Generator(device=device).manual_seed(seed)
        self.q, self.k, self.v, self.d_out = (self._random(shape, gen) for _ in range(4))
        self._bhnd: Dict[str, tuple] = {}
        self._reference: Dict[tuple, object] = {}

    def _random(self, shape, gen):
        x = self.torch.randn(shape, generator=gen, device=self.device, dtype=self.torch.float32).to(self.dtype)
        return x.masked_fill_(x == 0, 2.0 ** -8)

    def flat(self, t):
        return t.view(self.p.batch, self.p.tokens, self.p.heads, self.p.dim)

    def bhnd(self, layout: Optional[M.Layout] = None):
        """(q, k, v, d_out) as [B, H, N, D] with tokens in `layout`'s order."""
        key = "plain" if layout is None or layout.tile is None else layout.describe()
        if key not in self._bhnd:
            index = None if key == "plain" else self.torch.as_tensor(layout.order, device=self.device)
            out = []
            for t in (self.q, self.k, self.v, self.d_out):
                t = self.flat(t)
                if index is not None:
                    t = t.index_select(1, index)
                out.append(t.transpose(1, 2).contiguous())
            self._bhnd[key] = tuple(out)
        return self._bhnd[key]

    def reference(self, tokens):
        key = tuple(int(t) for t in tokens)
        if key not in self._reference:
            self._reference[key] = M.reference_rows(self.flat(self.q), self.flat(self.k), self.flat(self.v),
                                                    self.p, tokens)
        return self._reference[key]

    def element_bytes(self) -> int:
        return self.q.element_size()

    def tensor_bytes(self) -> int:
        return self.q.numel() * self.q.element_size()


def grad_step(torch, forward, q, k, v, d_out):
    """A callable that runs forward and backward (gradients of q, k, v; no accumulation)."""
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

    def step():
        out = forward(qg, kg, vg)
        torch.autograd.grad(out, (qg, kg, vg), d_out)
    return step


class NbhdRunner:
    """An nbhd backend through the Python package."""

    def __init__(self, torch, name: str, device: str):
        import nbhd

        self.torch, self.nbhd, self.name, self.device = torch, nbhd, name, device

    def _problem(self, p: P.Problem, dtype: str):
        q = self.nbhd._nbhd.Problem()
        pad = lambda v, fill: list(v) + [fill] * (3 - p.rank)  # noqa: E731
        q.rank, q.batch, q.heads, q.kv_heads, q.dim, q.dim_v = p.rank, p.batch, p.heads, p.heads, p.dim, p.dim
        q.extent, q.kernel = pad(p.extent, 1), pad(p.kernel, 1)
        q.dilation, q.stride, q.causal = pad(p.dilation, 1), pad(p.stride, 1), pad(p.causal, False)
        q.periodic = pad(p.periodic, False)
        q.dtype = dtype
        return q

    def _kwargs(self, p: P.Problem) -> dict:
        return dict(kernel_size=p.kernel, stride=p.stride, dilation=p.dilation, is_causal=p.causal,
                    periodic=p.periodic, backend=self.name)

    def memory(self, p: P.Problem, dtype: str, pass_: str, inputs: Inputs) -> float:
        t = inputs.tensor_bytes()
        weights = 4.0 * p.batch * p.heads * p.tokens * p.window  # unfused backends' float32 attention weights
        unfused = self.name in ("naive", "gemm")
        if pass_ == "fwd":
            return t + (weights if unfused else 0)
        return 4 * t + (2 * weights if unfused else 0)

    def prepare(self, p: P.Problem, dtype: str, pass_: str, inputs: Inputs):
        why = self.nbhd._nbhd.can_run(self.name, self._problem(p, dtype), self.device)
        if why:
            raise Skip("cannot-run", why)
        kw = self._kwargs(p)
        na = self.nbhd.neighborhood_attention
        if pass_ == "fwd":
            q, k, v = inputs.q, inputs.k, inputs.v
            return lambda: na(q, k, v, **kw)
        return grad_step(self.torch, lambda q, k, v: na(q, k, v, **kw), inputs.q, inputs.k, inputs.v, inputs.d_out)

    def output_rows(self, p: P.Problem, inputs: Inputs, tokens):
        out = self.nbhd.neighborhood_attention(inputs.q, inputs.k, inputs.v, **self._kwargs(p))
        return inputs.flat(out)[0, self.torch.as_tensor(tokens, device=out.device)]


class SdpaRunner:
    """Self attention over all tokens with one SDPA backend (causal for causal 1-D)."""

    def __init__(self, torch, name: str):
        from torch.nn.attention import SDPBackend

        self.torch, self.name = torch, name
        self.backend = getattr(SDPBackend, SDPA_BACKENDS[name])

    def memory(self, p, dtype, pass_, inputs):
        return (5 if pass_ == "fwd" else 8) * inputs.tensor_bytes()

    def prepare(self, p: P.Problem, dtype: str, pass_: str, inputs: Inputs):
        import torch.nn.functional as F
        from torch.nn.attention import sdpa_kernel

        q, k, v, d_out = inputs.bhnd()
        causal, backend = P.sdpa_is_causal(p), self.backend

        def attend(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if pass_ == "fwd":
            return lambda: attend(q, k, v)
        return grad_step(self.torch, attend, q, k, v, d_out)


class FlexRunner:
    """FlexAttention with the neighborhood mask_mod in one token order."""

    _flex = None

    def __init__(self, torch, layout: str, device: str, compiled: bool, masks_cache: dict):
        self.torch, self.layout, self.device = torch, layout, device
        self.name = f"flex-{layout}"
        self.compiled, self.cache = compiled, masks_cache

    def flex(self):
        from torch.nn.attention.flex_attention import flex_attention

        if not self.compiled:
            return flex_attention
        if FlexRunner._flex is None:
            FlexRunner._flex = self.torch.compile(flex_attention, dynamic=False)
        return FlexRunner._flex

    def masks(self, p: P.Problem):
        """(FlexMask, BlockMask) of the problem in this order, built once per problem."""
        key = (p.name, self.layout)
        if key not in self.cache:
            if self.layout == "plain":
                layout = M.plain_layout(p)
            else:
                tile, why = M.pick_tile(p)
                if tile is None:
                    self.cache[key] = Skip("cannot-run", f"no tiled order: {why}")
                    raise self.cache[key]
                layout = M.tiled_layout(p, tile)
            fm = M.FlexMask(p, layout, self.device)
            self.cache[key] = (fm, fm.block_mask())
        if isinstance(self.cache[key], Skip):
            raise self.cache[key]
        return self.cache[key]

    def memory(self, p, dtype, pass_, inputs):
        return (5 if pass_ == "fwd" else 8) * inputs.tensor_bytes()

    def prepare(self, p: P.Problem, dtype: str, pass_: str, inputs: Inputs):
        fm, bm = self.masks(p)
        q, k, v, d_out = inputs.bhnd(fm.layout)
        flex = self.flex()
        if pass_ == "fwd":
            return lambda: flex(q, k, v, block_mask=bm)
        return grad_step(self.torch, lambda q, k, v: flex(q, k, v, block_mask=bm), q, k, v, d_out)

    def output_rows(self, p: P.Problem, inputs: Inputs, tokens):
        fm, bm = self.masks(p)
        q, k, v, _ = inputs.bhnd(fm.layout)
        out = self.flex()(q, k, v, block_mask=bm)  # [B, H, N, D], tokens in the layout's order
        order = self.torch.as_tensor(fm.layout.order, device=out.device)
        position = self.torch.empty_like(order)
        position[order] = self.torch.arange(p.tokens, device=out.device)
        return out[0, :, position[self.torch.as_tensor(tokens, device=out.device)]].transpose(0, 1)


# ---- one row --------------------------------------------------------------------------------------

def free_bytes(torch, device: str) -> float:
    if device != "cuda":
        return float("inf")
    free, _ = torch.cuda.mem_get_info()
    return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()


def is_fatal(torch, e: BaseException, device: str) -> bool:
    """A CUDA error that leaves the context unusable (the next synchronize fails too)."""
    text = str(e)
    if device != "cuda" or not any(s in text for s in ("CUDA error", "cudaError", "illegal", "misaligned",
                                                      "launch failure", "device-side assert")):
        return False
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").sum().item()
        return False
    except RuntimeError:
        return True


def guarded(torch, device, work) -> dict:
    """work() -> dict, with every failure turned into {"skipped": reason, "kind": ...}:
    cannot-run (the backend refuses the problem), memory, time (over budget), wrong,
    error. Raises Fatal when the device is lost."""
    try:
        return work()
    except Skip as s:
        return {"skipped": s.reason, "kind": s.kind}
    except T.OverBudget as e:
        return {"skipped": f"over the time budget: {e}", "kind": "time"}
    except MemoryError as e:
        return {"skipped": f"out of memory: {short(e)}", "kind": "memory"}
    except ValueError as e:  # nbhd: the named backend cannot run this problem
        return {"skipped": short(e), "kind": "cannot-run"}
    except Exception as e:  # noqa: BLE001 - a peer's or a backend's failure is a result
        if isinstance(e, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(e):
            return {"skipped": f"out of memory: {short(e, 160)}", "kind": "memory"}
        if is_fatal(torch, e, device):
            raise Fatal(f"{type(e).__name__}: {short(e)}") from e
        if isinstance(e, NotImplementedError) or "No available kernel" in str(e) or "not supported" in str(e).lower():
            return {"skipped": short(e), "kind": "cannot-run"}
        return {"skipped": f"{type(e).__name__}: {short(e)}", "kind": "error"}


def memory_skip(torch, runner, p: P.Problem, dtype: str, pass_: str, inputs: Inputs, device) -> Optional[dict]:
    """A skip entry when the runner's estimated memory exceeds 90% of what is free."""
    need, free = runner.memory(p, dtype, pass_, inputs), free_bytes(torch, device)
    if need <= 0.9 * free:
        return None
    return {"skipped": f"needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free", "kind": "memory"}


def check_output(torch, runner, p: P.Problem, dtype: str, inputs: Inputs, tokens, device) -> dict:
    """{"check_err": e} when the runner's forward matches exact attention on `tokens`
    within CHECK_TOLERANCE[dtype], else a skip entry ('wrong', or why it cannot run).
    Flex's mask is checked on the same rows first."""
    skip = memory_skip(torch, runner, p, dtype, "fwd", inputs, device)
    if skip:
        return skip

    def work():
        if isinstance(runner, FlexRunner):
            check_mask_rows(runner.masks(p)[0], p, tokens)
        if isinstance(runner, NbhdRunner):
            why = runner.nbhd._nbhd.can_run(runner.name, runner._problem(p, dtype), device)
            if why:
                raise Skip("cannot-run", why)
        # Grad mode as in the timed forward (the inputs need no grad), so a compiled
        # FlexAttention is not compiled a second time for no_grad.
        rows = runner.output_rows(p, inputs, tokens)
        err = M.relative_error(rows, inputs.reference(tokens))
        if not err <= CHECK_TOLERANCE[dtype]:
            raise Skip("wrong", f"wrong result: relative error {err:.3g} on {len(tokens)} checked queries "
                                f"(tolerance {CHECK_TOLERANCE[dtype]:g})")
        return {"check_err": err}
    return guarded(torch, device, work)


def base_row(p: P.Problem, set_name: str, dtype: str, pass_: str) -> dict:
    return {"type": "row", "set": set_name, **p.as_dict(), "description": P.describe(p), "dtype": dtype,
            "pass": pass_, "tokens": p.tokens, "window": p.window, "pairs": P.pairs(p), "sa_pairs": P.sa_pairs(p),
            "sdpa_causal": P.sdpa_is_causal(p), "flops": P.flops(p, pass_), "sa_flops": P.sa_flops(p, pass_),
            "bytes": P.bytes_moved(p, pass_, dtype), "results": {}}


def run_problem(torch, p: P.Problem, set_name: str, dtypes, passes, runners, timer, budget_s, ceilings, device,
                check_count: int, masks_cache: dict):
    """The rows of one problem: for each dtype, its check then each pass's timings."""
    tokens = M.check_tokens(p, check_count)
    for dtype in dtypes:
        rows = [base_row(p, set_name, dtype, pass_) for pass_ in passes]
        t0 = time.time()
        try:
            inputs = Inputs(torch, p, dtype, device)
        except Exception as e:  # noqa: BLE001
            if not (isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError)))
                    or "out of memory" in str(e)):
                raise
            for row in rows:
                row["skipped"] = f"the inputs do not fit in memory: {short(e, 160)}"
                yield row
            continue
        checks = {r.name: check_output(torch, r, p, dtype, inputs, tokens, device)
                  for r in runners if hasattr(r, "output_rows")}
        for row in rows:
            for runner in runners:
                check = checks.get(runner.name, {})
                if "skipped" in check:
                    row["results"][runner.name] = dict(check)
                    continue
                skip = memory_skip(torch, runner, p, dtype, row["pass"], inputs, device)
                if skip:
                    row["results"][runner.name] = skip
                    continue
                entry = guarded(torch, device, lambda: timer.measure(runner.prepare(p, dtype, row["pass"], inputs),
                                                                     budget_s))
                entry.update({k: v for k, v in check.items() if k == "check_err"})
                row["results"][runner.name] = entry
            for layout in ("plain", "tiled"):
                m = masks_cache.get((p.name, layout))
                if isinstance(m, tuple):
                    row.setdefault("flex", {})[layout] = {"order": m[0].layout.describe(), "density": m[0].density,
                                                          "full_blocks": m[0].full_fraction}
            R.speed_of_light(row, ceilings)
            R.derive(row)
            row["seconds"] = round(time.time() - t0, 1)  # the first row includes inputs and checks
            t0 = time.time()
            yield row
        del inputs
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def row_line(row: dict) -> str:
    """One line per row for the console."""
    parts = []
    for b in R.backend_order(row["results"]):
        e = row["results"][b]
        if R.timed(e):
            extra = []
            if e.get("speedup_vs_cudnn") and b != "sdpa-cudnn":
                extra.append(f"{e['speedup_vs_cudnn']:.2f}x cuDNN")
            if e.get("pct_sol") and R.computes_na(b):
                extra.append(f"{e['pct_sol']:.0f}% SoL")
            parts.append(f"{b} {R.fmt_ms(e['ms'])}" + (f" ({', '.join(extra)})" if extra else ""))
        else:
            parts.append(f"{b} {R.SKIP_CODES.get(e.get('kind'), '-')}")
    sol = f"SoL {R.fmt_ms(row.get('sol_ms'))} ms" if row.get("sol_ms") else ""
    return f"[{row['set']}] {row['problem']} {row['dtype']} {row['pass']}: " + "; ".join(parts) + f"; {sol} ({row.get('seconds', 0)} s)"


# ---- output ---------------------------------------------------------------------------------------

class Writer:
    """Rows to TAG/PIECE.jsonl as they come (flushed, so a killed run keeps them)."""

    def __init__(self, path: str, run: dict):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path, self.rows = path, []
        self.file = open(path, "w")
        self._write(run)

    def _write(self, record: dict):
        self.file.write(json.dumps(record, default=R._json_default) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def add(self, row: dict):
        self.rows.append(row)
        self._write(row)

    def finish(self, end: dict):
        self._write(dict(end, type="end"))
        self.file.close()


def piece_name(sets: Sequence[str], a) -> str:
    name = "+".join(sets)
    if a.start or a.limit is not None:
        name += f"-{a.start}-{a.start + a.limit if a.limit is not None else 'end'}"
    if a.only or a.match:
        name += "-only-" + hashlib.sha1(f"{a.only}|{a.match}".encode()).hexdigest()[:6]
    if a.dtypes or a.passes or a.backends or a.peers:
        name += "-custom-" + hashlib.sha1(f"{a.dtypes}|{a.passes}|{a.backends}|{a.peers}".encode()).hexdigest()[:6]
    return name


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="anchors",
                    help="problem sets, comma-separated: anchors, models, paper (tiny: CPU smoke); default anchors")
    ap.add_argument("--only", default="", help="comma-separated problem names")
    ap.add_argument("--match", default="", help="only problems whose name contains this")
    ap.add_argument("--start", type=int, default=0, help="skip the first N problems of each set")
    ap.add_argument("--limit", type=int, help="at most N problems of each set")
    ap.add_argument("--paper-count", type=int, default=300, help="problems in the paper set (default 300)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the paper set's sampling (default 0)")
    ap.add_argument("--dtypes", default="", help="e.g. float16,bfloat16 (default: the set's)")
    ap.add_argument("--passes", default="", help="fwd, fwd+bwd (default: the problem's)")
    ap.add_argument("--backends", default="", help="nbhd backends (default: every one built for the device)")
    ap.add_argument("--peers", default="", help=f"peers among {', '.join(R.PEERS)}, or 'none' (default: the set's)")
    ap.add_argument("--budget-s", type=float, default=60.0,
                    help="time budget of one measurement (default 60 s); its first call, which may "
                         "compile, may take up to 3x more")
    ap.add_argument("--max-minutes", type=float,
                    help="start no new problem after this many minutes (the outputs are still written)")
    ap.add_argument("--target-ms", type=float, help="time of the timed repeats per measurement (default 100; paper 25)")
    ap.add_argument("--check-queries", type=int, default=16, help="queries checked per problem (default 16)")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--tag", help="name of the result files (default <card>-<date>)")
    ap.add_argument("--date", help="the date in the default tag (default today, UTC)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch

    device = a.device
    if device == "cpu":  # the smoke run uses FlexAttention eagerly, and says so once per call
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    if device == "cuda" and not torch.cuda.is_available():
        print("suite: no CUDA device (torch.cuda.is_available() is False); --device cpu runs the CPU smoke set",
              file=sys.stderr)
        return 2
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):  # one compiled flex per problem shape
            setattr(torch._dynamo.config, name, 4096)
    sets = [s for s in a.set.split(",") if s]
    split = lambda text: [x for x in text.split(",") if x]  # noqa: E731
    import nbhd

    built = [b["name"] for b in nbhd.backends() if b["device"] == device and b["fused_ops"]]
    nbhd_names = split(a.backends) or built
    for name in nbhd_names:
        if name not in [b["name"] for b in nbhd.backends()]:
            print(f"suite: backend '{name}' is not built (built: {', '.join(b['name'] for b in nbhd.backends())})",
                  file=sys.stderr)
            return 2

    run = environment(torch, device)
    date = a.date or dt.datetime.now(dt.timezone.utc).date().isoformat()
    tag = a.tag or f"{run['card_slug']}-{date}"
    piece = os.path.join(a.out_dir, tag, piece_name(sets, a) + ".jsonl")
    t_start = time.time()
    timer = T.Timer(device, DEFAULT_TIMING.get("tiny") if device == "cpu" else None)
    print(f"suite: {run['card']}, torch {run['torch']}, nbhd backends {', '.join(nbhd_names)}; writing {piece}",
          flush=True)
    run["ceilings"] = measure_ceilings(torch, timer, device)
    print("ceilings: " + json.dumps(run["ceilings"], default=R._json_default), flush=True)
    run["mask_checks"] = check_masks(device)
    print(f"mask checks: {run['mask_checks']['layouts']} (problem, order) pairs equal the dense reference",
          flush=True)
    run.update({"sets": sets, "settings": {k: v for k, v in vars(a).items()}})
    writer = Writer(piece, run)
    stopped = None
    masks_cache: dict = {}
    for set_name in sets:
        chosen = P.select(P.problem_set(set_name, a.paper_count, a.seed), split(a.only), None, a.match)
        chosen = chosen[a.start:a.start + a.limit if a.limit is not None else None]
        dtypes = split(a.dtypes) or DEFAULT_DTYPES.get(set_name, ("float16",))
        peers = [] if a.peers == "none" else split(a.peers) or list(DEFAULT_PEERS.get(set_name, ()))
        if device == "cpu":
            peers = [x for x in peers if x in ("sdpa-math", "flex-plain", "flex-tiled")]
        settings = DEFAULT_TIMING.get(set_name, T.Settings()) if device == "cuda" else DEFAULT_TIMING["tiny"]
        if a.target_ms:
            settings = T.Settings(target_ms=a.target_ms, warmup_ms=a.target_ms / 4, min_reps=settings.min_reps)
        timer.settings = settings
        runners = [SdpaRunner(torch, x) for x in peers if x.startswith("sdpa-")]
        runners += [NbhdRunner(torch, x, device) for x in nbhd_names]
        runners += [FlexRunner(torch, x.split("-")[1], device, compiled=device == "cuda", masks_cache=masks_cache)
                    for x in peers if x.startswith("flex-")]
        print(f"set {set_name}: {len(chosen)} problems, dtypes {', '.join(dtypes)}, "
              f"backends {', '.join(r.name for r in runners)}", flush=True)
        for p in chosen:
            if a.max_minutes and time.time() - t_start > 60 * a.max_minutes:
                stopped = f"stopped before {set_name}/{p.name}: --max-minutes {a.max_minutes} reached"
                break
            passes = [x for x in p.passes if not a.passes or x in split(a.passes)]
            try:
                for row in run_problem(torch, p, set_name, dtypes, passes, runners, timer, a.budget_s,
                                       run["ceilings"], device, a.check_queries, masks_cache):
                    writer.add(row)
                    print(row_line(row), flush=True)
            except Fatal as e:
                stopped = f"the device failed on {set_name}/{p.name}: {e}"
                break
            finally:
                masks_cache.clear()
        if stopped:
            break
        if len(sets) > 1:  # the merged report after each set
            S.write_merged([os.path.dirname(piece)], os.path.join(a.out_dir, tag), plots=not a.no_plots)
    seconds = time.time() - t_start
    writer.finish({"seconds": round(seconds, 1), "stopped": stopped})
    if stopped:
        print("suite: " + stopped, file=sys.stderr)
    written = S.write_merged([os.path.dirname(piece)], os.path.join(a.out_dir, tag), plots=not a.no_plots)
    print("\n" + R.problem_tables(writer.rows, max_rows=60))
    paper_rows = [r for r in writer.rows if r["set"] == "paper"]
    if paper_rows:
        print("\n" + S.summary_markdown(paper_rows))
    print(f"\nsuite: {len(writer.rows)} rows in {seconds / 60:.1f} min; wrote {piece} and "
          + ", ".join(os.path.relpath(w) for w in written), flush=True)
    return 1 if stopped and stopped.startswith("the device failed") else 0


if __name__ == "__main__":
    sys.exit(main())
