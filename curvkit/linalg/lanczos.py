"""Thick-restart Lanczos for a few eigenpairs of a symmetric operator.

The Krylov basis is kept fully reorthogonalised (twice, "twice is enough":
Giraud et al., Numer. Math. 2005), so no ghost eigenvalues appear. When the basis
reaches ``max_basis`` vectors, the Ritz vectors nearest the wanted end of the
spectrum are kept and the process continues from the last residual: the thick
restart of K. Wu and H. Simon, "Thick-restart Lanczos method for large symmetric
eigenvalue problems", SIAM J. Matrix Anal. Appl. 22(2), 2000.

A Ritz pair ``(theta, y)`` has residual ``||A y - theta y|| = |beta_m s_{m,i}|``
during the iteration; the returned residuals are recomputed explicitly with one
more product, so they are certificates: every interval
``[theta - r, theta + r]`` contains an eigenvalue of ``A`` (for symmetric ``A``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LanczosState", "thick_restart_lanczos", "select_ritz"]

WHICH = ("largest", "smallest", "both_ends", "largest_magnitude")


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
    """What :func:`thick_restart_lanczos` returns (before explicit certificates)."""

    values: Tensor
    vectors: Tensor
    residual_estimates: Tensor
    matvecs: int
    restarts: int
    converged: bool


def _orthogonalize(w: Tensor, V: Tensor) -> Tensor:
    """Remove the components of ``w`` along the orthonormal columns of ``V`` (twice)."""
    if V.shape[1] == 0:
        return w
    for _ in range(2):
        w = w - V @ (V.T @ w)
    return w


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
) -> LanczosState:
    """Wanted eigenpairs of a symmetric ``dim x dim`` operator given by ``matvec``.

    Args:
        matvec: ``v -> A v`` for a flat vector.
        dim: Dimension of ``A``.
        k: Number of eigenpairs.
        which: ``"largest"``, ``"smallest"``, ``"both_ends"`` or
            ``"largest_magnitude"``.
        tol: Stop when every wanted Ritz pair has residual
            ``<= tol * max |theta|`` (relative to the spectral radius estimate).
        max_basis: Krylov basis size before a restart (default
            ``min(dim, max(2k + 20, 40))``).
        max_matvecs: Budget of products (default ``max(50 * dim ** 0.5, 20 k, 300)``,
            capped so that it is finite).
        v0: Starting vector (default: Gaussian from ``generator``).
        progress: Called after each product with a dict of counters.

    Returns:
        The Ritz values in ascending order, their vectors, residual estimates,
        the number of products, restarts, and whether ``tol`` was reached.
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    m = max_basis or min(dim, max(2 * k + 20, 40))
    m = max(min(m, dim), min(k + 1, dim))
    budget = max_matvecs or int(max(50 * dim**0.5, 20 * k, 300))
    V = torch.zeros(dim, m + 1, dtype=dtype, device=device)
    T = torch.zeros(m, m, dtype=dtype, device=device)
    if v0 is None:
        v0 = torch.randn(dim, dtype=dtype, generator=generator).to(device)
    V[:, 0] = v0 / v0.norm()
    start = 0  # columns of V already holding kept Ritz vectors + the continuation vector
    matvecs = restarts = 0
    beta = torch.zeros((), dtype=dtype, device=device)
    while True:
        j = start
        breakdown = False
        while j < m:
            w = matvec(V[:, j])
            matvecs += 1
            h = V[:, : j + 1].T @ w
            T[: j + 1, j] = h
            T[j, : j + 1] = h
            w = _orthogonalize(w - V[:, : j + 1] @ h, V[:, : j + 1])
            beta = w.norm()
            if progress is not None:
                progress({"matvecs": matvecs, "basis": j + 1, "restarts": restarts})
            scale = max(T[: j + 1, : j + 1].abs().max().item(), 1e-300)
            if beta <= 1e-12 * scale or j + 1 == dim:  # invariant subspace found
                j += 1
                breakdown = True
                break
            V[:, j + 1] = w / beta
            j += 1
            if matvecs >= budget:
                break
        size = j
        theta, S = torch.linalg.eigh(T[:size, :size])
        res = (beta * S[size - 1, :]).abs() if not breakdown else torch.zeros_like(theta)
        wanted = select_ritz(theta, k, which)
        spectral = max(theta.abs().max().item(), 1e-300)
        done = bool((res[wanted] <= tol * spectral).all()) or breakdown
        if done or matvecs >= budget:
            Y = V[:, :size] @ S[:, wanted]
            return LanczosState(theta[wanted], Y, res[wanted], matvecs, restarts, done)
        # thick restart: keep the wanted Ritz vectors plus some neighbours
        keep_count = min(size - 1, max(k + (size - k) // 2, k))
        keep = select_ritz(theta, keep_count, which)
        Y = V[:, :size] @ S[:, keep]
        p = keep.numel()
        coupling = beta * S[size - 1, keep]
        V.zero_()
        T.zero_()
        V[:, :p] = Y
        V[:, p] = (w / beta) if beta > 0 else torch.zeros(dim, dtype=dtype, device=device)
        T[torch.arange(p), torch.arange(p)] = theta[keep]
        T[p, :p] = coupling
        T[:p, p] = coupling
        start = p
        restarts += 1
