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

The run stops for one of three reasons, which the result gives as
``stop_reason``: ``"converged"`` (every residual within ``tol``), ``"budget"``
(``max_matvecs`` products spent, by default ``max(300, 30 k)``:
:func:`~curvkit.linalg.lanczos.default_max_matvecs`) or ``"stagnated"``: the
residuals stopped improving at the precision floor of the products themselves
(their rounding, measured by the run, not assumed from ``eps``: float32 network
Hessians are often 100 times noisier than ``eps``), which the result gives as
``precision_floor`` and a :class:`~curvkit.CurvkitWarning` names with its
remedies. A NaN or Inf product raises :class:`~curvkit.NonFiniteError`.

Power iteration with deflation (``method="power"``) is available for parity with
PyHessian; it converges slowly on clustered spectra and returns eigenvalues of
largest *magnitude*, so it is never the default.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvkit.arguments import integer, relative_tolerance
from curvkit.errors import CurvkitError, CurvkitWarning
from curvkit.linalg._common import (
    Progress,
    check_finite,
    check_square,
    gaussian,
    non_finite_error,
    probe_generator,
    product_name,
    require_fixed_map,
)
from curvkit.linalg.lanczos import REORTHOGONALISATION, WHICH, thick_restart_lanczos
from curvkit.remedies import setting
from curvkit.snapshot import fixed_model_state

__all__ = ["EigenResult", "eigenvalues"]

METHODS = ("lanczos", "power")

STOP_REASONS = ("converged", "budget", "stagnated")
"""Why an eigen-solve stopped (:attr:`EigenResult.stop_reason`)."""


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
        method: ``"lanczos"``, ``"power"``, or ``"exact"``: from the operator's
            structure (``"eigenvalues"`` in its ``STRUCTURE``, e.g. Kronecker
            factors), no Krylov solve; the residuals still certify the pairs.
        tol: The requested relative tolerance.
        restarts: Lanczos restarts (power: iterations).
        stop_reason: ``"converged"``, ``"budget"`` (``max_matvecs`` spent, the
            residuals reached are those given) or ``"stagnated"`` (the residuals
            stopped improving at the products' precision floor). Defaults to
            ``"converged"`` for a converged result and ``None`` (not recorded) for
            another, so results built without it (e.g. read from a file written
            before it existed) stay valid.
        precision_floor: When stagnated, the relative residual ``max r / ||A||``
            at which the residuals stopped: the products' own rounding as the Ritz
            vectors see it; ``None`` otherwise.
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
    stop_reason: str | None = None
    precision_floor: float | None = None

    def __post_init__(self) -> None:
        if self.stop_reason is None and self.converged:
            object.__setattr__(self, "stop_reason", "converged")

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
            "stop_reason": self.stop_reason,
            "precision_floor": self.precision_floor,
        }


def _order(values: Tensor, which: str) -> Tensor:
    """Most extreme first: descending (largest, both_ends), ascending (smallest), by |.|."""
    if which == "smallest":
        return torch.argsort(values)
    if which == "largest_magnitude":
        return torch.argsort(values.abs(), descending=True)
    return torch.argsort(values, descending=True)


@fixed_model_state()
def eigenvalues(
    A: Any,
    k: int = 5,
    which: str = "largest",
    tol: float = 1e-6,
    *,
    method: str = "lanczos",
    max_matvecs: int | None = None,
    max_basis: int | None = None,
    reorthogonalisation: str = "auto",
    seed: int | None = 0,
    return_vectors: bool = True,
    progress: Progress | None = None,
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
            largest Ritz value in magnitude seen). A ``tol`` below the precision
            of the products (measured during the run: about 3e-7 relative for
            clean float32 products, 1e-6 and more for float32 network Hessians
            through BatchNorm, LSTMs or a saturated softmax) cannot be reached:
            the run stops when the residuals stop
            improving, says ``converged=False, stop_reason="stagnated"`` with the
            ``precision_floor`` reached, and issues a
            :class:`~curvkit.CurvkitWarning`.
        method: ``"lanczos"`` (default) or ``"power"`` (deflated power
            iteration, ``which="largest_magnitude"`` only).
        max_matvecs: Budget of products (default ``max(300, 30 k)`` for Lanczos,
            see :func:`~curvkit.linalg.lanczos.default_max_matvecs`; ``1000 k`` for
            power iteration). When it runs out the result says ``converged=False``,
            ``stop_reason="budget"``, with the residuals reached.
        max_basis: Krylov basis size before a thick restart.
        reorthogonalisation: ``"auto"`` (partial while the products fit in memory,
            switching to full when the products prove too noisy for it; full
            otherwise), ``"full"`` or ``"partial"`` (see
            :mod:`curvkit.linalg.lanczos`). Lanczos only.
        seed: Seed of the starting vector (a CPU generator: same on every device;
            ``None``: fresh randomness).
        return_vectors: Keep the ``[P, k]`` eigenvectors in the result.
        progress: Called after each product with ``{"matvecs", "basis",
            "restarts", "residual", "reorthogonalisation"}`` (power iteration:
            ``{"matvecs", "eigenpair", "residual"}``): ``residual`` is the largest
            relative residual ``r / ||A||`` of the wanted pairs known so far, so a
            solve that does not progress shows it.

    Returns:
        An :class:`EigenResult`; values ordered most extreme first (descending for
        ``"largest"`` and ``"both_ends"``, ascending for ``"smallest"``, by
        decreasing magnitude for ``"largest_magnitude"``).

    Raises:
        CurvkitError: ``k`` is not an integer in ``1..P``, an unknown ``which``, ``method`` or
            ``reorthogonalisation``, a ``tol`` that is not a number in ``(0, 1)``,
            or a ``max_matvecs`` that is not an integer ``>= 1`` or ``None``.
        NonFiniteError: A product (or a value computed from it) is NaN or Inf; the
            message names the product.
        ShapeMismatchError: ``A`` is not a square operator.

    Example:
        >>> import torch, curvkit
        >>> A = curvkit.DenseOperator(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)))
        >>> res = curvkit.eigenvalues(A, k=2, tol=1e-10)
        >>> [round(v, 10) for v in res.values.tolist()], bool(res.residuals.max() < 1e-8)
        ([10.0, 9.0], True)
        >>> res.stop_reason
        'converged'
    """
    P = check_square(A)
    require_fixed_map(A, "eigenvalues")
    if which not in WHICH:
        raise CurvkitError(f"which must be one of {list(WHICH)}, got {which!r}")
    if method not in METHODS:
        raise CurvkitError(f"method must be one of {list(METHODS)}, got {method!r}")
    if reorthogonalisation not in REORTHOGONALISATION:
        raise CurvkitError(
            f"reorthogonalisation must be one of {list(REORTHOGONALISATION)}, got {reorthogonalisation!r}"
        )
    k = integer(k, "k")
    if k > P:
        raise CurvkitError(f"k must be between 1 and the operator's dimension {P}, got {k}")
    tol = relative_tolerance(tol, "tol")
    max_matvecs = integer(max_matvecs, "max_matvecs", allow_none=True)
    if "eigenvalues" in getattr(A, "STRUCTURE", ()) and method == "lanczos":
        return _from_structure(A, k, which, tol, return_vectors)
    passes_before = getattr(A, "data_passes", None)
    # the Krylov basis is kept in the operator's precision (at least float32): a float64
    # basis for a float32 operator doubles the memory traffic of reorthogonalisation,
    # the dominant cost next to the products, without making the products more exact
    work_dtype = torch.float32 if A.dtype in (torch.float16, torch.bfloat16) else A.dtype
    gen = probe_generator(seed)
    label = f"{'power iteration' if method == 'power' else 'Lanczos'} (eigenvalues, {which})"

    def matmat(M: Tensor) -> Tensor:
        return A.matmat(M.to(A.dtype)).to(work_dtype)

    if method == "power":
        if which != "largest_magnitude":
            raise CurvkitError(
                "power iteration finds largest-magnitude eigenvalues only; "
                "use which='largest_magnitude' or method='lanczos'"
            )
        values, vectors, used, iterations, exhausted = _deflated_power(
            matmat, P, k, tol, max_matvecs, gen, work_dtype, A.device, progress, label
        )
        radius = values.abs().max().item()
        products = None
        # not converged: a pair spent its share of the budget, or its Rayleigh quotient
        # stopped changing (PyHessian's rule) with the residual above tol
        stop_reason, floor = "budget" if exhausted else "stagnated", None
    else:
        v0 = gaussian(P, 1, gen, work_dtype, A.device)[:, 0]
        state = thick_restart_lanczos(
            lambda v: matmat(v.unsqueeze(1))[:, 0],
            P,
            k,
            which=which,
            tol=tol,
            max_basis=max_basis,
            max_matvecs=max_matvecs,
            v0=v0,
            dtype=work_dtype,
            device=A.device,
            progress=progress,
            reorthogonalisation=reorthogonalisation,
            name=label,
        )
        values, vectors, used, iterations = state.values, state.vectors, state.matvecs, state.restarts
        radius = state.spectral_radius
        products = state.products
        stop_reason, floor = state.stop_reason, state.precision_floor
    if products is None:  # certificates: one batched product for all k pairs
        products = matmat(vectors.contiguous())
        check_finite(products, used + 1, label)
        used += vectors.shape[1]
    residual = products - vectors * values
    residuals = residual.norm(dim=0)
    scale = max(radius, values.abs().max().item(), torch.finfo(A.dtype).tiny)
    converged = bool((residuals <= tol * scale).all())
    if converged:
        stop_reason, floor = "converged", None
    elif stop_reason == "converged":  # the estimates said so, the certificates do not
        stop_reason = "stagnated"
    if stop_reason == "stagnated" and method == "lanczos":
        floor = max(floor or 0.0, residuals.max().item() / scale)
        _warn_precision_floor(tol, floor, used, getattr(A, "product_dtype", A.dtype))
    return _ordered(
        A,
        values,
        vectors,
        residuals,
        return_vectors,
        passes_before,
        matvecs=used,
        converged=converged,
        which=which,
        method=method,
        tol=tol,
        restarts=iterations,
        stop_reason=stop_reason,
        precision_floor=floor,
    )


def _ordered(
    A: Any,
    values: Tensor,
    vectors: Tensor,
    residuals: Tensor,
    return_vectors: bool,
    passes_before: int | None,
    **fields: Any,
) -> EigenResult:
    """The result with its pairs in the order of ``which``, in the operator's dtype."""
    order = _order(values, fields["which"])
    passes_after = getattr(A, "data_passes", None)
    return EigenResult(
        values=values[order].to(A.dtype),
        vectors=vectors[:, order].to(A.dtype).contiguous() if return_vectors else None,
        residuals=residuals[order].to(A.dtype),
        data_passes=None if passes_before is None else passes_after - passes_before,
        **fields,
    )


def _from_structure(A: Any, k: int, which: str, tol: float, return_vectors: bool) -> EigenResult:
    """Exact eigenpairs from the operator's structure, certified by one product with them."""
    values, vectors = A.eigenvalues(k, which)
    passes_before = getattr(A, "data_passes", None)
    products = A.matmat(vectors.to(A.dtype).contiguous())
    check_finite(products, 1, "the certificates of the exact eigenpairs")
    residuals = (products - vectors * values).norm(dim=0)
    scale = max(values.abs().max().item(), torch.finfo(A.dtype).tiny)
    converged = bool((residuals <= tol * scale).all())
    return _ordered(
        A,
        values,
        vectors,
        residuals,
        return_vectors,
        passes_before,
        matvecs=vectors.shape[1],
        converged=converged,
        which=which,
        method="exact",
        tol=tol,
        restarts=0,
        stop_reason="converged" if converged else "stagnated",
        precision_floor=None if converged else residuals.max().item() / scale,
    )


def _warn_precision_floor(tol: float, floor: float, matvecs: int, dtype: torch.dtype) -> None:
    """One line naming the floor measured and the remedies (both spellings: :mod:`curvkit.remedies`)."""
    unit = 10.0 ** math.floor(math.log10(2 * floor))
    reachable = float(f"{math.ceil(2 * floor / unit) * unit:.1g}")  # twice the floor, rounded up
    warnings.warn(
        f"tol={tol:g} is below what {dtype} products can certify here: the residuals stopped at "
        f"{floor:.2g} relative to ||A||, the precision floor measured from the products' own "
        f"rounding, after {matvecs} products; converged=False. Use a float64 operator, "
        f"{setting('dtype', 'float64')}, or a tolerance of at least {reachable:g}, "
        f"{setting('tol', reachable)}",
        CurvkitWarning,
        stacklevel=4,  # here, eigenvalues, its fixed_model_state wrapper, the caller
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
    label: str,
) -> tuple[Tensor, Tensor, int, int, bool]:
    """Power iteration on ``A - sum_j lambda_j v_j v_j^T``, one eigenpair at a time.

    Stops each pair when the Rayleigh quotient changes by less than
    ``tol * |lambda|`` (PyHessian's rule), within an equal share of the budget.

    Returns:
        Values, vectors (columns), products, iterations, and whether a pair spent
        its whole share of the budget.
    """
    budget = max_matvecs or 1000 * k
    per_pair = max(budget // k, 2)
    values: list[Tensor] = []
    vectors: list[Tensor] = []
    used = iterations = 0
    exhausted = False
    for _ in range(k):
        v = gaussian(P, 1, gen, dtype, device)[:, 0]
        v = v / v.norm()
        lam = None
        for step in range(per_pair):
            w = matmat(v.unsqueeze(1))[:, 0]
            for lam_j, v_j in zip(values, vectors):
                w = w - lam_j * v_j * torch.dot(v_j, v)
            used += 1
            iterations += 1
            new = torch.dot(v, w)
            residual, norm = torch.stack([(w - new * v).norm(), w.norm()]).tolist()
            if not math.isfinite(norm):
                check_finite(w, used, label)  # names the product when it is the product
                raise non_finite_error(w, product_name(used, label))
            v = w / norm
            if progress is not None:
                found = (abs(lam_j.item()) for lam_j in values)
                radius = max(abs(new.item()), *found, torch.finfo(dtype).tiny)
                relative = float(f"{residual / radius:.3g}")
                progress({"matvecs": used, "eigenpair": len(values) + 1, "residual": relative})
            if lam is not None and (new - lam).abs() <= tol * new.abs():
                lam = new
                break
            lam = new
            exhausted = exhausted or step == per_pair - 1
        values.append(lam)
        vectors.append(v)
    return torch.stack(values), torch.stack(vectors, dim=1), used, iterations, exhausted
