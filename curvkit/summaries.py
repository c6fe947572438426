"""One line per result, for terminals: ``curvkit analyze``'s summary and ``curvkit show``.

:func:`summarize` looks the result's type up in one table, so that every result
kind is described in one place.

Example:
    >>> import torch
    >>> from curvkit import TraceResult
    >>> summarize(TraceResult(12.5, 0.25, "hutch++", 30, None, 0))
    '12.5 +- 0.25 (hutch++, 30 products)'
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from curvkit.checks import CheckResult
from curvkit.comparison import ComparisonResult
from curvkit.linalg.eigen import EigenResult
from curvkit.linalg.per_layer import LayerTable
from curvkit.linalg.slq import DensityResult
from curvkit.linalg.trace import TraceResult

__all__ = ["summarize"]


def _eigen(result: EigenResult) -> str:
    values = ", ".join(f"{v:.6g}" for v in result.values.tolist())
    status = "" if result.converged else f", NOT converged: {_stopped(result)}"
    return f"[{values}] (max residual {result.residuals.max().item():.1e}, {result.matvecs} products{status})"


def _stopped(result: EigenResult) -> str:
    """Why an eigen-solve stopped short of its tolerance."""
    if result.stop_reason == "stagnated" and result.precision_floor is not None:
        return f"stagnated at {result.precision_floor:.1e} relative residual (the products' precision)"
    if result.stop_reason == "budget":
        return "product budget spent"
    return result.stop_reason or "stopped"


def _trace(result: TraceResult) -> str:
    how = f"{result.method}, {result.matvecs} products" + (
        ", fell back to Hutchinson" if result.fallback else ""
    )
    return f"{result.estimate:.6g} +- {result.stderr:.2g} ({how})"


def _density(result: DensityResult) -> str:
    low, high = result.nodes.min().item(), result.nodes.max().item()
    return (
        f"{result.runs} runs x {result.steps} steps, nodes in [{low:.4g}, {high:.4g}], "
        f"width {result.sigma:.3g} ({result.matvecs} products)"
    )


def _check(result: CheckResult) -> str:
    return str(result)


def _layers(table: LayerTable) -> str:
    rows = list(table)
    if not rows:
        return "no layers"
    top = max(rows, key=lambda r: r.top_eigenvalue)
    return f"{len(rows)} layers; largest top eigenvalue {top.top_eigenvalue:.4g} ({top.name})"


def _comparison(result: ComparisonResult) -> str:
    reused = f"; reused {', '.join(result.reused)}" if result.reused else ""
    return (
        f"{result.estimator} vs {result.baseline}: top-{result.k} eigenvalues differ by "
        f"{result.value_error:.2e} (relative), largest principal angle {result.max_principal_angle:.2e} rad, "
        f"trace {result.trace_difference:+.2%} ({result.trace_method}); "
        f"{result.matvecs} + {result.baseline_matvecs} products{reused}"
    )


SUMMARIES: dict[type, Callable[[Any], str]] = {
    EigenResult: _eigen,
    TraceResult: _trace,
    DensityResult: _density,
    CheckResult: _check,
    LayerTable: _layers,
    ComparisonResult: _comparison,
}
"""One-line description of each result type."""


def summarize(result: Any) -> str:
    """One line describing ``result`` (any result type curvkit's analyses return)."""
    describe = SUMMARIES.get(type(result))
    return describe(result) if describe is not None else type(result).__name__
