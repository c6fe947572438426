"""Thick-restart Lanczos with full and partial reorthogonalisation, against dense eigh."""

from __future__ import annotations

import pytest
import torch

from curvkit.linalg import lanczos
from curvkit.linalg.lanczos import thick_restart_lanczos

MODES = ("full", "partial")


def symmetric_with_spectrum(spectrum: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(spectrum.numel(), spectrum.numel(), generator=g, dtype=torch.float64))[0]
    return Q @ torch.diag(spectrum) @ Q.T


def dominant_plus_cluster(n: int = 400) -> torch.Tensor:
    """One eigenvalue far above a tight cluster and a bulk: Lanczos finds the dominant
    one in a few steps and then loses orthogonality towards it, fastest of all
    (plain Lanczos would return copies of it: "ghosts")."""
    bulk = torch.linspace(0.0, 1.0, n - 4, dtype=torch.float64)
    return torch.cat([bulk, torch.tensor([1.9, 1.95, 2.0, 100.0], dtype=torch.float64)])


def run(A: torch.Tensor, k: int, tol: float, mode: str, dtype=torch.float64, **kwargs):
    A = A.to(dtype)
    g = torch.Generator().manual_seed(1)
    return thick_restart_lanczos(
        lambda v: A @ v, A.shape[0], k, tol=tol, dtype=dtype, generator=g, reorthogonalisation=mode, **kwargs
    )


def check_pairs(
    A: torch.Tensor,
    state,
    truth: torch.Tensor,
    tol: float,
    values_rtol: float,
    orthogonality: float | None = None,
) -> None:
    """Values to ``values_rtol`` and residuals to ``tol``, both relative to ``||A||``."""
    radius = torch.linalg.matrix_norm(A, ord=2)
    torch.testing.assert_close(state.values.double(), truth, rtol=0, atol=values_rtol * radius)
    Y = state.vectors.double()
    k = Y.shape[1]
    torch.testing.assert_close(
        Y.T @ Y,
        torch.eye(k, dtype=torch.float64),
        rtol=0,
        atol=orthogonality or 50 * torch.finfo(state.vectors.dtype).eps,
    )
    explicit = (A @ Y - Y * state.values.double()).norm(dim=0)
    assert (explicit <= 2 * tol * radius).all(), explicit


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("which", ["largest", "smallest", "both_ends"])
def test_modes_match_dense_eigh_in_float64(mode, which):
    spectrum = dominant_plus_cluster()
    A = symmetric_with_spectrum(spectrum)
    state = run(A, 4, 1e-10, mode, which=which)
    assert state.converged
    ascending = spectrum.sort().values
    truth = {"largest": ascending[-4:], "smallest": ascending[:4], "both_ends": ascending[[0, 1, -2, -1]]}[
        which
    ]
    check_pairs(A, state, truth, 1e-10, 1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_modes_match_dense_eigh_in_float32(mode):
    spectrum = dominant_plus_cluster()
    A = symmetric_with_spectrum(spectrum)
    state = run(A, 4, 1e-4, mode, dtype=torch.float32)
    assert state.converged and state.vectors.dtype == torch.float32
    check_pairs(A, state, spectrum.sort().values[-4:], 1e-4, 1e-5)


def test_partial_reorthogonalises_some_steps_and_leaves_no_ghosts(monkeypatch):
    """The dominant eigenvalue converges early, so orthogonality is lost within a few
    steps: partial reorthogonalisation must step in (else 100 would come back twice),
    but far less often than at every step."""
    sweeps = []
    original = lanczos._Orthogonality.reset

    def counted(self, j, again):
        sweeps.append(j)
        return original(self, j, again)

    monkeypatch.setattr(lanczos._Orthogonality, "reset", counted)
    spectrum = dominant_plus_cluster()
    A = symmetric_with_spectrum(spectrum)
    state = run(A, 4, 1e-10, "partial", max_basis=200)
    assert state.converged and state.restarts == 0
    check_pairs(A, state, spectrum.sort().values[-4:], 1e-10, 1e-10)
    lanczos_steps = state.matvecs - 1  # the first step always sweeps the (one-vector) basis
    assert 2 <= len(sweeps) - 1 <= lanczos_steps // 2, (len(sweeps), state.matvecs)


@pytest.mark.parametrize("mode", MODES)
def test_modes_converge_through_many_restarts(mode):
    spectrum = dominant_plus_cluster()
    A = symmetric_with_spectrum(spectrum)
    state = run(A, 4, 1e-9, mode, max_basis=12)
    assert state.converged and state.restarts >= 2
    check_pairs(A, state, spectrum.sort().values[-4:], 1e-9, 1e-9)


def test_auto_is_partial_only_with_stored_products(monkeypatch):
    built = []
    original = lanczos._Orthogonality.__init__

    def tracked(self, *args):
        built.append(True)
        original(self, *args)

    monkeypatch.setattr(lanczos._Orthogonality, "__init__", tracked)
    A = symmetric_with_spectrum(dominant_plus_cluster(60))
    stored = run(A, 2, 1e-10, "auto")
    assert built and stored.products is not None
    built.clear()
    monkeypatch.setattr(lanczos, "PRODUCT_STORE_BYTES", 0)
    unstored = run(A, 2, 1e-10, "auto")
    assert not built and unstored.products is None
    torch.testing.assert_close(stored.values, unstored.values, rtol=1e-12, atol=0)


def test_unknown_reorthogonalisation_is_refused():
    with pytest.raises(ValueError, match="reorthogonalisation"):
        run(torch.eye(5, dtype=torch.float64), 1, 1e-8, "sometimes")


def test_gram_projection_drops_copies_instead_of_failing():
    """A basis holding a vector twice (the state after orthogonality is lost) has a
    singular Gram matrix: the projection keeps the directions it spans, finite and
    orthonormal, where a Cholesky factorisation failed."""
    A = symmetric_with_spectrum(dominant_plus_cluster(50))
    g = torch.Generator().manual_seed(2)
    V = torch.linalg.qr(torch.randn(50, 6, generator=g, dtype=torch.float64))[0].T
    V = torch.cat([V, V[:2] + 1e-12 * torch.randn(2, 50, generator=g, dtype=torch.float64)])
    theta, S = lanczos._rayleigh_ritz(V, V @ A)
    assert theta.numel() == 6 and torch.isfinite(S).all()
    Y = S.T @ V
    torch.testing.assert_close(Y @ Y.T, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-10)
    Q = torch.linalg.qr(V[:6].T)[0]
    torch.testing.assert_close(theta, torch.linalg.eigvalsh(Q.T @ A @ Q), rtol=0, atol=1e-10)


def test_restart_falls_back_to_the_pairs_of_t(monkeypatch):
    """If a restart from the Gram-matrix projection finds no new direction, the run
    restarts from T's pairs and goes on with full reorthogonalisation."""
    monkeypatch.setattr(lanczos, "_refined_restart", lambda *args: None)
    spectrum = dominant_plus_cluster()
    A = symmetric_with_spectrum(spectrum)
    state = run(A, 4, 1e-6, "partial", max_basis=12)
    assert state.converged and state.restarts >= 1 and state.full_from is not None
    # the vectors kept at that restart were only semi-orthogonal (about sqrt(eps)):
    # so are the returned ones, and the pairs are good to that level, not to eps
    check_pairs(A, state, spectrum.sort().values[-4:], 1e-6, 1e-8, orthogonality=1e-7)


def test_asymmetric_product_errors_switch_partial_to_full_at_once():
    """Products with an error ``1e-6 ||A||`` that is not symmetric (``u.Av != v.Au``):
    Simon's estimates, which assume errors of ``eps ||A||``, would let the basis go;
    the measured neighbours ``v_{j-1}.w`` show it at the first Lanczos step."""
    spectrum = dominant_plus_cluster()
    A = symmetric_with_spectrum(spectrum)
    g = torch.Generator().manual_seed(3)
    E = torch.randn(400, 400, generator=g, dtype=torch.float64)
    noisy = A + 1e-6 * 100.0 * E / torch.linalg.matrix_norm(E, ord=2)
    state = thick_restart_lanczos(
        lambda v: noisy @ v, 400, 4, tol=1e-5, generator=torch.Generator().manual_seed(1)
    )
    assert state.converged and state.full_from is not None and state.full_from <= 3
    check_pairs(A, state, spectrum.sort().values[-4:], 2e-5, 1e-5)


def test_clean_products_never_switch():
    spectrum = dominant_plus_cluster()
    state = run(symmetric_with_spectrum(spectrum), 4, 1e-10, "auto", max_basis=12)
    assert state.converged and state.restarts >= 2 and state.full_from is None


def test_a_sweep_that_finds_the_estimates_undercounting_rejects_them():
    omega = lanczos._Orthogonality(10, torch.float64)
    omega.estimate = 1e-7  # the estimate that asked for the sweep
    assert omega.confirms(torch.tensor([1e-8, 5e-7]), beta_next=1.0)
    assert not omega.confirms(torch.tensor([1e-8, 5e-6]), beta_next=1.0)  # 50x the estimate
