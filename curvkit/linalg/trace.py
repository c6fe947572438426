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
    operator's diagonal is cheap (``CHEAP_DIAGONAL`` of the operator contract: a
    dense matrix, the Gauss-Newton and Fisher estimators; no products).
    Standard error 0.

Adaptive fallback (``adaptive=True``, the default)
    A sketch only pays for itself when ``A`` has a decaying spectrum; on a flat
    one Hutch++ and XTrace spend half or two thirds of the budget on a sketch
    that captures little, and are *worse* than Hutchinson with all ``m``
    products (measured at ``m = 99`` on a freshly initialised MLP, P = 109,386,
    whose 33-column sketch misses 99% of ``||H||_F^2``). So after the sketch
    products ``Y = A S`` (``k`` columns, Rademacher for Hutch++, the normalised
    test vectors for XTrace), and before any other product, the estimators ask
    whether continuing can beat Hutchinson:

    1. *The mass the sketch misses*, by leave-one-out (the matrix jackknife of
       E. N. Epperly and J. A. Tropp, "Efficient error and variance estimation
       for randomized matrix computations", SIAM J. Sci. Comput. 46(1), 2024):
       with ``P_{-i}`` the orthogonal projector onto the other ``k - 1``
       columns of ``Y``,

       .. math::
           \\hat\\rho = \\frac{\\sum_{i=1}^k \\|(I - P_{-i}) A s_i\\|^2}
                            {\\sum_{i=1}^k \\|A s_i\\|^2}.

       As ``E[s s^T] = I``, ``E ||A s||^2 = ||A||_F^2``, and as ``s_i`` is
       independent of ``P_{-i}``, ``E ||(I - P_{-i}) A s_i||^2 = E ||(I -
       P_{k-1}) A||_F^2``: ``rho`` estimates the fraction of ``||A||_F^2`` that
       a sketch of ``k - 1`` columns leaves out, with no new product. From one
       QR factorisation ``Y = Q R``, ``||(I - P_{-i}) y_i|| = |s_i^T r_i| = 1 /
       ||e_i^T R^{-1}||``, with ``s_i`` XTrace's leave-one-out direction below.
       The result reports ``sketch_mass = 1 - rho``.

    2. *A variance model.* For a Gaussian probe ``z``, ``Var(z^T B z) = 2
       ||B||_F^2`` for symmetric ``B``; Rademacher and sphere probes give at
       most that. Hutchinson with ``m`` probes has variance about ``2
       ||A||_F^2 / m``. Hutch++ is Hutchinson with ``g = m - 2k`` probes on
       ``(I - Q Q^T) A (I - Q Q^T)``, whose squared Frobenius norm is at most
       ``||(I - Q Q^T) A||_F^2``, about ``rho ||A||_F^2`` (a little less: ``Q``
       has ``k`` columns, not ``k - 1``): variance about ``2 rho ||A||_F^2 /
       g``. XTrace averages ``k`` such estimates, each with one probe against a
       ``(k - 1)``-column sketch, the very residuals that ``rho`` sums:
       variance about ``2 rho ||A||_F^2 / k`` (its own error estimate,
       ``std(t_i) / sqrt(k)``, makes the same approximation that the ``t_i``
       are uncorrelated). The sketch is kept if and only if

       .. math::
           \\hat\\rho < \\frac{g}{m} \\ (\\text{Hutch++},\\ 1/3 \\text{ at } m = 3k),
           \\qquad \\hat\\rho < \\frac{k}{m} \\ (\\text{XTrace},\\ 1/2 \\text{ at } m = 2k).

       The thresholds come from the model, not from tuning; the model leans
       towards the fallback (``rho`` is measured for ``k - 1`` columns and for
       the one-sided residual ``(I - P) A``), and near a threshold both choices
       have about the same variance, so a call swayed by the noise in ``rho``
       costs little. Measured at ``m = 99`` on the benchmark MLP: freshly
       initialised, ``rho = 0.99`` (Hutch++ sketch) and 0.98 (XTrace), far above
       the thresholds; the published XTrace's error is 1.36 times Hutchinson's
       (mean absolute error, 10 seeds), the model says ``sqrt(0.98 * 99 / 49) =
       1.4``; the published Hutch++ reports a standard error 1.7 times
       Hutchinson's, the model says ``sqrt(0.99 * 99 / 33) = 1.7``. After
       training, ``rho = 0.07`` and 0.06, far below.

    3. *The fallback.* Each sketch product is itself a Hutchinson sample,
       ``s_i^T (A s_i)``, unbiased as ``E[s s^T] = I``. The estimate is the mean
       of those ``k`` samples and of ``m - k`` fresh Rademacher probes, with
       ``stderr = std / sqrt(m)`` over the ``m`` samples: Hutchinson with the
       whole budget (``m`` products, also for XTrace at odd ``m``). For Hutch++
       the sketch and the fresh probes are the very columns that
       ``"hutchinson"`` draws with the same seed, so the fallback returns its
       estimate. The result says ``method="hutchinson"``, ``fallback=True``.

    *Selection effect.* The decision depends on the sketch whose samples the
    fallback reuses, so the adaptive estimators are not exactly unbiased.
    Hutch++ is unbiased conditionally on ``S``, so its bias is ``(k / m)
    Cov(1[fallback], mean_i s_i^T A s_i)``: by Cauchy-Schwarz at most ``(1/2)
    sqrt(k / m)`` times Hutchinson's standard deviation (0.29 at ``k = m /
    3``). XTrace is a function of its sketch, and adds ``Cov(1[kept], XTrace
    estimate)``. Both vanish when the decision is clear-cut, which it is unless
    ``rho`` lies within a few hundredths of the threshold. Measured over 2000
    seeds on spectra ``lambda_i = i^-a`` (P = 200, m = 99) with ``a`` chosen
    so that the decision is nearly a coin toss: a bias of -0.13 (Hutch++, ``a
    = 0.6``, 75% fall back) and -0.25 (XTrace, ``a = 0.43``, 58%) times
    Hutchinson's standard deviation, negative because a sketch that happens to
    miss the dominant directions both raises ``rho`` and has small quadratic
    forms; the mean squared errors stay below Hutchinson's (0.81 and 0.76 of
    it), though above the published algorithms' (0.56 and 0.62): in that band
    the conservative model gives away part of the gain. At ``a = 0.58`` (96%
    fall back) and ``a = 0.47`` (none do) the bias is within Monte-Carlo error
    (0.02).

    *Limitation.* With Rademacher probes Hutchinson's variance is ``2 (||A||_F^2
    - sum_i A_ii^2) / m``: a matrix whose Frobenius mass sits on an uneven
    diagonal (nearly diagonal) is estimated better by plain Hutchinson, which
    the model does not see. For network Hessians the diagonal holds little of
    ``||H||_F^2`` (0.2% on the fresh benchmark MLP, 2.5% trained). A large
    constant part ``c I`` of ``A``, which Rademacher and sphere probes cancel,
    only makes the rule more cautious: under the model it cannot make it keep
    a sketch that loses.

    ``adaptive=False`` runs the textbook algorithms exactly as published.

Budget accounting, for a budget of ``m = matvecs`` products (columns):

=============  ==========================================================  ============
method         products                                                    minimum ``m``
=============  ==========================================================  ============
hutchinson     ``m`` probes                                                1
hutch++        ``k = m // 3`` sketch, ``k`` for ``A Q``, ``m - 2k`` probes  3
               (fallback: ``k`` sketch, ``m - k`` probes)
xtrace         ``k = m // 2`` test vectors, each costs 2 (``A Omega``,      2
               ``A Q``): ``2k`` (``m - 1`` when ``m`` is odd)
               (fallback: ``k`` test vectors, ``m - k`` probes)
exact          ``P`` (0 with a cheap ``A.diagonal()``); ``matvecs`` ignored --
=============  ==========================================================  ============

When ``matvecs >= P`` and the operator is a fixed linear map (not ``RESAMPLES``),
``"hutch++"`` and ``"xtrace"`` compute the exact trace with ``P`` products
instead: no sketch of at most ``m`` products can do better, and the result says
``method="exact"``, ``stderr=0``. (curvlinops refuses such budgets.)
``"hutchinson"`` always stays the plain estimator, for parity with PyHessian.
On an operator that resamples on every product (``RESAMPLES``) the sketching
methods keep estimating, with sketches of at most ``P`` columns (so XTrace then
uses at most ``2P`` products). A Monte-Carlo estimator with a seed
(``STOCHASTIC`` alone) is a fixed map: its trace is exact like any other's.

Probes come from a CPU :class:`torch.Generator` seeded with ``seed`` and are drawn
one column at a time, so the estimate depends on the seed but not on the device
or on ``batch_size`` (up to rounding).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

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
            also when a stochastic method's budget covered the whole space,
            ``"hutchinson"`` also when adaptive Hutch++ or XTrace fell back).
        matvecs: Products with ``A`` actually used (columns multiplied).
        data_passes: Passes over the data during the call, from the operator's
            ``data_passes`` counter (``None`` for operators without one).
        seed: The seed of the probes (the one drawn, when ``None`` was given).
        fallback: ``True`` when adaptive Hutch++ or XTrace judged that its sketch
            would not beat Hutchinson and returned Hutchinson's estimate from the
            whole budget instead (``method`` is then ``"hutchinson"``).
        sketch_mass: For Hutch++ and XTrace (adaptive or not), the estimated
            fraction of ``||A||_F^2`` that the sketch captures, ``1 - rho`` by
            leave-one-out (see the module documentation); ``None`` for the other
            methods.
        structured: ``True`` when the trace came from the operator's structure
            (``"trace"`` in its ``STRUCTURE``, e.g. Kronecker factors): exact, no
            products, whatever method was asked for.
    """

    estimate: float
    stderr: float
    method: str
    matvecs: int
    data_passes: int | None
    seed: int
    fallback: bool = False
    sketch_mass: float | None = None
    structured: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain Python ``float``/``int``/``str``/``bool`` (``data_passes`` and
        ``sketch_mass`` may be ``None``)."""
        return asdict(self)


class _Outcome(NamedTuple):
    """What a stochastic estimator returns to :func:`trace`."""

    estimate: float
    stderr: float
    method: str
    fallback: bool = False
    sketch_mass: float | None = None


def _mean_and_stderr(samples: Tensor) -> tuple[float, float]:
    """Mean and ``std / sqrt(n)`` (``nan`` for a single sample) of a 1-d tensor, in float64."""
    samples = samples.to(torch.float64)
    n = samples.numel()
    mean = samples.mean().item()
    stderr = samples.std(correction=1).item() / math.sqrt(n) if n > 1 else math.nan
    return mean, stderr


def _hutchinson_sum(
    apply: Products, P: int, m: int, gen: torch.Generator, dtype: torch.dtype, device: Any, Q: Tensor | None
) -> Tensor:
    """The ``m`` terms ``z^T A z`` (``z`` Rademacher, projected off ``Q`` when given), block by block."""
    terms = []
    for start in range(0, m, apply.batch_size):
        Z = draw_probes("rademacher", P, min(apply.batch_size, m - start), gen, dtype, device)
        if Q is not None:
            Z = Z - Q @ (Q.T @ Z)
        terms.append((Z * apply(Z, "probes")).sum(dim=0))
    return torch.cat(terms)


def _hutchinson(
    apply: Products, P: int, m: int, gen: torch.Generator, dtype: torch.dtype, device: Any
) -> _Outcome:
    return _Outcome(*_mean_and_stderr(_hutchinson_sum(apply, P, m, gen, dtype, device, None)), "hutchinson")


def _leave_one_out_directions(R: Tensor, dtype: torch.dtype) -> Tensor:
    """The unit vectors ``s_i`` orthogonal to every column of ``R`` but the ``i``-th.

    They are the normalised columns of ``R^{-T} = U diag(1/sigma) V^T``, with the
    singular values floored so that a rank-deficient sketch (``A`` of rank below
    ``k``) gives directions outside the range of ``A`` instead of infinities.
    """
    k = R.shape[1]
    U, sigma, Vh = torch.linalg.svd(R)
    floor = max(sigma.max().item() * k * torch.finfo(dtype).eps, torch.finfo(dtype).tiny)
    S = (U / sigma.clamp_min(floor)) @ Vh
    return S / S.norm(dim=0)


def _missed_fraction(R: Tensor, S: Tensor) -> float:
    """``rho``: the leave-one-out fraction of ``||A||_F^2`` outside the sketch ``Y = Q R``.

    ``||(I - P_{-i}) y_i|| = |s_i^T r_i|`` for the directions ``S`` of
    :func:`_leave_one_out_directions`; ``sum_i ||y_i||^2 = ||R||_F^2``.
    """
    R = R.to(torch.float64)
    total = (R * R).sum().item()
    if total == 0.0:
        return 0.0  # A S = 0: no sign of any mass to miss
    rho = (S.to(torch.float64) * R).sum(dim=0).pow(2).sum().item() / total
    return min(max(rho, 0.0), 1.0) if math.isfinite(rho) else 1.0


def _fallback(
    apply: Products,
    P: int,
    m: int,
    gen: torch.Generator,
    dtype: torch.dtype,
    device: Any,
    sketch_terms: Tensor,
    rho: float,
) -> _Outcome:
    """Hutchinson from the sketch's ``k`` quadratic forms and ``m - k`` fresh probes."""
    fresh = m - sketch_terms.numel()
    apply.total = apply.matvecs + fresh
    terms = torch.cat([sketch_terms, _hutchinson_sum(apply, P, fresh, gen, dtype, device, None)])
    return _Outcome(*_mean_and_stderr(terms), "hutchinson", True, 1.0 - rho)


def _hutch_plus_plus(
    apply: Products, P: int, m: int, gen: torch.Generator, dtype: torch.dtype, device: Any, adaptive: bool
) -> _Outcome:
    k = min(m // 3, P)
    g = m - 2 * k
    S = draw_probes("rademacher", P, k, gen, dtype, device)
    Y = apply(S, "sketch")
    Q, R = torch.linalg.qr(Y)
    rho = _missed_fraction(R, _leave_one_out_directions(R, dtype))
    if adaptive and rho * m >= g:  # 2 rho ||A||_F^2 / g >= 2 ||A||_F^2 / m
        return _fallback(apply, P, m, gen, dtype, device, (S * Y).sum(dim=0), rho)
    exact_part = (Q * apply(Q, "projection")).sum().to(torch.float64).item()
    residual, stderr = _mean_and_stderr(_hutchinson_sum(apply, P, g, gen, dtype, device, Q))
    return _Outcome(exact_part + residual, stderr, "hutch++", False, 1.0 - rho)


def _xtrace(
    apply: Products, P: int, m: int, gen: torch.Generator, dtype: torch.dtype, device: Any, adaptive: bool
) -> _Outcome:
    k = min(m // 2, P)
    Om = draw_probes("gaussian", P, k, gen, dtype, device)
    Om = Om * (math.sqrt(P) / Om.norm(dim=0))  # uniform on the sphere of radius sqrt(P)
    Y = apply(Om, "sketch")
    Q, R = torch.linalg.qr(Y)
    # s_i: the unit vector (in Q's coordinates) orthogonal to every column of R but
    # the i-th, so that Q_(i) Q_(i)^T = Q (I - s_i s_i^T) Q^T.
    S = _leave_one_out_directions(R, dtype)
    rho = _missed_fraction(R, S)
    if adaptive and rho * m >= k:  # 2 rho ||A||_F^2 / k >= 2 ||A||_F^2 / m
        return _fallback(apply, P, m, gen, dtype, device, (Om * Y).sum(dim=0), rho)
    Z = apply(Q, "projection")
    H = Q.T @ Z  # Q^T A Q
    W = Q.T @ Om
    # P_i omega_i = Q B_i with B_i = W_i - s_i (s_i^T W_i); V_i = (I - P_i) omega_i.
    B = W - S * (S * W).sum(dim=0)
    V = Om - Q @ B
    AV = Y - Z @ B
    norm2 = (V * V).sum(dim=0).clamp_min(torch.finfo(dtype).tiny)
    residual = (V * AV).sum(dim=0) * ((P - k + 1) / norm2)
    in_sketch = torch.diagonal(H).sum() - (S * (H @ S)).sum(dim=0)
    return _Outcome(*_mean_and_stderr(in_sketch + residual), "xtrace", False, 1.0 - rho)


def _exact(A: Any, apply: Products, P: int, dtype: torch.dtype, device: Any) -> float:
    entries = exact_diagonal(A, apply, P, dtype, device, "trace", "'hutch++' or 'xtrace'")
    return entries.to(torch.float64).sum().item()


def _check_arguments(method: Any, matvecs: Any, batch_size: Any) -> str:
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise CurvkitError(f"unknown trace method {method!r}; choose one of {', '.join(METHODS)}")
    method = method.lower()
    check_batch_size(batch_size)
    if method != "exact":
        check_matvecs(matvecs, MIN_MATVECS[method], f"trace method {method!r}")
    return method


@fixed_model_state()
def trace(
    A: Any,
    method: str = "hutch++",
    matvecs: int = 300,
    seed: int | None = 0,
    batch_size: int | None = None,
    progress: Progress | None = None,
    adaptive: bool = True,
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
            ignored by ``"exact"``. With ``matvecs >= P`` on a fixed linear
            operator, ``"hutch++"`` and ``"xtrace"`` return the exact trace at
            ``P`` products.
        seed: Seed of the probes (a CPU generator, so the same on every device;
            ``None``: fresh randomness, the seed drawn is in the result).
        batch_size: Columns per ``A.matmat`` call, i.e. per pass over the data
            (default: all columns of a stage, at most 64). Peak memory is about
            ``P * batch_size`` numbers for the products, plus ``P * k`` for the
            ``k``-column sketches of Hutch++ and XTrace.
        progress: Called after every block of products with
            ``{"matvecs": done, "total": planned, "stage": ...}`` (a fallback
            re-plans ``total`` to the whole budget).
        adaptive: For ``"hutch++"`` and ``"xtrace"``: after the sketch, fall back
            to Hutchinson with the whole budget when the sketch misses too much of
            ``||A||_F^2`` to beat it (the module documentation gives the rule and
            its grounds). ``False`` runs the published algorithms unchanged.

    Returns:
        A :class:`TraceResult`.

    Raises:
        ShapeMismatchError: ``A`` is not a square operator.
        CurvkitError: Unknown method, a budget below the method's minimum (1 for
            Hutchinson, 3 for Hutch++, 2 for XTrace), a bad ``batch_size`` or
            ``adaptive``, or ``"exact"`` on a ``RESAMPLES`` operator (it has no
            fixed diagonal).
        NonFiniteError: A product (or the operator's diagonal) holds a NaN or an
            Inf; the message names the product and the stage (sketch, projection,
            probes, basis).

    Example:
        The exact trace of a diagonal matrix, and Hutch++ on a rank-2 matrix,
        which its sketch captures exactly:

        >>> import torch, curvkit
        >>> from curvkit.linalg.trace import trace
        >>> D = curvkit.DenseOperator(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)))
        >>> res = trace(D, method="exact")  # from the dense operator's diagonal: no products
        >>> res.estimate, res.stderr, res.matvecs
        (55.0, 0.0, 0)
        >>> u = torch.arange(1.0, 31.0, dtype=torch.float64).reshape(2, 15).T
        >>> L = curvkit.DenseOperator(u @ u.T)  # trace = ||u||_F^2 = 9455
        >>> res = trace(L, method="hutch++", matvecs=9, seed=1)
        >>> round(res.estimate, 6), res.matvecs, res.fallback
        (9455.0, 9, False)

        On the identity, whose flat spectrum no sketch captures, Hutch++ falls
        back to Hutchinson (exact here: ``z^T z = P`` for every sign vector):

        >>> res = trace(curvkit.DenseOperator(torch.eye(100, dtype=torch.float64)), matvecs=30)
        >>> res.estimate, res.method, res.fallback, res.matvecs
        (100.0, 'hutchinson', True, 30)
    """
    P = check_square(A)
    method = _check_arguments(method, matvecs, batch_size)
    if not isinstance(adaptive, bool):
        raise CurvkitError(f"adaptive must be True or False, got {adaptive!r}")
    dtype = getattr(A, "dtype", torch.float64)
    device = getattr(A, "device", torch.device("cpu"))
    generator = probe_generator(seed)
    seed = generator.initial_seed()
    passes_before = getattr(A, "data_passes", None)
    if "trace" in getattr(A, "STRUCTURE", ()):
        value = A.trace()
        if not math.isfinite(value):
            raise CurvkitError(f"the trace of the operator from its structure is not finite ({value})")
        passes = getattr(A, "data_passes", None)
        return TraceResult(
            estimate=float(value),
            stderr=0.0,
            method="exact",
            matvecs=0,
            data_passes=None if passes_before is None else int(passes - passes_before),
            seed=seed,
            structured=True,
        )

    resampling = bool(getattr(A, "RESAMPLES", False))
    if method in ("hutch++", "xtrace") and matvecs >= P and not resampling:
        method = "exact"
    if method == "exact":
        total = P
    elif method == "xtrace":
        total = 2 * min(matvecs // 2, P)
    else:
        total = matvecs
    block = batch_size if batch_size is not None else DEFAULT_BATCH_SIZE
    apply = Products(A, max(1, min(block, max(total, 1))), total, progress, "the trace estimate", method)

    # No torch.no_grad(): operators built on autograd may rely on the ambient grad
    # mode; the products are detached instead.
    if method == "exact":
        outcome = _Outcome(_exact(A, apply, P, dtype, device), 0.0, "exact")
    elif method == "hutchinson":
        outcome = _hutchinson(apply, P, matvecs, generator, dtype, device)
    else:
        run = _hutch_plus_plus if method == "hutch++" else _xtrace
        outcome = run(apply, P, matvecs, generator, dtype, device, adaptive)

    passes_after = getattr(A, "data_passes", None)
    passes = None if passes_before is None or passes_after is None else int(passes_after - passes_before)
    return TraceResult(
        estimate=float(outcome.estimate),
        stderr=float(outcome.stderr),
        method=outcome.method,
        matvecs=int(apply.matvecs),
        data_passes=passes,
        seed=seed,
        fallback=outcome.fallback,
        sketch_mass=None if outcome.sketch_mass is None else float(outcome.sketch_mass),
    )
