# SPDX-License-Identifier: Apache-2.0
"""examples/latlon_periodic.py: periodic longitude against padding by hand. Where the
padding keeps the dilation groups in place both answers agree everywhere; on an odd
dilated longitude they differ at the seam only, and the periodic answer is the one
the spec's dense reference gives."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from dense_reference import Case, attention  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))
import latlon_periodic as example  # noqa: E402


def test_padding_by_hand_is_exact_when_it_keeps_the_groups():
    r = example.compare((7, 20), (3, 5), (1, 1), heads=2, dim=4)
    assert r["max_diff"] < 1e-12 and r["padding_bytes"] > 0


def test_an_odd_dilated_longitude_differs_at_the_seam_and_periodic_is_the_spec():
    grid, kernel, dilation = (7, 21), (3, 5), (1, 2)
    r = example.compare(grid, kernel, dilation, heads=2, dim=4)
    assert r["seam_diff"] > 1e-3 and r["seam_diff"] == r["max_diff"]

    case = Case(grid, kernel, dilation, (1, 1), (False, False), periodic=(False, True), heads=2, dim=4, dim_v=4)
    q, k, v, _, _, _ = case.arrays()
    got = example.nbhd.na2d(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), kernel,
                            dilation=dilation, periodic=(False, True))
    np.testing.assert_allclose(got.numpy(), attention(case, q, k, v)[0], rtol=1e-10, atol=1e-12)
    padded, _ = example.by_padding(*(torch.from_numpy(t) for t in (q, k, v)), kernel, dilation)
    differs = np.abs(padded.numpy() - attention(case, q, k, v)[0]).max(axis=(0, 1, 3, 4)) > 1e-9
    span = kernel[1] * dilation[1]
    assert differs.any() and not differs[span:-span].any()  # only within a window of the seam


def test_the_script_runs():
    run = subprocess.run([sys.executable, str(EXAMPLES / "latlon_periodic.py"), "--grid", "9x24", "--kernel", "3x5",
                          "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("grid 9x24 kernel 3x5 dilation 1x1: max |periodic - padded| 0.00e+00")
