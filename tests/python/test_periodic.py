# SPDX-License-Identifier: Apache-2.0
"""Periodic (wrap-around) axes through the Python API: fused attention, lse and
gradients, the unfused operations and the layers against the dense reference (which
learns step 3' of the spec on its own), torch.compile, and the refusals: periodic with
causal and a malformed `periodic`."""

import numpy as np
import pytest

import nbhd
from dense_reference import Case, attention, random_case, window_weights

F64 = dict(rtol=1e-10, atol=1e-12)
CASES = [
    Case((9,), (3,), (1,), (1,), (False,), (True,), heads=2, dim=3, rpb=True, label="1d k3 wraps at both ends"),
    Case((10,), (4,), (2,), (2,), (False,), (True,), dim=3, additional=2, label="1d even kernel, dilation, stride"),
    Case((6, 12), (3, 5), (1, 2), (1, 1), (True, False), (False, True), heads=4, kv_heads=2, dim=4, rpb=True,
         label="2d causal rows, periodic longitude"),
    Case((5, 6, 7), (3, 3, 7), (1, 2, 1), (1, 3, 1), (False,) * 3, (True, True, True), heads=2, dim=2, rpb=True,
         label="3d torus, kernel == extent on one axis"),
] + [random_case(seed, periodic=True) for seed in range(300, 316)]
IDS = [c.label or f"seed{c.seed}" for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_and_lse_match_the_reference(case):
    q, k, v, rpb, ak, av = case.arrays()
    out, lse = nbhd.neighborhood_attention(q, k, v, scale=case.scale, rpb=rpb, additional_keys=ak,
                                           additional_values=av, return_lse=True, **case.window_kwargs())
    ref, ref_lse = attention(case, q, k, v, rpb, ak, av)
    np.testing.assert_allclose(out, ref, **F64)
    np.testing.assert_allclose(lse, ref_lse, **F64)


@pytest.mark.parametrize("case", CASES[:8], ids=IDS[:8])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_each_cpu_backend_matches_the_reference(case, backend):
    q, k, v, rpb, ak, av = case.arrays()
    out, lse = nbhd.neighborhood_attention(q, k, v, scale=case.scale, rpb=rpb, additional_keys=ak,
                                           additional_values=av, return_lse=True, backend=backend,
                                           **case.window_kwargs())
    ref, ref_lse = attention(case, q, k, v, rpb, ak, av)
    np.testing.assert_allclose(out, ref, **F64)
    np.testing.assert_allclose(lse, ref_lse, **F64)


@pytest.mark.parametrize("case", CASES[:4], ids=IDS[:4])
def test_unfused_weights_sit_in_window_slots(case):
    q, k, v, rpb, ak, av = case.arrays()
    w = case.window_kwargs()
    attn = nbhd.ops.qk(q, k, scale=case.scale, rpb=rpb, additional_keys=ak, **w)
    np.testing.assert_allclose(attn, window_weights(case, q, k, rpb, ak), **F64)
    out = nbhd.ops.av(nbhd.ops.softmax(attn, **w), v, additional_values=av, **w)
    np.testing.assert_allclose(out, attention(case, q, k, v, rpb, ak, av)[0], **F64)


def test_a_window_wraps_instead_of_shifting():
    # 1-D, L = 7, k = 3: query 0 sees keys 6, 0, 1 (not 0, 1, 2 as without wrapping).
    q = np.zeros((1, 7, 1, 1))
    v = np.arange(7, dtype=np.float64).reshape(1, 7, 1, 1)
    out = nbhd.na1d(q, q, v, 3, periodic=True)
    np.testing.assert_allclose(out[0, :, 0, 0], [7 / 3, 1, 2, 3, 4, 5, 11 / 3], **F64)
    np.testing.assert_allclose(nbhd.na1d(q, q, v, 3)[0, :, 0, 0], [1, 1, 2, 3, 4, 5, 5], **F64)


torch = pytest.importorskip("torch")


@pytest.mark.parametrize("case", CASES[:6], ids=IDS[:6])
def test_gradients_match_the_reference_by_gradcheck(case):
    q, k, v, rpb, ak, av = (None if a is None else torch.from_numpy(a).requires_grad_() for a in case.arrays())

    def f(q, k, v, *extra):
        rest = dict(zip([n for n, a in (("rpb", rpb), ("additional_keys", ak), ("additional_values", av))
                         if a is not None], extra))
        out, lse = nbhd.neighborhood_attention(q, k, v, scale=case.scale, return_lse=True, **rest,
                                               **case.window_kwargs())
        return out, lse

    inputs = [q, k, v] + [a for a in (rpb, ak, av) if a is not None]
    assert torch.autograd.gradcheck(f, inputs)


def test_layer_and_compile():
    torch.manual_seed(0)
    layer = nbhd.nn.NeighborhoodAttention2D(8, 2, (3, 5), dilation=(1, 2), periodic=(False, True),
                                            rel_pos_bias=True)
    x = torch.randn(2, 6, 11, 8)
    eager = layer(x)
    assert "periodic=(False, True)" in repr(layer)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), eager)
    # The same layer without wrapping differs only where windows reach the seam.
    plain = nbhd.nn.NeighborhoodAttention2D(8, 2, (3, 5), dilation=(1, 2), rel_pos_bias=True)
    plain.load_state_dict(layer.state_dict())
    differs = (plain(x) - eager).abs().amax(dim=(0, 1, 3)) > 1e-6
    assert differs[:4].all() and differs[-4:].all() and not differs[4:7].any()


@pytest.mark.parametrize("call,error,words", [
    (lambda q: nbhd.na1d(q, q, q, 3, is_causal=True, periodic=True), ValueError,
     ["periodic[axis 0]", "causal[axis 0]"]),
    (lambda q: nbhd.na1d(q, q, q, 3, periodic=(True, False)), ValueError, ["periodic", "1"]),
    (lambda q: nbhd.na1d(q, q, q, 3, periodic="yes"), TypeError, ["periodic"]),
    (lambda q: nbhd.na1d(q, q, q, 5, dilation=2, periodic=True), ValueError, ["kernel_size", "10", "9"]),
])
def test_refusals_name_the_argument(call, error, words):
    q = np.zeros((1, 9, 1, 2))
    with pytest.raises(error) as info:
        call(q)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
