# SPDX-License-Identifier: Apache-2.0
"""nbhd.compat.natten: every generation's functions and layers against a float64
reference written from NATTEN's documented semantics (heads-first unfused operations on
queries scaled beforehand, rpb [heads, 2k-1, ...], the layer's qkv -> attention -> proj),
built on the spec's dense reference (dense_reference.py), not on nbhd's code. Also: the
positional arguments whose meaning differs between generations, state dicts saved by
NATTEN-shaped layers loading with strict=True, gradcheck through the unfused operations,
torch.compile(fullgraph=True) of the layers, every refusal, and install()."""

import math
import pickle
import sys

import numpy as np
import pytest

import nbhd
from dense_reference import Case, attention, window_weights

torch = pytest.importorskip("torch")
import nbhd.compat.natten as natten  # noqa: E402
from nbhd.compat.natten import v014, v017, v020, v021  # noqa: E402

F64 = dict(rtol=1e-10, atol=1e-12)


def tensors(case: Case):
    return [None if a is None else torch.from_numpy(a) for a in case.arrays()]


def heads_first(x):
    return None if x is None else x.movedim(-2, 1)


def heads_first_extra(x):
    """[B, M, H, D] -> NATTEN's heads-first additional tokens [B, H, M, D]."""
    return None if x is None else x.transpose(1, 2)


# ------------------------------------------------------------ unfused heads-first operations


def reference_qk(case: Case, q, k, rpb, ak):
    """NATTEN's na*d_qk: attn [B, H, X.., window + M] of queries scaled beforehand."""
    unscaled = Case(**{**case.__dict__, "scale": 1.0})
    return np.moveaxis(window_weights(unscaled, q, k, rpb, ak), -2, 1)


UNFUSED_CASES = [
    Case((9,), (3,), (2,), (1,), (False,), heads=2, dim=3, rpb=True, additional=2, seed=1),
    Case((7, 6), (3, 2), (2, 1), (1, 1), (False, False), batch=2, heads=2, dim=4, rpb=True, seed=2),
    Case((6, 7), (3, 3), (1, 2), (1, 1), (True, False), heads=1, dim=2, additional=1, seed=3),
    Case((5, 6, 7), (2, 3, 3), (2, 1, 2), (1, 1, 1), (False, False, False), heads=2, dim=3, rpb=True, seed=4),
]


@pytest.mark.parametrize("case", UNFUSED_CASES, ids=str)
def test_v017_unfused_ops_match_natten_semantics(case):
    q, k, v, rpb, ak, av = tensors(case)
    r = case.rank
    qk, av_op = getattr(v017, f"na{r}d_qk"), getattr(v017, f"na{r}d_av")
    scale = 1 / math.sqrt(case.dim)
    attn = qk(heads_first(q) * scale, heads_first(k), case.kernel, case.dilation, heads_first_extra(ak),
              case.causal, rpb)
    expected = reference_qk(case, q.numpy() * scale, k.numpy(), None if rpb is None else rpb.numpy(),
                            None if ak is None else ak.numpy())
    np.testing.assert_array_equal(np.isneginf(attn.numpy()), np.isneginf(expected))
    np.testing.assert_allclose(attn.numpy(), expected, **F64)
    out = av_op(attn.softmax(-1), heads_first(v), case.kernel, case.dilation, heads_first_extra(av), case.causal)
    ref_out, _ = attention(case, *(None if a is None else a.numpy() for a in (q, k, v, rpb, ak, av)))
    np.testing.assert_allclose(heads_first(torch.from_numpy(ref_out)).numpy(), out.numpy(), **F64)


def test_v014_ops_take_int_windows_and_3d_depth_first():
    # kernel_size_d = 3, kernel_size = 5, dilation_d = 2, dilation = 1: a swapped order
    # would ask for a depth window of 5 x 1 on an axis of 6, a different result.
    case = Case((6, 5, 7), (3, 5, 5), (2, 1, 1), (1, 1, 1), (False,) * 3, heads=2, dim=3, rpb=True, seed=5)
    q, k, v, rpb, _, _ = tensors(case)
    qs = heads_first(q) / math.sqrt(case.dim)
    attn = v014.natten3dqkrpb(qs, heads_first(k), rpb, 3, 5, 2, 1)
    expected = reference_qk(case, q.numpy() / math.sqrt(case.dim), k.numpy(), rpb.numpy(), None)
    np.testing.assert_allclose(attn.numpy(), expected, **F64)
    np.testing.assert_allclose(v014.na3d_qk_with_bias(qs, heads_first(k), rpb, 3, 5, 2, 1).numpy(), expected, **F64)
    out = v014.natten3dav(attn.softmax(-1), heads_first(v), 3, 5, 2, 1)
    ref_out, _ = attention(case, q.numpy(), k.numpy(), v.numpy(), rpb.numpy())
    np.testing.assert_allclose(out.movedim(1, -2).numpy(), ref_out, **F64)

    case2 = Case((9, 8), (3, 3), (2, 2), (1, 1), (False, False), heads=2, dim=4, seed=6)
    q, k, v, _, _, _ = tensors(case2)
    attn = v014.natten2dqk(heads_first(q), heads_first(k), 3, 2)
    np.testing.assert_allclose(attn.numpy(), reference_qk(case2, q.numpy(), k.numpy(), None, None), **F64)
    np.testing.assert_allclose(v014.na2d_qk(heads_first(q), heads_first(k), 3, 2).numpy(), attn.numpy(), **F64)


def test_unfused_ops_gradcheck_float64():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 6, 5, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 6, 5, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 6, 5, 2, dtype=torch.float64, requires_grad=True)
    rpb = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    ak = torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True)

    def layer(q, k, v, rpb, ak):
        attn = v017.na2d_qk(q, k, (3, 2), (2, 1), additional_keys=ak, rpb=rpb)
        return v017.na2d_av(attn.softmax(-1), v, (3, 2), (2, 1), additional_values=ak[..., :2])

    assert torch.autograd.gradcheck(layer, (q, k, v, rpb, ak))
    rpb1 = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    q1, k1 = (torch.randn(1, 2, 7, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda q, k, b: v014.natten1dqkrpb(q, k, b, 3, 2), (q1, k1, rpb1))


# ------------------------------------------------------------------------ fused functions


def reference_out(case: Case, scale=None):
    q, k, v, rpb, ak, av = case.arrays()
    out, lse = attention(Case(**{**case.__dict__, "scale": scale}), q, k, v, rpb, ak, av)
    return out, lse


def test_fifth_positional_argument_is_dilation_in_017_and_stride_in_020_on():
    dilated = Case((9, 8), (3, 3), (2, 2), (1, 1), (False, False), heads=2, dim=4, seed=7)
    strided = Case((9, 8), (3, 3), (1, 1), (2, 2), (False, False), heads=2, dim=4, seed=7)
    q, k, v, _, _, _ = tensors(dilated)
    np.testing.assert_allclose(v017.na2d(q, k, v, 3, 2).numpy(), reference_out(dilated)[0], **F64)
    for generation in (v020, v021, natten):
        np.testing.assert_allclose(generation.na2d(q, k, v, 3, 2).numpy(), reference_out(strided)[0], **F64)
    assert not np.allclose(reference_out(dilated)[0], reference_out(strided)[0])


def test_v017_fused_with_rpb_causal_scale_and_additional_tokens():
    case = Case((7, 6), (3, 3), (2, 1), (1, 1), (False, False), heads=2, dim=4, rpb=True, additional=2, seed=8)
    q, k, v, rpb, ak, av = tensors(case)
    out = v017.na2d(q, k, v, 3, (2, 1), False, rpb, 0.3, ak, av)
    np.testing.assert_allclose(out.numpy(), reference_out(case, 0.3)[0], **F64)
    causal = Case((8,), (3,), (2,), (1,), (True,), heads=2, dim=4, seed=9)
    q, k, v, _, _, _ = tensors(causal)
    np.testing.assert_allclose(v017.na1d(q, k, v, 3, 2, True).numpy(), reference_out(causal)[0], **F64)


@pytest.mark.parametrize("scale", [None, 0.0])
def test_scale_none_and_zero_mean_the_default_as_in_natten(scale):
    case = Case((9,), (3,), (1,), (1,), (False,), heads=1, dim=4, seed=10)
    q, k, v, _, _, _ = tensors(case)
    for na1d in (v017.na1d, v020.na1d, v021.na1d):
        np.testing.assert_allclose(na1d(q, k, v, 3, scale=scale).numpy(), reference_out(case)[0], **F64)


def test_v021_return_lse_gqa_and_merge_attentions():
    case = Case((5, 6, 7), (3, 2, 3), (1, 2, 2), (1, 1, 3), (False, True, False), heads=4, kv_heads=2, dim=4,
                additional=3, seed=11)
    q, k, v, _, ak, av = tensors(case)
    out, lse = v021.na3d(q, k, v, (3, 2, 3), stride=(1, 1, 3), dilation=(1, 2, 2), is_causal=(False, True, False),
                         additional_keys=ak, additional_values=av, return_lse=True)
    ref, ref_lse = reference_out(case)
    np.testing.assert_allclose(out.numpy(), ref, **F64)
    np.testing.assert_allclose(lse.numpy(), ref_lse, **F64)

    # The neighborhood part and the additional part merge into the whole.
    part, part_lse = v021.na3d(q, k, v, (3, 2, 3), stride=(1, 1, 3), dilation=(1, 2, 2),
                               is_causal=(False, True, False), return_lse=True)
    extra, extra_lse = v021.attention(q.flatten(1, 3), ak.repeat_interleave(2, 2), av.repeat_interleave(2, 2),
                                      return_lse=True)
    flat = lambda t: t.flatten(1, 3)  # noqa: E731
    merged, merged_lse = v021.merge_attentions([flat(part), extra], [flat(part_lse), extra_lse])
    np.testing.assert_allclose(merged.numpy(), flat(torch.from_numpy(ref)).numpy(), **F64)
    np.testing.assert_allclose(merged_lse.numpy(), flat(torch.from_numpy(ref_lse)).numpy(), **F64)
    np.testing.assert_allclose(v020.merge_attentions([flat(part), extra], [flat(part_lse), extra_lse]).numpy(),
                               merged.numpy(), **F64)
    # 0.17's merge: xFormers' lse layout [batch, heads, seq].
    np.testing.assert_allclose(v017.merge_attentions(part, extra, part_lse, extra_lse.transpose(1, 2)).numpy(),
                               ref, **F64)


@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_is_full_or_causal_attention(is_causal):
    rng = np.random.default_rng(12)
    q, k, v = (torch.from_numpy(rng.standard_normal((2, 7, 2, 3))) for _ in range(3))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(3)
    if is_causal:
        scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), -math.inf)
    expected = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    out, lse = v021.attention(q, k, v, is_causal=is_causal, return_lse=True)
    np.testing.assert_allclose(out.numpy(), expected.numpy(), **F64)
    np.testing.assert_allclose(lse.numpy(), torch.logsumexp(scores, -1).transpose(1, 2).numpy(), **F64)
    if not is_causal:
        # Cross attention (other key count): computed in float32 arithmetic.
        out = v020.attention(q, k[:, :5], v[:, :5])
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k[:, :5]) / math.sqrt(3)
        expected = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v[:, :5])
        np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ layers


class NattenLayerReference(torch.nn.Module):
    """A layer as NATTEN's documentation and public source describe it: qkv Linear, the
    relative positional bias `rpb` [heads, 2k-1, ...] (zeros, then a normal truncated at
    +-2 with std 0.02), proj Linear, created in that order; forward: qkv -> heads ->
    attention with scale qk_scale or head_dim^-0.5 -> proj, in float64 with the spec's
    dense reference. Inputs below kernel x dilation are zero-padded at the end (0.14-0.15)."""

    def __init__(self, dim, num_heads, kernel, dilation, stride=None, causal=None, rpb=False, qk_scale=None):
        super().__init__()
        self.heads, self.kernel, self.dilation = num_heads, tuple(kernel), tuple(dilation)
        self.stride = tuple(stride or (1,) * len(kernel))
        self.causal = tuple(causal or (False,) * len(kernel))
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        if rpb:
            self.rpb = torch.nn.Parameter(torch.zeros(num_heads, *(2 * k - 1 for k in kernel)))
            torch.nn.init.trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        B, *grid, C = x.shape
        padded = [max(n, k * d) for n, k, d in zip(grid, self.kernel, self.dilation)]
        pads = []
        for n, p in reversed(list(zip(grid, padded))):
            pads += [0, p - n]
        x = torch.nn.functional.pad(x, [0, 0] + pads)
        q, k, v = self.qkv(x).reshape(B, *padded, 3, self.heads, C // self.heads).unbind(-3)
        case = Case(tuple(padded), self.kernel, self.dilation, self.stride, self.causal, batch=B, heads=self.heads,
                    kv_heads=self.heads, dim=C // self.heads, dim_v=C // self.heads, rpb=self.rpb is not None,
                    scale=self.scale)
        rpb = None if self.rpb is None else self.rpb.detach().numpy()
        out, _ = attention(case, q.detach().numpy(), k.detach().numpy(), v.detach().numpy(), rpb)
        out = torch.from_numpy(out).reshape(B, *padded, C)[(slice(None),) + tuple(slice(0, n) for n in grid)]
        return self.proj(out)


LAYERS = [
    # (generation layer factory, reference factory, input shape)
    ("v014-2d", lambda: v014.NeighborhoodAttention2D(12, 3, 3, 2),
     lambda: NattenLayerReference(12, 3, (3, 3), (2, 2), rpb=True), (2, 5, 7, 12)),  # padded: 5 < 3 x 2
    ("v014-3d", lambda: v014.NeighborhoodAttention3D(8, 2, 3, kernel_size_d=2 + 1, dilation=1, dilation_d=2,
                                                      bias=False),
     lambda: NattenLayerReference(8, 2, (3, 3, 3), (2, 1, 1)), (1, 6, 4, 5, 8)),
    ("v017-1d", lambda: v017.NeighborhoodAttention1D(8, 2, 4, 2, rel_pos_bias=True),
     lambda: NattenLayerReference(8, 2, (4,), (2,), rpb=True), (2, 11, 8)),
    ("v017-2d-causal", lambda: v017.NeighborhoodAttention2D(8, 2, (3, 2), 1, (True, False), qk_scale=0.4),
     lambda: NattenLayerReference(8, 2, (3, 2), (1, 1), causal=(True, False), qk_scale=0.4), (1, 6, 5, 8)),
    ("v020-2d", lambda: v020.NeighborhoodAttention2D(dim=8, num_heads=2, kernel_size=3, stride=2, dilation=(1, 2)),
     lambda: NattenLayerReference(8, 2, (3, 3), (1, 2), stride=(2, 2)), (1, 7, 8, 8)),
    ("v021-3d", lambda: natten.NeighborhoodAttention3D(embed_dim=8, num_heads=2, kernel_size=(2, 3, 3), stride=1,
                                                       dilation=1, is_causal=(True, False, False)),
     lambda: NattenLayerReference(8, 2, (2, 3, 3), (1, 1, 1), causal=(True, False, False)), (1, 4, 5, 6, 8)),
]


@pytest.mark.parametrize("name,make,make_reference,shape", LAYERS, ids=[x[0] for x in LAYERS])
def test_layers_initialise_load_natten_state_dicts_and_match(name, make, make_reference, shape):
    torch.manual_seed(13)
    reference = make_reference().double()
    torch.manual_seed(13)
    layer = make().double()
    # One seed, the same parameters: NATTEN's creation order and initialisation.
    assert list(layer.state_dict()) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[key], value, rtol=0, atol=0, msg=key)
    # A state dict saved by the NATTEN-shaped layer loads strictly into a fresh layer.
    torch.manual_seed(14)
    fresh = make().double()
    fresh.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(*shape, dtype=torch.float64)
    np.testing.assert_allclose(fresh(x).detach().numpy(), reference(x).detach().numpy(), **F64)
    # Whole-model checkpoints (torch.save(model)) pickle the layer by its class's name.
    copy = pickle.loads(pickle.dumps(fresh))
    assert type(copy) is type(fresh)
    torch.testing.assert_close(copy(x), fresh(x), rtol=0, atol=0)


@pytest.mark.parametrize("make", [lambda: v017.NeighborhoodAttention2D(8, 2, 3, 2, rel_pos_bias=True),
                                  lambda: v021.NeighborhoodAttention2D(8, 2, 3, stride=2)], ids=["v017", "v021"])
def test_layers_compile_fullgraph(make):
    torch.manual_seed(15)
    layer = make()
    x = torch.randn(2, 7, 6, 8)
    eager = layer(x)
    eager.sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    for n, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


# ----------------------------------------------------------------------------- refusals


def q4(*shape):
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("call,error,words", [
    (lambda: v014.natten2dqk(q4(1, 1, 6, 6, 2), q4(1, 1, 6, 6, 2), 4, 1), ValueError, ["kernel_size = 4", "odd"]),
    (lambda: v014.natten2dqk(q4(1, 1, 6, 6, 2), q4(1, 1, 6, 6, 2), (3, 3), 1), TypeError, ["kernel_size", "v017"]),
    (lambda: v014.NeighborhoodAttention2D(8, 2, 1), ValueError, ["kernel_size = 1"]),
    (lambda: v017.na2d_qk(q4(1, 2, 6, 6, 2), q4(1, 2, 6, 6, 2), 3, rpb=q4(2, 5, 5), is_causal=True), ValueError,
     ["rpb", "causal"]),
    (lambda: v017.na2d_qk(q4(1, 6, 6, 3, 2), q4(1, 6, 6, 3, 2), 3, rpb=q4(2, 5, 5)), ValueError,
     ["rpb has 2 heads", "heads-first"]),
    (lambda: v017.na2d(q4(1, 6, 6, 2, 2), q4(1, 6, 6, 2, 2), q4(1, 6, 6, 2, 2), 3, xformers_kwargs={"p": 0.1}),
     ValueError, ["xformers_kwargs"]),
    (lambda: v017.na2d(q4(1, 6, 6, 2), q4(1, 6, 6, 2), q4(1, 6, 6, 2), 3), ValueError, ["query", "heads-last"]),
    # The other layout: its heads read as an axis shorter than the window.
    (lambda: v021.na2d(q4(1, 2, 6, 6, 4), q4(1, 2, 6, 6, 4), q4(1, 2, 6, 6, 4), 3), ValueError,
     ["axis 0 of query has 2 tokens", "kernel_size * dilation = 3", "heads-last", ".movedim(1, -2)"]),
    (lambda: v017.na2d_qk(q4(1, 6, 6, 2, 4), q4(1, 6, 6, 2, 4), 3), ValueError,
     ["axis 1 of query has 2 tokens", "heads-first", ".movedim(-2, 1)"]),
    (lambda: v014.natten2dav(q4(1, 6, 6, 2, 9), q4(1, 6, 6, 2, 4), 3, 1), ValueError,
     ["axis 1 of value has 2 tokens", "heads-first"]),
    (lambda: v017.NeighborhoodAttention1D(8, 2, 3, is_causal=True, rel_pos_bias=True), ValueError,
     ["rel_pos_bias", "causal"]),
    (lambda: v021.na1d(q4(1, 6, 2, 2), q4(1, 6, 2, 2), q4(1, 6, 2, 2), 3, rpb=q4(2, 5)), TypeError,
     ["'rpb'", "removed", "v017"]),
    (lambda: v021.NeighborhoodAttention1D(dim=8, num_heads=2, kernel_size=3), TypeError, ["'embed_dim'"]),
    (lambda: v020.NeighborhoodAttention1D(embed_dim=8, num_heads=2, kernel_size=3), TypeError, ["'dim'"]),
    (lambda: v020.NeighborhoodAttention1D(8, 2, 3, attn_drop=0.1), TypeError, ["'attn_drop'", "dropout"]),
    (lambda: v021.na1d(q4(1, 6, 2, 2), q4(1, 6, 2, 2), q4(1, 6, 2, 2), 3, backend="cudnn"), ValueError,
     ["backend = 'cudnn'", "hopper-fna"]),
    (lambda: v021.na1d(q4(1, 6, 2, 2), q4(1, 6, 2, 2), q4(1, 6, 2, 2), 3, stride=4), ValueError,
     ["stride = 4", "kernel_size = 3"]),
    (lambda: v021.na1d(q4(1, 6, 2, 2), q4(1, 6, 2, 2), q4(1, 6, 2, 2), 3, attention_kwargs={"dropout_p": 0.1}),
     ValueError, ["dropout_p"]),
    (lambda: v021.attention(q4(1, 6, 2, 2), q4(1, 6, 2, 2), q4(1, 6, 2, 2), seqlens_Q=torch.tensor([6])),
     ValueError, ["seqlens_Q", "variable-length"]),
    (lambda: v021.attention(q4(1, 6, 2, 2), q4(1, 5, 2, 2), q4(1, 5, 2, 2), is_causal=True), ValueError,
     ["is_causal", "6 queries and 5 keys"]),
    (lambda: v021.merge_attentions([q4(1, 6, 2, 2)], [q4(1, 6, 2)]), ValueError, ["two or more"]),
    (lambda: v017.set_memory_usage_preference("tight"), ValueError, ["'tight'", "strict"]),
    (lambda: natten.install("0.18"), ValueError, ["'0.18'", "0.17"]),
    (lambda: v017.na1d_qk(torch.nested.nested_tensor([q4(2, 6, 3), q4(2, 7, 3)]), q4(1, 2, 6, 3), 3), ValueError,
     ["query is a nested tensor"]),
], ids=lambda x: None)
def test_refusals_name_the_argument(call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_a_layout_the_shape_cannot_tell_runs_in_the_functions_layout():
    """Heads-first [1, 4, 6, 6, 4] is also a valid heads-last shape (4 x 6 tokens, 6
    heads) once the window fits both axes: NATTEN computed such a call in its function's
    layout, and so does nbhd, without guessing (docs/natten.md)."""
    as_heads_last = Case((4, 6), (3, 3), (1, 1), (1, 1), (False, False), heads=6, dim=4, seed=11)
    q, k, v, _, _, _ = tensors(as_heads_last)
    for generation in (v017, v020, v021):
        np.testing.assert_allclose(generation.na2d(q, k, v, 3).numpy(), reference_out(as_heads_last)[0], **F64)


# -------------------------------------------------------------------------- switches


def test_deterministic_mode_and_kv_parallelism_off_reach_the_backward_launch():
    from nbhd import _torch_ops
    from nbhd.compat.natten import _shared

    def deterministic_launch():
        return _torch_ops.TorchArrays.launch(torch.zeros(1))["deterministic"]

    try:
        assert not v017.are_deterministic_algorithms_enabled() and not deterministic_launch()
        v021.use_deterministic_algorithms(True)
        assert v017.are_deterministic_algorithms_enabled() and deterministic_launch()
        with pytest.raises(RuntimeError, match="not deterministic"):
            v021.use_kv_parallelism_in_fused_na(True)
        v021.use_deterministic_algorithms(False)
        assert not deterministic_launch()
        # KV parallelism: off by default in 0.17 and on in 0.21, until a caller chooses.
        assert not v017.is_kv_parallelism_in_fused_na_enabled() and v021.is_kv_parallelism_in_fused_na_enabled()
        v021.use_kv_parallelism_in_fused_na(False)
        assert deterministic_launch() and not v021.is_kv_parallelism_in_fused_na_enabled()
        v017.use_fused_na(True)  # kv_parallel=True by default
        assert not deterministic_launch() and v017.is_kv_parallelism_in_fused_na_enabled()
    finally:
        _shared.reset_context()
    assert not deterministic_launch() and not v017.is_fused_na_enabled()


def test_switches_and_probes_answer():
    from nbhd.compat.natten import _shared

    try:
        v017.use_fused_na(True, kv_parallel=False)
        assert v017.is_fused_na_enabled() and v017.is_fna_enabled()
        assert not v017.is_kv_parallelism_in_fused_na_enabled()
        v017.use_autotuner(forward_pass=True)
        assert v017.is_autotuner_enabled_for_forward() and not v017.is_autotuner_enabled_for_backward()
        v017.set_memory_usage_preference("strict")
        assert v017.is_memory_usage_strict() and v021.get_memory_usage_preference() == "strict"
    finally:
        _shared.reset_context()
    cuda = any(b["device"] == "cuda" for b in nbhd.backends()) and torch.cuda.is_available()
    assert v017.has_cuda() == cuda
    assert v017.has_fused_na() == (cuda and v017.get_device_cc() >= 80
                                   and any(b["name"] == "fused" for b in nbhd.backends()))
    assert not v014.has_fp64_gemm()
    assert v021.HAS_LIBNATTEN


def test_install_makes_natten_imports_resolve():
    saved = {n: m for n, m in sys.modules.items() if n == "natten" or n.startswith("natten.")}
    if saved:
        pytest.skip("a natten module is imported in this process")
    try:
        natten.install("0.17")
        from natten.functional import na2d_qk  # noqa: F401
        from natten.na2d import NeighborhoodAttention2D

        import natten as installed

        assert installed is v017 and NeighborhoodAttention2D is v017.NeighborhoodAttention2D
        with pytest.raises(RuntimeError, match="imported already"):
            natten.install("0.21")
    finally:
        for n in [n for n in sys.modules if n == "natten" or n.startswith("natten.")]:
            del sys.modules[n]
