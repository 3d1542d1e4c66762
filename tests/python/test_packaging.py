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


TORCH_AFTER_NBHD = """
import sys
import nbhd
assert "torch" not in sys.modules and "nbhd._torch_ops" not in sys.modules
import torch
print(torch.ops.nbhd.na_forward.default.name(), torch.ops.nbhd.na_backward.default.name())
import inspect
assert inspect.getsource(torch.nn)  # torch's own loader still answers for it
assert nbhd.nn.__name__ == "nbhd.nn" and nbhd.distributed.__name__ == "nbhd.distributed"  # loaded on first use
"""


def test_operators_are_registered_whatever_the_import_order():
    # torch imported after nbhd: the operators exist once torch has loaded, before any
    # nbhd call (a graph that names torch.ops.nbhd.* loads). Before: AttributeError;
    # and nbhd.distributed, first used as an attribute, was nbhd.nn.
    pytest.importorskip("torch")
    result = subprocess.run([sys.executable, "-c", TORCH_AFTER_NBHD], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "nbhd::na_forward nbhd::na_backward" in result.stdout
