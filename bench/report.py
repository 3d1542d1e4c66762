# SPDX-License-Identifier: Apache-2.0
"""What the suite writes: the derived numbers of a row, JSON files, Markdown tables and
PNG plots. No GPU, no torch: summarize.py and the tests use it on any machine.

A row is one (set, problem, dtype, pass) with `results[backend]`, each either a timing
({"ms", ...}) or {"skipped": reason, "kind": ...}. Backends: the nbhd ones by name
(fused, gemm, naive, ...), the peers as sdpa-cudnn, sdpa-flash, sdpa-efficient,
sdpa-math, flex-plain, flex-tiled."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

PEERS = ("flex-tiled", "flex-plain", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-math")
NBHD_ORDER = ("fused", "gemm", "naive", "cpu", "reference")
LABELS = {"flex-tiled": "Flex tiled", "flex-plain": "Flex plain", "sdpa-cudnn": "SDPA cuDNN",
          "sdpa-flash": "SDPA flash", "sdpa-efficient": "SDPA efficient", "sdpa-math": "SDPA math"}
# Short cell text for each kind of skip.
SKIP_CODES = {"cannot-run": "n/a", "memory": "oom", "time": "time", "error": "err", "wrong": "WRONG"}
PASS_NAMES = {"fwd": "forward", "bwd": "backward", "fwd+bwd": "forward+backward"}


def is_peer(backend: str) -> bool:
    return backend in PEERS


def computes_na(backend: str) -> bool:
    """Whether a backend computes the neighborhood (nbhd's and Flex), not all pairs."""
    return not backend.startswith("sdpa-")


def label(backend: str) -> str:
    return LABELS.get(backend, backend)


def backend_order(names: Iterable[str]) -> List[str]:
    """nbhd backends first (fused, gemm, naive, then any other), then the peers."""
    names = list(dict.fromkeys(names))
    known = [b for b in NBHD_ORDER if b in names]
    other = sorted(b for b in names if b not in NBHD_ORDER and b not in PEERS)
    return known + other + [b for b in PEERS if b in names]


def timed(entry: Optional[dict]) -> bool:
    return bool(entry) and "ms" in entry


# ---- derived numbers ---------------------------------------------------------------------

def derive(row: dict) -> dict:
    """Fills, from the row's times and its work counts, each timed result's tflops and
    gbps, speedup over SDPA cuDNN, % of SoL and % of the FA2-equivalent rate, and the
    row's fa2_equiv_ms (SDPA flash's time scaled by the fraction of pairs NA computes)."""
    res = row["results"]
    cudnn = res.get("sdpa-cudnn", {}).get("ms") if timed(res.get("sdpa-cudnn")) else None
    flash = res.get("sdpa-flash", {}).get("ms") if timed(res.get("sdpa-flash")) else None
    row["fa2_equiv_ms"] = flash * row["pairs"] / row["sa_pairs"] if flash else None
    for backend, e in res.items():
        if not timed(e):
            continue
        seconds = e["ms"] * 1e-3
        work = row["flops"] if computes_na(backend) else row["sa_flops"]
        e["tflops"] = work / seconds * 1e-12
        e["gbps"] = row["bytes"] / seconds * 1e-9
        e["speedup_vs_cudnn"] = cudnn / e["ms"] if cudnn else None
        e["pct_sol"] = 100.0 * row["sol_ms"] / e["ms"] if row.get("sol_ms") else None
        e["pct_fa2_equiv"] = 100.0 * row["fa2_equiv_ms"] / e["ms"] if row["fa2_equiv_ms"] else None
    return row


def speed_of_light(row: dict, ceilings: dict) -> dict:
    """sol_ms = max(FLOPs at the card's cuDNN attention rate for the row's dtype and pass,
    bytes at the copy bandwidth); dtypes cuDNN does not run (float32) use the dense matmul
    rate of that dtype. Sets sol_ms, sol_bound and sol_rate_tflops on the row."""
    dtype, pass_ = row["dtype"], row["pass"]
    rate = (ceilings.get("attention_tflops", {}).get(dtype) or {}).get(pass_)
    source = "cudnn attention"
    if not rate:
        rate = ceilings.get("matmul_tflops", {}).get(dtype)
        source = "dense matmul"
    bw = ceilings.get("copy_gbps")
    compute_ms = row["flops"] / (rate * 1e12) * 1e3 if rate else None
    memory_ms = row["bytes"] / (bw * 1e9) * 1e3 if bw else None
    candidates = [(t, name) for t, name in ((compute_ms, "compute"), (memory_ms, "memory")) if t]
    if candidates:
        row["sol_ms"], row["sol_bound"] = max(candidates)
        row["sol_rate_tflops"], row["sol_rate_source"] = rate, source
    else:
        row["sol_ms"] = row["sol_bound"] = None
    return row


def best(row: dict, candidates: Sequence[str]) -> Tuple[Optional[str], Optional[dict]]:
    timed_ = [(row["results"][b]["ms"], b) for b in candidates if timed(row["results"].get(b))]
    if not timed_:
        return None, None
    ms, b = min(timed_)
    return b, row["results"][b]


# ---- files ----------------------------------------------------------------------------------

def write_atomic(path: str, text: str) -> None:
    """Write through a temporary file and rename, so a reader (or a kill) never sees half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1, default=_json_default) + "\n")


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, (set, tuple)):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def load(path: str) -> Tuple[List[dict], List[dict]]:
    """(runs, rows) of a suite JSON (one run or merged) or JSONL file (a run cut short).
    Each row gets `run`, the index of its run in `runs`."""
    runs, rows = [], []
    if path.endswith(".jsonl"):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break  # the last line of a killed run
                if record.get("type") == "run":
                    runs.append(record)
                elif record.get("type") == "row":
                    rows.append(dict(record, run=len(runs) - 1))
        return runs, rows
    with open(path) as f:
        data = json.load(f)
    if "runs" in data:
        return data["runs"], data["rows"]
    return [data["run"]], [dict(r, run=0) for r in data["rows"]]


def row_key(row: dict) -> tuple:
    return (row.get("set"), row["problem"], row["dtype"], row["pass"])


def merge(files: Sequence[Tuple[List[dict], List[dict]]]) -> Tuple[List[dict], List[dict]]:
    """Runs and rows of several files; where two hold the same (set, problem, dtype,
    pass) the later run (by its start time) wins."""
    runs, rows = [], {}
    ordered = sorted(files, key=lambda f: min((r.get("started", "") for r in f[0]), default=""))
    for file_runs, file_rows in ordered:
        offset = len(runs)
        runs.extend(file_runs)
        for r in file_rows:
            rows[row_key(r)] = dict(r, run=r.get("run", 0) + offset)
    used = sorted({r["run"] for r in rows.values()})  # runs whose rows all lost are dropped
    index = {old: new for new, old in enumerate(used)}
    return [runs[i] for i in used], [dict(r, run=index[r["run"]]) for r in rows.values()]


# ---- Markdown -------------------------------------------------------------------------------

def fmt_ms(x: Optional[float]) -> str:
    if x is None:
        return "—"
    if x >= 100:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def fmt_x(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.2f}x"


def fmt_pct(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.0f}%" if x >= 10 else f"{x:.1f}%"


def cell(entry: Optional[dict], value) -> str:
    if not entry:
        return ""
    if "skipped" in entry:
        return SKIP_CODES.get(entry.get("kind"), "—")
    return value(entry)


def groups(rows: Sequence[dict]) -> List[Tuple[Tuple[str, str, str], List[dict]]]:
    """Rows by (set, dtype, pass), in the order they first appear."""
    out: Dict[tuple, List[dict]] = {}
    for r in rows:
        out.setdefault((r.get("set", ""), r["dtype"], r["pass"]), []).append(r)
    return list(out.items())


def table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def problem_tables(rows: Sequence[dict], max_rows: int = 80) -> str:
    """Per (set, dtype, pass): times (ms) of every backend with SoL and the best nbhd
    and peer against cuDNN; then % of SoL; then what was not measured and why."""
    parts = []
    for (set_name, dtype, pass_), group in groups(rows):
        backends = backend_order(b for r in group for b in r["results"])
        nbhd = [b for b in backends if not is_peer(b)]
        na_peers = [b for b in backends if is_peer(b) and computes_na(b)]
        title = f"### {set_name}: {dtype}, {PASS_NAMES.get(pass_, pass_)}"
        shown = group[:max_rows]
        header = ["problem", "tokens", "keys/query"] + [label(b) for b in backends] + [
            "SoL", "best nbhd vs cuDNN", "best peer vs cuDNN", "SoL vs cuDNN", "best nbhd % SoL"]
        lines = []
        for r in shown:
            cudnn = r["results"].get("sdpa-cudnn", {}).get("ms")
            _, nb = best(r, nbhd)
            _, peer = best(r, [b for b in backends if is_peer(b) and b != "sdpa-cudnn"])
            lines.append([r["problem"], str(r["tokens"]), f"{r['pairs'] / r['tokens']:.0f}"]
                         + [cell(r["results"].get(b), lambda e: fmt_ms(e["ms"])) for b in backends]
                         + [fmt_ms(r.get("sol_ms")),
                            fmt_x(nb.get("speedup_vs_cudnn")) if nb else "—",
                            fmt_x(peer.get("speedup_vs_cudnn")) if peer else "—",
                            fmt_x(cudnn / r["sol_ms"]) if cudnn and r.get("sol_ms") else "—",
                            fmt_pct(nb.get("pct_sol")) if nb else "—"])
        parts.append(title + "\n\nTimes in ms (median).\n\n" + table(header, lines))
        rate_backends = nbhd + na_peers
        header = ["problem", "SoL bound"] + [f"{label(b)} % SoL" for b in rate_backends] + [
            f"{label(b)} % FA2-eq" for b in rate_backends]
        lines = [[r["problem"], r.get("sol_bound") or "—"]
                 + [cell(r["results"].get(b), lambda e: fmt_pct(e.get("pct_sol"))) for b in rate_backends]
                 + [cell(r["results"].get(b), lambda e: fmt_pct(e.get("pct_fa2_equiv"))) for b in rate_backends]
                 for r in shown]
        parts.append(table(header, lines))
        if len(group) > len(shown):
            parts.append(f"({len(group) - len(shown)} more problems in the JSON.)")
        notes = skip_notes(group)
        if notes:
            parts.append("Not measured:\n\n" + "\n".join(notes))
    return "\n\n".join(parts)


def skip_notes(group: Sequence[dict], limit: int = 30) -> List[str]:
    """One line per (backend, reason), naming the problems."""
    seen: Dict[Tuple[str, str], List[str]] = {}
    for r in group:
        for b, e in r["results"].items():
            if e and "skipped" in e:
                seen.setdefault((b, e["skipped"]), []).append(r["problem"])
    lines = []
    for (b, reason), names in list(seen.items())[:limit]:
        which = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        lines.append(f"- {label(b)} on {which}: {reason}")
    if len(seen) > limit:
        lines.append(f"- ({len(seen) - limit} more reasons in the JSON)")
    return lines


def run_header(run: dict) -> str:
    """A few lines on where and how a run was measured."""
    c = run.get("ceilings", {})
    att = c.get("attention_tflops", {})
    lines = [f"- card: {run.get('card', '?')}; torch {run.get('torch', '?')}, triton {run.get('triton', '?')}, "
             f"cuDNN {run.get('cudnn', '?')}; nbhd {run.get('nbhd_version', '?')} (git {run.get('git', '?')}), "
             f"backends {', '.join(run.get('nbhd_backends', []))}",
             f"- run: {run.get('started', '?')}, sets {', '.join(run.get('sets', []))}, "
             f"command `{run.get('command', '')}`"]
    if c:
        att_text = "; ".join(f"{d} {', '.join(f'{p} {v:.3g}' for p, v in passes.items() if v)}"
                             for d, passes in att.items() if passes)
        mm = ", ".join(f"{d} {v:.3g}" for d, v in c.get("matmul_tflops", {}).items() if v)
        lines.append(f"- ceilings measured in this run: copy {c.get('copy_gbps', 0):.4g} GB/s (read + write); "
                     f"dense matmul TFLOP/s: {mm}; cuDNN attention TFLOP/s ({c.get('attention_problem', '')}): "
                     f"{att_text}")
    return "\n".join(lines)


# ---- plots --------------------------------------------------------------------------------------

COLORS = {"fused": "#1b6ca8", "gemm": "#5aa9e6", "naive": "#9bc1e0", "flex-tiled": "#e07a1f",
          "flex-plain": "#f2b880", "sdpa-cudnn": "#555555", "sdpa-flash": "#999999", "sdpa-efficient": "#bbbbbb",
          "sdpa-math": "#dddddd", "cpu": "#6a994e", "reference": "#a7c957"}


def plots(rows: Sequence[dict], prefix: str, max_bars: int = 40) -> List[str]:
    """Two PNGs per (set, dtype, pass) group: speedup over SDPA cuDNN per problem and
    backend with the SoL speedup marked, and % of SoL. Groups of more than `max_bars`
    problems are drawn as sorted curves instead of bars. Returns the files written
    ([] without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for (set_name, dtype, pass_), group in groups(rows):
        backends = [b for b in backend_order(b for r in group for b in r["results"]) if b != "sdpa-cudnn"]
        tag = f"{set_name}-{dtype}-{pass_.replace('+', '')}"
        for metric, ylabel, log in (("speedup_vs_cudnn", "speedup over SDPA cuDNN (x)", True),
                                    ("pct_sol", "% of speed of light", False)):
            series = {b: [r["results"].get(b, {}).get(metric) for r in group] for b in backends}
            series = {b: v for b, v in series.items() if any(x is not None for x in v)}
            if not series:
                continue
            ref = [r["results"]["sdpa-cudnn"]["ms"] / r["sol_ms"]
                   if timed(r["results"].get("sdpa-cudnn")) and r.get("sol_ms") else None for r in group]
            bars = len(group) <= max_bars
            width = min(18.0, max(7.0, 0.22 * len(group) * (len(series) + 1))) if bars else 9.0
            fig, ax = plt.subplots(figsize=(width, 4.8))
            if bars:
                width = 0.8 / len(series)
                for i, (b, values) in enumerate(series.items()):
                    xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(group))]
                    ax.bar(xs, [v if v is not None else 0 for v in values], width, label=label(b),
                           color=COLORS.get(b))
                if metric == "speedup_vs_cudnn":
                    for j, v in enumerate(ref):
                        if v:
                            ax.hlines(v, j - 0.45, j + 0.45, colors="black", linewidth=2,
                                      label="SoL" if j == next(k for k, x in enumerate(ref) if x) else None)
                    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
                else:
                    ax.axhline(100.0, color="black", linewidth=1.5, label="SoL")
                ax.set_xticks(range(len(group)))
                ax.set_xticklabels([r["problem"] for r in group], rotation=40, ha="right", fontsize=8)
            else:
                for b, values in series.items():
                    v = sorted(x for x in values if x is not None)
                    ax.plot([100.0 * (i + 0.5) / len(v) for i in range(len(v))], v, label=label(b),
                            color=COLORS.get(b))
                if metric == "speedup_vs_cudnn":
                    v = sorted(x for x in ref if x)
                    if v:
                        ax.plot([100.0 * (i + 0.5) / len(v) for i in range(len(v))], v, "k--", label="SoL")
                else:
                    ax.axhline(100.0, color="black", linewidth=1.5, label="SoL")
                ax.set_xlabel(f"% of {len(group)} problems (each curve sorted)")
            if log:
                ax.set_yscale("log")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{set_name}: {dtype}, {PASS_NAMES.get(pass_, pass_)}")
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
            ax.grid(axis="y", alpha=0.3)
            fig.tight_layout()
            path = f"{prefix}-{tag}-{'speedup' if metric == 'speedup_vs_cudnn' else 'sol'}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written
