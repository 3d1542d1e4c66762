# SPDX-License-Identifier: Apache-2.0
"""CUDA backends against the CPU path, forward and gradients, through the same Python
entry points. Every test here is marked `cuda` and is skipped without a GPU and a
CUDA backend in the build (conftest.py)."""

import copy
import math

import numpy as np
import pytest

import nbhd
from dense_reference import Case

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.cuda

# Head dims are multiples of 32 so that the fused kernels' builds take them.
CASES = [
    Case((37,), (7,), (2,), (1,), (False,), batch=2, heads=2, kv_heads=2, dim=32, dim_v=32, label="1d dilation"),
    Case((19, 14), (5, 3), (2, 1), (1, 3), (False, True), heads=4, kv_heads=2, dim=64, dim_v=64, rpb=True,
         label="2d GQA rpb causal stride"),
    Case((13, 11), (4, 4), (1, 2), (2, 2), (True, True), heads=2, kv_heads=1, dim=32, dim_v=32, additional=5,
         label="2d causal additional"),
    Case((6, 7, 5), (3, 3, 3), (2, 1, 1), (1, 2, 1), (False, True, False), heads=2, kv_heads=2, dim=32, dim_v=32,
         rpb=True, label="3d"),
    Case((16, 16), (16, 16), (1, 1), (1, 1), (False, False), heads=2, kv_heads=2, dim=128, dim_v=128,
         label="2d self attention"),
]
# Error bounds against float64 on the CPU: fp32 may run as TF32 on tensor cores.
TOLERANCE = {torch.float32: 3e-3, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def cuda_backends(kind):
    return [b["name"] for b in nbhd.backends() if b["device"] == "cuda" and b[kind]]


def inputs(case, dtype, device):
    """The case's arrays rounded to dtype on `device`, and the same values in float64 on the CPU."""
    arrays = [None if a is None else torch.from_numpy(a).to(dtype) for a in case.arrays()]
    on_device = [None if a is None else a.to(device).detach().clone().requires_grad_() for a in arrays]
    on_cpu = [None if a is None else a.double().detach().clone().requires_grad_() for a in arrays]
    return on_device, on_cpu


def attention(case, backend):
    def f(q, k, v, rpb, ak, av):
        return nbhd.neighborhood_attention(q, k, v, scale=case.scale, rpb=rpb, additional_keys=ak,
                                           additional_values=av, return_lse=True, backend=backend,
                                           **case.window_kwargs())
    return f


def skip_unless_runs(backend, case, dtype):
    if backend is None:
        return
    from nbhd import _core

    q, k, v, rpb, ak, av = case.arrays()
    problem = _core.attention_problem(_core.make_window(case.rank, **case.window_kwargs()), q.shape, k.shape,
                                      v.shape, case.scale, None if ak is None else ak.shape,
                                      None if av is None else av.shape, rpb is not None)
    problem.dtype = str(dtype).replace("torch.", "")
    why = nbhd._nbhd.can_run(backend, problem, "cuda")
    if why:
        pytest.skip(f"{backend} cannot run {case.label} in {problem.dtype}: {why}")


def assert_close(actual, expected, dtype, what):
    tol = TOLERANCE[dtype]
    scale = max(1.0, float(expected.detach().abs().max()))
    torch.testing.assert_close(actual.detach().double().cpu(), expected.detach().double(), rtol=tol,
                               atol=tol * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", [None] + cuda_backends("fused_ops"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_forward_and_gradients_match_cpu(case, backend, dtype):
    skip_unless_runs(backend, case, dtype)
    on_gpu, on_cpu = inputs(case, dtype, "cuda")
    out, lse = attention(case, backend)(*on_gpu)
    ref_out, ref_lse = attention(case, "cpu")(*on_cpu)
    assert out.is_cuda and out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")
    d_out = torch.randn_like(ref_out)
    out.backward(d_out.to("cuda", dtype))
    ref_out.backward(d_out)
    for name, x, ref in zip(["query", "key", "value", "rpb", "additional_keys", "additional_values"], on_gpu,
                            on_cpu):
        if x is not None:
            assert_close(x.grad, ref.grad, dtype, f"d {name}")


@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: c.label)
def test_unfused_ops_match_cpu(case):
    if not cuda_backends("unfused_ops"):
        pytest.skip("no CUDA backend with the unfused operations was built")
    dtype = torch.float32
    on_gpu, on_cpu = inputs(case, dtype, "cuda")
    w = case.window_kwargs()

    def chain(q, k, v, rpb, ak, av):
        attn = nbhd.ops.qk(q, k, scale=case.scale, rpb=rpb, additional_keys=ak, **w)
        return attn, nbhd.ops.av(nbhd.ops.softmax(attn, **w), v, additional_values=av, **w)

    attn, out = chain(*on_gpu)
    ref_attn, ref_out = chain(*on_cpu)
    finite = torch.isfinite(ref_attn)
    assert torch.equal(torch.isfinite(attn).cpu(), finite)
    assert_close(attn[finite.cuda()], ref_attn[finite], dtype, "attn")
    assert_close(out, ref_out, dtype, "out")
    d_out = torch.randn_like(ref_out)
    out.backward(d_out.cuda())
    ref_out.backward(d_out)
    for x, ref in zip(on_gpu, on_cpu):
        if x is not None:
            assert_close(x.grad, ref.grad, dtype, "grad")


def test_runs_on_the_current_stream():
    # Work queued on a side stream before the call must be seen by it: if nbhd ran on
    # another stream it would read q2 before the multiply wrote it.
    case = CASES[1]
    q, k, v, rpb, _, _ = [None if a is None else torch.from_numpy(a).float().cuda() for a in case.arrays()]
    expected = nbhd.na2d(q * 2, k, v, rpb=rpb, **case.window_kwargs())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        q2 = q * 2
        out = nbhd.na2d(q2, k, v, rpb=rpb, **case.window_kwargs())
    side.synchronize()
    torch.testing.assert_close(out, expected)


def test_deterministic_gradients_are_bitwise_reproducible():
    case = CASES[1]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            on_gpu, _ = inputs(case, torch.float16, "cuda")
            out, _ = attention(case, None)(*on_gpu)
            out.sum().backward()
            grads.append([x.grad.clone() for x in on_gpu if x is not None])
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_inner_stride_is_taken_or_refused_clearly():
    q = torch.randn(1, 9, 2, 64, device="cuda", dtype=torch.float16)
    q_strided = torch.randn(1, 9, 2, 128, device="cuda", dtype=torch.float16)[..., ::2]
    try:
        out = nbhd.na1d(q_strided, q, q, 3)
    except ValueError as e:
        assert "contiguous" in str(e)
    else:
        torch.testing.assert_close(out, nbhd.na1d(q_strided.contiguous(), q, q, 3))


def test_expanded_gradient_of_a_sum_works():
    # out.sum().backward() hands the backward a gradient with stride 0 everywhere.
    q = torch.randn(1, 12, 2, 32, device="cuda", dtype=torch.float16, requires_grad=True)
    nbhd.na1d(q, q, q, 5).sum().backward()
    assert torch.isfinite(q.grad).all()


def test_module_and_compile_on_cuda():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64),
                                nbhd.nn.NeighborhoodAttention2D(64, 2, kernel_size=5, rel_pos_bias=True))
    model_cpu = copy.deepcopy(model).double()
    model = model.cuda()
    x = torch.randn(2, 11, 9, 8)
    eager = model(x.cuda())
    compiled = torch.compile(model, fullgraph=True)(x.cuda())
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)
    reference = model_cpu(x.double())
    torch.testing.assert_close(eager.double().cpu(), reference, rtol=3e-3, atol=3e-3)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    q = torch.randn(1, 10, 2, 32, device="cuda:1")
    out = nbhd.na1d(q, q, q, 3)
    assert out.device == q.device
    torch.testing.assert_close(out.cpu(), nbhd.na1d(q.cpu(), q.cpu(), q.cpu(), 3), rtol=3e-3, atol=3e-3)


def test_numpy_inputs_stay_on_the_cpu():
    q = np.random.default_rng(0).standard_normal((1, 9, 1, 32)).astype(np.float32)
    assert isinstance(nbhd.na1d(q, q, q, 3), np.ndarray)


def test_case_sizes_are_valid():
    for case in CASES:
        for L, k, d in zip(case.extent, case.kernel, case.dilation):
            assert k * d <= L, case.label
        assert math.prod(case.extent) > 0
