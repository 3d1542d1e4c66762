# SPDX-License-Identifier: Apache-2.0
"""Shared settings of the Python tests. Tests marked `cuda` need a GPU and a CUDA
backend in the build; without them they are reported as skipped."""

import pytest

import nbhd


def cuda_backends():
    return [b["name"] for b in nbhd.backends() if b["device"] == "cuda"]


def cuda_ready() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and bool(cuda_backends())


def pytest_collection_modifyitems(config, items):
    if cuda_ready():
        return
    reason = "needs a CUDA device and a CUDA backend built into nbhd (built: %s)" % (
        ", ".join(b["name"] for b in nbhd.backends()))
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))
