# SPDX-License-Identifier: Apache-2.0
"""The native API's arguments after kernel_size are keyword-only (one release of grace:
positional use warns, naming the arguments and NATTEN 0.17's dilation-fifth order), in
the functions, nbhd.ops and the nn layers; keyword calls do not warn."""

import inspect
import warnings

import numpy as np
import pytest

import nbhd
from dense_reference import Case, attention

torch = pytest.importorskip("torch")
import nbhd.nn  # noqa: E402

F64 = dict(rtol=1e-10, atol=1e-12)


def tensors(case: Case):
    return [None if a is None else torch.from_numpy(a) for a in case.arrays()]


def reference_out(case: Case):
    return attention(case, *case.arrays())


def test_native_arguments_after_kernel_size_are_keyword_only():
    case = Case((9, 8), (3, 3), (1, 1), (2, 2), (False, False), heads=2, dim=4, seed=16)
    q, k, v, _, _, _ = tensors(case)
    for function in (nbhd.na2d, nbhd.neighborhood_attention):
        params = inspect.signature(function).parameters
        assert params["stride"].kind is inspect.Parameter.KEYWORD_ONLY
        with pytest.warns(FutureWarning, match="stride passed by position.*NATTEN 0.17"):
            out = function(q, k, v, 3, 2)
        np.testing.assert_allclose(out.numpy(), reference_out(case)[0], **F64)
    with pytest.warns(FutureWarning, match="stride, dilation passed by position"):
        nbhd.ops.qk(q, k, 3, 1, 1)
    with pytest.warns(FutureWarning, match="stride passed by position"):
        nbhd.nn.NeighborhoodAttention2D(8, 2, 3, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nbhd.na2d(q, k, v, 3, stride=2)
        nbhd.nn.NeighborhoodAttention2D(8, 2, 3, stride=1)
