"""Writing the results: ``RESULTS.md`` (tables) and ``results.json`` (everything)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.ggn import AGREEMENT, GGNResult, GGNRow
from benchmarks.hvp import Goal, K, ProblemResult
from benchmarks.kfac import DAMPING, KFACResult
from benchmarks.peers import NO_HVP
from benchmarks.spectral import TARGET, SpectralResults
from curvkit.choice import AUTO_TRIALS

__all__ = ["render_ggn", "render_kfac", "render_markdown", "write_results"]

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


def render_markdown(
    meta: dict[str, Any],
    results: Sequence[ProblemResult],
    goals: Sequence[Goal],
    spectral: SpectralResults | None = None,
    ggn: Sequence[GGNResult] = (),
    kfac: Sequence[KFACResult] = (),
) -> str:
    """The report as Markdown."""
    m = meta["machine"]
    out = [
        "# curvkit benchmarks: Hessian-vector products and spectral analysis",
        "",
        f"Generated {m['date']} by `{meta['command']}` (run from the repository root)"
        + (f" at commit {meta['commit']}." if meta.get("commit") else "."),
        "",
        f"- Machine: {m['cpu']}, {m['cpu_count']} cores, {m['platform']}; load average (1 min) "
        f"at start {m['load_average_1min']}, at end {meta['load_average_end']}.",
        f"- Python {m['python']}, torch {m['torch']}, torch threads {m['torch_threads']} "
        f"(inter-op {m['torch_interop_threads']}), OPENBLAS_NUM_THREADS={m['openblas_num_threads']}.",
        f"- HVP and matmat timing: median of {meta['repeats']} rounds ({meta['matmat_repeats']} for matmat) "
        f"after {meta['warmup']} warm-up round(s) ({meta.get('matmat_warmup', meta['warmup'])} for matmat, "
        "past curvkit's auto-strategy trials), all methods of a table interleaved in each round "
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
    if ggn:
        out += render_ggn(ggn, meta)
    if kfac:
        out += render_kfac(kfac)
    if spectral is not None:
        out += render_spectral(spectral)
    if results:
        out += ["## How each method is called", ""] + _notes(results) + [""]
    return "\n".join(out)


def write_results(
    directory: Path,
    meta: dict[str, Any],
    results: Sequence[ProblemResult],
    goals: Sequence[Goal],
    spectral: SpectralResults | None = None,
    ggn: Sequence[GGNResult] = (),
    kfac: Sequence[KFACResult] = (),
) -> tuple[Path, Path]:
    """Write ``RESULTS.md`` and ``results.json`` into ``directory``; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    md, js = directory / "RESULTS.md", directory / "results.json"
    md.write_text(render_markdown(meta, results, goals, spectral, ggn, kfac), encoding="utf-8")
    payload = {
        "meta": meta,
        "goals": [asdict(g) for g in goals],
        "problems": [r.to_dict() for r in results],
        "ggn": [r.to_dict() for r in ggn],
        "kfac": [r.to_dict() for r in kfac],
    }
    if spectral is not None:
        payload["spectral"] = spectral.to_dict()
    js.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return md, js


# ------------------------------------------------------------------ spectral sections
SPECTRAL_READING = [
    "Reading the spectral tables:",
    "",
    "- Every solve, estimate or density is timed whole, after its library's set-up (operator built, "
    "gradient graph kept where the library keeps one, one warm product), methods interleaved round by "
    "round. *HVPs* are Hessian-vector products counted at the operator (columns multiplied), not the "
    "libraries' own reports; *ms per HVP* is the solve's time divided by them, so it includes each "
    "solver's own linear algebra.",
    "- curvkit's `auto` product strategy alternates looped and batched backward passes over its first "
    f"{2 * AUTO_TRIALS} products with a new column count, timing them (real products, counted as HVPs), "
    "then keeps the faster: *first* columns show the cost of the slower trials, medians exclude it.",
]


def _short(message: str) -> str:
    """The first sentence of an error message."""
    return message.split(". ")[0]


def _mark(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "-"}[met]


def _eigen_section(spectral: SpectralResults) -> list[str]:
    st = spectral.settings
    out = [
        "## Top-5 Hessian eigenvalues",
        "",
        f"Target: the 5 largest eigenvalues to {TARGET:g} relative accuracy. Median of {st.eigen_rounds} "
        "round(s) (slow rows marked so: fewer), each method started from the same seed every "
        "round. *Error*: the largest relative "
        "difference between the returned values, sorted in descending order, and the reference. "
        "*/ curvkit*: time divided by curvkit's at tol 1e-4 (above 1: curvkit is faster). The goals "
        "compare each library's fastest setting that reached the target.",
        "",
    ]
    for res in spectral.eigen:
        cross = (
            f"; curvkit at tol 1e-6 from another start vector agrees to {res.reference_cross_check:.1e}, "
            f"certified residual / |lambda_max| <= {res.check_rel_residual:.1e}"
            if res.reference_cross_check is not None
            else " (not cross-checked in this run)"
        )
        ref = ", ".join(f"{v:.6g}" for v in res.reference)
        out += [
            f"### {res.name}: {res.description}",
            "",
            f"P = {res.params:,}; CPU used by other processes meanwhile: {_pct(res.other_load)}. Reference: "
            f"{ref} (ARPACK `eigsh(H.to_scipy(), k=5, which='LA', tol=1e-10)` on curvkit's float32 "
            f"operator, {res.reference_matvecs} HVPs{cross}).",
            "",
        ]
        rows = []
        for r in res.rows:
            notes = []
            if r.rounds is not None and r.rounds < st.eigen_rounds:
                notes.append(f"timed in {r.rounds} round")
            if r.order and r.order != "descending":
                notes.append(f"returned {r.order}")
            if r.negative:
                notes.append("negative values")
            if r.converged is False:
                notes.append("not converged")
            if r.max_rel_residual is not None:
                notes.append(f"certified: residual / |lambda_max| <= {r.max_rel_residual:.1e}")
            if r.reported_matvecs is not None and r.reported_matvecs != r.matvecs:
                notes.append(f"reports {r.reported_matvecs} HVPs")
            reached = r.rel_error is not None and r.rel_error <= TARGET
            rows.append(
                [
                    r.method + (f" (skipped: {r.skipped})" if r.skipped else ""),
                    r.settings,
                    _num(r.median_s, ".2f"),
                    _num(r.first_s, ".2f"),
                    _num(r.matvecs, "d"),
                    "-" if not r.matvecs or r.median_s is None else f"{1e3 * r.median_s / r.matvecs:.1f}",
                    _num(r.time_ratio, ".2f"),
                    "-" if r.rel_error is None else f"{r.rel_error:.1e}",
                    "-" if r.rel_error is None else _mark(reached),
                    "; ".join(notes),
                ]
            )
        header = [
            "method",
            "settings",
            "median s",
            "first s",
            "HVPs",
            "ms per HVP",
            "/ curvkit",
            "error",
            f"<= {TARGET:g}",
            "notes",
        ]
        out += _table(header, rows) + [""]
    return out


def _trace_section(spectral: SpectralResults) -> list[str]:
    out = [
        "## Trace at an equal budget",
        "",
        f"Every estimator with a budget of 99 Hessian-vector products (curvlinops' XTrace needs an even "
        f"count: 98), seeds 0..{spectral.settings.trace_seeds - 1}. *Error*: mean over the seeds of "
        "|estimate - exact| / |exact|, +- its standard error over the seeds; with this few seeds, "
        "differences within two standard errors are not significant. */ Hutchinson*: error divided by "
        "curvkit Hutchinson's. The trace rows use the full 784-128-64-10 MLP (no smaller model was "
        "needed): the exact trace comes from BackPACK's exact Hessian diagonal, checked against curvkit's "
        "exact trace of the last layer's block from basis vectors.",
        "",
    ]
    for res in spectral.trace:
        out += [f"### {res.name}: {res.description}", ""]
        if res.skipped:
            out += [f"Skipped: {res.skipped}.", ""]
            continue
        out += [
            f"P = {res.params:,}; exact trace {res.exact_trace:.6g} ({res.reference}); check on block "
            f"`{res.check_block}`: BackPACK {res.check_backpack:.6g}, curvkit `trace(H.restrict("
            f"'{res.check_block}'), method='exact')` {res.check_curvkit_exact:.6g}, relative difference "
            f"{res.check_rel_diff:.1e}. ||H||_F^2 = {res.frobenius_sq:.4g} (64 Gaussian probes), "
            f"sum of H_ii^2 = {res.diagonal_sq:.3g}: Hutchinson with 99 Rademacher probes should have a mean "
            f"relative error near {res.expected_hutchinson_error:.2e} (sqrt(2/pi) x its standard deviation "
            f"sqrt(2 (||H||_F^2 - sum H_ii^2) / 99) / |tr H|). CPU used by other processes meanwhile: "
            f"{_pct(res.other_load)}.",
            "",
        ]
        rows = [
            [
                r.method + (f" (skipped: {r.skipped})" if r.skipped else ""),
                r.settings,
                _num(r.matvecs, "d"),
                "-"
                if r.mean_rel_error is None
                else f"{r.mean_rel_error:.2e}"
                + (f" +- {r.stderr_rel_error:.1e}" if r.stderr_rel_error else ""),
                _num(r.max_rel_error, ".2e"),
                _num(r.error_ratio, ".2f"),
                _num(r.median_ms, ".0f"),
                _num(r.first_ms, ".0f"),
            ]
            for r in res.rows
        ]
        header = [
            "method",
            "settings",
            "HVPs",
            "mean rel. error",
            "max rel. error",
            "/ Hutchinson",
            "median ms",
            "first ms",
        ]
        out += _table(header, rows) + [""]
    return out


def _density_section(spectral: SpectralResults) -> list[str]:
    out = [
        "## Spectral density (stochastic Lanczos quadrature)",
        "",
        f"At PyHessian's defaults, `density(iter=100, n_v=1)`: 100 Lanczos steps, 1 run (curvkit also with "
        f"its default 5 runs). {spectral.settings.density_rounds} round(s). */ curvkit*: time divided by "
        "curvkit's with 1 run. *Largest node*: the largest quadrature node (Ritz value), which should "
        "match the largest eigenvalue; its relative difference from the top-5 reference is shown where "
        "that section ran. A library that raised is timed up to the exception.",
        "",
    ]
    for res in spectral.density:
        lam = "" if res.largest_eigenvalue is None else f"; largest eigenvalue {res.largest_eigenvalue:.6g}"
        out += [
            f"### {res.name}: {res.description}",
            "",
            f"P = {res.params:,}{lam}. CPU used by other processes meanwhile: {_pct(res.other_load)}.",
            "",
        ]
        rows = []
        for r in res.rows:
            node = "-"
            if r.top_node is not None:
                node = f"{r.top_node:.6g}" + (
                    f" ({r.top_node_rel_error:.1e})" if r.top_node_rel_error is not None else ""
                )
            outcome = (
                f"**raised** {_short(r.error)}" if r.error else ("ok" if r.median_s is not None else "-")
            )
            rows.append(
                [
                    r.method + (f" (skipped: {r.skipped})" if r.skipped else ""),
                    r.settings,
                    _num(r.median_s, ".2f"),
                    _num(r.matvecs, "d"),
                    _num(r.time_ratio, ".2f"),
                    node,
                    outcome,
                ]
            )
        header = ["method", "settings", "s", "HVPs", "/ curvkit", "largest node (rel. diff.)", "outcome"]
        out += _table(header, rows) + [""]
    return out


def _spectral_notes(spectral: SpectralResults) -> list[str]:
    seen: dict[str, str] = {}
    for section in (spectral.eigen, spectral.trace, spectral.density):
        for res in section:
            for r in res.rows:
                seen.setdefault(r.method, r.note)
    return [f"- **{name}**: {note}" for name, note in seen.items() if note]


def render_spectral(spectral: SpectralResults) -> list[str]:
    """The spectral sections (top-5 eigenvalues, traces, densities) as Markdown lines."""
    out: list[str] = []
    if not (spectral.eigen or spectral.trace or spectral.density):
        return out
    out += SPECTRAL_READING + [""]
    if spectral.eigen:
        out += _eigen_section(spectral)
    if spectral.trace:
        out += _trace_section(spectral)
    if spectral.density:
        out += _density_section(spectral)
    out += ["## How each spectral method is called", ""] + _spectral_notes(spectral) + [""]
    return out


def _timed_header(res: Any, kind: str) -> list[str]:
    """The heading and size line of a problem's section in the GGN and KFAC tables."""
    return [
        f"## {kind} on {res.name}: {res.description}",
        "",
        f"P = {res.params:,} parameters, {res.samples} samples; "
        f"gradient {_num(res.gradient_ms, '.2f')} ms; "
        f"CPU used by other processes meanwhile: {_pct(res.other_load)}.",
        "",
    ]


def _method_notes(rows: Any, kind: str) -> list[str]:
    """``## How each <kind> method is called``: every method's note, once."""
    seen: dict[str, str] = {}
    for r in rows:
        seen.setdefault(r.method, r.note)
    return (
        [f"## How each {kind} method is called", ""]
        + [f"- **{name}**: {note}" for name, note in seen.items() if note]
        + [""]
    )


# ------------------------------------------------------------------ Gauss-Newton and Fisher
GGN_READING = [
    "Reading the Gauss-Newton and Fisher tables:",
    "",
    "- */ gradient*: median time over one full-data loss and gradient timed in the same rounds. "
    "*/ fastest peer*: over the fastest peer row of the same quantity (the exact Fisher of the "
    "cross-entropy is its GGN, so it is set against the GGN peers). Rows marked *(context)* pin a "
    "strategy or loop over separate products; the goals hold the default rows to account.",
    "- *float32 vs curvkit*: relative 2-norm difference on the check vector from curvkit's default row "
    f"of the same quantity. *float64*: the same on a float64 copy of the problem; definitions coincide "
    f"to rounding where it is below {AGREEMENT:g}. Monte-Carlo rows draw independent targets and are "
    "not compared.",
    "- curvkit's `auto` strategy times its ways (forward-mode `torch.func`, plain-autograd double-vjp, "
    "and for the empirical Fisher per-sample gradients) on its first products per column count "
    "and keeps the fastest; the warm-up rounds cover those trials.",
]


def _ggn_table(rows: Sequence[GGNRow], first: str, matmat: bool = False) -> list[str]:
    body = []
    for r in rows:
        name = r.method + ("" if r.headline else " (context)")
        name += f" (skipped: {r.skipped})" if r.skipped else ""
        second = (
            ("-" if r.speedup_vs_loop is None else f"{r.speedup_vs_loop:.2f}x")
            if matmat
            else _num(r.ratio_to_gradient, ".2f")
        )
        body.append(
            [
                name,
                r.quantity,
                _num(r.median_ms, ".2f"),
                "-" if r.median_ms is None else f"{r.min_ms:.2f}-{r.max_ms:.2f}",
                second,
                _num(r.ratio_to_fastest_peer, ".2f"),
                _error(r.rel_error_vs_curvkit),
                "-" if r.float64_agreement is None else f"{r.float64_agreement:.1e}",
            ]
        )
    header = [
        "method",
        "quantity",
        first,
        "fastest-slowest",
        f"speed-up vs {K} separate" if matmat else "/ gradient",
        "/ fastest peer",
        "float32 vs curvkit",
        "float64 vs curvkit",
    ]
    return _table(header, body)


def render_ggn(results: Sequence[GGNResult], meta: dict[str, Any]) -> list[str]:
    """The Gauss-Newton and Fisher sections as Markdown lines."""
    out = GGN_READING + [""]
    for res in results:
        out += _timed_header(res, "GGN and Fisher") + ["One product:", ""]
        out += _ggn_table(res.matvec, "median ms") + ["", f"K = {K} directions:", ""]
        out += _ggn_table(res.matmat, f"median ms (K={K})", matmat=True) + ["", "Diagonals:", ""]
        out += _ggn_table(res.diagonal, "median ms") + [""]
    rows = [r for res in results for r in (*res.matvec, *res.matmat, *res.diagonal)]
    return out + _method_notes(rows, "GGN and Fisher")


# ------------------------------------------------------------------ KFAC
KFAC_READING = [
    "Reading the KFAC tables:",
    "",
    "- *Factors*: each call builds the operator, computes its factors over the data and applies it "
    "once (curvkit and curvlinops), or runs BackPACK's backward pass with the extension (factors "
    "only, no product). EKFAC rows include their second pass. */ fastest peer*: over the fastest peer "
    "row of the same quantity.",
    f"- *Inverse*: one product `(K + {DAMPING:g} I)^-1 v` with the inverse prepared beforehand (untimed).",
    "- *float64 vs curvkit*: relative difference of the products `K v` (or inverse products) on a "
    "float64 copy: they do not depend on how a library splits a scale between the two factors, so "
    "they agree wherever the definitions do. Monte-Carlo rows draw independent targets.",
]


def _kfac_table(rows: Sequence[GGNRow]) -> list[str]:
    body = [
        [
            r.method + (f" (skipped: {r.skipped})" if r.skipped else ""),
            r.quantity,
            _num(r.median_ms, ".2f"),
            "-" if r.median_ms is None else f"{r.min_ms:.2f}-{r.max_ms:.2f}",
            _num(r.ratio_to_gradient, ".2f"),
            _num(r.ratio_to_fastest_peer, ".2f"),
            "-" if r.float64_agreement is None else f"{r.float64_agreement:.1e}",
        ]
        for r in rows
    ]
    header = ["method", "quantity", "median ms", "fastest-slowest", "/ gradient", "/ fastest peer", "float64"]
    return _table(header, body)


def render_kfac(results: Sequence[KFACResult]) -> list[str]:
    """The KFAC sections as Markdown lines."""
    out = KFAC_READING + [""]
    for res in results:
        out += _timed_header(res, "KFAC") + ["Factors:", ""]
        out += _kfac_table(res.factors) + ["", "Inverse products:", ""] + _kfac_table(res.inverse) + [""]
    rows = [r for res in results for r in (*res.factors, *res.inverse)]
    return out + _method_notes(rows, "KFAC")
