"""``summary/<partition>``: the Newton summary ``(g_bar, H_bar, D3)`` of a checkpoint.

See :func:`curvkit.newton_summary`.

Asked for with ``AnalysisPlan(options={"summary": {...}})`` (``curvkit analyze
--summary wb``). Options:

* ``partition``: ``"canonical"`` (default), ``"wb"`` or ``"trivial"``;
* ``direction``: ``"gradient"`` (default) or ``"random"``;
* ``float64``: compute it on a float64 copy of the problem (default ``True``);
* ``damping_int``: ``lambda_int`` of the cubic-regularised learning rates shown
  beside the Newton ones (default ``10``, the reference package's example),
  stored with the summary.

``H_bar`` comes from the run's curvature (the Hessian by default, Wolinski's;
``--curvature ggn`` gives the Gauss-Newton summary); ``D3`` from the loss.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from curvkit.directions import DIRECTIONS
from curvkit.errors import CurvkitError
from curvkit.kinds import AnalysisContext, AnalysisKind, ResultTable, Row
from curvkit.kinds.hdf5 import attr, tensor
from curvkit.newton import SummaryResult, newton_summary
from curvkit.operator import check_damping
from curvkit.partition import PARTITIONS

__all__ = ["DEFAULTS", "KIND", "newton_rates"]

DEFAULTS: dict[str, Any] = {
    "partition": "canonical",
    "direction": "gradient",
    "float64": True,
    "damping_int": 10.0,
}
"""The options of ``summary``, with their defaults."""


def _options(plan: Any) -> dict[str, Any]:
    return {**DEFAULTS, **plan.options["summary"]}


def _check(options: Mapping[str, Any]) -> None:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise CurvkitError(f"unknown summary option {', '.join(unknown)}; use {', '.join(DEFAULTS)}")
    given = {**DEFAULTS, **options}
    if given["partition"] not in PARTITIONS:
        raise CurvkitError(f"--summary must be one of {', '.join(PARTITIONS)}, got {given['partition']!r}")
    if given["direction"] not in DIRECTIONS:
        raise CurvkitError(f"the summary direction must be gradient or random, got {given['direction']!r}")
    check_damping(given["damping_int"], "--summary-damping-int", plain=True)  # kept as given, in the request
    if not isinstance(given["float64"], bool):
        raise CurvkitError(f"the summary option float64 must be true or false, got {given['float64']!r}")


def _keys(plan: Any, psd: bool, estimator: str | None) -> list[str]:
    return [f"summary/{_options(plan)['partition']}"] if "summary" in plan.options else []


def _request(plan: Any, key: str) -> dict[str, Any]:
    return {**_options(plan), "seed": plan.seed}


def _compute(context: AnalysisContext, key: str) -> SummaryResult:
    options = _options(context.plan)
    op = context.op
    if options["float64"] and op.dtype != torch.float64 and context.precise is not None:
        op = context.precise()
    problem = getattr(op, "problem", None)
    if problem is None:
        raise CurvkitError(f"the Newton summary needs a data-backed curvature, not a {type(op).__name__}")
    return newton_summary(
        problem,
        options["partition"],
        options["direction"],
        curvature=op,
        seed=context.plan.seed,
        damping_int=options["damping_int"],
    )


def cubic_rates(result: SummaryResult) -> tuple[torch.Tensor | None, str]:
    """The cubic-regularised rates at the result's ``damping_int``, or ``None``, and the case or why not."""
    from curvkit.errors import UnboundedModelError

    try:
        step = result.learning_rates()
    except UnboundedModelError as exc:
        return None, str(exc)
    return step.eta, step.case


def newton_rates(result: SummaryResult) -> torch.Tensor | None:
    """``H_bar^-1 g_bar`` when ``H_bar`` is positive definite, else ``None`` (no Newton step)."""
    factor, info = torch.linalg.cholesky_ex(result.H_bar.double())
    if int(info) != 0:
        return None
    return torch.cholesky_solve(result.g_bar.double().unsqueeze(1), factor)[:, 0]


def _write(g: Any, result: SummaryResult) -> None:
    for name in ("g_bar", "H_bar", "D3"):
        g.create_dataset(name, data=getattr(result, name).double().numpy())
    g.attrs["partition"] = result.partition
    g.attrs["direction"] = result.direction
    g.attrs["curvature"] = result.curvature
    g.attrs["subsets_json"] = json.dumps(result.subsets)
    g.attrs["asymmetry"] = float(result.asymmetry)
    g.attrs["matvecs"] = int(result.matvecs)
    g.attrs["damping_int"] = float(result.damping_int)


def _read(g: Any) -> SummaryResult:
    return SummaryResult(
        partition=attr(g.attrs["partition"]),
        subsets=json.loads(attr(g.attrs["subsets_json"])),
        direction=attr(g.attrs["direction"]),
        curvature=attr(g.attrs["curvature"]),
        g_bar=tensor(g["g_bar"]),
        H_bar=tensor(g["H_bar"]),
        D3=tensor(g["D3"]),
        asymmetry=float(attr(g.attrs["asymmetry"])),
        matvecs=int(attr(g.attrs["matvecs"])),
        damping_int=float(attr(g.attrs["damping_int"])),
    )


def _rows(result: SummaryResult) -> Iterator[Row]:
    S = len(result.subsets)
    rates = newton_rates(result)
    cubic, _ = cubic_rates(result)
    for s in range(S):
        yield "g_bar", s, float(result.g_bar[s])
        yield "D3", s, float(result.D3[s])
        yield "newton_rate", s, None if rates is None else float(rates[s])
        yield "cubic_rate", s, None if cubic is None else float(cubic[s])
        for t in range(S):
            yield f"H_bar[{s}]", t, float(result.H_bar[s, t])
    for i, value in enumerate(torch.linalg.eigvalsh(result.H_bar.double()).tolist()):
        yield "H_bar_eigenvalue", i, value


def _summarize(result: SummaryResult) -> str:
    values = torch.linalg.eigvalsh(result.H_bar.double())
    rates = newton_rates(result)
    shown = ", ".join(f"{v:.3g}" for v in values.tolist()[:6]) + (", ..." if len(values) > 6 else "")
    step = (
        "Newton learning rates " + ", ".join(f"{r:.3g}" for r in rates.tolist()[:6])
        if rates is not None
        else "H_bar not positive definite: no Newton step"
    )
    cubic, case = cubic_rates(result)
    regularised = (
        f"cubic-regularised (lambda_int {result.damping_int:g}, {case}) "
        + ", ".join(f"{r:.3g}" for r in cubic.tolist()[:6])
        if cubic is not None
        else f"no cubic-regularised step: {case}"
    )
    return (
        f"{len(result.subsets)} subsets ({result.partition}) along the {result.direction}, "
        f"{result.curvature}: H_bar eigenvalues [{shown}]; {step}; {regularised}"
    )


def _label(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1})"


def _tables(items: Sequence[tuple[str, SummaryResult]]) -> list[ResultTable]:
    tables = []
    for key, result in items:
        rates = newton_rates(result)
        cubic, case = cubic_rates(result)
        rows = [
            [
                _label(names),
                f"{float(result.g_bar[s]):.4g}",
                f"{float(result.H_bar[s, s]):.4g}",
                f"{float(result.D3[s]):.4g}",
                f"{float(result.d[s]):.4g}",
                "-" if rates is None else f"{float(rates[s]):.4g}",
                "-" if cubic is None else f"{float(cubic[s]):.4g}",
            ]
            for s, names in enumerate(result.subsets)
        ]
        values = torch.linalg.eigvalsh(result.H_bar.double()).tolist()
        notes = [f"H_bar eigenvalues: {', '.join(f'{v:.4g}' for v in values)}"]
        if rates is None:
            notes.append("H_bar is not positive definite: the Newton step is undefined")
        notes.append(
            f"cubic rate: lambda_int = {result.damping_int:g}, "
            + (case if cubic is not None else f"none: {case}")
        )
        if result.asymmetry > 1e-6:
            notes.append(f"H_bar was asymmetric by {result.asymmetry:.1e} (relative) before symmetrising")
        title = f"{key}: along the {result.direction}, H_bar from {result.curvature}"
        columns = ("subset", "g_bar", "H_bar diag", "D3", "d", "Newton", "cubic")
        tables.append(ResultTable(title, columns, rows, notes))
    return tables


def _figures(result: SummaryResult, title: str, log: bool) -> list[tuple[str, Any]]:
    from curvkit.plotting import plot_matrix

    labels = [_label(names) for names in result.subsets]
    return [("H_bar", plot_matrix(result.H_bar, labels, title=f"{title}\nH_bar ({result.partition})"))]


def _trajectory(key: str, result: SummaryResult) -> dict[str, tuple[str, dict[str, tuple[float, float]]]]:
    found = {}
    rates = newton_rates(result)
    if rates is not None:
        lines = {_label(names): (float(r), 0.0) for names, r in zip(result.subsets, rates.tolist())}
        found[f"newton-rates-{result.partition}"] = ("Newton learning rate (H_bar^-1 g_bar)", lines)
    cubic, _ = cubic_rates(result)
    if cubic is not None:
        lines = {_label(names): (float(r), 0.0) for names, r in zip(result.subsets, cubic.tolist())}
        label = f"cubic-regularised learning rate (lambda_int {result.damping_int:g})"
        found[f"cubic-rates-{result.partition}"] = (label, lines)
    return found


KIND = AnalysisKind(
    name="summary",
    result_type=SummaryResult,
    keys=_keys,
    request=_request,
    compute=_compute,
    write=_write,
    read=_read,
    rows=_rows,
    summarize=_summarize,
    check=_check,
    tables=_tables,
    figures=_figures,
    trajectory=_trajectory,
)
