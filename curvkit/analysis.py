"""The analyses of ``curvkit analyze`` on one operator: a plan and its runner.

An :class:`AnalysisPlan` says what to compute on a curvature operator; its
:meth:`~AnalysisPlan.keys` name each analysis (``"eigen/largest"``,
``"trace/hutch++"``, ``"density/slq"``, ``"checks/symmetry"``, ``"per_layer/module"``...),
the ``kind/name`` keys of :mod:`curvkit.store`.
:func:`run_plan` computes them in that order and hands each result to
``on_result`` as soon as it is finished, so a caller can store it at once; keys
in ``done`` are skipped, which is how an interrupted run resumes.
:mod:`curvkit.runs` turns checkpoints into operators and stores the results.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from curvkit import checks
from curvkit.errors import CurvkitError
from curvkit.linalg._common import Progress
from curvkit.linalg.eigen import eigenvalues
from curvkit.linalg.lanczos import REORTHOGONALISATION
from curvkit.linalg.per_layer import per_layer
from curvkit.linalg.slq import density
from curvkit.linalg.trace import METHODS as TRACE_METHODS
from curvkit.linalg.trace import trace

__all__ = ["AnalysisPlan", "run_plan"]


@dataclass(frozen=True)
class AnalysisPlan:
    """What to compute on one operator.

    Attributes:
        top_k: Largest eigenpairs (0: none).
        bottom_k: Smallest eigenpairs (0: none).
        trace: Trace method (``None``: none), see :func:`curvkit.trace`.
        trace_matvecs: Products for a stochastic trace.
        density: Compute the SLQ spectral density.
        density_steps: Lanczos steps per SLQ run.
        density_runs: SLQ runs.
        check: Run the eigenvalue checks (residuals, symmetry, PSD if claimed,
            agreement with a dense reference when one is given).
        per_layer: Tabulate top eigenvalue and trace per layer.
        tol: Relative residual tolerance of the eigenpairs.
        seed: Seed of every random start vector and probe.
        max_matvecs: Budget of products of each eigenpair solve (``None``: the
            solver's default, see :func:`curvkit.eigenvalues`).
        reorthogonalisation: ``"auto"``, ``"full"`` or ``"partial"``, see
            :func:`curvkit.eigenvalues`.

    Raises:
        CurvkitError: An option out of range, or a plan that computes nothing.
    """

    top_k: int = 5
    bottom_k: int = 0
    trace: str | None = "hutch++"
    trace_matvecs: int = 99
    density: bool = True
    density_steps: int = 60
    density_runs: int = 3
    check: bool = False
    per_layer: bool = False
    tol: float = 1e-4
    seed: int = 0
    max_matvecs: int | None = None
    reorthogonalisation: str = "auto"

    def __post_init__(self) -> None:
        if self.top_k < 0 or self.bottom_k < 0:
            raise CurvkitError(
                f"--top-k and --bottom-k must be 0 or more, got {self.top_k} and {self.bottom_k}"
            )
        if self.trace is not None and self.trace not in TRACE_METHODS:
            raise CurvkitError(f"unknown trace method {self.trace!r}; use one of {list(TRACE_METHODS)}")
        if not (math.isfinite(self.tol) and self.tol > 0):
            raise CurvkitError(f"--tol must be a positive number, got {self.tol:g}")
        for name, value in (
            ("--trace-matvecs", self.trace_matvecs),
            ("density steps", self.density_steps),
            ("density runs", self.density_runs),
        ):
            if value < 1:
                raise CurvkitError(f"{name} must be at least 1, got {value}")
        if self.max_matvecs is not None and self.max_matvecs < 1:
            raise CurvkitError(f"--max-matvecs must be at least 1, got {self.max_matvecs}")
        if self.reorthogonalisation not in REORTHOGONALISATION:
            raise CurvkitError(
                f"unknown reorthogonalisation {self.reorthogonalisation!r}; use one of "
                f"{list(REORTHOGONALISATION)}"
            )
        if not self.keys():
            raise CurvkitError(
                "no analysis asked for (--top-k 0 and nothing else): ask for --top-k, --bottom-k, "
                "--trace, --density, --check or --per-layer"
            )

    def check_dimension(self, dim: int) -> None:
        """Refuse a plan that asks for more eigenpairs than the operator's dimension ``dim``.

        Raises:
            CurvkitError: ``top_k`` or ``bottom_k`` exceeds ``dim``.
        """
        for name, k in (("--top-k", self.top_k), ("--bottom-k", self.bottom_k)):
            if k > dim:
                raise CurvkitError(f"{name} {k} is larger than the number of parameters analysed, P={dim:,}")

    def keys(self, psd: bool = False, reference: bool = False) -> list[str]:
        """The analyses of this plan, in the order they run."""
        keys = []
        if self.top_k:
            keys.append("eigen/largest")
        if self.bottom_k:
            keys.append("eigen/smallest")
        if self.trace:
            keys.append(f"trace/{self.trace}")
        if self.density:
            keys.append("density/slq")
        if self.check:
            keys += ["checks/symmetry"]
            keys += ["checks/residuals"] if self.top_k else []
            keys += ["checks/psd"] if psd else []
            keys += ["checks/agreement"] if reference and self.top_k else []
        if self.per_layer:
            keys.append("per_layer/module")
        return keys

    def request(self, key: str) -> dict[str, Any]:
        """The options that determine the result of analysis ``key`` under this plan.

        A stored result is reused on resume only when it was made with the same
        request: asking for ``--top-k 10`` after a run with ``--top-k 5`` recomputes
        ``eigen/largest`` instead of returning the five stored pairs.
        """
        seed, tol = self.seed, self.tol
        kind, _, name = key.partition("/")
        solver = {"max_matvecs": self.max_matvecs, "reorthogonalisation": self.reorthogonalisation}
        if key == "eigen/largest":
            return {"k": self.top_k, "which": "largest", "tol": tol, "seed": seed, **solver}
        if key == "eigen/smallest":
            return {"k": self.bottom_k, "which": "smallest", "tol": tol, "seed": seed, **solver}
        if kind == "trace":
            return {"method": name, "matvecs": self.trace_matvecs, "seed": seed}
        if key == "density/slq":
            return {"steps": self.density_steps, "runs": self.density_runs, "seed": seed}
        if key in ("checks/residuals", "checks/agreement"):
            return {"k": self.top_k, "tol": tol, "seed": seed, **solver}
        if kind == "checks":
            return {"seed": seed}
        if key == "per_layer/module":
            return {"tol": tol, "seed": seed}
        raise CurvkitError(f"no analysis {key!r} in a plan")


def run_plan(
    op: Any,
    plan: AnalysisPlan,
    *,
    done: Collection[str] = (),
    reference: Callable[[], Tensor] | None = None,
    on_result: Callable[[str, Any, float], None] | None = None,
    progress: Callable[[str, dict], None] | None = None,
) -> dict[str, Any]:
    """Run a plan on an operator; report each result as soon as it is finished.

    Args:
        op: The curvature operator.
        plan: What to compute.
        done: Keys already computed (skipped: resume).
        reference: Returns the dense reference matrix for ``checks/agreement``.
        on_result: Called as ``on_result(key, result, seconds)`` after each analysis.
        progress: Called as ``progress(key, counters)`` during long analyses.

    Returns:
        The results computed in this call, by key.
    """
    results: dict[str, Any] = {}

    def report(key: str) -> Progress | None:
        return None if progress is None else (lambda counters: progress(key, counters))

    def step(key: str, compute: Callable[[], Any]) -> None:
        if key in done:
            return
        start = time.perf_counter()
        result = compute()
        results[key] = result
        if on_result is not None:
            on_result(key, result, time.perf_counter() - start)

    seed, tol = plan.seed, plan.tol
    keys = plan.keys(psd=bool(getattr(op, "PSD", False)), reference=reference is not None)
    for key in keys:
        if key == "eigen/largest":
            step(key, lambda key=key: _eigenpairs(op, plan, plan.top_k, "largest", report(key)))
        elif key == "eigen/smallest":
            step(key, lambda key=key: _eigenpairs(op, plan, plan.bottom_k, "smallest", report(key)))
        elif key.startswith("trace/"):
            step(
                key,
                lambda key=key: trace(
                    op, method=plan.trace, matvecs=plan.trace_matvecs, seed=seed, progress=report(key)
                ),
            )
        elif key == "density/slq":
            step(
                key,
                lambda key=key: density(
                    op, steps=plan.density_steps, runs=plan.density_runs, seed=seed, progress=report(key)
                ),
            )
        elif key == "checks/symmetry":
            step(key, lambda: checks.check_symmetry(op, seed=seed))
        elif key == "checks/residuals":
            step(key, lambda: checks.check_residuals(op, _eigen(op, plan, results), tol=tol))
        elif key == "checks/psd":
            step(key, lambda: checks.check_psd(op, seed=seed))
        elif key == "checks/agreement":
            step(
                key,
                lambda: checks.check_agreement(op, reference(), k=min(plan.top_k, op.shape[0]), seed=seed),
            )
        elif key == "per_layer/module":
            step(key, lambda key=key: per_layer(op, tol=tol, seed=seed, progress=report(key)))
    return results


def _eigenpairs(op: Any, plan: AnalysisPlan, k: int, which: str, progress: Progress | None = None) -> Any:
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


def _eigen(op: Any, plan: AnalysisPlan, results: dict[str, Any]) -> Any:
    """The top eigenpairs of this call, or recomputed (with vectors) when resumed."""
    found = results.get("eigen/largest")
    if found is not None and found.vectors is not None:
        return found
    return _eigenpairs(op, plan, plan.top_k, "largest")
