"""``density/slq``: the spectral density by stochastic Lanczos quadrature."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from curvkit.kinds import AnalysisContext, AnalysisKind, Row
from curvkit.kinds.hdf5 import array, attr, tensor
from curvkit.linalg.slq import DensityResult, density

__all__ = ["KIND"]

_FIELDS = ("grid", "density", "nodes", "weights")


def _keys(plan: Any, psd: bool, estimator: str | None) -> list[str]:
    return ["density/slq"] if plan.density else []


def _request(plan: Any, key: str) -> dict[str, Any]:
    return {"steps": plan.density_steps, "runs": plan.density_runs, "seed": plan.seed}


def _compute(context: AnalysisContext, key: str) -> DensityResult:
    plan = context.plan
    return density(
        context.op,
        steps=plan.density_steps,
        runs=plan.density_runs,
        seed=plan.seed,
        progress=context.report(key),
    )


def _write(g: Any, result: DensityResult) -> None:
    for name in _FIELDS:
        g.create_dataset(name, data=array(getattr(result, name)))
    g.create_dataset("run_steps", data=np.asarray(result.run_steps, dtype=np.int64))
    g.attrs["sigma"] = float(result.sigma)
    g.attrs["steps"] = int(result.steps)
    g.attrs["runs"] = int(result.runs)
    g.attrs["matvecs"] = int(result.matvecs)


def _read(g: Any) -> DensityResult:
    return DensityResult(
        **{name: tensor(g[name]) for name in _FIELDS},
        sigma=float(attr(g.attrs["sigma"])),
        steps=int(attr(g.attrs["steps"])),
        runs=int(attr(g.attrs["runs"])),
        matvecs=int(attr(g.attrs["matvecs"])),
        run_steps=tuple(int(s) for s in np.asarray(g["run_steps"][()]).tolist()),
    )


def _rows(res: DensityResult) -> Iterator[Row]:
    for x, d in zip(res.grid.tolist(), res.density.tolist()):
        yield "density", x, d
    yield "sigma", None, res.sigma
    yield "matvecs", None, res.matvecs


def _summarize(result: DensityResult) -> str:
    low, high = result.nodes.min().item(), result.nodes.max().item()
    return (
        f"{result.runs} runs x {result.steps} steps, nodes in [{low:.4g}, {high:.4g}], "
        f"width {result.sigma:.3g} ({result.matvecs} products)"
    )


def _figures(result: DensityResult, title: str, log: bool) -> list[tuple[str, Any]]:
    from curvkit.plotting import plot_density

    return [("", plot_density(result, log=log, title=title))]


KIND = AnalysisKind(
    name="density",
    result_type=DensityResult,
    keys=_keys,
    request=_request,
    compute=_compute,
    write=_write,
    read=_read,
    rows=_rows,
    summarize=_summarize,
    figures=_figures,
)
