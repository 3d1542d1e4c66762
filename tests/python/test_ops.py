# SPDX-License-Identifier: Apache-2.0
"""Unfused operations (nbhd.ops): the weights' layout against the dense reference,
softmax, av, and qk -> softmax -> av equal to the fused result."""

import numpy as np
import pytest

import nbhd
from dense_reference import NAMED_CASES, attention, random_case, window_weights

CASES = NAMED_CASES + [random_case(seed) for seed in range(100, 112)]


def softmax_rows(attn):
    top = attn.max(-1, keepdims=True)
    e = np.exp(attn - top)
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label or f"seed{c.seed}")
def test_qk_softmax_av_match_the_reference(case):
    q, k, v, rpb, ak, av = case.arrays()
    w = case.window_kwargs()
    attn = nbhd.ops.qk(q, k, scale=case.scale, rpb=rpb, additional_keys=ak, **w)
    expected = window_weights(case, q, k, rpb, ak)
    assert attn.shape == expected.shape
    np.testing.assert_array_equal(np.isneginf(attn), np.isneginf(expected), err_msg=str(case))
    np.testing.assert_allclose(attn, expected, rtol=1e-10, atol=1e-12, err_msg=str(case))

    probs = nbhd.ops.softmax(attn, **w)
    np.testing.assert_allclose(probs, softmax_rows(expected), rtol=1e-10, atol=1e-12)
    assert np.all(probs[np.isneginf(expected)] == 0)

    out = nbhd.ops.av(probs, v, additional_values=av, **w)
    ref_out, _ = attention(case, q, k, v, rpb, ak, av)
    np.testing.assert_allclose(out, ref_out, rtol=1e-10, atol=1e-12)


def test_torch_matches_numpy():
    torch = pytest.importorskip("torch")
    case = NAMED_CASES[6]
    arrays = case.arrays()
    t = [None if a is None else torch.from_numpy(a) for a in arrays]
    w = case.window_kwargs()
    attn = nbhd.ops.qk(arrays[0], arrays[1], rpb=arrays[3], additional_keys=arrays[4], **w)
    attn_t = nbhd.ops.qk(t[0], t[1], rpb=t[3], additional_keys=t[4], **w)
    np.testing.assert_array_equal(attn_t.numpy(), attn)
    probs_t = nbhd.ops.softmax(attn_t, **w)
    out_t = nbhd.ops.av(probs_t, t[2], additional_values=t[5], **w)
    np.testing.assert_allclose(out_t.numpy(), nbhd.na3d(*arrays[:3], rpb=arrays[3], additional_keys=arrays[4],
                                                        additional_values=arrays[5], **w), rtol=1e-10, atol=1e-12)


def test_weights_layout_is_documented_row_major_slot_order():
    # 2x3 grid, 2x3 window = the whole grid: query (0, 0) sees key (a, b) at slot 3a + b.
    q = np.zeros((1, 2, 3, 1, 1))
    k = np.arange(6, dtype=np.float64).reshape(1, 2, 3, 1, 1)
    attn = nbhd.ops.qk(q + 1, k, (2, 3), scale=1.0)
    np.testing.assert_array_equal(attn[0, 0, 0, 0], np.arange(6))


def test_softmax_needs_the_window_slots():
    attn = np.zeros((1, 5, 1, 2))
    with pytest.raises(ValueError, match=r"attn has 2 slots in its last dimension but kernel_size \(3,\) needs"):
        nbhd.ops.softmax(attn, 3)


def test_unfused_ops_do_not_run_on_the_cpu_backend():
    q = np.zeros((1, 5, 1, 2))
    with pytest.raises(ValueError, match="with backend .cpu.:\n  cpu: it does not implement unfused operations"):
        nbhd.ops.qk(q, q, 3, backend="cpu")
