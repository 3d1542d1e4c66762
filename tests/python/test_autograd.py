# SPDX-License-Identifier: Apache-2.0
"""Gradients: torch.autograd.gradcheck in float64 through every differentiable input,
lse's gradient against a dense torch reference, and torch.library.opcheck of every
operator."""

import contextlib
import math

import numpy as np
import pytest

import nbhd
import nbhd._torch_ops  # noqa: F401  (registers torch.ops.nbhd even if torch came after nbhd)
from dense_reference import Case, _grid, random_case

torch = pytest.importorskip("torch")

GRAD_CASES = [
    Case((7,), (3,), (2,), (2,), (False,), heads=2, kv_heads=1, dim=3, dim_v=2, rpb=True, additional=2,
         label="1d dilation stride GQA rpb additional"),
    Case((5, 4), (3, 2), (1, 2), (2, 1), (False, True), heads=2, kv_heads=1, dim=3, dim_v=2, rpb=True, additional=2,
         label="2d mixed causal"),
    Case((4, 3, 3), (2, 3, 2), (2, 1, 1), (1, 2, 2), (True, False, True), heads=2, kv_heads=2, dim=2, dim_v=3,
         rpb=True, additional=1, label="3d"),
    Case((6,), (3,), (1,), (1,), (True,), scale=0.7, label="1d causal, explicit scale, plain"),
]


def leaves(case, dtype=torch.float64):
    return [None if a is None else torch.from_numpy(a).to(dtype).requires_grad_() for a in case.arrays()]


def fused(case, backend=None, return_lse=False):
    def f(q, k, v, rpb, ak, av):
        return nbhd.neighborhood_attention(q, k, v, scale=case.scale, rpb=rpb, additional_keys=ak,
                                           additional_values=av, return_lse=return_lse, backend=backend,
                                           **case.window_kwargs())
    return f


def gradcheck(f, inputs):
    present = [i for i, x in enumerate(inputs) if x is not None]

    def g(*given):
        full = list(inputs)
        for i, x in zip(present, given):
            full[i] = x
        return f(*full)

    assert torch.autograd.gradcheck(g, [inputs[i] for i in present], eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: c.label)
def test_gradcheck_fused(case, backend):
    gradcheck(fused(case, backend), leaves(case))


@pytest.mark.parametrize("case", GRAD_CASES[:3], ids=lambda c: c.label)
def test_gradcheck_unfused_chain(case):
    def f(q, k, v, rpb, ak, av):
        w = case.window_kwargs()
        attn = nbhd.ops.qk(q, k, scale=case.scale, rpb=rpb, additional_keys=ak, **w)
        return nbhd.ops.av(nbhd.ops.softmax(attn, **w), v, additional_values=av, **w)

    gradcheck(f, leaves(case))


def test_gradcheck_softmax_alone():
    # Finite inputs only: -inf slots have no meaningful finite difference.
    case = GRAD_CASES[1]
    attn = torch.randn(1, 5, 4, 2, 6 + 2, dtype=torch.float64, requires_grad=True)
    gradcheck(lambda a: nbhd.ops.softmax(a, **case.window_kwargs()), [attn])


def torch_reference(case, q, k, v, rpb, ak, av):
    """Dense attention in torch (differentiable) over the reference masks."""
    B, H, N = case.batch, case.heads, math.prod(case.extent)
    group = case.heads // case.kv_heads
    scale = case.scale if case.scale is not None else 1 / math.sqrt(case.dim)
    _, mask, deltas, _ = _grid(case)
    qf = q.reshape(B, N, H, -1)
    kf = k.reshape(B, N, case.kv_heads, -1).repeat_interleave(group, dim=2)
    vf = v.reshape(B, N, case.kv_heads, -1).repeat_interleave(group, dim=2)
    s = scale * torch.einsum("bthd,buhd->bhtu", qf, kf)
    if rpb is not None:
        s = s + rpb[(slice(None), *(torch.from_numpy(d) for d in deltas))]
    s = s.masked_fill(~torch.from_numpy(mask), -math.inf)
    if ak is not None:
        s = torch.cat([s, scale * torch.einsum("bthd,bmhd->bhtm", qf, ak.repeat_interleave(group, dim=2))], -1)
        vf = torch.cat([vf, av.repeat_interleave(group, dim=2)], 1)
    lse = torch.logsumexp(s, -1)
    out = torch.einsum("bhtu,buhd->bthd", torch.softmax(s, -1), vf)
    return out.reshape(B, *case.extent, H, -1), lse.transpose(1, 2).reshape(B, *case.extent, H)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", GRAD_CASES + [random_case(s) for s in range(6)], ids=str)
def test_gradients_through_out_and_lse_match_dense_torch(case, backend):
    torch.manual_seed(case.seed)
    inputs = leaves(case)
    out, lse = fused(case, backend, return_lse=True)(*inputs)
    ref_inputs = leaves(case)
    ref_out, ref_lse = torch_reference(case, *ref_inputs)
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-9)
    assert lse.dtype == torch.float64  # the spec: a float64 lse for float64 inputs
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    d_out, d_lse = torch.randn_like(out), torch.randn_like(ref_lse)
    ((out * d_out).sum() + (lse * d_lse).sum()).backward()
    ((ref_out * d_out).sum() + (ref_lse * d_lse).sum()).backward()
    for name, x, ref in zip(["query", "key", "value", "rpb", "additional_keys", "additional_values"], inputs,
                            ref_inputs):
        if x is not None:
            # float64 throughout (with a float32 lse, 1e-5 was as close as it got).
            torch.testing.assert_close(x.grad, ref.grad, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_gradient_through_lse_alone():
    case = GRAD_CASES[1]
    inputs = leaves(case)
    _, lse = fused(case, return_lse=True)(*inputs)
    lse.sum().backward()
    ref_inputs = leaves(case)
    torch_reference(case, *ref_inputs)[1].sum().backward()
    assert inputs[2].grad is None or torch.all(inputs[2].grad == 0)  # lse does not depend on value
    for x, ref in zip(inputs, ref_inputs):
        if x is not None and ref.grad is not None:
            torch.testing.assert_close(x.grad, ref.grad, rtol=1e-10, atol=1e-10)


def test_rpb_gradient_keeps_rpb_dtype():
    case = GRAD_CASES[0]
    q, k, v, rpb, ak, av = leaves(case)
    rpb32 = rpb.detach().float().requires_grad_()
    nbhd.na1d(q, k, v, rpb=rpb32, additional_keys=ak, additional_values=av, **case.window_kwargs()).sum().backward()
    assert rpb32.grad.dtype == torch.float32 and rpb32.grad.shape == rpb32.shape


def test_only_some_inputs_require_grad():
    case = GRAD_CASES[1]
    q, k, v, rpb, ak, av = [None if a is None else torch.from_numpy(a) for a in case.arrays()]
    v.requires_grad_()
    nbhd.na2d(q, k, v, rpb=rpb, additional_keys=ak, additional_values=av, **case.window_kwargs()).sum().backward()
    assert v.grad is not None and q.grad is None


class _Watching(torch.overrides.TorchFunctionMode):
    """A torch function mode that changes nothing: code under it must reach the operator."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_eager_path_and_operator_agree():
    # Plain tensors skip nbhd::na_forward's dispatch (_torch_ops.eager_call); under a
    # torch function mode (as under tracing) the operator runs. Same results, bitwise,
    # values and gradients, lse's gradient included.
    from nbhd import _torch_ops

    case = GRAD_CASES[1]
    results = []
    for watched in (False, True):
        inputs = leaves(case, torch.float32)
        with _Watching() if watched else contextlib.nullcontext():
            assert _torch_ops.eager_call(inputs) is not watched
            out, lse = fused(case, return_lse=True)(*inputs)
            (out.square().sum() + lse.sum()).backward()
        results.append([out, lse] + [x.grad for x in inputs])
    for eager, operator in zip(*results):
        assert torch.equal(eager, operator)


def test_eager_inference_skips_autograd_and_agrees(monkeypatch):
    # With nothing to differentiate (no input requires grad, or grad mode off) the
    # eager path calls the library without autograd.Function (its apply() raises
    # here): the same values, bitwise, as a call that records the graph, and no graph.
    from nbhd import _torch_ops

    case = GRAD_CASES[1]
    inputs = leaves(case, torch.float32)
    out, lse = fused(case, return_lse=True)(*inputs)
    assert out.grad_fn is not None and lse.grad_fn is not None

    def recorded(*args):
        raise AssertionError("an inference call went through autograd.Function")

    monkeypatch.setattr(_torch_ops._EagerAttention, "apply", recorded)
    plain = [None if x is None else x.detach() for x in inputs]
    for no_grad in (False, True):
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            out_i, lse_i = fused(case, return_lse=True)(*(plain if not no_grad else inputs))
        assert out_i.grad_fn is None and lse_i.grad_fn is None
        assert not out_i.requires_grad
        assert torch.equal(out_i, out.detach()) and torch.equal(lse_i, lse.detach())


def test_inference_without_lse_neither_allocates_nor_asks_for_it(monkeypatch):
    # An inference call that does not return lse passes the library no lse (one
    # allocation less per call; every backend takes a missing lse): the same out,
    # bitwise, as a call that returns it. A training call keeps lse for its backward.
    from nbhd import _nbhd

    case = GRAD_CASES[1]
    plain = [None if x is None else x.detach() for x in leaves(case, torch.float32)]
    out_with, lse = fused(case, return_lse=True)(*plain)
    seen = []
    library_forward = _nbhd.forward

    def recording(problem, query, key, value, out, lse=None, *rest, **options):
        seen.append(lse)
        return library_forward(problem, query, key, value, out, lse, *rest, **options)

    monkeypatch.setattr(_nbhd, "forward", recording)
    out_without = fused(case)(*plain)
    assert seen == [None]
    assert torch.equal(out_without, out_with)
    fused(case)(*leaves(case, torch.float32))
    assert len(seen) == 2 and seen[1] is not None


def test_second_derivatives_raise_on_both_paths():
    case = GRAD_CASES[3]
    for watched in (False, True):
        q, k, v, _, _, _ = leaves(case)
        with _Watching() if watched else contextlib.nullcontext():
            out = fused(case)(q, k, v, None, None, None)
            (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
            # With another term that does carry a graph, a dq without one would be
            # dropped silently from the second derivative.
            with pytest.raises(RuntimeError):
                (dq.sum() + q.square().sum()).backward()


def test_eager_path_is_refused_where_the_operator_must_run():
    from nbhd import _torch_ops

    q = torch.zeros(1, 4, 1, 2)
    assert _torch_ops.eager_call([q, q, q, None])
    assert not _torch_ops.eager_call([q.to("meta"), q, q])
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert not _torch_ops.eager_call([torch.zeros(1, 4, 1, 2)])
    assert not torch.vmap(lambda x: torch.tensor(_torch_ops.eager_call([x])))(torch.zeros(3, 1, 4, 1, 2)).any()


# ---------------------------------------------------------------------------- opcheck

def _op_samples():
    case = Case((5, 4), (3, 2), (1, 2), (2, 1), (False, True), heads=2, kv_heads=1, dim=3, dim_v=2, rpb=True,
                additional=2)
    q, k, v, rpb, ak, av = [torch.from_numpy(a).float() for a in case.arrays()]
    window = [[3, 2], [2, 1], [1, 2], [False, True], [True, False]]  # kernel, stride, dilation, causal, periodic
    out, lse = torch.ops.nbhd.na_forward(q, k, v, rpb, ak, av, *window, None, None)
    attn = torch.ops.nbhd.na_qk(q, k, rpb, ak, *window, 0.5, None)
    probs = torch.ops.nbhd.na_softmax(attn, *window, None)

    def grad(t):
        return t.detach().clone().requires_grad_()

    return [
        pytest.param("na_forward", (grad(q), grad(k), grad(v), grad(rpb), grad(ak), grad(av), *window, None, None),
                     id="na_forward-every-input"),
        pytest.param("na_forward", (grad(q), grad(k), grad(v), None, None, None, *window, 0.3, "reference"),
                     id="na_forward-plain"),
        pytest.param("na_backward", (torch.randn_like(out), q, k, v, out, lse, None, rpb, ak, av, *window, None, None),
                     id="na_backward"),
        pytest.param("na_backward", (torch.randn_like(out), q, k, v, out, lse, torch.randn_like(lse), rpb, ak, av,
                                     *window, None, None), id="na_backward-lse-gradient"),
        pytest.param("na_qk", (grad(q), grad(k), grad(rpb), grad(ak), *window, 0.5, None), id="na_qk"),
        pytest.param("na_qk_backward", (torch.randn_like(attn), q, k, ak, True, *window, 0.5, None),
                     id="na_qk_backward"),
        pytest.param("na_softmax", (grad(attn), *window, None), id="na_softmax"),
        pytest.param("na_softmax_backward", (probs, torch.randn_like(probs), *window, None),
                     id="na_softmax_backward"),
        pytest.param("na_av", (grad(probs), grad(v), grad(av), *window, None), id="na_av"),
        pytest.param("na_av_backward", (torch.randn_like(out), probs, v, av, *window, None), id="na_av_backward"),
    ]


@pytest.mark.parametrize("name,args", _op_samples())
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.nbhd, name).default, args)


def test_numpy_path_does_not_need_autograd():
    case = GRAD_CASES[0]
    out = nbhd.na1d(*case.arrays()[:3], **case.window_kwargs())
    assert isinstance(out, np.ndarray)


def test_gradcheck_merge_attentions():
    outs = [torch.randn(1, 3, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    lses = [torch.randn(1, 3, 2, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(lambda *x: nbhd.merge_attentions(x[:3], x[3:]), (*outs, *lses))
