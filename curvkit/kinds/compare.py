"""``compare/<baseline>``: an estimator against a baseline estimator on the same problem.

The top-k eigenvalues, the largest principal angle between the eigenvector
subspaces and the trace (:mod:`curvkit.comparison`), reusing what the run and the
baseline already computed (:class:`curvkit.analysis.Baseline`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from curvkit.comparison import ComparisonResult, compare_spectra
from curvkit.errors import CurvkitError
from curvkit.kinds import AnalysisContext, AnalysisKind, Row
from curvkit.kinds.eigen import eigenpairs, solver_request, with_vectors
from curvkit.kinds.hdf5 import array, attr, tensor
from curvkit.kinds.trace import traced
from curvkit.linalg._common import staged

__all__ = ["KIND"]

_NUMBERS = (
    "value_error",
    "max_principal_angle",
    "trace",
    "trace_stderr",
    "baseline_trace",
    "baseline_trace_stderr",
    "trace_difference",
    "matvecs",
    "baseline_matvecs",
)

_OWNERS = {"estimator": "", "baseline": "baseline "}
"""How :attr:`ComparisonResult.reused` names the inputs of each side."""


def _keys(plan: Any, psd: bool, estimator: str | None) -> list[str]:
    if plan.compare_to is None or estimator == plan.compare_to:
        return []
    return [f"compare/{plan.compare_to}"]


def _request(plan: Any, key: str) -> dict[str, Any]:
    """Without the baseline's options, which the caller adds (``"baseline_options"``)."""
    trace = {"trace": plan.trace or "hutch++", "trace_matvecs": plan.trace_matvecs}
    return {
        "baseline": key.partition("/")[2],
        "k": plan.top_k,
        "tol": plan.tol,
        "seed": plan.seed,
        **solver_request(plan),
        **trace,
    }


def _trace_method(plan: Any, op: Any, other: Any) -> str:
    """``"exact"`` when both operators have a cheap diagonal (``CHEAP_DIAGONAL``: no
    products), else the plan's method (``"hutch++"`` when it has none), with its
    budget and seed, so both traces see the same probes."""
    if getattr(op, "CHEAP_DIAGONAL", False) and getattr(other, "CHEAP_DIAGONAL", False):
        return "exact"
    return plan.trace or "hutch++"


def _compute(context: AnalysisContext, key: str) -> ComparisonResult:
    """Reuse what the run and the baseline already have, compute the rest."""
    op, plan, baseline, progress = context.op, context.plan, context.baseline, context.report(key)
    if baseline is None:
        raise CurvkitError(f"the plan compares with {plan.compare_to!r}, but no baseline was given")
    other = baseline.build()
    method = _trace_method(plan, op, other)
    trace_key = f"trace/{method}"
    reused: list[str] = []
    spent = {"estimator": 0, "baseline": 0}

    def pairs(owner: str, operator: Any, found: Any) -> Any:
        found = with_vectors(found)
        if found is not None:
            reused.append(f"{_OWNERS[owner]}eigenpairs")
            return found
        result = eigenpairs(operator, plan, plan.top_k, "largest", staged(progress, f"{owner} eigenpairs"))
        spent[owner] += result.matvecs
        return result

    def trace(owner: str, operator: Any, found: Any) -> Any:
        if found is not None:
            reused.append(f"{_OWNERS[owner]}trace")
            return found
        result = traced(operator, plan, method, staged(progress, f"{owner} trace"))
        spent[owner] += result.matvecs
        return result

    mine = pairs("estimator", op, context.get("eigen/largest"))
    theirs = baseline.results["eigen/largest"] = pairs(
        "baseline", other, baseline.results.get("eigen/largest")
    )
    my_trace = trace("estimator", op, context.get(trace_key))
    their_trace = baseline.results[trace_key] = trace("baseline", other, baseline.results.get(trace_key))
    return compare_spectra(
        mine,
        theirs,
        my_trace,
        their_trace,
        estimator=getattr(op, "name", type(op).__name__),
        baseline_name=baseline.name,
        matvecs=spent["estimator"],
        baseline_matvecs=spent["baseline"],
        reused=tuple(reused),
    )


def _write(g: Any, result: ComparisonResult) -> None:
    g.create_dataset("values", data=array(result.values))
    g.create_dataset("baseline_values", data=array(result.baseline_values))
    g.attrs["estimator"] = result.estimator
    g.attrs["baseline"] = result.baseline
    g.attrs["trace_method"] = result.trace_method
    for quantity in _NUMBERS:
        value = getattr(result, quantity)
        g.attrs[quantity] = int(value) if quantity.endswith("matvecs") else float(value)
    g.attrs["reused_json"] = json.dumps(list(result.reused))


def _read(g: Any) -> ComparisonResult:
    numbers = {q: (int if q.endswith("matvecs") else float)(attr(g.attrs[q])) for q in _NUMBERS}
    return ComparisonResult(
        estimator=attr(g.attrs["estimator"]),
        baseline=attr(g.attrs["baseline"]),
        values=tensor(g["values"]),
        baseline_values=tensor(g["baseline_values"]),
        trace_method=attr(g.attrs["trace_method"]),
        reused=tuple(json.loads(attr(g.attrs["reused_json"]))),
        **numbers,
    )


def _rows(res: ComparisonResult) -> Iterator[Row]:
    for i, v in enumerate(res.values.tolist()):
        yield "eigenvalue", i, v
    for i, v in enumerate(res.baseline_values.tolist()):
        yield "baseline_eigenvalue", i, v
    for quantity in _NUMBERS:
        yield quantity, None, getattr(res, quantity)


def _summarize(result: ComparisonResult) -> str:
    reused = f"; reused {', '.join(result.reused)}" if result.reused else ""
    return (
        f"{result.estimator} vs {result.baseline}: top-{result.k} eigenvalues differ by "
        f"{result.value_error:.2e} (relative), largest principal angle {result.max_principal_angle:.2e} rad, "
        f"trace {result.trace_difference:+.2%} ({result.trace_method}); "
        f"{result.matvecs} + {result.baseline_matvecs} products{reused}"
    )


def _figures(result: ComparisonResult, title: str, log: bool) -> list[tuple[str, Any]]:
    from curvkit.plotting import plot_comparison

    return [("", plot_comparison(result, title=title))]


KIND = AnalysisKind(
    name="compare",
    result_type=ComparisonResult,
    keys=_keys,
    request=_request,
    compute=_compute,
    write=_write,
    read=_read,
    rows=_rows,
    summarize=_summarize,
    figures=_figures,
)
