# SPDX-License-Identifier: Apache-2.0
"""Unfused neighborhood attention: qk -> softmax -> av, with the attention weights
materialised. Slower and larger than the fused functions; use it to transform the
weights between the steps (dropout, masking, inspection).

Weights layout: attn [B, X1..Xr, H, prod(kernel_size) + M]. Slot w < prod(kernel_size)
is the key at window offset w (row-major over the axes, offset = key index in its
dilation group - window begin); slot prod(kernel_size) + m is additional token m.
Slots a causal window does not reach hold -inf scores and 0 probabilities.

numpy arrays run on the CPU reference backend; torch tensors run there on the CPU and
on the `naive` CUDA backend, and are differentiable."""

from __future__ import annotations

from . import _core
from .functional import _framework, _torch_ops

__all__ = ["qk", "softmax", "av"]


def _rank(name: str, x) -> int:
    rank = len(x.shape) - 3
    if not 1 <= rank <= _core.MAX_RANK:
        raise ValueError(f"{name} has {len(x.shape)} dimensions (shape {list(x.shape)}); it must be "
                         f"[batch, X1..Xr, heads, last] with r = 1, 2 or 3 spatial axes")
    return rank


@_core.keywords_after(3, _core.NATTEN_017_ORDER)
def qk(query, key, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, rpb=None, additional_keys=None,
       backend=None, periodic=False):
    """Scores attn [B, X..., H, prod(kernel_size) + M] = scale * <query, key> + rpb per window slot
    (scale defaults to 1/sqrt(D)); additional_keys [B, M, Hkv, D] fill the last M slots."""
    framework = _framework({"query": query, "key": key, "rpb": rpb, "additional_keys": additional_keys})
    window = _core.make_window(_rank("query", query), kernel_size, stride, dilation, is_causal, periodic)
    scale = _core.check_scale(scale)
    _core.backend_name(backend)
    if framework == "numpy":
        return _core.qk(_core.NumpyArrays, window, scale, query, key, rpb, additional_keys, backend)
    _torch_ops()
    import torch

    return torch.ops.nbhd.na_qk(query, key, rpb, additional_keys, *window.lists(), scale, backend)


@_core.keywords_after(2, _core.NATTEN_017_ORDER)
def softmax(attn, kernel_size, stride=1, dilation=1, is_causal=False, backend=None, periodic=False):
    """Probabilities over the last dimension of attn (every slot, additional tokens included);
    -inf slots become 0. The window arguments describe attn's layout and are validated."""
    framework = _framework({"attn": attn})
    window = _core.make_window(_rank("attn", attn), kernel_size, stride, dilation, is_causal, periodic)
    _core.backend_name(backend)
    if framework == "numpy":
        return _core.softmax(_core.NumpyArrays, window, attn, backend)
    _torch_ops()
    import torch

    return torch.ops.nbhd.na_softmax(attn, *window.lists(), backend)


@_core.keywords_after(3, _core.NATTEN_017_ORDER)
def av(probs, value, kernel_size, stride=1, dilation=1, is_causal=False, additional_values=None, backend=None,
       periodic=False):
    """out [B, X..., H, Dv] = sum over window slots of probs * value (plus the additional
    values [B, M, Hkv, Dv] weighted by the last M slots)."""
    framework = _framework({"probs": probs, "value": value, "additional_values": additional_values})
    window = _core.make_window(_rank("probs", probs), kernel_size, stride, dilation, is_causal, periodic)
    _core.backend_name(backend)
    if framework == "numpy":
        return _core.av(_core.NumpyArrays, window, probs, value, additional_values, backend)
    _torch_ops()
    import torch

    return torch.ops.nbhd.na_av(probs, value, additional_values, *window.lists(), backend)
