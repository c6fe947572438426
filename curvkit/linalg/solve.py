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
  residual over the Krylov space.

Every solver records its history (relative residual, seconds and products per
iteration), stops on a non-finite value (reporting the iteration and returning
the last finite iterate) and never reports convergence it has not measured:
``converged`` means ``||B - (A + damping I) X|| <= tol ||B||`` column by column,
with the residual of the recurrence (CG, MINRES) or a computed one (exact).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvkit.errors import CurvkitError, CurvkitWarning, ShapeMismatchError
from curvkit.operator import CurvatureOperator
from curvkit.solver_spec import SolverSpec

__all__ = [
    "InverseOperator",
    "SolveResult",
    "SolverSpec",
    "conjugate_gradient",
    "exact_solve",
    "inverse",
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
        residual: The final largest relative residual over the columns.
        history: Per iteration: ``{"iteration", "residual", "seconds", "matvecs"}``
            (``residual``: the largest relative residual over the columns).
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

    def __init__(self, A: CurvatureOperator, damping: float, B: Tensor):
        self.A, self.damping, self.start = A, damping, time.perf_counter()
        self.norms = B.norm(dim=0).clamp_min(torch.finfo(B.dtype).tiny)
        self.rows: list[dict[str, float]] = []
        self.matvecs = 0

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

    def record(self, iteration: int, residuals: Tensor) -> float:
        relative = (residuals / self.norms).max().item()
        self.rows.append(
            {
                "iteration": iteration,
                "residual": relative,
                "seconds": time.perf_counter() - self.start,
                "matvecs": self.matvecs,
            }
        )
        return relative

    def result(
        self, x: Tensor, converged: bool, reason: str, iterations: int, residual: float
    ) -> SolveResult:
        return SolveResult(x, converged, reason, iterations, self.matvecs, residual, self.rows)


def exact_solve(
    A: CurvatureOperator, B: Tensor, *, damping: float, tol: float, x0: Tensor | None = None, **_: Any
) -> SolveResult:
    """``A.solve(B, damping)``: structured where ``A`` has structure, else the dense matrix.

    The residual is computed with one more product and reported; ``converged``
    compares it with ``tol`` like every solver.
    """
    history = _History(A, damping, B)
    X = A.solve(B, damping)
    R = B - history.apply(X)
    residual = history.record(1, R.norm(dim=0))
    finite = bool(torch.isfinite(X).all())
    if not finite:
        return history.result(X, False, "non-finite value at iteration 1", 1, float("nan"))
    converged = residual <= tol
    return history.result(X, converged, "converged" if converged else "residual above tol", 1, residual)


def conjugate_gradient(
    A: CurvatureOperator,
    B: Tensor,
    *,
    damping: float,
    tol: float,
    maxiter: int,
    x0: Tensor | None = None,
    preconditioner: CurvatureOperator | None = None,
    **_: Any,
) -> SolveResult:
    """Preconditioned conjugate gradients on ``K`` columns at once (one product per iteration).

    Stops at the first non-positive curvature ``p^T (A + damping I) p <= 0`` of any
    column (the system is not positive definite: no CG guarantee), or a non-finite
    value, returning the last iterate with ``converged=False`` and the iteration in
    ``reason``. Converged columns are frozen while the others go on.
    """
    history = _History(A, damping, B)
    M = None if preconditioner is None else preconditioner.inverse(damping)
    X, R = history.initial(B, x0)
    Z = R if M is None else M.matmat(R)
    P_ = Z.clone()
    rz = (R * Z).sum(0)
    residual = history.record(0, R.norm(dim=0))
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
        residual = history.record(iteration, norms)
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
    **_: Any,
) -> SolveResult:
    """MINRES on ``K`` columns at once, for symmetric (indefinite) ``A + damping I``.

    The Lanczos process with Paige and Saunders' QR update; the recurrence's
    residual norm is recorded per iteration. No preconditioner (refused).
    """
    if preconditioner is not None:
        raise CurvkitError("minres takes no preconditioner here; use cg, or none")
    history = _History(A, damping, B)
    X, R1 = history.initial(B, x0)
    beta1 = R1.norm(dim=0)
    residual = history.record(0, beta1)
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
        residual = history.record(iteration, torch.where(active, norms, torch.zeros_like(norms)))
        active = active & (norms > tol * history.norms)
        if not bool(active.any()):
            return history.result(X, True, "converged", iteration, residual)
        if bool((active & (beta <= tiny)).any()):  # an invariant subspace: the Krylov space is exhausted
            return history.result(X, False, "breakdown", iteration, residual)
    return history.result(X, False, "maxiter", maxiter, residual)


DIVERGENCE = 1e3
"""A residual this many times the right-hand side's norm means the series diverges."""


def neumann(
    A: CurvatureOperator,
    B: Tensor,
    *,
    damping: float,
    tol: float,
    maxiter: int,
    x0: Tensor | None = None,
    preconditioner: CurvatureOperator | None = None,
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
    history = _History(A, damping, B)
    if scale is None:
        from curvkit.linalg.eigen import eigenvalues

        top = eigenvalues(A, k=1, which="largest", tol=1e-2, return_vectors=False)
        history.matvecs += top.matvecs
        largest = top.values[0].item() + damping
        if not largest > 0:
            why = f"the largest eigenvalue of A + damping I is {largest:.3g} <= 0"
            return history.result(torch.zeros_like(B), False, why, 0, float("nan"))
        scale = 1.0 / largest
    if not scale > 0:
        raise CurvkitError(f"scale must be positive, got {scale!r}")
    X, R = history.initial(B, x0)
    residual = history.record(0, R.norm(dim=0))
    for iteration in range(1, maxiter + 1):
        if residual <= tol:
            return history.result(X, True, "converged", iteration - 1, residual)
        AR = history.apply(R)
        if not bool(torch.isfinite(AR).all()):
            return history.non_finite(X, iteration, residual)
        X = X + scale * R
        R = R - scale * AR
        residual = history.record(iteration, R.norm(dim=0))
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
