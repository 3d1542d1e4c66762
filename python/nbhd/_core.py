# SPDX-License-Identifier: Apache-2.0
"""Framework-neutral calls into the extension: argument normalisation, the Problem
built from the arrays' shapes, output allocation through a small adapter (numpy
here, torch in _torch_ops), then the C++ entry point. No torch import here."""

from __future__ import annotations

import functools
import inspect
import math
import operator
import warnings
from typing import Any, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from . import _nbhd

MAX_RANK = 3


class Settings:
    """Process-wide switches. deterministic: run the backward without atomics (bitwise
    reproducible gradients) even where torch.are_deterministic_algorithms() is off; set by
    nbhd.compat.natten's use_deterministic_algorithms."""

    deterministic = False


def keywords_after(count: int, generation_note: str):
    """Decorator: the parameters past the first `count` are keyword-only, with one
    release of grace. Passing them by position still works but warns (FutureWarning),
    naming them and `generation_note`: the reason a positional call is unsafe. The
    signature shown by help() and inspect is the keyword-only one."""

    def wrap(function):
        signature = inspect.signature(function)
        names = list(signature.parameters)
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if i >= count else p
                  for i, p in enumerate(signature.parameters.values())]

        @functools.wraps(function)
        def call(*args, **kwargs):
            if len(args) > count:
                given = ", ".join(names[count:len(args)])
                warnings.warn(f"{function.__qualname__}: {given} passed by position; pass every argument after "
                              f"{names[count - 1]} by keyword ({generation_note}). Positional use will be an "
                              f"error in the next release.", FutureWarning, stacklevel=2)
            return function(*args, **kwargs)

        call.__signature__ = signature.replace(parameters=params)
        return call

    return wrap


# Why a positional argument after kernel_size is unsafe: the same call means another window.
NATTEN_017_ORDER = ("NATTEN 0.17 took dilation in the position where nbhd and NATTEN 0.20+ take stride, so "
                    "na2d(q, k, v, 7, 2) written for 0.17 means stride 2 here; code written for NATTEN 0.17 can "
                    "import nbhd.compat.natten.v017")


class Window(NamedTuple):
    """Per-axis neighborhood parameters, each a tuple of `rank` entries."""

    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    dilation: Tuple[int, ...]
    is_causal: Tuple[bool, ...]
    periodic: Tuple[bool, ...]

    def lists(self) -> list:
        """The custom operators' window arguments: kernel_size, stride, dilation,
        is_causal, periodic, as lists."""
        return [list(field) for field in self]

    @property
    def rank(self) -> int:
        return len(self.kernel_size)

    @property
    def window_size(self) -> int:
        return math.prod(self.kernel_size)


def _per_axis(name: str, value: Any, rank: int, kind: type) -> tuple:
    # The common cases first (a third of a small call's Python time went here):
    # exactly an int or bool (type(True) is bool, not int), or a tuple of them.
    if type(value) is kind:
        return (value,) * rank
    if type(value) is tuple and len(value) == rank and all(type(item) is kind for item in value):
        return value
    what = "a bool" if kind is bool else "an int"
    if isinstance(value, (tuple, list)):
        if len(value) != rank:
            raise ValueError(f"{name} has {len(value)} entries but the problem has {rank} spatial axes: "
                             f"pass {what} or a tuple of {rank}")
        items = list(value)
    else:
        items = [value] * rank
    out = []
    for axis, item in enumerate(items):
        ok = isinstance(item, (bool, np.bool_)) if kind is bool else (
            not isinstance(item, (bool, np.bool_)) and _is_integer(item))
        if not ok:
            where = f"{name}[axis {axis}]" if isinstance(value, (tuple, list)) else name
            raise TypeError(f"{where} = {item!r} must be {what}")
        out.append(kind(item) if kind is bool else operator.index(item))
    return tuple(out)


def _is_integer(x: Any) -> bool:
    try:
        operator.index(x)
    except TypeError:
        return False
    return True


def make_window(rank: int, kernel_size, stride=1, dilation=1, is_causal=False, periodic=False) -> Window:
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"rank = {rank} is invalid: neighborhood attention has 1, 2 or 3 spatial axes")
    return Window(
        _per_axis("kernel_size", kernel_size, rank, int),
        _per_axis("stride", stride, rank, int),
        _per_axis("dilation", dilation, rank, int),
        _per_axis("is_causal", is_causal, rank, bool),
        _per_axis("periodic", periodic, rank, bool),
    )


def make_query_box(query_box, rank: int) -> Optional[Tuple[Tuple[int, int], ...]]:
    """The query sub-box as ((begin, end), ...) per axis, or None (every query). Its
    bounds against the grid are checked with the problem (Problem.validate, where an
    end of 0 would mean the extent: refused here, as end <= begin)."""
    if query_box is None:
        return None
    if not isinstance(query_box, (tuple, list)) or len(query_box) != rank:
        raise ValueError(f"query_box = {query_box!r} must hold one (begin, end) pair per spatial axis ({rank})")
    box = []
    for axis, pair in enumerate(query_box):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"query_box[axis {axis}] = {pair!r} must be a (begin, end) pair")
        for bound in pair:
            if isinstance(bound, (bool, np.bool_)) or not _is_integer(bound):
                raise TypeError(f"query_box[axis {axis}] = {pair!r} must hold ints")
        begin, end = operator.index(pair[0]), operator.index(pair[1])
        if end <= begin:
            raise ValueError(f"query_box[axis {axis}] = {pair!r} is invalid: end must be greater than begin")
        box.append((begin, end))
    return tuple(box)


def query_box_lists(box) -> list:
    """The custom operators' query_begin, query_end arguments of a query box (None: both None)."""
    return [None, None] if box is None else [[b for b, _ in box], [e for _, e in box]]


def query_box_from_lists(query_begin, query_end) -> Optional[Tuple[Tuple[int, int], ...]]:
    return None if query_begin is None else tuple((int(b), int(e)) for b, e in zip(query_begin, query_end))


def box_index(box) -> tuple:
    """Index of a query box's tokens in a [B, X..., ...] tensor over the grid."""
    return (slice(None), *(slice(b, e) for b, e in box))


def window_from_lists(kernel_size, stride, dilation, is_causal, periodic) -> Window:
    """The Window of a custom op's list arguments (already normalised)."""
    return Window(tuple(int(k) for k in kernel_size), tuple(int(s) for s in stride),
                  tuple(int(d) for d in dilation), tuple(bool(c) for c in is_causal),
                  tuple(bool(w) for w in periodic))


def check_scale(scale) -> Optional[float]:
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"scale = {scale!r} must be a float or None")
    return float(scale)


def check_ndim(name: str, shape: Sequence[int], ndim: int, layout: str) -> None:
    if len(shape) != ndim:
        raise ValueError(f"{name} has {len(shape)} dimensions (shape {list(shape)}) but must have {ndim}: {layout}")


def token_layout(rank: int, last: str = "dim", heads: str = "heads") -> str:
    spatial = ", ".join(f"X{a + 1}" for a in range(rank))
    return f"[batch, {spatial}, {heads}, {last}]"


def _problem(window: Window, shape: Sequence[int]) -> "_nbhd.Problem":
    """Problem with the grid and heads of a [B, X..., H, *] tensor."""
    r = window.rank
    p = _nbhd.Problem()
    p.rank = r
    p.batch = int(shape[0])
    p.extent = [int(x) for x in shape[1:1 + r]] + [1] * (MAX_RANK - r)
    p.heads = int(shape[1 + r])
    p.kernel = list(window.kernel_size) + [1] * (MAX_RANK - r)
    p.stride = list(window.stride) + [1] * (MAX_RANK - r)
    p.dilation = list(window.dilation) + [1] * (MAX_RANK - r)
    p.causal = list(window.is_causal) + [False] * (MAX_RANK - r)
    p.periodic = list(window.periodic) + [False] * (MAX_RANK - r)
    return p


def _validated(p) -> "_nbhd.Problem":
    """p, validated. An empty batch or zero query heads is valid, as for PyTorch's
    operators: the outputs are empty and the gradients zero (see _empty); the other
    parameters are checked as for a batch of one with one head per kv head."""
    batch, heads, kv_heads = p.batch, p.heads, p.kv_heads
    if batch == 0 or heads == 0:
        p.batch, p.heads, p.kv_heads = max(batch, 1), heads or max(kv_heads, 1), kv_heads or (0 if heads else 1)
        try:
            p.validate()
        finally:
            p.batch, p.heads, p.kv_heads = batch, heads, kv_heads
    else:
        p.validate()
    return p


def _empty(p) -> bool:
    """Nothing to compute: the operation's outputs are its zero-filled allocations."""
    return p.batch == 0 or p.heads == 0


def _alloc(fw, p):
    return fw.zeros if _empty(p) else fw.empty


def _check_empty(p, **named) -> None:
    """For an empty problem, which never reaches the library, the shape checks it makes
    (the same messages): every given array has the shape the problem needs."""
    r = p.rank
    grid = [p.batch] + list(p.extent[:r])
    queries = [p.batch] + [(e or n) - b for b, e, n in zip(p.query_begin[:r], p.query_end[:r], p.extent[:r])]
    slots = math.prod(p.kernel[:r]) + p.additional_tokens
    dv = p.dim_v or p.dim
    need = {"query": queries + [p.heads, p.dim], "key": grid + [p.kv_heads, p.dim], "value": grid + [p.kv_heads, dv],
            "out": queries + [p.heads, dv], "d_out": queries + [p.heads, dv], "lse": queries + [p.heads],
            "rpb": [p.heads] + [2 * k - 1 for k in p.kernel[:r]],
            "additional_keys": [p.batch, p.additional_tokens, p.kv_heads, p.dim],
            "additional_values": [p.batch, p.additional_tokens, p.kv_heads, dv],
            "attn": grid + [p.heads, slots], "probs": grid + [p.heads, slots], "d_attn": grid + [p.heads, slots],
            "d_probs": grid + [p.heads, slots]}
    for name, x in named.items():
        if x is not None and list(x.shape) != need[name]:
            raise ValueError(f"{name} has shape {list(x.shape)} but the problem needs {need[name]}")


def attention_problem(window: Window, q_shape, k_shape, v_shape, scale=None, ak_shape=None, av_shape=None,
                      has_rpb=False, query_box=None) -> "_nbhd.Problem":
    """The Problem of q [B, X..., H, D], k [B, X..., Hkv, D], v [B, X..., Hkv, Dv]; validated.
    With a query box ((begin, end) per axis, see make_query_box) the grid is key's and q
    holds the box's tokens [B, end - begin..., H, D]."""
    r = window.rank
    check_ndim("query", q_shape, r + 3, token_layout(r))
    check_ndim("key", k_shape, r + 3, token_layout(r, heads="kv_heads"))
    check_ndim("value", v_shape, r + 3, token_layout(r, "dim_v", "kv_heads"))
    p = _problem(window, q_shape)
    if query_box is not None:
        p.extent = [int(x) for x in k_shape[1:1 + r]] + [1] * (MAX_RANK - r)
        p.query_begin = [b for b, _ in query_box] + [0] * (MAX_RANK - r)
        p.query_end = [e for _, e in query_box] + [0] * (MAX_RANK - r)
    p.kv_heads = int(k_shape[-2])
    p.dim = int(q_shape[-1])
    p.dim_v = int(v_shape[-1])
    p.scale = scale
    p.has_rpb = has_rpb
    _set_additional(p, ak_shape, av_shape)
    return _validated(p)


@functools.lru_cache(maxsize=1024)
def cached_attention_problem(window: Window, q_shape, k_shape, v_shape, scale=None, ak_shape=None, av_shape=None,
                             has_rpb=False, query_box=None) -> "_nbhd.Problem":
    """attention_problem, cached by its (hashable) arguments for the forward and backward
    calls, which only read it: a model calls with a few shapes again and again."""
    return attention_problem(window, q_shape, k_shape, v_shape, scale, ak_shape, av_shape, has_rpb, query_box)


def qk_problem(window: Window, q_shape, k_shape, scale=None, ak_shape=None, has_rpb=False) -> "_nbhd.Problem":
    r = window.rank
    check_ndim("query", q_shape, r + 3, token_layout(r))
    check_ndim("key", k_shape, r + 3, token_layout(r, heads="kv_heads"))
    p = _problem(window, q_shape)
    p.kv_heads = int(k_shape[-2])
    p.dim = int(q_shape[-1])
    p.scale = scale
    p.has_rpb = has_rpb
    _set_additional(p, ak_shape, None)
    return _validated(p)


def weights_problem(window: Window, attn_shape, v_shape=None, name="attn") -> "_nbhd.Problem":
    """Problem of attention weights [B, X..., H, W + M] (and value [B, X..., Hkv, Dv])."""
    r = window.rank
    check_ndim(name, attn_shape, r + 3, token_layout(r, "prod(kernel_size) + additional tokens"))
    p = _problem(window, attn_shape)
    extra = int(attn_shape[-1]) - window.window_size
    if extra < 0:
        raise ValueError(f"{name} has {attn_shape[-1]} slots in its last dimension but kernel_size "
                         f"{window.kernel_size} needs at least {window.window_size}")
    p.additional_tokens = extra
    if v_shape is not None:
        check_ndim("value", v_shape, r + 3, token_layout(r, "dim_v", "kv_heads"))
        p.kv_heads = int(v_shape[-2])
        p.dim = p.dim_v = int(v_shape[-1])
    else:
        p.kv_heads = p.heads
        p.dim = 1  # softmax reads no features; any valid dim will do
    return _validated(p)


def _set_additional(p, ak_shape, av_shape) -> None:
    shapes = [s for s in (ak_shape, av_shape) if s is not None]
    if ak_shape is not None:
        check_ndim("additional_keys", ak_shape, 4, "[batch, M, kv_heads, dim]")
    if av_shape is not None:
        check_ndim("additional_values", av_shape, 4, "[batch, M, kv_heads, dim_v]")
    p.additional_tokens = int(shapes[0][1]) if shapes else 0


def check_pair(ak, av) -> None:
    if (ak is None) != (av is None):
        given, missing = ("additional_keys", "additional_values") if av is None else (
            "additional_values", "additional_keys")
        raise ValueError(f"{given} was given without {missing}; pass both or neither")


SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "float64")


# The dtype objects (numpy's or torch's) already found in SUPPORTED_DTYPES: a set
# lookup instead of naming the dtype on every call.
_supported_dtype_objects = set()


def check_dtypes(**named) -> None:
    """TypeError naming the first array whose dtype no backend takes."""
    for name, x in named.items():
        if x is None or x.dtype in _supported_dtype_objects:
            continue
        dtype = str(x.dtype).replace("torch.", "")
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {dtype}; nbhd takes {', '.join(SUPPORTED_DTYPES)}")
        _supported_dtype_objects.add(x.dtype)


def backend_name(backend: Optional[str]) -> str:
    if backend is None:
        return "auto"
    if not isinstance(backend, str):
        raise TypeError(f"backend = {backend!r} must be a str or None")
    return backend


# ----------------------------------------------------------------- framework adapters

class NumpyArrays:
    """Allocation and launch settings for numpy arrays (CPU, no stream). An adapter
    whose checks_only is true (torch's fakes) has forward and backward check their
    arguments instead of running."""

    checks_only = False

    @staticmethod
    def empty(shape, like, dtype=None):
        return np.empty(tuple(shape), dtype=like.dtype if dtype is None else dtype)

    @staticmethod
    def zeros(shape, like, dtype=None):
        return np.zeros(tuple(shape), dtype=like.dtype if dtype is None else dtype)

    @staticmethod
    def accumulator(like):
        """The dtype of lse and d_rpb: float32, float64 for float64 inputs."""
        return np.float64 if like.dtype == np.float64 else np.float32

    @staticmethod
    def export(*arrays):
        """The arrays as the extension takes them (numpy's go as they are)."""
        return arrays

    @staticmethod
    def launch(like) -> dict:
        # numpy arrays: the CPU backends use every hardware thread (docs/python.md).
        return {"stream": 0, "deterministic": Settings.deterministic, "num_threads": 0}


def forward(fw, window: Window, scale, q, k, v, rpb=None, ak=None, av=None, backend=None, query_box=None,
            return_lse=True):
    """(out [B, X..., H, Dv], lse [B, X..., H] float32, float64 for float64 inputs); X is
    the query box's extent when one is given (q holds its tokens). With return_lse
    false lse is None: not allocated, not written (every backend takes a missing lse)."""
    check_pair(ak, av)
    check_dtypes(query=q, key=k, value=v, rpb=rpb, additional_keys=ak, additional_values=av)
    p = cached_attention_problem(window, q.shape, k.shape, v.shape, scale, _shape(ak), _shape(av), rpb is not None,
                                 query_box)
    alloc = _alloc(fw, p)
    out = alloc(q.shape[:-1] + (v.shape[-1],), q)
    lse = alloc(q.shape[:-1], q, fw.accumulator(q)) if return_lse else None
    if _empty(p):
        _check_empty(p, query=q, key=k, value=v, rpb=rpb, additional_keys=ak, additional_values=av)
    else:
        arrays = fw.export(q, k, v, out, lse, rpb, ak, av)
        if fw.checks_only:
            _nbhd.check_forward(p, *arrays)
        else:
            _nbhd.forward(p, *arrays, backend=backend_name(backend), **fw.launch(q))
    return out, lse


def backward(fw, window: Window, scale, d_out, q, k, v, out, lse, rpb=None, ak=None, av=None, backend=None,
             d_lse=None, query_box=None):
    """(dq, dk, dv, d_rpb (lse's dtype) or None, d_ak or None, d_av or None). d_lse: lse's gradient, where the
    loss uses lse (folded into every backend's score gradients). query_box: as for forward."""
    p = cached_attention_problem(window, q.shape, k.shape, v.shape, scale, _shape(ak), _shape(av), rpb is not None,
                                 query_box)
    alloc = _alloc(fw, p)
    dq, dk, dv = alloc(q.shape, q), alloc(k.shape, k), alloc(v.shape, v)
    d_rpb = None if rpb is None else alloc(rpb.shape, q, fw.accumulator(q))
    d_ak = None if ak is None else alloc(ak.shape, ak)
    d_av = None if av is None else alloc(av.shape, av)
    if _empty(p):
        _check_empty(p, query=q, key=k, value=v, out=out, lse=lse, d_out=d_out, rpb=rpb, additional_keys=ak,
                     additional_values=av)
    else:
        arrays = fw.export(q, k, v, out, lse, d_out, dq, dk, dv, rpb, ak, av, d_rpb, d_ak, d_av, d_lse)
        if fw.checks_only:
            _nbhd.check_backward(p, *arrays)
        else:
            _nbhd.backward(p, *arrays, backend=backend_name(backend), **fw.launch(q))
    return dq, dk, dv, d_rpb, d_ak, d_av


def qk(fw, window: Window, scale, q, k, rpb=None, ak=None, backend=None):
    """attn [B, X..., H, prod(kernel_size) + M]: scale * <q, k> + rpb, -inf where a causal window ends early."""
    check_dtypes(query=q, key=k, rpb=rpb, additional_keys=ak)
    p = qk_problem(window, q.shape, k.shape, scale, _shape(ak), rpb is not None)
    alloc = _alloc(fw, p)
    attn = alloc(tuple(q.shape[:-1]) + (p.window_size() + p.additional_tokens,), q)
    if _empty(p):
        _check_empty(p, query=q, key=k, rpb=rpb, additional_keys=ak)
    else:
        _nbhd.qk(p, *fw.export(q, k, attn, rpb, ak), backend=backend_name(backend), **fw.launch(q))
    return attn


def qk_backward(fw, window: Window, scale, d_attn, q, k, ak=None, has_rpb=False, backend=None):
    """(dq, dk, d_rpb (lse's dtype) or None, d_ak or None)."""
    p = qk_problem(window, q.shape, k.shape, scale, _shape(ak), has_rpb)
    alloc = _alloc(fw, p)
    dq, dk = alloc(q.shape, q), alloc(k.shape, k)
    d_rpb = alloc((p.heads,) + tuple(2 * x - 1 for x in window.kernel_size), q, fw.accumulator(q)) if has_rpb else None
    d_ak = None if ak is None else alloc(ak.shape, ak)
    if _empty(p):
        _check_empty(p, query=q, key=k, d_attn=d_attn, additional_keys=ak)
    else:
        _nbhd.qk_backward(p, *fw.export(q, k, d_attn, dq, dk, ak, d_rpb, d_ak), backend=backend_name(backend), **fw.launch(q))
    return dq, dk, d_rpb, d_ak


def softmax(fw, window: Window, attn, backend=None):
    check_dtypes(attn=attn)
    p = weights_problem(window, attn.shape)
    alloc = _alloc(fw, p)
    probs = alloc(attn.shape, attn)
    if not _empty(p):  # attn's shape made the problem
        _nbhd.softmax(p, *fw.export(attn, probs), backend=backend_name(backend), **fw.launch(attn))
    return probs


def softmax_backward(fw, window: Window, probs, d_probs, backend=None):
    p = weights_problem(window, probs.shape, name="probs")
    alloc = _alloc(fw, p)
    d_attn = alloc(probs.shape, probs)
    if _empty(p):
        _check_empty(p, d_probs=d_probs)
    else:
        _nbhd.softmax_backward(p, *fw.export(probs, d_probs, d_attn), backend=backend_name(backend), **fw.launch(probs))
    return d_attn


def av(fw, window: Window, probs, v, av_extra=None, backend=None):
    """out [B, X..., H, Dv] = sum over slots of probs * value."""
    check_dtypes(probs=probs, value=v, additional_values=av_extra)
    p = weights_problem(window, probs.shape, v.shape, name="probs")
    alloc = _alloc(fw, p)
    if av_extra is not None:
        check_ndim("additional_values", av_extra.shape, 4, "[batch, M, kv_heads, dim_v]")
    out = alloc(tuple(probs.shape[:-1]) + (v.shape[-1],), probs)
    if _empty(p):
        _check_empty(p, value=v, additional_values=av_extra)
    else:
        _nbhd.av(p, *fw.export(probs, v, out, av_extra), backend=backend_name(backend), **fw.launch(probs))
    return out


def av_backward(fw, window: Window, d_out, probs, v, av_extra=None, backend=None):
    """(d_probs, dv, d_additional_values or None)."""
    p = weights_problem(window, probs.shape, v.shape, name="probs")
    alloc = _alloc(fw, p)
    d_probs, dv = alloc(probs.shape, probs), alloc(v.shape, v)
    d_av = None if av_extra is None else alloc(av_extra.shape, av_extra)
    if _empty(p):
        _check_empty(p, value=v, d_out=d_out, additional_values=av_extra)
    else:
        _nbhd.av_backward(p, *fw.export(probs, v, d_out, d_probs, dv, av_extra, d_av), backend=backend_name(backend),
                          **fw.launch(probs))
    return d_probs, dv, d_av


def _shape(x):
    return None if x is None else tuple(x.shape)
