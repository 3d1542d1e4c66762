# SPDX-License-Identifier: Apache-2.0
"""The package imports and runs on numpy without torch, and the extension does not
link libtorch (arrays cross by DLPack, so one build serves every PyTorch)."""

import shutil
import subprocess
import sys

import pytest

import nbhd

WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import numpy as np
import nbhd
q = np.random.default_rng(0).standard_normal((1, 7, 2, 3))
out, lse = nbhd.na1d(q, q, q, 3, return_lse=True)
assert out.shape == q.shape and lse.shape == (1, 7, 2)
assert nbhd.ops.av(nbhd.ops.softmax(nbhd.ops.qk(q, q, 3), 3), q, 3).shape == q.shape
print([b["name"] for b in nbhd.backends()])
try:
    nbhd.nn
except ImportError:
    print("nn needs torch")
"""


def test_imports_and_runs_without_torch():
    result = subprocess.run([sys.executable, "-c", WITHOUT_TORCH], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "reference" in result.stdout and "nn needs torch" in result.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("ldd") is None, reason="needs ldd")
def test_extension_does_not_link_libtorch():
    libraries = subprocess.run(["ldd", nbhd._nbhd.__file__], capture_output=True, text=True).stdout
    assert "libtorch" not in libraries and "libc10" not in libraries and "libpython" not in libraries
