"""Writing the results: ``RESULTS.md`` (tables) and ``results.json`` (everything)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.hvp import Goal, K, ProblemResult
from benchmarks.peers import NO_HVP

__all__ = ["render_markdown", "write_results"]

DISAGREE = 1e-4  # relative error in float32 above which a method computes another matrix
LOAD_LIMIT = 0.05
LOAD_WARNING = (
    " **Other processes competed for the cores**: absolute times are slower and noisier than on an "
    "idle machine; ratios within a table much less so, since its methods are timed interleaved."
)


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


READING = [
    "Reading the tables:",
    "",
    "- curvkit's default product, *raw double backward, graph reused* and *PyHessian single batch* "
    "run the same backward pass through a kept gradient graph; differences between them are "
    "per-product overhead and timing noise.",
    "- On this shared 2-core machine, ratios move by about 5-10% between runs even when no other "
    "process is measured: judge a goal near its threshold over several runs.",
    "- With K separate products through a kept graph, `matmat` can only win by doing the K backward "
    "passes as one vectorised pass (`batched-reverse`); where that is slower, `auto` uses the "
    "looped backward and matmat costs what K matvecs cost.",
]


def _error(x: float | None) -> str:
    if x is None:
        return "-"
    return f"**{x:.1e} (disagrees)**" if x > DISAGREE else f"{x:.1e}"


def _pct(x: float | None) -> str:
    return "unknown" if x is None else f"{100 * x:.0f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _hvp_table(res: ProblemResult) -> list[str]:
    rows = [
        [
            f"{r.method}" + (f" (skipped: {r.skipped})" if r.skipped else ""),
            _num(r.median_ms, ".2f"),
            _num(r.ratio_to_gradient, ".2f"),
            _num(r.ratio_to_fastest_raw, ".2f"),
            _error(r.rel_error_vs_curvkit),
        ]
        for r in res.hvp
    ]
    header = ["method", "median ms", "/ gradient", "/ fastest raw torch", "rel. error vs curvkit"]
    return _table(
        header, [["gradient (loss + backward)", _num(res.gradient_ms, ".2f"), "1.00", "", ""]] + rows
    )


def _matmat_table(res: ProblemResult) -> list[str]:
    rows = [
        [
            r.method + (f" (skipped: {r.skipped})" if r.skipped else ""),
            _num(r.median_ms, ".1f"),
            _num(r.per_vector_ms, ".2f"),
            "-" if r.speedup_vs_loop is None else f"{r.speedup_vs_loop:.2f}x",
            _error(r.rel_error_vs_curvkit),
        ]
        for r in res.matmat
    ]
    header = [
        "method",
        f"median ms (K={K})",
        "ms per vector",
        f"speed-up vs {K} x `H @ v`",
        "rel. error vs curvkit",
    ]
    return _table(header, rows)


def _goals_table(goals: Sequence[Goal]) -> list[str]:
    mark = {True: "met", False: "**not met**", None: "not measured"}
    return _table(
        ["goal", "problem", "result", "measured"], [[g.goal, g.problem, mark[g.met], g.detail] for g in goals]
    )


def _notes(res_list: Sequence[ProblemResult]) -> list[str]:
    seen: dict[str, str] = {}
    for res in res_list:
        for r in res.hvp:
            seen.setdefault(r.method, r.note)
        for r in res.matmat:
            seen.setdefault(r.method, r.note)
    return [f"- **{name}**: {note}" for name, note in seen.items() if note]


def render_markdown(meta: dict[str, Any], results: Sequence[ProblemResult], goals: Sequence[Goal]) -> str:
    """The report as Markdown."""
    m = meta["machine"]
    out = [
        "# curvkit benchmarks: Hessian-vector products",
        "",
        f"Generated {m['date']} by `{meta['command']}` (run from the repository root).",
        "",
        f"- Machine: {m['cpu']}, {m['cpu_count']} cores, {m['platform']}; load average (1 min) "
        f"at start {m['load_average_1min']}, at end {meta['load_average_end']}.",
        f"- Python {m['python']}, torch {m['torch']}, torch threads {m['torch_threads']} "
        f"(inter-op {m['torch_interop_threads']}), OPENBLAS_NUM_THREADS={m['openblas_num_threads']}.",
        f"- Timing: median of {meta['repeats']} rounds ({meta['matmat_repeats']} for matmat) after "
        f"{meta['warmup']} warm-up round(s), all methods of a table interleaved in each round "
        "(rotating order), in one process; a fresh random vector every round. Each method's first "
        "product (on the check vector) is untimed, so kept graphs and caches are warm.",
        "- Function: the full-data mean cross-entropy, model in eval mode, float32. Peers get the "
        "whole data set as one batch with `nn.CrossEntropyLoss()` (mean), so their normalisation "
        "matches; agreement with curvkit is checked per method (relative 2-norm error on a fixed vector; "
        f"above {DISAGREE:g} a row is marked as disagreeing: float32 rounding alone stays near 1e-7).",
        f"- Wall time of the run: {meta['wall_s']:.0f} s. CPU used by other processes during the run: "
        f"{_pct(meta['other_load'])} of the machine (per problem below)."
        + (LOAD_WARNING if (meta["other_load"] or 0) > LOAD_LIMIT else ""),
        "",
        "Peers: " + ", ".join(f"{k} {v}" for k, v in meta["peers"].items()) + ".",
        "",
    ]
    out += [f"- {k}: {v}." for k, v in NO_HVP.items()] + [""]
    if goals:
        out += ["## Goals", ""] + _goals_table(goals) + [""] + READING + [""]
    for res in results:
        out += [
            f"## {res.name}: {res.description}",
            "",
            f"P = {res.params:,} parameters, {res.samples} samples; CPU used by other processes "
            f"meanwhile: {_pct(res.other_load)}.",
            "",
        ]
        if res.hvp:
            out += ["HVP (one product `H @ v`):", ""] + _hvp_table(res) + [""]
        if res.matmat:
            out += [f"matmat (K = {K} vectors):", ""] + _matmat_table(res) + [""]
    out += ["## How each method is called", ""] + _notes(results) + [""]
    return "\n".join(out)


def write_results(
    directory: Path, meta: dict[str, Any], results: Sequence[ProblemResult], goals: Sequence[Goal]
) -> tuple[Path, Path]:
    """Write ``RESULTS.md`` and ``results.json`` into ``directory``; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    md, js = directory / "RESULTS.md", directory / "results.json"
    md.write_text(render_markdown(meta, results, goals), encoding="utf-8")
    payload = {"meta": meta, "goals": [asdict(g) for g in goals], "problems": [r.to_dict() for r in results]}
    js.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return md, js
