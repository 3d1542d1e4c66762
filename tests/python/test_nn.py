# SPDX-License-Identifier: Apache-2.0
"""nn modules: shapes, parameters, the dropout (unfused) path, padding of small inputs,
and torch.compile(fullgraph=True) of a model with the 2-D module, forward and backward
equal to eager."""

import pytest

import nbhd

torch = pytest.importorskip("torch")
import nbhd.nn  # noqa: E402


class SmallModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(3, 16)
        self.attention = nbhd.nn.NeighborhoodAttention2D(16, 2, kernel_size=3, dilation=(1, 2), stride=(2, 1),
                                                         is_causal=(False, True), rel_pos_bias=True)
        self.head = torch.nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.attention(self.embed(x))).mean()


@pytest.mark.parametrize("cls,spatial", [(nbhd.nn.NeighborhoodAttention1D, (9,)),
                                         (nbhd.nn.NeighborhoodAttention2D, (6, 7)),
                                         (nbhd.nn.NeighborhoodAttention3D, (4, 5, 3))])
def test_module_shapes_and_parameters(cls, spatial):
    torch.manual_seed(0)
    m = cls(embed_dim=12, num_heads=3, kernel_size=3, rel_pos_bias=True)
    x = torch.randn(2, *spatial, 12, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert m.rpb.grad is not None and m.rpb.shape == (3, *(5,) * len(spatial))
    assert set(dict(m.named_parameters())) == {"qkv.weight", "qkv.bias", "rpb", "proj.weight", "proj.bias"}
    assert m.head_dim == 4 and abs(m.scale - 0.5) < 1e-12


def test_module_equals_functional():
    torch.manual_seed(1)
    m = nbhd.nn.NeighborhoodAttention2D(8, 2, kernel_size=(3, 5), dilation=(2, 1), is_causal=(True, False),
                                        qkv_bias=False, qk_scale=0.3, rel_pos_bias=True)
    x = torch.randn(1, 7, 6, 8)
    q, k, v = (x @ m.qkv.weight.T).reshape(1, 7, 6, 3, 2, 4).unbind(-3)
    expected = m.proj(nbhd.na2d(q, k, v, (3, 5), dilation=(2, 1), is_causal=(True, False), scale=0.3,
                                rpb=m.rpb).reshape(1, 7, 6, 8))
    torch.testing.assert_close(m(x), expected)


def test_attention_dropout_uses_the_unfused_path():
    torch.manual_seed(2)
    m = nbhd.nn.NeighborhoodAttention2D(8, 2, kernel_size=3, rel_pos_bias=True, attn_drop=0.5)
    x = torch.randn(1, 5, 6, 8)
    m.eval()
    fused = m(x)
    m.train()
    m.attn_drop = torch.nn.Identity()  # same path, no randomness: must equal the fused result
    unfused = m(x)
    torch.testing.assert_close(unfused, fused)
    m.attn_drop = torch.nn.Dropout(0.5)
    dropped = m(x)
    assert not torch.allclose(dropped, fused)
    dropped.sum().backward()
    assert m.rpb.grad is not None


def test_small_inputs_are_padded_like_natten():
    torch.manual_seed(3)
    m = nbhd.nn.NeighborhoodAttention2D(4, 1, kernel_size=5)
    x = torch.randn(1, 3, 7, 4)
    y = m(x)
    assert y.shape == x.shape
    padded = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, 2))
    torch.testing.assert_close(y, m(padded)[:, :3])


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="embed_dim = 10 must be a positive multiple of num_heads = 3"):
        nbhd.nn.NeighborhoodAttention1D(10, 3, 3)
    with pytest.raises(TypeError, match="kernel_size"):
        nbhd.nn.NeighborhoodAttention1D(8, 2, 3.5)
    m = nbhd.nn.NeighborhoodAttention1D(8, 2, 3)
    with pytest.raises(ValueError, match=r"takes input \[batch, X1, embed_dim\]"):
        m(torch.randn(1, 4, 4, 8))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(compile_backend):
    torch.manual_seed(4)
    model = SmallModel()
    x = torch.randn(2, 7, 6, 3)
    eager_loss = model(x)
    eager_loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    loss = compiled(x)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[name], msg=lambda m: f"{name}: {m}")


def test_compile_functional_with_lse_fullgraph():
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 6, 5, 2, 4, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        out, lse = nbhd.na2d(q, k, v, 3, return_lse=True)
        return out.sum() + lse.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))
    grads = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    expected = torch.autograd.grad(f(q, k, v), (q, k, v))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


def test_module_backend_argument():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 10, 16, dtype=torch.float64)
    layers = [nbhd.nn.NeighborhoodAttention2D(16, 2, kernel_size=3, backend=b).double() for b in ("reference", "cpu")]
    layers[1].load_state_dict(layers[0].state_dict())
    torch.testing.assert_close(layers[0](x), layers[1](x), rtol=1e-10, atol=1e-10)
    layer = nbhd.nn.NeighborhoodAttention2D(16, 2, kernel_size=3, backend="naive").double()
    with pytest.raises(ValueError, match="naive"):  # a CUDA backend cannot take CPU tensors
        layer(x)
