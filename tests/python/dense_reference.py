# SPDX-License-Identifier: Apache-2.0
"""An independent reference for the tests: the spec's neighborhood written out again
from its text (shared/spec/semantics.md), as dense boolean masks over all token pairs,
and attention computed densely in float64 with numpy. Nothing here comes from the
library, so a bug in its window code cannot hide behind shared code."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np


def axis_windows(length: int, kernel: int, dilation: int, stride: int, causal: bool, periodic: bool = False):
    """Per query index i: (group g, first and last key group index of its window). On a
    periodic axis the window is centered on the leader and unwrapped: first may be
    below 0 and last past the group, each entry standing for itself modulo the group
    length (spec, step 3')."""
    rows = []
    for i in range(length):
        g, j = i % dilation, i // dilation
        group_len = math.ceil((length - g) / dilation)
        if periodic:
            leader = min(j // stride * stride + stride // 2, group_len - 1)
            first = leader - kernel // 2
            last = first + kernel - 1
        elif causal:
            leader = min(j // stride * stride + stride - 1, group_len - 1)
            first, last = max(leader - kernel + 1, 0), j
        else:
            leader = min(j // stride * stride + stride // 2, group_len - 1)
            first = min(max(leader - kernel // 2, 0), group_len - kernel)
            last = first + kernel - 1
        rows.append((g, first, last))
    return rows


def axis_entries(length, kernel, dilation, stride, causal, periodic=False) -> np.ndarray:
    """entry[i, i2]: the (unwrapped) window entry through which query i sees key i2 on
    this axis, or a value below -length when key i2 is not its neighbor."""
    entry = np.full((length, length), -10 * length - 10)
    for i, (g, first, last) in enumerate(axis_windows(length, kernel, dilation, stride, causal, periodic)):
        group_len = math.ceil((length - g) / dilation)
        for w in range(first, last + 1):
            j2 = w % group_len if periodic else w
            entry[i, g + dilation * j2] = w
    return entry


def axis_mask(length, kernel, dilation, stride, causal, periodic=False) -> np.ndarray:
    """mask[i, i2]: key i2 is a neighbor of query i on this axis."""
    return axis_entries(length, kernel, dilation, stride, causal, periodic) >= -length


@dataclass
class Case:
    """One problem: the window per axis and the tensor sizes."""

    extent: Tuple[int, ...]
    kernel: Tuple[int, ...]
    dilation: Tuple[int, ...]
    stride: Tuple[int, ...]
    causal: Tuple[bool, ...]
    periodic: Tuple[bool, ...] = ()  # () : no periodic axis
    batch: int = 1
    heads: int = 1
    kv_heads: int = 1
    dim: int = 4
    dim_v: int = 4
    additional: int = 0
    rpb: bool = False
    scale: Optional[float] = None
    seed: int = 0
    label: str = field(default="", compare=False)

    @property
    def rank(self):
        return len(self.extent)

    @property
    def wraps(self) -> Tuple[bool, ...]:
        return self.periodic or (False,) * self.rank

    def window_kwargs(self):
        kwargs = dict(kernel_size=self.kernel, stride=self.stride, dilation=self.dilation, is_causal=self.causal)
        if any(self.wraps):
            kwargs["periodic"] = self.wraps
        return kwargs

    def __str__(self):
        return (f"ext={self.extent} k={self.kernel} d={self.dilation} s={self.stride} c={self.causal} "
                f"w={self.wraps} "
                f"B={self.batch} H={self.heads}/{self.kv_heads} D={self.dim}/{self.dim_v} M={self.additional} "
                f"rpb={self.rpb}")

    def arrays(self, dtype=np.float64):
        """Seeded random q, k, v, rpb, additional keys/values (None where absent)."""
        rng = np.random.default_rng(self.seed)
        B, X, H, Hkv, D, Dv, M = (self.batch, self.extent, self.heads, self.kv_heads, self.dim, self.dim_v,
                                  self.additional)
        q = rng.standard_normal((B, *X, H, D))
        k = rng.standard_normal((B, *X, Hkv, D))
        v = rng.standard_normal((B, *X, Hkv, Dv))
        rpb = rng.standard_normal((H, *(2 * x - 1 for x in self.kernel))) if self.rpb else None
        ak = rng.standard_normal((B, M, Hkv, D)) if M else None
        av = rng.standard_normal((B, M, Hkv, Dv)) if M else None
        return tuple(None if a is None else a.astype(dtype) for a in (q, k, v, rpb, ak, av))


def random_case(seed: int, rank: Optional[int] = None, periodic: bool = False) -> Case:
    """A valid problem drawn from seed: extents that are multiples of nothing in
    particular, any kernel, dilation (groups of unequal length) and stride the
    spec allows, causal per axis, GQA, Dv != D, additional tokens, rpb; with
    periodic=True, at least one periodic axis (and the causal ones elsewhere)."""
    rng = np.random.default_rng(1000 + seed)
    rank = rank or int(rng.integers(1, 4))
    max_extent = {1: 13, 2: 7, 3: 5}[rank]
    extent, kernel, dilation, stride, causal = [], [], [], [], []
    for _ in range(rank):
        L = int(rng.integers(1, max_extent + 1))
        k = int(rng.integers(1, L + 1))
        d = int(rng.integers(1, L // k + 1))
        extent.append(L)
        kernel.append(k)
        dilation.append(d)
        stride.append(int(rng.integers(1, k + 1)))
        causal.append(bool(rng.random() < 0.4))
    wraps = ()
    if periodic:
        wraps = [bool(rng.random() < 0.5) for _ in range(rank)]
        wraps[int(rng.integers(0, rank))] = True
        causal = [c and not w for c, w in zip(causal, wraps)]
        wraps = tuple(wraps)
    kv_heads = int(rng.integers(1, 3))
    dim = int(rng.integers(1, 7))
    return Case(tuple(extent), tuple(kernel), tuple(dilation), tuple(stride), tuple(causal), wraps,
                batch=int(rng.integers(1, 3)), heads=kv_heads * int(rng.integers(1, 3)), kv_heads=kv_heads,
                dim=dim, dim_v=dim if rng.random() < 0.5 else int(rng.integers(1, 7)),
                additional=int(rng.choice([0, 0, 1, 3])), rpb=bool(rng.random() < 0.5),
                scale=None if rng.random() < 0.7 else float(rng.uniform(0.1, 1.0)), seed=seed)


def _grid(case: Case):
    """coords [rank, N] of the flattened tokens (row-major), and per axis the mask,
    the rpb index and the window slot of every (query, key) pair."""
    coords = np.indices(case.extent).reshape(case.rank, -1)
    mask = True
    deltas, slots = [], []
    for a in range(case.rank):
        L, k, d, s, c, w = (case.extent[a], case.kernel[a], case.dilation[a], case.stride[a], case.causal[a],
                            case.wraps[a])
        entry = axis_entries(L, k, d, s, c, w)
        m = entry >= -L
        jq = np.arange(L)[:, None] // d
        first = np.array([row[1] for row in axis_windows(L, k, d, s, c, w)])[:, None]
        i, i2 = coords[a][:, None], coords[a][None, :]
        mask = mask & m[i, i2]
        deltas.append(np.where(m, entry - jq + k - 1, 0)[i, i2])  # spec: the unwrapped position counts
        slots.append(np.where(m, entry - first, 0)[i, i2])
    return coords, mask, deltas, slots


def scores(case: Case, q, k, rpb=None, ak=None):
    """Dense scores [B, H, N, N + M] with -inf off the neighborhood, and the mask [N, N]."""
    B, H, N = case.batch, case.heads, math.prod(case.extent)
    group = case.heads // case.kv_heads
    scale = case.scale if case.scale is not None else 1 / math.sqrt(case.dim)
    _, mask, deltas, _ = _grid(case)
    qf = q.reshape(B, N, H, case.dim).astype(np.float64)
    kf = np.repeat(k.reshape(B, N, case.kv_heads, case.dim).astype(np.float64), group, axis=2)
    s = scale * np.einsum("bthd,buhd->bhtu", qf, kf)
    if rpb is not None:
        s = s + rpb.astype(np.float64)[(slice(None), *deltas)]
    s = np.where(mask, s, -np.inf)
    if case.additional:
        akf = np.repeat(ak.astype(np.float64), group, axis=2)
        s = np.concatenate([s, scale * np.einsum("bthd,bmhd->bhtm", qf, akf)], axis=-1)
    return s, mask


def attention(case: Case, q, k, v, rpb=None, ak=None, av=None):
    """(out [B, X..., H, Dv], lse [B, X..., H]) in float64."""
    B, H, N, Dv = case.batch, case.heads, math.prod(case.extent), case.dim_v
    group = case.heads // case.kv_heads
    s, _ = scores(case, q, k, rpb, ak)
    top = s.max(axis=-1, keepdims=True)
    lse = (top + np.log(np.exp(s - top).sum(axis=-1, keepdims=True)))[..., 0]
    p = np.exp(s - lse[..., None])
    vf = np.repeat(v.reshape(B, N, case.kv_heads, Dv).astype(np.float64), group, axis=2)
    if case.additional:
        vf = np.concatenate([vf, np.repeat(av.astype(np.float64), group, axis=2)], axis=1)
    out = np.einsum("bhtu,buhd->bthd", p, vf)
    return out.reshape(B, *case.extent, H, Dv), lse.transpose(0, 2, 1).reshape(B, *case.extent, H)


def window_weights(case: Case, q, k, rpb=None, ak=None):
    """The unfused qk result in the library's layout [B, X..., H, prod(kernel) + M]:
    each neighbor's score at its window slot, -inf in slots no key fills."""
    B, H, N = case.batch, case.heads, math.prod(case.extent)
    W = math.prod(case.kernel)
    s, mask = scores(case, q, k, rpb, ak)
    _, _, _, slots = _grid(case)
    slot = np.ravel_multi_index(tuple(slots), case.kernel) if case.rank else np.zeros_like(mask, int)
    attn = np.full((B, H, N, W + case.additional), -np.inf)
    t_idx, u_idx = np.nonzero(mask)
    attn[:, :, t_idx, slot[t_idx, u_idx]] = s[:, :, t_idx, u_idx]
    attn[..., W:] = s[..., N:]
    return attn.transpose(0, 2, 1, 3).reshape(B, *case.extent, H, W + case.additional)


# Fixed cases that name what they cover; the random sweep adds to them.
NAMED_CASES = [
    Case((13,), (5,), (2,), (1,), (False,), label="1d dilation 2 on 13: groups of 7 and 6"),
    Case((11,), (4,), (1,), (4,), (False,), label="1d blocked: stride == kernel, even kernel"),
    Case((12,), (3,), (3,), (2,), (True,), label="1d causal, dilation 3, stride 2"),
    Case((9,), (9,), (1,), (1,), (False,), label="1d kernel == extent: self attention"),
    Case((7, 9), (3, 5), (2, 1), (1, 3), (False, True), heads=4, kv_heads=2, dim=5, dim_v=3, rpb=True,
         label="2d GQA, Dv != D, rpb, mixed causal"),
    Case((6, 5), (3, 3), (1, 1), (2, 2), (True, True), batch=2, additional=3, dim=3, dim_v=2,
         label="2d causal both axes, stride 2, additional tokens"),
    Case((5, 4, 6), (3, 2, 3), (1, 2, 2), (1, 1, 3), (False, True, False), heads=2, rpb=True, additional=2,
         label="3d all features"),
    Case((1, 3), (1, 2), (1, 1), (1, 2), (False, False), label="2d extent 1 axis"),
]
