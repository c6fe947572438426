r"""Spectral density estimation by stochastic Lanczos quadrature (SLQ).

The spectral density of a symmetric ``P x P`` operator ``A`` with eigenvalues
:math:`\lambda_1, \dots, \lambda_P`, normalised to a probability measure, is

.. math::
    \phi(t) = \frac{1}{P} \sum_{l=1}^{P} \delta(t - \lambda_l).

For a probe :math:`v = z / \sqrt{P}` with independent Rademacher entries
:math:`z_i = \pm 1`, :math:`\mathbb{E}[v^\top f(A) v] = \operatorname{tr} f(A) / P
= \int f \, d\phi`: the spectral measure of ``A`` seen from ``v`` is an unbiased
estimate of :math:`\phi`. After ``m`` Lanczos steps from ``v`` the tridiagonal
matrix :math:`T_m = S \operatorname{diag}(\theta) S^\top` gives the ``m``-point
Gauss quadrature of that measure, with nodes :math:`\theta_i` (the Ritz values) and
weights :math:`w_i = S_{1i}^2`:

.. math::
    v^\top f(A) v \approx \sum_{i=1}^{m} w_i f(\theta_i),

exact for every polynomial ``f`` of degree below ``2m``. Averaging ``R`` independent
probes and replacing each delta by a Gaussian of width :math:`\sigma` gives the
smooth estimate

.. math::
    \tilde\phi(t) = \frac{1}{R} \sum_{r=1}^{R} \sum_{i=1}^{m} w_{ri}
    \frac{1}{\sqrt{2\pi}\sigma} \exp\left(-\frac{(t - \theta_{ri})^2}{2\sigma^2}\right).

References:
    L. Lin, Y. Saad, C. Yang, "Approximating spectral densities of large matrices",
    SIAM Review 58(1), 2016 (the method, Gaussian broadening, its resolution).

    B. Ghorbani, S. Krishnan, Y. Xiao, "An investigation into neural net
    optimization via Hessian eigenvalue density", ICML 2019 (SLQ on neural-network
    Hessians; what PyHessian implements).

Unlike PyHessian, which runs its probes one after another, all ``R`` Lanczos
recurrences here advance together: each step multiplies ``A`` once with a
``[P, R]`` block (:meth:`~curvkit.CurvatureOperator.matmat`, one pass over the
data), while each run keeps its own basis and coefficients. The bases are fully
reorthogonalised (after the three-term recurrence, one classical Gram-Schmidt pass
against the whole basis, and a second one where the first cancelled much of the
vector: the criterion of Daniel, Gragg, Kaufman and Stewart, Math. Comp. 30, 1976),
so the nodes are accurate Ritz values with no spurious copies ("ghost
eigenvalues"). The price is memory for ``R * steps * P`` numbers of ``A``'s dtype
and ``O(R * steps^2 * P)`` work, which dominates for cheap operators with large
``P``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvkit.arguments import integer, positive_number
from curvkit.errors import CurvkitError, ShapeMismatchError
from curvkit.linalg._common import (
    Progress,
    check_square,
    non_finite_error,
    probe_generator,
    product_name,
    rademacher,
    require_fixed_map,
)
from curvkit.snapshot import fixed_model_state

__all__ = ["DensityResult", "density", "gaussian_broadening", "lanczos_quadrature"]

SIGMA_FRACTION = 0.01
"""Default broadening width as a fraction of the spectral range estimated from the nodes."""

GRID_MARGIN = 5.0
"""The default grid extends this many widths ``sigma`` beyond the extreme nodes."""

BREAKDOWN_TOL = 100.0
"""A run stops when ``beta_j <= BREAKDOWN_TOL * eps * max_k ||A q_k||`` (``eps`` of the dtype).

Stopping late is harmless (with full reorthogonalisation the run continues in a
fresh direction whose nodes get weights of order ``(beta_j / gap)^2``), so the threshold
only needs to catch exact invariance, not to judge near-invariance.
"""

DGKS = 2.0**-0.5
"""Reorthogonalise again when one pass leaves less than this fraction of the vector's norm."""


@dataclass(frozen=True)
class DensityResult:
    """A spectral density estimated by stochastic Lanczos quadrature.

    Attributes:
        grid: ``[G]`` points at which the density is evaluated.
        density: ``[G]`` values of the Gaussian-broadened density. It is normalised
            as a probability measure (it integrates to about 1 over a grid that
            covers the spectrum); multiply by ``P`` for a density of eigenvalue
            counts.
        nodes: ``[runs, steps]`` Gauss quadrature nodes (Ritz values) of each run,
            ascending. A run that broke down early (its Krylov space became
            invariant) has fewer true nodes; its row is padded by repeating its
            largest node, with weight 0.
        weights: ``[runs, steps]`` quadrature weights; each row sums to 1, padding
            entries are exactly 0.
        sigma: Width (standard deviation) of the Gaussian broadening.
        steps: Lanczos steps taken (the longest run): the requested number, clipped
            to ``P``, or fewer when every run broke down earlier.
        runs: Number of independent probes.
        matvecs: Products with ``A`` (columns), ``sum(run_steps)``; equal to
            ``runs * steps`` when no run broke down.
        run_steps: Lanczos steps taken by each run.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    steps: int
    runs: int
    matvecs: int
    run_steps: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, floats and ints (for JSON or HDF5 writers)."""
        return {
            "grid": self.grid.detach().cpu().tolist(),
            "density": self.density.detach().cpu().tolist(),
            "nodes": self.nodes.detach().cpu().tolist(),
            "weights": self.weights.detach().cpu().tolist(),
            "sigma": float(self.sigma),
            "steps": int(self.steps),
            "runs": int(self.runs),
            "matvecs": int(self.matvecs),
            "run_steps": [int(s) for s in self.run_steps],
        }


def _project_out(W: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """``W - B^T (B W)`` per run, for ``W`` [R, P] and orthonormal rows ``B`` [R, k, P]; and ``B W``."""
    c = W.unsqueeze(1) @ B.transpose(1, 2)  # [R, 1, k]; faster than bmm(B, W[..., None]) on CPU
    return W - (c @ B).squeeze(1), c.squeeze(1)


def _start_vectors(P: int, runs: int, seed: int | None, dtype: torch.dtype, device: Any) -> Tensor:
    """The ``[P, runs]`` unit Rademacher probes :func:`density` uses for ``seed``."""
    return rademacher(P, runs, probe_generator(seed), dtype, device) / math.sqrt(P)


@fixed_model_state()
def lanczos_quadrature(
    A: Any,
    start: Tensor,
    steps: int,
    progress: Progress | None = None,
) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    r"""Gauss quadrature of the spectral measures of ``A`` seen from several vectors.

    Runs one Lanczos recurrence with full reorthogonalisation per column of
    ``start``, all advancing together: each step is one ``A.matmat`` of the
    current vectors of the runs still going. Run ``r`` builds the tridiagonal
    :math:`T = S \operatorname{diag}(\theta) S^\top` and returns nodes
    :math:`\theta` and weights :math:`w_i = S_{1i}^2`, so that
    :math:`\sum_i w_i \theta_i^j = u^\top A^j u` for :math:`j < 2 m`, with
    :math:`u` the normalised start vector and ``m`` the run's step count.

    A run stops early (breakdown) when its new residual has norm
    ``beta <= 100 * eps * max ||A q||``: its Krylov space is invariant and its
    quadrature already exact for every polynomial. The other runs continue, and
    only their vectors enter the following products. The tridiagonal
    eigenproblems are solved in float64 on the CPU whatever ``A``'s dtype.

    Args:
        A: A symmetric operator with the :class:`~curvkit.CurvatureOperator`
            contract.
        start: ``[P, runs]`` nonzero starting vectors (normalised here).
        steps: Lanczos steps per run (clipped to ``P``).
        progress: Called after each step with ``{"step", "steps", "matvecs",
            "active"}``.

    Returns:
        ``(nodes, weights, run_steps)``: ``[runs, m]`` nodes (ascending) and
        weights in ``A``'s dtype and device, padded as in :class:`DensityResult`,
        and the number of steps of each run.

    Raises:
        ShapeMismatchError: ``A`` is not a square operator or ``start`` does not fit.
        CurvkitError: ``steps`` not an integer ``>= 1``, a zero starting vector or a non-symmetric
            operator.
        NonFiniteError: A product (or a value computed from it) is NaN or Inf; the
            message names the product, its run and step. Checked on the norms each
            step computes anyway: no extra synchronisation.
    """
    P = check_square(A)
    require_fixed_map(A, "Lanczos quadrature")
    steps = integer(steps, "steps")
    if not getattr(A, "SYMMETRIC", True):
        raise CurvkitError("Lanczos quadrature needs a symmetric operator; this one is flagged non-symmetric")
    if not isinstance(start, Tensor) or start.dim() != 2 or start.shape[0] != P or start.shape[1] < 1:
        got = tuple(start.shape) if isinstance(start, Tensor) else type(start).__name__
        raise ShapeMismatchError(f"start vectors must have shape [P, runs] with P = {P}, got {got}")
    dtype, device = A.dtype, A.device
    R = start.shape[1]
    m = min(steps, P)
    eps = torch.finfo(dtype).eps

    start = start.to(dtype=dtype, device=device)
    norms = start.norm(dim=0)
    if not bool((norms > 0).all()) or not bool(torch.isfinite(norms).all()):
        raise CurvkitError("every starting vector of Lanczos quadrature must be nonzero and finite")

    # Q[r, j] is the j-th Lanczos vector of run r: [runs, m, P] keeps each run's
    # basis contiguous for the batched reorthogonalisation.
    Q = torch.zeros(R, m, P, dtype=dtype, device=device)
    Q[:, 0] = (start / norms).T
    alpha = torch.zeros(R, m, dtype=torch.float64)
    beta = torch.zeros(R, m, dtype=torch.float64)
    last_beta = torch.zeros(R, dtype=dtype, device=device)  # beta_{j-1}, 0 for stopped runs
    scale = [0.0] * R
    run_steps = [0] * R
    active = list(range(R))
    matvecs = 0
    for j in range(m):
        if not active:
            break
        idx = torch.tensor(active, device=device)
        W = torch.zeros(R, P, dtype=dtype, device=device)  # rows of stopped runs stay 0
        # one pass for all active runs; detached so that no autograd graph builds up
        # (not torch.no_grad(): operators built on autograd may need the ambient grad mode)
        products = A.matmat(Q[idx, j].T.contiguous()).detach()
        W[idx] = products.T.to(dtype)
        matvecs += len(active)
        raw = W.norm(dim=1)
        # three-term recurrence, then one classical Gram-Schmidt pass against the whole basis
        a = (Q[:, j] * W).sum(dim=1)
        W = W - a[:, None] * Q[:, j]
        if j > 0:
            W = W - last_beta[:, None] * Q[:, j - 1]
        before = W.norm(dim=1)
        W, c = _project_out(W, Q[:, : j + 1])
        a = a + c[:, j]
        b = W.norm(dim=1)
        stats = torch.stack([a, b, raw, before], dim=1).to("cpu", torch.float64)
        finite = torch.isfinite(stats[active]).all(dim=1)
        if not bool(finite.all()):  # a NaN or Inf product makes its norm (raw) non-finite
            position = int((~finite).nonzero()[0].item())
            run = active[position]
            what = product_name(
                matvecs - len(active) + position + 1,
                f"Lanczos quadrature (density, run {run + 1}, step {j + 1})",
            )
            raise non_finite_error(products[:, position], what)
        # a second pass where the first cancelled much of the vector (Daniel, Gragg, Kaufman
        # and Stewart, Math. Comp. 1976): rare, except near breakdown
        again = [r for r in active if stats[r, 1] < DGKS * stats[r, 3]]
        if again:
            ia = torch.tensor(again, device=device)
            Wa, _ = _project_out(W[ia], Q[ia, : j + 1])
            W[ia] = Wa
            b[ia] = Wa.norm(dim=1)
            stats[again, 1] = b[ia].to("cpu", torch.float64)
        still = []
        for r in active:
            alpha[r, j] = stats[r, 0]
            scale[r] = max(scale[r], stats[r, 2].item())
            run_steps[r] = j + 1
            if j + 1 < m and stats[r, 1].item() > BREAKDOWN_TOL * eps * scale[r]:
                beta[r, j] = stats[r, 1]
                still.append(r)
        if j + 1 < m:
            go = torch.zeros(R, dtype=torch.bool)
            go[still] = True
            go = go.to(device)
            safe_b = torch.where(go, b, torch.ones_like(b))
            last_beta = torch.where(go, b, torch.zeros_like(b))
            Q[:, j + 1] = W * (go / safe_b)[:, None]
        active = still
        if progress is not None:
            progress({"step": j + 1, "steps": m, "matvecs": matvecs, "active": len(active)})

    width = max(run_steps)
    nodes = torch.zeros(R, width, dtype=torch.float64)
    weights = torch.zeros(R, width, dtype=torch.float64)
    for r in range(R):
        k = run_steps[r]
        off = beta[r, : k - 1]
        T = torch.diag(alpha[r, :k]) + torch.diag(off, 1) + torch.diag(off, -1)
        theta, S = torch.linalg.eigh(T)
        nodes[r, :k] = theta
        nodes[r, k:] = theta[-1]
        weights[r, :k] = S[0] ** 2
    return nodes.to(dtype=dtype, device=device), weights.to(dtype=dtype, device=device), tuple(run_steps)


def gaussian_broadening(nodes: Tensor, weights: Tensor, grid: Tensor, sigma: float) -> Tensor:
    r"""Average over runs of Gaussian-broadened quadratures, evaluated on ``grid``.

    .. math::
        \tilde\phi(t) = \frac{1}{R} \sum_{r, i} w_{ri} \, \mathcal{N}(t; \theta_{ri}, \sigma^2).

    Computed in float64 on the CPU (the inputs are small), in chunks of the grid.

    Args:
        nodes: ``[runs, m]`` quadrature nodes.
        weights: ``[runs, m]`` quadrature weights.
        grid: ``[G]`` evaluation points.
        sigma: Standard deviation of the Gaussians (positive).

    Returns:
        ``[G]`` float64 CPU tensor.
    """
    runs = nodes.shape[0]
    theta = nodes.detach().to("cpu", torch.float64).reshape(-1)
    w = weights.detach().to("cpu", torch.float64).reshape(-1)
    keep = w > 0
    theta, w = theta[keep], w[keep]
    t = grid.detach().to("cpu", torch.float64).reshape(-1)
    out = torch.empty_like(t)
    chunk = max(1, 2**22 // max(1, theta.numel()))
    norm = 1.0 / (runs * sigma * math.sqrt(2.0 * math.pi))
    for s in range(0, t.numel(), chunk):
        z = (t[s : s + chunk, None] - theta[None, :]) / sigma
        out[s : s + chunk] = norm * (torch.exp(-0.5 * z * z) @ w)
    return out


def _default_sigma(lo: float, hi: float) -> float:
    span = hi - lo
    if not span > 1e-12 * max(abs(lo), abs(hi)):  # a single distinct node (e.g. A = c I)
        span = max(abs(lo), abs(hi))
    if not span > 0:  # A = 0
        span = 1.0
    return SIGMA_FRACTION * span


@fixed_model_state()
def density(
    A: Any,
    steps: int = 100,
    runs: int = 5,
    seed: int | None = 0,
    grid: Tensor | Sequence[float] | None = None,
    grid_size: int = 1000,
    sigma: float | None = None,
    progress: Progress | None = None,
) -> DensityResult:
    r"""Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    Each of ``runs`` probes :math:`v_r = z_r / \sqrt{P}` (``z_r`` Rademacher, from
    ``seed``) gives a ``steps``-point Gauss quadrature :math:`(\theta_{ri}, w_{ri})`
    of the spectral measure of ``A`` seen from :math:`v_r` (see the module
    docstring: Lin, Saad and Yang, SIAM Review 2016; Ghorbani, Krishnan and Xiao,
    ICML 2019). The returned density is

    .. math::
        \tilde\phi(t) = \frac{1}{R} \sum_{r=1}^{R} \sum_{i} w_{ri}
        \, \mathcal{N}(t; \theta_{ri}, \sigma^2),

    an estimate of :math:`\frac{1}{P}\sum_l \delta(t - \lambda_l)` smoothed at
    width :math:`\sigma`: a probability density (multiply by ``P`` for a density of
    eigenvalue counts, e.g. ``P * integral over [a, b]`` estimates how many
    eigenvalues lie in ``[a, b]``).

    All runs advance together: each Lanczos step is **one** ``A.matmat`` with a
    ``[P, runs]`` block (one pass over the data), ``steps`` data passes in all.
    The Lanczos bases are fully reorthogonalised, so nodes are accurate (no ghost
    eigenvalues); this keeps ``runs * steps * P`` numbers in memory.

    Defaults and their reasons:

    * ``steps=100``: PyHessian's default; ``steps`` is clipped to ``P`` (a Krylov
      space has at most ``P`` dimensions). A run whose Krylov space becomes
      invariant stops early (breakdown); its nodes and weights are padded with
      weight 0 (see :class:`DensityResult`).
    * ``sigma = 0.01 * (max node - min node)``: 1% of the spectral range seen by
      the quadrature. With ``m`` nodes per run the quadrature resolves features of
      the density no finer than about ``range / m`` (Lin, Saad and Yang, sec. 3),
      so a kernel of comparable width (1% for the default 100 steps) turns the
      discrete quadrature into a smooth curve without blurring what it resolves.
      Ghorbani et al. and PyHessian use a much narrower kernel (PyHessian: variance
      ``1e-5 * max(1, range)`` on 10,000 bins), which draws each node as a spike
      and needs a very fine grid; pass ``sigma`` (and ``grid_size``) to reproduce
      that. When all nodes coincide, 1% of their magnitude (or 0.01) is used.
    * grid: ``grid_size`` equally spaced points on
      ``[min node - 5 sigma, max node + 5 sigma]``, which holds all but ~6e-7 of
      the mass of every Gaussian; with the default width the spacing is about
      ``sigma / 9``, fine enough for the trapezoid rule to integrate the density
      to 1 within ~1e-6. A user-chosen ``sigma`` much smaller than the spacing
      needs a larger ``grid_size``; the density is never renormalised on the grid.

    Args:
        A: A symmetric operator with the :class:`~curvkit.CurvatureOperator`
            contract (``shape``, ``matmat``, ``dtype``, ``device``), e.g. a
            restriction to one parameter block.
        steps: Lanczos steps (quadrature nodes) per run.
        runs: Number of independent Rademacher probes.
        seed: Seed of the probes (the same probes on every device; ``None``: fresh
            randomness).
        grid: Points at which to evaluate the density (default: see above).
        grid_size: Number of points of the default grid (at least 2).
        sigma: Width of the Gaussian broadening (default: see above).
        progress: Called after each Lanczos step with ``{"step": j, "steps": m,
            "matvecs": ..., "active": runs still going}``.

    Returns:
        A :class:`DensityResult`; tensors are on ``A.device`` in ``A.dtype``.

    Raises:
        ShapeMismatchError: ``A`` is not a square operator.
        CurvkitError: ``steps`` or ``runs`` not an integer ``>= 1``, a ``sigma``
            not a finite number ``> 0``, a ``grid_size`` not an integer ``>= 2``,
            an empty grid or a non-symmetric operator.
        NonFiniteError: A product is NaN or Inf (the message names it).

    Example:
        A diagonal operator with ``steps = P``: the nodes are its diagonal, and
        each weight is ``1 / P`` (a Rademacher probe has equal components).

        >>> import torch, curvkit
        >>> from curvkit.linalg.slq import density
        >>> diag = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
        >>> dens = density(curvkit.DenseOperator(torch.diag(diag)), steps=4, runs=2)
        >>> torch.allclose(dens.nodes, diag.expand(2, 4))
        True
        >>> torch.allclose(dens.weights, torch.full((2, 4), 0.25, dtype=torch.float64))
        True
        >>> dens.matvecs, round(float(torch.trapezoid(dens.density, dens.grid)), 6)
        (8, 1.0)
    """
    P = check_square(A)
    steps = integer(steps, "steps")
    runs = integer(runs, "runs")
    if sigma is not None:
        sigma = positive_number(sigma, "sigma")
    if grid is None:
        grid_size = integer(grid_size, "grid_size", minimum=2)
    else:
        grid = torch.as_tensor(grid).detach().to("cpu", torch.float64).reshape(-1)
        if grid.numel() == 0 or not bool(torch.isfinite(grid).all()):
            raise CurvkitError("grid must hold at least one finite point")

    start = _start_vectors(P, runs, seed, A.dtype, A.device)
    nodes, weights, run_steps = lanczos_quadrature(A, start, steps, progress)

    valid = (
        torch.arange(nodes.shape[1], device=nodes.device)
        < torch.tensor(run_steps, device=nodes.device)[:, None]
    )
    lo, hi = float(nodes[valid].min()), float(nodes[valid].max())
    sigma = sigma if sigma is not None else _default_sigma(lo, hi)
    if grid is None:
        margin = GRID_MARGIN * sigma
        grid = torch.linspace(lo - margin, hi + margin, int(grid_size), dtype=torch.float64)
    values = gaussian_broadening(nodes, weights, grid, sigma)
    return DensityResult(
        grid=grid.to(dtype=A.dtype, device=A.device),
        density=values.to(dtype=A.dtype, device=A.device),
        nodes=nodes,
        weights=weights,
        sigma=sigma,
        steps=nodes.shape[1],
        runs=runs,
        matvecs=sum(run_steps),
        run_steps=run_steps,
    )
