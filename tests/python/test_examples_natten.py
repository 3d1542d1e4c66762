# SPDX-License-Identifier: Apache-2.0
"""examples/natten_migration.py: NATTEN 0.17 and 0.21 model code on nbhd.compat.natten,
loading NATTEN-shaped checkpoints strictly and matching nbhd's own layer. Run in a
subprocess: the example installs `natten` into sys.modules."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "natten_migration.py"


def test_example_checks_pass():
    run = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONWARNINGS": "error::FutureWarning"})
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("ok ") for line in lines), run.stdout
