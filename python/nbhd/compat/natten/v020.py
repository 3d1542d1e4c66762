# SPDX-License-Identifier: Apache-2.0
"""NATTEN 0.20 on nbhd: `import nbhd.compat.natten.v020 as natten`.

  na{1,2,3}d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
             additional_keys=None, additional_values=None, attention_kwargs=None, backend=None,
             <tile and schedule choices>, torch_compile=False, try_fuse_additional_kv=False)
      heads-last [batch, X.., heads, dim]; GQA (fewer key/value heads).
  attention(query, key, value, scale=None, ..., return_lse=False)   [batch, seq, heads, dim]
  merge_attentions(outputs, lse_tensors, torch_compile=True) -> output
  NeighborhoodAttention{1,2,3}D(dim, num_heads, kernel_size, stride=1, dilation=1,
      is_causal=False, qkv_bias=True, qk_scale=None, proj_drop=0.0)
  use_deterministic_algorithms, use_kv_parallelism_in_fused_na, the memory preference and
  Flex compile switches; HAS_LIBNATTEN.

No relative positional bias, unfused operations or attention dropout (NATTEN removed
them; asking for them raises with where to find them). `backend` and the tile and
schedule arguments chose NATTEN's kernels: they are checked and nbhd plans its own."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import _shared
from ._shared import (Context, are_deterministic_algorithms_enabled, get_memory_usage_preference,
                      is_memory_usage_default, is_memory_usage_strict, is_memory_usage_unrestricted,
                      set_memory_usage_preference, use_deterministic_algorithms, use_kv_parallelism_in_fused_na)

__version__ = "0.20.1"
HAS_LIBNATTEN = True


def is_kv_parallelism_in_fused_na_enabled() -> bool:
    return _shared.kv_parallelism_enabled(default=True)


def allow_flex_compile(mode: bool = True, backprop: bool = False) -> None:
    Context.flex_compile = bool(mode)
    Context.flex_compile_backprop = bool(mode and backprop)


def allow_flex_compile_backprop(mode: bool = True) -> None:
    Context.flex_compile_backprop = bool(mode)


def disable_flex_compile() -> None:
    allow_flex_compile(False)


def disable_flex_compile_backprop() -> None:
    Context.flex_compile_backprop = False


def is_flex_compile_allowed() -> bool:
    return Context.flex_compile


def is_flex_compile_backprop_allowed() -> bool:
    return Context.flex_compile_backprop


def _fused(rank: int):
    name = f"na{rank}d"

    def na(query: Tensor, key: Tensor, value: Tensor, kernel_size, stride=1, dilation=1, is_causal=False,
           scale: Optional[float] = None, additional_keys: Optional[Tensor] = None,
           additional_values: Optional[Tensor] = None, attention_kwargs: Optional[dict] = None,
           backend: Optional[str] = None, q_tile_shape=None, kv_tile_shape=None, backward_q_tile_shape=None,
           backward_kv_tile_shape=None, backward_kv_splits=None, backward_use_pt_reduction: bool = False,
           run_persistent_kernel: bool = True, kernel_schedule=None, torch_compile: bool = False,
           try_fuse_additional_kv: bool = False, **unexpected) -> Tensor:
        _shared.no_unexpected(name, unexpected)
        _shared.check_backend(name, backend, _shared.FNA_BACKENDS)
        _shared.check_attention_kwargs(name, attention_kwargs)
        w = _shared.window(name, rank, kernel_size, stride, dilation, is_causal)
        return _shared.fused(name, rank, query, key, value, w, scale, None, additional_keys, additional_values)

    na.__name__ = na.__qualname__ = name
    na.__doc__ = f"NATTEN 0.20's {name} (see the module docstring)."
    return na


na1d, na2d, na3d = _fused(1), _fused(2), _fused(3)


def attention(query: Tensor, key: Tensor, value: Tensor, scale: Optional[float] = None,
              backend: Optional[str] = None, q_tile_size=None, kv_tile_size=None, backward_q_tile_size=None,
              backward_kv_tile_size=None, backward_kv_splits=None, backward_use_pt_reduction: bool = False,
              run_persistent_kernel: bool = True, kernel_schedule=None, torch_compile: bool = False,
              return_lse: bool = False):
    """NATTEN 0.20's attention over every key: [batch, seq, heads, dim]."""
    _shared.check_backend("attention", backend, _shared.FMHA_BACKENDS)
    return _shared.attention("attention", query, key, value, False, scale, return_lse)


def merge_attentions(outputs, lse_tensors, torch_compile: bool = True) -> Tensor:
    """NATTEN 0.20's merge: outputs [batch, seq, heads, dim] and lse [batch, seq, heads]
    of attention over disjoint key sets -> the output over their union."""
    return _shared.merge("merge_attentions", outputs, lse_tensors)[0]


class _Layer(_shared.Layer):
    def __init__(self, dim, num_heads, kernel_size, stride=1, dilation=1, is_causal=False, qkv_bias=True,
                 qk_scale=None, proj_drop=0.0, **unexpected):
        _shared.no_unexpected(type(self).__name__, unexpected)
        self._natten_020_init(dim, num_heads, kernel_size, stride, dilation, is_causal, qkv_bias, qk_scale, proj_drop)

    def _natten_020_init(self, dim, num_heads, kernel_size, stride, dilation, is_causal, qkv_bias, qk_scale,
                         proj_drop):
        w = _shared.window(type(self).__name__, self.rank, kernel_size, stride, dilation, is_causal)
        self._natten_init(dim, num_heads, w, False, qkv_bias, qk_scale, None, proj_drop)
        self.na_dim, self.embed_dim = self.rank, dim
        self.kernel_size, self.stride, self.dilation, self.is_causal = w[:4]
        self.expected_input_tensor_rank = self.rank + 2

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, dilation={self.dilation}, is_causal={self.is_causal}")


NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D = _shared.layers(_Layer, "0.20")

__all__ = _shared.public_names(globals())
