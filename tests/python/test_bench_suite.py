# SPDX-License-Identifier: Apache-2.0
"""bench/suite.py end to end on the CPU (the smoke set: nbhd's CPU backends, SDPA math
and eager FlexAttention), its pieces and the timer's budget."""

import json
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import suite  # noqa: E402
import timing as T  # noqa: E402


def test_cpu_smoke_run_writes_every_output(tmp_path, capsys):
    rc = suite.main(["--device", "cpu", "--set", "tiny", "--only", "tiny-2d-16x16-k5x3-d2x1-s1x2",
                     "--peers", "sdpa-math,flex-plain,flex-tiled", "--out-dir", str(tmp_path), "--tag", "smoke"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "mask checks:" in out and "### tiny: float32, forward" in out
    merged = json.loads((tmp_path / "smoke.json").read_text())
    rows = merged["rows"]
    assert {(r["problem"], r["pass"]) for r in rows} == {
        ("tiny-2d-16x16-k5x3-d2x1-s1x2", "fwd"), ("tiny-2d-16x16-k5x3-d2x1-s1x2", "fwd+bwd")}
    run = merged["runs"][0]
    assert run["mask_checks"]["layouts"] >= len(suite.MASK_CHECKS)
    assert run["ceilings"]["copy_gbps"] > 0
    for r in rows:
        res = r["results"]
        for b in ("cpu", "reference", "sdpa-math"):
            assert res[b]["ms"] > 0 and res[b]["reps"] >= 1, (r["problem"], b, res[b])
        for b in ("cpu", "reference"):
            assert res[b]["check_err"] < 1e-3
            assert res[b]["pct_sol"] > 0
        assert r["sol_ms"] > 0 and r["flops"] > 0
        if r["pass"] == "fwd":
            assert res["flex-plain"]["check_err"] < 1e-4 and res["flex-plain"]["ms"] > 0
            assert res["flex-tiled"]["ms"] > 0 and "flex" in r
        else:  # FlexAttention has no backward on the CPU: a reason, not a crash
            assert res["flex-plain"]["kind"] == "cannot-run"
    pieces = list((tmp_path / "smoke").glob("*.jsonl"))
    assert len(pieces) == 1
    lines = [json.loads(x) for x in pieces[0].read_text().splitlines()]
    assert lines[0]["type"] == "run" and lines[-1]["type"] == "end" and len(lines) == 2 + len(rows)
    assert "## Set `tiny`" in (tmp_path / "smoke.md").read_text()


def test_card_slugs():
    assert suite.card_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert suite.card_slug("NVIDIA H200") == "h200"
    assert suite.card_slug("NVIDIA A100-SXM4-80GB") == "a100"
    assert suite.card_slug("NVIDIA GeForce RTX 4090") == "rtx4090"


def test_piece_names_say_what_was_selected():
    a = suite.parse_args(["--set", "paper", "--start", "150", "--limit", "150"])
    assert suite.piece_name(["paper"], a) == "paper-150-300"
    assert suite.piece_name(["anchors"], suite.parse_args([])) == "anchors"
    assert suite.piece_name(["anchors"], suite.parse_args(["--only", "x"])).startswith("anchors-only-")


def test_timer_keeps_to_its_budget():
    timer = T.Timer("cpu", T.Settings(target_ms=1000, warmup_ms=0, min_reps=3))
    m = timer.measure(lambda: time.sleep(0.01), budget_s=0.2)  # 100 repeats wanted, the budget allows fewer
    assert 1 <= m["reps"] < 20 and m["ms"] >= 10
    with pytest.raises(T.OverBudget):  # first call over 3x the budget
        timer.measure(lambda: time.sleep(0.07), budget_s=0.02)
    with pytest.raises(T.OverBudget):  # first call within 3x, but no repeat fits
        timer.measure(lambda: time.sleep(0.03), budget_s=0.02)


def test_cpu_run_of_a_periodic_problem_checks_and_times_every_peer(tmp_path, capsys):
    """The periodic twin of the suite's problems (issue 23): nbhd's backends and
    FlexAttention (two ranges per periodic axis) both run it, and the mask checks hold."""
    rc = suite.main(["--device", "cpu", "--set", "tiny", "--only", "tiny-2d-16x24-k5-periodic01",
                     "--peers", "flex-plain", "--out-dir", str(tmp_path), "--tag", "periodic"])
    assert rc == 0
    rows = json.loads((tmp_path / "periodic.json").read_text())["rows"]
    assert {r["pass"] for r in rows} == {"fwd", "fwd+bwd"}
    assert all(r["problem"] == "tiny-2d-16x24-k5-periodic01" for r in rows)
    for r in rows:  # each timed result matched the exact rows of the spec's dense reference
        assert set(r["results"]) == {"cpu", "reference", "flex-plain"}, r["results"].keys()
        assert all(res["check_err"] < 1e-5 for res in r["results"].values()), r["results"]
