# SPDX-License-Identifier: Apache-2.0
"""bench/report.py and bench/summarize.py on made-up timings: the derived numbers (SoL,
speedups, FA2-equivalent), the paper-style pair statistics, the JSON/JSONL files (a run
cut short, several pieces merged) and the Markdown. Nothing here is a measurement."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import problems as P  # noqa: E402
import report as R  # noqa: E402
import summarize as S  # noqa: E402

CEILINGS = {"copy_gbps": 3000.0, "matmul_tflops": {"float16": 700.0, "float32": 50.0},
            "attention_tflops": {"float16": {"fwd": 600.0, "fwd+bwd": 500.0}}}


def make_row(p, dtype, pass_, times, set_name="paper"):
    row = {"type": "row", "set": set_name, **p.as_dict(), "dtype": dtype, "pass": pass_, "tokens": p.tokens,
           "pairs": P.pairs(p), "sa_pairs": P.sa_pairs(p), "flops": P.flops(p, pass_),
           "sa_flops": P.sa_flops(p, pass_), "bytes": P.bytes_moved(p, pass_, dtype), "results": {}}
    for backend, ms in times.items():
        row["results"][backend] = {"ms": ms} if isinstance(ms, (int, float)) else ms
    return R.derive(R.speed_of_light(row, CEILINGS))


P2D = P.Problem("p2d", (128, 128), (31, 31), heads=24, dim=128)


def test_speed_of_light_takes_the_slower_bound():
    row = make_row(P2D, "float16", "fwd", {})
    compute_ms = P.forward_flops(P2D) / 600e12 * 1e3
    memory_ms = P.bytes_moved(P2D, "fwd", "float16") / 3000e9 * 1e3
    assert compute_ms > memory_ms and row["sol_ms"] == pytest.approx(compute_ms) and row["sol_bound"] == "compute"
    small = P.Problem("nat", (56, 56), (7, 7), batch=64, heads=4, dim=32)
    row = make_row(small, "float16", "fwd+bwd", {})
    assert row["sol_bound"] == "memory"
    assert row["sol_ms"] == pytest.approx(P.bytes_moved(small, "fwd+bwd", "float16") / 3000e9 * 1e3)
    row = make_row(P2D, "float32", "fwd", {})  # no cuDNN rate for float32: the matmul rate
    assert row["sol_rate_source"] == "dense matmul"
    assert row["sol_ms"] == pytest.approx(P.forward_flops(P2D) / 50e12 * 1e3)


def test_derived_rates():
    row = make_row(P2D, "float16", "fwd", {"fused": 1.0, "sdpa-cudnn": 5.0, "sdpa-flash": 8.0,
                                            "naive": {"skipped": "needs 9 GiB", "kind": "memory"}})
    fused, cudnn = row["results"]["fused"], row["results"]["sdpa-cudnn"]
    assert fused["speedup_vs_cudnn"] == pytest.approx(5.0)
    assert fused["tflops"] == pytest.approx(P.forward_flops(P2D) / 1e-3 / 1e12)
    assert cudnn["tflops"] == pytest.approx(P.sa_flops(P2D, "fwd") / 5e-3 / 1e12)  # SDPA: over all pairs
    fa2 = 8.0 * P.pairs(P2D) / P.sa_pairs(P2D)
    assert row["fa2_equiv_ms"] == pytest.approx(fa2)
    assert fused["pct_fa2_equiv"] == pytest.approx(100 * fa2 / 1.0)
    assert fused["pct_sol"] == pytest.approx(100 * row["sol_ms"] / 1.0)
    assert "speedup_vs_cudnn" not in row["results"]["naive"]


def test_pair_statistics():
    rows = [make_row(P2D, "float16", "fwd", {"fused": f, "naive": n})
            for f, n in ((1.0, 2.0), (1.0, 4.0), (2.0, 1.0), (1.01, 1.0))]
    s = S.pair_stats(rows, "fused", "naive", tie=0.02)
    assert s["n"] == 4
    assert s["pct_matches_or_beats"] == pytest.approx(75.0)  # 1.01 vs 1.0 matches, 2.0 vs 1.0 does not
    improvements = [100.0, 300.0, -50.0, (1.0 / 1.01 - 1) * 100]
    assert s["avg"] == pytest.approx(sum(improvements) / 4)
    assert s["min"] == pytest.approx(-50.0) and s["max"] == pytest.approx(300.0)
    assert S.pair_stats(rows, "fused", "naive", tie=0.0)["pct_matches_or_beats"] == pytest.approx(50.0)
    # a backend skipped on a problem does not count there
    rows.append(make_row(P2D, "float16", "fwd", {"fused": 1.0, "naive": {"skipped": "x", "kind": "memory"}}))
    assert S.pair_stats(rows, "fused", "naive")["n"] == 4
    assert S.pair_stats(rows, "fused", "gemm") is None


def paper_rows():
    rows = []
    for i, p in enumerate(P.paper(12)):
        for dtype in ("float16", "float32"):
            for pass_ in ("fwd", "fwd+bwd"):
                t = {"fused": 1.0 + i, "naive": 3.0 + i, "sdpa-efficient": 2.0 + 2 * i, "sdpa-flash": 2.5 + i}
                if dtype == "float32":
                    t["fused"] = {"skipped": "dtype float32 is not supported", "kind": "cannot-run"}
                    t["sdpa-flash"] = {"skipped": "No available kernel", "kind": "cannot-run"}
                rows.append(make_row(p, dtype, pass_, t))
    return rows


def test_summary_tables_have_the_papers_layout():
    text = S.summary_markdown(paper_rows())
    assert "float16, forward: % of problems where the row matches or beats the column" in text
    assert "float32, forward+backward: improvement of the row over the column" in text
    for rank in (1, 2, 3):
        assert f"| {rank}-D (" in text
    # fused beats naive on every problem: 100.0 of all problems of that rank
    line = next(ln for ln in text.splitlines() if ln.startswith("| 2-D") and "| fused |" in ln)
    assert "| 100.0 (" in line
    assert "% SoL median" in text
    assert "fused: cannot-run x 24" in text


def test_problem_tables_mark_skips_and_explain_them():
    rows = [make_row(p, "float16", "fwd", {"fused": 0.5, "naive": {"skipped": "needs about 114 GiB", "kind": "memory"},
                                          "sdpa-cudnn": 3.0, "flex-tiled": {"skipped": "no tiled order", "kind": "cannot-run"}},
                     set_name="anchors") for p in P.anchors()[:3]]
    text = R.problem_tables(rows)
    assert "### anchors: float16, forward" in text
    assert "| oom |" in text and "| n/a |" in text
    assert "naive on 1d-32k-w2048, 2d-nat-56-k7, 2d-128-k31: needs about 114 GiB" in text
    assert "6.00x" in text  # best nbhd vs cuDNN


def test_jsonl_pieces_load_and_merge(tmp_path):
    import suite

    p = P.anchors()[1]
    run_a = {"type": "run", "started": "2026-01-01T00:00:00+00:00", "ceilings": CEILINGS}
    run_b = {"type": "run", "started": "2026-01-02T00:00:00+00:00", "ceilings": CEILINGS}
    w = suite.Writer(str(tmp_path / "tag" / "anchors.jsonl"), run_a)
    w.add(make_row(p, "float16", "fwd", {"fused": 2.0}, set_name="anchors"))
    w.add(make_row(p, "float16", "fwd+bwd", {"fused": 5.0}, set_name="anchors"))
    w.finish({"seconds": 1})
    w = suite.Writer(str(tmp_path / "tag" / "anchors-only.jsonl"), run_b)
    w.add(make_row(p, "float16", "fwd", {"fused": 1.0}, set_name="anchors"))
    w.file.write('{"type": "row", "set": "anch')  # killed mid-line: the line is dropped
    w.file.close()
    runs, rows = S.load_all([str(tmp_path / "tag")])
    assert len(rows) == 2
    fwd = next(r for r in rows if r["pass"] == "fwd")
    assert fwd["results"]["fused"]["ms"] == 1.0 and runs[fwd["run"]]["started"].startswith("2026-01-02")
    written = S.write_merged([str(tmp_path / "tag")], str(tmp_path / "tag"), plots=False)
    merged = json.loads((tmp_path / "tag.json").read_text())
    assert len(merged["rows"]) == 2 and len(merged["runs"]) == 2
    assert "## Set `anchors`" in (tmp_path / "tag.md").read_text()
    assert str(tmp_path / "tag.md") in written


def test_plots_when_matplotlib_is_there(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [make_row(p, "float16", "fwd", {"fused": 0.5, "sdpa-cudnn": 3.0, "flex-plain": 1.0}, set_name="anchors")
            for p in P.anchors()[:4]]
    files = R.plots(rows, str(tmp_path / "x"))
    assert len(files) == 2 and all(Path(f).stat().st_size > 1000 for f in files)


def test_plots_without_matplotlib_write_nothing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert R.plots([make_row(P2D, "float16", "fwd", {"fused": 1.0})], str(tmp_path / "x")) == []
