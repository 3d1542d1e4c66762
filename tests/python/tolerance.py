# SPDX-License-Identifier: Apache-2.0
"""The flash-attention tolerance rule of the C++ tests (tests/cpp/testing.cpp,
expect_close) for torch tensors: a result's largest error against the exact answer
may be twice that of a plain implementation of the same computation in the same
precision, plus twice the dtype's rounding noise at the result's scale, plus twice a
caller's other noise (arithmetic the plain implementation does not share)."""

import numpy as np

# The constants of testing.cpp's expect_close.
PLAIN_FACTOR = 2.0
NOISE_FACTOR = 2.0
# The rounding noise is measured on exact + 0.3, so that exact zeros, and values the
# dtype holds exactly, still count one rounding at the result's scale.
NOISE_SHIFT = 0.3


def _max_abs(x) -> float:
    return float(x.abs().max()) if x.numel() else 0.0


def rounding_noise(exact, dtype) -> float:
    """max |round_dtype(r + 0.3) - (r + 0.3)| over the exact values r."""
    shifted = exact.detach().double().cpu() + NOISE_SHIFT
    return _max_abs(shifted.to(dtype).double() - shifted)


def assert_flash_close(actual, exact, plain, dtype, what: str, extra_noise: float = 0.0):
    """Raise AssertionError unless max |actual - exact| <= 2 max |plain - exact| +
    2 rounding_noise(exact, dtype) + 2 extra_noise, or if actual is not finite.

    exact: the answer in float64 on the same (rounded) inputs; plain: the plain
    implementation's result; dtype: the precision whose rounding noise counts."""
    actual, exact, plain = (x.detach().double().cpu() for x in (actual, exact, plain))
    if not actual.shape == exact.shape == plain.shape:
        raise AssertionError(f"{what}: shapes differ: actual {tuple(actual.shape)}, exact {tuple(exact.shape)}, "
                             f"plain {tuple(plain.shape)}")
    finite = actual.isfinite()
    if not bool(finite.all()):
        first = np.unravel_index(int((~finite).flatten().nonzero()[0]), actual.shape)
        raise AssertionError(f"{what}: {int((~finite).sum())} elements are not finite, the first at "
                             f"{tuple(int(i) for i in first)}")
    error = (actual - exact).abs()
    worst = _max_abs(error)
    plain_error = _max_abs(plain - exact)
    noise = rounding_noise(exact, dtype)
    bound = PLAIN_FACTOR * plain_error + NOISE_FACTOR * noise + NOISE_FACTOR * extra_noise
    if not worst <= bound:
        where = tuple(int(i) for i in np.unravel_index(int(error.argmax()), error.shape))
        raise AssertionError(
            f"{what}: max error {worst:.3e} at {where} (got {float(actual[where]):.9g}, exact "
            f"{float(exact[where]):.9g}) exceeds the bound {bound:.3e} = {PLAIN_FACTOR:g} * plain "
            f"{str(dtype).replace('torch.', '')} error {plain_error:.3e} + {NOISE_FACTOR:g} * rounding noise "
            f"{noise:.3e} + {NOISE_FACTOR:g} * other noise {extra_noise:.3e}")
