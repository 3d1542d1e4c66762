# SPDX-License-Identifier: Apache-2.0
"""Neighborhood attention layers: input [B, X1..Xr, C] -> output of the same shape.

Drop-in for the NATTEN layers of the same names: same constructor arguments and
parameter names (qkv, rpb, proj), so their state dicts load. Inputs smaller than
kernel_size * dilation on an axis are zero-padded at the end of it and the output is
cropped, as NATTEN does. With shard_axes (or group) the input is this rank's shard of a
grid split over a torch.distributed group (nbhd.distributed)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import _core, ops
from .functional import neighborhood_attention

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]


class _NeighborhoodAttention(nn.Module):
    rank = 0

    @_core.keywords_after(4, _core.NATTEN_017_ORDER)
    def __init__(self, embed_dim: int, num_heads: int, kernel_size, stride=1, dilation=1, is_causal=False,
                 qkv_bias: bool = True, qk_scale=None, rel_pos_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, backend=None, periodic=False, group=None, shard_axes=None,
                 mesh_shape=None):
        super().__init__()
        window = _core.make_window(self.rank, kernel_size, stride, dilation, is_causal, periodic)
        scale = _core.check_scale(qk_scale)
        self._build(embed_dim, num_heads, window, qkv_bias, scale, rel_pos_bias, attn_drop, proj_drop, backend)
        self.embed_dim = embed_dim
        self.kernel_size, self.stride, self.dilation, self.is_causal, self.periodic = window
        if group is not None or shard_axes is not None:
            self.sharded, self.group, self.mesh_shape = True, group, mesh_shape
            self.shard_axes = 0 if shard_axes is None else shard_axes

    def _build(self, embed_dim, num_heads, window, qkv_bias, scale, rel_pos_bias, attn_drop, proj_drop, backend):
        """The parameters, created in NATTEN's order (qkv, rpb, proj) so that one seed
        initialises them alike; the layers of nbhd.compat.natten build through here too."""
        if embed_dim < 1 or num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"embed_dim = {embed_dim} must be a positive multiple of num_heads = {num_heads}")
        self._window = window
        self.backend = backend
        self.sharded, self.group, self.shard_axes, self.mesh_shape = False, None, 0, None
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = scale if scale is not None else self.head_dim ** -0.5
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=qkv_bias)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.empty(num_heads, *(2 * k - 1 for k in window.kernel_size)))
            nn.init.trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.attn_drop_rate = attn_drop
        if attn_drop is not None:
            self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.rank + 2:
            axes = ", ".join(f"X{a + 1}" for a in range(self.rank))
            raise ValueError(f"{type(self).__name__} takes input [batch, {axes}, embed_dim] ({self.rank + 2} "
                             f"dimensions), got shape {list(x.shape)}")
        if self.sharded:
            return self._sharded_forward(x)
        spatial = tuple(x.shape[1:-1])
        w = self._window
        padded = tuple(max(n, k * d) for n, k, d in zip(spatial, w.kernel_size, w.dilation))
        if padded != spatial:
            # F.pad lists (before, after) pairs from the last dimension backwards; C is not padded.
            pads = [0, 0]
            for n, p in reversed(list(zip(spatial, padded))):
                pads += [0, p - n]
            x = F.pad(x, pads)
        batch = x.shape[0]
        qkv = self.qkv(x).reshape(batch, *padded, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.unbind(dim=-3)
        window = w._asdict()
        if self.training and self.attn_drop_rate:
            # The fused kernels have no dropout: materialise the weights and drop them.
            attn = ops.qk(query, key, scale=self.scale, rpb=self.rpb, **window)
            probs = self.attn_drop(ops.softmax(attn, **window))
            out = ops.av(probs, value, **window)
        else:
            out = neighborhood_attention(query, key, value, scale=self.scale, rpb=self.rpb, backend=self.backend,
                                         **window)
        out = out.reshape(batch, *padded, self.num_heads * self.head_dim)
        if padded != spatial:
            out = out[(slice(None),) + tuple(slice(0, n) for n in spatial)]
        return self.proj_drop(self.proj(out))

    def _sharded_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Every rank holds all heads of its tokens; nothing is padded (the global grid
        # must hold the window). The parameters' gradients are this rank's shares, rpb's
        # included: sum them over the group (or average, as DistributedDataParallel does).
        from . import distributed

        if self.training and self.attn_drop_rate:
            raise ValueError(f"{type(self).__name__}: attn_drop = {self.attn_drop_rate} needs the unfused operations, "
                             f"which nbhd.distributed does not run; use attn_drop=0 with a sharded input")
        batch, grid = x.shape[0], tuple(x.shape[1:-1])
        query, key, value = self.qkv(x).reshape(batch, *grid, 3, self.num_heads, self.head_dim).unbind(dim=-3)
        out = distributed.neighborhood_attention(query, key, value, scale=self.scale, rpb=self.rpb,
                                                 backend=self.backend, group=self.group, shard_axes=self.shard_axes,
                                                 mesh_shape=self.mesh_shape, sum_replicated_grads=False,
                                                 **self._window._asdict())
        return self.proj_drop(self.proj(out.reshape(batch, *grid, self.embed_dim)))

    def extra_repr(self) -> str:
        sharded = f", shard_axes={self.shard_axes}" if self.sharded else ""
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}, "
                f"is_causal={self.is_causal}, periodic={self.periodic}, rel_pos_bias={self.rpb is not None}, "
                f"attn_drop={self.attn_drop_rate}{sharded}")


_DOC = """{rank}-D neighborhood attention layer: input [B, {axes}, embed_dim], output the same shape.

    Args:
        embed_dim: channels C of the input; a multiple of num_heads.
        num_heads: attention heads; head_dim = embed_dim // num_heads.
        kernel_size, stride, dilation: window size, window stride and dilation; an int or a
            tuple of {rank}. Valid per axis: 1 <= stride <= kernel_size, kernel_size * dilation
            <= the input's extent (smaller inputs are zero-padded, see the module docstring).
        is_causal: a bool or a tuple of {rank}; a causal axis attends only to earlier tokens.
        periodic: a bool or a tuple of {rank}; a periodic axis wraps around (longitude, a
            torus): windows are centered and never shifted at its ends. Never causal.
        qkv_bias: bias in the qkv projection.
        qk_scale: attention scale; None means head_dim ** -0.5.
        rel_pos_bias: learn a relative positional bias rpb [num_heads, {rpb}].
        backend: the nbhd backend of the attention ("fused", "naive", "gemm", "cpu", ...);
            None lets nbhd choose per call. A backend that cannot run a call raises.
        attn_drop: dropout on the attention weights. When > 0 and the module is training, the
            layer runs the unfused operations (nbhd.ops.qk, softmax, av), since the fused
            kernels have no dropout: the weights [B, {axes}, heads, prod(kernel_size)] are
            materialised, which costs memory and time. In eval mode the fused path runs.
        proj_drop: dropout on the output projection.
        group, shard_axes, mesh_shape: the input is this rank's shard of a grid split over a
            torch.distributed group (see nbhd.distributed.neighborhood_attention; given either,
            the layer is sharded, shard_axes defaulting to 0 and group to the default group).
            Each rank gets its shard of the output; every parameter's gradient (rpb's too) is
            this rank's share, to be summed or averaged over the group. No padding, no attn_drop.
    """


class NeighborhoodAttention1D(_NeighborhoodAttention):
    __doc__ = _DOC.format(rank=1, axes="L", rpb="2*k-1")
    rank = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    __doc__ = _DOC.format(rank=2, axes="H, W", rpb="2*k1-1, 2*k2-1")
    rank = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    __doc__ = _DOC.format(rank=3, axes="D, H, W", rpb="2*k1-1, 2*k2-1, 2*k3-1")
    rank = 3
