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

import importlib
import importlib.abc
import importlib.util
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


class _ThenRegister(importlib.abc.Loader):
    """torch's own loader, then the registration of the torch.ops.nbhd operators."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        from . import _torch_ops  # noqa: F401

    def __getattr__(self, name):  # get_source, get_resource_reader, ...: torch's loader's
        return getattr(self._loader, name)


class _RegisterWhenTorchLoads(importlib.abc.MetaPathFinder):
    """Finds torch for the other finders and wraps its loader in _ThenRegister, once."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torch")
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegister(spec.loader)
        return spec


# The torch.ops.nbhd operators exist whatever the import order, so that graphs which
# name them (torch.export, a saved compiled program) load without a call to nbhd
# first: registered now if torch is loaded (cheap), else as soon as torch has loaded.
if sys.modules.get("torch") is not None:
    from . import _torch_ops  # noqa: F401
elif not any(isinstance(finder, _RegisterWhenTorchLoads) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTorchLoads())


def __getattr__(name):
    # nbhd.nn and nbhd.distributed need torch; load them on first use so that numpy-only
    # installs import nbhd.
    if name in ("nn", "distributed"):
        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
