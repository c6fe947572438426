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
    spectral_radius: float


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
            ``<= tol * max |theta|``, the largest Ritz value in magnitude (an
            estimate of the spectral radius ``||A||``). Convergence is checked
            after every product.
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
    V = torch.zeros(m + 1, dim, dtype=dtype, device=device)  # basis as rows: contiguous sweeps
    T = torch.zeros(m, m, dtype=dtype, device=device)
    if v0 is None:
        v0 = torch.randn(dim, dtype=dtype, generator=generator).to(device)
    V[0] = v0 / v0.norm()
    j = 0  # rows of V in use before this step: kept Ritz vectors, then Lanczos vectors
    matvecs = restarts = 0
    while True:
        w = matvec(V[j])
        matvecs += 1
        basis = V[: j + 1]
        h = basis @ w
        w = w - h @ basis
        correction = basis @ w  # second Gram-Schmidt pass ("twice is enough")
        w = w - correction @ basis
        h = h + correction
        T[: j + 1, j] = h
        T[j, : j + 1] = h
        beta = w.norm()
        size = j + 1
        if progress is not None:
            progress({"matvecs": matvecs, "basis": size, "restarts": restarts})
        scale = max(T[:size, :size].abs().max().item(), 1e-300)
        breakdown = bool(beta <= 1e-12 * scale) or size == dim  # invariant subspace found
        if size < min(k, dim) and not breakdown and matvecs < budget:
            V[size] = w / beta
            j = size
            continue
        # Ritz pairs of the current basis; their residuals are |beta * last component|
        theta, S = torch.linalg.eigh(T[:size, :size])
        res = torch.zeros_like(theta) if breakdown else (beta * S[size - 1, :]).abs()
        wanted = select_ritz(theta, k, which)
        spectral = max(theta.abs().max().item(), 1e-300)
        done = breakdown or bool((res[wanted] <= tol * spectral).all())
        if done or matvecs >= budget:
            Y = S[:, wanted].T @ V[:size]
            return LanczosState(
                theta[wanted], Y.T.contiguous(), res[wanted], matvecs, restarts, done, spectral
            )
        if size < m:
            V[size] = w / beta
            j = size
            continue
        # thick restart: keep the wanted Ritz vectors plus some neighbours, continue from w
        keep_count = min(size - 1, max(k + (size - k) // 2, k))
        keep = select_ritz(theta, keep_count, which)
        p = keep.numel()
        Y = S[:, keep].T @ V[:size]
        coupling = beta * S[size - 1, keep]
        V.zero_()
        T.zero_()
        V[:p] = Y
        V[p] = w / beta
        T[torch.arange(p), torch.arange(p)] = theta[keep]
        T[p, :p] = coupling
        T[:p, p] = coupling
        j = p
        restarts += 1
