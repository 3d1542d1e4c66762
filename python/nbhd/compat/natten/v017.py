# SPDX-License-Identifier: Apache-2.0
"""NATTEN 0.16-0.17 on nbhd: `import nbhd.compat.natten.v017 as natten`.

  na{1,2,3}d(query, key, value, kernel_size, dilation=1, is_causal=False, rpb=None,
             scale=None, additional_keys=None, additional_values=None, xformers_kwargs=None)
      fused attention, heads-last [batch, X.., heads, dim]; dilation is the fifth
      positional argument (nbhd's own na2d takes stride there).
  na{1,2,3}d_qk(query, key, kernel_size, dilation=1, additional_keys=None, is_causal=False, rpb=None)
  na{1,2,3}d_av(attn, value, kernel_size, dilation=1, additional_values=None, is_causal=False)
      unfused, heads-first [batch, heads, X.., dim], queries scaled beforehand;
      additional tokens [batch, heads, M, dim].
  NeighborhoodAttention{1,2,3}D(dim, num_heads, kernel_size, dilation=1, is_causal=False,
      rel_pos_bias=False, qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0)
  the switches (use_fused_na, use_kv_parallelism_in_fused_na, use_deterministic_algorithms,
  use_autotuner, memory preference, ...) and probes (has_cuda, has_fna, ...), and the
  0.17.0-0.17.4 names natten{1,2,3}d{qk,qkrpb,av} (as in NATTEN 0.14-0.15).

Kernel sizes may be even (0.17.5). NATTEN refused rpb with a causal axis; so does this
module (nbhd's own functions run it)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ...functional import merge_attentions as _nbhd_merge
from . import _shared
from ._shared import (Context, are_deterministic_algorithms_enabled, get_device_cc, get_memory_usage_preference,
                      has_bfloat, has_cuda, has_fna, has_fp32_gemm, has_fp64_gemm, has_gemm, has_half,
                      has_tf32_gemm, is_memory_usage_default, is_memory_usage_strict, is_memory_usage_unrestricted,
                      set_memory_usage_preference, use_deterministic_algorithms, use_kv_parallelism_in_fused_na)
from .v014 import (disable_gemm_na, disable_tf32, disable_tiled_na, enable_gemm_na, enable_tf32, enable_tiled_na,
                   natten1dav, natten1dqk, natten1dqkrpb, natten2dav, natten2dqk, natten2dqkrpb, natten3dav,
                   natten3dqk, natten3dqkrpb)

__version__ = "0.17.5"
has_fused_na = has_fna


# ------------------------------------------------------------------------------ switches


def is_kv_parallelism_in_fused_na_enabled() -> bool:
    return _shared.kv_parallelism_enabled(default=False)


def use_fused_na(mode: bool = True, kv_parallel: bool = True, use_flex_attention: bool = False,
                 force_flex_attention: bool = False) -> None:
    Context.fused_na = bool(mode)
    Context.flex = bool(mode and use_flex_attention)
    Context.force_flex = bool(mode and force_flex_attention)
    if mode:
        use_kv_parallelism_in_fused_na(kv_parallel)
    else:
        # NATTEN switched KV parallelism off here too, as a side effect of leaving its fused
        # kernels: not taken as a request for nbhd's deterministic (slower) backward.
        Context.kv_parallel = None
        _shared.apply_determinism()


def is_fused_na_enabled() -> bool:
    return Context.fused_na


use_fna = use_fused_na
is_fna_enabled = is_fused_na_enabled


def use_flex_attention() -> None:
    use_fused_na(True, use_flex_attention=True)


def force_flex_attention() -> None:
    use_fused_na(True, use_flex_attention=True, force_flex_attention=True)


def use_autotuner(forward_pass: Optional[bool] = None, backward_pass: Optional[bool] = None,
                  thorough_mode_forward: Optional[bool] = None, thorough_mode_backward: Optional[bool] = None,
                  warmup_steps_forward: Optional[int] = None, warmup_steps_backward: Optional[int] = None,
                  steps_forward: Optional[int] = None, steps_backward: Optional[int] = None) -> None:
    given = dict(forward_pass=forward_pass, backward_pass=backward_pass, thorough_mode_forward=thorough_mode_forward,
                 thorough_mode_backward=thorough_mode_backward)
    Context.autotuner = {**Context.autotuner, **{k: bool(v) for k, v in given.items() if v is not None}}


def disable_autotuner() -> None:
    Context.autotuner = {k: False for k in Context.autotuner}


def is_autotuner_enabled() -> bool:
    return Context.autotuner["forward_pass"] or Context.autotuner["backward_pass"]


def is_autotuner_enabled_for_forward() -> bool:
    return Context.autotuner["forward_pass"]


def is_autotuner_enabled_for_backward() -> bool:
    return Context.autotuner["backward_pass"]


def is_autotuner_thorough_for_forward() -> bool:
    return Context.autotuner["thorough_mode_forward"]


def is_autotuner_thorough_for_backward() -> bool:
    return Context.autotuner["thorough_mode_backward"]


def use_tf32_in_gemm_na(mode: bool = True) -> None:
    Context.tf32 = bool(mode)


def is_tf32_in_gemm_na_enabled() -> bool:
    return Context.tf32


def use_gemm_na(mode: bool = True) -> None:
    Context.gemm_na = bool(mode)


def is_gemm_na_enabled() -> bool:
    return Context.gemm_na


def use_tiled_na(mode: bool = True) -> None:
    Context.tiled_na = bool(mode)


def is_tiled_na_enabled() -> bool:
    return Context.tiled_na


# ---------------------------------------------------------------------------- operations


def _fused(rank: int):
    name = f"na{rank}d"

    def na(query: Tensor, key: Tensor, value: Tensor, kernel_size, dilation=1, is_causal=False,
           rpb: Optional[Tensor] = None, scale: Optional[float] = None, additional_keys: Optional[Tensor] = None,
           additional_values: Optional[Tensor] = None, xformers_kwargs: Optional[dict] = None) -> Tensor:
        if xformers_kwargs:
            _shared.reject(name, f"xformers_kwargs = {xformers_kwargs!r}",
                           "nbhd attends to the additional tokens inside its kernel and takes no xFormers arguments")
        w = _shared.window(name, rank, kernel_size, 1, dilation, is_causal)
        return _shared.fused(name, rank, query, key, value, w, scale, rpb, additional_keys, additional_values)

    def qk(query: Tensor, key: Tensor, kernel_size, dilation=1, additional_keys: Optional[Tensor] = None,
           is_causal=False, rpb: Optional[Tensor] = None) -> Tensor:
        w = _shared.window(f"{name}_qk", rank, kernel_size, 1, dilation, is_causal)
        return _shared.qk(f"{name}_qk", rank, query, key, w, rpb=rpb, additional_keys=additional_keys)

    def av(attn: Tensor, value: Tensor, kernel_size, dilation=1, additional_values: Optional[Tensor] = None,
           is_causal=False) -> Tensor:
        w = _shared.window(f"{name}_av", rank, kernel_size, 1, dilation, is_causal)
        return _shared.av(f"{name}_av", rank, attn, value, w, additional_values=additional_values)

    for f, suffix in ((na, ""), (qk, "_qk"), (av, "_av")):
        f.__name__ = f.__qualname__ = name + suffix
        f.__doc__ = f"NATTEN 0.17's {name + suffix} (see the module docstring)."
    return na, qk, av


na1d, na1d_qk, na1d_av = _fused(1)
na2d, na2d_qk, na2d_av = _fused(2)
na3d, na3d_qk, na3d_av = _fused(3)


def merge_attentions(output_fna: Tensor, output_sdpa: Tensor, lse_fna: Tensor, lse_sdpa: Tensor) -> Tensor:
    """NATTEN 0.17's merge of a neighborhood result (out [batch, X.., heads, dim], lse
    [batch, X.., heads]) with an xFormers attention result over the same queries
    (out [batch, seq, heads, dim], lse [batch, heads, seq])."""
    if output_sdpa.dim() != 4 or lse_sdpa.dim() != 3:
        raise ValueError(f"merge_attentions: output_sdpa has shape {list(output_sdpa.shape)} and lse_sdpa "
                         f"{list(lse_sdpa.shape)}; they take [batch, seq, heads, dim] and [batch, heads, seq]")
    shape = output_sdpa.shape
    batch, seq, heads = shape[:3]
    out, _ = _nbhd_merge([output_fna.reshape(shape), output_sdpa],
                         [lse_fna.reshape(batch, seq, heads), lse_sdpa.transpose(1, 2)])
    return out.reshape(output_fna.shape)


# -------------------------------------------------------------------------------- layers


class _Layer(_shared.Layer):
    def __init__(self, dim, num_heads, kernel_size, dilation=1, is_causal=False, rel_pos_bias=False, qkv_bias=True,
                 qk_scale=None, attn_drop=0.0, proj_drop=0.0, use_experimental_ops=False):
        w = _shared.window(type(self).__name__, self.rank, kernel_size, 1, dilation, is_causal)
        self._natten_init(dim, num_heads, w, rel_pos_bias, qkv_bias, qk_scale, attn_drop, proj_drop)
        self.kernel_size, self.dilation, self.is_causal = w.kernel_size, w.dilation, w.is_causal
        self.use_experimental_ops = use_experimental_ops

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, is_causal={self.is_causal}, has_bias={self.rpb is not None}")


NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D = _shared.layers(_Layer, "0.17")

__all__ = _shared.public_names(globals())
