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
from curvkit.linalg._common import (
    Progress,
    check_finite,
    check_square,
    gaussian,
    probe_generator,
    require_fixed_map,
    staged,
)
from curvkit.linalg.eigen import EigenResult, eigenvalues
from curvkit.precision import rounding_tolerance
from curvkit.snapshot import fixed_model_state

__all__ = [
    "CheckResult",
    "agreement_accuracy",
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
        if self.passed is None and math.isnan(self.measured):
            return f"{self.name}: {self.detail}"
        bound = "" if math.isnan(self.threshold) else f" (threshold {self.threshold:.3g})"
        return f"{status} {self.name}: {self.measured:.4g}{bound} {self.detail}"


def _products(A: Any, X: Tensor, progress: Progress | None) -> Tensor:
    """``A @ X`` in one pass, reported to ``progress`` before and after."""
    if progress is not None:
        progress({"matvecs": 0, "total": X.shape[1]})
    out = A.matmat(X)
    if progress is not None:
        progress({"matvecs": X.shape[1], "total": X.shape[1]})
    return out


@fixed_model_state()
def check_residuals(
    A: Any, result: EigenResult, tol: float | None = None, progress: Progress | None = None
) -> CheckResult:
    """Recompute the eigenpairs' residuals with ``A`` and compare with ``tol * max |lambda|``.

    Args:
        A: The operator the eigenpairs are of.
        result: From :func:`curvkit.eigenvalues` (with vectors).
        tol: Relative tolerance (default: the result's own ``tol``).
        progress: Called with ``{"matvecs", "total"}`` before and after the products.
    """
    require_fixed_map(A, "check_residuals")
    tol = result.tol if tol is None else tol
    if result.vectors is None:
        raise ValueError("check_residuals needs eigenvectors: call eigenvalues(..., return_vectors=True)")
    V = result.vectors
    products = _products(A, V, progress)
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


@fixed_model_state()
def check_symmetry(
    A: Any, trials: int = 3, seed: int = 0, tol: float | None = None, progress: Progress | None = None
) -> CheckResult:
    """Compare ``v.(A w)`` with ``w.(A v)`` on random Gaussian vectors.

    The figure is ``max |v.Aw - w.Av| / (|v| |Aw| + |w| |Av|)`` over ``trials``
    pairs (all products in one ``matmat``, reported to ``progress`` before and after).
    """
    P = check_square(A)
    require_fixed_map(A, "check_symmetry")
    tol = rounding_tolerance(getattr(A, "product_dtype", A.dtype)) if tol is None else tol
    X = gaussian(P, 2 * trials, probe_generator(seed), A.dtype, A.device)
    AX = _products(A, X, progress)
    check_finite(AX, 1, "check_symmetry")
    worst = 0.0
    for t in range(trials):
        v, w, Av, Aw = X[:, 2 * t], X[:, 2 * t + 1], AX[:, 2 * t], AX[:, 2 * t + 1]
        gap = (torch.dot(v, Aw) - torch.dot(w, Av)).abs().item()
        scale = (v.norm() * Aw.norm() + w.norm() * Av.norm()).item()
        worst = max(worst, gap / max(scale, torch.finfo(A.dtype).tiny))
    return CheckResult("symmetry", worst <= tol, worst, tol, "max |v.Aw - w.Av| / (|v||Aw| + |w||Av|)")


@fixed_model_state()
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


def _reference_pairs(
    B: Any, k: int, which: str, tol: float, seed: int, progress: Progress | None
) -> tuple[Tensor, Tensor, int, str | None]:
    """Eigenpairs of the reference: ``(values, vectors, products, stop reason)``.

    A dense tensor is diagonalised (no products, ``"converged"``); an operator is
    solved by Lanczos to ``tol``, with its products reported to ``progress``.
    """
    if isinstance(B, Tensor):
        values, vectors = torch.linalg.eigh((B + B.T) / 2)
        order = {
            "largest": torch.argsort(values, descending=True),
            "smallest": torch.argsort(values),
            "largest_magnitude": torch.argsort(values.abs(), descending=True),
        }[which][:k]
        return values[order], vectors[:, order], 0, "converged"
    res = eigenvalues(B, k=k, which=which, tol=tol, seed=seed, progress=staged(progress, "reference"))
    return res.values, res.vectors, res.matvecs, res.stop_reason


def largest_principal_angle(U: Tensor, V: Tensor) -> float:
    """Largest principal angle (radians) between the column spans of ``U`` and ``V``
    (same shape ``[P, k]``), accurate for small angles: ``arcsin`` of
    ``||(I - Q_U Q_U^T) Q_V||_2`` with orthonormal bases ``Q`` from QR, in float64.
    """
    Q_U = torch.linalg.qr(U.to(torch.float64))[0]
    Q_V = torch.linalg.qr(V.to(device=U.device, dtype=torch.float64))[0]
    sine = torch.linalg.matrix_norm(Q_V - Q_U @ (Q_U.T @ Q_V), ord=2).item()
    return math.asin(min(1.0, sine))


def agreement_accuracy(tol: float, dtype: torch.dtype) -> float:
    """The relative accuracy an estimator's eigenpairs are held to by :func:`check_agreement`.

    ``max(tol, sqrt(eps(dtype)))``: the tolerance its eigen-solve was asked for
    (every residual within ``tol * ||A||``), but never below half the digits of
    its precision, the error float32 products of network Hessians routinely
    carry (``sqrt(eps)`` is 3.5e-4 in float32 and 1.5e-8 in float64). A float32
    estimator solved to ``tol=1e-4`` is thus held to 3.5e-4, not to the 1e-6 a
    float64 reference reaches.

    Example:
        >>> round(agreement_accuracy(1e-4, torch.float32), 6), agreement_accuracy(1e-2, torch.float64)
        (0.000345, 0.01)
    """
    return max(float(tol), math.sqrt(torch.finfo(dtype).eps))


@fixed_model_state()
def check_agreement(
    A: Any,
    reference: Any,
    k: int = 5,
    which: str = "largest",
    value_rtol: float | None = None,
    max_angle: float | None = None,
    tol: float | None = None,
    seed: int = 0,
    *,
    estimate: EigenResult | None = None,
    reference_tol: float | None = None,
    label: str = "the reference",
    progress: Progress | None = None,
) -> CheckResult:
    """Agreement of an estimator's top-k eigenpairs with a reference.

    Costs ``O(k)`` products with each: the reference, when it is an operator, is
    solved by Lanczos to ``reference_tol`` for ``k + 1`` pairs (the last gives the
    gap of the spectrum after the ``k``-th); a dense reference is diagonalised.
    The estimator's pairs are ``estimate`` when given (the run's own top-k solve),
    otherwise computed to ``tol``.

    Args:
        A: The estimator's operator.
        reference: The reference: another operator (typically the reference
            estimator on a float64 copy of the problem) or a dense ``[P, P]`` tensor.
        k: Number of eigenpairs compared.
        which: ``"largest"``, ``"smallest"`` or ``"largest_magnitude"``.
        value_rtol: Bound on ``max_i |lambda_i - mu_i| / max_i |mu_i|``; default
            ``eps_A = agreement_accuracy(tol, A.product_dtype)``: a residual within
            ``tol * ||A||`` puts an eigenvalue within that distance (Weyl).
        max_angle: Bound (radians) on the largest principal angle between the two
            k-dimensional eigenspaces; default from the Davis-Kahan sin-theta
            theorem, ``arcsin(min(1, 2 sqrt(k) eps_A max|mu| / gap))`` with ``gap``
            the distance from the ``(k+1)``-th reference eigenvalue to the ``k``-th
            (exact for ``largest`` and ``smallest``). When the gap is too small for
            the bound to be below 1 the subspace is not defined well enough to
            check, and the bound is pi/2 (the values are still checked).
        tol: Tolerance of the estimator's eigen-solve (default ``estimate.tol``, or
            1e-4 in float32 and 1e-10 in float64).
        seed: Seed of the Lanczos starting vectors.
        estimate: The estimator's eigenpairs (with vectors, at least ``k``, of the
            same ``which``); computed when ``None``.
        reference_tol: Tolerance of the reference's solve (default 1e-10 in
            float64, 1e-4 in float32).
        label: What the reference is, for the result's ``detail``.
        progress: Called with the counters of each solve and ``"stage"``:
            ``"reference"`` or ``"estimator"``.

    Returns:
        A :class:`CheckResult` whose ``measured`` is the relative eigenvalue error;
        ``figures`` hold ``max_principal_angle``, ``max_angle_threshold``, ``gap``,
        ``reference_matvecs`` and ``matvecs`` (the estimator's products spent by
        the check). ``passed`` is ``None`` when the reference's solve did not
        converge: a reference that is not one decides nothing.

    The largest principal angle between the spans of ``U`` and ``V`` is computed
    in float64 from its sine, ``||(I - U U^T) V||_2`` with both bases
    orthonormalised (A. Bjorck and G. H. Golub, "Numerical methods for computing
    angles between linear subspaces", Math. Comp. 27(123), 1973). The textbook
    ``arccos`` of the smallest singular value of ``U^T V`` loses half the digits
    for small angles: with float32 eigenvectors it reads about 1e-3 where the
    angle is 1e-6. The angle bound is that of C. Davis and W. M. Kahan, "The
    rotation of eigenvectors by a perturbation. III", SIAM J. Numer. Anal. 7(1), 1970.
    """
    if tuple(A.shape) != tuple(reference.shape):
        raise ShapeMismatchError(
            f"cannot compare an operator of shape {tuple(A.shape)} with a reference of shape "
            f"{tuple(reference.shape)}; restrict both to the same parameters"
        )
    P = int(A.shape[0])
    if estimate is not None and (estimate.vectors is None or len(estimate.values) < k):
        raise ValueError(f"check_agreement needs an estimate with at least {k} eigenvectors")
    if tol is None and estimate is not None:
        tol = estimate.tol
    if tol is None:
        tol = rounding_tolerance(getattr(A, "product_dtype", A.dtype))
    if reference_tol is None:
        reference_tol = rounding_tolerance(reference.dtype)
    mu, U, reference_matvecs, stop = _reference_pairs(
        reference, min(k + 1, P), which, reference_tol, seed, progress
    )
    matvecs = 0
    if estimate is None:
        estimate = eigenvalues(
            A, k=k, which=which, tol=tol, seed=seed, progress=staged(progress, "estimator")
        )
        matvecs = estimate.matvecs
    lam, V = estimate.values[:k], estimate.vectors[:, :k]
    gap = abs(mu[k - 1] - mu[k]).item() if len(mu) > k else math.inf
    mu, U = mu[:k].to(torch.float64), U[:, :k]
    scale = mu.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    value_error = ((lam.to(mu) - mu).abs().max() / scale).item()
    angle = largest_principal_angle(U, V)
    accuracy = agreement_accuracy(tol, getattr(A, "product_dtype", A.dtype))
    if value_rtol is None:
        value_rtol = accuracy
    if max_angle is None:
        sine = 2 * math.sqrt(k) * accuracy * scale.item() / gap if gap > 0 else math.inf
        max_angle = math.asin(sine) if sine < 1 else math.pi / 2
    what = f"relative error of the top-{k} eigenvalues against {label}; largest principal angle in figures"
    passed: bool | None = value_error <= value_rtol and angle <= max_angle
    if stop != "converged":
        passed, what = None, f"not decided: the solve of {label} stopped short ({stop}); {what}"
    return CheckResult(
        "agreement",
        passed,
        value_error,
        value_rtol,
        what,
        {
            "max_principal_angle": angle,
            "max_angle_threshold": max_angle,
            "gap": gap,
            "reference_matvecs": float(reference_matvecs),
            "matvecs": float(matvecs),
        },
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
