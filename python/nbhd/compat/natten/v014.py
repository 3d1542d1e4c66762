# SPDX-License-Identifier: Apache-2.0
"""NATTEN 0.14-0.15 on nbhd: `import nbhd.compat.natten.v014 as natten`.

That generation had no fused attention: a layer ran the unfused operations on
heads-first tensors [batch, heads, X.., dim] with queries scaled beforehand,
  natten{1,2}dqkrpb(query, key, rpb, kernel_size, dilation)   and natten{1,2}dqk, natten{1,2}dav,
  natten3dqkrpb(query, key, rpb, kernel_size_d, kernel_size, dilation_d, dilation) ...,
  (0.15) na{1,2,3}d_qk, na{1,2,3}d_qk_with_bias, na{1,2,3}d_av with additional tokens,
with one odd kernel size and dilation for the X, Y axes (3-D: a separate depth pair),
and layers NeighborhoodAttention{1,2,3}D(dim, num_heads, kernel_size, dilation, bias, ...)
whose relative positional bias (`bias`, on by default) is the parameter `rpb`."""

from __future__ import annotations

from torch import Tensor

from . import _shared
from ._shared import (Context, get_device_cc, has_bfloat, has_cuda, has_fp32_gemm, has_fp64_gemm, has_gemm,
                      has_half, has_tf32_gemm)

__version__ = "0.15.1"


def enable_tf32() -> bool:
    Context.tf32 = True
    return has_tf32_gemm()


def disable_tf32() -> bool:
    Context.tf32 = False
    return has_tf32_gemm()


def enable_gemm_na() -> None:
    Context.gemm_na = True


def disable_gemm_na() -> None:
    Context.gemm_na = False


def enable_tiled_na() -> None:
    Context.tiled_na = True


def disable_tiled_na() -> None:
    Context.tiled_na = False


def _window(function: str, kernel_size, dilation, kernel_size_d=None, dilation_d=None, rank: int = 0):
    """0.14-0.15's window: one int kernel size and dilation for the X, Y axes, a depth
    pair for 3-D; kernels odd and above 1."""
    for name, value in (("kernel_size", kernel_size), ("dilation", dilation), ("kernel_size_d", kernel_size_d),
                        ("dilation_d", dilation_d)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{function}: {name} = {value!r}; NATTEN 0.14-0.15 takes one int for every axis "
                            f"(per-axis tuples: nbhd.compat.natten.v017)")
    dilation = dilation or 1
    if rank == 3:
        kernel = (kernel_size_d or kernel_size, kernel_size, kernel_size)
        dilations = (dilation_d or dilation, dilation, dilation)
    else:
        kernel, dilations = (kernel_size,) * rank, (dilation,) * rank
    return _shared.window(function, rank, kernel, 1, dilations, False, odd_kernel=True)


def _qk(function, rank, query, key, rpb, additional_keys, kernel_size, dilation, kernel_size_d=None,
        dilation_d=None) -> Tensor:
    w = _window(function, kernel_size, dilation, kernel_size_d, dilation_d, rank=rank)
    return _shared.qk(function, rank, query, key, w, rpb=rpb, additional_keys=additional_keys)


def _av(function, rank, attn, value, additional_values, kernel_size, dilation, kernel_size_d=None,
        dilation_d=None) -> Tensor:
    w = _window(function, kernel_size, dilation, kernel_size_d, dilation_d, rank=rank)
    return _shared.av(function, rank, attn, value, w, additional_values=additional_values)


def _planar(r: int):
    """The 1-D or 2-D operations, with 0.14-0.15's names and argument orders."""

    def qk_with_bias(query, key, bias, kernel_size, dilation, additional_keys=None):
        return _qk(f"na{r}d_qk_with_bias", r, query, key, bias, additional_keys, kernel_size, dilation)

    def qk(query, key, kernel_size, dilation, additional_keys=None):
        return _qk(f"na{r}d_qk", r, query, key, None, additional_keys, kernel_size, dilation)

    def av(attn, value, kernel_size, dilation, additional_values=None):
        return _av(f"na{r}d_av", r, attn, value, additional_values, kernel_size, dilation)

    def legacy_qkrpb(query, key, rpb, kernel_size, dilation):
        return _qk(f"natten{r}dqkrpb", r, query, key, rpb, None, kernel_size, dilation)

    def legacy_qk(query, key, kernel_size, dilation):
        return _qk(f"natten{r}dqk", r, query, key, None, None, kernel_size, dilation)

    def legacy_av(attn, value, kernel_size, dilation):
        return _av(f"natten{r}dav", r, attn, value, None, kernel_size, dilation)

    return qk_with_bias, qk, av, legacy_qkrpb, legacy_qk, legacy_av


(na1d_qk_with_bias, na1d_qk, na1d_av, natten1dqkrpb, natten1dqk, natten1dav) = _planar(1)
(na2d_qk_with_bias, na2d_qk, na2d_av, natten2dqkrpb, natten2dqk, natten2dav) = _planar(2)


def na3d_qk_with_bias(query, key, bias, kernel_size_d, kernel_size, dilation_d, dilation, additional_keys=None):
    return _qk("na3d_qk_with_bias", 3, query, key, bias, additional_keys, kernel_size, dilation, kernel_size_d,
               dilation_d)


def na3d_qk(query, key, kernel_size_d, kernel_size, dilation_d, dilation, additional_keys=None):
    return _qk("na3d_qk", 3, query, key, None, additional_keys, kernel_size, dilation, kernel_size_d, dilation_d)


def na3d_av(attn, value, kernel_size_d, kernel_size, dilation_d, dilation, additional_values=None):
    return _av("na3d_av", 3, attn, value, additional_values, kernel_size, dilation, kernel_size_d, dilation_d)


def natten3dqkrpb(query, key, rpb, kernel_size_d, kernel_size, dilation_d, dilation):
    return _qk("natten3dqkrpb", 3, query, key, rpb, None, kernel_size, dilation, kernel_size_d, dilation_d)


def natten3dqk(query, key, kernel_size_d, kernel_size, dilation_d, dilation):
    return _qk("natten3dqk", 3, query, key, None, None, kernel_size, dilation, kernel_size_d, dilation_d)


def natten3dav(attn, value, kernel_size_d, kernel_size, dilation_d, dilation):
    return _av("natten3dav", 3, attn, value, None, kernel_size, dilation, kernel_size_d, dilation_d)


for _name, _f in list(globals().items()):
    if _name.startswith(("na1d", "na2d", "na3d", "natten1d", "natten2d", "natten3d")) and callable(_f):
        _f.__name__ = _f.__qualname__ = _name
        _f.__doc__ = f"NATTEN 0.14-0.15's {_name} (heads-first tensors; see the module docstring)."


class _Layer(_shared.Layer):
    """0.14-0.15's 1-D and 2-D layer."""

    def __init__(self, dim, num_heads, kernel_size, dilation=1, bias=True, qkv_bias=True, qk_scale=None,
                 attn_drop=0.0, proj_drop=0.0):
        w = _window(type(self).__name__, kernel_size, dilation, rank=self.rank)
        self._natten_init(dim, num_heads, w, bias, qkv_bias, qk_scale, attn_drop, proj_drop)
        self.kernel_size, self.dilation = kernel_size, w.dilation[0]
        self.window_size = self.kernel_size * self.dilation

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, rel_pos_bias={self.rpb is not None}")


NeighborhoodAttention1D, NeighborhoodAttention2D = _shared.layers(_Layer, "0.14-0.15")[:2]


class NeighborhoodAttention3D(_Layer):
    """NATTEN 0.15's 3-D layer: input [B, D, H, W, dim]; kernel_size_d and dilation_d
    (default: kernel_size and dilation) for the depth axis."""

    rank = 3

    def __init__(self, dim, num_heads, kernel_size, kernel_size_d=None, dilation=1, dilation_d=None, bias=True,
                 qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        w = _window(type(self).__name__, kernel_size, dilation, kernel_size_d, dilation_d, rank=3)
        self._natten_init(dim, num_heads, w, bias, qkv_bias, qk_scale, attn_drop, proj_drop)
        self.kernel_size_d, self.kernel_size = w.kernel_size[0], kernel_size
        self.dilation_d, self.dilation = w.dilation[0], w.dilation[1]
        self.window_size = self.kernel_size * self.dilation
        self.window_size_d = self.kernel_size_d * self.dilation_d

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_heads={self.num_heads}, kernel_size_d={self.kernel_size_d}, "
                f"dilation_d={self.dilation_d}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
                f"rel_pos_bias={self.rpb is not None}")


__all__ = _shared.public_names(globals())
