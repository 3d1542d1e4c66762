# SPDX-License-Identifier: Apache-2.0
"""The CPU backends' threads: torch tensors use torch.get_num_threads() workers, numpy
arrays every hardware thread, and the pool keeps its threads between calls (counted
as the process's tasks in /proc, in a fresh interpreter: before the pool, every call
started and joined a thread per core and none stayed)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc/self/task")

SCRIPT = r"""
import os, sys
import numpy as np
import nbhd
def tasks(): return len(os.listdir("/proc/self/task"))
def call(q): nbhd.na2d(q, q, q, 7, backend="cpu")
if sys.argv[1] == "torch":
    import torch
    q = torch.randn(1, 64, 64, 2, 16, dtype=torch.float64)
    torch.set_num_threads(1); call(q); one = tasks(); call(q); one_again = tasks()
    torch.set_num_threads(3); call(q); three = tasks(); call(q); three_again = tasks()
    torch.set_num_threads(2); call(q); two = tasks()
    print(one_again - one, three - one, three_again - three, two - three)
else:
    q = np.random.default_rng(0).standard_normal((1, 64, 64, 2, 16))
    before = tasks(); call(q); after = tasks(); call(q)
    print(after - before, tasks() - after)
"""


def run(kind):
    out = subprocess.run([sys.executable, "-c", SCRIPT, kind], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return [int(x) for x in out.stdout.split()]


def test_torch_tensors_use_torch_get_num_threads():
    # 1 thread: no helper; 3: two helpers that stay (3 is above this machine's cores
    # where CI runs, so hardware concurrency would give fewer); 2: no new thread.
    assert run("torch") == [0, 2, 0, 0]


def test_numpy_arrays_use_every_hardware_thread():
    assert run("numpy") == [(os.cpu_count() or 1) - 1, 0]


FORK = r"""
import os
import torch, nbhd
q = torch.randn(1, 32, 32, 2, 8, dtype=torch.float64)
torch.set_num_threads(2)
ref = nbhd.na2d(q, q, q, 5, backend="cpu")
pid = os.fork()
if pid == 0:  # the child's pool is its own: the parent's helpers are not in it
    ok = torch.equal(nbhd.na2d(q, q, q, 5, backend="cpu"), ref)
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""


def test_a_forked_child_runs_the_cpu_backend():
    out = subprocess.run([sys.executable, "-c", FORK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["0"], out.stdout + out.stderr
