"""``checks/<name>``: symmetry, eigenpair residuals, PSD, and agreement with a reference."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from curvkit import checks
from curvkit.checks import CheckResult
from curvkit.kinds import AnalysisContext, AnalysisKind, ResultTable, Row
from curvkit.kinds.eigen import eigenpairs, solver_request, top_pairs, with_vectors
from curvkit.kinds.hdf5 import attr, set_attr
from curvkit.linalg._common import staged

__all__ = ["KIND", "REFERENCE_TOL"]

REFERENCE_TOL = 1e-10
"""Relative residual tolerance of the float64 reference solve of ``checks/agreement``."""


def _keys(plan: Any, psd: bool, estimator: str | None) -> list[str]:
    if not plan.check:
        return []
    names = ["symmetry"]
    names += ["residuals"] if plan.top_k else []
    names += ["psd"] if psd else []
    names += ["agreement"] if plan.top_k else []
    return [f"checks/{name}" for name in names]


def _request(plan: Any, key: str) -> dict[str, Any]:
    name = key.partition("/")[2]
    if name == "residuals":
        return {"k": plan.top_k, "tol": plan.tol, "seed": plan.seed, **solver_request(plan)}
    if name == "agreement":
        return {
            "k": plan.top_k,
            "tol": plan.tol,
            "seed": plan.seed,
            "reference_tol": REFERENCE_TOL,
            **solver_request(plan),
        }
    return {"seed": plan.seed}


def _symmetry(context: AnalysisContext, key: str) -> CheckResult:
    return checks.check_symmetry(context.op, seed=context.plan.seed, progress=context.report(key))


def _residuals(context: AnalysisContext, key: str) -> CheckResult:
    progress = context.report(key)
    pairs = top_pairs(context, progress)
    return checks.check_residuals(context.op, pairs, tol=context.plan.tol, progress=progress)


def _psd(context: AnalysisContext, key: str) -> CheckResult:
    """Both ends solved to the plan's ``tol``, so the ratio is held to
    :func:`~curvkit.checks.agreement_accuracy` (the extreme eigenvalues are known to
    ``tol * ||A||``, never below half the digits of the operator's precision)."""
    op, plan = context.op, context.plan
    accuracy = checks.agreement_accuracy(plan.tol, getattr(op, "product_dtype", op.dtype))
    return checks.check_psd(op, tol=accuracy, eig_tol=plan.tol, seed=plan.seed, progress=context.report(key))


def _agreement(context: AnalysisContext, key: str) -> CheckResult:
    """The run's top-k pairs against the estimator's reference, or why it is not done."""
    op, plan, reference, progress = context.op, context.plan, context.reference, context.report(key)
    if reference is None or reference.build is None:
        reason = "no reference given" if reference is None else reference.reason
        return CheckResult("agreement", None, math.nan, math.nan, f"not checked: {reason}")
    estimate = with_vectors(context.get("eigen/largest"))
    spent = 0
    if estimate is None:  # resumed: the file keeps no vectors
        estimate = eigenpairs(op, plan, plan.top_k, "largest", staged(progress, "estimator"))
        spent = estimate.matvecs
    result = checks.check_agreement(
        op,
        reference.build(),
        k=min(plan.top_k, op.shape[0]),
        tol=plan.tol,
        seed=plan.seed,
        estimate=estimate,
        reference_tol=REFERENCE_TOL,
        label=reference.label,
        progress=progress,
    )
    result = replace(result, figures={**result.figures, "matvecs": float(spent)})
    if getattr(op, "STOCHASTIC", False):  # one draw of a Monte-Carlo estimate: the figures inform
        return replace(
            result,
            passed=None,
            threshold=math.nan,
            detail=f"{result.detail}; a Monte-Carlo estimate differs from its reference by sampling "
            "error, so this is no pass/fail (the conformance battery checks the estimator in expectation)",
        )
    return result


_CHECKS: dict[str, Callable[[AnalysisContext, str], CheckResult]] = {
    "symmetry": _symmetry,
    "residuals": _residuals,
    "psd": _psd,
    "agreement": _agreement,
}


def _compute(context: AnalysisContext, key: str) -> CheckResult:
    return _CHECKS[key.partition("/")[2]](context, key)


def _write(g: Any, result: CheckResult) -> None:
    g.attrs["name"] = result.name
    set_attr(g.attrs, "passed", None if result.passed is None else bool(result.passed))
    g.attrs["measured"] = float(result.measured)
    g.attrs["threshold"] = float(result.threshold)
    g.attrs["detail"] = result.detail
    figures = g.create_group("figures", track_order=True)
    for key, value in result.figures.items():
        figures.attrs[str(key)] = float(value)


def _read(g: Any) -> CheckResult:
    passed = g.attrs.get("passed")
    figures = g["figures"].attrs if "figures" in g else {}
    return CheckResult(
        name=attr(g.attrs["name"]),
        passed=None if passed is None else bool(attr(passed)),
        measured=float(attr(g.attrs["measured"])),
        threshold=float(attr(g.attrs["threshold"])),
        detail=attr(g.attrs.get("detail", "")),
        figures={k: float(attr(v)) for k, v in figures.items()},
    )


def _rows(res: CheckResult) -> Iterator[Row]:
    yield "passed", None, None if res.passed is None else int(res.passed)
    yield "measured", None, None if math.isnan(res.measured) else res.measured
    yield "threshold", None, None if math.isnan(res.threshold) else res.threshold
    for fig, v in res.figures.items():
        yield "figure", fig, v


def _tables(items: Sequence[tuple[str, CheckResult]]) -> list[ResultTable]:
    """One table of every check of a run."""
    rows = [
        [
            c.name,
            str(c.passed),
            f"{c.measured:.3g}",
            f"{c.threshold:.3g}",
            c.detail,
            ", ".join(f"{name} {value:.3g}" for name, value in c.figures.items()),
        ]
        for _, c in items
    ]
    return [ResultTable("checks", ("check", "passed", "measured", "threshold", "what", "figures"), rows)]


KIND = AnalysisKind(
    name="checks",
    result_type=CheckResult,
    keys=_keys,
    request=_request,
    compute=_compute,
    write=_write,
    read=_read,
    rows=_rows,
    summarize=str,
    tables=_tables,
)
