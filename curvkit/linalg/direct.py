"""Direct solvers of ``(A + damping I) X = B``: an inverse applied at once, its residual measured.

* :func:`exact_solve`: ``A.solve(B, damping)`` of the operator contract (the
  structure where the operator has one, e.g. KFAC's factors; otherwise the dense
  matrix, refused above the dense limit);
* :func:`approximate_inverse`: the structured inverse of an approximation built
  on the operator's problem (``kfac``: J. Martens and R. Grosse, "Optimizing
  neural networks with Kronecker-factored approximate curvature", ICML 2015;
  ``ekfac``: T. George, C. Laurent, X. Bouthillier, N. Ballas and P. Vincent,
  "Fast approximate natural gradient descent in a Kronecker-factored
  eigenbasis", NeurIPS 2018);
* :func:`lowrank`: the top eigenpairs inverted in their subspace, ``1 / damping``
  in its complement.

Each computes its relative residual against ``A`` with one more product:
``converged`` is that measurement against ``tol`` (an approximation rarely
reaches it: its status is then ``"approximate"``, ``"above-tol"`` for the exact
solve, and its ``reason`` says how far it is).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from curvkit.errors import CurvkitError
from curvkit.linalg.solve import SolveHistory, SolveResult
from curvkit.operator import CurvatureOperator
from curvkit.problem_operator import data_backed
from curvkit.snapshot import fixed_model_state

__all__ = ["approximate_inverse", "exact_solve", "lowrank"]


@fixed_model_state()
def exact_solve(
    A: CurvatureOperator,
    B: Tensor,
    *,
    damping: float,
    tol: float,
    x0: Tensor | None = None,
    preconditioner: CurvatureOperator | None = None,
    callback: Callable[[Tensor], Mapping[str, float]] | None = None,
    maxiter: int | None = None,
) -> SolveResult:
    """``A.solve(B, damping)``: structured where ``A`` has structure, else the dense matrix.

    The residual is computed with one more product and reported; ``converged``
    compares it with ``tol`` like every solver. A direct method: ``maxiter``,
    ``x0`` and ``preconditioner`` are not used.
    """
    history = SolveHistory(A, damping, B, callback)
    return history.measured(B, A.solve(B, damping), 1, tol, "above-tol", "residual above tol")


@fixed_model_state()
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
    elif data_backed(A):
        K = curvature(estimator, A.problem, **options).astype(A.dtype)
    else:
        raise CurvkitError(
            f"solver {estimator!r} builds {estimator.upper()} on the operator's problem, and "
            f"{getattr(A, 'name', type(A).__name__)!r} ({type(A).__name__}) has none; solve with the "
            f"operator itself ('exact', 'cg'), or pass curvkit.curvature({estimator!r}, problem)"
        )
    if "inverse" not in K.STRUCTURE:
        raise CurvkitError(f"estimator {estimator!r} has no structured inverse (STRUCTURE lacks 'inverse')")
    history = SolveHistory(A, damping, B, callback)
    X = K.solve(B, damping)
    why = f"approximate inverse ({estimator}): relative residual {{residual}} against A"
    return history.measured(B, X, 1, tol, "approximate", why)


@fixed_model_state()
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
            ``rank`` out of range or a preconditioner.
    """
    from curvkit.linalg.eigen import eigenvalues

    if preconditioner is not None:
        raise CurvkitError("lowrank takes no preconditioner")
    if not damping > 0:
        raise CurvkitError(
            "lowrank needs damping > 0: the complement of the eigenvectors kept is inverted as 1 / damping"
        )
    P = A.shape[0]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= P:
        raise CurvkitError(f"rank must be an integer in 1..{P}, got {rank!r}")
    history = SolveHistory(A, damping, B, callback)
    pairs = eigenvalues(A, k=rank, which="largest", tol=eigen_tol, max_matvecs=max_matvecs, seed=seed)
    history.matvecs += pairs.matvecs
    values, U = pairs.values.to(B.dtype), pairs.vectors.to(B.dtype)
    shifted = values + damping
    if not bool((shifted > 0).all()):
        why = f"an eigenvalue of A + damping I is {shifted.min().item():.3g} <= 0: not positive definite"
        return history.result(torch.zeros_like(B), "non-positive-curvature", why, 0, float("nan"))
    C = U.T @ B
    X = U @ (C / shifted[:, None]) + (B - U @ C) / damping
    eigen = "" if pairs.converged else f"; eigenpairs not converged ({pairs.stop_reason})"
    why = f"rank-{rank} approximation: relative residual {{residual}} against A{eigen}"
    return history.measured(B, X, 1, tol, "approximate", why)
