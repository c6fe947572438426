"""Krylov solvers of ``(A + damping I) X = B``: conjugate gradients and MINRES.

* :func:`conjugate_gradient`: preconditioned CG (M. R. Hestenes and E. Stiefel,
  "Methods of conjugate gradients for solving linear systems", J. Res. NBS 49,
  1952) for symmetric positive definite systems. A non-positive curvature
  ``p^T (A + damping I) p <= 0`` proves the system is not positive definite:
  the run stops there and says so with the iteration, returning the last
  iterate flagged as not converged (curvlinops' CG zeroes such steps and goes on
  to return an answer that can be far from the truth);
* :func:`minres`: MINRES (C. C. Paige and M. A. Saunders, "Solution of sparse
  indefinite systems of linear equations", SIAM J. Numer. Anal. 12, 1975) for
  symmetric, possibly indefinite systems (a raw Hessian), minimising the
  residual over the Krylov space.

Both solve ``K`` columns at once, one product per iteration.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from curvkit.errors import CurvkitError
from curvkit.linalg.solve import SolveHistory, SolveResult
from curvkit.operator import CurvatureOperator
from curvkit.snapshot import fixed_model_state

__all__ = ["conjugate_gradient", "minres"]


@fixed_model_state()
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
) -> SolveResult:
    """Preconditioned conjugate gradients on ``K`` columns at once (one product per iteration).

    Stops at the first non-positive curvature ``p^T (A + damping I) p <= 0`` of any
    column (the system is not positive definite: no CG guarantee), or a non-finite
    value, returning the last iterate with ``converged=False``, the status
    ``"non-positive-curvature"`` or ``"non-finite"`` and the iteration in
    ``reason``. Converged columns are frozen while the others go on. Convergence
    is confirmed by the true residual, restarting from it when the recurrence's
    has drifted (:meth:`~curvkit.linalg.solve.SolveHistory.confirmed`).
    """
    history = SolveHistory(A, damping, B, callback)
    M = None if preconditioner is None else preconditioner.inverse(damping)
    X, R = history.initial(B, x0)
    history.record(0, R.norm(dim=0), X)

    def cycle(X: Tensor, R: Tensor, done: int, budget: int) -> tuple[Tensor, int, str | SolveResult]:
        Z = R if M is None else M.matmat(R)
        P_ = Z.clone()
        rz = (R * Z).sum(0)
        active = R.norm(dim=0) > tol * history.norms
        for step in range(1, budget + 1):
            if not bool(active.any()):
                return X, step - 1, "claimed"
            iteration = done + step
            AP = history.apply(P_)
            curvature = (P_ * AP).sum(0)
            if not bool(torch.isfinite(AP).all()):
                return X, step, history.non_finite(X, iteration, history.last_residual)
            bad = active & (curvature <= 0)
            if bool(bad.any()):
                column = int(bad.nonzero()[0].item())
                why = (
                    f"non-positive curvature p^T A p = {curvature[column].item():.3g} at iteration "
                    f"{iteration} (column {column}): the damped system is not positive definite; add damping "
                    "or use minres"
                )
                stopped = history.result(X, "non-positive-curvature", why, iteration, history.last_residual)
                return X, step, stopped
            alpha = torch.where(active, rz / torch.where(active, curvature, torch.ones_like(curvature)), 0.0)
            X = X + alpha * P_
            R = R - alpha * AP
            norms = R.norm(dim=0)
            history.record(iteration, norms, X)
            active = active & (norms > tol * history.norms)
            Z = R if M is None else M.matmat(R)
            rz_new = (R * Z).sum(0)
            beta = torch.where(active, rz_new / torch.where(active, rz, torch.ones_like(rz)), 0.0)
            P_ = Z + beta * P_
            rz = rz_new
        return X, budget, "maxiter" if bool(active.any()) else "claimed"

    return history.confirmed(B, X, R, tol=tol, maxiter=maxiter, cycle=cycle)


@fixed_model_state()
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
) -> SolveResult:
    """MINRES on ``K`` columns at once, for symmetric (indefinite) ``A + damping I``.

    The Lanczos process with Paige and Saunders' QR update; the recurrence's
    residual norm is recorded per iteration, and convergence confirmed by the
    true residual, restarting from it when the recurrence's has drifted
    (:meth:`~curvkit.linalg.solve.SolveHistory.confirmed`). No preconditioner
    (refused).
    """
    if preconditioner is not None:
        raise CurvkitError("minres takes no preconditioner here; use cg, or none")
    history = SolveHistory(A, damping, B, callback)
    X, R = history.initial(B, x0)
    history.record(0, R.norm(dim=0), X)
    tiny = torch.finfo(B.dtype).tiny

    def cycle(X: Tensor, R1: Tensor, done: int, budget: int) -> tuple[Tensor, int, str | SolveResult]:
        beta1 = R1.norm(dim=0)
        active = beta1 > tol * history.norms
        if not bool(active.any()):
            return X, 0, "claimed"
        # the recurrences of Paige and Saunders (as in SciPy's minres), one scalar per column
        Y, R2 = R1.clone(), R1.clone()
        old_beta, beta = torch.zeros_like(beta1), beta1.clone()
        dbar, epsilon = torch.zeros_like(beta1), torch.zeros_like(beta1)
        phibar = beta1.clone()
        cs, sn = -torch.ones_like(beta1), torch.zeros_like(beta1)
        W, W2 = torch.zeros_like(B), torch.zeros_like(B)
        for step in range(1, budget + 1):
            iteration = done + step
            V = Y / beta.clamp_min(tiny)
            Y = history.apply(V)
            if not bool(torch.isfinite(Y).all()):
                return X, step, history.non_finite(X, iteration, history.last_residual)
            if step >= 2:
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
            history.record(iteration, torch.where(active, norms, torch.zeros_like(norms)), X)
            active = active & (norms > tol * history.norms)
            if not bool(active.any()):
                return X, step, "claimed"
            if bool((active & (beta <= tiny)).any()):  # an invariant subspace: the Krylov space is exhausted
                return X, step, history.result(X, "breakdown", "breakdown", iteration, history.last_residual)
        return X, budget, "maxiter"

    return history.confirmed(B, X, R, tol=tol, maxiter=maxiter, cycle=cycle)
