# SPDX-License-Identifier: Apache-2.0
"""bench/masks.py: the FlexAttention mask_mod, token orders and block masks against
dense references (the bench's own, and tests/python/dense_reference.py, written apart),
and the exact rows the suite checks results with against nbhd's reference backend."""

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import nbhd  # noqa: E402
from dense_reference import axis_mask as other_axis_mask  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import masks as M  # noqa: E402
import problems as P  # noqa: E402


def random_problem(seed: int) -> P.Problem:
    """Small valid problems with every feature: dilation dividing the extent or not,
    strides, causal axes, extents that are not multiples of the block."""
    rng = np.random.default_rng(seed)
    rank = int(rng.integers(1, 4))
    choices = {1: (64, 100, 128, 256, 300), 2: (8, 12, 16, 24, 32), 3: (4, 6, 8, 12)}[rank]
    extent, kernel, dilation, stride, causal, periodic = [], [], [], [], [], []
    for _ in range(rank):
        L = int(rng.choice(choices))
        k = int(rng.integers(1, min(L, 17) + 1))
        d = int(rng.integers(1, L // k + 1))
        extent.append(L)
        kernel.append(k)
        dilation.append(d)
        stride.append(int(rng.integers(1, k + 1)) if rng.random() < 0.3 else 1)
        causal.append(bool(rng.random() < 0.3))
        periodic.append(not causal[-1] and bool(rng.random() < 0.3))
    return P.Problem(f"r{seed}", tuple(extent), tuple(kernel), tuple(dilation), tuple(stride), tuple(causal),
                     periodic=tuple(periodic))


CASES = [random_problem(s) for s in range(24)] + [
    P.Problem("full", (16, 16), (16, 16)),
    P.Problem("full-axis", (32, 16), (32, 5), dilation=(1, 3)),
    P.Problem("tiled-dilated", (32, 32), (5, 7), dilation=(4, 2)),
    P.Problem("tiled-3d", (8, 16, 16), (3, 5, 7), causal=(True, False, False)),
    P.Problem("regroup-1d", (1024,), (9,), dilation=(4,)),
    P.Problem("lat-lon", (32, 64), (5, 9), periodic=(False, True)),
    P.Problem("torus-tiled", (16, 32), (5, 7), dilation=(1, 2), stride=(2, 1), periodic=(True, True)),
]


def layouts(p):
    out = [M.plain_layout(p)]
    tile, _ = M.pick_tile(p)
    if tile:
        out.append(M.tiled_layout(p, tile))
    return out


def test_axis_tables_follow_the_spec_steps():
    for L in range(1, 14):
        for k in range(1, L + 1):
            for d in range(1, L // k + 1):
                for s in range(1, k + 1):
                    for c, w in ((False, False), (True, False), (False, True)):
                        ranges, code = M.axis_intervals(L, k, d, s, c, w)
                        got = np.zeros((L, L), dtype=bool)
                        for lo, hi in ranges:
                            got |= (lo[:, None] <= code[None, :]) & (code[None, :] <= hi[:, None])
                        assert (got == M.axis_mask(L, k, d, s, c, w)).all(), (L, k, d, s, c, w)
                        assert (got == other_axis_mask(L, k, d, s, c, w)).all(), (L, k, d, s, c, w)
                        if not w:
                            lo, hi, _ = M.axis_tables(L, k, d, s, c)
                            assert (ranges[0][0] == lo).all() and (ranges[0][1] == hi).all()


@pytest.mark.parametrize("p", CASES, ids=lambda p: p.name)
def test_mask_mod_equals_the_dense_reference_in_every_order(p):
    dense = M.dense_mask(p)
    assert dense.sum() == P.pairs(p)
    for layout in layouts(p):
        assert sorted(layout.order.tolist()) == list(range(p.tokens))
        fm = M.FlexMask(p, layout)
        pos = torch.arange(p.tokens)
        got = fm.evaluate(pos[:, None], pos[None, :]).numpy()
        assert (got == dense[layout.order][:, layout.order]).all(), layout.describe()
        padded = torch.arange(p.tokens, fm.padded)
        assert not fm.evaluate(padded[:, None], torch.arange(fm.padded)[None, :]).any()  # padding matches nothing
        assert not fm.evaluate(pos[:, None], padded[None, :]).any()


@pytest.mark.parametrize("p", CASES[::4], ids=lambda p: p.name)
def test_block_mask_equals_create_block_mask(p):
    from torch.nn.attention.flex_attention import create_block_mask

    for layout in layouts(p):
        fm = M.FlexMask(p, layout)
        ours = fm.block_mask()
        theirs = create_block_mask(fm.mask_mod, None, None, p.tokens, p.tokens, device="cpu")
        assert torch.equal(ours.kv_num_blocks, theirs.kv_num_blocks)
        assert torch.equal(ours.full_kv_num_blocks, theirs.full_kv_num_blocks)
        assert torch.equal(ours.to_dense(), theirs.to_dense())
        assert torch.equal(ours.q_num_blocks, theirs.q_num_blocks)  # the backward's transposed index


@pytest.mark.parametrize("p", [c for c in CASES if M.pick_tile(c)[0] and c.tokens <= 1024][:8],
                         ids=lambda p: p.name)
def test_tile_block_counts_are_exact(p):
    for tile in M.tile_candidates(p)[:6]:
        fm = M.FlexMask(p, M.tiled_layout(p, tile))
        fm.block_mask()
        nonempty, full, total = M.tile_blocks(p, tile)
        assert nonempty == int(fm.blocks_any.sum()) and full == int(fm.blocks_all.sum())
        assert total == fm.blocks_any.numel()


def test_tiles_of_the_anchors():
    by_name = {p.name: p for p in P.anchors()}
    tile, _ = M.pick_tile(by_name["2d-128-k31"])
    assert tile in ((8, 16), (16, 8))
    assert M.tile_blocks(by_name["2d-128-k31"], tile)[0] / (128 ** 2) == pytest.approx(0.1021, abs=1e-3)
    assert M.pick_tile(by_name["2d-nat-56-k7"])[0] is None     # 56 has no power-of-two tile of 128
    assert M.pick_tile(by_name["1d-32k-w2048"])[0] is None     # 1-D: already tiles
    tile, _ = M.pick_tile(P.Problem("t", (64, 64), (7, 7), tile=(32, 4)))
    assert tile == (32, 4)  # a given tile is taken as it is


def test_tiled_order_makes_compact_tiles():
    p = P.Problem("t", (16, 32), (5, 5), dilation=(1, 2))
    layout = M.tiled_layout(p, (8, 16))
    coords = np.stack(np.unravel_index(layout.order[:128], p.extent))
    assert set(coords[0]) == set(range(8))
    assert set(coords[1]) == set(range(0, 32, 2))  # one dilation group, regrouped first


def test_neighbor_tokens_and_check_tokens():
    p = P.Problem("n", (6, 7), (3, 5), dilation=(2, 1), causal=(False, True))
    dense = M.dense_mask(p)
    for t in range(p.tokens):
        assert sorted(M.neighbor_tokens(p, t).tolist()) == np.nonzero(dense[t])[0].tolist()
    tokens = M.check_tokens(p, count=10)
    assert {0, p.tokens - 1, 6, 35} <= set(tokens.tolist())


@pytest.mark.parametrize("p", [P.Problem("a", (20, 13), (5, 3), dilation=(3, 2), stride=(2, 1),
                                         causal=(True, False), batch=2, heads=3, dim=8),
                               P.Problem("b", (50,), (11,), dilation=(4,), batch=1, heads=2, dim=4),
                               P.Problem("c", (12, 21), (5, 7), dilation=(1, 3), stride=(2, 1),
                                         periodic=(True, True), heads=2, dim=4)],
                         ids=lambda p: p.name)
def test_reference_rows_equal_nbhds_reference_backend(p):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(p.batch, *p.extent, p.heads, p.dim, generator=g, dtype=torch.float64) for _ in range(3))
    out = nbhd.neighborhood_attention(q, k, v, p.kernel, stride=p.stride, dilation=p.dilation, is_causal=p.causal,
                                      periodic=p.periodic, backend="reference")
    tokens = M.check_tokens(p, count=12)
    flat = lambda t: t.reshape(p.batch, p.tokens, p.heads, p.dim)  # noqa: E731
    ref = M.reference_rows(flat(q), flat(k), flat(v), p, tokens)
    assert M.relative_error(flat(out)[0, torch.as_tensor(tokens)], ref) < 1e-6


@pytest.mark.parametrize("p", [P.Problem("flex2d", (16, 16), (5, 7), dilation=(2, 1), heads=2, dim=16),
                               P.Problem("flex3d", (4, 8, 8), (3, 5, 3), causal=(True, False, False), dim=16),
                               P.Problem("flex-periodic", (16, 32), (5, 7), dilation=(1, 2), periodic=(True, True),
                                         dim=16)],
                         ids=lambda p: p.name)
def test_flex_attention_with_these_masks_is_neighborhood_attention(p):
    """Eager FlexAttention on the CPU (the suite compiles it on the GPU) in both orders."""
    from torch.nn.attention.flex_attention import flex_attention

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, p.tokens, p.heads, p.dim, generator=g) for _ in range(3))
    tokens = M.check_tokens(p, count=24)
    ref = M.reference_rows(q, k, v, p, tokens)
    for layout in layouts(p):
        fm = M.FlexMask(p, layout)
        order = torch.as_tensor(layout.order)
        bhnd = [t[:, order].transpose(1, 2) for t in (q, k, v)]
        out = flex_attention(*bhnd, block_mask=fm.block_mask())  # [1, H, N, D] in layout order
        position = torch.empty_like(order)
        position[order] = torch.arange(p.tokens)
        rows = out[0, :, position[torch.as_tensor(tokens)]].transpose(0, 1)
        assert M.relative_error(rows, ref) < 1e-5, layout.describe()
