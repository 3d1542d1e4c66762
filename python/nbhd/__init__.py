# SPDX-License-Identifier: Apache-2.0
"""nbhd: neighborhood attention for numpy arrays and PyTorch tensors.

    nbhd.na1d / na2d / na3d / neighborhood_attention   fused attention (docs/python.md)
    nbhd.merge_attentions                              combine partial results by lse
    nbhd.ops.qk / softmax / av                         unfused steps, weights materialised
    nbhd.nn.NeighborhoodAttention1D / 2D / 3D          layers (need torch)
    nbhd.distributed.na1d / ... / plan                 a grid split across torch.distributed ranks
    nbhd.compat.natten                                 NATTEN's API per release (docs/natten.md)
    nbhd.backends()                                    what this build can run

Torch is optional: it is imported only by nbhd.nn, nbhd.distributed and for torch inputs."""

import sys

from . import _nbhd, ops
from .functional import merge_attentions, na1d, na2d, na3d, neighborhood_attention

__version__ = "0.1.0"
__all__ = ["na1d", "na2d", "na3d", "neighborhood_attention", "merge_attentions", "backends", "ops", "nn"]


def backends() -> list:
    """The backends compiled into this build, best first (backend=None takes the first
    that can run a problem on its tensors' device). Each is a dict: name ('fused',
    'naive', 'cpu', 'reference'), device ('cuda' or 'cpu'), fused_ops (runs
    neighborhood_attention) and unfused_ops (runs nbhd.ops)."""
    return _nbhd.built_backends()


if sys.modules.get("torch") is not None:
    # torch is loaded already: register the torch.ops.nbhd operators now (cheap), so
    # that graphs which name them directly load without a call to nbhd first.
    from . import _torch_ops  # noqa: F401


def __getattr__(name):
    # nbhd.nn and nbhd.distributed need torch; load them on first use so that numpy-only
    # installs import nbhd.
    if name in ("nn", "distributed"):
        import importlib

        return importlib.import_module(".nn", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
