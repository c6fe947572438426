"""Solving ``(A + damping I) X = B``: registered solvers, their results, and an inverse operator.

:func:`solve` runs a solver registered through the ``curvkit_register_solvers``
hook (:func:`solvers` lists them; the built-ins are registered by
``curvkit.plugins.solvers``) on a right-hand side ``B`` of shape ``[P]`` or
``[P, K]`` (``K`` systems solved together, one product with ``K`` columns per
iteration: one pass over the data). :func:`inverse` wraps a solver as an
operator. :class:`SolveHistory` is what every solver keeps. The built-in
algorithms:

* :mod:`curvkit.linalg.krylov`: preconditioned conjugate gradients (stops at
  non-positive curvature, saying where) and MINRES (symmetric indefinite systems);
* :mod:`curvkit.linalg.series`: the Neumann series with its scale estimated,
  and LiSSA, its stochastic version on mini-batches of the problem's data;
* :mod:`curvkit.linalg.direct`: the exact solve (the operator's structure, or the
  dense matrix), the structured inverse of the operator's KFAC or EKFAC, and the
  low-rank inverse from the top eigenpairs.

Every solver records its history (relative residual, seconds and products per
iteration), stops on a non-finite value (reporting the iteration and returning
the last finite iterate) and never reports convergence it has not measured:
``converged`` means ``||B - (A + damping I) X|| <= tol ||B||`` column by column,
with the residual of the recurrence (CG, MINRES, Neumann) or a computed one
(exact, kfac, ekfac, lowrank; lissa when asked to measure).

Why a solve stopped is :attr:`SolveResult.status`, one token of
:data:`SOLVE_STATUSES` (what callers compare), and :attr:`SolveResult.reason`,
a sentence for people (never parsed). The tokens: ``converged``, ``maxiter``,
``stagnated``, ``non-positive-curvature``, ``non-finite``, ``diverging``,
``breakdown``, ``above-tol``, ``approximate`` and ``unmeasured``;
:func:`solve` refuses a solver's result with another status, or whose
``converged`` disagrees with it.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvkit.arguments import integer, relative_tolerance
from curvkit.errors import CurvkitError, CurvkitWarning, ShapeMismatchError
from curvkit.operator import CurvatureOperator, check_damping
from curvkit.snapshot import fixed_model_state
from curvkit.solver_spec import SolverSpec

__all__ = [
    "SOLVE_ARGUMENTS",
    "SOLVE_STATUSES",
    "Cycle",
    "InverseOperator",
    "SolveHistory",
    "SolveResult",
    "SolverSpec",
    "inverse",
    "check_solver_options",
    "refuse_options",
    "samples_bounding",
    "solver_options",
    "solve",
    "solvers",
]


SOLVE_STATUSES: dict[str, str] = {
    "converged": "the measured relative residual is within tol for every column",
    "maxiter": "the iterations (maxiter; lissa's depth) ran out with the measured residual above tol",
    "stagnated": "restarts from the true residual stopped halving it above tol: the products' precision",
    "non-positive-curvature": "A + damping I is not positive definite: a curvature p^T (A + damping I) p "
    "(cg) or an eigenvalue (neumann's and lissa's scale, lowrank's pairs) at or below zero",
    "non-finite": "a product or the answer was not finite; the last finite iterate is returned",
    "diverging": "the series' residual or iterate grew past DIVERGENCE times its bound (neumann, lissa)",
    "breakdown": "the Krylov space is exhausted (an invariant subspace) with the residual above tol (minres)",
    "above-tol": "a direct solve (exact) answered with its measured residual above tol",
    "approximate": "the inverse of an approximation of A (kfac, ekfac, lowrank): its measured residual "
    "against A is above tol",
    "unmeasured": "the residual was not measured, so convergence is not claimed (lissa without check_every)",
}
"""Every :attr:`SolveResult.status`: token -> what it means. ``"converged"`` is the only one with
``converged=True``."""


@dataclass
class SolveResult:
    """The answer of a solver and how it got there.

    Attributes:
        x: The solution, shaped like the right-hand side (``[P]`` or ``[P, K]``).
        converged: Every column's relative residual is within ``tol``
            (``status == "converged"``).
        reason: Why it stopped, in words for people (``"converged"``, ``"maxiter"``,
            ``"non-positive curvature ... at iteration i (column k): ..."``, ``"non-finite
            value at iteration i"``, ...); compare :attr:`status`, never this text.
        iterations: Iterations run.
        matvecs: Products with the operator (columns multiplied).
        residual: The final largest relative residual over the columns (NaN when
            not measured: ``lissa`` without ``check_every``).
        history: Per iteration: ``{"iteration", "residual", "seconds", "matvecs"}``
            (``residual``: the largest relative residual over the columns, NaN
            when not measured), and a solver's own counts (``lissa``: ``samples``).
        method: The solver's name.
        status: Why it stopped, one token of :data:`SOLVE_STATUSES` (``"converged"``,
            ``"maxiter"``, ``"non-positive-curvature"``, ``"non-finite"``, ...).
            Keyword-only; :func:`solve` refuses a solver's result without a known one.
    """

    x: Tensor
    converged: bool
    reason: str
    iterations: int
    matvecs: int
    residual: float
    history: list[dict[str, float]] = field(default_factory=list)
    method: str = ""
    status: str = field(default="", kw_only=True)


def solvers() -> list[SolverSpec]:
    """Every registered solver, sorted by name."""
    from curvkit.registry import items

    return sorted(items("solvers").values(), key=lambda s: s.name)


def _solver(method: str) -> SolverSpec:
    from curvkit.registry import items

    registered = items("solvers")
    if method not in registered:
        raise CurvkitError(f"unknown solver {method!r}; available: {', '.join(sorted(registered))}")
    return registered[method]


@fixed_model_state()
def solve(
    A: CurvatureOperator,
    v: Tensor,
    method: str = "cg",
    damping: float = 0.0,
    tol: float = 1e-6,
    maxiter: int | None = None,
    preconditioner: CurvatureOperator | None = None,
    x0: Tensor | None = None,
    callback: Callable[[Tensor], Mapping[str, float]] | None = None,
    **options: Any,
) -> SolveResult:
    """``(A + damping I)^-1 v`` by a registered solver.

    Args:
        A: The operator.
        v: ``[P]`` or ``[P, K]`` right-hand sides.
        method: A registered solver (:func:`solvers`): ``"cg"``, ``"minres"``, ``"exact"``, ...
        damping: Non-negative ``damping``.
        tol: Relative residual to reach, per column.
        maxiter: Iteration cap (default ``max(100, 10 sqrt(P))``).
        preconditioner: An operator approximating ``A`` with an inverse (a
            diagonal, KFAC); CG applies ``(M + damping I)^-1``.
        x0: Warm start, shaped like ``v``.
        callback: Called with each recorded iterate (``[P, K]``, iteration 0
            included) as ``callback(X)``; the numbers it returns join that
            iteration's :attr:`SolveResult.history` row (e.g. the error to a known
            solution), and the seconds it takes are not counted. Passed to the
            solver only when given.
        **options: The solver's own options (:func:`solver_options`).

    Raises:
        UnknownOptionError: An option the solver does not take (:func:`check_solver_options`).
        CurvkitError: An unknown solver, an option's value that its
            :attr:`SolverSpec.option_checks`, ``dimension_checks`` or ``sample_checks``
            refuse (before any product), a damping
            that is not a finite number ``>= 0``, a ``tol`` that is not a number
            in ``(0, 1)``, a ``maxiter`` that is not an integer ``>= 1``; a solver whose
            result has no known :attr:`~SolveResult.status`, or a ``converged`` that
            disagrees with it.
        ShapeMismatchError: ``v`` or ``x0`` of the wrong size.
    """
    spec = _solver(method)
    P = A.shape[0]
    options = check_solver_options(method, options, dim=P, samples=samples_bounding(A, method, options))
    damping = check_damping(damping)
    tol = relative_tolerance(tol, "tol")
    maxiter = max(100, int(10 * math.sqrt(P))) if maxiter is None else integer(maxiter, "maxiter")
    B = _as_columns(v, P, "the right-hand side").to(device=A.device, dtype=A.dtype)
    X0 = None if x0 is None else _as_columns(x0, P, "x0").to(device=A.device, dtype=A.dtype)
    if spec.psd_only and not getattr(A, "PSD", False):
        warnings.warn(
            f"solver {spec.name!r} needs A + damping I positive definite, and this operator is not known to "
            "be positive semi-definite: a non-positive curvature will stop it (minres solves indefinite "
            "systems)",
            CurvkitWarning,
            stacklevel=3,  # solve, its fixed_model_state wrapper, the caller
        )
    if X0 is not None and X0.shape != B.shape:
        raise ShapeMismatchError(f"x0 has shape {tuple(x0.shape)}; the right-hand side {tuple(v.shape)}")
    result = spec.solve(
        A,
        B,
        damping=damping,
        tol=tol,
        maxiter=maxiter,
        x0=X0,
        preconditioner=preconditioner,
        **({} if callback is None else {"callback": callback}),
        **options,
    )
    _check_status(spec, result)
    result.method = spec.name
    if v.dim() == 1:
        result.x = result.x[:, 0]
    return result


def _check_status(spec: SolverSpec, result: SolveResult) -> None:
    """Refuse a solver's result without a known status, or whose ``converged`` disagrees with it."""
    status = getattr(result, "status", None)
    if status not in SOLVE_STATUSES:
        raise CurvkitError(
            f"solver {spec.name!r} returned the status {status!r}; a SolveResult's status must be one of "
            f"{', '.join(SOLVE_STATUSES)} (curvkit.linalg.solve.SOLVE_STATUSES)"
        )
    if bool(result.converged) != (status == "converged"):
        raise CurvkitError(
            f"solver {spec.name!r} returned converged={result.converged!r} with the status {status!r}; "
            "converged=True goes with the status 'converged' only"
        )


def _as_columns(v: Tensor, P: int, what: str) -> Tensor:
    if not isinstance(v, Tensor) or v.dim() not in (1, 2) or v.shape[0] != P:
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ShapeMismatchError(f"{what} must be [P] or [P, K] with P = {P}, got {shape}")
    if not v.is_floating_point():
        raise ShapeMismatchError(f"{what} must be a floating-point tensor, got {v.dtype}")
    return v.unsqueeze(1) if v.dim() == 1 else v


class InverseOperator(CurvatureOperator):
    """``(A + damping I)^-1`` as an operator: each product is a solve (see :func:`inverse`).

    Attributes:
        last: The :class:`SolveResult` of the latest product.
    """

    def __init__(self, A: CurvatureOperator, method: str, damping: float, **settings: Any):
        super().__init__(A.layout, dtype=A.dtype, device=A.device, product_dtype=A.product_dtype)
        self.A, self.method, self.damping, self.settings = A, method, damping, settings
        self.SYMMETRIC, self.PSD, self.EXACT = A.SYMMETRIC, A.PSD, method == "exact" and A.EXACT
        self.last: SolveResult | None = None

    def _matmat(self, M: Tensor) -> Tensor:
        self.last = solve(self.A, M, self.method, self.damping, **self.settings)
        return self.last.x


def inverse(
    A: CurvatureOperator, method: str = "cg", damping: float = 0.0, **settings: Any
) -> InverseOperator:
    """``(A + damping I)^-1`` as an operator, each product solved by ``method`` (see :func:`solve`).

    The solver's options among ``settings`` are checked here (:func:`check_solver_options`),
    before any product.
    """
    own = {k: v for k, v in settings.items() if k not in SOLVE_ARGUMENTS}
    check_solver_options(method, own, dim=A.shape[0], samples=samples_bounding(A, method, own))
    return InverseOperator(A, method, damping, **settings)


Cycle = Callable[[Tensor, Tensor, int, int], tuple[Tensor, int, "str | SolveResult"]]
"""``cycle(X, R, done, budget) -> (X, used, outcome)``: one run of a recurrence.

See :meth:`SolveHistory.confirmed`."""


class SolveHistory:
    """Per-iteration records and the product counter of one solve: what every solver keeps.

    A solver (a plugin's too) makes one with the solve's ``callback``, applies
    ``A + damping I`` through :meth:`apply` (which counts the products),
    records each iteration with :meth:`record` (the iterate passed, for the
    callback) and returns :meth:`result`, :meth:`measured` or :meth:`non_finite`,
    each given the status token (:data:`SOLVE_STATUSES`) and the reason in words.
    """

    def __init__(
        self,
        A: CurvatureOperator,
        damping: float,
        B: Tensor,
        callback: Callable[[Tensor], Mapping[str, float]] | None = None,
        extra: Callable[[], Mapping[str, float]] | None = None,
    ):
        self.A, self.damping, self.start = A, damping, time.perf_counter()
        self.callback, self.paused = callback, 0.0
        self.norms = B.norm(dim=0).clamp_min(torch.finfo(B.dtype).tiny)
        self.rows: list[dict[str, float]] = []
        self.matvecs = 0
        self.extra = extra
        """The solver's own counts for every row (e.g. ``{"samples": ...}``), read when a row is recorded."""

    def initial(self, B: Tensor, x0: Tensor | None) -> tuple[Tensor, Tensor]:
        """The first iterate and its residual: ``(0, B)``, or ``(x0, B - (A + damping I) x0)``."""
        if x0 is None:
            return torch.zeros_like(B), B.clone()
        return x0.clone(), B - self.apply(x0)

    def non_finite(self, X: Tensor, iteration: int, residual: float) -> SolveResult:
        """The result when a product at ``iteration`` is not finite: the last finite iterate."""
        return self.result(X, "non-finite", f"non-finite value at iteration {iteration}", iteration, residual)

    def apply(self, X: Tensor) -> Tensor:
        """``(A + damping I) X``."""
        self.matvecs += X.shape[1]
        out = self.A.matmat(X)
        return out + self.damping * X if self.damping else out

    def record(self, iteration: int, residuals: Tensor | None, X: Tensor | None = None) -> float:
        """Append a row: the largest relative residual (NaN when ``residuals`` is ``None``: not measured).

        The solver's own counts join the row through ``extra``; with the
        iterate ``X``, the numbers the solve's ``callback`` returns for it (its
        time taken out of ``seconds``, of this row and the next).
        """
        relative = float("nan") if residuals is None else (residuals / self.norms).max().item()
        row = {
            "iteration": iteration,
            "residual": relative,
            "seconds": time.perf_counter() - self.start - self.paused,
            "matvecs": self.matvecs,
            **(self.extra() if self.extra is not None else {}),
        }
        if self.callback is not None and X is not None:
            started = time.perf_counter()
            row.update(self.callback(X))
            self.paused += time.perf_counter() - started
        self.rows.append(row)
        return relative

    def measured(
        self, B: Tensor, X: Tensor, iteration: int, tol: float, status: str, reason: str
    ) -> SolveResult:
        """The result for ``X`` with its residual computed (one product), recorded and compared with ``tol``.

        ``status`` and ``reason`` are given when the residual is above ``tol``
        (``"converged"`` otherwise), with ``{residual}`` in ``reason`` replaced by
        the relative residual.
        """
        residual = self.record(iteration, (B - self.apply(X)).norm(dim=0), X)
        if not bool(torch.isfinite(X).all()):
            return self.non_finite(X, iteration, float("nan"))
        if residual <= tol:
            return self.result(X, "converged", "converged", iteration, residual)
        return self.result(X, status, reason.format(residual=f"{residual:.3g}"), iteration, residual)

    @property
    def last_residual(self) -> float:
        """The relative residual of the latest row (NaN before the first)."""
        return self.rows[-1]["residual"] if self.rows else float("nan")

    def confirmed(
        self, B: Tensor, X: Tensor, R: Tensor, *, tol: float, maxiter: int, cycle: Cycle
    ) -> SolveResult:
        """Run a recurrence in cycles, and believe its convergence only once the true residual confirms it.

        A recurrence's residual (CG's ``r``, MINRES's ``phibar``, the Neumann
        series' ``r``) drifts from the true ``B - (A + damping I) X`` as rounding
        accumulates: in float32 a solver can claim ``1e-6`` with a true residual
        of ``3e-6``. So when ``cycle`` claims convergence, or runs out of
        iterations, the true residual is computed (one product, recorded as a
        row) and is what the result reports. If it is above ``tol`` and the
        iterations allow, the recurrence restarts from ``X`` with the true
        residual (residual replacement); a restart that does not halve the true
        residual means it has reached the products' precision, and the solve
        stops saying so.

        Args:
            B: The right-hand sides.
            X: The first iterate; ``R`` its residual.
            cycle: ``cycle(X, R, done, budget) -> (X, used, outcome)``: runs at most
                ``budget`` iterations numbered from ``done + 1``, recording each,
                and returns the iterate, the iterations used and ``"claimed"`` (its
                recurrence's residual is within ``tol`` for every column),
                ``"maxiter"`` (the budget ran out) or a final :class:`SolveResult`
                (a breakdown, a non-finite value, a non-positive curvature...).
        """
        done, previous = 0, math.inf
        while True:
            X, used, outcome = cycle(X, R, done, maxiter - done)
            done += used
            if isinstance(outcome, SolveResult):
                return outcome
            R = B - self.apply(X)
            if not bool(torch.isfinite(R).all()):
                return self.non_finite(X, done, self.last_residual)
            residual = self.record(done, R.norm(dim=0), X)
            if residual <= tol:
                return self.result(X, "converged", "converged", done, residual)
            if outcome != "claimed" or done >= maxiter:
                return self.result(X, "maxiter", "maxiter", done, residual)
            if not residual < 0.5 * previous:
                return self.result(
                    X,
                    "stagnated",
                    f"stagnated at a true relative residual of {residual:.2g} (the recurrence's fell below "
                    f"{tol:g}): the products' precision; use float64 or a larger tol",
                    done,
                    residual,
                )
            previous = residual

    def result(self, x: Tensor, status: str, reason: str, iterations: int, residual: float) -> SolveResult:
        """The :class:`SolveResult`, with this history's products and rows.

        ``status`` is a token of :data:`SOLVE_STATUSES` (``converged`` follows from
        it), ``reason`` says the same in words.
        """
        return SolveResult(
            x, status == "converged", reason, iterations, self.matvecs, residual, self.rows, status=status
        )


SOLVE_ARGUMENTS: tuple[str, ...] = ("damping", "tol", "maxiter", "x0", "preconditioner", "callback")
"""What :func:`solve` passes every solver by keyword itself (after ``A`` and ``B``): not its options."""


def solver_options(method: str) -> list[str] | None:
    """The options of a registered solver: the keywords its ``solve`` takes besides :func:`solve`'s own.

    ``None``: any (its ``solve`` takes ``**kwargs``, as ``kfac`` and ``ekfac`` do,
    passing them to the estimator, which refuses those it does not take).

    Raises:
        CurvkitError: An unknown solver.
    """
    from curvkit.registry import keyword_options

    return keyword_options(_solver(method).solve, positional=2, passed=SOLVE_ARGUMENTS)


def refuse_options(method: str, unknown: Mapping[str, Any]) -> None:
    """Refuse options a solver does not know (one line naming them); nothing when there are none.

    For a solver whose ``solve`` takes ``**options`` and sorts them itself. Kept
    for plugins written against it: :func:`solve` now checks a solver's named
    options before calling it (:func:`check_solver_options`), so a ``solve``
    that names its options needs neither.

    Raises:
        CurvkitError: ``unknown`` is not empty.
    """
    if unknown:
        raise CurvkitError(f"solver {method!r} takes no option {', '.join(map(repr, sorted(unknown)))}")


def check_solver_options(
    method: str,
    options: Mapping[str, Any],
    *,
    prefix: str = "",
    dim: int | None = None,
    samples: int | None = None,
) -> dict[str, Any]:
    """Refuse options a registered solver does not take, or values it declares out of range, in one line.

    The names first (the message lists those the solver takes), then the values of
    the options its :attr:`SolverSpec.option_checks` declare, each by its check,
    with ``dim`` the bounds its :attr:`SolverSpec.dimension_checks` declare, and
    with ``samples`` those its :attr:`SolverSpec.sample_checks` declare.

    Args:
        method: A registered solver.
        options: Its options, by name.
        prefix: Put before an option's name in a value's message (``"--ihvp-option lissa."``).
        dim: The number of parameters ``P`` of the system, when known.
        samples: The number of samples ``N`` of the operator's data, when known
            (:func:`curvkit.problem_operator.sample_count`).

    Returns:
        The options with the values the checks return (plain Python numbers), the
        others as given.

    Raises:
        CurvkitError: An unknown solver, or a value its checks refuse (``"repeats must be
            an integer >= 1, got 0"``).
        UnknownOptionError: An option its ``solve`` does not name.
    """
    from curvkit.registry import refuse_unknown_options

    refuse_unknown_options(f"solver {method!r}", solver_options(method), options)
    spec = _solver(method)
    checks = spec.option_checks
    checked = {
        name: checks[name](value, f"{prefix}{name}") if name in checks else value
        for name, value in options.items()
    }
    for size, size_checks in ((dim, spec.dimension_checks), (samples, spec.sample_checks)):
        if size is not None:
            for name, check in size_checks.items():
                if name in checked:
                    check(checked[name], f"{prefix}{name}", size)
    return checked


def samples_bounding(A: Any, method: str, options: Mapping[str, Any]) -> int | None:
    """``N`` of ``A``'s data when one of ``options`` is bounded by it (:attr:`SolverSpec.sample_checks`).

    ``None`` when none of them is, or ``A`` has no data: counting the samples is
    one pass over the data (nothing computed), made only where a check needs it.
    """
    from curvkit.problem_operator import sample_count

    return sample_count(A) if options.keys() & _solver(method).sample_checks.keys() else None
