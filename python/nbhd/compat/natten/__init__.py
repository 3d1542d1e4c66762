# SPDX-License-Identifier: Apache-2.0
"""NATTEN's Python API on nbhd: `import nbhd.compat.natten as natten`.

NATTEN's API changed across releases, and the same call means different things in
different generations (na2d(q, k, v, 7, 2): dilation 2 in 0.17, stride 2 in 0.20+), so a
generation is chosen explicitly:

    nbhd.compat.natten.v014   NATTEN 0.14-0.15: unfused heads-first ops, odd int kernels
    nbhd.compat.natten.v017   NATTEN 0.16-0.17: fused na*d with dilation 5th and rpb, unfused ops
    nbhd.compat.natten.v020   NATTEN 0.20: stride, no rpb, layers take dim
    nbhd.compat.natten.v021   NATTEN 0.21+: return_lse, layers take embed_dim
    nbhd.compat.natten        the latest (v021)

install(generation) makes `import natten` and its submodules (natten.functional,
natten.context, natten.modules, natten.na2d, ...) resolve to that generation, so code
that imports from NATTEN runs unchanged after one line. docs/natten.md has the
migration guide and the table of names."""

from __future__ import annotations

import importlib
import sys

from .v021 import *  # noqa: F401,F403
from .v021 import __all__ as _latest

GENERATIONS = {"0.14": "v014", "0.15": "v014", "0.16": "v017", "0.17": "v017", "0.20": "v020", "0.21": "v021",
               "latest": "v021"}
# NATTEN's submodules over its generations; each resolves to the generation's one module.
_SUBMODULES = ("functional", "context", "modules", "ops", "types", "natten1d", "natten2d", "natten3d", "na1d",
               "na2d", "na3d", "attn_merge", "experimental")


def install(generation: str = "latest"):
    """Make `import natten` (and natten.functional, natten.context, natten.modules, ...)
    this generation of the compat API: "0.14", "0.15", "0.16", "0.17", "0.20", "0.21" or
    "latest". Returns the module. A NATTEN already imported in this process is an error."""
    if generation not in GENERATIONS:
        raise ValueError(f"generation = {generation!r}; install takes one of {', '.join(GENERATIONS)}")
    current = sys.modules.get("natten")
    module = importlib.import_module(f".{GENERATIONS[generation]}", __name__)
    if current is not None and current is not module:
        raise RuntimeError(f"natten is imported already ({getattr(current, '__file__', current)!s}); install the "
                           f"compat API before anything imports natten")
    sys.modules["natten"] = module
    for name in _SUBMODULES:
        sys.modules[f"natten.{name}"] = module
    return module


__all__ = list(_latest) + ["install", "GENERATIONS"]
