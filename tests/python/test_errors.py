# SPDX-License-Identifier: Apache-2.0
"""Every class of bad input raises ValueError or TypeError with a message that names the
argument (and the axis and bound where there is one); nothing crashes."""

import re

import numpy as np
import pytest

import nbhd

try:
    import torch
except ImportError:
    torch = None


def arrays(extent=(6, 5), heads=2, kv_heads=1, dim=4, dim_v=4, dtype=np.float32):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, *extent, heads, dim)).astype(dtype)
    k = rng.standard_normal((1, *extent, kv_heads, dim)).astype(dtype)
    v = rng.standard_normal((1, *extent, kv_heads, dim_v)).astype(dtype)
    return q, k, v


PARAMETER_ERRORS = [
    (dict(kernel_size=(3, 7)), ValueError,
     r"kernel_size\[axis 1\] = 7 with dilation\[axis 1\] = 1 is invalid: kernel_size \* dilation = 7 must be <= "
     r"the extent 5 of axis 1"),
    (dict(kernel_size=3, dilation=(3, 1)), ValueError, r"kernel_size \* dilation = 9 must be <= the extent 6"),
    (dict(kernel_size=0), ValueError, r"kernel_size\[axis 0\] = 0 is invalid: it must be >= 1"),
    (dict(kernel_size=3, dilation=0), ValueError, r"dilation\[axis 0\] = 0 is invalid: it must be >= 1"),
    (dict(kernel_size=3, stride=(1, 4)), ValueError, r"stride\[axis 1\] = 4 is invalid: it must be in \[1, "
                                                     r"kernel_size = 3\]"),
    (dict(kernel_size=3, stride=0), ValueError, r"stride\[axis 0\] = 0 is invalid"),
    (dict(kernel_size=(3, 3, 3)), ValueError, "kernel_size has 3 entries but the problem has 2 spatial axes"),
    (dict(kernel_size=3.0), TypeError, r"kernel_size = 3.0 must be an int"),
    (dict(kernel_size=(3, "3")), TypeError, r"kernel_size\[axis 1\] = '3' must be an int"),
    (dict(kernel_size=3, is_causal=1), TypeError, "is_causal = 1 must be a bool"),
    (dict(kernel_size=3, stride=True), TypeError, "stride = True must be an int"),
    (dict(kernel_size=3, scale="big"), TypeError, "scale = 'big' must be a float or None"),
    (dict(kernel_size=3, scale=float("nan")), ValueError, "scale = nan is invalid: it must be finite"),
    (dict(kernel_size=3, backend="fused2"), ValueError, "backend = 'fused2' is not one of auto, reference, cpu, "
                                                        "naive, fused"),
    (dict(kernel_size=3, backend=3), TypeError, "backend = 3 must be a str or None"),
]


@pytest.mark.parametrize("kwargs,error,message", PARAMETER_ERRORS, ids=lambda x: str(x)[:40])
def test_bad_parameters(kwargs, error, message):
    q, k, v = arrays()
    with pytest.raises(error, match=message):
        nbhd.na2d(q, k, v, **kwargs)


def test_unbuilt_or_unable_backend_says_why():
    q, k, v = arrays()
    if "fused" not in [b["name"] for b in nbhd.backends()]:
        with pytest.raises(ValueError, match="backend 'fused' is not built into this library"):
            nbhd.na2d(q, k, v, 3, backend="fused")
    with pytest.raises(ValueError, match="with backend 'cpu':\n  cpu: it does not implement unfused operations"):
        nbhd.ops.qk(q, k, 3, backend="cpu")


TENSOR_ERRORS = [
    ("heads", lambda q, k, v: (q[..., :1, :].repeat(3, -2), k.repeat(2, -2), v.repeat(2, -2)), ValueError,
     "heads = 3 is invalid: it must be a multiple of kv_heads = 2"),
    ("key extent", lambda q, k, v: (q, k[:, :4], v), ValueError,
     r"key has shape \[1, 4, 5, 1, 4\] but the problem needs \[1, 6, 5, 1, 4\]"),
    ("value batch", lambda q, k, v: (q, k, np.concatenate([v, v])), ValueError,
     r"value has shape \[2, 6, 5, 1, 4\] but the problem needs \[1, 6, 5, 1, 4\]"),
    ("key dim", lambda q, k, v: (q, k[..., :3], v), ValueError, r"key has shape .* but the problem needs"),
    ("dtype", lambda q, k, v: (q, k.astype(np.float64), v), TypeError, "key has dtype float64 but must be float32"),
    ("int dtype", lambda q, k, v: (q.astype(np.int32), k, v), TypeError,
     "query has dtype int32; nbhd takes float16, bfloat16, float32, float64"),
    ("query ndim", lambda q, k, v: (q[0], k, v), ValueError,
     r"na2d takes query \[batch, X1, X2, heads, dim\] \(5 dimensions\), got shape \[6, 5, 2, 4\]"),
    ("key ndim", lambda q, k, v: (q, k[0], v), ValueError,
     r"key has 4 dimensions \(shape \[6, 5, 1, 4\]\) but must have 5: \[batch, X1, X2, kv_heads, dim\]"),
    ("negative stride", lambda q, k, v: (q, k[:, ::-1], v), ValueError,
     "key has a negative stride in dimension 1; negative strides are not supported"),
    ("list", lambda q, k, v: (q, k.tolist(), v), TypeError,
     "key must be a numpy.ndarray or a torch.Tensor, got list"),
    ("empty dim", lambda q, k, v: (q[..., :0], k[..., :0], v), ValueError, "dim = 0 is invalid: it must be >= 1"),
]


@pytest.mark.parametrize("name,make,error,message", TENSOR_ERRORS, ids=lambda x: x if isinstance(x, str) else "")
def test_bad_tensors(name, make, error, message):
    q, k, v = make(*arrays())
    with pytest.raises(error, match=message):
        nbhd.na2d(q, k, v, 3)


def test_bad_optional_tensors():
    q, k, v = arrays()
    ak = np.zeros((1, 2, 1, 4), np.float32)
    with pytest.raises(ValueError, match="additional_keys was given without additional_values"):
        nbhd.na2d(q, k, v, 3, additional_keys=ak)
    with pytest.raises(ValueError, match=r"additional_values has shape \[1, 3, 1, 4\] but the problem needs "
                                         r"\[1, 2, 1, 4\]"):
        nbhd.na2d(q, k, v, 3, additional_keys=ak, additional_values=np.zeros((1, 3, 1, 4), np.float32))
    with pytest.raises(ValueError, match=r"rpb has shape \[2, 5, 5\] but the problem needs \[2, 5, 3\]"):
        nbhd.na2d(q, k, v, (3, 2), rpb=np.zeros((2, 5, 5), np.float32))
    with pytest.raises(TypeError, match="rpb has dtype float64 but must be float32"):
        nbhd.na2d(q, k, v, 3, rpb=np.zeros((2, 5, 5)))


@pytest.mark.skipif(torch is None, reason="needs torch")
def test_torch_errors_keep_their_class():
    q, k, v = (torch.from_numpy(a) for a in arrays())
    with pytest.raises(ValueError, match=r"kernel_size\[axis 1\] = 7"):
        nbhd.na2d(q, k, v, (3, 7))
    with pytest.raises(TypeError, match="key has dtype float16 but must be float32"):
        nbhd.na2d(q, k.half(), v, 3)
    with pytest.raises(TypeError, match="arrays from different frameworks were mixed"):
        nbhd.na2d(q, k.numpy(), v, 3)
    with pytest.raises(TypeError, match="query has dtype complex64; nbhd takes"):
        nbhd.na2d(q.to(torch.complex64), k, v, 3)
    # Meta tensors run the fake implementation: the library's checks, no data.
    assert nbhd.na2d(q.to("meta"), k.to("meta"), v.to("meta"), 3).shape == q.shape


TRACE_ERRORS = [
    ("key's dim", lambda q, k, v: (q, k[..., :2], v), ValueError, r"key has shape \[1, 6, 5, 1, 2\] but the problem "
     r"needs \[1, 6, 5, 1, 4\]"),
    ("value's dtype", lambda q, k, v: (q, k, v.double()), TypeError, "value has dtype float64 but must be float32"),
    ("window", lambda q, k, v: (q, k, v), ValueError, r"kernel_size\[axis 1\] = 7"),
]


@pytest.mark.skipif(torch is None, reason="needs torch")
@pytest.mark.parametrize("label,make,error,message", TRACE_ERRORS, ids=[e[0] for e in TRACE_ERRORS])
def test_tracing_raises_what_eager_raises(label, make, error, message):
    # The fake implementation (meta tensors, torch.compile's tracing) makes the eager
    # call's checks: the same error, raised before any kernel could run.
    q, k, v = make(*(torch.from_numpy(a) for a in arrays()))
    kernel = (3, 7) if label == "window" else 3
    with pytest.raises(error, match=message):
        nbhd.na2d(q, k, v, kernel)
    with pytest.raises(error, match=message):
        nbhd.na2d(q.to("meta"), k.to("meta"), v.to("meta"), kernel)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    compiled = torch.compile(lambda q, k, v: nbhd.na2d(q, k, v, kernel).sum(), backend="eager", fullgraph=True)
    with pytest.raises(Exception, match=message) as raised:
        compiled(q, k, v)
    chain, e = [], raised.value  # dynamo wraps what the fake implementation raised
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert any(isinstance(e, error) and re.search(message, str(e)) for e in chain), chain


@pytest.mark.skipif(torch is None, reason="needs torch")
def test_tracing_checks_the_backward():
    # The backward's fake implementation checks as well: d_out of the wrong shape.
    from nbhd import _torch_ops  # noqa: F401

    q, k, v = (torch.from_numpy(a).to("meta") for a in arrays())
    window = [[3, 3], [1, 1], [1, 1], [False, False], [False, False]]
    out, lse = torch.ops.nbhd.na_forward(q, k, v, None, None, None, *window, None, None)
    with pytest.raises(ValueError, match=r"d_out has shape \[1, 6, 5, 2, 3\] but the problem needs \[1, 6, 5, 2, 4\]"):
        torch.ops.nbhd.na_backward(out[..., :3], q, k, v, out, lse, None, None, None, None, *window, None, None)


@pytest.mark.skipif(torch is None, reason="needs torch")
def test_zero_strides_are_read_on_the_cpu():
    # expand() gives stride 0: the CPU backends follow strides, so this works.
    q, k, v = (torch.from_numpy(a) for a in arrays(extent=(6,)))
    k_expanded = k[:, :1].expand_as(k)
    torch.testing.assert_close(nbhd.na1d(q, k_expanded, v, 3), nbhd.na1d(q, k_expanded.contiguous(), v, 3))


def test_merge_attentions_checks_shapes():
    with pytest.raises(ValueError, match="one lse per output"):
        nbhd.merge_attentions([np.zeros((1, 2, 1, 3))], [])
    with pytest.raises(ValueError, match=r"outs\[1\] has shape"):
        nbhd.merge_attentions([np.zeros((1, 2, 1, 3)), np.zeros((1, 2, 1, 4))], [np.zeros((1, 2, 1))] * 2)


def test_a_workspace_that_is_not_a_pair_of_callables_is_refused():
    from nbhd import _core

    q, k, v = arrays(extent=(6,))
    p = _core.attention_problem(_core.make_window(1, kernel_size=3), q.shape, k.shape, v.shape, None, None, None,
                                False)
    p.dtype = "float32"
    out, lse = np.empty_like(q), np.empty(q.shape[:-1], np.float32)
    for bad in (3, (len,), (len, 3)):
        with pytest.raises(TypeError, match=r"workspace must be None or a pair of callables"):
            nbhd._nbhd.forward(p, q, k, v, out, lse, workspace=bad)
    # The CPU backends take no workspace: a valid pair is never called.
    never = (lambda nbytes: pytest.fail("allocated"), lambda pointer: pytest.fail("freed"))
    nbhd._nbhd.forward(p, q, k, v, out, lse, backend="cpu", workspace=never)
    np.testing.assert_array_equal(out, nbhd.na1d(q, k, v, 3, backend="cpu"))
