"""Trace of a curvature operator: exact, or estimated from matrix-vector products.

Four methods, all fed by batched products ``A.matmat(M)`` (``batch_size``
columns per call, so ``m`` probes cost about ``m / batch_size`` passes over the
data, not ``m``):

``"hutchinson"``
    M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix
    for Laplacian smoothing splines", Commun. Stat. Simul. Comput. 18(3), 1989.
    With ``m`` Rademacher probes ``z_j``,

    .. math::
        \\hat t = \\frac1m \\sum_{j=1}^m z_j^\\top A z_j, \\qquad
        \\mathrm{se} = \\frac{s}{\\sqrt m},

    ``s`` the sample standard deviation of the ``m`` terms. Its variance is
    ``2 (||A||_F^2 - sum_i A_ii^2) / m``: the error falls only like ``1 / sqrt(m)``.

``"hutch++"``
    R. A. Meyer, C. Musco, C. Musco and D. P. Woodruff, "Hutch++: Optimal
    stochastic trace estimation", SOSA 2021, Algorithm 1. A sketch ``S`` with
    ``k`` Rademacher columns gives an orthonormal basis ``Q = qr(A S)`` of the
    dominant range of ``A``; the trace splits into an exact part on that range and
    a Hutchinson estimate on its complement, with Rademacher ``G`` (``g`` columns):

    .. math::
        \\hat t = \\mathrm{tr}(Q^\\top A Q)
        + \\frac1g \\sum_{j=1}^g \\tilde g_j^\\top A \\tilde g_j, \\qquad
        \\tilde g_j = (I - Q Q^\\top) g_j.

    The standard error is that of the second (Hutchinson) part; the first is a
    deterministic function of ``S`` and ``E[\\hat t | S] = tr(A)`` for every
    ``S``, so this is the estimator's whole error. When ``A`` has a decaying
    spectrum, the error falls like ``1 / m`` instead of ``1 / sqrt(m)``.

``"xtrace"``
    E. N. Epperly, J. A. Tropp and R. J. Webber, "XTrace: Making the most of every
    sample in stochastic trace estimation", SIAM J. Matrix Anal. Appl. 45(1), 2024,
    the XTrace algorithm with the *improved* (normalised) test vectors. Every one
    of ``k`` test vectors ``omega_i`` is used both in the sketch and as a Hutchinson
    probe, by leaving it out of the sketch in turn (the exchangeability
    principle): with ``Q_(i)`` an orthonormal basis of ``A Omega_{-i}`` and
    ``P_i = Q_(i) Q_(i)^T``,

    .. math::
        t_i = \\mathrm{tr}(Q_{(i)}^\\top A Q_{(i)})
        + c_i\\, \\omega_i^\\top (I - P_i) A (I - P_i) \\omega_i, \\qquad
        \\hat t = \\frac1k \\sum_{i=1}^k t_i, \\qquad
        \\mathrm{se} = \\frac{\\mathrm{std}(t_1, \\dots, t_k)}{\\sqrt k},

    where ``c_i = (P - k + 1) / ||(I - P_i) omega_i||^2`` rescales the projected
    probe to the norm of a uniform vector on the sphere of the complement (the
    paper's improved variant: each ``t_i`` is unbiased and the estimator is exact
    on matrices of rank below ``k``). All ``k`` leave-one-out quantities come from
    one QR factorisation ``A Omega = Q R``: ``Q_(i) Q_(i)^T = Q (I - s_i s_i^T)
    Q^T`` with ``s_i`` the normalised ``i``-th column of ``R^{-T}``, computed here
    through a pseudo-inverse so that rank-deficient sketches stay finite. The
    standard error is the paper's error estimate.

``"exact"``
    ``sum_i e_i^T A e_i`` from products with blocks of basis vectors (``P``
    products, ``P / batch_size`` passes), or from ``A.diagonal()`` when the
    operator offers its exact diagonal (no products). Standard error 0.

Budget accounting, for a budget of ``m = matvecs`` products (columns):

=============  ==========================================================  ============
method         products                                                    minimum ``m``
=============  ==========================================================  ============
hutchinson     ``m`` probes                                                1
hutch++        ``k = m // 3`` sketch, ``k`` for ``A Q``, ``m - 2k`` probes  3
xtrace         ``k = m // 2`` test vectors, each costs 2 (``A Omega``,      2
               ``A Q``): ``2k`` (``m - 1`` when ``m`` is odd)
exact          ``P`` (0 with ``A.diagonal()``); ``matvecs`` is ignored      --
=============  ==========================================================  ============

When ``matvecs >= P`` and the operator is deterministic (not ``STOCHASTIC``),
``"hutch++"`` and ``"xtrace"`` compute the exact trace with ``P`` products
instead: no sketch of at most ``m`` products can do better, and the result says
``method="exact"``, ``stderr=0``. (curvlinops refuses such budgets.)
``"hutchinson"`` always stays the plain estimator, for parity with PyHessian.
On a ``STOCHASTIC`` operator the sketching methods keep estimating, with sketches
of at most ``P`` columns (so XTrace then uses at most ``2P`` products).

Probes come from a CPU :class:`torch.Generator` seeded with ``seed`` and are drawn
one column at a time, so the estimate depends on the seed but not on the device
or on ``batch_size`` (up to rounding).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from numbers import Integral
from typing import Any

import torch
from torch import Tensor

from curvkit.errors import CurvkitError
from curvkit.linalg._common import Progress, check_square, gaussian, probe_generator, rademacher

__all__ = ["METHODS", "TraceResult", "trace"]

METHODS = ("hutchinson", "hutch++", "xtrace", "exact")
"""The methods :func:`trace` accepts."""

MIN_MATVECS = {"hutchinson": 1, "hutch++": 3, "xtrace": 2}
"""The smallest budget each stochastic method can run with."""

DEFAULT_BATCH_SIZE = 64
"""Columns per product when ``batch_size`` is ``None`` (bounds the memory of one pass)."""


@dataclass(frozen=True)
class TraceResult:
    """A trace estimate and what it cost.

    Attributes:
        estimate: The trace (estimate).
        stderr: Its estimated standard error (0 for the exact trace; ``nan`` when a
            stochastic method had a single sample to estimate it from).
        method: The method that produced it: one of :data:`METHODS` (``"exact"``
            also when a stochastic method's budget covered the whole space).
        matvecs: Products with ``A`` actually used (columns multiplied).
        data_passes: Passes over the data during the call, from the operator's
            ``data_passes`` counter (``None`` for operators without one).
        seed: The seed of the probes (``None`` was taken as 0).
    """

    estimate: float
    stderr: float
    method: str
    matvecs: int
    data_passes: int | None
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain Python ``float``/``int``/``str`` (``data_passes`` may be ``None``)."""
        return asdict(self)


class _Products:
    """Applies ``A`` to blocks of columns, counting products and reporting progress."""

    def __init__(self, A: Any, batch_size: int, total: int, progress: Progress | None):
        self.A = A
        self.batch_size = batch_size
        self.total = total
        self.progress = progress
        self.matvecs = 0

    def __call__(self, M: Tensor, stage: str) -> Tensor:
        out = []
        for start in range(0, M.shape[1], self.batch_size):
            block = M[:, start : start + self.batch_size]
            out.append(self.A.matmat(block).detach())
            self.matvecs += block.shape[1]
            self._report(stage)
        return torch.cat(out, dim=1) if len(out) > 1 else out[0]

    def _report(self, stage: str) -> None:
        if self.progress is not None:
            self.progress({"matvecs": self.matvecs, "total": self.total, "stage": stage})


def _draw(kind: str, P: int, K: int, gen: torch.Generator, dtype: torch.dtype, device: Any) -> Tensor:
    """``[P, K]`` probes, one column at a time (so blocks of any size give the same columns)."""
    draw = rademacher if kind == "rademacher" else gaussian
    if K == 0:
        return torch.zeros(P, 0, dtype=dtype, device=device)
    return torch.cat([draw(P, 1, gen, dtype, device) for _ in range(K)], dim=1)


def _mean_and_stderr(samples: Tensor) -> tuple[float, float]:
    """Mean and ``std / sqrt(n)`` (``nan`` for a single sample) of a 1-d tensor, in float64."""
    samples = samples.to(torch.float64)
    n = samples.numel()
    mean = samples.mean().item()
    stderr = samples.std(correction=1).item() / math.sqrt(n) if n > 1 else math.nan
    return mean, stderr


def _hutchinson_sum(
    apply: _Products, P: int, m: int, gen: torch.Generator, dtype: torch.dtype, device: Any, Q: Tensor | None
) -> Tensor:
    """The ``m`` terms ``z^T A z`` (``z`` Rademacher, projected off ``Q`` when given), block by block."""
    terms = []
    for start in range(0, m, apply.batch_size):
        Z = _draw("rademacher", P, min(apply.batch_size, m - start), gen, dtype, device)
        if Q is not None:
            Z = Z - Q @ (Q.T @ Z)
        terms.append((Z * apply(Z, "probes")).sum(dim=0))
    return torch.cat(terms)


def _hutchinson(
    apply: _Products, P: int, m: int, gen: torch.Generator, dtype: torch.dtype, device: Any
) -> tuple[float, float]:
    return _mean_and_stderr(_hutchinson_sum(apply, P, m, gen, dtype, device, None))


def _hutch_plus_plus(
    apply: _Products, P: int, m: int, gen: torch.Generator, dtype: torch.dtype, device: Any
) -> tuple[float, float]:
    k = min(m // 3, P)
    S = _draw("rademacher", P, k, gen, dtype, device)
    Q, _ = torch.linalg.qr(apply(S, "sketch"))
    exact_part = (Q * apply(Q, "projection")).sum().to(torch.float64).item()
    residual, stderr = _mean_and_stderr(_hutchinson_sum(apply, P, m - 2 * k, gen, dtype, device, Q))
    return exact_part + residual, stderr


def _xtrace(
    apply: _Products, P: int, m: int, gen: torch.Generator, dtype: torch.dtype, device: Any
) -> tuple[float, float]:
    k = min(m // 2, P)
    Om = _draw("gaussian", P, k, gen, dtype, device)
    Om = Om * (math.sqrt(P) / Om.norm(dim=0))  # uniform on the sphere of radius sqrt(P)
    Y = apply(Om, "sketch")
    Q, R = torch.linalg.qr(Y)
    Z = apply(Q, "projection")
    H = Q.T @ Z  # Q^T A Q
    W = Q.T @ Om
    # s_i: the unit vector (in Q's coordinates) orthogonal to every column of R but
    # the i-th, i.e. the normalised columns of R^{-T} = U diag(1/sigma) V^T, with the
    # singular values floored so that a rank-deficient sketch (A of rank < k) gives
    # directions outside the range of A instead of infinities.
    U, sigma, Vh = torch.linalg.svd(R)
    floor = max(sigma.max().item() * k * torch.finfo(dtype).eps, torch.finfo(dtype).tiny)
    S = (U / sigma.clamp_min(floor)) @ Vh
    S = S / S.norm(dim=0)
    # P_i omega_i = Q B_i with B_i = W_i - s_i (s_i^T W_i); V_i = (I - P_i) omega_i.
    B = W - S * (S * W).sum(dim=0)
    V = Om - Q @ B
    AV = Y - Z @ B
    norm2 = (V * V).sum(dim=0).clamp_min(torch.finfo(dtype).tiny)
    residual = (V * AV).sum(dim=0) * ((P - k + 1) / norm2)
    in_sketch = torch.diagonal(H).sum() - (S * (H @ S)).sum(dim=0)
    return _mean_and_stderr(in_sketch + residual)


def _exact(
    A: Any, apply: _Products, P: int, dtype: torch.dtype, device: Any, progress: Progress | None
) -> float:
    diagonal = getattr(A, "diagonal", None)
    if callable(diagonal):
        value = diagonal().sum().to(torch.float64).item()
        if progress is not None:
            progress({"matvecs": 0, "total": 0, "stage": "diagonal"})
        return value
    if getattr(A, "STOCHASTIC", False):
        raise CurvkitError(
            f"method 'exact' needs a deterministic operator, but {type(A).__name__} is STOCHASTIC "
            "(its products are Monte-Carlo samples); use 'hutch++' or 'xtrace' for an estimate "
            "with a standard error"
        )
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, P, apply.batch_size):
        stop = min(start + apply.batch_size, P)
        rows = torch.arange(start, stop, device=device)
        cols = torch.arange(stop - start, device=device)
        E = torch.zeros(P, stop - start, dtype=dtype, device=device)
        E[rows, cols] = 1
        total += apply(E, "basis")[rows, cols].to(torch.float64).sum()
    return total.item()


def _check_arguments(method: Any, matvecs: Any, batch_size: Any) -> str:
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise CurvkitError(f"unknown trace method {method!r}; choose one of {', '.join(METHODS)}")
    method = method.lower()
    if isinstance(batch_size, bool) or not (batch_size is None or isinstance(batch_size, Integral)):
        raise CurvkitError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    if batch_size is not None and batch_size < 1:
        raise CurvkitError(f"batch_size must be a positive integer or None, got {batch_size}")
    if method == "exact":
        return method
    if isinstance(matvecs, bool) or not isinstance(matvecs, Integral):
        raise CurvkitError(f"matvecs must be an integer, got {matvecs!r}")
    if matvecs < MIN_MATVECS[method]:
        raise CurvkitError(f"trace method {method!r} needs matvecs >= {MIN_MATVECS[method]}, got {matvecs}")
    return method


def trace(
    A: Any,
    method: str = "hutch++",
    matvecs: int = 300,
    seed: int | None = 0,
    batch_size: int | None = None,
    progress: Progress | None = None,
) -> TraceResult:
    """The trace of a square operator, exact or estimated with a budget of products.

    See the module documentation for the estimators, the papers they come from
    and how each spends the budget.

    Args:
        A: A :class:`~curvkit.CurvatureOperator` (or anything with ``shape``,
            ``matmat``, ``dtype``, ``device``), e.g. ``H.restrict("fc1")``. It need
            not be symmetric.
        method: ``"hutchinson"``, ``"hutch++"`` (default), ``"xtrace"`` or ``"exact"``.
        matvecs: Budget of products with ``A`` (columns), used exactly by
            ``"hutchinson"`` and ``"hutch++"`` and up to one less by ``"xtrace"``;
            ignored by ``"exact"``. With ``matvecs >= P`` on a deterministic
            operator, ``"hutch++"`` and ``"xtrace"`` return the exact trace at
            ``P`` products.
        seed: Seed of the probes (a CPU generator, so the same on every device;
            ``None`` means 0).
        batch_size: Columns per ``A.matmat`` call, i.e. per pass over the data
            (default: all columns of a stage, at most 64). Peak memory is about
            ``P * batch_size`` numbers for the products, plus ``P * k`` for the
            ``k``-column sketches of Hutch++ and XTrace.
        progress: Called after every block of products with
            ``{"matvecs": done, "total": planned, "stage": ...}``.

    Returns:
        A :class:`TraceResult`.

    Raises:
        ShapeMismatchError: ``A`` is not a square operator.
        CurvkitError: Unknown method, a budget below the method's minimum (1 for
            Hutchinson, 3 for Hutch++, 2 for XTrace), a bad ``batch_size``, or
            ``"exact"`` on a ``STOCHASTIC`` operator without ``diagonal()``.

    Example:
        The exact trace of a diagonal matrix, and Hutch++ on a rank-2 matrix,
        which its sketch captures exactly:

        >>> import torch, curvkit
        >>> from curvkit.linalg.trace import trace
        >>> D = curvkit.DenseOperator(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)))
        >>> res = trace(D, method="exact")
        >>> res.estimate, res.stderr, res.matvecs
        (55.0, 0.0, 10)
        >>> u = torch.arange(1.0, 31.0, dtype=torch.float64).reshape(2, 15).T
        >>> L = curvkit.DenseOperator(u @ u.T)  # trace = ||u||_F^2 = 9455
        >>> res = trace(L, method="hutch++", matvecs=9, seed=1)
        >>> round(res.estimate, 6), res.matvecs
        (9455.0, 9)
    """
    P = check_square(A)
    method = _check_arguments(method, matvecs, batch_size)
    dtype = getattr(A, "dtype", torch.float64)
    device = getattr(A, "device", torch.device("cpu"))
    seed = 0 if seed is None else int(seed)
    passes_before = getattr(A, "data_passes", None)

    stochastic_op = bool(getattr(A, "STOCHASTIC", False))
    if method in ("hutch++", "xtrace") and matvecs >= P and not stochastic_op:
        method = "exact"
    if method == "exact":
        total = P
    elif method == "xtrace":
        total = 2 * min(matvecs // 2, P)
    else:
        total = matvecs
    block = batch_size if batch_size is not None else DEFAULT_BATCH_SIZE
    apply = _Products(A, max(1, min(block, max(total, 1))), total, progress)

    # No torch.no_grad(): operators built on autograd may rely on the ambient grad
    # mode; the products are detached instead.
    if method == "exact":
        estimate, stderr = _exact(A, apply, P, dtype, device, progress), 0.0
    else:
        gen = probe_generator(seed)
        run = {"hutchinson": _hutchinson, "hutch++": _hutch_plus_plus, "xtrace": _xtrace}[method]
        estimate, stderr = run(apply, P, matvecs, gen, dtype, device)

    passes_after = getattr(A, "data_passes", None)
    passes = None if passes_before is None or passes_after is None else int(passes_after - passes_before)
    return TraceResult(
        estimate=float(estimate),
        stderr=float(stderr),
        method=method,
        matvecs=int(apply.matvecs),
        data_passes=passes,
        seed=seed,
    )
