# SPDX-License-Identifier: Apache-2.0
"""What the NATTEN generations share: the global switches and device probes, NATTEN's
argument rules, the fused and heads-first unfused operations, merging, and the layer.
Written from NATTEN's documentation and public signatures; all arithmetic is nbhd's."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ... import _core, ops
from ...functional import merge_attentions as _merge, neighborhood_attention
from ...nn import _NeighborhoodAttention

# ------------------------------------------------------------------ switches and probes


def public_names(namespace: dict) -> list:
    """A generation module's __all__: its NATTEN names (not typing helpers or Context)."""
    return [n for n in namespace if not n.startswith("_") and n not in ("annotations", "Optional", "Tensor", "Context")]



class Context:
    """NATTEN's global switches. Two reach nbhd: deterministic mode, and KV parallelism
    switched off (NATTEN's backward then accumulates dQ without atomics), both of which
    turn on nbhd's deterministic backward (the dq pass, no atomics; bitwise
    reproducible). The others choose among NATTEN's kernels (fused or unfused,
    autotuner, Flex, tiled or GEMM, TF32), where nbhd plans its own: they are kept so
    that code which sets and reads them runs unchanged, and they change no result."""

    deterministic = False
    kv_parallel: Optional[bool] = None  # None: not chosen; each generation reports its default
    fused_na = False
    flex = False
    force_flex = False
    flex_compile = False
    flex_compile_backprop = False
    autotuner = {"forward_pass": False, "backward_pass": False, "thorough_mode_forward": False,
                 "thorough_mode_backward": False}
    memory_preference = "default"
    tf32 = True
    gemm_na = True
    tiled_na = True


_DEFAULTS = {name: value for name, value in vars(Context).items() if not name.startswith("_")}


def reset_context() -> None:
    """Every switch back to its default (NATTEN's NattenContext.reset)."""
    for name, value in _DEFAULTS.items():
        setattr(Context, name, dict(value) if isinstance(value, dict) else value)
    apply_determinism()


def apply_determinism() -> None:
    _core.Settings.deterministic = Context.deterministic or Context.kv_parallel is False


def use_deterministic_algorithms(mode: bool = True) -> None:
    Context.deterministic = bool(mode)
    apply_determinism()


def are_deterministic_algorithms_enabled() -> bool:
    return Context.deterministic


def use_kv_parallelism_in_fused_na(mode: bool = True) -> None:
    if mode and Context.deterministic:
        raise RuntimeError("use_kv_parallelism_in_fused_na(True) with deterministic mode on: KV parallelism is not "
                           "deterministic (NATTEN refuses this too); call use_deterministic_algorithms(False) first")
    Context.kv_parallel = bool(mode)
    apply_determinism()


def kv_parallelism_enabled(default: bool) -> bool:
    return default if Context.kv_parallel is None else Context.kv_parallel


_MEMORY_PREFERENCES = ("default", "strict", "unrestricted")


def set_memory_usage_preference(pref: str = "default") -> None:
    if pref not in _MEMORY_PREFERENCES:
        raise ValueError(f"pref = {pref!r}: set_memory_usage_preference takes one of {', '.join(_MEMORY_PREFERENCES)}")
    Context.memory_preference = pref


def get_memory_usage_preference() -> str:
    return Context.memory_preference


def is_memory_usage_default() -> bool:
    return Context.memory_preference == "default"


def is_memory_usage_strict() -> bool:
    return Context.memory_preference == "strict"


def is_memory_usage_unrestricted() -> bool:
    return Context.memory_preference == "unrestricted"


# nbhd's CUDA kernels need compute capability 8.0 (NATTEN's ran from 5.0).
MIN_COMPUTE_CAPABILITY = 80


def _built(name: Optional[str] = None) -> bool:
    import nbhd

    return any(b["device"] == "cuda" and (name is None or b["name"] == name) for b in nbhd.backends())


def get_device_cc(device_index=None) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


def has_cuda() -> bool:
    return torch.cuda.is_available() and _built()


def _runs_on(device_index, backend: Optional[str] = None) -> bool:
    return has_cuda() and _built(backend) and get_device_cc(device_index) >= MIN_COMPUTE_CAPABILITY


def has_half(device_index=None) -> bool:
    return _runs_on(device_index)


def has_bfloat(device_index=None) -> bool:
    return _runs_on(device_index)


def has_gemm(device_index=None) -> bool:
    return _runs_on(device_index, "gemm")


def has_tf32_gemm(device_index=None) -> bool:
    return has_gemm(device_index)


def has_fp32_gemm(device_index=None) -> bool:
    return has_gemm(device_index)


def has_fp64_gemm(device_index=None) -> bool:
    return False  # nbhd runs float64 on the CPU backends only


def has_fna(device_index=None) -> bool:
    return _runs_on(device_index, "fused")


# ----------------------------------------------------------------- NATTEN's argument rules


def scale_or_default(scale, head_dim: int) -> float:
    """NATTEN's `scale or head_dim ** -0.5`: None and 0 both mean the default."""
    return float(scale) if scale else head_dim ** -0.5


def window(function: str, rank: int, kernel_size, stride=1, dilation=1, is_causal=False,
           odd_kernel: bool = False) -> _core.Window:
    """nbhd's Window, after the rules NATTEN applied before its kernels ran: every kernel
    size above 1 (and odd before 0.17.5), stride at most the kernel."""
    w = _core.make_window(rank, kernel_size, stride, dilation, is_causal)
    for a, k in enumerate(w.kernel_size):
        if k < 2 or (odd_kernel and k % 2 == 0):
            need = "an odd integer greater than 1" if odd_kernel else "an integer greater than 1"
            raise ValueError(f"{function}: kernel_size = {k} on axis {a}; NATTEN takes {need} "
                             f"(nbhd's own functions take any size from 1)")
        if w.stride[a] > k:
            raise ValueError(f"{function}: stride = {w.stride[a]} on axis {a} exceeds kernel_size = {k}")
    return w


def check_rank(function: str, rank: int, layout: str, **tensors) -> None:
    """Each named tensor is dense with rank + 3 dimensions (the layout's). A tensor of
    the other layout keeps the count: it is caught where shapes then disagree (an axis
    shorter than the window, rpb's heads against the query's, fewer key heads than
    query heads). Where nothing disagrees the shape cannot tell the layouts apart, and
    the call runs as NATTEN runs it, in the function's layout (docs/natten.md)."""
    for name, t in tensors.items():
        if t is not None and t.is_nested:
            raise ValueError(f"{function}: {name} is a nested tensor; nbhd takes dense tensors (pad the "
                             f"sequences to one shape, or call once per shape)")
        if t is not None and t.dim() != rank + 3:
            raise ValueError(f"{function}: {name} has shape {list(t.shape)}; it takes {layout} ({rank + 3} "
                             f"dimensions)")


def check_window_fits(function: str, rank: int, name: str, tensor, w: _core.Window, layout: str,
                      first_axis: int) -> None:
    """Each axis holds the window (kernel_size * dilation tokens), as NATTEN required. A
    tensor of the other layout usually fails here (its heads read as an axis shorter
    than the window), so the error names the layout the function takes."""
    for a in range(rank):
        length, span = tensor.shape[first_axis + a], w.kernel_size[a] * w.dilation[a]
        if length < span:
            other = ".movedim(1, -2)" if first_axis == 1 else ".movedim(-2, 1)"
            raise ValueError(f"{function}: axis {a} of {name} has {length} tokens, fewer than kernel_size * dilation "
                             f"= {span}; {name} is {layout} (a tensor of the other layout: {other})")


def heads_first_layout(rank: int, last: str = "dim") -> str:
    axes = ", ".join("XYZ"[3 - rank:][a] for a in range(rank))
    return f"heads-first [batch, heads, {axes}, {last}]"


def heads_last_layout(rank: int) -> str:
    axes = ", ".join("XYZ"[3 - rank:][a] for a in range(rank))
    return f"heads-last [batch, {axes}, heads, dim]"


def reject(function: str, what: str, instead: str) -> None:
    raise ValueError(f"{function}: {what}; {instead}")


# ------------------------------------------------------------------------- operations


def fused(function: str, rank: int, query, key, value, w: _core.Window, scale, rpb=None, additional_keys=None,
          additional_values=None, return_lse: bool = False):
    """NATTEN's fused na*d in nbhd: heads-last tensors, the additional tokens inside the
    kernel (NATTEN ran them as a second attention and merged by lse: the same result)."""
    check_rank(function, rank, heads_last_layout(rank), query=query, key=key, value=value)
    check_window_fits(function, rank, "query", query, w, heads_last_layout(rank), first_axis=1)
    if rpb is not None and any(w.is_causal):
        reject(function, "rpb with a causal axis is refused by NATTEN", "nbhd.na1d/na2d/na3d run it")
    return neighborhood_attention(query, key, value, scale=scale_or_default(scale, query.shape[-1]), rpb=rpb,
                                  additional_keys=additional_keys, additional_values=additional_values,
                                  return_lse=return_lse, **w._asdict())


def _heads_last(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else x.movedim(1, -2)


def qk(function: str, rank: int, query, key, w: _core.Window, rpb=None, additional_keys=None) -> Tensor:
    """NATTEN's unfused scores: query (already scaled) and key heads-first
    [B, H, X.., D], additional_keys [B, H, M, D] -> attn [B, H, X.., prod(kernel) + M]."""
    check_rank(function, rank, heads_first_layout(rank), query=query, key=key)
    check_window_fits(function, rank, "query", query, w, heads_first_layout(rank), first_axis=2)
    if rpb is not None and any(w.is_causal):
        reject(function, "rpb with a causal axis is refused by NATTEN", "nbhd.ops.qk runs it")
    if rpb is not None and rpb.shape[0] != query.shape[1]:
        raise ValueError(f"{function}: rpb has {rpb.shape[0]} heads and query {query.shape[1]} in dimension 1; "
                         f"query is {heads_first_layout(rank)}")
    ak = None if additional_keys is None else additional_keys.transpose(1, 2)
    attn = ops.qk(_heads_last(query), _heads_last(key), scale=1.0, rpb=rpb, additional_keys=ak, **w._asdict())
    return attn.movedim(-2, 1)


def av(function: str, rank: int, attn, value, w: _core.Window, additional_values=None) -> Tensor:
    """NATTEN's unfused weighted sum: attn [B, H, X.., prod(kernel) + M], value
    [B, H, X.., Dv], additional_values [B, H, M, Dv] -> out [B, H, X.., Dv]."""
    check_rank(function, rank, heads_first_layout(rank), attn=attn, value=value)
    check_window_fits(function, rank, "value", value, w, heads_first_layout(rank), first_axis=2)
    extra = None if additional_values is None else additional_values.transpose(1, 2)
    out = ops.av(_heads_last(attn), _heads_last(value), additional_values=extra, **w._asdict())
    return out.movedim(-2, 1)


def merge(function: str, outputs: Sequence[Tensor], lse_tensors: Sequence[Tensor]):
    """NATTEN 0.20+'s merge: at least two [batch, seq, heads, dim] outputs and their
    [batch, seq, heads] lses -> (output, lse)."""
    if len(outputs) < 2 or len(outputs) != len(lse_tensors):
        raise ValueError(f"{function} takes two or more outputs and one lse each; got {len(outputs)} outputs and "
                         f"{len(lse_tensors)} lse tensors")
    for i, (o, lse) in enumerate(zip(outputs, lse_tensors)):
        if o.dim() != 4 or lse.dim() != 3:
            raise ValueError(f"{function}: outputs[{i}] has shape {list(o.shape)} and lse_tensors[{i}] "
                             f"{list(lse.shape)}; they take [batch, seq, heads, dim] and [batch, seq, heads]")
    return _merge(list(outputs), list(lse_tensors))


def attention(function: str, query, key, value, is_causal: bool, scale, return_lse: bool):
    """Self or cross attention, [batch, seq, heads, dim] (NATTEN 0.20+'s `attention`): a
    1-D neighborhood as wide as the sequence where query and key lengths agree, dense
    float32 arithmetic otherwise (float64 for float64 inputs; causal there is refused, as
    its alignment is ambiguous)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4:
            raise ValueError(f"{function}: {name} has shape {list(t.shape)}; it takes [batch, seq, heads, dim]")
    scale = scale_or_default(scale, query.shape[-1])
    if query.shape[1] == key.shape[1]:
        return neighborhood_attention(query, key, value, kernel_size=query.shape[1], is_causal=is_causal,
                                      scale=scale, return_lse=return_lse)
    if is_causal:
        reject(function, f"is_causal with {query.shape[1]} queries and {key.shape[1]} keys",
               "causal attention here needs equal lengths")
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    group = query.shape[2] // key.shape[2]
    k, v = (t.repeat_interleave(group, dim=2).to(acc) for t in (key, value))
    scores = torch.einsum("bqhd,bkhd->bhqk", query.to(acc), k) * scale
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(scores - lse.unsqueeze(-1)), v).to(query.dtype)
    lse = lse.transpose(1, 2)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------- layer


class Layer(_NeighborhoodAttention):
    """NATTEN's layer on nbhd's: qkv, rpb and proj created in NATTEN's order with its
    initialisation (so one seed makes the same parameters, and its state dicts load with
    strict=True), attention by nbhd. Inputs smaller than kernel x dilation are zero-padded
    at the end of the axis and the output cropped, as NATTEN 0.14-0.15 did (later
    generations refused them)."""

    def _natten_init(self, dim, num_heads, w: _core.Window, rel_pos_bias, qkv_bias, qk_scale, attn_drop,
                     proj_drop):
        torch.nn.Module.__init__(self)
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"{type(self).__name__}: num_heads = {num_heads} must divide the embedding "
                             f"dimension {dim}")
        if rel_pos_bias and any(w.is_causal):
            reject(type(self).__name__, "rel_pos_bias with a causal axis is refused by NATTEN",
                   "nbhd.nn layers run it")
        self._build(dim, num_heads, w, qkv_bias, scale_or_default(qk_scale, dim // num_heads), rel_pos_bias,
                    attn_drop, proj_drop, backend=None)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == self.rank + 2 and x.shape[-1] != self.num_heads * self.head_dim:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[-1]} channels (shape {list(x.shape)}), "
                             f"the layer {self.num_heads * self.head_dim}")
        return super().forward(x)



# What NATTEN 0.20 removed, and where a caller finds it instead.
REMOVED_IN_020 = {
    "rpb": "NATTEN 0.20 removed the relative positional bias: nbhd.compat.natten.v017, or nbhd.na1d/na2d/na3d(rpb=)",
    "rel_pos_bias": "NATTEN 0.20 removed the relative positional bias: nbhd.compat.natten.v017, or nbhd.nn layers "
                    "(rel_pos_bias=True)",
    "attn_drop": "NATTEN 0.20 removed attention dropout: nbhd.compat.natten.v017, or nbhd.nn layers (attn_drop=)",
    "xformers_kwargs": "NATTEN 0.20 renamed it attention_kwargs",
}


def no_unexpected(function: str, unexpected: dict) -> None:
    """TypeError for keyword arguments this generation does not have, with the reason
    where an earlier generation had them."""
    if unexpected:
        name = next(iter(unexpected))
        hint = REMOVED_IN_020.get(name)
        raise TypeError(f"{function}() got an unexpected keyword argument {name!r}" + (f" ({hint})" if hint else ""))


# NATTEN 0.20+'s kernel choices: they select NATTEN's kernels and tiles, where nbhd plans its own.
FNA_BACKENDS = ("cutlass-fna", "hopper-fna", "blackwell-fna", "flex-fna")
FMHA_BACKENDS = ("cutlass-fmha", "hopper-fmha", "blackwell-fmha", "flex-fmha")
ATTENTION_KWARGS = ("backend", "q_tile_size", "kv_tile_size", "backward_q_tile_size", "backward_kv_tile_size",
                    "backward_kv_splits", "backward_use_pt_reduction", "run_persistent_kernel", "kernel_schedule",
                    "torch_compile")


def check_backend(function: str, backend, names: Sequence[str]) -> None:
    if backend is not None and backend not in names:
        raise ValueError(f"{function}: backend = {backend!r}; NATTEN's are {', '.join(names)} (nbhd plans its own "
                         f"kernels for any of them)")


def check_attention_kwargs(function: str, attention_kwargs) -> None:
    for name, value in (attention_kwargs or {}).items():
        if name not in ATTENTION_KWARGS:
            raise ValueError(f"{function}: attention_kwargs[{name!r}] is not an argument of attention(); nbhd "
                             f"attends to the additional tokens inside its kernel")
        if name == "backend":
            check_backend(function, value, FMHA_BACKENDS)


def layers(base, release: str, channels: str = "dim"):
    """A generation's NeighborhoodAttention1D/2D/3D: `base` at rank 1, 2 and 3, defined
    in base's module (so that pickled models find them by name)."""
    made = []
    for rank, axes in ((1, "L"), (2, "H, W"), (3, "D, H, W")):
        name = f"NeighborhoodAttention{rank}D"
        doc = f"NATTEN {release}'s {rank}-D layer: input [B, {axes}, {channels}]."
        made.append(type(name, (base,), {"rank": rank, "__doc__": doc, "__module__": base.__module__,
                                          "__qualname__": name}))
    return made

