# SPDX-License-Identifier: Apache-2.0
"""The problems the suite times, and the work each one counts.

    Problem                      one neighborhood attention problem (q, k, v of one shape)
    problem_set(name, ...)       'anchors', 'paper', 'models' (and 'tiny' for CPU smoke runs)
    pairs / flops / bytes        work as shared/spec/semantics.md "Counting work" counts it

Pure Python, no torch: the counts are checked against nbhd.Problem and nbhd-bench's
--json in tests/python/test_bench_problems.py."""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

from nbhd._window import axis_windows

PASSES = ("fwd", "fwd+bwd")
# FLOPs of a pass in forward units: the backward counts 2.5 forwards (spec).
PASS_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


@dataclass(frozen=True)
class Problem:
    """One problem: the token grid, the window per axis and the tensor sizes.
    Query, key and value have `heads` heads of `dim` features (no GQA, Dv == D).
    `passes` are the passes the set times it in; `tile` fixes flex-tiled's token tile
    (None: the suite picks the tile with the fewest non-empty 128x128 blocks)."""

    name: str
    extent: Tuple[int, ...]
    kernel: Tuple[int, ...]
    dilation: Tuple[int, ...] = ()
    stride: Tuple[int, ...] = ()
    causal: Tuple[bool, ...] = ()
    batch: int = 1
    heads: int = 1
    dim: int = 64
    passes: Tuple[str, ...] = PASSES
    tile: Optional[Tuple[int, ...]] = None
    periodic: Tuple[bool, ...] = ()  # wrap-around axes (spec 3'), never causal

    def __post_init__(self):
        r = len(self.extent)
        # Per-axis defaults: dilation 1, stride 1, not causal, not periodic.
        for name, default in (("dilation", 1), ("stride", 1), ("causal", False), ("periodic", False)):
            if not getattr(self, name):
                object.__setattr__(self, name, (default,) * r)
        for name in ("kernel", "dilation", "stride", "causal", "periodic"):
            if len(getattr(self, name)) != r:
                raise ValueError(f"{self.name}: {name} has {len(getattr(self, name))} axes, extent has {r}")
        for a in range(r):
            L, k, d, s = self.extent[a], self.kernel[a], self.dilation[a], self.stride[a]
            if not (k >= 1 and d >= 1 and k * d <= L and 1 <= s <= k):
                raise ValueError(f"{self.name}: axis {a} has extent {L}, kernel {k}, dilation {d}, stride {s}: "
                                 f"the spec needs k >= 1, d >= 1, k * d <= L, 1 <= s <= k")
            if self.causal[a] and self.periodic[a]:
                raise ValueError(f"{self.name}: axis {a} is both causal and periodic (the spec allows one)")

    @property
    def rank(self) -> int:
        return len(self.extent)

    @property
    def tokens(self) -> int:
        return math.prod(self.extent)

    @property
    def window(self) -> int:
        return math.prod(self.kernel)

    def as_dict(self) -> dict:
        return {"problem": self.name, "rank": self.rank, "extent": list(self.extent), "kernel": list(self.kernel),
                "dilation": list(self.dilation), "stride": list(self.stride), "causal": list(self.causal),
                "periodic": list(self.periodic), "batch": self.batch, "heads": self.heads, "dim": self.dim}

    def flags(self) -> List[str]:
        """This problem as nbhd-bench flags."""
        x = lambda v: "x".join(str(int(i)) for i in v)  # noqa: E731
        periodic = ["--periodic", x(self.periodic)] if any(self.periodic) else []
        return ["--extent", x(self.extent), "--kernel", x(self.kernel), "--dilation", x(self.dilation),
                "--stride", x(self.stride), "--causal", x(self.causal), *periodic, "--batch", str(self.batch),
                "--heads", str(self.heads), "--dim", str(self.dim)]


# ---- work ---------------------------------------------------------------------------

def axis_window(L: int, k: int, d: int, s: int, causal: bool, i: int, periodic: bool = False) -> Tuple[int, int, int]:
    """(dilation group, first, last index inside the group) of query i's window on one
    axis, straight from the spec's steps 1-4 (3' on a periodic axis: centered on the
    leader and unwrapped, so first may be below 0 and last past the group; an entry w
    stands for w mod the group length)."""
    g = i % d
    _, first, last = axis_windows(L, k, s, d, causal, periodic, [i])  # token indices (nbhd/_window.py)
    return g, int(first[0] - g) // d, int(last[0] - g) // d


def axis_pairs(L: int, k: int, d: int, s: int, causal: bool, periodic: bool = False) -> int:
    """Keys summed over the queries of one axis."""
    total = 0
    for i in range(L):
        _, first, last = axis_window(L, k, d, s, causal, i, periodic)
        total += last - first + 1
    return total


@functools.lru_cache(maxsize=4096)
def pairs(p: Problem) -> int:
    """Attended (query, key) token pairs of one (batch, head): a token's neighbors are
    the product of its per-axis windows, so the sum over the grid factors by axis."""
    return math.prod(axis_pairs(*args)
                     for args in zip(p.extent, p.kernel, p.dilation, p.stride, p.causal, p.periodic))


def sdpa_is_causal(p: Problem) -> bool:
    """Self attention, the peer, is causal where a user would make it causal: a causal
    1-D sequence. Multi-axis problems compare with full attention."""
    return p.rank == 1 and p.causal[0]


def sa_pairs(p: Problem) -> int:
    """Pairs that self attention over all tokens computes (causal: the lower triangle)."""
    n = p.tokens
    return n * (n + 1) // 2 if sdpa_is_causal(p) else n * n


def forward_flops(p: Problem) -> float:
    """4 * B * H * pairs * D: the two matrix products over attended pairs only."""
    return 4.0 * p.batch * p.heads * pairs(p) * p.dim


def flops(p: Problem, pass_: str) -> float:
    return PASS_FLOPS[pass_] * forward_flops(p)


def sa_flops(p: Problem, pass_: str) -> float:
    return PASS_FLOPS[pass_] * 4.0 * p.batch * p.heads * sa_pairs(p) * p.dim


def bytes_moved(p: Problem, pass_: str, dtype: str) -> float:
    """Bytes a pass must move at least, as nbhd-bench counts them: the forward reads
    q, k, v and writes out and lse (float32); the backward reads q, k, v, out, d_out,
    lse and writes dq, dk, dv."""
    e = DTYPE_BYTES[dtype]
    n = p.batch * p.tokens * p.heads * p.dim  # elements of each of q, k, v, out
    lse = p.batch * p.tokens * p.heads * 4.0
    forward = e * 4 * n + lse
    backward = e * 8 * n + lse
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[pass_]


# ---- names --------------------------------------------------------------------------

def _axes(v: Sequence) -> str:
    return "x".join(str(int(i)) for i in v)


def describe(p: Problem) -> str:
    """'2-D 56x56 k7x7 d2x2 s1x1 causal 1x0, 64x4 heads, d32'."""
    parts = [f"{p.rank}-D {_axes(p.extent)} k{_axes(p.kernel)}"]
    if any(d > 1 for d in p.dilation):
        parts.append(f"dil {_axes(p.dilation)}")
    if any(s > 1 for s in p.stride):
        parts.append(f"stride {_axes(p.stride)}")
    if any(p.causal):
        parts.append(f"causal {_axes(p.causal)}")
    return " ".join(parts) + f", {p.batch}x{p.heads} heads, d{p.dim}"


def auto_name(p: Problem, prefix: str = "") -> str:
    """A name from the parameters: '2d-56x56-k7-d2-s1x2-causal10-b4h8d64'."""
    def axes(tag, v, skip):
        if all(x == skip for x in v):
            return ""
        return f"-{tag}{v[0]}" if len(set(v)) == 1 else f"-{tag}{_axes(v)}"
    name = f"{prefix}{p.rank}d-{_axes(p.extent)}" + axes("k", p.kernel, None) + axes("d", p.dilation, 1)
    name += axes("s", p.stride, 1)
    if any(p.causal):
        name += "-causal" + "".join(str(int(c)) for c in p.causal) if p.rank > 1 else "-causal"
    return name + f"-b{p.batch}h{p.heads}d{p.dim}"


# ---- sets ---------------------------------------------------------------------------

FWD_ONLY = ("fwd",)


def anchors() -> List[Problem]:
    """shared/anchors/README.md: every performance claim is measured on these. All head
    dim 128 except the NAT/DiNAT shapes (32); the natten-* ones (forward only) are the
    problems NATTEN publishes H100 numbers for."""
    P = Problem
    return [
        P("1d-32k-w2048", (32768,), (2048,), batch=1, heads=16, dim=128),
        P("2d-nat-56-k7", (56, 56), (7, 7), batch=64, heads=4, dim=32),
        P("2d-128-k31", (128, 128), (31, 31), batch=1, heads=24, dim=128),
        P("3d-16x48x80-k8x16x24", (16, 48, 80), (8, 16, 24), batch=1, heads=32, dim=128),
        P("1d-32k-w2048-causal", (32768,), (2048,), causal=(True,), batch=1, heads=16, dim=128),
        P("2d-dinat-56-k7-d4", (56, 56), (7, 7), dilation=(4, 4), batch=64, heads=4, dim=32),
        P("2d-128-k63", (128, 128), (63, 63), batch=1, heads=24, dim=128),
        P("3d-16x48x80-k16x24x40", (16, 48, 80), (16, 24, 40), batch=1, heads=32, dim=128),
        P("natten-1d-32k-w2048-h1", (32768,), (2048,), batch=1, heads=1, dim=128, passes=FWD_ONLY),
        P("natten-flux-256-k80", (256, 256), (80, 80), batch=1, heads=24, dim=128, passes=FWD_ONLY),
        P("natten-flux-256-k80-s16", (256, 256), (80, 80), stride=(16, 16), batch=1, heads=24, dim=128,
          passes=FWD_ONLY),
        P("natten-hunyuan-k18x24x24", (30, 48, 80), (18, 24, 24), batch=1, heads=24, dim=128, passes=FWD_ONLY),
        P("natten-hunyuan-k18x24x24-s16x8x8", (30, 48, 80), (18, 24, 24), stride=(16, 8, 8), batch=1, heads=24,
          dim=128, passes=FWD_ONLY),
    ]


# NAT / DiNAT at 224x224: the stages run at 56, 28, 14 and 7 tokens a side with a 7x7
# window and head dim 32; DiNAT's dilated layers use dilation 8, 4, 2 (extent / kernel,
# rounded down) in stages 1-3. Heads per stage of the variants (NAT and DiNAT papers).
NAT_HEADS = {"mini": (2, 4, 8, 16), "tiny": (2, 4, 8, 16), "small": (3, 6, 12, 24), "base": (4, 8, 16, 32)}
NAT_STAGES = (56, 28, 14, 7)
DINAT_DILATION = (8, 4, 2, 1)


def models(batch: int = 128) -> List[Problem]:
    """Attention shapes of models: NAT/DiNAT stages (forward and forward+backward, batch
    128 as the paper's Table 5), and the video and image generators of GNA (forward, batch
    1, head dim 128): HunyuanVideo 30x48x80 tokens and 24 heads, Cosmos-7B 16x44x80 and
    32 heads (heads assumed from its 4096-wide, d128 blocks), FLUX.1 at 4K, 256x256 and 24 heads."""
    out = []
    for variant in ("tiny",):  # the other variants differ in heads only
        for stage, (side, heads) in enumerate(zip(NAT_STAGES, NAT_HEADS[variant])):
            out.append(Problem(f"nat-{variant}-s{stage + 1}-{side}-k7", (side, side), (7, 7), batch=batch,
                               heads=heads, dim=32))
            d = DINAT_DILATION[stage]
            if d > 1:
                out.append(Problem(f"dinat-{variant}-s{stage + 1}-{side}-k7-d{d}", (side, side), (7, 7),
                                   dilation=(d, d), batch=batch, heads=heads, dim=32))
    video = [
        ("hunyuan-k18x24x24", (30, 48, 80), (18, 24, 24), (1, 1, 1), 24),
        ("hunyuan-k30x40x40", (30, 48, 80), (30, 40, 40), (1, 1, 1), 24),
        ("hunyuan-k18x24x24-s16x8x8", (30, 48, 80), (18, 24, 24), (16, 8, 8), 24),
        ("hunyuan-k30x40x40-s1x32x8", (30, 48, 80), (30, 40, 40), (1, 32, 8), 24),
        ("cosmos-k16x32x48", (16, 44, 80), (16, 32, 48), (1, 1, 1), 32),
        ("cosmos-k16x24x16", (16, 44, 80), (16, 24, 16), (1, 1, 1), 32),
        ("cosmos-k16x32x48-s1x8x16", (16, 44, 80), (16, 32, 48), (1, 8, 16), 32),
        ("flux4k-k80", (256, 256), (80, 80), (1, 1), 24),
        ("flux4k-k80-s16", (256, 256), (80, 80), (16, 16), 24),
    ]
    for name, extent, kernel, stride, heads in video:
        out.append(Problem(name, extent, kernel, stride=stride, batch=1, heads=heads, dim=128, passes=FWD_ONLY))
    return out


# The paper's sweep ("Faster Neighborhood Attention", section 4) is not published, only
# its spirit: a fixed set of sizes swept over windows and dilations, 1-D/2-D/3-D. These
# are the choices it is sampled from.
PAPER_RANK_WEIGHTS = {1: 0.35, 2: 0.4, 3: 0.25}    # the paper ran 6150 / 5676 / 2448 problems
PAPER_EXTENTS = {
    1: (256, 384, 500, 1024, 2048, 3000, 4096, 8192, 16384, 32768),
    2: (14, 16, 24, 28, 32, 40, 48, 56, 64, 96, 100, 128, 160, 256),
    3: (4, 8, 10, 12, 16, 20, 24, 30, 32, 40, 48, 64),
}
PAPER_DIMS = (32, 64, 128)
PAPER_HEADS = (1, 2, 4, 8, 16)
# Size of one problem: batch * heads * tokens between these, and the naive backend's
# attention weights (4 bytes * B * H * tokens * window) at most this.
PAPER_ROWS = (1 << 15, 1 << 21)
PAPER_MAX_WEIGHT_BYTES = 4 << 30
# And self attention over all its tokens (the peers) at most this many forward FLOPs:
# about 7 ms at cuDNN's fp16 rate, a second for fp32 on CUDA cores.
PAPER_MAX_SA_FLOPS = 4e12


def _kernel_for(rng: random.Random, L: int, small: bool) -> int:
    """A window size in [3, L] (or [1, L] for short axes), log-uniform, odd 85% of the
    time as in most models; `small` keeps it <= 15 (NAT-like windows)."""
    lo, hi = min(3, L), (min(L, 15) if small else L)
    k = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi + 0.999)))))
    k = max(lo, min(hi, k))
    if k % 2 == 0 and rng.random() < 0.85:
        k = k - 1 if k - 1 >= lo else k + 1 if k + 1 <= hi else k
    return k


def paper_problem(index: int, seed: int = 0) -> Problem:
    """Problem `index` of the paper-style sweep. Each index has its own generator seeded
    from (seed, index), so the first N problems do not change with the set's size."""
    rng = random.Random(f"nbhd-paper-{seed}-{index}")
    while True:
        rank = rng.choices(list(PAPER_RANK_WEIGHTS), weights=list(PAPER_RANK_WEIGHTS.values()))[0]
        if rank > 1 and rng.random() < 0.6:  # square or cubic grids most of the time
            extent = (rng.choice(PAPER_EXTENTS[rank]),) * rank
        else:
            extent = tuple(rng.choice(PAPER_EXTENTS[rank]) for _ in range(rank))
        small = rng.random() < 0.4
        if rng.random() < 0.6:  # the same window on every axis (capped by the shortest)
            kernel = (_kernel_for(rng, min(extent), small),) * rank
        else:
            kernel = tuple(_kernel_for(rng, L, small) for L in extent)
        dilation = tuple(1 for _ in extent)
        if rng.random() < 0.35:
            dilation = tuple(rng.randint(1, L // k) if L // k >= 2 else 1 for L, k in zip(extent, kernel))
        causal = tuple(False for _ in extent)
        if rng.random() < 0.2:  # causal sequences; causal time axis of a video
            causal = (True,) + causal[1:]
        stride = tuple(1 for _ in extent)
        if rng.random() < 0.1:
            stride = tuple(rng.randint(1, k) for k in kernel)
        dim = rng.choice(PAPER_DIMS)
        tokens = math.prod(extent)
        heads = rng.choice(PAPER_HEADS)
        rows = math.exp(rng.uniform(math.log(PAPER_ROWS[0]), math.log(PAPER_ROWS[1])))
        batch = 1 << max(0, min(6, round(math.log2(max(rows / (heads * tokens), 1)))))  # 1 to 64
        if batch * heads * tokens < PAPER_ROWS[0] // 4 or batch * heads * tokens > PAPER_ROWS[1]:
            continue
        if 4 * batch * heads * tokens * math.prod(kernel) > PAPER_MAX_WEIGHT_BYTES:
            continue
        if 4.0 * batch * heads * tokens * tokens * dim > PAPER_MAX_SA_FLOPS:
            continue
        p = Problem("", extent, kernel, dilation=dilation, stride=stride, causal=causal, batch=batch,
                    heads=heads, dim=dim)
        return replace(p, name=auto_name(p, prefix=f"p{index:03d}-"))


def paper(count: int = 300, seed: int = 0) -> List[Problem]:
    """`count` problems in the spirit of the paper's sweep (1-D/2-D/3-D, batch, heads,
    head dims 32/64/128, windows from 3 to the extent, dilations, causal, a few strides),
    reproducible from `seed`."""
    return [paper_problem(i, seed) for i in range(count)]


def tiny() -> List[Problem]:
    """A few small problems of every rank, for a CPU run of the whole suite (CI)."""
    P = Problem
    return [
        P("tiny-1d-64-k7", (64,), (7,), heads=2, dim=16),
        P("tiny-1d-64-k8-d2-causal", (64,), (8,), dilation=(2,), causal=(True,), heads=2, dim=16),
        P("tiny-2d-16x16-k5x3-d2x1-s1x2", (16, 16), (5, 3), dilation=(2, 1), stride=(1, 2), heads=2, dim=16),
        P("tiny-3d-4x8x8-k3", (4, 8, 8), (3, 3, 3), causal=(True, False, False), dim=16, passes=FWD_ONLY),
        P("tiny-2d-16x24-k5-periodic01", (16, 24), (5, 5), periodic=(False, True), heads=2, dim=16),
    ]


def periodic_set() -> List[Problem]:
    """What a periodic axis costs (issue 23's budget: at most 5% on the fused backend):
    the 2-D anchors and a 1-degree latitude-longitude grid, each plain and with its
    second axis periodic, the twins side by side."""
    P = Problem
    plain = [
        P("2d-128-k31", (128, 128), (31, 31), batch=1, heads=24, dim=128),
        P("2d-128-k63", (128, 128), (63, 63), batch=1, heads=24, dim=128),
        P("2d-nat-56-k7", (56, 56), (7, 7), batch=64, heads=4, dim=32),
        P("2d-dinat-56-k7-d4", (56, 56), (7, 7), dilation=(4, 4), batch=64, heads=4, dim=32),
        P("latlon-181x360-k13", (181, 360), (13, 13), batch=1, heads=16, dim=64),
    ]
    out = []
    for p in plain:
        out += [p, replace(p, name=p.name + "-periodic01", periodic=(False, True))]
    return out


SETS = ("anchors", "paper", "models", "periodic")


def problem_set(name: str, paper_count: int = 300, seed: int = 0) -> List[Problem]:
    if name == "anchors":
        return anchors()
    if name == "paper":
        return paper(paper_count, seed)
    if name == "models":
        return models()
    if name == "periodic":
        return periodic_set()
    if name == "tiny":
        return tiny()
    raise ValueError(f"unknown problem set '{name}' (sets: {', '.join(SETS + ('tiny',))})")


def select(problems: Sequence[Problem], only: Sequence[str] = (), limit: Optional[int] = None,
           match: str = "") -> List[Problem]:
    """Problems named in `only` (all when empty), containing `match`, the first `limit`."""
    chosen = [p for p in problems if (not only or p.name in only) and match in p.name]
    return chosen[:limit] if limit is not None else chosen
