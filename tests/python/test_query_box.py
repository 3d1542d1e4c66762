# SPDX-License-Identifier: Apache-2.0
"""query_box: only the queries of a box of the grid are computed (query, out and lse
hold the box's tokens, key and value the grid's, windows the grid's). On seeded random
problems (dense_reference.random_case: dilation, stride, causal, periodic, GQA, rpb,
additional tokens) and random boxes, in float64 on the CPU backends: out, lse and every
gradient (through out and lse) equal the whole call's restricted to the box, where the
whole call's loss weights only the box's queries. numpy and torch; keyword-only;
refusals."""

import numpy as np
import pytest

import nbhd
from dense_reference import random_case

torch = pytest.importorskip("torch")

F64 = dict(rtol=1e-10, atol=1e-12)


def random_box(case, seed):
    rng = np.random.default_rng(seed)
    box = []
    for n in case.extent:
        begin = int(rng.integers(0, n))
        box.append((begin, int(rng.integers(begin + 1, n + 1))))
    return tuple(box)


def index(box):
    return (slice(None), *(slice(b, e) for b, e in box))


def kwargs(case):
    return dict(scale=case.scale, return_lse=True, **case.window_kwargs())


def results(case, arrays, box, backend, query_box=None):
    """out, lse and the gradients of q, k, v, rpb, additional keys and values of
    <out, g_out> + <lse, g_lse> with g zero outside `box`."""
    leaves = [None if a is None else torch.from_numpy(a).requires_grad_() for a in arrays]
    q, k, v, rpb, ak, av = leaves
    if query_box is not None:
        q = q[index(box)].detach().clone().requires_grad_()
        leaves[0] = q
    out, lse = nbhd.neighborhood_attention(q, k, v, rpb=rpb, additional_keys=ak, additional_values=av,
                                           backend=backend, query_box=query_box, **kwargs(case))
    rng = torch.Generator().manual_seed(case.seed)
    g_out = torch.randn(case.batch, *case.extent, case.heads, case.dim_v, generator=rng, dtype=torch.float64)
    g_lse = torch.randn(g_out.shape[:-1], generator=rng, dtype=torch.float64)
    if query_box is None:
        inside = torch.zeros_like(g_lse)
        inside[index(box)] = 1
        g_out, g_lse = g_out * inside[..., None], g_lse * inside
    else:
        g_out, g_lse = g_out[index(box)], g_lse[index(box)]
    ((out * g_out).sum() + (lse * g_lse).sum()).backward()
    return [out.detach(), lse.detach()] + [None if t is None else t.grad for t in leaves]


NAMES = ["out", "lse", "d query", "d key", "d value", "d rpb", "d additional_keys", "d additional_values"]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("seed", range(12))
def test_box_equals_the_whole_call_restricted(seed, backend):
    case = random_case(seed, periodic=seed % 3 == 0)
    box = random_box(case, seed)
    arrays = case.arrays()
    whole = results(case, arrays, box, backend)
    got = results(case, arrays, box, backend, query_box=box)
    for i, (name, w, g) in enumerate(zip(NAMES, whole, got)):
        if w is None:
            continue
        expected = w[index(box)] if i in (0, 1, 2) else w
        torch.testing.assert_close(g, expected, **F64, msg=lambda m, name=name: f"{case}, box {box}: {name}: {m}")


def test_numpy_takes_the_box_too():
    case = random_case(5, rank=2)
    box = random_box(case, 5)
    q, k, v, rpb, ak, av = case.arrays()
    common = dict(rpb=rpb, additional_keys=ak, additional_values=av, **kwargs(case))
    out, lse = nbhd.neighborhood_attention(q, k, v, **common)
    out_box, lse_box = nbhd.na2d(np.ascontiguousarray(q[index(box)]), k, v, query_box=box, **common)
    np.testing.assert_allclose(out_box, out[index(box)], **F64)
    np.testing.assert_allclose(lse_box, lse[index(box)], **F64)


def test_a_box_of_the_whole_grid_is_the_plain_call():
    case = random_case(2, rank=3)
    q, k, v, *_ = (torch.from_numpy(a) if a is not None else None for a in case.arrays())
    whole = tuple((0, n) for n in case.extent)
    torch.testing.assert_close(nbhd.na3d(q, k, v, query_box=whole, **kwargs(case)),
                               nbhd.na3d(q, k, v, **kwargs(case)), rtol=0, atol=0)


def test_query_box_is_keyword_only_and_checked():
    q = torch.zeros(1, 8, 2, 4, dtype=torch.float64)
    k = torch.zeros(1, 10, 2, 4, dtype=torch.float64)
    with pytest.warns(FutureWarning, match="query_box passed by position"):
        nbhd.na1d(q, k, k, 3, 1, 1, False, None, None, None, None, False, None, False, ((1, 9),))
    with pytest.raises(ValueError, match=r"query has shape \[1, 8, 2, 4\] but the problem needs \[1, 9, 2, 4\]"):
        nbhd.na1d(q, k, k, 3, query_box=((1, 10),))
    with pytest.raises(ValueError, match=r"query_end\[axis 0\] = 11 is invalid.*extent = 10"):
        nbhd.na1d(q, k, k, 3, query_box=((3, 11),))
    with pytest.raises(ValueError, match="one \\(begin, end\\) pair per spatial axis \\(1\\)"):
        nbhd.na1d(q, k, k, 3, query_box=(1, 9))
    with pytest.raises(ValueError, match=r"query_box\[axis 0\] = \(4, 0\) is invalid: end must be greater"):
        nbhd.na1d(q, k, k, 3, query_box=((4, 0),))
    with pytest.raises(TypeError, match="must hold ints"):
        nbhd.na1d(q, k, k, 3, query_box=((1.0, 9),))


def test_the_problem_carries_the_box_and_the_cpu_backends_run_it_both_ways():
    p = nbhd._nbhd.Problem()
    p.rank, p.extent, p.kernel, p.dim = 1, [10, 1, 1], [3, 1, 1], 4
    p.query_begin, p.query_end = [1, 0, 0], [9, 0, 0]
    p.validate()
    assert p.has_query_box() and "query_box=1:9" in repr(p)
    for backward in (False, True):
        assert nbhd._nbhd.can_run("cpu", p, "cpu", backward) == ""
        assert nbhd._nbhd.can_run("reference", p, "cpu", backward=backward) == ""
    reason = nbhd._nbhd.can_run("auto", p, "cuda")
    cuda = {b["name"] for b in nbhd._nbhd.built_backends() if b["device"] == "cuda"}
    if not cuda:
        assert "no backend can run the forward" in reason
    else:  # naive and fused run both passes of a box, gemm neither
        assert reason == "" and nbhd._nbhd.can_run("auto", p, "cuda", backward=True) == ""
        if "gemm" in cuda:
            assert "query sub-box: not implemented in backend gemm" in nbhd._nbhd.can_run("gemm", p, "cuda")
