# SPDX-License-Identifier: Apache-2.0
"""NATTEN 0.21 and later on nbhd: `import nbhd.compat.natten.v021 as natten` (the
unversioned nbhd.compat.natten follows it).

As NATTEN 0.20 (nbhd.compat.natten.v020), with its changes:
  na{1,2,3}d(..., return_lse=False)             (try_fuse_additional_kv removed)
  attention(query, key, value, is_causal=False, scale=None, <varlen>, ..., return_lse=False)
  merge_attentions(outputs, lse_tensors, torch_compile=True, use_autograd_fix=True)
      -> (output, lse)
  NeighborhoodAttention{1,2,3}D(embed_dim, num_heads, kernel_size, stride=1, dilation=1,
      is_causal=False, qkv_bias=True, qk_scale=None, proj_drop=0.0)
Variable-length (varlen) attention is refused with the argument's name."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import _shared
from .v020 import (HAS_LIBNATTEN, allow_flex_compile, allow_flex_compile_backprop,
                   are_deterministic_algorithms_enabled, disable_flex_compile, disable_flex_compile_backprop,
                   get_memory_usage_preference, is_flex_compile_allowed, is_flex_compile_backprop_allowed,
                   is_kv_parallelism_in_fused_na_enabled, is_memory_usage_default, is_memory_usage_strict,
                   is_memory_usage_unrestricted, set_memory_usage_preference, use_deterministic_algorithms,
                   use_kv_parallelism_in_fused_na)
from .v020 import _Layer as _Layer020

__version__ = "0.21.6"


def _fused(rank: int):
    name = f"na{rank}d"

    def na(query: Tensor, key: Tensor, value: Tensor, kernel_size, stride=1, dilation=1, is_causal=False,
           scale: Optional[float] = None, additional_keys: Optional[Tensor] = None,
           additional_values: Optional[Tensor] = None, attention_kwargs: Optional[dict] = None,
           backend: Optional[str] = None, q_tile_shape=None, kv_tile_shape=None, backward_q_tile_shape=None,
           backward_kv_tile_shape=None, backward_kv_splits=None, backward_use_pt_reduction: bool = False,
           run_persistent_kernel: bool = True, kernel_schedule=None, torch_compile: bool = False,
           return_lse: bool = False, **unexpected):
        _shared.no_unexpected(name, unexpected)
        _shared.check_backend(name, backend, _shared.FNA_BACKENDS)
        _shared.check_attention_kwargs(name, attention_kwargs)
        w = _shared.window(name, rank, kernel_size, stride, dilation, is_causal)
        return _shared.fused(name, rank, query, key, value, w, scale, None, additional_keys, additional_values,
                             return_lse)

    na.__name__ = na.__qualname__ = name
    na.__doc__ = f"NATTEN 0.21's {name} (see the module docstring and nbhd.compat.natten.v020)."
    return na


na1d, na2d, na3d = _fused(1), _fused(2), _fused(3)


def attention(query: Tensor, key: Tensor, value: Tensor, is_causal: bool = False, scale: Optional[float] = None,
              seqlens_Q=None, seqlens_KV=None, cumulative_seqlen_Q=None, cumulative_seqlen_KV=None,
              max_seqlen_Q=None, max_seqlen_KV=None, backend: Optional[str] = None, q_tile_size=None,
              kv_tile_size=None, backward_q_tile_size=None, backward_kv_tile_size=None, backward_kv_splits=None,
              backward_use_pt_reduction: bool = False, run_persistent_kernel: bool = True, kernel_schedule=None,
              torch_compile: bool = False, return_lse: bool = False):
    """NATTEN 0.21's attention over every key (or every earlier key): [batch, seq, heads, dim]."""
    varlen = dict(seqlens_Q=seqlens_Q, seqlens_KV=seqlens_KV, cumulative_seqlen_Q=cumulative_seqlen_Q,
                  cumulative_seqlen_KV=cumulative_seqlen_KV, max_seqlen_Q=max_seqlen_Q, max_seqlen_KV=max_seqlen_KV)
    for name, given in varlen.items():
        if given is not None:
            _shared.reject("attention", f"{name} is given", "nbhd has no variable-length attention; pad the "
                           "sequences to one length or call it once per length")
    _shared.check_backend("attention", backend, _shared.FMHA_BACKENDS)
    return _shared.attention("attention", query, key, value, bool(is_causal), scale, return_lse)


def merge_attentions(outputs, lse_tensors, torch_compile: bool = True, use_autograd_fix: bool = True):
    """NATTEN 0.21's merge: outputs [batch, seq, heads, dim] and lse [batch, seq, heads]
    of attention over disjoint key sets -> (output, lse) over their union."""
    return _shared.merge("merge_attentions", outputs, lse_tensors)


class _Layer(_Layer020):
    def __init__(self, embed_dim, num_heads, kernel_size, stride=1, dilation=1, is_causal=False, qkv_bias=True,
                 qk_scale=None, proj_drop=0.0, **unexpected):
        _shared.no_unexpected(type(self).__name__, unexpected)
        self._natten_020_init(embed_dim, num_heads, kernel_size, stride, dilation, is_causal, qkv_bias, qk_scale,
                              proj_drop)


NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D = _shared.layers(_Layer, "0.21+", "embed_dim")

__all__ = _shared.public_names(globals())
