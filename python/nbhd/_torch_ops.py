# SPDX-License-Identifier: Apache-2.0
"""PyTorch operators nbhd::na_* (torch.library.custom_op): a real implementation that
calls the extension on the tensors' memory (DLPack) and the current CUDA stream, a
fake implementation for tracing, and autograd formulas. torch.compile(fullgraph=True)
sees each operator as one opaque node; its backward is a custom operator as well."""

from __future__ import annotations

import functools
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.dlpack import to_dlpack as _to_dlpack

from . import _core


class TorchArrays:
    """Allocation and launch settings for torch tensors (see _core.NumpyArrays)."""

    checks_only = False

    # Tensor.new_empty, not torch.empty(dtype=, device=): 1.2 against 2.6 us a call on
    # this project's CPU (docs/performance.md, "Host path"); a forward makes two.
    @staticmethod
    def empty(shape, like, dtype=None):
        return like.new_empty(shape) if dtype is None else like.new_empty(shape, dtype=dtype)

    @staticmethod
    def zeros(shape, like, dtype=None):
        return like.new_zeros(shape) if dtype is None else like.new_zeros(shape, dtype=dtype)

    @staticmethod
    def accumulator(like):
        """The dtype of lse and d_rpb: float32, float64 for float64 inputs."""
        return torch.float64 if like.dtype == torch.float64 else torch.float32

    @staticmethod
    def export(*tensors):
        # DLPack capsules made in C++ (0.2 us each; Tensor.__dlpack__'s Python checks
        # take 2 us and want the tensor's GPU current). Inside the operators the tensors
        # may still say requires_grad, which only __dlpack__ refuses.
        return tuple(None if t is None else _to_dlpack(t) for t in tensors)

    @staticmethod
    def launch(like) -> dict:
        deterministic = torch.are_deterministic_algorithms_enabled() or _core.Settings.deterministic
        if not like.is_cuda:
            # The CPU backends use as many threads as torch does (torch.set_num_threads).
            return {"stream": 0, "deterministic": deterministic, "num_threads": torch.get_num_threads()}
        # The raw handle, not torch.cuda.current_stream's Stream object (a few us a call).
        index = like.device.index
        stream = torch._C._cuda_getCurrentRawStream(index)
        return {"stream": stream, "deterministic": deterministic, "num_threads": 0,
                "workspace": _workspace(index, stream)}


@functools.lru_cache(maxsize=64)
def _workspace(device_index: int, stream: int) -> tuple:
    """Scratch memory (the backward's float32 dq, the unfused backends' weights) from
    PyTorch's caching allocator on this device and stream: it reuses blocks torch holds
    and shows in torch.cuda.memory_allocated. Cached per (device, stream) as a call's
    other settings are not: building it took a few us a call."""
    allocate = functools.partial(torch.cuda.caching_allocator_alloc, device=device_index, stream=stream)
    return allocate, torch.cuda.caching_allocator_delete


class TorchFakes(TorchArrays):
    """TorchArrays for the fake implementations (torch.compile's tracing, meta tensors):
    tensors without memory, so the library makes its checks (shapes, dtypes, devices:
    the messages of an eager call) on their descriptions instead of running."""

    checks_only = True

    @staticmethod
    def export(*tensors):
        return tuple(None if t is None else
                     (list(t.shape), str(t.dtype).replace("torch.", ""), t.device.type, t.device.index or 0)
                     for t in tensors)


def _concrete(*tensors) -> bool:
    """Whether every shape is known (static-shape tracing, meta tensors): then the fake
    implementations check their arguments as an eager call would. With symbolic sizes
    (dynamic shapes) checking would specialise them: shapes only, and the eager call's
    checks run when the compiled code does."""
    return all(t is None or all(type(n) is int for n in t.shape) for t in tensors)


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    # Operators cannot return None: an absent gradient is an empty tensor.
    return like.new_empty(0) if t is None else t


def _given(t: Tensor, present: bool) -> Optional[Tensor]:
    return t if present else None


# ------------------------------------------------------------------ fused attention

def _na_forward(query: Tensor, key: Tensor, value: Tensor, rpb: Optional[Tensor], additional_keys: Optional[Tensor],
               additional_values: Optional[Tensor], kernel_size: List[int], stride: List[int], dilation: List[int],
               is_causal: List[bool],
               periodic: List[bool], scale: Optional[float], backend: Optional[str],
               query_begin: Optional[List[int]] = None, query_end: Optional[List[int]] = None
               ) -> Tuple[Tensor, Tensor]:
    """query_begin, query_end: the query box (_core.query_box_lists), None for every query."""
    return _forward_with(TorchArrays, query, key, value, rpb, additional_keys, additional_values, kernel_size, stride,
                         dilation, is_causal, periodic, scale, backend, query_begin, query_end)


def _forward_with(fw, query, key, value, rpb, additional_keys, additional_values, kernel_size, stride, dilation,
                  is_causal, periodic, scale, backend, query_begin=None, query_end=None):
    window = _core.window_from_lists(kernel_size, stride, dilation, is_causal, periodic)
    return _core.forward(fw, window, scale, query, key, value, rpb, additional_keys, additional_values,
                         backend=backend, query_box=_core.query_box_from_lists(query_begin, query_end))


na_forward = torch.library.custom_op("nbhd::na_forward", mutates_args=())(_na_forward)


@na_forward.register_fake
def _(query, key, value, rpb, additional_keys, additional_values, kernel_size, stride, dilation, is_causal, periodic,
      scale, backend, query_begin=None, query_end=None):
    if _concrete(query, key, value, rpb, additional_keys, additional_values):
        return _forward_with(TorchFakes, query, key, value, rpb, additional_keys, additional_values, kernel_size,
                             stride, dilation, is_causal, periodic, scale, backend, query_begin, query_end)
    out = query.new_empty(query.shape[:-1] + (value.shape[-1],))
    lse = query.new_empty(query.shape[:-1], dtype=TorchArrays.accumulator(query))
    return out, lse


def _na_backward(d_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
                d_lse: Optional[Tensor],
                rpb: Optional[Tensor], additional_keys: Optional[Tensor], additional_values: Optional[Tensor],
                kernel_size: List[int], stride: List[int], dilation: List[int], is_causal: List[bool],
                periodic: List[bool],
                scale: Optional[float], backend: Optional[str],
                query_begin: Optional[List[int]] = None, query_end: Optional[List[int]] = None
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(d_query, d_key, d_value, d_rpb (lse's dtype), d_additional_keys, d_additional_values); absent ones empty.
    d_lse: lse's gradient or None."""
    return _backward_with(TorchArrays, d_out, query, key, value, out, lse, d_lse, rpb, additional_keys,
                          additional_values, kernel_size, stride, dilation, is_causal, periodic, scale, backend,
                          query_begin, query_end)


def _backward_with(fw, d_out, query, key, value, out, lse, d_lse, rpb, additional_keys, additional_values, kernel_size,
                   stride, dilation, is_causal, periodic, scale, backend, query_begin=None, query_end=None):
    window = _core.window_from_lists(kernel_size, stride, dilation, is_causal, periodic)
    dq, dk, dv, d_rpb, d_ak, d_av = _core.backward(
        fw, window, scale, d_out, query, key, value, out, lse, rpb, additional_keys, additional_values,
        backend=backend, d_lse=d_lse, query_box=_core.query_box_from_lists(query_begin, query_end))
    return dq, dk, dv, _or_empty(d_rpb, query), _or_empty(d_ak, query), _or_empty(d_av, query)


na_backward = torch.library.custom_op("nbhd::na_backward", mutates_args=())(_na_backward)


@na_backward.register_fake
def _(d_out, query, key, value, out, lse, d_lse, rpb, additional_keys, additional_values, kernel_size, stride,
      dilation, is_causal, periodic, scale, backend, query_begin=None, query_end=None):
    if _concrete(d_out, query, key, value, out, lse, d_lse, rpb, additional_keys, additional_values):
        return _backward_with(TorchFakes, d_out, query, key, value, out, lse, d_lse, rpb, additional_keys,
                              additional_values, kernel_size, stride, dilation, is_causal, periodic, scale, backend,
                              query_begin, query_end)

    def like(t, dtype=None):
        return query.new_empty(0) if t is None else t.new_empty(t.shape, dtype=dtype)

    return (like(query), like(key), like(value), like(rpb, TorchArrays.accumulator(query)), like(additional_keys),
            like(additional_values))


def _forward_setup(ctx, inputs, output):
    query, key, value, rpb, additional_keys, additional_values = inputs[:6]
    ctx.window_args = inputs[6:11]
    ctx.scale, ctx.backend = inputs[11], inputs[12]
    ctx.query_box_args = inputs[13:15]
    ctx.save_for_backward(query, key, value, rpb, additional_keys, additional_values, *output)
    # Gradients of unused outputs arrive as None, so an unused lse costs nothing.
    ctx.set_materialize_grads(False)


def _gradients(saved, d_out, d_lse, run_backward) -> list:
    """The gradients of (query, key, value, rpb, additional_keys, additional_values)
    from those of (out, lse), by run_backward(d_out, query, key, value, out, lse,
    d_lse, rpb, additional_keys, additional_values) (the operator or the library)."""
    query, key, value, rpb, ak, av, out, lse = saved
    if d_out is None and d_lse is None:
        return [None] * 6
    # lse's gradient folds into the backward's score gradients (d lse / d score =
    # probs): one pass of the chosen backend, no attention weights.
    d_out = torch.zeros_like(out) if d_out is None else d_out.contiguous()
    d_lse = None if d_lse is None else d_lse.to(lse.dtype).contiguous()
    dq, dk, dv, d_rpb, d_ak, d_av = run_backward(d_out, query, key, value, out, lse, d_lse, rpb, ak, av)
    grads = [dq, dk, dv, _given(d_rpb, rpb is not None), _given(d_ak, ak is not None), _given(d_av, av is not None)]
    if rpb is not None:
        grads[3] = grads[3].to(rpb.dtype)
    return grads


def _forward_backward(ctx, d_out, d_lse):
    def run_backward(*tensors):
        return torch.ops.nbhd.na_backward(*tensors, *ctx.window_args, ctx.scale, ctx.backend, *ctx.query_box_args)

    return (*_gradients(ctx.saved_tensors, d_out, d_lse, run_backward), None, None, None, None, None, None, None,
            None, None)


torch.library.register_autograd("nbhd::na_forward", _forward_backward, setup_context=_forward_setup)


class _EagerAttention(torch.autograd.Function):
    """nbhd::na_forward and its gradient without the operator's dispatch: the library
    called on nbhd's own window and query box, not the operator's lists (the
    operator's Python layers cost ~35 us a call, and the lists' round trip and
    apply()'s per-argument checks ~10 more, measured on the CPU: docs/performance.md,
    "Host path"). Only for plain tensors outside tracing (eager_call)."""

    # forward(ctx, ...) rather than a setup_context: with one, apply() binds the
    # arguments through inspect.signature on every call (~15 us).
    @staticmethod
    def forward(ctx, query, key, value, rpb, additional_keys, additional_values, call):
        window, scale, backend, box = call
        out, lse = _core.forward(TorchArrays, window, scale, query, key, value, rpb, additional_keys,
                                 additional_values, backend=backend, query_box=box)
        ctx.call = call
        ctx.save_for_backward(query, key, value, rpb, additional_keys, additional_values, out, lse)
        ctx.set_materialize_grads(False)
        return out, lse

    # The backward's own gradient is not defined (as for the operator, whose backward
    # has no autograd formula): a second derivative raises instead of treating the
    # first one's result as a constant.
    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_lse):
        window, scale, backend, box = ctx.call

        def run_backward(d_out, query, key, value, out, lse, d_lse, rpb, ak, av):
            return _core.backward(TorchArrays, window, scale, d_out, query, key, value, out, lse, rpb, ak, av,
                                  backend=backend, d_lse=d_lse, query_box=box)

        return (*_gradients(ctx.saved_tensors, d_out, d_lse, run_backward), None)


def eager_call(tensors) -> bool:
    """Whether an attention call may skip the operator: plain CPU or CUDA tensors, with
    no compiler, functorch transform (vmap, grad) or torch function or dispatch mode
    (fake tensors, tracing) that must see nbhd::na_forward."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack():
        return False
    for t in tensors:
        # is_cpu / is_cuda, not device.type (which builds a torch.device: 0.3 us a tensor).
        if t is not None and (type(t) is not Tensor or not (t.is_cuda or t.is_cpu)):
            return False
    return True


def attention(query, key, value, rpb, additional_keys, additional_values, window, scale, backend, box,
              return_lse=True):
    """(out, lse) of neighborhood attention (window: _core.Window, scale: float or None,
    backend: str or None, box: _core.make_query_box's or None): the library directly
    where eager_call allows (through _EagerAttention when a gradient may be asked
    for), else the operator nbhd::na_forward. lse may be None when return_lse is
    false (an inference call then neither allocates nor writes it)."""
    tensors = (query, key, value, rpb, additional_keys, additional_values)
    if eager_call(tensors):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            return _EagerAttention.apply(*tensors, (window, scale, backend, box))
        # Nothing to differentiate (inference): the library without autograd's
        # bookkeeping, 11-18 us of apply() per call on this project's 2-core CPU.
        return _core.forward(TorchArrays, window, scale, *tensors, backend=backend, query_box=box,
                             return_lse=return_lse)
    return torch.ops.nbhd.na_forward(*tensors, *window.lists(), scale, backend, *_core.query_box_lists(box))


# ------------------------------------------------------------------ unfused operations

@torch.library.custom_op("nbhd::na_qk", mutates_args=())
def na_qk(query: Tensor, key: Tensor, rpb: Optional[Tensor], additional_keys: Optional[Tensor],
          kernel_size: List[int], stride: List[int], dilation: List[int], is_causal: List[bool], periodic: List[bool],
          scale: Optional[float], backend: Optional[str]) -> Tensor:
    window = _core.window_from_lists(kernel_size, stride, dilation, is_causal, periodic)
    return _core.qk(TorchArrays, window, scale, query, key, rpb, additional_keys, backend=backend)


@na_qk.register_fake
def _(query, key, rpb, additional_keys, kernel_size, stride, dilation, is_causal, periodic, scale, backend):
    extra = 0 if additional_keys is None else additional_keys.shape[1]
    return query.new_empty(query.shape[:-1] + (math.prod(kernel_size) + extra,))


@torch.library.custom_op("nbhd::na_qk_backward", mutates_args=())
def na_qk_backward(d_attn: Tensor, query: Tensor, key: Tensor, additional_keys: Optional[Tensor], has_rpb: bool,
                   kernel_size: List[int], stride: List[int], dilation: List[int], is_causal: List[bool],
                   periodic: List[bool],
                   scale: Optional[float], backend: Optional[str]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d_query, d_key, d_rpb (lse's dtype), d_additional_keys); absent ones empty."""
    window = _core.window_from_lists(kernel_size, stride, dilation, is_causal, periodic)
    dq, dk, d_rpb, d_ak = _core.qk_backward(TorchArrays, window, scale, d_attn, query, key, additional_keys,
                                            has_rpb=has_rpb, backend=backend)
    return dq, dk, _or_empty(d_rpb, query), _or_empty(d_ak, query)


@na_qk_backward.register_fake
def _(d_attn, query, key, additional_keys, has_rpb, kernel_size, stride, dilation, is_causal, periodic, scale, backend):
    rpb_shape = (query.shape[-2],) + tuple(2 * k - 1 for k in kernel_size) if has_rpb else (0,)
    d_ak = query.new_empty(0) if additional_keys is None else additional_keys.new_empty(additional_keys.shape)
    return (query.new_empty(query.shape), key.new_empty(key.shape), query.new_empty(rpb_shape, dtype=TorchArrays.accumulator(query)),
            d_ak)


def _qk_setup(ctx, inputs, output):
    query, key, rpb, additional_keys = inputs[:4]
    ctx.window_args, ctx.scale, ctx.backend = inputs[4:9], inputs[9], inputs[10]
    ctx.rpb_dtype = None if rpb is None else rpb.dtype
    ctx.save_for_backward(query, key, additional_keys)


def _qk_backward(ctx, d_attn):
    query, key, ak = ctx.saved_tensors
    has_rpb = ctx.rpb_dtype is not None
    dq, dk, d_rpb, d_ak = torch.ops.nbhd.na_qk_backward(d_attn.contiguous(), query, key, ak, has_rpb,
                                                        *ctx.window_args, ctx.scale, ctx.backend)
    d_rpb = d_rpb.to(ctx.rpb_dtype) if has_rpb else None
    return dq, dk, d_rpb, _given(d_ak, ak is not None), None, None, None, None, None, None, None


torch.library.register_autograd("nbhd::na_qk", _qk_backward, setup_context=_qk_setup)


@torch.library.custom_op("nbhd::na_softmax", mutates_args=())
def na_softmax(attn: Tensor, kernel_size: List[int], stride: List[int], dilation: List[int], is_causal: List[bool],
               periodic: List[bool],
               backend: Optional[str]) -> Tensor:
    window = _core.window_from_lists(kernel_size, stride, dilation, is_causal, periodic)
    return _core.softmax(TorchArrays, window, attn, backend=backend)


@na_softmax.register_fake
def _(attn, kernel_size, stride, dilation, is_causal, periodic, backend):
    return attn.new_empty(attn.shape)


@torch.library.custom_op("nbhd::na_softmax_backward", mutates_args=())
def na_softmax_backward(probs: Tensor, d_probs: Tensor, kernel_size: List[int], stride: List[int],
                        dilation: List[int], is_causal: List[bool],
                        periodic: List[bool], backend: Optional[str]) -> Tensor:
    window = _core.window_from_lists(kernel_size, stride, dilation, is_causal, periodic)
    return _core.softmax_backward(TorchArrays, window, probs, d_probs, backend=backend)


@na_softmax_backward.register_fake
def _(probs, d_probs, kernel_size, stride, dilation, is_causal, periodic, backend):
    return probs.new_empty(probs.shape)


def _softmax_setup(ctx, inputs, output):
    ctx.window_args, ctx.backend = inputs[1:6], inputs[6]
    ctx.save_for_backward(output)


def _softmax_backward(ctx, d_probs):
    (probs,) = ctx.saved_tensors
    d_attn = torch.ops.nbhd.na_softmax_backward(probs, d_probs.contiguous(), *ctx.window_args, ctx.backend)
    return d_attn, None, None, None, None, None, None


torch.library.register_autograd("nbhd::na_softmax", _softmax_backward, setup_context=_softmax_setup)


@torch.library.custom_op("nbhd::na_av", mutates_args=())
def na_av(probs: Tensor, value: Tensor, additional_values: Optional[Tensor], kernel_size: List[int],
          stride: List[int], dilation: List[int], is_causal: List[bool],
          periodic: List[bool], backend: Optional[str]) -> Tensor:
    window = _core.window_from_lists(kernel_size, stride, dilation, is_causal, periodic)
    return _core.av(TorchArrays, window, probs, value, additional_values, backend=backend)


@na_av.register_fake
def _(probs, value, additional_values, kernel_size, stride, dilation, is_causal, periodic, backend):
    return probs.new_empty(probs.shape[:-1] + (value.shape[-1],))


@torch.library.custom_op("nbhd::na_av_backward", mutates_args=())
def na_av_backward(d_out: Tensor, probs: Tensor, value: Tensor, additional_values: Optional[Tensor],
                   kernel_size: List[int], stride: List[int], dilation: List[int], is_causal: List[bool],
                   periodic: List[bool],
                   backend: Optional[str]) -> Tuple[Tensor, Tensor, Tensor]:
    """(d_probs, d_value, d_additional_values); an absent one empty."""
    window = _core.window_from_lists(kernel_size, stride, dilation, is_causal, periodic)
    d_probs, dv, d_av = _core.av_backward(TorchArrays, window, d_out, probs, value, additional_values,
                                          backend=backend)
    return d_probs, dv, _or_empty(d_av, probs)


@na_av_backward.register_fake
def _(d_out, probs, value, additional_values, kernel_size, stride, dilation, is_causal, periodic, backend):
    d_av = probs.new_empty(0) if additional_values is None else additional_values.new_empty(additional_values.shape)
    return probs.new_empty(probs.shape), value.new_empty(value.shape), d_av


def _av_setup(ctx, inputs, output):
    probs, value, additional_values = inputs[:3]
    ctx.window_args, ctx.backend = inputs[3:8], inputs[8]
    ctx.save_for_backward(probs, value, additional_values)


def _av_backward(ctx, d_out):
    probs, value, av = ctx.saved_tensors
    d_probs, dv, d_av = torch.ops.nbhd.na_av_backward(d_out.contiguous(), probs, value, av, *ctx.window_args,
                                                      ctx.backend)
    return d_probs, dv, _given(d_av, av is not None), None, None, None, None, None, None


torch.library.register_autograd("nbhd::na_av", _av_backward, setup_context=_av_setup)
