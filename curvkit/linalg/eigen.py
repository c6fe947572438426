"""Eigenpairs of curvature operators, with residual certificates.

:func:`eigenvalues` runs thick-restart Lanczos with partial (or, for bases too
large to keep their products, full) reorthogonalisation
(:mod:`curvkit.linalg.lanczos`) and returns, for every pair, the residual norm
``r = ||A v - lambda v||`` computed explicitly from ``A v``: combined from the
products Lanczos stored (``v`` is a combination of basis vectors, so
``A v = (A V) s`` needs no new product), or, when the basis is too large to keep
its products (:data:`curvkit.linalg.lanczos.PRODUCT_STORE_BYTES`), from one more
batched product. Either way it is not the recurrence's estimate
``|beta_m s_m|``, which rounding can make too optimistic. For a
symmetric ``A`` and unit ``v`` the interval ``[lambda - r, lambda + r]``
contains an eigenvalue of ``A`` (the Bauer-Fike / Weyl bound), and if the
nearest other eigenvalue is at distance ``gap`` the eigenvalue error is at most
``r**2 / gap`` (Kato-Temple / Parlett, *The Symmetric Eigenvalue Problem*, §11).

Power iteration with deflation (``method="power"``) is available for parity with
PyHessian; it converges slowly on clustered spectra and returns eigenvalues of
largest *magnitude*, so it is never the default.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvkit.errors import CurvkitError, CurvkitWarning
from curvkit.linalg._common import Progress, check_square, gaussian, probe_generator
from curvkit.linalg.lanczos import WHICH, thick_restart_lanczos

__all__ = ["EigenResult", "eigenvalues"]

METHODS = ("lanczos", "power")

PRECISION_FLOOR = 4
"""Lanczos stops once the residual estimates reach ``PRECISION_FLOOR * eps`` of the
operator's dtype (relative to ``||A||``), even when a smaller ``tol`` was asked.
Rounding in the products themselves keeps the true residuals near
``2-3 eps ||A||`` (measured: 2.6e-7 relative on a float32 MLP Hessian), so the
recurrence's estimates below that level are not certifiable and a run chasing
them would only spend its whole budget."""


@dataclass(frozen=True)
class EigenResult:
    """Eigenpairs with their certificates.

    Attributes:
        values: ``[k]`` eigenvalue estimates (order: see :func:`eigenvalues`).
        vectors: ``[P, k]`` unit eigenvectors, or ``None`` if not kept.
        residuals: ``[k]`` certificates ``||A v - lambda v||``.
        matvecs: Products with ``A`` used, certificates included.
        data_passes: Passes over the data (``None`` for operators without data).
        converged: Whether every residual is within ``tol * ||A||``, with ``||A||``
            estimated by the largest Ritz value in magnitude.
        which: The part of the spectrum asked for.
        method: ``"lanczos"`` or ``"power"``.
        tol: The requested relative tolerance.
        restarts: Lanczos restarts (power: iterations).
    """

    values: Tensor
    vectors: Tensor | None
    residuals: Tensor
    matvecs: int
    data_passes: int | None
    converged: bool
    which: str
    method: str
    tol: float
    restarts: int

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (vectors omitted), for JSON and HDF5."""
        return {
            "values": self.values.tolist(),
            "residuals": self.residuals.tolist(),
            "matvecs": self.matvecs,
            "data_passes": self.data_passes,
            "converged": self.converged,
            "which": self.which,
            "method": self.method,
            "tol": self.tol,
            "restarts": self.restarts,
        }


def _order(values: Tensor, which: str) -> Tensor:
    """Most extreme first: descending (largest, both_ends), ascending (smallest), by |.|."""
    if which == "smallest":
        return torch.argsort(values)
    if which == "largest_magnitude":
        return torch.argsort(values.abs(), descending=True)
    return torch.argsort(values, descending=True)


def eigenvalues(
    A: Any,
    k: int = 5,
    which: str = "largest",
    tol: float = 1e-6,
    *,
    method: str = "lanczos",
    max_matvecs: int | None = None,
    max_basis: int | None = None,
    seed: int | None = 0,
    return_vectors: bool = True,
    progress: Progress | None = None,
    reorthogonalisation: str = "auto",
) -> EigenResult:
    """The ``k`` eigenpairs of a symmetric operator at one end of its spectrum.

    Args:
        A: A :class:`~curvkit.CurvatureOperator` (or anything with ``shape``,
            ``matmat``, ``dtype``, ``device``), e.g. ``H.restrict("fc1")``.
        k: Number of eigenpairs.
        which: ``"largest"`` (algebraic), ``"smallest"``, ``"both_ends"``
            (``ceil(k/2)`` largest and ``floor(k/2)`` smallest, like SciPy's
            ``eigsh(which="BE")``) or ``"largest_magnitude"``.
        tol: Relative residual tolerance: converged when every
            ``||A v - lambda v|| <= tol * ||A||`` (``||A||`` estimated by the
            largest Ritz value in magnitude seen). Below the precision floor of
            the operator's dtype (:data:`PRECISION_FLOOR` ``* eps``: about 5e-7 in
            float32) a :class:`~curvkit.CurvkitWarning` is issued and Lanczos stops
            at the floor instead of running through ``max_matvecs``.
        method: ``"lanczos"`` (default) or ``"power"`` (deflated power
            iteration, ``which="largest_magnitude"`` only).
        max_matvecs: Budget of products (default: see
            :func:`~curvkit.linalg.lanczos.thick_restart_lanczos`). When it runs out
            the result says ``converged=False`` with the achieved residuals.
        max_basis: Krylov basis size before a thick restart.
        seed: Seed of the starting vector (a CPU generator: same on every device).
        return_vectors: Keep the ``[P, k]`` eigenvectors in the result.
        progress: Called after each product with ``{"matvecs", "basis", "restarts"}``.
        reorthogonalisation: ``"auto"``, ``"full"`` or ``"partial"``: see
            :func:`~curvkit.linalg.lanczos.thick_restart_lanczos`.

    Returns:
        An :class:`EigenResult`; values ordered most extreme first (descending for
        ``"largest"`` and ``"both_ends"``, ascending for ``"smallest"``, by
        decreasing magnitude for ``"largest_magnitude"``).

    Raises:
        CurvkitError: ``k`` is not in ``1..P``, or an unknown ``which``/``method``.
        ShapeMismatchError: ``A`` is not a square operator.

    Example:
        >>> import torch, curvkit
        >>> A = curvkit.DenseOperator(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)))
        >>> res = curvkit.eigenvalues(A, k=2, tol=1e-10)
        >>> [round(v, 10) for v in res.values.tolist()], bool(res.residuals.max() < 1e-8)
        ([10.0, 9.0], True)
    """
    P = check_square(A)
    if which not in WHICH:
        raise CurvkitError(f"which must be one of {list(WHICH)}, got {which!r}")
    if method not in METHODS:
        raise CurvkitError(f"method must be one of {list(METHODS)}, got {method!r}")
    if not 1 <= k <= P:
        raise CurvkitError(f"k must be between 1 and the operator's dimension {P}, got {k}")
    if tol <= 0:
        raise CurvkitError(f"tol must be positive, got {tol}")
    passes_before = getattr(A, "data_passes", None)
    # the Krylov basis is kept in the operator's precision (at least float32): a float64
    # basis for a float32 operator doubles the memory traffic of reorthogonalisation,
    # the dominant cost next to the products, without making the products more exact
    work_dtype = torch.float32 if A.dtype in (torch.float16, torch.bfloat16) else A.dtype
    gen = probe_generator(seed)

    def matmat(M: Tensor) -> Tensor:
        return A.matmat(M.to(A.dtype)).to(work_dtype)

    if method == "power":
        if which != "largest_magnitude":
            raise CurvkitError(
                "power iteration finds largest-magnitude eigenvalues only; "
                "use which='largest_magnitude' or method='lanczos'"
            )
        values, vectors, used, iterations = _deflated_power(
            matmat, P, k, tol, max_matvecs, gen, work_dtype, A.device, progress
        )
        radius = values.abs().max().item()
        products = None
    else:
        floor = PRECISION_FLOOR * torch.finfo(A.dtype).eps
        if tol < floor:
            warnings.warn(
                f"tol={tol:g} is below what {A.dtype} products can certify (about {floor:.1g} "
                "relative to ||A||): Lanczos stops there and the result says converged=False "
                "unless the residuals happen to reach tol; use a float64 operator for tighter pairs",
                CurvkitWarning,
                stacklevel=2,
            )
        v0 = gaussian(P, 1, gen, work_dtype, A.device)[:, 0]
        state = thick_restart_lanczos(
            lambda v: matmat(v.unsqueeze(1))[:, 0],
            P,
            k,
            which=which,
            tol=max(tol, floor),
            max_basis=max_basis,
            max_matvecs=max_matvecs,
            v0=v0,
            dtype=work_dtype,
            device=A.device,
            progress=progress,
            reorthogonalisation=reorthogonalisation,
        )
        values, vectors, used, iterations = state.values, state.vectors, state.matvecs, state.restarts
        radius = state.spectral_radius
        products = state.products
    if products is None:  # certificates: one batched product for all k pairs
        products = matmat(vectors.contiguous())
        used += vectors.shape[1]
    residual = products - vectors * values
    residuals = residual.norm(dim=0)
    scale = max(radius, values.abs().max().item(), torch.finfo(A.dtype).tiny)
    converged = bool((residuals <= tol * scale).all())
    order = _order(values, which)
    passes_after = getattr(A, "data_passes", None)
    return EigenResult(
        values=values[order].to(A.dtype),
        vectors=vectors[:, order].to(A.dtype).contiguous() if return_vectors else None,
        residuals=residuals[order].to(A.dtype),
        matvecs=used,
        data_passes=None if passes_before is None else passes_after - passes_before,
        converged=converged,
        which=which,
        method=method,
        tol=tol,
        restarts=iterations,
    )


def _deflated_power(
    matmat: Any,
    P: int,
    k: int,
    tol: float,
    max_matvecs: int | None,
    gen: torch.Generator,
    dtype: torch.dtype,
    device: Any,
    progress: Progress | None,
) -> tuple[Tensor, Tensor, int, int]:
    """Power iteration on ``A - sum_j lambda_j v_j v_j^T``, one eigenpair at a time.

    Stops each pair when the Rayleigh quotient changes by less than
    ``tol * |lambda|`` (PyHessian's rule), within an equal share of the budget.
    """
    budget = max_matvecs or 1000 * k
    per_pair = max(budget // k, 2)
    values: list[Tensor] = []
    vectors: list[Tensor] = []
    used = iterations = 0
    for _ in range(k):
        v = gaussian(P, 1, gen, dtype, device)[:, 0]
        v = v / v.norm()
        lam = None
        for _ in range(per_pair):
            w = matmat(v.unsqueeze(1))[:, 0]
            for lam_j, v_j in zip(values, vectors):
                w = w - lam_j * v_j * torch.dot(v_j, v)
            used += 1
            iterations += 1
            new = torch.dot(v, w)
            v = w / w.norm()
            if progress is not None:
                progress({"matvecs": used, "eigenpair": len(values) + 1})
            if lam is not None and (new - lam).abs() <= tol * new.abs():
                lam = new
                break
            lam = new
        values.append(lam)
        vectors.append(v)
    return torch.stack(values), torch.stack(vectors, dim=1), used, iterations
