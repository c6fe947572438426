"""Eigenvalue checks: structured pass/fail results with the measured figure.

Each function returns a :class:`CheckResult` (or a list of them). A check whose
figure has no natural pass/fail (condition number, negative mass without a
threshold) reports ``passed=None``.

* :func:`check_residuals`: the certificates ``||A v - lambda v||`` of eigenpairs;
* :func:`check_symmetry`: ``v.Aw`` against ``w.Av`` on random vectors;
* :func:`check_psd`: smallest eigenvalue ``>= -tol * largest``;
* :func:`check_agreement`: top-k eigenvalues and subspace of an estimator against
  a reference (the exact Hessian or GGN on small problems): relative error of the
  values and the largest principal angle between the subspaces (Björck and
  Golub, "Numerical methods for computing angles between linear subspaces",
  Math. Comp. 1973);
* :func:`condition_number` and :func:`negative_mass`: figures of the spectrum.

A NaN or Inf product stops a check with :class:`~curvkit.NonFiniteError`, naming
the product, instead of a figure that compares as neither passed nor failed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvkit.errors import ShapeMismatchError
from curvkit.linalg._common import check_finite, check_square, gaussian, probe_generator, require_fixed_map
from curvkit.linalg.eigen import EigenResult, eigenvalues

__all__ = [
    "CheckResult",
    "check_agreement",
    "check_psd",
    "check_residuals",
    "check_symmetry",
    "condition_number",
    "largest_principal_angle",
    "negative_mass",
]


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check.

    Attributes:
        name: What was checked.
        passed: ``True``/``False``, or ``None`` for a figure without a threshold.
        measured: The measured figure (see ``detail``).
        threshold: The bound it was compared with (``nan`` if none).
        detail: One line saying what ``measured`` is.
        figures: Other measured figures, by name.
    """

    name: str
    passed: bool | None
    measured: float
    threshold: float = math.nan
    detail: str = ""
    figures: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values, for JSON and HDF5."""
        return {
            "name": self.name,
            "passed": self.passed,
            "measured": self.measured,
            "threshold": self.threshold,
            "detail": self.detail,
            "figures": dict(self.figures),
        }

    def __str__(self) -> str:
        status = {True: "pass", False: "FAIL", None: "info"}[self.passed]
        bound = "" if math.isnan(self.threshold) else f" (threshold {self.threshold:.3g})"
        return f"{status} {self.name}: {self.measured:.4g}{bound} {self.detail}"


def _default_tol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-4


def check_residuals(A: Any, result: EigenResult, tol: float | None = None) -> CheckResult:
    """Recompute the eigenpairs' residuals with ``A`` and compare with ``tol * max |lambda|``.

    Args:
        A: The operator the eigenpairs are of.
        result: From :func:`curvkit.eigenvalues` (with vectors).
        tol: Relative tolerance (default: the result's own ``tol``).
    """
    require_fixed_map(A, "check_residuals")
    tol = result.tol if tol is None else tol
    if result.vectors is None:
        raise ValueError("check_residuals needs eigenvectors: call eigenvalues(..., return_vectors=True)")
    V = result.vectors
    products = A.matmat(V)
    check_finite(products, 1, "check_residuals")
    residuals = (products - V * result.values).norm(dim=0)
    scale = max(result.values.abs().max().item(), torch.finfo(result.values.dtype).tiny)
    worst = residuals.max().item() / scale
    return CheckResult(
        "residuals",
        worst <= tol,
        worst,
        tol,
        "max ||A v - lambda v|| / max |lambda|",
        {"max_residual": residuals.max().item(), "reported_max_residual": result.residuals.max().item()},
    )


def check_symmetry(A: Any, trials: int = 3, seed: int = 0, tol: float | None = None) -> CheckResult:
    """Compare ``v.(A w)`` with ``w.(A v)`` on random Gaussian vectors.

    The figure is ``max |v.Aw - w.Av| / (|v| |Aw| + |w| |Av|)`` over ``trials``
    pairs (all products in one ``matmat``).
    """
    P = check_square(A)
    require_fixed_map(A, "check_symmetry")
    tol = _default_tol(A.dtype) if tol is None else tol
    X = gaussian(P, 2 * trials, probe_generator(seed), A.dtype, A.device)
    AX = A.matmat(X)
    check_finite(AX, 1, "check_symmetry")
    worst = 0.0
    for t in range(trials):
        v, w, Av, Aw = X[:, 2 * t], X[:, 2 * t + 1], AX[:, 2 * t], AX[:, 2 * t + 1]
        gap = (torch.dot(v, Aw) - torch.dot(w, Av)).abs().item()
        scale = (v.norm() * Aw.norm() + w.norm() * Av.norm()).item()
        worst = max(worst, gap / max(scale, torch.finfo(A.dtype).tiny))
    return CheckResult("symmetry", worst <= tol, worst, tol, "max |v.Aw - w.Av| / (|v||Aw| + |w||Av|)")


def check_psd(A: Any, tol: float = 1e-6, seed: int = 0, eig_tol: float = 1e-6, **kwargs: Any) -> CheckResult:
    """Positive semi-definiteness: ``lambda_min >= -tol * lambda_max``.

    Both ends come from one Lanczos run (``which="both_ends"``, ``k=2``).
    """
    res = eigenvalues(A, k=2, which="both_ends", tol=eig_tol, seed=seed, return_vectors=False, **kwargs)
    top, bottom = res.values[0].item(), res.values[-1].item()
    ratio = -bottom / max(abs(top), torch.finfo(A.dtype).tiny)
    return CheckResult(
        "psd",
        ratio <= tol,
        ratio,
        tol,
        "-lambda_min / lambda_max",
        {"lambda_min": bottom, "lambda_max": top, "matvecs": float(res.matvecs)},
    )


def _top_k_of(B: Any, k: int, which: str, tol: float, seed: int) -> tuple[Tensor, Tensor]:
    if isinstance(B, Tensor):
        values, vectors = torch.linalg.eigh((B + B.T) / 2)
        order = {
            "largest": torch.argsort(values, descending=True),
            "smallest": torch.argsort(values),
            "largest_magnitude": torch.argsort(values.abs(), descending=True),
        }[which][:k]
        return values[order], vectors[:, order]
    res = eigenvalues(B, k=k, which=which, tol=tol, seed=seed)
    return res.values, res.vectors


def largest_principal_angle(U: Tensor, V: Tensor) -> float:
    """Largest principal angle (radians) between the column spans of ``U`` and ``V``
    (same shape ``[P, k]``), accurate for small angles: ``arcsin`` of
    ``||(I - Q_U Q_U^T) Q_V||_2`` with orthonormal bases ``Q`` from QR, in float64.
    """
    Q_U = torch.linalg.qr(U.to(torch.float64))[0]
    Q_V = torch.linalg.qr(V.to(device=U.device, dtype=torch.float64))[0]
    sine = torch.linalg.matrix_norm(Q_V - Q_U @ (Q_U.T @ Q_V), ord=2).item()
    return math.asin(min(1.0, sine))


def check_agreement(
    A: Any,
    reference: Any,
    k: int = 5,
    which: str = "largest",
    value_rtol: float = 1e-6,
    max_angle: float = 1e-3,
    tol: float = 1e-8,
    seed: int = 0,
) -> CheckResult:
    """Agreement of an estimator's top-k eigenpairs with a reference.

    Args:
        A: The estimator's operator.
        reference: The reference: a dense ``[P, P]`` tensor (e.g. the exact
            Hessian) or another operator.
        k: Number of eigenpairs compared.
        which: ``"largest"``, ``"smallest"`` or ``"largest_magnitude"``.
        value_rtol: Bound on ``max_i |lambda_i - mu_i| / max_i |mu_i|``.
        max_angle: Bound (radians) on the largest principal angle between the
            two k-dimensional eigenspaces.
        tol: Lanczos tolerance for operators.
        seed: Seed of the Lanczos starting vectors.

    The largest principal angle between the spans of ``U`` and ``V`` is computed
    in float64 from its sine, ``||(I - U U^T) V||_2`` with both bases
    orthonormalised (A. Bjorck and G. H. Golub, "Numerical methods for computing
    angles between linear subspaces", Math. Comp. 27(123), 1973). The textbook
    ``arccos`` of the smallest singular value of ``U^T V`` loses half the digits
    for small angles: with float32 eigenvectors it reads about 1e-3 where the
    angle is 1e-6. The angle is only meaningful when the k-th and (k+1)-th
    eigenvalues are separated.
    """
    if tuple(A.shape) != tuple(reference.shape):
        raise ShapeMismatchError(
            f"cannot compare an operator of shape {tuple(A.shape)} with a reference of shape "
            f"{tuple(reference.shape)}; restrict both to the same parameters"
        )
    mu, U = _top_k_of(reference, k, which, tol, seed)
    lam, V = _top_k_of(A, k, which, tol, seed)
    mu = mu.to(lam)  # U keeps its precision: the angle is computed in float64
    value_error = ((lam - mu).abs().max() / mu.abs().max().clamp_min(torch.finfo(mu.dtype).tiny)).item()
    angle = largest_principal_angle(U, V)
    return CheckResult(
        "agreement",
        value_error <= value_rtol and angle <= max_angle,
        value_error,
        value_rtol,
        f"relative error of the top-{k} eigenvalues; largest principal angle in figures",
        {"max_principal_angle": angle, "max_angle_threshold": max_angle},
    )


def condition_number(result: EigenResult) -> CheckResult:
    """``|lambda|_max / |lambda|_min`` from a ``which="both_ends"`` result.

    Reported as information (``passed=None``); infinite when the smallest
    magnitude is zero. For an indefinite spectrum this is the ratio of the
    extreme magnitudes found, not the true condition number (which needs the
    eigenvalue nearest zero).
    """
    mags = result.values.abs()
    smallest = mags.min().item()
    kappa = math.inf if smallest == 0 else mags.max().item() / smallest
    return CheckResult(
        "condition_number", None, kappa, detail="max |lambda| / min |lambda| of the pairs found"
    )


def negative_mass(density: Any, max_mass: float | None = None) -> CheckResult:
    """Fraction of the spectrum below zero, from a stochastic Lanczos quadrature.

    Uses the quadrature itself (``sum of weights of negative nodes``, averaged
    over runs), not the broadened density, so broadening does not leak mass
    across zero.

    Args:
        density: A result of :func:`curvkit.density` (``nodes``, ``weights``).
        max_mass: Optional bound; without it the result is information only.
    """
    mass = ((density.nodes < 0).to(density.weights) * density.weights).sum(dim=-1).mean().item()
    passed = None if max_mass is None else mass <= max_mass
    return CheckResult(
        "negative_mass",
        passed,
        mass,
        math.nan if max_mass is None else max_mass,
        "spectral mass of negative eigenvalues (fraction)",
    )
