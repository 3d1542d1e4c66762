# SPDX-License-Identifier: Apache-2.0
"""The flash-attention tolerance rule (tolerance.py) on the CPU: it takes a result as
good as the plain implementation's, refuses one clearly worse or not finite, and its
bound is testing.cpp's, to the constant."""

import pytest

from tolerance import assert_flash_close, rounding_noise

torch = pytest.importorskip("torch")


def product_problem():
    """(exact, plain) of a float16 matrix product: the exact one in float64 on the
    float16 inputs, the plain one accumulated in float32 and rounded to float16."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(48, 32, generator=generator).half()
    b = torch.randn(32, 24, generator=generator).half()
    return a.double() @ b.double(), (a.float() @ b.float()).half()


def test_results_as_good_as_plain_pass():
    exact, plain = product_problem()
    assert_flash_close(plain, exact, plain, torch.float16, "plain itself")
    assert_flash_close(exact.half(), exact, plain, torch.float16, "exact, rounded once")


def test_a_result_clearly_worse_than_plain_fails():
    exact, plain = product_problem()
    worse = exact + 10 * (plain.double() - exact)
    with pytest.raises(AssertionError, match=r"worse: max error .* exceeds the bound"):
        assert_flash_close(worse, exact, plain, torch.float16, "worse")


def test_one_bad_element_fails_and_is_named():
    exact, plain = product_problem()
    bad = exact.half()
    bad[5, 7] += 0.25
    with pytest.raises(AssertionError, match=r"one element: max error .* at \(5, 7\)"):
        assert_flash_close(bad, exact, plain, torch.float16, "one element")


def test_non_finite_results_fail_whatever_the_bound():
    exact, plain = product_problem()
    bad = exact.half()
    bad[2, 3] = float("nan")
    with pytest.raises(AssertionError, match=r"nan: 1 elements are not finite, the first at \(2, 3\)"):
        assert_flash_close(bad, exact, plain, torch.float16, "nan", extra_noise=1e9)


def test_shapes_must_agree():
    exact, plain = product_problem()
    with pytest.raises(AssertionError, match="shapes differ"):
        assert_flash_close(exact[:-1], exact, plain, torch.float16, "short")


def test_rounding_noise_is_measured_at_exact_plus_0_3():
    # float16 holds 1.3 as 1.2998046875 (spacing 2^-10 in [1, 2)).
    values = torch.tensor([1.0, -0.3], dtype=torch.float64)
    assert rounding_noise(values, torch.float16) == pytest.approx(1.3 - 1.2998046875, rel=1e-9)
    assert rounding_noise(values[1:], torch.float16) == 0.0
    assert rounding_noise(values, torch.float64) == 0.0


@pytest.mark.parametrize("plain_error, extra_noise", [(0.0, 0.0), (1e-3, 0.0), (1e-3, 5e-4)])
def test_bound_is_twice_plain_error_twice_noise_and_twice_other_noise(plain_error, extra_noise):
    exact = torch.tensor([1.0, 0.5], dtype=torch.float64)
    plain = exact + torch.tensor([0.0, plain_error], dtype=torch.float64)
    bound = 2 * plain_error + 2 * rounding_noise(exact, torch.float16) + 2 * extra_noise
    offset = torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert_flash_close(exact + 0.99 * bound * offset, exact, plain, torch.float16, "inside", extra_noise)
    with pytest.raises(AssertionError, match="outside"):
        assert_flash_close(exact + 1.01 * bound * offset, exact, plain, torch.float16, "outside", extra_noise)
