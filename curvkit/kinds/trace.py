"""``trace/<method>``: the trace, exact or estimated (Hutchinson, Hutch++, XTrace)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from curvkit.kinds import AnalysisContext, AnalysisKind, Row
from curvkit.kinds.hdf5 import attr, get_float, get_int, set_attr
from curvkit.linalg._common import Progress
from curvkit.linalg.trace import TraceResult, trace

__all__ = ["KIND", "traced"]


def traced(op: Any, plan: Any, method: str, progress: Progress | None = None) -> TraceResult:
    """The trace by ``method`` with the plan's budget and seed."""
    return trace(op, method=method, matvecs=plan.trace_matvecs, seed=plan.seed, progress=progress)


def _keys(plan: Any, psd: bool, estimator: str | None) -> list[str]:
    return [f"trace/{plan.trace}"] if plan.trace else []


def _request(plan: Any, key: str) -> dict[str, Any]:
    return {"method": key.partition("/")[2], "matvecs": plan.trace_matvecs, "seed": plan.seed}


def _compute(context: AnalysisContext, key: str) -> TraceResult:
    return traced(context.op, context.plan, key.partition("/")[2], context.report(key))


def _write(g: Any, result: TraceResult) -> None:
    g.create_dataset("estimate", data=float(result.estimate))
    g.create_dataset("stderr", data=float(result.stderr))
    g.attrs["method"] = result.method
    g.attrs["matvecs"] = int(result.matvecs)
    set_attr(g.attrs, "data_passes", result.data_passes)
    g.attrs["seed"] = int(result.seed)
    g.attrs["fallback"] = bool(result.fallback)
    set_attr(g.attrs, "sketch_mass", None if result.sketch_mass is None else float(result.sketch_mass))
    g.attrs["structured"] = bool(result.structured)


def _read(g: Any) -> TraceResult:
    return TraceResult(
        estimate=float(g["estimate"][()]),
        stderr=float(g["stderr"][()]),
        method=attr(g.attrs["method"]),
        matvecs=int(attr(g.attrs["matvecs"])),
        data_passes=get_int(g.attrs, "data_passes"),
        seed=int(attr(g.attrs["seed"])),
        fallback=bool(attr(g.attrs.get("fallback", False))),  # absent in older files
        sketch_mass=get_float(g.attrs, "sketch_mass"),
        structured=bool(attr(g.attrs.get("structured", False))),  # absent in older files
    )


def _rows(res: TraceResult) -> Iterator[Row]:
    yield "estimate", None, res.estimate
    yield "stderr", None, res.stderr
    yield "matvecs", None, res.matvecs
    yield "fallback", None, int(res.fallback)
    if res.sketch_mass is not None:
        yield "sketch_mass", None, res.sketch_mass
    if res.structured:
        yield "structured", None, 1


def _summarize(result: TraceResult) -> str:
    how = f"{result.method}, {result.matvecs} products" + (
        ", fell back to Hutchinson" if result.fallback else ""
    )
    return f"{result.estimate:.6g} +- {result.stderr:.2g} ({how})"


def _trajectory(key: str, result: TraceResult) -> dict[str, tuple[str, dict[str, tuple[float, float]]]]:
    return {"trace": ("trace", {"": (result.estimate, result.stderr)})}


KIND = AnalysisKind(
    name="trace",
    result_type=TraceResult,
    keys=_keys,
    request=_request,
    compute=_compute,
    write=_write,
    read=_read,
    rows=_rows,
    summarize=_summarize,
    trajectory=_trajectory,
)
