# SPDX-License-Identifier: Apache-2.0
"""Neighborhood masks for FlexAttention, token orders, and the dense reference that
checks them. Written from shared/spec/semantics.md.

    axis_tables(L, k, d, s, causal)    per-axis [lo, hi] key ranges (vectorised, numpy)
    axis_intervals(..., periodic)      the same as one or two ranges (a periodic window wraps)
    plain_layout / tiled_layout / pick_tile    token orders; tiled = 128-token spatial tiles
    FlexMask(problem, layout, device)  mask_mod over layout positions, and its BlockMask
    dense_mask(problem)                independent dense mask (scalar spec steps, Kronecker)
    neighbor_tokens / reference_rows   the exact output of sampled queries, to check results

The mask_mod reads small per-token tables instead of doing coordinate arithmetic: a key
at coordinate x of an axis gets the code `(x mod d) * L + x div d` (its dilation group,
then its index in the group), a query the code range [lo, hi] of its window in the same
numbering, so a key is a neighbor on the axis iff lo <= code <= hi. The same mask_mod
code then serves every problem of a rank (no recompilation per window), and plain and
tiled orders differ only in the tables' order."""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product
from typing import List, Optional, Sequence, Tuple

import numpy as np

from nbhd._window import axis_windows
from problems import Problem, axis_window

BLOCK = 128  # FlexAttention's default sparse block: 128 queries x 128 keys
PARTIAL_BLOCK_COST = 1.2  # a block whose pairs are masked one by one, against a full one


# ---- one axis ------------------------------------------------------------------------

def axis_tables(L: int, k: int, d: int, s: int, causal: bool) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lo, hi, code), each int64 of length L: query i's neighbors on this axis are the
    keys whose code lies in [lo[i], hi[i]]; code[x] = (x mod d) * L + x div d."""
    i = np.arange(L, dtype=np.int64)
    g, j = i % d, i // d
    _, first, last = axis_windows(L, k, s, d, causal, False, i)  # token indices
    return g * L + (first - g) // d, g * L + (last - g) // d, g * L + j


def axis_intervals(L: int, k: int, d: int, s: int, causal: bool, periodic: bool = False):
    """([(lo, hi), ...], code): query i's neighbors on this axis are the keys whose code
    lies in one of its [lo[i], hi[i]] ranges. One range, or on a periodic axis two:
    the window's part inside [0, group length) and the part it wraps to at the other
    end (empty, lo > hi, for windows that do not wrap)."""
    if not periodic:
        lo, hi, code = axis_tables(L, k, d, s, causal)
        return [(lo, hi)], code
    i = np.arange(L, dtype=np.int64)
    g, j = i % d, i // d
    group_len = (L - g + d - 1) // d
    leader = np.minimum(j // s * s + s // 2, group_len - 1)
    first = leader - k // 2
    last = first + k - 1
    inside = (g * L + np.maximum(first, 0), g * L + np.minimum(last, group_len - 1))
    # The wrapped part: [group_len + first, group_len - 1] below 0, [0, last - group_len] past the end.
    w_lo = np.where(first < 0, group_len + first, np.where(last >= group_len, 0, 1))
    w_hi = np.where(first < 0, group_len - 1, np.where(last >= group_len, last - group_len, 0))
    return [inside, (g * L + w_lo, g * L + w_hi)], g * L + j


def axis_is_trivial(L: int, k: int, d: int, causal: bool) -> bool:
    """Every key is every query's neighbor on this axis (full attention along it)."""
    return k == L and d == 1 and not causal


# ---- token orders ---------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """A token order: order[pos] is the row-major index of the token at position pos.
    `tile` (tiled orders) is the tile per axis, in the axis's regrouped numbering when
    `regroup[a]` (dilation groups made contiguous first: x -> (x mod d) * L/d + x div d)."""

    name: str
    order: np.ndarray
    tile: Optional[Tuple[int, ...]] = None
    regroup: Tuple[bool, ...] = ()

    def describe(self) -> str:
        if self.tile is None:
            return self.name
        grouped = [a for a, r in enumerate(self.regroup) if r]
        return f"{self.name} {'x'.join(map(str, self.tile))}" + (
            f" (dilation groups contiguous on axes {grouped})" if grouped else "")


def plain_layout(p: Problem) -> Layout:
    return Layout("plain", np.arange(p.tokens, dtype=np.int64))


def _regroups(p: Problem) -> Tuple[bool, ...]:
    return tuple(d > 1 and L % d == 0 for L, d in zip(p.extent, p.dilation))


def _axis_position(x: np.ndarray, L: int, d: int, regroup: bool) -> np.ndarray:
    return (x % d) * (L // d) + x // d if regroup else x


def tiled_layout(p: Problem, tile: Sequence[int]) -> Layout:
    """Tokens grouped into tiles of `tile` (row-major over tiles, then inside a tile),
    so that each 128-token block is one compact tile of the (regrouped) grid."""
    tile = tuple(int(t) for t in tile)
    regroup = _regroups(p)
    coords = np.indices(p.extent, dtype=np.int64).reshape(p.rank, -1)  # row-major tokens
    tile_key = np.zeros(p.tokens, dtype=np.int64)
    inner_key = np.zeros(p.tokens, dtype=np.int64)
    for a in range(p.rank):
        L, T = p.extent[a], tile[a]
        if L % T:
            raise ValueError(f"tile {tile} does not divide the grid {p.extent} on axis {a}")
        x = _axis_position(coords[a], L, p.dilation[a], regroup[a])
        tile_key = tile_key * (L // T) + x // T
        inner_key = inner_key * T + x % T
    order = np.argsort(tile_key * math.prod(tile) + inner_key, kind="stable")
    return Layout("tiled", order, tile, regroup)


def _axis_block_relation(L: int, k: int, d: int, s: int, causal: bool, T: int, regroup: bool,
                         periodic: bool = False):
    """(any, full) [L/T, L/T]: whether some / every (query, key) pair of a query tile and
    a key tile (of T positions along this axis) are neighbors."""
    i = np.arange(L, dtype=np.int64)
    a = np.arange(0, L, T, dtype=np.int64)[None, :]
    inside = np.zeros((L, a.shape[1]), dtype=np.int64)  # [query, key tile]: neighbors in the tile
    intervals, _ = axis_intervals(L, k, d, s, causal, periodic)
    for lo, hi in intervals:  # disjoint ranges: their counts add
        g, first, last = lo // L, lo % L, hi % L
        if regroup:  # neighbors at positions g*L/d + [first, last]: contiguous
            start, step = g * (L // d) + first, np.ones_like(i)
        else:        # neighbors at g + d*[first, last]: every d-th position
            start, step = g + d * first, np.full_like(i, d)
        count = np.where(hi >= lo, last - first + 1, 0)
        m_lo = np.maximum(-((start[:, None] - a) // step[:, None]), 0)      # ceil((a - start) / step)
        m_hi = np.minimum((a + T - 1 - start[:, None]) // step[:, None], count[:, None] - 1)
        inside += np.maximum(m_hi - m_lo + 1, 0)
    qtile = _axis_position(i, L, d, regroup) // T
    nt = L // T
    any_ = np.zeros((nt, nt), dtype=bool)
    full = np.ones((nt, nt), dtype=bool)
    np.logical_or.at(any_, qtile, inside > 0)
    np.logical_and.at(full, qtile, inside == T)
    return any_, full


def tile_blocks(p: Problem, tile: Sequence[int]) -> Tuple[int, int, int]:
    """(non-empty, full, total) 128x128 blocks of the tiled order with `tile`, exactly:
    a block is a product of per-axis tiles and the mask a product of per-axis relations,
    so a block is non-empty (full) iff it is on every axis."""
    nonempty = full = total = 1
    for a, regroup in enumerate(_regroups(p)):
        any_, all_ = _axis_block_relation(p.extent[a], p.kernel[a], p.dilation[a], p.stride[a], p.causal[a],
                                          tile[a], regroup, p.periodic[a])
        nonempty *= int(any_.sum())
        full *= int(all_.sum())
        total *= any_.size
    return nonempty, full, total


def tile_candidates(p: Problem, volume: int = BLOCK) -> List[Tuple[int, ...]]:
    """Tiles of `volume` tokens (powers of two per axis) that divide the (regrouped) grid."""
    sides = [2 ** e for e in range(int(math.log2(volume)) + 1)]
    out = []
    for tile in product(sides, repeat=p.rank):
        if math.prod(tile) != volume:
            continue
        if all(L % T == 0 for L, T in zip(p.extent, tile)):
            out.append(tile)
    return out


def pick_tile(p: Problem) -> Tuple[Optional[Tuple[int, ...]], str]:
    """The 128-token tile of the least estimated cost, or (None, why there is none).
    Cost: full blocks + 1.2 x partial ones (FlexAttention's blog: masking every element
    costs 15-20%). p.tile, when set, is taken as it is."""
    if p.rank == 1 and not any(_regroups(p)):
        return None, "a 1-D grid is already in tiles of 128 consecutive tokens (same as plain)"
    if p.tile is not None:
        return tuple(p.tile), "given"
    candidates = tile_candidates(p)
    if not candidates:
        return None, f"no tile of {BLOCK} tokens (powers of two per axis) divides the grid {'x'.join(map(str, p.extent))}"
    scored = []
    for tile in candidates:
        nonempty, full, total = tile_blocks(p, tile)
        scored.append((full + PARTIAL_BLOCK_COST * (nonempty - full), tile))
    return min(scored)[1], f"least block cost of {len(candidates)} tiles"


# ---- the mask for FlexAttention ------------------------------------------------------------

class FlexMask:
    """The neighborhood of `p` over the positions of `layout`, on `device`: a mask_mod
    for flex_attention and its BlockMask. Tables are padded past the last block with
    ranges that match nothing, so a kernel that evaluates padded positions stays in
    bounds."""

    def __init__(self, p: Problem, layout: Layout, device="cpu"):
        import torch

        self.problem, self.layout, self.n = p, layout, p.tokens
        blocks = -(-self.n // BLOCK)
        self.padded = (blocks + 1) * BLOCK
        coords = np.unravel_index(layout.order, p.extent)
        # Per axis: lo and hi tables of each range (two on a periodic axis), and the codes.
        self.lo, self.hi, self.code = [], [], []
        axes = [a for a in range(p.rank) if not axis_is_trivial(p.extent[a], p.kernel[a], p.dilation[a],
                                                                p.causal[a])]
        pad = self.padded - self.n
        as_table = lambda t: torch.as_tensor(t, dtype=torch.int32, device=device)  # noqa: E731
        for a in axes or [0]:  # axes where every key passes are left out (one kept if all are)
            intervals, code = axis_intervals(p.extent[a], p.kernel[a], p.dilation[a], p.stride[a], p.causal[a],
                                             p.periodic[a])
            # Padded queries: empty ranges; padded keys: a code no range holds.
            self.lo.append([as_table(np.concatenate([lo[coords[a]], np.full(pad, 1)])) for lo, _ in intervals])
            self.hi.append([as_table(np.concatenate([hi[coords[a]], np.full(pad, 0)])) for _, hi in intervals])
            self.code.append(as_table(np.concatenate([code[coords[a]], np.full(pad, -1)])))
        self.device = self.code[0].device
        self.mask_mod = _make_mask_mod(self.lo, self.hi, self.code)
        self.density = None

    def evaluate(self, q_pos, kv_pos):
        """The mask at (broadcast) position tensors, as the kernel sees it."""
        return self.mask_mod(None, None, q_pos, kv_pos)

    def block_mask(self, chunk_elements: int = 1 << 26):
        """The BlockMask of 128x128 blocks: which blocks hold some pairs (partial) or only
        pairs (full, where the kernel skips mask_mod), from the tables in chunks of query
        blocks (no N x N tensor)."""
        import torch
        from torch.nn.attention.flex_attention import BlockMask

        device = self.device
        blocks = -(-self.n // BLOCK)
        cols = blocks * BLOCK
        keys = torch.arange(cols, device=device)
        per_chunk = max(1, chunk_elements // (BLOCK * cols))
        any_rows, all_rows = [], []
        for b0 in range(0, blocks, per_chunk):
            b1 = min(blocks, b0 + per_chunk)
            rows = torch.arange(b0 * BLOCK, b1 * BLOCK, device=device)
            m = self.evaluate(rows[:, None], keys[None, :]).view(b1 - b0, BLOCK, blocks, BLOCK)
            any_rows.append(m.any(dim=3).any(dim=1))
            all_rows.append(m.all(dim=3).all(dim=1))
        any_b, all_b = torch.cat(any_rows), torch.cat(all_rows)
        partial = any_b & ~all_b
        self.blocks_any, self.blocks_all = any_b, all_b
        self.density = int(any_b.sum()) / any_b.numel()
        self.full_fraction = int(all_b.sum()) / all_b.numel()

        def packed(m):  # (count, indices of the set blocks first) per query block
            num = m.sum(dim=-1, dtype=torch.int32)
            idx = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
            return num[None, None], idx[None, None]

        kv_num, kv_idx = packed(partial)
        full_num, full_idx = packed(all_b)
        return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK,
                                        mask_mod=self.mask_mod, seq_lengths=(self.n, self.n))


def _make_mask_mod(lo, hi, code):
    """lo[a][r], hi[a][r]: range r of axis a (one, or two on a periodic axis)."""
    def on_axis(a, q_idx, kv_idx):
        c = code[a][kv_idx]
        ok = (lo[a][0][q_idx] <= c) & (c <= hi[a][0][q_idx])
        for r in range(1, len(lo[a])):
            ok = ok | ((lo[a][r][q_idx] <= c) & (c <= hi[a][r][q_idx]))
        return ok

    def mask_mod(b, h, q_idx, kv_idx):
        ok = on_axis(0, q_idx, kv_idx)
        for a in range(1, len(lo)):
            ok = ok & on_axis(a, q_idx, kv_idx)
        return ok
    return mask_mod


# ---- the independent reference ------------------------------------------------------------

def _window_keys(L: int, k: int, d: int, s: int, causal: bool, periodic: bool, i: int) -> List[int]:
    """Query i's keys on one axis, in window order: each unwrapped entry of its window
    taken modulo the group length (spec steps 1-5)."""
    g, first, last = axis_window(L, k, d, s, causal, i, periodic)
    group_len = -(-(L - g) // d)
    return [g + d * (w % group_len) for w in range(first, last + 1)]


def axis_mask(L: int, k: int, d: int, s: int, causal: bool, periodic: bool = False) -> np.ndarray:
    """[L, L] bool: key i2 is a neighbor of query i on this axis, by the spec's steps
    (scalar code, shared with nothing above)."""
    m = np.zeros((L, L), dtype=bool)
    for i in range(L):
        m[i, _window_keys(L, k, d, s, causal, periodic, i)] = True
    return m


def dense_mask(p: Problem) -> np.ndarray:
    """[N, N] bool over row-major tokens: the Kronecker product of the axes' masks (a
    key is a neighbor iff it is on every axis). For small problems."""
    m = np.ones((1, 1), dtype=bool)
    for args in zip(p.extent, p.kernel, p.dilation, p.stride, p.causal, p.periodic):
        m = np.kron(m, axis_mask(*args)).astype(bool)
    return m


def neighbor_tokens(p: Problem, token: int) -> np.ndarray:
    """Row-major indices of the keys of query `token`, by the spec's steps."""
    coords = np.unravel_index(token, p.extent)
    per_axis = []
    for a, x in enumerate(coords):
        args = p.extent[a], p.kernel[a], p.dilation[a], p.stride[a], p.causal[a], p.periodic[a]
        per_axis.append(np.asarray(_window_keys(*args, int(x)), dtype=np.int64))
    grids = np.meshgrid(*per_axis, indexing="ij")
    return np.ravel_multi_index([g.ravel() for g in grids], p.extent)


def check_tokens(p: Problem, count: int = 16, seed: int = 0) -> np.ndarray:
    """Query tokens to check: the grid's corners (windows shifted at the borders) and a
    seeded random sample."""
    corners = [np.ravel_multi_index(c, p.extent) for c in product(*[(0, L - 1) for L in p.extent])]
    rng = np.random.default_rng(seed)
    rest = rng.integers(0, p.tokens, size=max(0, count - len(corners)))
    return np.unique(np.concatenate([np.asarray(corners, dtype=np.int64), rest]))


def reference_rows(q, k, v, p: Problem, tokens: Sequence[int], scale: Optional[float] = None):
    """Exact (float32) outputs [len(tokens), H, D] of the given row-major query tokens of
    batch 0; q, k, v are [B, N, H, D] in row-major token order (any float dtype)."""
    import torch

    scale = p.dim ** -0.5 if scale is None else scale
    rows = []
    for t in tokens:
        keys = torch.as_tensor(neighbor_tokens(p, int(t)), device=q.device)
        qt = q[0, int(t)].float()                     # [H, D]
        kt, vt = k[0, keys].float(), v[0, keys].float()  # [n, H, D]
        scores = torch.einsum("hd,nhd->hn", qt, kt) * scale
        rows.append(torch.einsum("hn,nhd->hd", torch.softmax(scores, dim=-1), vt))
    return torch.stack(rows)


def relative_error(out, ref) -> float:
    """max |out - ref| / max |ref| (both [rows, H, D])."""
    return float((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
