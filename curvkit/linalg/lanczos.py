"""Thick-restart Lanczos for a few eigenpairs of a symmetric operator.

Each step subtracts the three-term recurrence ``beta_j v_{j-1} + alpha_j v_j``
and then reorthogonalises against the whole basis (classical Gram-Schmidt, with a
second pass only when the first cancels much of the vector: the DGKS criterion,
"twice is enough", Giraud et al., Numer. Math. 2005), so no ghost eigenvalues
appear. When the basis reaches ``max_basis`` vectors, the Ritz vectors nearest
the wanted end of the spectrum are kept and the process continues from the last
residual: the thick restart of K. Wu and H. Simon, "Thick-restart Lanczos method
for large symmetric eigenvalue problems", SIAM J. Matrix Anal. Appl. 22(2), 2000.

The basis is kept in the precision the caller asks for (the operator's own);
the projected matrix ``T`` and its eigendecomposition are always float64.

A Ritz pair ``(theta, y)`` has residual ``||A y - theta y|| = |beta_m s_{m,i}|``
in exact arithmetic; the returned pairs also come with ``A y`` itself, combined
from the stored products ``A v_i`` (or the caller applies ``A`` once more), so
the caller's residuals are certificates: every interval ``[theta - r, theta + r]``
contains an eigenvalue of ``A`` (for symmetric ``A``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LanczosState", "thick_restart_lanczos", "select_ritz"]

WHICH = ("largest", "smallest", "both_ends", "largest_magnitude")

REORTHOGONALISE = 2**-0.5
"""A second Gram-Schmidt pass runs when the first shrinks ``w`` below this fraction
of its norm (the DGKS criterion: J. W. Daniel, W. B. Gragg, L. Kaufman and
G. W. Stewart, "Reorthogonalization and stable algorithms for updating the
Gram-Schmidt QR factorization", Math. Comp. 30(136), 1976). Without that much
cancellation one pass already leaves ``w`` orthogonal to working precision."""

PRODUCT_STORE_BYTES = 512 * 2**20
"""Keep the products ``A v_i`` next to the basis when they take at most this many
bytes. The returned pairs' ``A y = (A V) s`` then come from the stored products,
so their residual certificates need no further product; above it, the caller
recomputes them (one more product per pair)."""


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
    products: Tensor | None = None
    """``A @ vectors`` combined from the stored products (``None`` when the
    products were not kept: see :data:`PRODUCT_STORE_BYTES`)."""


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
    V = torch.empty(m + 1, dim, dtype=dtype, device=device)  # basis as rows: contiguous sweeps
    itemsize = torch.finfo(dtype).bits // 8
    store = (m + 1) * dim * itemsize <= PRODUCT_STORE_BYTES
    W = torch.empty(m + 1, dim, dtype=dtype, device=device) if store else None  # W[i] = A V[i]
    T = torch.zeros(m, m, dtype=torch.float64)  # small: on the CPU, always in float64
    breakdown_tol = max(1e-12, 10 * torch.finfo(dtype).eps)
    if v0 is None:
        v0 = torch.randn(dim, dtype=dtype, generator=generator).to(device)
    V[0] = v0 / v0.norm()
    j = 0  # rows of V in use before this step: kept Ritz vectors, then Lanczos vectors
    start = 0  # first Lanczos vector after the kept Ritz vectors
    beta = 0.0
    matvecs = restarts = 0
    while True:
        w = matvec(V[j])
        matvecs += 1
        if W is not None:
            W[j] = w
        h = torch.zeros(j + 1, dtype=torch.float64)
        if j > start:  # three-term recurrence: A v_j = beta v_{j-1} + alpha v_j + ...
            w = w - beta * V[j - 1]
            alpha = torch.dot(V[j], w)
            w = w - alpha * V[j]
            h[j - 1] = beta
            h[j] = alpha.item()
        basis = V[: j + 1]
        for _ in range(2):  # full reorthogonalisation; a second pass only after cancellation
            norm_before = w.norm()
            correction = basis @ w
            w = w - correction @ basis
            h += correction.to(device="cpu", dtype=torch.float64)
            norm_after = w.norm()
            if norm_after >= REORTHOGONALISE * norm_before:
                break
        beta = norm_after.item()
        T[: j + 1, j] = h
        T[j, : j + 1] = h
        size = j + 1
        if progress is not None:
            progress({"matvecs": matvecs, "basis": size, "restarts": restarts})
        scale = max(T[:size, :size].abs().max().item(), 1e-300)
        breakdown = beta <= breakdown_tol * scale or size == dim  # invariant subspace found
        if size < min(k, dim) and not breakdown and matvecs < budget:
            V[size] = w / beta
            j = size
            continue
        # Ritz pairs of the current basis; their residuals are |beta * last component|
        theta, S = torch.linalg.eigh(T[:size, :size])
        res = torch.zeros_like(theta) if breakdown else (beta * S[size - 1, :]).abs()
        S_basis = S.to(device=device, dtype=dtype)
        wanted = select_ritz(theta, k, which)
        spectral = max(theta.abs().max().item(), 1e-300)
        done = breakdown or bool((res[wanted] <= tol * spectral).all())
        if done or matvecs >= budget:
            combine = S_basis[:, wanted].T
            return LanczosState(
                values=theta[wanted].to(device),
                vectors=(combine @ V[:size]).T,
                residual_estimates=res[wanted].to(device),
                matvecs=matvecs,
                restarts=restarts,
                converged=done,
                spectral_radius=spectral,
                products=None if W is None else (combine @ W[:size]).T,
            )
        if size < m:
            V[size] = w / beta
            j = size
            continue
        # thick restart: keep the wanted Ritz vectors plus some neighbours, continue from w
        keep_count = min(size - 1, max(k + (size - k) // 2, k))
        keep = select_ritz(theta, keep_count, which)
        p = keep.numel()
        combine = S_basis[:, keep].T
        V[:p] = combine @ V[:size]
        if W is not None:
            W[:p] = combine @ W[:size]
        coupling = beta * S[size - 1, keep]
        T.zero_()
        V[p] = w / beta
        T[torch.arange(p), torch.arange(p)] = theta[keep]
        T[p, :p] = coupling
        T[:p, p] = coupling
        j = start = p
        restarts += 1
