# SPDX-License-Identifier: Apache-2.0
"""One axis's neighborhood windows, vectorised over query tokens: what nbhd.distributed
(halo segments) and bench/ (FlexAttention masks, pair counts) compute windows with."""

import numpy as np


def axis_windows(length: int, kernel: int, stride: int, dilation: int, causal: bool, periodic: bool, tokens):
    """The window definition on the Python side, written once (spec steps 1-4 and 3';
    the library's is include/nbhd/core/window.hpp; the tests' oracle,
    tests/python/dense_reference.py, is written apart from both on purpose). For query
    tokens `tokens` (ints) on one axis: (leader, first, last) as token indices (numpy
    arrays): the stride-group leader as the spec clamps it, and the window's first and
    last key. Periodic windows are unwrapped: first may be < 0 and last >= length."""
    i = np.asarray(tokens, dtype=np.int64)
    g, j = i % dilation, i // dilation
    group_length = (length - g + dilation - 1) // dilation
    if causal:
        leader = np.minimum(j // stride * stride + stride - 1, group_length - 1)
        first, last = np.maximum(leader - kernel + 1, 0), j
    else:
        leader = np.minimum(j // stride * stride + stride // 2, group_length - 1)
        first = leader - kernel // 2
        if not periodic:
            first = np.maximum(np.minimum(first, group_length - kernel), 0)
        last = first + kernel - 1
    return g + dilation * leader, g + dilation * first, g + dilation * last
