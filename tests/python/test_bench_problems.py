# SPDX-License-Identifier: Apache-2.0
"""bench/problems.py: the problem sets and the work each problem counts, against nbhd's
own counts (nbhd.Problem and nbhd-bench --json)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import nbhd

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import problems as P  # noqa: E402


def nbhd_problem(p: P.Problem, dtype="float16"):
    q = nbhd._nbhd.Problem()
    pad = lambda v, fill: list(v) + [fill] * (3 - p.rank)  # noqa: E731
    q.rank, q.batch, q.heads, q.kv_heads, q.dim, q.dim_v = p.rank, p.batch, p.heads, p.heads, p.dim, p.dim
    q.extent, q.kernel, q.dilation, q.stride, q.causal = (pad(p.extent, 1), pad(p.kernel, 1), pad(p.dilation, 1),
                                                           pad(p.stride, 1), pad(p.causal, False))
    q.dtype = dtype
    return q


def all_problems():
    return P.anchors() + P.models() + P.paper(300) + P.tiny()


def test_anchor_set_is_the_readme_table():
    names = [p.name for p in P.anchors()]
    readme = (Path("/work/shared/anchors/README.md"))
    if readme.exists():
        rows = [line.split("|")[1].strip() for line in readme.read_text().splitlines() if line.startswith("| ")]
        assert set(names) == set(rows) - {"problem"}
    assert len(names) == 13
    fwd_only = {p.name for p in P.anchors() if p.passes == ("fwd",)}
    assert fwd_only == {n for n in names if n.startswith("natten-")}


def test_every_problem_is_valid_for_nbhd_and_named_once():
    ps = all_problems()
    for p in ps:
        nbhd_problem(p).validate()
    for group in (P.anchors(), P.models(), P.paper(300)):
        assert len({p.name for p in group}) == len(group)


def test_paper_set_is_reproducible_and_prefix_stable():
    a, b = P.paper(300, seed=0), P.paper(300, seed=0)
    assert a == b
    assert P.paper(20, seed=0) == a[:20]
    assert P.paper(20, seed=1) != a[:20]


def test_paper_set_covers_the_sweep():
    ps = P.paper(300)
    assert {p.rank for p in ps} == {1, 2, 3}
    assert {p.dim for p in ps} == {32, 64, 128}
    assert sum(any(d > 1 for d in p.dilation) for p in ps) > 30
    assert sum(any(p.causal) for p in ps) > 20
    assert sum(any(s > 1 for s in p.stride) for p in ps) > 10
    windows = [p.window for p in ps]
    assert min(windows) <= 9 and max(windows) >= 1000
    for p in ps:  # within the size bounds the sampler promises
        assert 4 * p.batch * p.heads * p.tokens * p.window <= P.PAPER_MAX_WEIGHT_BYTES
        assert 4.0 * p.batch * p.heads * p.tokens ** 2 * p.dim <= P.PAPER_MAX_SA_FLOPS


def test_pairs_and_flops_equal_nbhds_counts():
    for p in all_problems():
        q = nbhd_problem(p)
        assert P.pairs(p) == q.attended_pairs(), p.name
        assert P.forward_flops(p) == pytest.approx(q.forward_flops(), rel=1e-12), p.name
        assert P.flops(p, "fwd+bwd") == pytest.approx(3.5 * q.forward_flops(), rel=1e-12)


def test_self_attention_pairs():
    p = P.Problem("x", (100,), (7,), causal=(True,))
    assert P.sdpa_is_causal(p) and P.sa_pairs(p) == 100 * 101 // 2
    p = P.Problem("y", (10, 10), (3, 3), causal=(True, False))
    assert not P.sdpa_is_causal(p) and P.sa_pairs(p) == 100 ** 2


def test_full_window_counts_all_pairs():
    p = P.Problem("full", (12, 10), (12, 10))
    assert P.pairs(p) == 120 ** 2


def find_nbhd_bench():
    candidates = [os.environ.get("NBHD_BENCH", "")]
    build = os.environ.get("NBHD_BUILD_DIR", str(ROOT / "build"))
    candidates += [os.path.join(build, "tools/nbhd-bench/nbhd-bench")]
    candidates += sorted(str(p) for p in ROOT.glob("build*/tools/nbhd-bench/nbhd-bench"))
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    return None


@pytest.mark.parametrize("pass_", ["fwd", "bwd", "fwd+bwd"])
def test_flops_and_bytes_equal_nbhd_bench_json(pass_):
    bench = find_nbhd_bench()
    if not bench:
        pytest.skip("no nbhd-bench binary built (set NBHD_BENCH or NBHD_BUILD_DIR)")
    for p in (P.Problem("a", (9, 10), (3, 5), dilation=(2, 1), batch=2, heads=2, dim=8),
              P.Problem("b", (40,), (9,), stride=(4,), causal=(True,), heads=3, dim=16),
              P.Problem("c", (4, 6, 5), (3, 3, 5), dilation=(1, 2, 1), causal=(False, True, False), dim=8)):
        for dtype in ("float32", "float16"):
            out = subprocess.run([bench, *p.flags(), "--backend", "cpu", "--dtype", dtype, "--pass", pass_,
                                  "--warmup", "0", "--iters", "1", "--json"], capture_output=True, text=True,
                                 timeout=60, check=True)
            j = json.loads(out.stdout)
            assert j["attended_pairs"] == P.pairs(p)
            assert j["flops"] == pytest.approx(P.flops(p, pass_), rel=1e-8)
            assert j["bytes"] == pytest.approx(P.bytes_moved(p, pass_, dtype), rel=1e-8)


def test_select_only_match_limit():
    ps = P.anchors()
    assert [p.name for p in P.select(ps, only=["2d-128-k31", "2d-nat-56-k7"])] == ["2d-nat-56-k7", "2d-128-k31"]
    assert all("3d" in p.name for p in P.select(ps, match="3d"))
    assert len(P.select(ps, limit=3)) == 3


def test_invalid_problems_are_refused_with_the_axis():
    with pytest.raises(ValueError, match="axis 1"):
        P.Problem("bad", (10, 10), (3, 11))
    with pytest.raises(ValueError, match="dilation has 1 axes"):
        P.Problem("bad", (10, 10), (3, 3), dilation=(2,))


def test_names_and_descriptions():
    p = P.Problem("", (56, 56), (7, 7), dilation=(4, 4), causal=(True, False), batch=4, heads=8, dim=64)
    assert P.auto_name(p) == "2d-56x56-k7-d4-causal10-b4h8d64"
    assert "dil 4x4" in P.describe(p) and "causal 1x0" in P.describe(p)
    assert math.prod(p.extent) == p.tokens
