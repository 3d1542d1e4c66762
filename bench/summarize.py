#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Paper-style summaries of suite results, and the merged report of a run's pieces.

    python bench/summarize.py bench/results/h100-2026-11-28            # a run's folder of pieces
    python bench/summarize.py a.json b.jsonl --set paper --out paper.md
    python bench/summarize.py bench/results/h100-2026-11-28 --merge-to bench/results/h100-2026-11-28

For each pair of backends (the rows: those that compute the neighborhood, i.e. nbhd's and
Flex; the columns: every backend), over the problems both ran, per rank, dtype and pass:
  - "% of problems where ROW matches or beats COLUMN" (the layout of the paper's Tables 1
    and 2): time(row) <= time(column) * (1 + tie), tie 2% by default (timing noise);
  - "improvement of ROW over COLUMN, average / min / max in %" (Tables 3 and 4):
    (time(column) / time(row) - 1) * 100 per problem.
Then, per backend, the median % of speed of light and of the FA2-equivalent rate.
Markdown to stdout (and --out). --merge-to STEM also writes STEM.json (all rows, later
runs winning), STEM.md (run headers, these summaries and the per-problem tables) and the
plots STEM-*.png."""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report as R  # noqa: E402

RANKS = (1, 2, 3)


def usable(entry: Optional[dict]) -> bool:
    return R.timed(entry)


def pair_stats(rows: Sequence[dict], a: str, b: str, tie: float = 0.02) -> Optional[dict]:
    """Over rows where both a and b were timed: n, % where a matches or beats b, and the
    average / min / max improvement of a over b in %. None when no row has both."""
    speedups = []
    wins = 0
    for r in rows:
        ea, eb = r["results"].get(a), r["results"].get(b)
        if not (usable(ea) and usable(eb)):
            continue
        speedups.append(eb["ms"] / ea["ms"])
        wins += ea["ms"] <= eb["ms"] * (1.0 + tie)
    if not speedups:
        return None
    improvement = [(s - 1.0) * 100.0 for s in speedups]
    return {"n": len(speedups), "pct_matches_or_beats": 100.0 * wins / len(speedups),
            "avg": statistics.fmean(improvement), "min": min(improvement), "max": max(improvement),
            "geomean_speedup": statistics.geometric_mean(speedups)}


def _cells(rows, row_backends, col_backends, tie, value) -> List[List[str]]:
    out = []
    for a in row_backends:
        line = [R.label(a)]
        for b in col_backends:
            s = None if a == b else pair_stats(rows, a, b, tie)
            line.append("–" if s is None else value(s))
        out.append(line)
    return out


def pair_tables(rows: Sequence[dict], tie: float = 0.02) -> str:
    """The Tables 1-4 layouts for every (dtype, pass) present: one table of "matches or
    beats" and one of "improvement" each, with a block of lines per rank."""
    parts = []
    combos = sorted({(r["dtype"], r["pass"]) for r in rows}, key=lambda c: (c[1] != "fwd", c[0]))
    for dtype, pass_ in combos:
        sub = [r for r in rows if r["dtype"] == dtype and r["pass"] == pass_]
        backends = R.backend_order(b for r in sub for b in r["results"] if any(
            usable(x["results"].get(b)) for x in sub))
        row_backends = [b for b in backends if R.computes_na(b)]
        if not row_backends or len(backends) < 2:
            continue
        header = ["rank", "row"] + [f"vs {R.label(b)}" for b in backends]
        beats, gains = [], []
        for rank in RANKS:
            rr = [r for r in sub if r["rank"] == rank]
            if not rr:
                continue
            tag = f"{rank}-D ({len(rr)})"
            for line in _cells(rr, row_backends, backends, tie,
                               lambda s: f"{s['pct_matches_or_beats']:.1f} ({s['n']})"):
                beats.append([tag] + line)
            for line in _cells(rr, row_backends, backends, tie,
                               lambda s: f"{s['avg']:.0f} / {s['min']:.0f} / {s['max']:.0f}"):
                gains.append([tag] + line)
        name = f"{dtype}, {R.PASS_NAMES.get(pass_, pass_)}"
        parts.append(f"### {name}: % of problems where the row matches or beats the column\n\n"
                     f"Cells: % (problems both ran). Matches: within {tie * 100:.0f}%.\n\n"
                     + R.table(header, beats))
        parts.append(f"### {name}: improvement of the row over the column, average / min / max %\n\n"
                     "(time(column) / time(row) - 1) x 100 per problem.\n\n" + R.table(header, gains))
    return "\n\n".join(parts)


def rate_table(rows: Sequence[dict]) -> str:
    """Median (and 10th-90th percentile) % of SoL and % of the FA2-equivalent rate of each
    backend, per (dtype, pass)."""
    header = ["dtype", "pass", "backend", "problems", "% SoL median (p10-p90)", "% FA2-equivalent median (p10-p90)"]
    lines = []
    combos = sorted({(r["dtype"], r["pass"]) for r in rows}, key=lambda c: (c[1] != "fwd", c[0]))

    def spread(values):
        if not values:
            return "—"
        v = sorted(values)
        q = lambda f: v[min(len(v) - 1, int(f * len(v)))]  # noqa: E731
        return f"{statistics.median(v):.1f} ({q(0.1):.1f}-{q(0.9):.1f})"

    for dtype, pass_ in combos:
        sub = [r for r in rows if r["dtype"] == dtype and r["pass"] == pass_]
        for b in R.backend_order(b for r in sub for b in r["results"]):
            entries = [r["results"][b] for r in sub if usable(r["results"].get(b))]
            if not entries:
                continue
            lines.append([dtype, pass_, R.label(b), str(len(entries)),
                          spread([e["pct_sol"] for e in entries if e.get("pct_sol") is not None]),
                          spread([e["pct_fa2_equiv"] for e in entries if e.get("pct_fa2_equiv") is not None])])
    return R.table(header, lines) if lines else ""


def summary_markdown(rows: Sequence[dict], tie: float = 0.02) -> str:
    skipped: Dict[Tuple[str, str], int] = {}
    for r in rows:
        for b, e in r["results"].items():
            if e and "skipped" in e:
                skipped[(b, e.get("kind", "?"))] = skipped.get((b, e.get("kind", "?")), 0) + 1
    counts = {rank: len({r["problem"] for r in rows if r["rank"] == rank}) for rank in RANKS}
    text = [f"{len({r['problem'] for r in rows})} problems ("
            + ", ".join(f"{n} {k}-D" for k, n in counts.items() if n) + f"), {len(rows)} (problem, dtype, pass) rows."]
    if skipped:
        text.append("Not measured (backend: kind x rows): " + "; ".join(
            f"{R.label(b)}: {k} x {n}" for (b, k), n in sorted(skipped.items())) + ".")
    text.append(pair_tables(rows, tie))
    rates = rate_table(rows)
    if rates:
        text.append("### Rates against the speed of light and the FA2-equivalent\n\n" + rates)
    return "\n\n".join(t for t in text if t)


# ---- files ----------------------------------------------------------------------------------

def expand(paths: Sequence[str]) -> List[str]:
    """Files to read: a folder stands for its pieces (*.json; *.jsonl of runs without one)."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            jsons = sorted(glob.glob(os.path.join(p, "*.json")))
            stems = {f[:-len(".json")] for f in jsons}
            out += jsons + [f for f in sorted(glob.glob(os.path.join(p, "*.jsonl"))) if f[:-len(".jsonl")] not in stems]
        else:
            out.append(p)
    return out


def load_all(paths: Sequence[str]) -> Tuple[List[dict], List[dict]]:
    return R.merge([R.load(p) for p in expand(paths)])


def merged_markdown(runs: Sequence[dict], rows: Sequence[dict], tie: float = 0.02) -> str:
    parts = ["# nbhd benchmark results", "## Runs"]
    parts += [f"Run {i}:\n\n{R.run_header(run)}" for i, run in enumerate(runs)]
    by_set: Dict[str, List[dict]] = {}
    for r in rows:
        by_set.setdefault(r.get("set", ""), []).append(r)
    for set_name, set_rows in by_set.items():
        parts.append(f"## Set `{set_name}`")
        if set_name == "paper":
            parts.append(summary_markdown(set_rows, tie))
            parts.append("#### Per problem (first rows of each group)")
            parts.append(R.problem_tables(set_rows, max_rows=40))
        else:
            parts.append(R.problem_tables(set_rows))
    return "\n\n".join(parts) + "\n"


def write_merged(paths: Sequence[str], stem: str, tie: float = 0.02, plots: bool = True) -> List[str]:
    """STEM.json, STEM.md and STEM-*.png from the given files or folders."""
    runs, rows = load_all(paths)
    R.write_json(stem + ".json", {"runs": runs, "rows": rows})
    R.write_atomic(stem + ".md", merged_markdown(runs, rows, tie))
    written = [stem + ".json", stem + ".md"]
    if plots:
        written += R.plots(rows, stem)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="suite JSON / JSONL files, or folders of them")
    ap.add_argument("--set", default="paper", help="rows of this set (default paper; 'all' for every row)")
    ap.add_argument("--tie", type=float, default=0.02, help="relative margin counted as a match (default 0.02)")
    ap.add_argument("--out", help="also write the Markdown here")
    ap.add_argument("--merge-to", metavar="STEM", help="write STEM.json, STEM.md and STEM-*.png of all inputs")
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args(argv)
    runs, rows = load_all(a.inputs)
    chosen = rows if a.set == "all" else [r for r in rows if r.get("set") == a.set]
    if not chosen:
        print(f"summarize: no rows of set '{a.set}' in {', '.join(a.inputs)}", file=sys.stderr)
    text = summary_markdown(chosen, a.tie) if chosen else ""
    print(text)
    if a.out:
        R.write_atomic(a.out, text + "\n")
    if a.merge_to:
        for path in write_merged(a.inputs, a.merge_to, a.tie, plots=not a.no_plots):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
