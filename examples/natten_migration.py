#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Moving a model written for NATTEN onto nbhd with one line.

    python examples/natten_migration.py     # CPU, float64; exits 1 if a check fails

Two DiNAT blocks as their authors wrote them: one for NATTEN 0.17 (`import natten`,
`NeighborhoodAttention2D(dim, heads, kernel, dilation, rel_pos_bias=True)`, and the
heads-first unfused operations in a custom attention), one for NATTEN 0.21
(`embed_dim=`, `stride=`). The only change to their code is the line marked below,
which makes `import natten` resolve to nbhd's compat API of the release the code was
written for. Each block then loads a checkpoint with NATTEN's parameter names and
shapes (strict=True) and is checked against nbhd's own layer with the same weights."""

from __future__ import annotations

import sys

import torch
from torch import nn

import nbhd
import nbhd.compat.natten

nbhd.compat.natten.install("0.17")  # the one line: was `pip install natten==0.17.5`
import natten  # noqa: E402  (nbhd's NATTEN 0.17 API from here on)
from natten.functional import na2d_av, na2d_qk  # noqa: E402


# ------------------------------------------------------ model code written for NATTEN 0.17


class DiNATBlock(nn.Module):
    def __init__(self, dim, heads, kernel, dilation):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = natten.NeighborhoodAttention2D(dim, heads, kernel, dilation, rel_pos_bias=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def unfused_attention(layer, x):
    """The attention of a NATTEN 0.17 layer spelled out with the heads-first unfused
    operations, as custom models (attention-map inspection, masking) did."""
    B, H, W, C = x.shape
    qkv = layer.qkv(x).reshape(B, H, W, 3, layer.num_heads, layer.head_dim).permute(3, 0, 4, 1, 2, 5)
    q, k, v = qkv[0] * layer.scale, qkv[1], qkv[2]
    attn = na2d_qk(q, k, layer.kernel_size, layer.dilation, rpb=layer.rpb).softmax(dim=-1)
    out = na2d_av(attn, v, layer.kernel_size, layer.dilation)
    return layer.proj(out.permute(0, 2, 3, 1, 4).reshape(B, H, W, C))


# ------------------------------------------------------ model code written for NATTEN 0.21


class DiNATBlock021(nn.Module):
    def __init__(self, dim, heads, kernel, dilation):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nbhd.compat.natten.v021.NeighborhoodAttention2D(embed_dim=dim, num_heads=heads,
                                                                   kernel_size=kernel, stride=1, dilation=dilation)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ------------------------------------------------------------------------------ checks


def natten_checkpoint(dim, heads, kernel, rpb: bool, seed: int) -> dict:
    """What torch.save(block.state_dict()) of the NATTEN-built block holds: NATTEN's
    parameter names and shapes (qkv, rpb [heads, 2k-1, 2k-1], proj), random values."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"norm1.weight": (dim,), "norm1.bias": (dim,), "attn.qkv.weight": (3 * dim, dim),
              "attn.qkv.bias": (3 * dim,), "attn.rpb": (heads, 2 * kernel - 1, 2 * kernel - 1),
              "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,), "norm2.weight": (dim,),
              "norm2.bias": (dim,), "mlp.0.weight": (2 * dim, dim), "mlp.0.bias": (2 * dim,),
              "mlp.2.weight": (dim, 2 * dim), "mlp.2.bias": (dim,)}
    if not rpb:
        del shapes["attn.rpb"]
    return {name: 0.2 * torch.randn(*shape, generator=g, dtype=torch.float64) for name, shape in shapes.items()}


def native_block(dim, heads, kernel, dilation, rpb: bool):
    """The same block on nbhd's own layer (keyword arguments after kernel_size)."""
    block = DiNATBlock(dim, heads, kernel, dilation).double()
    block.attn = nbhd.nn.NeighborhoodAttention2D(dim, heads, kernel, dilation=dilation, rel_pos_bias=rpb).double()
    return block


def main() -> int:
    dim, heads, kernel, dilation = 32, 4, 5, 2
    x = torch.randn(2, 14, 12, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    failures = 0

    def check(label, got, expected, tol=1e-10):
        nonlocal failures
        err = (got - expected).abs().max().item()
        ok = err <= tol * max(1.0, expected.abs().max().item())
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {label}: max |difference| {err:.2e}")

    with torch.no_grad():
        checkpoint = natten_checkpoint(dim, heads, kernel, rpb=True, seed=2)
        block = DiNATBlock(dim, heads, kernel, dilation).double()
        block.load_state_dict(checkpoint, strict=True)
        native = native_block(dim, heads, kernel, dilation, rpb=True)
        native.load_state_dict(checkpoint, strict=True)
        check("0.17 block vs nbhd.nn block", block(x), native(x))
        attn_in = block.norm1(x)
        check("0.17 fused attention vs its unfused operations", block.attn(attn_in),
              unfused_attention(block.attn, attn_in))

        checkpoint = natten_checkpoint(dim, heads, kernel, rpb=False, seed=3)
        block = DiNATBlock021(dim, heads, kernel, dilation).double()
        block.load_state_dict(checkpoint, strict=True)
        native = native_block(dim, heads, kernel, dilation, rpb=False)
        native.load_state_dict(checkpoint, strict=True)
        check("0.21 block vs nbhd.nn block", block(x), native(x))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
