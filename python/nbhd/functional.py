# SPDX-License-Identifier: Apache-2.0
"""Fused neighborhood attention on numpy arrays or torch tensors (heads-last layout).

Tensors: query [B, X1..Xr, H, D], key [B, X1..Xr, Hkv, D], value [B, X1..Xr, Hkv, Dv];
out [B, X1..Xr, H, Dv]; lse [B, X1..Xr, H] (float32; float64 for float64 inputs).
The exact definition is docs/python.md (and the project spec); every argument is
documented there."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from . import _core

__all__ = ["na1d", "na2d", "na3d", "neighborhood_attention", "merge_attentions"]


def _framework(named: dict) -> str:
    """'numpy' or 'torch': every given array must come from the same one."""
    # The common case first (a small call's budget is microseconds): every given array
    # of the first one's exact type (query's, attn's, ...), numpy or plain torch.
    lead = next(iter(named.values()))
    if all(x is None or type(x) is type(lead) for x in named.values()):
        if type(lead) is np.ndarray:
            return "numpy"
        if _is_torch_tensor(lead):
            return "torch"
    kinds = {}
    for name, x in named.items():
        if x is None:
            continue
        if isinstance(x, np.ndarray):
            kinds[name] = "numpy"
        elif _is_torch_tensor(x):
            kinds[name] = "torch"
        else:
            raise TypeError(f"{name} must be a numpy.ndarray or a torch.Tensor, got {type(x).__name__}")
    if len(set(kinds.values())) > 1:
        listing = ", ".join(f"{n} is {k}" for n, k in kinds.items())
        raise TypeError(f"arrays from different frameworks were mixed ({listing}); pass all numpy or all torch")
    return next(iter(kinds.values()), "numpy")


def _is_torch_tensor(x) -> bool:
    # Only a module that is already loaded can have made x: torch is never imported here.
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _torch_ops():
    from . import _torch_ops

    return _torch_ops


@_core.keywords_after(4, _core.NATTEN_017_ORDER)
def neighborhood_attention(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
                           rpb=None, additional_keys=None, additional_values=None, return_lse=False, backend=None,
                           periodic=False, query_box=None):
    """Neighborhood attention over a token grid of rank 1, 2 or 3 (taken from query.ndim - 3).

    Each query attends to the keys in its window (kernel_size per axis, moved by stride,
    spread by dilation, ending at the query on causal axes, wrapping around on periodic
    axes), plus all additional tokens.
    Returns out, or (out, lse) with return_lse=True. numpy in gives numpy out (CPU
    backends); torch in gives torch out, differentiable through query, key, value, rpb,
    additional_keys and additional_values (and lse). backend=None picks the fastest
    built backend that can run the problem; naming one that cannot raises ValueError
    with the reason.

    query_box=((begin, end), ...) per axis computes only the queries of that box of the
    grid (key's): query, out and lse hold the box's tokens, key and value the grid's,
    and every window is the grid's (the CPU backends run it; docs/python.md)."""
    arrays = {"query": query, "key": key, "value": value, "rpb": rpb, "additional_keys": additional_keys,
              "additional_values": additional_values}
    framework = _framework(arrays)
    rank = len(query.shape) - 3
    if not 1 <= rank <= _core.MAX_RANK:
        raise ValueError(f"query has {len(query.shape)} dimensions (shape {list(query.shape)}); neighborhood "
                         f"attention takes [batch, X1..Xr, heads, dim] with r = 1, 2 or 3 spatial axes")
    window = _core.make_window(rank, kernel_size, stride, dilation, is_causal, periodic)
    return _attention(framework, window, query, key, value, scale, rpb, additional_keys, additional_values,
                      return_lse, backend, query_box)


def _attention(framework, window, query, key, value, scale, rpb, additional_keys, additional_values, return_lse,
               backend, query_box):
    scale = _core.check_scale(scale)
    _core.backend_name(backend)
    _core.check_pair(additional_keys, additional_values)
    box = _core.make_query_box(query_box, window.rank)
    if framework == "numpy":
        out, lse = _core.forward(_core.NumpyArrays, window, scale, query, key, value, rpb, additional_keys,
                                 additional_values, backend, box, return_lse)
    else:
        out, lse = _torch_ops().attention(query, key, value, rpb, additional_keys, additional_values, window, scale,
                                          backend, box, return_lse)
    return (out, lse) if return_lse else out


def _ranked(rank: int, name: str):
    @_core.keywords_after(4, _core.NATTEN_017_ORDER)
    def na(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, rpb=None,
           additional_keys=None, additional_values=None, return_lse=False, backend=None, periodic=False,
           query_box=None):
        arrays = {"query": query, "key": key, "value": value, "rpb": rpb, "additional_keys": additional_keys,
                  "additional_values": additional_values}
        framework = _framework(arrays)
        if len(query.shape) != rank + 3:
            raise ValueError(f"{name} takes query {_core.token_layout(rank)} ({rank + 3} dimensions), got "
                             f"shape {list(query.shape)}")
        window = _core.make_window(rank, kernel_size, stride, dilation, is_causal, periodic)
        return _attention(framework, window, query, key, value, scale, rpb, additional_keys, additional_values,
                          return_lse, backend, query_box)

    na.__name__ = na.__qualname__ = na.__wrapped__.__qualname__ = name
    na.__doc__ = (f"{rank}-D neighborhood attention: query {_core.token_layout(rank)}. Same arguments and "
                  f"results as neighborhood_attention; per-axis arguments take an int/bool or a tuple of {rank}.")
    return na


na1d = _ranked(1, "na1d")
na2d = _ranked(2, "na2d")
na3d = _ranked(3, "na3d")


def merge_attentions(outs: Sequence, lses: Sequence) -> Tuple:
    """Combine attention results over disjoint key sets into the result over their union.

    outs[i] [B, X..., H, Dv] and lses[i] [B, X..., H] are the outputs and log-sum-exps of
    attention of the same queries over key set i (e.g. neighborhood_attention with
    return_lse=True, and any other attention that reports its lse). Returns (out, lse):
    out = sum_i exp(lse_i - lse) * outs[i], lse = log(sum_i exp(lse_i)). Arithmetic in
    float32 (float64 for float64 outs); out has outs[0]'s dtype, lse is float32 (float64
    for float64 outs). Differentiable in torch through outs and lses."""
    outs, lses = list(outs), list(lses)
    if not outs or len(outs) != len(lses):
        raise ValueError(f"merge_attentions needs one lse per output and at least one of each; got {len(outs)} "
                         f"outputs and {len(lses)} lses")
    framework = _framework({**{f"outs[{i}]": o for i, o in enumerate(outs)},
                            **{f"lses[{i}]": s for i, s in enumerate(lses)}})
    for i, (o, s) in enumerate(zip(outs, lses)):
        if tuple(o.shape[:-1]) != tuple(s.shape) or tuple(o.shape) != tuple(outs[0].shape):
            raise ValueError(f"outs[{i}] has shape {list(o.shape)} and lses[{i}] {list(s.shape)}; every output must "
                             f"have outs[0]'s shape {list(outs[0].shape)} and its lse that shape without the last "
                             f"dimension")
    if framework == "numpy":
        return _merge_numpy(outs, lses)
    return _merge_torch(outs, lses)


def _merge_numpy(outs, lses):
    acc = np.float64 if outs[0].dtype == np.float64 else np.float32
    stacked = np.stack([s.astype(acc) for s in lses])
    top = np.max(stacked, axis=0)
    top = np.where(np.isneginf(top), 0, top)  # every part empty: weights 0, not nan
    with np.errstate(divide="ignore"):
        lse = top + np.log(np.sum(np.exp(stacked - top), axis=0))
    finite = np.where(np.isneginf(lse), 0, lse)
    out = sum(np.exp(s - finite)[..., None] * o.astype(acc) for s, o in zip(stacked, outs))
    return out.astype(outs[0].dtype), lse


def _merge_torch(outs, lses):
    import torch

    acc = torch.float64 if outs[0].dtype == torch.float64 else torch.float32
    stacked = torch.stack([s.to(acc) for s in lses])
    lse = torch.logsumexp(stacked, dim=0)
    finite = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    out = sum(torch.exp(s - finite).unsqueeze(-1) * o.to(acc) for s, o in zip(stacked, outs))
    return out.to(outs[0].dtype), lse
