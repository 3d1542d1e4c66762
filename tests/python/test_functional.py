# SPDX-License-Identifier: Apache-2.0
"""Fused functions against the dense reference: numpy and torch, every CPU backend,
ranks 1-3, every parameter; layouts and frameworks in and out."""

import itertools

import numpy as np
import pytest

import nbhd
from dense_reference import NAMED_CASES, Case, attention, random_case

torch = pytest.importorskip("torch")

CPU_BACKENDS = ["reference", "cpu"]
RANDOM_CASES = [random_case(seed) for seed in range(24)]


def run_numpy(case, backend, dtype=np.float64, return_lse=True):
    q, k, v, rpb, ak, av = case.arrays(dtype)
    return nbhd.neighborhood_attention(q, k, v, scale=case.scale, rpb=rpb, additional_keys=ak,
                                       additional_values=av, return_lse=return_lse, backend=backend,
                                       **case.window_kwargs())


def check_against_reference(case, out, lse, rtol, atol):
    ref_out, ref_lse = attention(case, *case.arrays())
    np.testing.assert_allclose(np.asarray(out, dtype=np.float64), ref_out, rtol=rtol, atol=atol, err_msg=str(case))
    lse_tol = 1e-12 if np.asarray(lse).dtype == np.float64 else 1e-6
    np.testing.assert_allclose(np.asarray(lse, dtype=np.float64), ref_lse, rtol=lse_tol, atol=lse_tol, err_msg=str(case))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", NAMED_CASES + RANDOM_CASES, ids=lambda c: c.label or f"seed{c.seed}")
def test_matches_dense_reference(case, backend):
    out, lse = run_numpy(case, backend)
    assert out.dtype == np.float64 and lse.dtype == np.float64  # the spec: float64 lse for float64 inputs
    check_against_reference(case, out, lse, rtol=1e-10, atol=1e-12)


def test_random_cases_cover_every_feature():
    cases = NAMED_CASES + RANDOM_CASES
    assert {c.rank for c in cases} == {1, 2, 3}
    assert any(c.heads != c.kv_heads for c in cases)
    assert any(c.dim != c.dim_v for c in cases)
    assert any(c.additional for c in cases) and any(c.rpb for c in cases)
    assert any(s > 1 for c in cases for s in c.stride)
    assert any(L % d for c in cases for L, d in zip(c.extent, c.dilation) if d > 1)  # unequal groups
    assert any(any(c.causal) and not all(c.causal) for c in cases)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_every_causal_combination(rank):
    extent = {1: (10,), 2: (7, 6), 3: (7, 4, 5)}[rank]
    for causal in itertools.product([False, True], repeat=rank):
        case = Case(extent, (3,) * rank, (2,) + (1,) * (rank - 1), (1,) * (rank - 1) + (2,), causal, heads=2,
                    kv_heads=1, dim=3, dim_v=2, rpb=True, additional=1)
        out, lse = run_numpy(case, "auto")
        check_against_reference(case, out, lse, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 2e-5), (np.float16, 5e-3)])
def test_low_precision_numpy(dtype, rtol):
    case = NAMED_CASES[4]
    out, lse = run_numpy(case, "auto", dtype=dtype)
    assert out.dtype == dtype
    ref_out, ref_lse = attention(case, *case.arrays(dtype))
    np.testing.assert_allclose(out.astype(np.float64), ref_out, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_torch_in_torch_out(dtype, tol):
    case = NAMED_CASES[6]
    arrays = [None if a is None else torch.from_numpy(a).to(dtype) for a in case.arrays()]
    q, k, v, rpb, ak, av = arrays
    out, lse = nbhd.na3d(q, k, v, rpb=rpb, additional_keys=ak, additional_values=av, return_lse=True,
                         **case.window_kwargs())
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == (case.batch, *case.extent, case.heads, case.dim_v)
    rounded = [None if a is None else a.double().numpy() for a in arrays]
    ref_out, ref_lse = attention(case, *rounded)
    np.testing.assert_allclose(out.double().numpy(), ref_out, rtol=tol, atol=tol)
    np.testing.assert_allclose(lse.numpy(), ref_lse, rtol=tol, atol=tol)


def test_numpy_in_numpy_out_and_torch_agrees():
    case = NAMED_CASES[0]
    q, k, v, *_ = case.arrays()
    out = nbhd.na1d(q, k, v, **case.window_kwargs())
    assert isinstance(out, np.ndarray) and out.shape == (1, 13, 1, 4)
    out_t = nbhd.na1d(*(torch.from_numpy(a) for a in (q, k, v)), **case.window_kwargs())
    np.testing.assert_array_equal(out_t.numpy(), out)


def test_return_lse_false_returns_out_only():
    q = np.random.default_rng(0).standard_normal((1, 6, 1, 2))
    out = nbhd.na1d(q, q, q, 3)
    assert isinstance(out, np.ndarray) and out.shape == q.shape


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs_follow_their_strides(backend):
    case = NAMED_CASES[4]
    q, k, v, rpb, ak, av = case.arrays()
    # Views with other strides: a transposed copy transposed back, and every other element.
    q_view = np.ascontiguousarray(q.transpose(0, 3, 1, 2, 4)).transpose(0, 2, 3, 1, 4)
    k_wide = np.zeros(k.shape[:-1] + (2 * k.shape[-1],))
    k_wide[..., ::2] = k
    k_view = k_wide[..., ::2]
    v_view = np.asfortranarray(v)
    rpb_view = np.ascontiguousarray(rpb.transpose(2, 1, 0)).transpose(2, 1, 0)
    assert not (q_view.flags.c_contiguous or k_view.flags.c_contiguous or v_view.flags.c_contiguous)
    kwargs = dict(scale=case.scale, backend=backend, **case.window_kwargs())
    expected = nbhd.na2d(q, k, v, rpb=rpb, **kwargs)
    np.testing.assert_allclose(nbhd.na2d(q_view, k_view, v_view, rpb=rpb_view, **kwargs), expected, rtol=1e-12)
    t = [torch.from_numpy(a) for a in (q_view, k_view, v_view, rpb_view)]
    np.testing.assert_allclose(nbhd.na2d(*t[:3], rpb=t[3], **kwargs).numpy(), expected, rtol=1e-12)


def test_rpb_may_be_float32_for_other_dtypes():
    case = NAMED_CASES[4]
    q, k, v, rpb, _, _ = case.arrays()
    out = nbhd.na2d(q, k, v, rpb=rpb.astype(np.float32), **case.window_kwargs())
    ref, _ = attention(case, q, k, v, rpb.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)


def test_rank_specific_functions_check_rank():
    q = np.zeros((1, 4, 4, 1, 2))
    with pytest.raises(ValueError, match=r"na1d takes query \[batch, X1, heads, dim\]"):
        nbhd.na1d(q, q, q, 3)
    with pytest.raises(ValueError, match="na3d"):
        nbhd.na3d(q, q, q, 3)


def test_read_only_numpy_inputs_work():
    q = np.random.default_rng(1).standard_normal((1, 5, 1, 3))
    q.setflags(write=False)
    assert nbhd.na1d(q, q, q, 3).shape == q.shape


def test_deterministic_flag_follows_torch(monkeypatch):
    seen = []
    real = nbhd._core._nbhd.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["deterministic"])
        return real(*args, **kwargs)

    monkeypatch.setattr(nbhd._core._nbhd, "forward", spy)
    q = torch.randn(1, 5, 1, 2)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        nbhd.na1d(q, q, q, 3)
        torch.use_deterministic_algorithms(False)
        nbhd.na1d(q, q, q, 3)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert seen == [True, False]


def test_merge_attentions_equals_attention_over_the_union():
    # Neighborhood + additional tokens in one call == neighborhood alone merged with
    # dense attention over the additional tokens alone.
    case = NAMED_CASES[5]
    q, k, v, _, ak, av = case.arrays()
    full, full_lse = nbhd.na2d(q, k, v, additional_keys=ak, additional_values=av, return_lse=True,
                               **case.window_kwargs())
    part, part_lse = nbhd.na2d(q, k, v, return_lse=True, **case.window_kwargs())
    scale = 1 / np.sqrt(case.dim)
    s = scale * np.einsum("bxyhd,bmhd->bxyhm", q, ak)
    extra_lse = np.log(np.exp(s).sum(-1))
    extra = np.einsum("bxyhm,bmhd->bxyhd", np.exp(s - extra_lse[..., None]), av)
    for framework in (np.asarray, torch.from_numpy):
        out, lse = nbhd.merge_attentions([framework(part), framework(extra)],
                                         [framework(part_lse), framework(extra_lse)])
        np.testing.assert_allclose(np.asarray(out), full, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(lse), full_lse, rtol=1e-6, atol=1e-6)


def test_merge_attentions_of_empty_parts_is_zero_not_nan():
    out = np.ones((1, 2, 1, 3))
    lse = np.full((1, 2, 1), -np.inf)
    merged, merged_lse = nbhd.merge_attentions([out, out], [lse, lse])
    assert np.all(merged == 0) and np.all(np.isneginf(merged_lse))
    merged_t, _ = nbhd.merge_attentions([torch.from_numpy(out)] * 2, [torch.from_numpy(lse)] * 2)
    assert torch.all(merged_t == 0)


def test_backends_lists_what_was_built():
    built = nbhd.backends()
    names = [b["name"] for b in built]
    assert {"reference", "cpu"} <= set(names)
    for b in built:
        assert b["device"] in ("cpu", "cuda") and isinstance(b["fused_ops"], bool)
    assert next(b for b in built if b["name"] == "reference")["unfused_ops"]
