"""The diagonal of a curvature operator: exact, or estimated from matrix-vector products.

``"exact"``
    ``A.diagonal()`` through the operator contract when the operator's diagonal
    is cheap (``CHEAP_DIAGONAL``: a dense matrix, ``scale * I``, the ``ggn``,
    ``fisher`` and ``empirical-fisher`` estimators, sums and scalings of them;
    no products), otherwise the entries ``e_i^T A e_i`` of products with blocks
    of basis vectors (``P`` products, ``P / batch_size`` calls). Standard error 0.

``"hutchinson"``
    C. Bekas, E. Kokiopoulou and Y. Saad, "An estimator for the diagonal of a
    matrix", Applied Numerical Mathematics 57(11-12), 2007: with ``m``
    Rademacher probes ``z_j``,

    .. math::
        \\hat d = \\frac1m \\sum_{j=1}^m z_j \\odot (A z_j), \\qquad
        \\mathrm{se}_i = \\frac{s_i}{\\sqrt m},

    ``s_i`` the sample standard deviation of the ``m`` terms of entry ``i``.
    Entry ``i`` of a term is ``A_ii + sum_{k != i} A_ik z_i z_k``: unbiased, as
    ``E[z_i z_k] = delta_ik``, with variance ``sum_{k != i} A_ik^2``, so the error
    falls like ``1 / sqrt(m)`` relative to the off-diagonal mass of the row (a
    nearly diagonal matrix is estimated well, a dense one poorly). It uses
    exactly ``m`` products; Rademacher probes make ``z_j \\odot z_j = 1``, so no
    normalisation by ``sum_j z_j \\odot z_j`` is needed.

Probes come from a CPU :class:`torch.Generator` seeded with ``seed`` and are drawn
one column at a time, as for :func:`curvkit.trace`, so the estimate depends on the
seed but not on the device or on ``batch_size`` (up to rounding). The running
mean and variance are kept in float64 (Welford's update, combined block by block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvkit.errors import CurvkitError
from curvkit.linalg._common import (
    Products,
    Progress,
    check_batch_size,
    check_matvecs,
    check_square,
    draw_probes,
    exact_diagonal,
    probe_generator,
)
from curvkit.snapshot import fixed_model_state

__all__ = ["DIAGONAL_METHODS", "DiagonalResult", "diagonal"]

DIAGONAL_METHODS = ("hutchinson", "exact")
"""The methods :func:`diagonal` accepts."""

DEFAULT_BATCH_SIZE = 64
"""Columns per product when ``batch_size`` is ``None``."""


@dataclass(frozen=True)
class DiagonalResult:
    """A diagonal estimate and what it cost.

    Attributes:
        estimate: The ``[P]`` diagonal (estimate), in the operator's dtype and on
            its device.
        stderr: The ``[P]`` standard errors of its entries (zeros for the exact
            diagonal; ``nan`` for Hutchinson with a single probe).
        method: ``"hutchinson"`` or ``"exact"``.
        matvecs: Products with ``A`` used (columns multiplied; 0 for a cheap
            exact diagonal).
        seed: The seed of the probes (the one drawn, when ``None`` was given).
    """

    estimate: Tensor
    stderr: Tensor
    method: str
    matvecs: int
    seed: int


class _RunningMoments:
    """Per-entry mean and sum of squared deviations, updated a block of samples at a time."""

    def __init__(self, P: int, device: Any):
        self.n = 0
        self.mean = torch.zeros(P, dtype=torch.float64, device=device)
        self.squares = torch.zeros(P, dtype=torch.float64, device=device)

    def add(self, samples: Tensor) -> None:
        """Add the columns of a ``[P, b]`` block (Chan, Golub and LeVeque's pairwise update)."""
        samples = samples.to(torch.float64)
        b = samples.shape[1]
        mean = samples.mean(dim=1)
        squares = (samples - mean[:, None]).square().sum(dim=1)
        total = self.n + b
        delta = mean - self.mean
        self.mean += delta * (b / total)
        self.squares += squares + delta.square() * (self.n * b / total)
        self.n = total

    def stderr(self) -> Tensor:
        if self.n < 2:
            return torch.full_like(self.mean, math.nan)
        return (self.squares / (self.n - 1)).sqrt() / math.sqrt(self.n)


@fixed_model_state()
def diagonal(
    A: Any,
    method: str = "hutchinson",
    matvecs: int = 100,
    seed: int | None = 0,
    batch_size: int | None = None,
    progress: Progress | None = None,
) -> DiagonalResult:
    """The diagonal of a square operator, exact or estimated with a budget of products.

    Args:
        A: A :class:`~curvkit.CurvatureOperator` (or anything with ``shape``,
            ``matmat``, ``dtype``, ``device``).
        method: ``"hutchinson"`` (default) or ``"exact"`` (see the module
            documentation).
        matvecs: Probes of ``"hutchinson"`` (its products); ignored by ``"exact"``.
        seed: Seed of the probes (``None``: fresh randomness, the seed drawn is in
            the result).
        batch_size: Columns per ``A.matmat`` call, i.e. per pass over the data
            (default: at most 64).
        progress: Called after every block of products with
            ``{"matvecs": done, "total": planned, "stage": ...}``.

    Returns:
        A :class:`DiagonalResult`.

    Raises:
        ShapeMismatchError: ``A`` is not a square operator.
        CurvkitError: Unknown method, ``matvecs < 1``, a bad ``batch_size``, or
            ``"exact"`` on an operator that resamples on every product.
        NonFiniteError: A product (or the operator's diagonal) holds a NaN or an Inf.

    Example:
        >>> import torch, curvkit
        >>> M = torch.tensor([[4.0, 1.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
        >>> curvkit.diagonal(curvkit.DenseOperator(M), method="exact").estimate
        tensor([4., 3., 2.], dtype=torch.float64)
        >>> res = curvkit.diagonal(curvkit.DenseOperator(M), matvecs=1000, seed=0)
        >>> bool(((res.estimate - M.diagonal()).abs() < 4 * res.stderr + 1e-12).all()), res.stderr[2].item()
        (True, 0.0)

        (The third row has no off-diagonal entry: every probe gives it exactly.)
    """
    P = check_square(A)
    if not isinstance(method, str) or method.lower() not in DIAGONAL_METHODS:
        raise CurvkitError(f"unknown diagonal method {method!r}; choose one of {', '.join(DIAGONAL_METHODS)}")
    method = method.lower()
    check_batch_size(batch_size)
    if method == "hutchinson":
        check_matvecs(matvecs, 1, "diagonal method 'hutchinson'")
    dtype = getattr(A, "dtype", torch.float64)
    device = getattr(A, "device", torch.device("cpu"))
    generator = probe_generator(seed)
    total = P if method == "exact" else matvecs
    block = batch_size if batch_size is not None else DEFAULT_BATCH_SIZE
    apply = Products(A, max(1, min(block, max(total, 1))), total, progress, "the diagonal estimate", method)

    if method == "exact":
        estimate = exact_diagonal(A, apply, P, dtype, device, "diagonal", "'hutchinson'")
        stderr = torch.zeros_like(estimate)
    else:
        moments = _RunningMoments(P, device)
        for start in range(0, matvecs, apply.batch_size):
            Z = draw_probes("rademacher", P, min(apply.batch_size, matvecs - start), generator, dtype, device)
            moments.add(Z * apply(Z, "probes"))
        estimate, stderr = moments.mean.to(dtype), moments.stderr().to(dtype)
    return DiagonalResult(estimate, stderr, method, int(apply.matvecs), generator.initial_seed())
