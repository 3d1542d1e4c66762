# SPDX-License-Identifier: Apache-2.0
"""An empty batch or zero query heads gives empty outputs and zero gradients, as
PyTorch's operators do (the library itself is not called); the other arguments are
still checked, with the same messages as for a non-empty problem."""

import numpy as np
import pytest

import nbhd

try:
    import torch
except ImportError:
    torch = None


def arrays(batch=1, heads=2, kv_heads=2, extent=(6, 5), dim=4, dim_v=3, dtype=np.float64):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((batch, *extent, heads, dim)).astype(dtype)
    k = rng.standard_normal((batch, *extent, kv_heads, dim)).astype(dtype)
    v = rng.standard_normal((batch, *extent, kv_heads, dim_v)).astype(dtype)
    return q, k, v


@pytest.mark.parametrize("batch, heads", [(0, 2), (2, 0), (0, 0)])
def test_numpy_outputs_are_empty(batch, heads):
    q, k, v = arrays(batch=batch, heads=heads)
    rpb = np.zeros((heads, 5, 5))
    out, lse = nbhd.na2d(q, k, v, 3, rpb=rpb, return_lse=True)
    assert out.shape == (batch, 6, 5, heads, 3) and lse.shape == (batch, 6, 5, heads)
    assert out.dtype == np.float64 and lse.dtype == np.float64


@pytest.mark.parametrize("batch, heads", [(0, 2), (2, 0)])
def test_an_empty_problem_still_checks_its_arguments(batch, heads):
    q, k, v = arrays(batch=batch, heads=heads)
    with pytest.raises(ValueError, match=r"kernel_size\[axis 1\] = 7 .* must be <= the extent 5 of axis 1"):
        nbhd.na2d(q, k, v, (3, 7))
    with pytest.raises(ValueError, match=r"value has shape \[.*\] but the problem needs \[.*\]"):
        nbhd.na2d(q, k, v[:, :5], 3)
    with pytest.raises(ValueError, match=r"rpb has shape \[.*\] but the problem needs \[.*\]"):
        nbhd.na2d(q, k, v, 3, rpb=np.zeros((heads, 3, 5)))


@pytest.mark.skipif(torch is None, reason="torch is not installed")
@pytest.mark.parametrize("batch, heads", [(0, 2), (2, 0)])
def test_torch_gradients_are_zero(batch, heads):
    q, k, v = (torch.from_numpy(x).requires_grad_() for x in arrays(batch=batch, heads=heads))
    rpb = torch.ones(heads, 5, 5, dtype=torch.float64, requires_grad=True)
    ak = torch.ones(batch, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    av = torch.ones(batch, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    out, lse = nbhd.na2d(q, k, v, 3, rpb=rpb, additional_keys=ak, additional_values=av, return_lse=True)
    assert out.shape == (batch, 6, 5, heads, 3) and lse.shape == (batch, 6, 5, heads)
    (out.sum() + lse.sum()).backward()
    # With no query, nothing reaches the keys, values or bias: their gradients are
    # zeros of their shapes (not empty: the bias has heads rows, keys their batch).
    for x in (q, k, v, rpb, ak, av):
        assert x.grad is not None and x.grad.shape == x.shape and x.grad.dtype == x.dtype
        assert torch.count_nonzero(x.grad) == 0
