"""Thick-restart Lanczos for a few eigenpairs of a symmetric operator.

Each step subtracts the three-term recurrence ``beta_j v_{j-1} + alpha_j v_j``.
Rounding then makes the new vector lose orthogonality to the basis, fastest
towards converged Ritz vectors, which without a remedy come back as copies
("ghost" eigenvalues). Two remedies:

* **full** reorthogonalisation sweeps the whole basis at every step (classical
  Gram-Schmidt, with a second pass only when the first cancels much of the
  vector: the DGKS criterion, "twice is enough", Giraud et al., Numer. Math. 2005);
* **partial** reorthogonalisation (H. D. Simon, "The Lanczos algorithm with
  partial reorthogonalization", Math. Comp. 42(165), 1984) tracks estimates of
  every ``v_j . v_k`` with a recurrence on ``T`` (:class:`_Orthogonality`) and
  sweeps only when one exceeds ``sqrt(eps)``, for that vector and the next. The
  basis stays semi-orthogonal, which keeps ghosts away and the Ritz values
  accurate to working precision; the returned pairs are made orthonormal and
  certified explicitly from the stored products ``A v_i`` (a ``k x k``
  Rayleigh-Ritz step, or one over the whole basis with its Gram matrix when
  that is needed to reach ``tol``). On the benchmark MLP (float32) a top-5 solve
  at ``tol`` 1e-4 sweeps 13 times in 49 products and takes 8-16% less time than
  with full reorthogonalisation (medians of 25 alternating runs, 2 CPU cores).

Simon's recurrence assumes products accurate to about ``eps ||A||``. Products of
a float32 network Hessian are often far noisier (1e-5 relative, about 100 eps,
through BatchNorm, LSTMs or a saturated softmax), and an error ``f`` in ``A v_j``
turns into a loss of orthogonality ``|v_k . f| / beta_{j+1}``, which a spectrum
with a dominant eigenvalue (``beta << ||A||``) makes large within a few steps.
Partial reorthogonalisation therefore measures what it would otherwise assume:

* every step computes ``v_{j-1} . w`` and ``v_j . w`` of the new, unnormalised
  vector ``w`` (two dot products next to the product). The first is the
  asymmetry ``v_{j-1} . A v_j - v_j . A v_{j-1}`` of the products, exactly the
  rounding term of Simon's recurrence for that pair; its running maximum
  replaces ``eps ||A||`` in the estimates of all other pairs;
* when the measured ``|v_{j-1,j} . w| / beta_{j+1}`` exceeds ``sqrt(eps)`` (the
  basis is no longer semi-orthogonal), or a sweep finds the basis's true loss of
  orthogonality :data:`ESTIMATE_UNDERCOUNT` times above the estimate, the run
  switches to full reorthogonalisation for good, at that step: never after the
  basis is gone.

On well-behaved products both tests stay silent and cost two dot products a
step. Whatever the basis's state, Ritz pairs and restarts from stored products
go through a Rayleigh-Ritz projection with the basis's Gram matrix, orthonormalised
from its eigendecomposition (canonical orthogonalisation, P.-O. Loewdin, Adv.
Quantum Chem. 5, 1970) which drops directions the basis spans only to rounding
(:data:`GRAM_RANK`): unlike a Cholesky factorisation it cannot fail, and it never
divides by a vanishing norm.

Partial is used when the products are stored (:data:`PRODUCT_STORE_BYTES`),
with a larger default basis (:data:`PARTIAL_BASIS`), full otherwise. When the
basis reaches ``max_basis`` vectors, the Ritz vectors nearest the wanted end of
the spectrum are kept and the process continues from the last residual: the
thick restart of K. Wu and H. Simon, "Thick-restart Lanczos method for large
symmetric eigenvalue problems", SIAM J. Matrix Anal. Appl. 22(2), 2000 (from
the Rayleigh-Ritz pairs of the Gram-matrix projection whenever the basis is
not orthonormal to working precision, so that the kept vectors are).

The basis is kept in the precision the caller asks for (the operator's own);
the projected matrix ``T`` and its eigendecomposition are always float64.

A Ritz pair ``(theta, y)`` has residual ``||A y - theta y|| = |beta_m s_{m,i}|``
in exact arithmetic; the returned pairs also come with ``A y`` itself, combined
from the stored products ``A v_i`` (or the caller applies ``A`` once more), so
the caller's residuals are certificates: every interval ``[theta - r, theta + r]``
contains an eigenvalue of ``A`` (for symmetric ``A``).

**When to stop.** The recurrence's estimates ``|beta_m s_{m,i}|`` cannot see the
products' own errors and keep falling below them; the explicit residuals
``||(A V) s - theta V s||`` contain those errors and stop at them. Once the
estimates are below ``tol`` (or below
:data:`ROUNDING_FACTOR` times the products' measured rounding), the stored
products decide: converged when the explicit residuals are within ``tol``;
**stagnated** when they have not halved over :data:`STAGNATION_WINDOW` products
(the products' rounding floor, reported as ``precision_floor``); and **budget**
after ``max_matvecs`` products (:func:`default_max_matvecs`). Every product is
checked for finiteness through the norms the recurrence computes anyway: a
non-finite one raises :class:`~curvkit.errors.NonFiniteError` naming it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from curvkit.linalg._common import non_finite_error, product_name
from curvkit.snapshot import fixed_model_state

__all__ = ["LanczosState", "default_max_matvecs", "select_ritz", "thick_restart_lanczos"]

WHICH = ("largest", "smallest", "both_ends", "largest_magnitude")

REORTHOGONALISATION = ("auto", "full", "partial")

REORTHOGONALISE = 2**-0.5
"""A second Gram-Schmidt pass runs when the first shrinks ``w`` below this fraction
of its norm (the DGKS criterion: J. W. Daniel, W. B. Gragg, L. Kaufman and
G. W. Stewart, "Reorthogonalization and stable algorithms for updating the
Gram-Schmidt QR factorization", Math. Comp. 30(136), 1976). Without that much
cancellation one pass already leaves ``w`` orthogonal to working precision."""

SEMI_ORTHOGONAL = 1.0
"""Partial reorthogonalisation keeps every ``|v_j . v_k|`` below
``SEMI_ORTHOGONAL * sqrt(eps)``: a semi-orthogonal basis, on which the Lanczos
recurrence still gives Ritz values to working precision (H. D. Simon, "Analysis
of the symmetric Lanczos algorithm with reorthogonalization methods", Linear
Algebra Appl. 61, 1984). The returned pairs then come from a Rayleigh-Ritz
projection with the basis's Gram matrix, so their certificates are not limited
by ``sqrt(eps)``."""

ESTIMATE_UNDERCOUNT = 10.0
"""A sweep measures the basis's true loss of orthogonality ``V^T w / beta``; when
it exceeds the recurrence's estimate by more than this factor, the estimates
cannot be trusted for these products (their errors reach older vectors more than
the measured asymmetry says) and the run switches to full reorthogonalisation.
Simon's estimates are bounds that the true values typically stay well below, so
a factor of 10 is never reached on products accurate to working precision."""

GRAM_RANK = 0.5
"""Canonical orthogonalisation keeps the directions whose Gram-matrix eigenvalue is
above ``eps**GRAM_RANK`` (``sqrt(eps)``) times the largest.
A semi-orthogonal basis has Gram eigenvalues within ``m sqrt(eps)`` of 1; a
direction far below is a linear combination that the basis spans only to
rounding (two copies of one vector), whose Rayleigh-Ritz pair would amplify the
products' errors by ``1 / sqrt(eigenvalue)``."""

PARTIAL_BASIS = 60
"""Default basis size (at least; ``2k + 20`` for larger ``k``) under partial
reorthogonalisation. On the benchmark MLP a top-5 solve needs about 46 products:
with 40 vectors it restarts once, which costs a Gram-matrix projection of the
whole basis (about 7% of the solve); with 60 it does not restart."""

PRODUCT_STORE_BYTES = 512 * 2**20
"""Keep the products ``A v_i`` next to the basis when they take at most this many
bytes. The returned pairs' ``A y = (A V) s`` then come from the stored products,
so their residual certificates need no further product; above it, the caller
recomputes them (one more product per pair)."""

ROUNDING_FACTOR = 4.0
"""The recurrence's residual estimates are compared with explicit residuals once
they fall below ``tol`` or below this many times the products' rounding level,
``max(eps, max_j |v_{j-1} . A v_j - v_j . A v_{j-1}|) / ||A||`` (measured at every
step). Clean products leave explicit residuals of about ``2-3 eps ||A||`` (2.6e-7
relative on a float32 MLP Hessian); below four times the rounding, an estimate
says nothing the explicit residual can confirm. Without stored products the run
stops there (``stop_reason="stagnated"`` when ``tol`` is below it)."""

STAGNATION_WINDOW = 20
"""Products over which the explicit residuals must halve once the estimates are
below ``tol``; otherwise the run stops, ``stop_reason="stagnated"``. Explicit
checks then run every ``max(2, basis / 8)`` products, so a window holds two or
more of them. The residual left is the products' own error seen by the Ritz
vectors, which further Krylov steps do not reduce: measured on a float32 tanh MLP
(784-48-24-10, 1000 samples) the residuals sit at 1.8e-6 relative to ``||A||``
from the first check on, where the old solver spent its whole budget."""

BUDGET_PER_PAIR = 30
"""Default products per wanted pair (see :func:`default_max_matvecs`)."""

MIN_BUDGET = 300
"""Smallest default budget (see :func:`default_max_matvecs`)."""


def default_max_matvecs(k: int) -> int:
    """The default product budget of :func:`thick_restart_lanczos`: ``max(300, 30 k)``.

    Measured needs: a top-5 solve of the benchmark MLP and CNN Hessians takes 20-49
    products at ``tol`` 1e-4, the top-3 of real float32 CNN and LSTM checkpoints
    12-21 in float64 (10-18 in float32 with the basis kept orthogonal), and
    convergence slows with ``k`` about linearly (each pair needs its own Krylov
    directions). 300 products is 6 to 25 times those needs, and about as long as a
    user waits for one eigen-solve on a real model (at 1-3 s per product, 5 to 15
    minutes); a solve that needs more is reported as not converged with the
    residuals reached (``stop_reason="budget"``), and ``max_matvecs`` asks for more.
    The old default, ``50 sqrt(P)``, grew with the model (19,461 products for a
    CNN of 151,000 parameters) and let a broken solve run for hours.
    """
    return max(MIN_BUDGET, BUDGET_PER_PAIR * k)


def select_ritz(theta: Tensor, k: int, which: str) -> Tensor:
    """Indices of the ``k`` wanted Ritz values in ``theta`` (ascending order input).

    ``"both_ends"`` takes ``ceil(k/2)`` from the top and ``floor(k/2)`` from the
    bottom, as SciPy's ``eigsh(which="BE")`` does.
    """
    n = theta.numel()
    k = min(k, n)
    if which == "largest":
        return torch.arange(n - k, n)
    if which == "smallest":
        return torch.arange(0, k)
    if which == "largest_magnitude":
        return torch.argsort(theta.abs(), descending=True)[:k].sort().values
    if which == "both_ends":
        top, bottom = (k + 1) // 2, k // 2
        return torch.cat([torch.arange(0, bottom), torch.arange(n - top, n)])
    raise ValueError(f"which must be one of {WHICH}, got {which!r}")


@dataclass
class LanczosState:
    """What :func:`thick_restart_lanczos` returns (before the caller's certificates)."""

    values: Tensor
    vectors: Tensor
    residual_estimates: Tensor
    matvecs: int
    restarts: int
    converged: bool
    spectral_radius: float
    products: Tensor | None = None
    """``A @ vectors`` combined from the stored products (``None`` when the
    products were not kept: see :data:`PRODUCT_STORE_BYTES`)."""
    stop_reason: str = "converged"
    """``"converged"``, ``"budget"`` (``max_matvecs`` spent) or ``"stagnated"``
    (the residuals stopped improving at the products' precision floor)."""
    precision_floor: float | None = None
    """When stagnated: the relative residual ``max_i r_i / ||A||`` at which the
    explicit residuals stopped improving (with stored products), or the measured
    rounding level at which the estimates stopped (without)."""
    full_from: int | None = None
    """The product after which partial reorthogonalisation switched to full
    (``None``: it did not, or the run was full from the start)."""

    def relative_residual(self) -> float:
        """``max_i r_i / ||A||`` of the wanted pairs."""
        return self.residual_estimates.max().item() / self.spectral_radius


_SEMI, _SWEEP, _LOST = "semi-orthogonal", "sweep", "lost"


class _Orthogonality:
    """Estimates of the Lanczos vectors' loss of orthogonality (Simon's omega recurrence).

    ``omega[j, k]`` estimates ``v_j . v_k``. From ``beta_{j+1} v_{j+1} = A v_j -
    alpha_j v_j - beta_j v_{j-1} + f_j`` and ``A v_k = sum_i T_ik v_i + f_k`` (``T``
    tridiagonal, plus the arrow of kept Ritz vectors after a thick restart),

        beta_{j+1} omega[j+1, k] = sum_i T_ik omega[j, i] - alpha_j omega[j, k]
                                   - beta_j omega[j-1, k] + (v_k . f_j - v_j . f_k),

    H. D. Simon, "The Lanczos algorithm with partial reorthogonalization", Math.
    Comp. 42(165), 1984. Simon bounds the last term by ``2 eps ||A||``; here it is
    bounded by the larger of that and twice the products' measured asymmetry
    ``|v_{j-1} . f_j - v_j . f_{j-1}|``, and the two neighbours ``omega[j+1, j-1]``
    and ``omega[j+1, j]``, which Simon takes to be ``eps``, are measured.
    """

    def __init__(self, m: int, dtype: torch.dtype):
        self.eps = torch.finfo(dtype).eps
        self.threshold = self.eps**0.5 * SEMI_ORTHOGONAL
        self.previous = torch.zeros(m + 1, dtype=torch.float64)  # omega[j-1, :]
        self.current = torch.zeros(m + 1, dtype=torch.float64)  # omega[j, :]
        self.current[0] = 1.0
        self.force = False  # reorthogonalise the next vector too (Simon: two in a row)
        self.scale = 0.0
        self.estimate = math.inf  # the largest estimate of the last advance() that asked for a sweep

    def advance(self, T: Tensor, j: int, beta_next: float, local: tuple[float, float], noise: float) -> str:
        """Estimate ``omega[j+1, :]`` from column ``j`` of ``T`` (just written, local part).

        Args:
            T: The projected matrix, column ``j`` written.
            j: The step.
            beta_next: ``||w||``, the norm of the new vector before normalisation.
            local: ``(v_{j-1} . w, v_j . w)``, measured.
            noise: The products' measured asymmetry so far (absolute).

        Returns:
            ``_SEMI`` when the new vector keeps the basis semi-orthogonal,
            ``_SWEEP`` when an estimate exceeds the threshold (the caller sweeps and
            calls :meth:`reset`), ``_LOST`` when a measured neighbour already does
            (the caller sweeps and reorthogonalises fully from now on).
        """
        if beta_next <= 0.0:
            self.estimate = math.inf
            return _SWEEP
        measured = [value / beta_next for value in local]
        if max(abs(value) for value in measured) > self.threshold:
            return _LOST
        alpha, beta = T[j, j].item(), T[j - 1, j].item()
        self.scale = max(self.scale, abs(alpha), beta, beta_next)
        rounding = max(2 * self.eps * self.scale, 2 * noise)
        coupled = T[: j + 1, :j].T @ self.current[: j + 1]  # (A v_k) . v_j, k < j
        estimate = (coupled - alpha * self.current[:j] - beta * self.previous[:j]) / beta_next
        estimate += torch.where(estimate >= 0, 1.0, -1.0) * (rounding / beta_next)
        estimate[j - 1] = measured[0]
        largest = estimate.abs().max().item()
        if largest > self.threshold:
            self.estimate = largest
            return _SWEEP
        following = torch.zeros_like(self.current)
        following[:j] = estimate
        following[j] = measured[1]
        following[j + 1] = 1.0
        self.previous, self.current = self.current, following
        return _SEMI

    def confirms(self, first_pass: Tensor, beta_next: float) -> bool:
        """Whether a sweep that :meth:`advance` asked for found the loss of orthogonality
        ``|V^T w| / beta_next`` (``first_pass = V^T w``, neighbours excluded) within
        :data:`ESTIMATE_UNDERCOUNT` times the estimate."""
        if first_pass.numel() == 0 or not math.isfinite(self.estimate) or beta_next <= 0.0:
            return True
        return first_pass.abs().max().item() / beta_next <= ESTIMATE_UNDERCOUNT * self.estimate

    def reset(self, j: int, again: bool) -> None:
        """``v_{j+1}`` was reorthogonalised against ``v_0 .. v_j``; ``again``: the next one too."""
        following = torch.zeros_like(self.current)
        following[: j + 1] = self.eps
        following[j + 1] = 1.0
        self.previous, self.current = self.current, following
        self.force = again
        self.estimate = math.inf

    def restart(self, p: int) -> None:
        """After a thick restart: ``p`` kept Ritz vectors and ``v_p``, orthonormal."""
        self.previous = torch.zeros_like(self.current)
        self.current = torch.zeros_like(self.current)
        self.current[:p] = self.eps
        self.current[p] = 1.0
        self.force = False
        self.estimate = math.inf


class _ExplicitChecks:
    """The explicit checks of a run: the best state seen, and whether the residuals still improve."""

    def __init__(self, window: int):
        self.window = window
        self.history: list[tuple[int, float]] = []  # (products, max relative residual)
        self.best: LanczosState | None = None

    @property
    def latest(self) -> float:
        """The relative residual of the last check (0 before any)."""
        return self.history[-1][1] if self.history else 0.0

    def record(self, state: LanczosState) -> None:
        relative = state.relative_residual()
        self.history.append((state.matvecs, relative))
        if self.best is None or relative <= self.best.relative_residual():
            self.best = state

    def stagnated(self, matvecs: int) -> bool:
        """No halving of the residuals over the last :data:`STAGNATION_WINDOW` products."""
        cut = matvecs - self.window
        before = [r for m, r in self.history if m <= cut]
        recent = [r for m, r in self.history if m > cut]
        return bool(before) and bool(recent) and min(recent) > 0.5 * min(before)


def _set_column(T: Tensor, j: int, h: Tensor) -> None:
    """Column and row ``j`` of the symmetric ``T``: the coefficients ``h`` of ``A v_j``."""
    T[: j + 1, j] = h
    T[j, : j + 1] = h


def _set_arrow(T: Tensor, values: Tensor, coupling: Tensor) -> None:
    """``T`` after a thick restart: ``diag(values)`` of the kept Ritz vectors, coupled
    to the next Lanczos vector (index ``p = len(values)``) through ``coupling``."""
    p = values.numel()
    T.zero_()
    T[torch.arange(p), torch.arange(p)] = values
    T[p, :p] = coupling
    T[:p, p] = coupling


def _orthogonalise(basis: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor, float]:
    """Classical Gram-Schmidt of ``w`` against the rows of ``basis``, a second pass only
    after cancellation (:data:`REORTHOGONALISE`).

    Returns:
        ``w`` orthogonalised, the coefficients removed (float64, CPU), those of the
        first pass (``basis @ w`` on entry: the loss of orthogonality times
        ``||w||``) and the new norm.
    """
    removed = torch.zeros(basis.shape[0], dtype=torch.float64)
    first_pass = None
    for _ in range(2):
        norm_before = w.norm()
        correction = basis @ w
        w = w - correction @ basis
        correction = correction.to(device="cpu", dtype=torch.float64)
        removed += correction
        first_pass = correction if first_pass is None else first_pass
        norm_after = w.norm()
        if norm_after >= REORTHOGONALISE * norm_before:
            break
    return w, removed, first_pass, norm_after.item()


def _rayleigh_ritz(V: Tensor, W: Tensor) -> tuple[Tensor, Tensor] | None:
    """Ritz pairs of ``A`` on ``span(V)`` (rows) from ``W = A V``, for a basis that is
    only nearly orthonormal: ``(V W^T) s = theta (V V^T) s``.

    The Gram matrix ``G = V V^T = U diag(d) U^T`` is orthonormalised canonically
    (Loewdin 1970): ``X = U_r diag(d_r)^{-1/2}`` over the ``r`` directions with
    ``d > sqrt(eps) max(d)`` (:data:`GRAM_RANK`), so ``X^T G X = I`` and ``X^T (V W^T)
    X`` is an ordinary symmetric eigenproblem. Returns ascending ``theta`` (``r``
    of them) and ``S`` (``[rows of V, r]``) with ``S^T G S = I`` (float64, CPU), or
    ``None`` when ``V`` is zero.
    """
    G = (V @ V.T).to(device="cpu", dtype=torch.float64)
    M = (V @ W.T).to(device="cpu", dtype=torch.float64)
    d, U = torch.linalg.eigh((G + G.T) / 2)
    floor = d.max().item() * torch.finfo(V.dtype).eps ** GRAM_RANK
    keep = d > floor
    if floor <= 0.0 or not bool(keep.any()):
        return None
    X = U[:, keep] / d[keep].sqrt()
    C = X.T @ ((M + M.T) / 2) @ X
    theta, Z = torch.linalg.eigh((C + C.T) / 2)
    return theta, X @ Z


def _explicit_state(
    V: Tensor, W: Tensor, combine: Tensor, tol: float, spectral: float, matvecs: int, restarts: int
) -> LanczosState:
    """Pairs from the span of ``Y = C^T V`` (``C = combine``), with explicit residuals.

    A Rayleigh-Ritz step within ``span(Y)`` (``k x k``, with ``A Y = C^T W``) makes
    the returned vectors orthonormal, which the ``y`` of a semi-orthogonal basis are
    only to about ``sqrt(eps)``, and their values Rayleigh quotients.
    """
    combine = combine.T.to(device=V.device, dtype=V.dtype)
    vectors, products = combine @ V, combine @ W
    pairs = _rayleigh_ritz(vectors, products)
    independent = pairs is not None and pairs[0].numel() == vectors.shape[0]
    if independent:
        values, S = pairs
        mix = S.T.to(device=V.device, dtype=V.dtype)
        vectors, products = mix @ vectors, mix @ products
    else:  # the y are dependent (copies of one vector): never converged, whatever the residuals
        norms = vectors.norm(dim=1, keepdim=True).clamp_min(torch.finfo(V.dtype).tiny)
        vectors, products = vectors / norms, products / norms
        values = (vectors * products).sum(dim=1).to("cpu", torch.float64)
    residuals = (products - values.to(V)[:, None] * vectors).norm(dim=1).to("cpu", torch.float64)
    spectral = max(spectral, values.abs().max().item(), 1e-300)
    return LanczosState(
        values=values.to(V.device),
        vectors=vectors.T,
        residual_estimates=residuals.to(V.device),
        matvecs=matvecs,
        restarts=restarts,
        converged=independent and bool((residuals <= tol * spectral).all()),
        spectral_radius=spectral,
        products=products.T,
    )


def _refined_state(
    V: Tensor, W: Tensor, k: int, which: str, tol: float, matvecs: int, restarts: int
) -> LanczosState | None:
    """The wanted Ritz pairs of :func:`_rayleigh_ritz`, with explicit residuals."""
    pairs = _rayleigh_ritz(V, W)
    if pairs is None or pairs[0].numel() < k:
        return None
    theta, S = pairs
    spectral = theta.abs().max().item()
    return _explicit_state(V, W, S[:, select_ritz(theta, k, which)], tol, spectral, matvecs, restarts)


def _refined_restart(
    V: Tensor, W: Tensor, T: Tensor, size: int, w: Tensor, keep_count: int, which: str
) -> int | None:
    """Thick restart of a basis that is not orthonormal to working precision: keep
    ``keep_count`` Ritz vectors of :func:`_rayleigh_ritz` (orthonormal, with their
    products) and continue from ``w`` made orthogonal to ``span(V)``, where the Ritz
    residuals lie; ``T`` becomes the arrow ``diag(theta)`` coupled to the new vector
    through ``v_p . A y_i``.

    Returns:
        The number ``p`` of kept vectors (``V[p]`` is the new Lanczos vector), or
        ``None`` when no new direction is left (the caller then restarts from
        ``T``'s pairs).
    """
    pairs = _rayleigh_ritz(V[:size], W[:size])
    if pairs is None:
        return None
    theta, S = pairs
    keep = select_ritz(theta, keep_count, which)
    p = keep.numel()
    Y = S.T.to(device=V.device, dtype=V.dtype) @ V[:size]  # every Ritz vector: orthonormal
    for _ in range(2):
        w = w - (Y @ w) @ Y
    norm = w.norm().item()
    if not norm > 0.0:
        return None
    products = S[:, keep].T.to(device=V.device, dtype=V.dtype) @ W[:size]
    V[:p] = Y[keep]
    W[:p] = products
    V[p] = w / norm
    coupling = (W[:p] @ V[p]).to(device="cpu", dtype=torch.float64)  # v_p . A y_i
    _set_arrow(T, theta[keep], coupling)
    return p


@fixed_model_state()
def thick_restart_lanczos(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    k: int,
    *,
    which: str = "largest",
    tol: float = 1e-6,
    max_basis: int | None = None,
    max_matvecs: int | None = None,
    v0: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    progress: Callable[[dict], None] | None = None,
    reorthogonalisation: str = "auto",
    name: str = "Lanczos",
) -> LanczosState:
    """Wanted eigenpairs of a symmetric ``dim x dim`` operator given by ``matvec``.

    Args:
        matvec: ``v -> A v`` for a flat vector.
        dim: Dimension of ``A``.
        k: Number of eigenpairs.
        which: ``"largest"``, ``"smallest"``, ``"both_ends"`` or
            ``"largest_magnitude"``.
        tol: Stop when every wanted Ritz pair has residual
            ``<= tol * max |theta|``, the largest Ritz value in magnitude (an
            estimate of the spectral radius ``||A||``). Convergence is checked
            after every product; below the products' precision the run stops as
            stagnated (see the module documentation).
        max_basis: Krylov basis size before a restart. Default
            ``min(dim, max(2k + 20, PARTIAL_BASIS))`` when partial
            reorthogonalisation can be used (its sweeps are rare, so a larger basis
            costs memory but little time, and saves restarts), else
            ``min(dim, max(2k + 20, 40))``.
        max_matvecs: Budget of products (default :func:`default_max_matvecs`,
            ``max(300, 30 k)``).
        v0: Starting vector (default: Gaussian from ``generator``).
        progress: Called after each product with ``{"matvecs", "basis",
            "restarts", "residual", "reorthogonalisation"}``: ``residual`` is the
            largest relative residual ``r_i / ||A||`` of the wanted pairs, the
            recurrence's estimate or, when larger, that of the last explicit check
            (``inf`` before ``k`` Ritz values exist); ``reorthogonalisation`` is
            ``"partial"`` or ``"full"`` (a switch shows there).
        reorthogonalisation: ``"full"`` (every step, against the whole basis),
            ``"partial"`` (only when needed to keep the basis semi-orthogonal, see
            :data:`SEMI_ORTHOGONAL`, switching to full when the products are too
            noisy for it; needs the stored products) or ``"auto"`` (partial when
            the products are stored, see :data:`PRODUCT_STORE_BYTES`).
        name: What the run is, for error messages (e.g. ``"Lanczos (eigenvalues,
            largest)"``).

    Returns:
        The Ritz values in ascending order, their vectors, residual norms (explicit
        with stored products, estimates without), the number of products,
        restarts, whether ``tol`` was reached and why the run stopped.

    Raises:
        NonFiniteError: A product, or a value computed from it, is not finite.
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if reorthogonalisation not in REORTHOGONALISATION:
        raise ValueError(
            f"reorthogonalisation must be 'auto', 'full' or 'partial', got {reorthogonalisation!r}"
        )
    itemsize = torch.finfo(dtype).bits // 8
    m = max_basis or min(dim, max(2 * k + 20, 40))
    larger = min(dim, max(2 * k + 20, PARTIAL_BASIS))
    if (
        max_basis is None
        and reorthogonalisation != "full"
        and (larger + 1) * dim * itemsize <= PRODUCT_STORE_BYTES
    ):
        m = larger
    m = max(min(m, dim), min(k + 1, dim))
    budget = max_matvecs or default_max_matvecs(k)
    V = torch.empty(m + 1, dim, dtype=dtype, device=device)  # basis as rows: contiguous sweeps
    store = (m + 1) * dim * itemsize <= PRODUCT_STORE_BYTES or reorthogonalisation == "partial"
    W = torch.empty(m + 1, dim, dtype=dtype, device=device) if store else None  # W[i] = A V[i]
    partial = reorthogonalisation == "partial" or (reorthogonalisation == "auto" and store)
    omega = _Orthogonality(m, dtype) if partial else None
    checks = _ExplicitChecks(STAGNATION_WINDOW)
    T = torch.zeros(m, m, dtype=torch.float64)  # small: on the CPU, always in float64
    eps = torch.finfo(dtype).eps
    breakdown_tol = max(1e-12, 10 * eps)
    if v0 is None:
        v0 = torch.randn(dim, dtype=dtype, generator=generator).to(device)
    V[0] = v0 / v0.norm()
    j = 0  # rows of V in use before this step: kept Ritz vectors, then Lanczos vectors
    start = 0  # first Lanczos vector after the kept Ritz vectors
    beta = 0.0
    matvecs = restarts = 0
    noise = 0.0  # largest measured asymmetry |v_{j-1} . A v_j - v_j . A v_{j-1}| (absolute)
    orthonormal = True  # the basis is orthonormal to working precision (no step skipped a sweep)
    full_from = None
    recheck_at = 0  # stored products: the next product count at which an explicit check may run

    def finite(value: float, product: Tensor) -> None:
        if not math.isfinite(value):
            raise non_finite_error(product, product_name(matvecs, name))

    while True:
        product = matvec(V[j])
        matvecs += 1
        if W is not None:
            W[j] = product
        h = torch.zeros(j + 1, dtype=torch.float64)
        sweep = omega is None or j == start or omega.force
        verify = False
        w = product
        if j > start:  # three-term recurrence: A v_j = beta v_{j-1} + alpha v_j + ...
            w = torch.sub(product, V[j - 1], alpha=beta)  # a new tensor: the product is kept
            alpha = torch.dot(V[j], w).item()
            finite(alpha, product)
            w.sub_(V[j], alpha=alpha)
            h[j - 1] = beta
            h[j] = alpha
            if not sweep:
                _set_column(T, j, h)  # the recurrence reads it; a sweep below rewrites it
                *local, beta = torch.cat([V[j - 1 : j + 1] @ w, w.norm().unsqueeze(0)]).tolist()
                finite(beta, product)
                noise = max(noise, abs(local[0]))
                verdict = omega.advance(T, j, beta, (local[0], local[1]), noise)
                if verdict == _LOST:  # products too noisy for the estimates: full from here on
                    omega, full_from = None, matvecs
                sweep, verify = verdict != _SEMI, verdict == _SWEEP
                orthonormal = orthonormal and verdict != _SEMI
        if sweep:
            beta_before = beta
            w, removed, first_pass, beta = _orthogonalise(V[: j + 1], w)
            finite(beta, product)
            h += removed
            if j > start:
                noise = max(noise, abs(first_pass[j - 1].item()))
            if verify and not omega.confirms(first_pass[: j - 1], beta_before):
                omega, full_from = None, matvecs  # the estimates undercount: full from here on
            if omega is not None:
                omega.reset(j, again=j > start and not omega.force)
            _set_column(T, j, h)
        size = j + 1
        mode = "full" if omega is None else "partial"
        scale = max(T[:size, :size].abs().max().item(), 1e-300)
        breakdown = beta <= breakdown_tol * scale or size == dim  # invariant subspace found
        if size < min(k, dim) and not breakdown and matvecs < budget:
            _report(progress, matvecs, size, restarts, math.inf, mode)
            V[size] = w / beta
            j = size
            continue
        # Ritz pairs of the current basis; their residuals are |beta * last component|
        theta, S = torch.linalg.eigh(T[:size, :size])
        res = torch.zeros_like(theta) if breakdown else (beta * S[size - 1, :]).abs()
        wanted = select_ritz(theta, k, which)
        spectral = max(theta.abs().max().item(), 1e-300)
        estimate = res[wanted].max().item() / spectral
        rounding = max(eps, noise / spectral)
        resolvable = max(tol, ROUNDING_FACTOR * rounding)
        final = breakdown or matvecs >= budget
        if W is not None:
            # the estimates only say when to look; the explicit residuals from the
            # stored products decide
            if final or (estimate <= resolvable and matvecs >= recheck_at):
                # the pairs of T (enough unless tol nears the products' precision), then
                # the Rayleigh-Ritz projection of the whole basis with its Gram matrix
                state = _explicit_state(V[:size], W[:size], S[:, wanted], tol, spectral, matvecs, restarts)
                if not state.converged:
                    refined = _refined_state(V[:size], W[:size], k, which, tol, matvecs, restarts)
                    if refined is not None and refined.relative_residual() <= state.relative_residual():
                        state = refined
                checks.record(state)
                _report(progress, matvecs, size, restarts, max(estimate, checks.latest), mode)
                if state.converged:
                    return replace(state, full_from=full_from)
                if final or checks.stagnated(matvecs):
                    best = checks.best
                    stagnated = breakdown or matvecs < budget
                    return replace(
                        best,
                        matvecs=matvecs,
                        restarts=restarts,
                        stop_reason="stagnated" if stagnated else "budget",
                        precision_floor=best.relative_residual() if stagnated else None,
                        full_from=full_from,
                    )
                recheck_at = matvecs + max(2, size // 8)
            else:
                _report(progress, matvecs, size, restarts, max(estimate, checks.latest), mode)
        else:
            _report(progress, matvecs, size, restarts, estimate, mode)
            if final or estimate <= resolvable:
                combine = S.to(device=device, dtype=dtype)[:, wanted].T
                converged = breakdown or estimate <= tol
                stagnated = not converged and estimate <= resolvable
                return LanczosState(
                    values=theta[wanted].to(device),
                    vectors=(combine @ V[:size]).T,
                    residual_estimates=res[wanted].to(device),
                    matvecs=matvecs,
                    restarts=restarts,
                    converged=converged,
                    spectral_radius=spectral,
                    stop_reason="converged" if converged else "stagnated" if stagnated else "budget",
                    precision_floor=ROUNDING_FACTOR * rounding if stagnated else None,
                    full_from=full_from,
                )
        if size < m:
            V[size] = w / beta
            j = size
            continue
        # thick restart: keep the wanted Ritz vectors plus some neighbours, continue from w
        keep_count = min(size - 1, max(k + (size - k) // 2, k))
        if W is not None and not orthonormal:
            p = _refined_restart(V, W, T, size, w, keep_count, which)
            if p is None and omega is not None:  # no new direction: full from here on
                omega, full_from = None, matvecs
            if p is not None:
                if omega is not None:
                    omega.restart(p)
                j = start = p
                restarts += 1
                orthonormal = True
                continue
        keep = select_ritz(theta, keep_count, which)
        p = keep.numel()
        combine = S.to(device=device, dtype=dtype)[:, keep].T
        V[:p] = combine @ V[:size]
        if W is not None:
            W[:p] = combine @ W[:size]
        V[p] = w / beta
        _set_arrow(T, theta[keep], beta * S[size - 1, keep])
        j = start = p
        restarts += 1
        if omega is not None:
            omega.restart(p)


def _report(
    progress: Callable[[dict], None] | None,
    matvecs: int,
    basis: int,
    restarts: int,
    residual: float,
    reorthogonalisation: str,
) -> None:
    if progress is not None:
        progress(
            {
                "matvecs": matvecs,
                "basis": basis,
                "restarts": restarts,
                "residual": float(f"{residual:.3g}"),
                "reorthogonalisation": reorthogonalisation,
            }
        )
