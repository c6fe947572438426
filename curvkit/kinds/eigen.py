"""``eigen/largest`` and ``eigen/smallest``: extreme eigenpairs with their residual certificates."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from curvkit.kinds import AnalysisContext, AnalysisKind, ResultTable, Row
from curvkit.kinds.hdf5 import array, attr, get_float, get_int, set_attr, tensor
from curvkit.linalg._common import Progress
from curvkit.linalg.eigen import EigenResult, eigenvalues

__all__ = ["KIND", "eigenpairs", "solver_request", "with_vectors"]


def solver_request(plan: Any) -> dict[str, Any]:
    """The plan's eigen-solver options that change a result (shared by every kind that solves)."""
    return {"max_matvecs": plan.max_matvecs, "reorthogonalisation": plan.reorthogonalisation}


def eigenpairs(op: Any, plan: Any, k: int, which: str, progress: Progress | None = None) -> EigenResult:
    """``k`` eigenpairs at one end of the spectrum, with the plan's solver options."""
    return eigenvalues(
        op,
        k=k,
        which=which,
        tol=plan.tol,
        seed=plan.seed,
        max_matvecs=plan.max_matvecs,
        reorthogonalisation=plan.reorthogonalisation,
        progress=progress,
    )


def with_vectors(result: Any) -> EigenResult | None:
    """``result`` when it is eigenpairs with their vectors (a resumed run's have none)."""
    return result if isinstance(result, EigenResult) and result.vectors is not None else None


def top_pairs(context: AnalysisContext, progress: Progress | None) -> EigenResult:
    """The run's top eigenpairs with vectors: its own, or recomputed (resumed without vectors)."""
    found = with_vectors(context.get("eigen/largest"))
    plan = context.plan
    return found if found is not None else eigenpairs(context.op, plan, plan.top_k, "largest", progress)


_ENDS = {"largest": "top_k", "smallest": "bottom_k"}


def _keys(plan: Any, psd: bool, estimator: str | None) -> list[str]:
    return [f"eigen/{which}" for which, count in _ENDS.items() if getattr(plan, count)]


def _request(plan: Any, key: str) -> dict[str, Any]:
    which = key.partition("/")[2]
    k = getattr(plan, _ENDS[which])
    return {"k": k, "which": which, "tol": plan.tol, "seed": plan.seed, **solver_request(plan)}


def _compute(context: AnalysisContext, key: str) -> EigenResult:
    which = key.partition("/")[2]
    plan = context.plan
    return eigenpairs(context.op, plan, getattr(plan, _ENDS[which]), which, context.report(key))


def write(g: Any, result: EigenResult, vectors: bool = False) -> None:
    """Values, residuals and the solver's figures; the ``[P, k]`` vectors when asked."""
    if vectors and result.vectors is None:
        raise ValueError("vectors=True but the EigenResult has no vectors (return_vectors=False)")
    g.create_dataset("values", data=array(result.values))
    g.create_dataset("residuals", data=array(result.residuals))
    if vectors:
        v = array(result.vectors)
        g.create_dataset("vectors", data=v, chunks=(min(v.shape[0], 1 << 16), max(v.shape[1], 1)))
    set_attr(g.attrs, "matvecs", result.matvecs)
    set_attr(g.attrs, "data_passes", result.data_passes)
    g.attrs["converged"] = bool(result.converged)
    g.attrs["which"] = result.which
    g.attrs["method"] = result.method
    g.attrs["tol"] = float(result.tol)
    g.attrs["restarts"] = int(result.restarts)
    set_attr(g.attrs, "stop_reason", result.stop_reason)
    set_attr(g.attrs, "precision_floor", result.precision_floor)


def read(g: Any, vectors: bool = False) -> EigenResult:
    """The stored eigenpairs; their vectors too when asked (``None`` when not stored)."""
    return EigenResult(
        values=tensor(g["values"]),
        vectors=tensor(g["vectors"]) if vectors and "vectors" in g else None,
        residuals=tensor(g["residuals"]),
        matvecs=int(attr(g.attrs["matvecs"])),
        data_passes=get_int(g.attrs, "data_passes"),
        converged=bool(attr(g.attrs["converged"])),
        which=attr(g.attrs["which"]),
        method=attr(g.attrs["method"]),
        tol=float(attr(g.attrs["tol"])),
        restarts=int(attr(g.attrs["restarts"])),
        stop_reason=attr(g.attrs["stop_reason"]) if "stop_reason" in g.attrs else None,
        precision_floor=get_float(g.attrs, "precision_floor"),
    )


def _rows(res: EigenResult) -> Iterator[Row]:
    for i, v in enumerate(res.values.tolist()):
        yield "eigenvalue", i, v
    for i, v in enumerate(res.residuals.tolist()):
        yield "residual", i, v
    yield "converged", None, int(res.converged)
    yield "matvecs", None, res.matvecs
    if res.precision_floor is not None:
        yield "precision_floor", None, res.precision_floor


def stopped(result: EigenResult) -> str:
    """Why an eigen-solve stopped short of its tolerance."""
    if result.stop_reason == "stagnated" and result.precision_floor is not None:
        return f"stagnated at {result.precision_floor:.1e} relative residual (the products' precision)"
    if result.stop_reason == "budget":
        return "product budget spent"
    return result.stop_reason or "stopped"


def summarize(result: EigenResult) -> str:
    """``[values] (max residual r, n products[, NOT converged: why])``."""
    values = ", ".join(f"{v:.6g}" for v in result.values.tolist())
    status = "" if result.converged else f", NOT converged: {stopped(result)}"
    return f"[{values}] (max residual {result.residuals.max().item():.1e}, {result.matvecs} products{status})"


def _tables(items: Sequence[tuple[str, EigenResult]]) -> list[ResultTable]:
    tables = []
    for key, result in items:
        status = "converged" if result.converged else f"NOT converged ({result.stop_reason})"
        scale = max(abs(v) for v in result.values.tolist()) or 1.0
        rows = [
            [str(i), f"{value:.8g}", f"{residual:.2e}", f"{residual / scale:.1e}"]
            for i, (value, residual) in enumerate(zip(result.values.tolist(), result.residuals.tolist()), 1)
        ]
        title = f"{key}: {status}, {result.matvecs} products, tol {result.tol:g}"
        tables.append(ResultTable(title, ("#", "eigenvalue", "residual", "relative residual"), rows))
    return tables


def _figures(result: EigenResult, title: str, log: bool) -> list[tuple[str, Any]]:
    from curvkit.plotting import plot_eigenvalues

    return [("", plot_eigenvalues(result, title=title))]


def _trajectory(key: str, result: EigenResult) -> dict[str, tuple[str, dict[str, tuple[float, float]]]]:
    if key != "eigen/largest":
        return {}
    return {"top-eigenvalue": ("top eigenvalue", {"": (result.values[0].item(), result.residuals[0].item())})}


KIND = AnalysisKind(
    name="eigen",
    result_type=EigenResult,
    keys=_keys,
    request=_request,
    compute=_compute,
    write=write,
    read=read,
    rows=_rows,
    summarize=summarize,
    tables=_tables,
    figures=_figures,
    trajectory=_trajectory,
)
