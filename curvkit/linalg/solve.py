"""Solving ``(A + damping I) X = B``: registered solvers, their results, and an inverse operator.

:func:`solve` runs a solver registered through the ``curvkit_register_solvers``
hook (:func:`solvers` lists them; the built-ins live in ``curvkit.plugins.solvers``)
on a right-hand side ``B`` of shape ``[P]`` or ``[P, K]`` (``K`` systems solved
together, one product with ``K`` columns per iteration: one pass over the data).
:func:`inverse` wraps a solver as an operator. The algorithms here are the
built-ins':

* :func:`exact_solve`: ``A.solve(B, damping)`` of the operator contract (the
  structure where the operator has one, e.g. KFAC's factors; otherwise the dense
  matrix, refused above the dense limit);
* :func:`conjugate_gradient`: preconditioned CG (M. R. Hestenes and E. Stiefel,
  "Methods of conjugate gradients for solving linear systems", J. Res. NBS 49,
  1952) for symmetric positive definite systems. A non-positive curvature
  ``p^T (A + damping I) p <= 0`` proves the system is not positive definite:
  the run stops there and says so with the iteration, returning the last
  iterate flagged as not converged (curvlinops' CG zeroes such steps and goes on
  to return an answer that can be far from the truth);
* :func:`neumann`: the truncated Neumann series (Richardson iteration) with the
  scale from a largest-eigenvalue estimate, stopping when it diverges;
* :func:`minres`: MINRES (C. C. Paige and M. A. Saunders, "Solution of sparse
  indefinite systems of linear equations", SIAM J. Numer. Anal. 12, 1975) for
  symmetric, possibly indefinite systems (a raw Hessian), minimising the
  residual over the Krylov space;
* :func:`lissa`: LiSSA, the stochastic Neumann series on a fresh mini-batch per
  step (N. Agarwal, B. Bullins and E. Hazan, "Second-order stochastic
  optimization for machine learning in linear time", JMLR 18, 2017; P. W. Koh
  and P. Liang, "Understanding black-box predictions via influence functions",
  ICML 2017), with averaged repeats;
* :func:`approximate_inverse`: the structured inverse of an approximation built
  on the operator's problem (``kfac``: J. Martens and R. Grosse, "Optimizing
  neural networks with Kronecker-factored approximate curvature", ICML 2015;
  ``ekfac``: T. George, C. Laurent, X. Bouthillier, N. Ballas and P. Vincent,
  "Fast approximate natural gradient descent in a Kronecker-factored
  eigenbasis", NeurIPS 2018);
* :func:`lowrank`: the top eigenpairs inverted in their subspace, ``1 / damping``
  in its complement.

Every solver records its history (relative residual, seconds and products per
iteration), stops on a non-finite value (reporting the iteration and returning
the last finite iterate) and never reports convergence it has not measured:
``converged`` means ``||B - (A + damping I) X|| <= tol ||B||`` column by column,
with the residual of the recurrence (CG, MINRES) or a computed one (exact,
kfac, ekfac, lowrank; lissa when asked to measure).
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

from curvkit.errors import CurvkitError, CurvkitWarning, ShapeMismatchError
from curvkit.operator import CurvatureOperator
from curvkit.problem_operator import ProblemOperator
from curvkit.solver_spec import SolverSpec

__all__ = [
    "InverseOperator",
    "SolveResult",
    "SolverSpec",
    "approximate_inverse",
    "conjugate_gradient",
    "exact_solve",
    "inverse",
    "lissa",
    "lowrank",
    "minres",
    "neumann",
    "solve",
    "solvers",
]


@dataclass
class SolveResult:
    """The answer of a solver and how it got there.

    Attributes:
        x: The solution, shaped like the right-hand side (``[P]`` or ``[P, K]``).
        converged: Every column's relative residual is within ``tol``.
        reason: ``"converged"``, ``"maxiter"``, ``"non-positive curvature at
            iteration i"``, ``"non-finite value at iteration i"``, ...: why it stopped.
        iterations: Iterations run.
        matvecs: Products with the operator (columns multiplied).
        residual: The final largest relative residual over the columns (NaN when
            not measured: ``lissa`` without ``check_every``).
        history: Per iteration: ``{"iteration", "residual", "seconds", "matvecs"}``
            (``residual``: the largest relative residual over the columns, NaN
            when not measured), and a solver's own counts (``lissa``: ``samples``).
        method: The solver's name.
    """

    x: Tensor
    converged: bool
    reason: str
    iterations: int
    matvecs: int
    residual: float
    history: list[dict[str, float]] = field(default_factory=list)
    method: str = ""


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
        **options: The solver's own options.

    Raises:
        CurvkitError: An unknown solver, a negative damping, a ``tol`` or
            ``maxiter`` that is not positive.
        ShapeMismatchError: ``v`` or ``x0`` of the wrong size.
    """
    spec = _solver(method)
    if isinstance(damping, bool) or not isinstance(damping, int | float) or not damping >= 0:
        raise CurvkitError(f"damping must be a non-negative number, got {damping!r}")
    if not tol > 0:
        raise CurvkitError(f"tol must be positive, got {tol!r}")
    P = A.shape[0]
    if maxiter is None:
        maxiter = max(100, int(10 * math.sqrt(P)))
    if isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 1:
        raise CurvkitError(f"maxiter must be a positive integer, got {maxiter!r}")
    B = _as_columns(v, P, "the right-hand side").to(device=A.device, dtype=A.dtype)
    X0 = None if x0 is None else _as_columns(x0, P, "x0").to(device=A.device, dtype=A.dtype)
    if spec.psd_only and not getattr(A, "PSD", False):
        warnings.warn(
            f"solver {spec.name!r} needs A + damping I positive definite, and this operator is not known to "
            "be positive semi-definite: a non-positive curvature will stop it (minres solves indefinite "
            "systems)",
            CurvkitWarning,
            stacklevel=2,
        )
    if X0 is not None and X0.shape != B.shape:
        raise ShapeMismatchError(f"x0 has shape {tuple(x0.shape)}; the right-hand side {tuple(v.shape)}")
    result = spec.solve(
        A,
        B,
        damping=float(damping),
        tol=float(tol),
        maxiter=maxiter,
        x0=X0,
        preconditioner=preconditioner,
        **({} if callback is None else {"callback": callback}),
        **options,
    )
    result.method = spec.name
    if v.dim() == 1:
        result.x = result.x[:, 0]
    return result


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
        super().__init__(A.layout, dtype=A.dtype, device=A.device)
        self.A, self.method, self.damping, self.settings = A, method, damping, settings
        self.SYMMETRIC, self.PSD, self.EXACT = A.SYMMETRIC, A.PSD, method == "exact" and A.EXACT
        self.last: SolveResult | None = None

    def _matmat(self, M: Tensor) -> Tensor:
        self.last = solve(self.A, M, self.method, self.damping, **self.settings)
        return self.last.x


def inverse(
    A: CurvatureOperator, method: str = "cg", damping: float = 0.0, **settings: Any
) -> InverseOperator:
    """``(A + damping I)^-1`` as an operator, each product solved by ``method`` (see :func:`solve`)."""
    _solver(method)
    return InverseOperator(A, method, damping, **settings)


# ------------------------------------------------------------------ algorithms
class _History:
    """Per-iteration records, and the product counter of one solve."""

    def __init__(
        self,
        A: CurvatureOperator,
        damping: float,
        B: Tensor,
        callback: Callable[[Tensor], Mapping[str, float]] | None = None,
    ):
        self.A, self.damping, self.start = A, damping, time.perf_counter()
        self.callback, self.paused = callback, 0.0
        self.norms = B.norm(dim=0).clamp_min(torch.finfo(B.dtype).tiny)
        self.rows: list[dict[str, float]] = []
        self.matvecs = 0
        self.extra: Callable[[], dict[str, float]] | None = None
        """More entries of every row (e.g. ``{"samples": ...}``), read when the row is recorded."""

    def initial(self, B: Tensor, x0: Tensor | None) -> tuple[Tensor, Tensor]:
        """The first iterate and its residual: ``(0, B)``, or ``(x0, B - (A + damping I) x0)``."""
        if x0 is None:
            return torch.zeros_like(B), B.clone()
        return x0.clone(), B - self.apply(x0)

    def non_finite(self, X: Tensor, iteration: int, residual: float) -> SolveResult:
        """The result when a product at ``iteration`` is not finite: the last finite iterate."""
        return self.result(X, False, f"non-finite value at iteration {iteration}", iteration, residual)

    def apply(self, X: Tensor) -> Tensor:
        """``(A + damping I) X``."""
        self.matvecs += X.shape[1]
        out = self.A.matmat(X)
        return out + self.damping * X if self.damping else out

    def record(self, iteration: int, residuals: Tensor | None, X: Tensor | None = None) -> float:
        """Append a row: the largest relative residual (NaN when ``residuals`` is ``None``: not measured).

        A solver's own counts join the row through :attr:`extra`; with the
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

    def measured(self, B: Tensor, X: Tensor, iteration: int, tol: float, reason: str) -> SolveResult:
        """The result for ``X`` with its residual computed (one product), recorded and compared with ``tol``.

        ``reason`` is given when the residual is above ``tol`` (``"converged"``
        otherwise), with ``{residual}`` replaced by the relative residual.
        """
        residual = self.record(iteration, (B - self.apply(X)).norm(dim=0), X)
        if not bool(torch.isfinite(X).all()):
            return self.result(
                X, False, f"non-finite value at iteration {iteration}", iteration, float("nan")
            )
        converged = residual <= tol
        reason = "converged" if converged else reason.format(residual=f"{residual:.3g}")
        return self.result(X, converged, reason, iteration, residual)

    def result(
        self, x: Tensor, converged: bool, reason: str, iterations: int, residual: float
    ) -> SolveResult:
        return SolveResult(x, converged, reason, iterations, self.matvecs, residual, self.rows)


def exact_solve(
    A: CurvatureOperator,
    B: Tensor,
    *,
    damping: float,
    tol: float,
    x0: Tensor | None = None,
    callback: Callable[[Tensor], Mapping[str, float]] | None = None,
    **_: Any,
) -> SolveResult:
    """``A.solve(B, damping)``: structured where ``A`` has structure, else the dense matrix.

    The residual is computed with one more product and reported; ``converged``
    compares it with ``tol`` like every solver.
    """
    history = _History(A, damping, B, callback)
    return history.measured(B, A.solve(B, damping), 1, tol, "residual above tol")


def conjugate_gradient(
    A: CurvatureOperator,
    B: Tensor,
    *,
    damping: float,
    tol: float,
    maxiter: int,
    x0: Tensor | None = None,
    preconditioner: CurvatureOperator | None = None,
    callback: Callable[[Tensor], Mapping[str, float]] | None = None,
    **_: Any,
) -> SolveResult:
    """Preconditioned conjugate gradients on ``K`` columns at once (one product per iteration).

    Stops at the first non-positive curvature ``p^T (A + damping I) p <= 0`` of any
    column (the system is not positive definite: no CG guarantee), or a non-finite
    value, returning the last iterate with ``converged=False`` and the iteration in
    ``reason``. Converged columns are frozen while the others go on.
    """
    history = _History(A, damping, B, callback)
    M = None if preconditioner is None else preconditioner.inverse(damping)
    X, R = history.initial(B, x0)
    Z = R if M is None else M.matmat(R)
    P_ = Z.clone()
    rz = (R * Z).sum(0)
    residual = history.record(0, R.norm(dim=0), X)
    active = R.norm(dim=0) > tol * history.norms
    for iteration in range(1, maxiter + 1):
        if not bool(active.any()):
            return history.result(X, True, "converged", iteration - 1, residual)
        AP = history.apply(P_)
        curvature = (P_ * AP).sum(0)
        if not bool(torch.isfinite(AP).all()):
            return history.non_finite(X, iteration, residual)
        bad = active & (curvature <= 0)
        if bool(bad.any()):
            column = int(bad.nonzero()[0].item())
            return history.result(
                X,
                False,
                f"non-positive curvature p^T A p = {curvature[column].item():.3g} at iteration {iteration} "
                f"(column {column}): the damped system is not positive definite; add damping or use minres",
                iteration,
                residual,
            )
        alpha = torch.where(active, rz / torch.where(active, curvature, torch.ones_like(curvature)), 0.0)
        X = X + alpha * P_
        R = R - alpha * AP
        norms = R.norm(dim=0)
        residual = history.record(iteration, norms, X)
        active = active & (norms > tol * history.norms)
        Z = R if M is None else M.matmat(R)
        rz_new = (R * Z).sum(0)
        beta = torch.where(active, rz_new / torch.where(active, rz, torch.ones_like(rz)), 0.0)
        P_ = Z + beta * P_
        rz = rz_new
    converged = not bool(active.any())
    return history.result(X, converged, "converged" if converged else "maxiter", maxiter, residual)


def minres(
    A: CurvatureOperator,
    B: Tensor,
    *,
    damping: float,
    tol: float,
    maxiter: int,
    x0: Tensor | None = None,
    preconditioner: CurvatureOperator | None = None,
    callback: Callable[[Tensor], Mapping[str, float]] | None = None,
    **_: Any,
) -> SolveResult:
    """MINRES on ``K`` columns at once, for symmetric (indefinite) ``A + damping I``.

    The Lanczos process with Paige and Saunders' QR update; the recurrence's
    residual norm is recorded per iteration. No preconditioner (refused).
    """
    if preconditioner is not None:
        raise CurvkitError("minres takes no preconditioner here; use cg, or none")
    history = _History(A, damping, B, callback)
    X, R1 = history.initial(B, x0)
    beta1 = R1.norm(dim=0)
    residual = history.record(0, beta1, X)
    tiny = torch.finfo(B.dtype).tiny
    active = beta1 > tol * history.norms
    if not bool(active.any()):
        return history.result(X, True, "converged", 0, residual)
    # the recurrences of Paige and Saunders (as in SciPy's minres), one scalar per column
    Y, R2 = R1.clone(), R1.clone()
    old_beta, beta = torch.zeros_like(beta1), beta1.clone()
    dbar, epsilon = torch.zeros_like(beta1), torch.zeros_like(beta1)
    phibar = beta1.clone()
    cs, sn = -torch.ones_like(beta1), torch.zeros_like(beta1)
    W, W2 = torch.zeros_like(B), torch.zeros_like(B)
    for iteration in range(1, maxiter + 1):
        V = Y / beta.clamp_min(tiny)
        Y = history.apply(V)
        if not bool(torch.isfinite(Y).all()):
            return history.non_finite(X, iteration, residual)
        if iteration >= 2:
            Y = Y - (beta / old_beta.clamp_min(tiny)) * R1
        alpha = (V * Y).sum(0)
        Y = Y - (alpha / beta.clamp_min(tiny)) * R2
        R1, R2 = R2, Y
        old_beta, beta = beta, Y.norm(dim=0)
        old_epsilon = epsilon
        delta = cs * dbar + sn * alpha
        gbar = sn * dbar - cs * alpha
        epsilon = sn * beta
        dbar = -cs * beta
        gamma = torch.sqrt(gbar * gbar + beta * beta).clamp_min(tiny)
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * phibar
        phibar = sn * phibar
        W1, W2 = W2, W
        W = (V - old_epsilon * W1 - delta * W2) / gamma
        X = X + torch.where(active, phi, torch.zeros_like(phi)) * W
        norms = phibar.abs()
        residual = history.record(iteration, torch.where(active, norms, torch.zeros_like(norms)), X)
        active = active & (norms > tol * history.norms)
        if not bool(active.any()):
            return history.result(X, True, "converged", iteration, residual)
        if bool((active & (beta <= tiny)).any()):  # an invariant subspace: the Krylov space is exhausted
            return history.result(X, False, "breakdown", iteration, residual)
    return history.result(X, False, "maxiter", maxiter, residual)


DIVERGENCE = 1e3
"""A residual this many times the right-hand side's norm means the series diverges (for
:func:`lissa`: an iterate this many times the norm bound of a contracting series)."""


def _series_scale(A: CurvatureOperator, damping: float, history: _History) -> tuple[float | None, str]:
    """``eta = 1 / (lambda_max + damping)`` of a Neumann series, ``lambda_max`` by Lanczos to 1%.

    Its products are counted in ``history``. Returns ``(None, why)`` when
    ``lambda_max + damping <= 0`` (no positive scale makes the series converge).
    """
    from curvkit.linalg.eigen import eigenvalues

    top = eigenvalues(A, k=1, which="largest", tol=1e-2, return_vectors=False)
    history.matvecs += top.matvecs
    largest = top.values[0].item() + damping
    if not largest > 0:
        return None, f"the largest eigenvalue of A + damping I is {largest:.3g} <= 0"
    return 1.0 / largest, ""


def neumann(
    A: CurvatureOperator,
    B: Tensor,
    *,
    damping: float,
    tol: float,
    maxiter: int,
    x0: Tensor | None = None,
    preconditioner: CurvatureOperator | None = None,
    callback: Callable[[Tensor], Mapping[str, float]] | None = None,
    scale: float | None = None,
    **_: Any,
) -> SolveResult:
    """The truncated Neumann series ``eta sum_j (I - eta (A + damping I))^j B`` (Richardson iteration).

    ``x <- x + eta r``, ``r <- r - eta (A + damping I) r``: one product per term.
    It converges when the spectrum of ``eta (A + damping I)`` lies in ``(0, 2)``; by
    default ``eta = 1 / (lambda_max + damping)`` with ``lambda_max`` estimated by
    :func:`curvkit.eigenvalues` (to 1%, its products counted). A residual above
    :data:`DIVERGENCE` times ``||B||`` (an eigenvalue of ``A + damping I`` at or
    below zero, or a ``scale`` too large) stops the series as diverging.

    Args:
        scale: ``eta``; ``None`` estimates it.
    """
    if preconditioner is not None:
        raise CurvkitError("neumann takes no preconditioner; use cg")
    history = _History(A, damping, B, callback)
    if scale is None:
        scale, why = _series_scale(A, damping, history)
        if scale is None:
            return history.result(torch.zeros_like(B), False, why, 0, float("nan"))
    if not scale > 0:
        raise CurvkitError(f"scale must be positive, got {scale!r}")
    X, R = history.initial(B, x0)
    residual = history.record(0, R.norm(dim=0), X)
    for iteration in range(1, maxiter + 1):
        if residual <= tol:
            return history.result(X, True, "converged", iteration - 1, residual)
        AR = history.apply(R)
        if not bool(torch.isfinite(AR).all()):
            return history.non_finite(X, iteration, residual)
        X = X + scale * R
        R = R - scale * AR
        residual = history.record(iteration, R.norm(dim=0), X)
        if not residual <= DIVERGENCE:
            return history.result(
                X,
                False,
                f"diverging at iteration {iteration} (relative residual {residual:.3g}): the spectrum of "
                f"{scale:.3g} (A + damping I) is not inside (0, 2); add damping, lower the scale, or use "
                "minres",
                iteration,
                residual,
            )
    converged = residual <= tol
    return history.result(X, converged, "converged" if converged else "maxiter", maxiter, residual)


def lissa(
    A: CurvatureOperator,
    B: Tensor,
    *,
    damping: float,
    tol: float,
    maxiter: int,
    x0: Tensor | None = None,
    preconditioner: CurvatureOperator | None = None,
    callback: Callable[[Tensor], Mapping[str, float]] | None = None,
    scale: float | None = None,
    batch_size: int | None = None,
    repeats: int = 1,
    seed: int = 0,
    check_every: int | None = None,
    **unknown: Any,
) -> SolveResult:
    """LiSSA: the Neumann series with a fresh mini-batch per step, repeats averaged.

    The recursion of N. Agarwal, B. Bullins and E. Hazan ("Second-order
    stochastic optimization for machine learning in linear time", JMLR 18, 2017),
    as P. W. Koh and P. Liang use it for influence functions ("Understanding
    black-box predictions via influence functions", ICML 2017):

    .. math:: x_0 = v, \\qquad x_j = v + (I - \\eta (A_{S_j} + \\text{damping}\\, I)) x_{j-1},
              \\qquad \\text{answer } \\eta x_{\\text{depth}},

    where ``A_{S_j}`` is the *same estimator* on a fresh random mini-batch
    ``S_j`` of ``batch_size`` distinct samples of the operator's problem
    (:meth:`curvkit.Problem.subset` and :meth:`curvkit.ProblemOperator.with_problem`:
    any :class:`~curvkit.ProblemOperator`, a plugin's too), drawn by a CPU
    generator seeded with ``seed``. Each ``A_{S_j}`` is an unbiased estimate of
    ``A`` (for ``reduction="sum"`` it is scaled by ``N / batch_size``) drawn
    independently of ``x_{j-1}``, so ``E[eta x_j]`` follows the deterministic
    series: ``eta sum_{i<=j} (I - eta (A + damping I))^i v``, which tends to
    ``(A + damping I)^-1 v``. ``repeats`` independent recursions are averaged
    to lower the variance. With ``batch_size = N`` it is the Neumann series
    (:func:`neumann` with ``maxiter = depth + 1`` and the same ``scale``), up to
    rounding. A warm start ``x0`` starts each recursion at ``x0 / eta``.

    An operator without data (no ``problem``: a :class:`~curvkit.DenseOperator`,
    a sum or a multiple of operators) is used whole at every step, which makes
    this the Neumann series (``batch_size`` is not used); ``reason`` says so.

    **What is measured.** A stochastic iterate's residual is unknown without a
    product with the full operator. With ``check_every=None`` (default) none is
    made: the history's residuals are NaN, ``residual`` is NaN and ``converged``
    is ``False`` (``reason``: ``"depth reached: ... (stochastic: residual not
    measured; ...)"``). With ``check_every=c`` the relative residual of the current
    repeat's iterate ``eta x_j`` is computed with the full operator every ``c``
    steps, and that of the returned average after the last step, so
    ``converged`` is then that measurement against ``tol``; the run does not stop
    early. Its products are counted.

    A step stops the run on a non-finite value (returning the average of the
    finished repeats and the current one's last finite iterate) or when the
    iterate's norm exceeds :data:`DIVERGENCE` times ``||x_0|| + j ||v||``, a bound
    that every contracting step respects: the spectrum of
    ``eta (A_S + damping I)`` leaves ``[0, 2]``, as a mini-batch's curvature
    larger than the full data's can make it with the default scale.

    Counts: ``matvecs`` counts every column multiplied, on mini-batches and
    with the full operator (the scale estimate, the checks); the history's
    ``samples`` (data-backed operators) counts the samples those products
    passed through the model. The operator's own counters see only its
    full-data products.

    Args:
        maxiter: ``depth``: the steps (one mini-batch product each) of every repeat.
        scale: ``eta``; ``None`` estimates ``1 / (lambda_max + damping)`` of the
            full operator like :func:`neumann` (to 1%, its products counted).
        batch_size: Samples per mini-batch, at most ``N``; default
            ``min(N, problem.batch_size)``: one of the problem's batches, the most
            its batching lets one product hold.
        repeats: Independent recursions averaged.
        seed: Seed of the mini-batches (a CPU generator; the same draws on every
            device).
        check_every: Measure the residual every this many steps (see above);
            ``None``: never.

    Raises:
        CurvkitError: A preconditioner, an unknown option, or a ``scale``,
            ``batch_size``, ``repeats`` or ``check_every`` out of range.
    """
    _refuse_options("lissa", unknown)
    if preconditioner is not None:
        raise CurvkitError("lissa takes no preconditioner; use cg")
    for name, value in (("repeats", repeats), ("check_every", check_every)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise CurvkitError(f"{name} must be a positive integer, got {value!r}")
    history = _History(A, damping, B, callback)
    sample = _MiniBatches(A, batch_size, seed, history)
    if scale is None:
        scale, why = _series_scale(A, damping, history)
        if scale is None:
            return history.result(torch.zeros_like(B), False, why, 0, float("nan"))
    if not scale > 0:
        raise CurvkitError(f"scale must be positive, got {scale!r}")
    depth, K = maxiter, B.shape[1]
    start = B.clone() if x0 is None else x0 / scale
    bounds = start.norm(dim=0), B.norm(dim=0)  # ||x_j|| <= ||x_0|| + j ||v|| while every step contracts
    tiny = torch.finfo(B.dtype).tiny
    total = torch.zeros_like(B)
    residual = history.record(0, None, scale * start)
    iteration = 0
    for repeat in range(repeats):
        X = start.clone()
        for j in range(1, depth + 1):
            iteration += 1
            history.matvecs += K
            AX = sample().matmat(X)
            X_next = B + X - scale * (AX + damping * X if damping else AX)
            if not bool(torch.isfinite(X_next).all()):
                answer = (total + scale * X) / (repeat + 1)
                return history.result(
                    answer, False, f"non-finite value at iteration {iteration}", iteration, residual
                )
            X = X_next
            growth = (X.norm(dim=0) / (bounds[0] + j * bounds[1]).clamp_min(tiny)).max().item()
            if not growth <= DIVERGENCE:
                history.record(iteration, None)
                return history.result(
                    (total + scale * X) / (repeat + 1),
                    False,
                    f"diverging at iteration {iteration} (repeat {repeat + 1}, step {j}): the iterate's "
                    f"norm is {growth:.3g} times the bound ||x_0|| + j ||v|| of a contracting series, so the "
                    f"spectrum of {scale:.3g} (A_S + damping I) left [0, 2] ({sample.source}); lower the "
                    "scale, raise batch_size or damping",
                    iteration,
                    float("nan"),
                )
            if repeat == repeats - 1 and j == depth:
                break  # the answer's residual is measured below, if asked
            estimate = (total + scale * X) / (repeat + 1)  # the answer so far, for a callback
            if check_every is not None and j % check_every == 0:
                residual = history.record(iteration, (B - history.apply(scale * X)).norm(dim=0), estimate)
            else:
                history.record(iteration, None, estimate)
        total = total + scale * X
    X = total / repeats
    done = f"depth reached: {repeats} repeat(s) of {depth} steps on {sample.source}"
    if check_every is None:
        history.record(iteration, None, X)
        why = f"{done} (stochastic: residual not measured; pass check_every to measure it)"
        return history.result(X, False, why, iteration, float("nan"))
    return history.measured(B, X, iteration, tol, f"{done}: relative residual {{residual}} measured")


class _MiniBatches:
    """LiSSA's operators: the estimator on a fresh random mini-batch per call (see :func:`lissa`).

    Attributes:
        source: What the steps multiply with, in words (for ``reason``).
    """

    def __init__(self, A: CurvatureOperator, batch_size: int | None, seed: int, history: _History):
        self.A = A
        self.generator = torch.Generator().manual_seed(int(seed))
        if not isinstance(A, ProblemOperator):
            self.source = (
                f"the whole operator at every step: {type(A).__name__} has no data to sample, so this is "
                "the Neumann series"
            )
            return
        problem = A.problem
        self.N = N = problem.num_samples()
        self.batch_size = min(N, problem.batch_size) if batch_size is None else batch_size
        if (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int)
            or not 1 <= self.batch_size <= N
        ):
            raise CurvkitError(f"batch_size must be an integer in 1..{N} (the samples), got {batch_size!r}")
        # an unbiased estimate of A: a mean over the samples is one already, a sum is scaled up
        self.weight = N / self.batch_size if problem.loss.reduction == "sum" else 1.0
        problem.ensure_deterministic()  # once, on the full data; the mini-batches share the record
        self.source = f"mini-batches of {self.batch_size} of {N} samples"
        passes, self.samples = A.data_passes, 0
        history.extra = lambda: {"samples": self.samples + (A.data_passes - passes) * N}

    def __call__(self) -> CurvatureOperator:
        if not isinstance(self.A, ProblemOperator):
            return self.A
        chosen = torch.randperm(self.N, generator=self.generator)[: self.batch_size]
        self.samples += self.batch_size
        batch = self.A.with_problem(self.A.problem.subset(chosen))
        return batch if self.weight == 1.0 else self.weight * batch


def approximate_inverse(
    A: CurvatureOperator,
    B: Tensor,
    *,
    estimator: str,
    damping: float,
    tol: float,
    x0: Tensor | None = None,
    preconditioner: CurvatureOperator | None = None,
    callback: Callable[[Tensor], Mapping[str, float]] | None = None,
    maxiter: int | None = None,
    **options: Any,
) -> SolveResult:
    """``(K + damping I)^-1 B``, ``K`` a structured approximation of ``A`` (the ``kfac``, ``ekfac`` solvers).

    ``K`` is the registered ``estimator`` (``"kfac"``: J. Martens and R. Grosse,
    "Optimizing neural networks with Kronecker-factored approximate curvature",
    ICML 2015; ``"ekfac"``: T. George, C. Laurent, X. Bouthillier, N. Ballas and
    P. Vincent, "Fast approximate natural gradient descent in a
    Kronecker-factored eigenbasis", NeurIPS 2018) built on ``A``'s problem with
    ``options`` (``curvkit.curvature(estimator, A.problem, **options)``: one pass
    over the data for KFAC's factors, two for EKFAC's, at every solve), or ``A``
    itself when it is that estimator already; its inverse comes from its structure
    (``K.solve(B, damping)``: for KFAC the factors' eigendecompositions).

    The answer solves the approximation, not ``A``: the relative residual
    ``||B - (A + damping I) X|| / ||B||`` against ``A`` is computed (one product
    with ``A``) and recorded, ``converged`` compares it with ``tol`` (usually
    ``False`` unless ``A`` is ``K``), and ``reason`` gives it. A direct method:
    ``maxiter`` and ``x0`` are not used.

    Args:
        estimator: The registered estimator whose structured inverse is applied.
        **options: The estimator's options (refused by it when unknown), e.g.
            ``fisher_type="empirical"``; none when ``A`` is the estimator already.

    Raises:
        CurvkitError: ``A`` has no problem to build the approximation on, options
            for an ``A`` that is already the estimator, a preconditioner, or the
            estimator has no structured inverse.
        UnsupportedModelError: The model has layers the estimator does not cover
            (under its default ``unsupported="error"``).
    """
    from curvkit.registry import curvature, get_estimator

    if preconditioner is not None:
        raise CurvkitError(f"{estimator} takes no preconditioner: it is the approximate inverse itself")
    spec = get_estimator(estimator)
    if getattr(A, "name", None) == estimator or type(A) is spec.factory:
        if options:
            raise CurvkitError(
                f"the operator is a {estimator!r} operator already, so the options {sorted(options)} would "
                "not be used; build it with them instead"
            )
        K = A
    elif isinstance(A, ProblemOperator):
        K = curvature(estimator, A.problem, **options)
    else:
        raise CurvkitError(
            f"solver {estimator!r} builds {estimator.upper()} on the operator's problem, and "
            f"{getattr(A, 'name', type(A).__name__)!r} ({type(A).__name__}) has none; solve with the "
            f"operator itself ('exact', 'cg'), or pass curvkit.curvature({estimator!r}, problem)"
        )
    if "inverse" not in K.STRUCTURE:
        raise CurvkitError(f"estimator {estimator!r} has no structured inverse (STRUCTURE lacks 'inverse')")
    history = _History(A, damping, B, callback)
    X = K.solve(B, damping)
    return history.measured(
        B, X, 1, tol, f"approximate inverse ({estimator}): relative residual {{residual}} against A"
    )


def lowrank(
    A: CurvatureOperator,
    B: Tensor,
    *,
    damping: float,
    tol: float,
    x0: Tensor | None = None,
    preconditioner: CurvatureOperator | None = None,
    callback: Callable[[Tensor], Mapping[str, float]] | None = None,
    maxiter: int | None = None,
    rank: int = 10,
    eigen_tol: float = 1e-6,
    max_matvecs: int | None = None,
    seed: int = 0,
    **unknown: Any,
) -> SolveResult:
    """The top ``rank`` eigenpairs inverted in their subspace, ``1 / damping`` in the complement.

    With ``A U = U diag(lambda)`` for the ``rank`` largest eigenvalues
    (:func:`curvkit.eigenvalues`, Lanczos, its products counted):

    .. math:: X = U \\operatorname{diag}\\Big(\\frac{1}{\\lambda + \\text{damping}}\\Big) U^T B
              + \\frac{B - U U^T B}{\\text{damping}},

    the exact inverse of ``A_k + damping I``, ``A_k`` the best rank-``k``
    positive semi-definite approximation of a PSD ``A`` (its other eigenvalues
    set to zero). Exact when ``rank(A) <= rank``; otherwise the smaller the
    eigenvalues left out are next to ``damping``, the better. The relative
    residual against ``A`` is computed (one product) and recorded, ``converged``
    compares it with ``tol``, and ``reason`` gives it. A direct method:
    ``maxiter`` and ``x0`` are not used.

    Args:
        rank: Eigenpairs kept (at most ``P``).
        eigen_tol: Lanczos' relative residual tolerance for the pairs.
        max_matvecs: Lanczos' budget of products (its default: ``max(300, 30 rank)``).
        seed: Seed of Lanczos' starting vector.

    Raises:
        CurvkitError: ``damping <= 0`` (the complement would be singular), a
            ``rank`` out of range, a preconditioner or an unknown option.
    """
    from curvkit.linalg.eigen import eigenvalues

    _refuse_options("lowrank", unknown)
    if preconditioner is not None:
        raise CurvkitError("lowrank takes no preconditioner")
    if not damping > 0:
        raise CurvkitError(
            "lowrank needs damping > 0: the complement of the eigenvectors kept is inverted as 1 / damping"
        )
    P = A.shape[0]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= P:
        raise CurvkitError(f"rank must be an integer in 1..{P}, got {rank!r}")
    history = _History(A, damping, B, callback)
    pairs = eigenvalues(A, k=rank, which="largest", tol=eigen_tol, max_matvecs=max_matvecs, seed=seed)
    history.matvecs += pairs.matvecs
    values, U = pairs.values.to(B.dtype), pairs.vectors.to(B.dtype)
    shifted = values + damping
    if not bool((shifted > 0).all()):
        why = f"an eigenvalue of A + damping I is {shifted.min().item():.3g} <= 0: not positive definite"
        return history.result(torch.zeros_like(B), False, why, 0, float("nan"))
    C = U.T @ B
    X = U @ (C / shifted[:, None]) + (B - U @ C) / damping
    eigen = "" if pairs.converged else f"; eigenpairs not converged ({pairs.stop_reason})"
    return history.measured(
        B, X, 1, tol, f"rank-{rank} approximation: relative residual {{residual}} against A{eigen}"
    )


def _refuse_options(method: str, unknown: dict[str, Any]) -> None:
    if unknown:
        raise CurvkitError(f"solver {method!r} takes no option {', '.join(map(repr, sorted(unknown)))}")
