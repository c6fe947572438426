"""How accurate is an inverse-Hessian-vector product? Solvers against a reference, iteration by iteration.

Influence functions, implicit differentiation and Newton steps need
``x* = (A + damping I)^-1 v``; :func:`ihvp_accuracy` tells which solver to trust
on a model and how far each is from the truth. Every solver runs on the
operator as given (its precision, its products), and every iterate ``x_j`` is
compared with a reference ``x*`` computed in float64:

* ``"exact"``: the dense solve of ``A + damping I`` (``P`` products to build it),
  the default when ``P <= DENSE_REFERENCE_MAX_DIM``;
* ``"minres"`` (the default above that) or ``"cg"``: a float64 solve to a
  relative residual of :data:`REFERENCE_TOL`, MINRES because it needs no
  positive definiteness (a raw Hessian is indefinite).

The result says which reference it used and the reference's own measured
relative residual (a reference that did not reach :data:`REFERENCE_TOL` is
flagged). Per iteration of each solver it records the relative error
``||x_j - x*|| / ||x*||``, the cosine similarity of ``x_j`` and ``x*``, the
relative residual, the seconds (the comparison itself not counted) and the
products. A solver that cannot run (a KFAC solver on a model without supported
layers, ``lowrank`` without damping) is recorded with its reason, not dropped.

This is the seed experiment of curvkit, done so that its answer can be trusted:
on a 3-5-1 sigmoid MLP the Hessian is indefinite, plain CG has no guarantee
and an unscaled Neumann series diverges (``docs/solvers.md``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvkit.directions import resolve_direction
from curvkit.errors import CurvkitError
from curvkit.linalg._common import Progress
from curvkit.operator import check_damping
from curvkit.snapshot import fixed_model_state

__all__ = [
    "DENSE_REFERENCE_MAX_DIM",
    "REFERENCE_TOL",
    "CURVE_COLUMNS",
    "IhvpResult",
    "SolverCurve",
    "ihvp_accuracy",
]

REFERENCE_TOL = 1e-10
"""Relative residual the float64 iterative reference solve is run to."""

DENSE_REFERENCE_MAX_DIM = 2000
"""Largest ``P`` for which a dense ``[P, P]`` float64 reference is built (by default).

32 MB at ``P = 2000``, and typically ``P`` products to build. Here, the exact
dense solve is the default reference up to this size (``reference="auto"``);
:mod:`curvkit.analysis` (which re-exports it) builds a callable reference's dense
matrix for ``checks/agreement`` up to it, and above it the agreement check is not
done, and says so."""

REFERENCES = ("auto", "exact", "minres", "cg")

CURVE_COLUMNS = ("iteration", "matvecs", "seconds", "residual", "error", "cosine")
"""The per-iteration columns of a :class:`SolverCurve`."""


@dataclass
class SolverCurve:
    """One solver's way to ``x*``, one entry per iteration (iteration 0: the start).

    Attributes:
        method: The solver.
        converged: Its relative residual reached ``tol`` (measured).
        reason: Why it stopped, in words (the solver's :attr:`~curvkit.SolveResult.reason`,
            or why it could not run).
        columns: :data:`CURVE_COLUMNS` -> float64 tensor, one value per
            iteration (empty when the solver could not run).
        status: Why it stopped, as a token: the solver's
            :attr:`~curvkit.SolveResult.status` (:data:`curvkit.linalg.solve.SOLVE_STATUSES`),
            ``"not-run"`` when it could not run, ``"unknown"`` when read from a store
            written before statuses were recorded (of a solver that did not converge).
    """

    method: str
    converged: bool
    reason: str
    columns: dict[str, Tensor] = field(default_factory=dict)
    status: str = "unknown"

    def final(self, column: str) -> float:
        """The last value of a column (NaN when there is none)."""
        values = self.columns.get(column)
        return math.nan if values is None or values.numel() == 0 else float(values[-1])


@dataclass
class IhvpResult:
    """Solvers of ``(A + damping I) x = v`` against a float64 reference.

    Attributes:
        vector: What ``v`` is: ``"gradient"``, ``"random"`` or a file's name.
        damping: The damping.
        tol: The relative residual each solver was asked for.
        reference: How ``x*`` was computed (``"exact dense solve in float64"``,
            ``"minres in float64"``).
        reference_residual: Its measured relative residual.
        reference_converged: The iterative reference reached :data:`REFERENCE_TOL`
            (always true for the exact solve, whose residual is reported anyway).
        reference_matvecs: Products spent on it.
        curves: By solver, in the order asked.
    """

    vector: str
    damping: float
    tol: float
    reference: str
    reference_residual: float
    reference_converged: bool
    reference_matvecs: int
    curves: dict[str, SolverCurve] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (numbers and lists), e.g. for JSON."""
        return {
            "vector": self.vector,
            "damping": self.damping,
            "tol": self.tol,
            "reference": self.reference,
            "reference_residual": self.reference_residual,
            "reference_converged": self.reference_converged,
            "reference_matvecs": self.reference_matvecs,
            "curves": {
                name: {
                    "converged": c.converged,
                    "reason": c.reason,
                    "status": c.status,
                    **{k: v.tolist() for k, v in c.columns.items()},
                }
                for name, c in self.curves.items()
            },
        }


def _float64(A: Any) -> Any:
    """``A`` in float64: itself, or the same estimator rebuilt on a float64 copy of its problem."""
    if A.dtype == torch.float64:
        return A
    rebuild = getattr(A, "with_problem", None)
    problem = getattr(A, "problem", None)
    if rebuild is None or problem is None:
        raise CurvkitError(
            f"the reference solve is in float64 and this {type(A).__name__} is in {A.dtype}: pass "
            "precise=<the same operator in float64>"
        )
    return rebuild(problem.to(torch.float64))


def _reference(
    A64: Any, v: Tensor, damping: float, how: str, progress: Progress | None
) -> tuple[Tensor, str, float, bool, int]:
    from curvkit.linalg.solve import solve

    P = A64.shape[0]
    if how == "auto":
        how = "exact" if P <= DENSE_REFERENCE_MAX_DIM else "minres"
    if how == "exact":
        dense = A64.to_dense(max_dim=max(P, 1))
        damped = dense + damping * torch.eye(P, dtype=dense.dtype, device=dense.device)
        try:
            x = torch.linalg.solve(damped, v)
        except torch.linalg.LinAlgError:
            raise CurvkitError(
                f"the damped system is singular (damping {damping:g}): add damping for an exact reference"
            ) from None
        residual = float((v - damped @ x).norm() / v.norm().clamp_min(torch.finfo(v.dtype).tiny))
        return x, "exact dense solve in float64", residual, True, P
    result = solve(A64, v, how, damping=damping, tol=REFERENCE_TOL, maxiter=max(1000, 2 * P))
    label = f"{how} in float64 to {REFERENCE_TOL:g}"
    if not result.converged:
        label += f" (NOT reached: {result.reason})"
    return result.x, label, result.residual, result.converged, result.matvecs


@fixed_model_state()
def ihvp_accuracy(
    A: Any,
    solvers: Sequence[str] = ("cg", "minres", "neumann"),
    *,
    vector: str | Tensor = "gradient",
    damping: float = 1e-3,
    tol: float = 1e-6,
    maxiter: int = 100,
    reference: str = "auto",
    precise: Any = None,
    seed: int = 0,
    solver_options: Mapping[str, Mapping[str, Any]] | None = None,
    vector_name: str | None = None,
    progress: Progress | None = None,
) -> IhvpResult:
    """Each solver's iterates for ``(A + damping I)^-1 v`` against a float64 reference.

    Args:
        A: The curvature operator (any precision).
        solvers: Registered solvers (:func:`curvkit.solvers`).
        vector: ``"gradient"`` (the full-data gradient of ``A``'s problem), ``"random"``
            (seeded standard normal) or a ``[P]`` tensor (:func:`curvkit.resolve_direction`).
        damping: Non-negative damping.
        tol: Relative residual each solver stops at.
        maxiter: Iteration cap of each solver.
        reference: ``"auto"``, ``"exact"``, ``"minres"`` or ``"cg"`` (module documentation).
        precise: ``A`` in float64 for the reference; by default ``A`` itself when
            it is float64, else the same estimator rebuilt on a float64 copy of its
            problem.
        seed: Seed of a random vector (and the default seed of stochastic solvers).
        solver_options: Options of each solver, by name (``{"lissa": {"repeats": 4}}``).
        vector_name: What to call a tensor ``vector`` in the result (default ``"tensor"``).
        progress: Called with counters (``solver``, ``iteration``) as solvers work.

    Returns:
        An :class:`IhvpResult`.

    Raises:
        CurvkitError: A negative damping, an unknown solver or reference, no solver,
            a singular system for the exact reference, an unknown vector,
            ``"gradient"`` for an operator without a problem.
        ShapeMismatchError: A vector tensor of the wrong size, or not floating point.
    """
    from curvkit.linalg.solve import solve
    from curvkit.linalg.solve import solvers as registered

    damping = check_damping(damping)
    if reference not in REFERENCES:
        raise CurvkitError(f"unknown reference {reference!r}; use one of {list(REFERENCES)}")
    names = list(dict.fromkeys(solvers))
    known = {spec.name for spec in registered()}
    unknown = [name for name in names if name not in known]
    if not names or unknown:
        raise CurvkitError(
            f"unknown solver {', '.join(unknown) or '(none given)'}; available: {', '.join(sorted(known))}"
        )
    v = resolve_direction(A, vector, seed, what="vector")
    label = vector if isinstance(vector, str) else (vector_name or "tensor")
    A64 = precise if precise is not None else _float64(A)
    v64 = v.to(torch.float64)
    x_ref, how, ref_residual, ref_converged, ref_matvecs = _reference(A64, v64, damping, reference, progress)
    ref_norm = x_ref.norm().clamp_min(torch.finfo(torch.float64).tiny)
    result = IhvpResult(label, float(damping), float(tol), how, ref_residual, ref_converged, ref_matvecs)
    options = dict(solver_options or {})
    for name in names:

        def compare(X: Tensor, name: str = name) -> dict[str, float]:
            x = X[:, 0].to(torch.float64)
            error = float((x - x_ref).norm() / ref_norm)
            cosine = float(x @ x_ref / (x.norm() * ref_norm)) if x.norm() > 0 else 0.0
            if progress is not None:
                progress({"solver": name, "error": error})
            return {"error": error, "cosine": cosine}

        try:
            solved = solve(
                A,
                v,
                name,
                damping=damping,
                tol=tol,
                maxiter=maxiter,
                callback=compare,
                **options.get(name, {}),
            )
        except CurvkitError as exc:  # the solver cannot run here: say why, keep the others
            result.curves[name] = SolverCurve(name, False, f"could not run: {exc}", status="not-run")
            continue
        columns = {
            column: torch.tensor([row.get(column, math.nan) for row in solved.history], dtype=torch.float64)
            for column in CURVE_COLUMNS
        }
        result.curves[name] = SolverCurve(name, solved.converged, solved.reason, columns, solved.status)
    return result
