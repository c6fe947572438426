"""The anisotropic Nesterov cubic-regularised step (curvkit.cubic), checked against brute force in float64."""

from __future__ import annotations

import math

import pytest
import torch

from curvkit.cubic import CASES, CubicStep, UnboundedModelError, cubic_step
from curvkit.errors import CurvkitError, NonFiniteError, ShapeMismatchError

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Small batched linear algebra runs fastest on one thread (and does not fight the others)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(E: torch.Tensor, g, H, d, lam) -> torch.Tensor:
    """m at each row of ``E`` ``[N, S]``."""
    r = torch.linalg.vector_norm(E * d, dim=-1)
    return -E @ g + 0.5 * ((E @ H) * E).sum(-1) + lam / 6.0 * r**3


def _local_minima(g, H, d, lam, n=200, seed=0, iters=80):
    """``(values, points)`` of ``n`` damped-Newton local minimisations of m from random starts.

    Independent of the secular equation: each start follows Levenberg-damped
    Newton steps on ``m`` (the Hessian shifted to positive definite), a step kept
    only when ``m`` decreases.
    """
    gen = torch.Generator().manual_seed(seed)
    S = g.numel()
    scales = 10.0 ** (4.0 * torch.rand(n, 1, generator=gen, dtype=F64) - 2.0)
    E = torch.randn(n, S, generator=gen, dtype=F64) * scales
    c, d2 = lam / 2.0, d * d
    value = _model(E, g, H, d, lam)
    damp = torch.full((n,), 1e-3, dtype=F64)
    stalled = 0
    eye = torch.eye(S, dtype=F64)
    for _ in range(iters):
        r = torch.linalg.vector_norm(E * d, dim=-1, keepdim=True)
        grad = -g + E @ H + c * r * d2 * E
        U = d2 * E
        hess = (
            H
            + c * r[..., None] * torch.diag(d2)
            + c * U[:, :, None] * U[:, None, :] / r.clamp_min(1e-300)[..., None]
        )
        w = torch.linalg.eigvalsh(hess)[:, 0]
        shift = (-w).clamp_min(0.0) + damp
        step = torch.linalg.solve(hess + shift[:, None, None] * eye, grad)
        trial = E - step
        new = _model(trial, g, H, d, lam)
        better = new < value
        stalled = 0 if bool((new < value - 1e-15 * value.abs()).any()) else stalled + 1
        E = torch.where(better[:, None], trial, E)
        value = torch.where(better, new, value)
        damp = torch.where(better, damp / 3.0, damp * 4.0).clamp(1e-14, 1e14)
        if stalled == 3:
            break
    return value, E


def _residual(step: CubicStep, g, H, d, lam) -> float:
    """Relative residual of ``eta = (H + (lam / 2) ||D eta|| D^2)^-1 g``."""
    eta = step.eta
    r = float(torch.linalg.vector_norm(d * eta))
    terms = (H @ eta, lam / 2 * r * d * d * eta, g)
    res = terms[0] + terms[1] - terms[2]
    scale = sum(float(torch.linalg.vector_norm(t)) for t in terms) + 1e-300
    return float(torch.linalg.vector_norm(res)) / scale


def _problem(S: int, kind: str, zeros: bool, seed: int):
    """A random bounded problem: H PSD or indefinite, d with or without zeros (H_ZZ positive definite)."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(S, S, generator=gen, dtype=F64)
    if kind == "psd":
        H = A @ A.T / S
    else:
        H = (A + A.T) / 2
    g = torch.randn(S, generator=gen, dtype=F64)
    d = 0.2 + 2.0 * torch.rand(S, generator=gen, dtype=F64)
    if zeros and S > 1:
        n_zero = int(torch.randint(1, S, (1,), generator=gen))
        Z = torch.randperm(S, generator=gen)[:n_zero]
        d[Z] = 0.0
        B = torch.randn(n_zero, n_zero, generator=gen, dtype=F64)
        block = H[Z[:, None], Z[None, :]] if kind == "psd" else B @ B.T / n_zero
        H[Z[:, None], Z[None, :]] = block + 0.3 * torch.eye(n_zero, dtype=F64)
    lam = float(10.0 ** (2.0 * torch.rand(1, generator=gen, dtype=F64) - 1.0))
    return g, H, d, lam


CONFIGS = [(S, kind, zeros) for S in range(1, 9) for kind in ("psd", "indefinite") for zeros in (False, True)]


@pytest.mark.parametrize("S,kind,zeros", CONFIGS, ids=lambda v: str(v))
def test_global_minimiser_against_random_starts(S, kind, zeros):
    for seed in range(3):
        g, H, d, lam = _problem(S, kind, zeros, 1000 * S + 10 * seed + (kind == "psd") + 2 * zeros)
        step = cubic_step(g, H, d, lam)
        assert step.case in ("regularised", "hard"), step.detail
        assert step.eta.dtype == F64 and bool(torch.isfinite(step.eta).all())
        assert _residual(step, g, H, d, lam) < 1e-10
        assert step.radius == pytest.approx(float(torch.linalg.vector_norm(d * step.eta)), rel=1e-14)
        assert step.model_value == pytest.approx(
            float(_model(step.eta[None], g, H, d, lam)), rel=1e-12, abs=1e-14
        )
        values, points = _local_minima(g, H, d, lam, seed=seed)
        best = float(values.min())
        assert step.model_value <= best + 1e-9 * (1 + abs(best)), (step.model_value, best)
        # the minimiser is unique here: the best local minimum is eta
        closest = points[values.argmin()]
        assert float(torch.linalg.vector_norm(closest - step.eta)) < 1e-6 * (1 + float(step.eta.norm()))


def test_second_order_condition_and_largest_radius():
    # M + c r I is PSD at eta, and r = ||D eta|| is the largest root of the secular equation
    # phi(r) = ||(M + c r I)^-1 b|| - r (phi -> +inf on both sides of a pole: sign changes are roots)
    for seed in range(20):
        g, H, d, lam = _problem(4, "indefinite", False, seed)
        step = cubic_step(g, H, d, lam)
        M, b, c = H / d[:, None] / d[None, :], g / d, lam / 2
        mu, Q = torch.linalg.eigh(M)
        assert float(mu[0]) + c * step.radius > -1e-10
        beta = Q.T @ b
        grid = torch.linspace(0, 3 * step.radius + 1, 30001, dtype=F64)
        phi = torch.sqrt((beta**2 / (mu + c * grid[:, None]) ** 2).sum(1)) - grid
        changes = torch.nonzero(torch.sign(phi[1:]) != torch.sign(phi[:-1])).flatten()
        assert len(changes) >= 1
        assert float(grid[changes[-1]]) == pytest.approx(step.radius, abs=2 * float(grid[1]))


def test_newton_when_unregularised():
    gen = torch.Generator().manual_seed(1)
    for S in range(1, 9):
        A = torch.randn(S, S, generator=gen, dtype=F64)
        H = A @ A.T + 0.1 * torch.eye(S, dtype=F64)
        g = torch.randn(S, generator=gen, dtype=F64)
        expected = torch.linalg.solve(H, g)
        d = torch.rand(S, generator=gen, dtype=F64)
        for step in (cubic_step(g, H, d, 0.0), cubic_step(g, H, torch.zeros(S, dtype=F64), 3.0)):
            assert step.case == "newton", step.detail
            torch.testing.assert_close(step.eta, expected, rtol=1e-12, atol=0)
        step = cubic_step(g, H, d, 0.0)
        assert step.model_value == pytest.approx(-0.5 * float(g @ expected), rel=1e-12)
        assert step.radius == pytest.approx(float(torch.linalg.vector_norm(d * expected)), rel=1e-12)


def test_one_subset_is_g_over_h():
    gen = torch.Generator().manual_seed(2)
    for _ in range(50):
        g_u = float(torch.randn(1, generator=gen, dtype=F64))
        uHu = float(torch.randn(1, generator=gen, dtype=F64))
        d = torch.rand(1, generator=gen, dtype=F64)
        args = (torch.tensor([g_u], dtype=F64), torch.tensor([[uHu]], dtype=F64), d, 0.0)
        if uHu > 0:
            step = cubic_step(*args)
            assert step.case == "newton"
        else:  # a maximum of the quadratic: the paper's step, flagged
            with pytest.raises(UnboundedModelError, match="unbounded below"):
                cubic_step(*args)
            step = cubic_step(*args, on_unbounded="stationary")
            assert step.case == "unbounded"
        assert step.eta.item() == pytest.approx(g_u / uHu, rel=1e-14)


def test_one_subset_closed_form():
    # y = d eta solves (h / d^2 + c |y|) y = g / d: y = sign(b) (-mu + sqrt(mu^2 + 4 c |b|)) / (2 c)
    gen = torch.Generator().manual_seed(3)
    for _ in range(100):
        g, h = (float(v) for v in torch.randn(2, generator=gen, dtype=F64))
        d, lam = (float(v) for v in 0.1 + 3 * torch.rand(2, generator=gen, dtype=F64))
        mu, b, c = h / d**2, g / d, lam / 2
        root = math.sqrt(mu * mu + 4 * c * abs(b))
        y = math.copysign(2 * abs(b) / (mu + root) if mu > 0 else (root - mu) / (2 * c), b)
        step = cubic_step(
            torch.tensor([g], dtype=F64), torch.tensor([[h]], dtype=F64), torch.tensor([d], dtype=F64), lam
        )
        assert step.case == "regularised"
        assert step.eta.item() == pytest.approx(y / d, rel=1e-12)
        assert step.radius == pytest.approx(abs(y), rel=1e-12)


def _hard_problem(S: int, n_zero: int, seed: int, multiplicity: int = 1, bottom: float = 0.0):
    """A problem whose reduced b is orthogonal to the bottom eigenspace of an indefinite M."""
    gen = torch.Generator().manual_seed(seed)
    P = S - n_zero
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=gen, dtype=F64))
    mu = torch.cat([torch.full((multiplicity,), -2.0, dtype=F64), torch.linspace(0.5, 3.0, P - multiplicity)])
    M = (Q * mu) @ Q.T
    beta = torch.zeros(P, dtype=F64)
    beta[multiplicity:] = 0.3 * torch.randn(P - multiplicity, generator=gen, dtype=F64)
    beta[0] = bottom
    b = Q @ beta
    lam = 2.0  # c = 1, r0 = 2; ||y(r0)|| <= 0.3 * sqrt(P) / 2.5 < 2
    d = 0.5 + torch.rand(S, generator=gen, dtype=F64)
    d[P:] = 0.0
    dP = d[:P]
    H = torch.zeros(S, S, dtype=F64)
    g = torch.zeros(S, dtype=F64)
    B = torch.randn(n_zero, n_zero, generator=gen, dtype=F64)
    H_ZZ = B @ B.T + torch.eye(n_zero, dtype=F64)
    H_PZ = torch.randn(P, n_zero, generator=gen, dtype=F64)
    g_Z = torch.randn(n_zero, generator=gen, dtype=F64)
    # H_PP - H_PZ H_ZZ^-1 H_ZP = D M D, g_P - H_PZ H_ZZ^-1 g_Z = D b
    H[:P, :P] = dP[:, None] * M * dP[None, :] + H_PZ @ torch.linalg.solve(H_ZZ, H_PZ.T)
    H[:P, P:], H[P:, :P], H[P:, P:] = H_PZ, H_PZ.T, H_ZZ
    g[:P] = dP * b + H_PZ @ torch.linalg.solve(H_ZZ, g_Z)
    g[P:] = g_Z
    H = (H + H.T) / 2
    return g, H, d, lam, Q, dP


@pytest.mark.parametrize("S,n_zero,multiplicity", [(1, 0, 1), (3, 0, 1), (5, 0, 2), (6, 2, 1), (8, 3, 2)])
def test_hard_case(S, n_zero, multiplicity):
    for seed in range(3):
        g, H, d, lam, Q, dP = _hard_problem(S, n_zero, seed, multiplicity)
        step = cubic_step(g, H, d, lam)
        assert step.case == "hard", step.detail
        assert bool(torch.isfinite(step.eta).all())
        assert step.radius == pytest.approx(2.0, rel=1e-12)  # r0 = -mu_min / c
        assert _residual(step, g, H, d, lam) < 1e-10
        values, _ = _local_minima(g, H, d, lam, seed=seed)
        assert step.model_value <= float(values.min()) + 1e-9 * (1 + abs(float(values.min())))
        # every y_perp + tau q, q a unit vector of the bottom eigenspace, is a minimiser (a pair for a
        # simple eigenvalue, a circle for a double one): same value, no larger sum of learning rates
        P = S - n_zero
        y = dP * step.eta[:P]
        Q_B = Q[:, :multiplicity]
        y_perp, tau = y - Q_B @ (Q_B.T @ y), float(torch.linalg.vector_norm(Q_B.T @ y))
        assert tau > 0.1
        gen = torch.Generator().manual_seed(seed)
        for x in [-Q_B.T @ y / tau, *torch.randn(20, multiplicity, generator=gen, dtype=F64)]:
            other = _to_eta(y_perp + tau * Q_B @ (x / torch.linalg.vector_norm(x)), g, H, dP)
            assert float(_model(other[None], g, H, d, lam)) == pytest.approx(step.model_value, abs=1e-12)
            assert float(step.eta.sum()) >= float(other.sum()) - 1e-12


def _to_eta(y, g, H, dP):
    """``eta`` from ``y = D_P eta_P`` and the unregularised rest minimised (they come last)."""
    P = dP.numel()
    eta_P = y / dP
    if P == g.numel():
        return eta_P
    return torch.cat([eta_P, torch.linalg.solve(H[P:, P:], g[P:] - H[P:, :P] @ eta_P)])


def test_hard_case_zero_gradient_and_near_hard_case():
    # g = 0 with an indefinite H: eta is r0 times a bottom eigenvector, never 0 (a saddle) nor NaN
    H = torch.diag(torch.tensor([-3.0, 1.0], dtype=F64))
    step = cubic_step(torch.zeros(2), H, torch.ones(2), 2.0)
    assert step.case == "hard"
    torch.testing.assert_close(step.eta.abs(), torch.tensor([3.0, 0.0], dtype=F64))
    assert step.model_value == pytest.approx(-3.0 * 9 / 6)  # mu r0^2 / 6
    # a bottom component just above the tolerance: the secular root sits next to the pole and the
    # solution is continuous with the hard case
    g, H, d, lam, Q, dP = _hard_problem(4, 0, 0)
    hard = cubic_step(g, H, d, lam)
    for size in (1e-12, 1e-9, 1e-6):
        for sign in (1.0, -1.0):
            gn, Hn, dn, lamn, _, _ = _hard_problem(4, 0, 0, bottom=sign * size)
            near = cubic_step(gn, Hn, dn, lamn)
            assert near.case == "regularised", near.detail
            assert _residual(near, gn, Hn, dn, lamn) < 1e-10
            assert near.model_value <= hard.model_value + 1e-9
            values, _ = _local_minima(gn, Hn, dn, lamn)
            assert near.model_value <= float(values.min()) + 1e-9
            # it tends to the hard-case minimiser whose bottom component has the sign of g's
            y = dP * hard.eta
            q = Q[:, 0]
            limit = _to_eta(y - 2 * (q @ y) * q, g, H, dP) if (q @ y) * sign < 0 else hard.eta
            assert float(torch.linalg.vector_norm(near.eta - limit)) < 100 * size
            assert near.radius == pytest.approx(2.0, abs=10 * size)


def test_unregularised_subsets():
    gen = torch.Generator().manual_seed(4)
    A = torch.randn(5, 5, generator=gen, dtype=F64)
    H = (A + A.T) / 2
    H[3:, 3:] = torch.tensor([[2.0, 0.3], [0.3, 1.0]], dtype=F64)  # positive definite
    g = torch.randn(5, generator=gen, dtype=F64)
    d = torch.tensor([1.0, 0.5, 2.0, 0.0, 0.0], dtype=F64)
    step = cubic_step(g, H, d, 1.5)
    assert step.case in ("regularised", "hard") and "d_s = 0 eliminated" in step.detail
    assert _residual(step, g, H, d, 1.5) < 1e-10
    assert step.model_value <= float(_local_minima(g, H, d, 1.5)[0].min()) + 1e-9

    # negative curvature where the cubic term does not look: unbounded
    H_bad = H.clone()
    H_bad[4, 4] = -1.0
    with pytest.raises(UnboundedModelError, match=r"unregularised subsets \[3, 4\].*negative eigenvalue"):
        cubic_step(g, H_bad, d, 1.5)
    step = cubic_step(g, H_bad, d, 1.5, on_unbounded="stationary")
    assert step.case == "unbounded" and bool(torch.isfinite(step.eta).all())
    assert _residual(step, g, H_bad, d, 1.5) < 1e-10  # the paper's step: a stationary point
    e = torch.zeros(5, dtype=F64)
    e[4] = 1.0
    assert float(_model((step.eta + 10 * e)[None], g, H_bad, d, 1.5)) < step.model_value  # not a minimiser


def test_flat_and_steep_null_directions():
    # u = 0 on a subset: a zero row and column of H_bar, g_s = 0, d_s = 0: a flat direction, eta_s = 0
    gen = torch.Generator().manual_seed(5)
    A = torch.randn(4, 4, generator=gen, dtype=F64)
    H = A @ A.T
    H[2, :] = 0.0
    H[:, 2] = 0.0
    g = torch.randn(4, generator=gen, dtype=F64)
    g[2] = 0.0
    d = torch.tensor([1.0, 0.3, 0.0, 2.0], dtype=F64)
    for lam in (0.0, 1.0):
        step = cubic_step(g, H, d, lam)
        assert step.case == ("newton" if lam == 0 else "regularised"), step.detail
        assert "1 flat direction" in step.detail
        assert step.eta[2].item() == 0.0
        keep = torch.tensor([0, 1, 3])
        reduced = cubic_step(g[keep], H[keep][:, keep], d[keep], lam)
        torch.testing.assert_close(step.eta[keep], reduced.eta, rtol=1e-12, atol=1e-14)
    # the same with g_s != 0: the model decreases linearly along e_2, no stationary point either
    g[2] = 0.5
    for how in ("raise", "stationary"):
        with pytest.raises(UnboundedModelError, match="decreases linearly"):
            cubic_step(g, H, d, 1.0, on_unbounded=how)


def test_unregularised_indefinite_is_the_papers_step():
    gen = torch.Generator().manual_seed(6)
    A = torch.randn(4, 4, generator=gen, dtype=F64)
    H = (A + A.T) / 2
    g = torch.randn(4, generator=gen, dtype=F64)
    assert float(torch.linalg.eigvalsh(H)[0]) < 0
    with pytest.raises(UnboundedModelError, match="all subsets.*lambda_int > 0"):
        cubic_step(g, H, torch.ones(4), 0.0)
    step = cubic_step(g, H, torch.ones(4), 0.0, on_unbounded="stationary")
    assert step.case == "unbounded" and "not a minimiser" in step.detail
    torch.testing.assert_close(step.eta, torch.linalg.solve(H, g), rtol=1e-12, atol=0)


@pytest.mark.parametrize("scale", [1e-3, 0.1, 7.0, 1e3])
def test_invariance_under_scaling_d(scale):
    # d -> a d, lambda_int -> lambda_int / a^3 leaves the model, hence eta, unchanged
    for seed in range(5):
        for kind in ("psd", "indefinite"):
            g, H, d, lam = _problem(6, kind, seed % 2 == 1, 50 + seed)
            ref = cubic_step(g, H, d, lam)
            step = cubic_step(g, H, scale * d, lam / scale**3)
            assert step.case == ref.case
            torch.testing.assert_close(step.eta, ref.eta, rtol=1e-10, atol=1e-12)
            assert step.model_value == pytest.approx(ref.model_value, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("kind,zeros", [("psd", False), ("indefinite", False), ("indefinite", True)])
def test_invariance_under_rescaling_the_subsets(kind, zeros):
    # v_s -> alpha_s v_s maps g -> A g, H -> A H A, d -> A d and eta -> A^-1 eta (A = diag(alpha)):
    # graded summaries (subsets whose directions differ by orders of magnitude) give the same step
    for seed in range(5):
        g, H, d, lam = _problem(6, kind, zeros, 70 + seed)
        gen = torch.Generator().manual_seed(seed)
        alpha = 10.0 ** (8.0 * torch.rand(6, generator=gen, dtype=F64) - 4.0)
        ref = cubic_step(g, H, d, lam)
        step = cubic_step(alpha * g, alpha[:, None] * H * alpha[None, :], alpha * d, lam)
        assert step.case == ref.case
        torch.testing.assert_close(alpha * step.eta, ref.eta, rtol=1e-9, atol=1e-12)
        assert step.radius == pytest.approx(ref.radius, rel=1e-9)
        assert _residual(step, alpha * g, alpha[:, None] * H * alpha[None, :], alpha * d, lam) < 1e-10
    g, H, d, lam, _, _ = _hard_problem(6, 2, 0)
    alpha = torch.tensor([1e-3, 1.0, 1e3, 10.0, 1e-2, 1e4], dtype=F64)
    ref = cubic_step(g, H, d, lam)
    step = cubic_step(alpha * g, alpha[:, None] * H * alpha[None, :], alpha * d, lam)
    assert ref.case == step.case == "hard"
    torch.testing.assert_close(alpha * step.eta, ref.eta, rtol=1e-9, atol=1e-12)


def test_vanishing_d_tends_to_the_unregularised_subset():
    # d_s -> 0+ with H_ZZ > 0: the step tends to the d_s = 0 one, however small d_s is
    H = torch.tensor([[1.0, 0.5], [0.5, -2.0]], dtype=F64)
    g = torch.tensor([1.0, 1.0], dtype=F64)
    exact = cubic_step(g, H, torch.tensor([0.0, 1.0]), 1.0)
    assert exact.case == "regularised" and "1 subset(s) with d_s = 0" in exact.detail
    # the Schur complement in closed form: eta_1 = 1 - eta_2 / 2, then 0.5 y^2 - 2.25 y - 0.5 = 0
    y = 2.25 + math.sqrt(2.25**2 + 1.0)
    torch.testing.assert_close(exact.eta, torch.tensor([1 - y / 2, y], dtype=F64), rtol=1e-14, atol=0)
    for tiny in (1e-3, 1e-9, 1e-60, 1e-140):
        step = cubic_step(g, H, torch.tensor([tiny, 1.0], dtype=F64), 1.0)
        assert step.case == "regularised"
        torch.testing.assert_close(step.eta, exact.eta, rtol=max(tiny, 1e-14), atol=0)


def test_out_of_range_is_an_error_not_a_nan():
    H = torch.tensor([[1.0, 0.5], [0.5, -2.0]], dtype=F64)
    g = torch.tensor([1.0, 1.0], dtype=F64)
    with pytest.raises(CurvkitError, match="overflows float64.*set the tiniest d_s to 0"):
        cubic_step(g, H, torch.tensor([1e-200, 1.0], dtype=F64), 1.0)
    with pytest.raises(CurvkitError, match="out of float64 range"):
        cubic_step(g, H, torch.tensor([1e200, 1.0], dtype=F64), 1.0)
    with pytest.raises(NonFiniteError, match="lambda_int is too small"):  # eta ~ 1e300, m ~ -1e600
        cubic_step(g, H, torch.ones(2, dtype=F64), 1e-300)
    step = cubic_step(g, H, torch.ones(2, dtype=F64), 1e-100)  # large but in range
    assert step.case == "regularised" and step.radius == pytest.approx(2 * 2.0811388300841898e100, rel=1e-12)
    assert _residual(step, g, H, torch.ones(2, dtype=F64), 1e-100) < 1e-10


def test_hard_case_in_closed_form():
    # H = diag(-1, 2), g = (0, 1), d = 1, c = 1: r0 = 1, y_perp = 1 / 3, tau = sqrt(8) / 3; the sign
    # convention takes the larger sum of learning rates
    step = cubic_step(torch.tensor([0.0, 1.0]), torch.diag(torch.tensor([-1.0, 2.0])), torch.ones(2), 2.0)
    assert step.case == "hard" and step.radius == pytest.approx(1.0, rel=1e-15)
    torch.testing.assert_close(
        step.eta, torch.tensor([math.sqrt(8) / 3, 1 / 3], dtype=F64), rtol=1e-15, atol=0
    )
    # a coupling to an unregularised subset (eta_2 = -2 eta_0) flips the preferred sign: M = diag(-5, 2),
    # r0 = 5, y_perp = 1 / 7, and sum(eta) = -eta_0 + eta_1 is largest with eta_0 = -tau
    H = torch.tensor([[-1.0, 0.0, 2.0], [0.0, 2.0, 0.0], [2.0, 0.0, 1.0]], dtype=F64)
    step = cubic_step(torch.tensor([0.0, 1.0, 0.0]), H, torch.tensor([1.0, 1.0, 0.0]), 2.0)
    tau = math.sqrt(25 - 1 / 49)
    assert step.case == "hard" and step.radius == pytest.approx(5.0, rel=1e-15)
    torch.testing.assert_close(step.eta, torch.tensor([-tau, 1 / 7, 2 * tau], dtype=F64), rtol=1e-14, atol=0)


def test_zero_gradient_and_large_damping():
    H = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=F64)
    step = cubic_step(torch.zeros(2), H, torch.ones(2), 1.0)
    assert step.case == "regularised" and step.eta.abs().max().item() == 0.0 and step.model_value == 0.0
    g = torch.tensor([1.0, -2.0], dtype=F64)
    small = cubic_step(g, H, torch.ones(2), 1e8)  # eta ~ (2 / lambda)^(1/2) g / ||g||^(1/2)
    assert small.case == "regularised" and small.radius < 1e-3
    assert _residual(small, g, H, torch.ones(2, dtype=F64), 1e8) < 1e-10
    newton = cubic_step(g, H, torch.ones(2), 1e-12)  # continuous with the Newton step
    torch.testing.assert_close(newton.eta, torch.linalg.solve(H, g), rtol=1e-9, atol=0)


def test_dtypes_and_plain_inputs():
    H = torch.tensor([[3.0, 1.0], [1.0, -1.0]])
    step32 = cubic_step(torch.tensor([1.0, 2.0]), H, torch.tensor([0.5, 1.0]), 2.0)
    step64 = cubic_step(
        torch.tensor([1.0, 2.0], dtype=F64), H.to(F64), torch.tensor([0.5, 1.0], dtype=F64), torch.tensor(2.0)
    )
    assert step32.eta.dtype == F64
    torch.testing.assert_close(step32.eta, step64.eta, rtol=1e-15, atol=0)
    plain = cubic_step([1.0, 2.0], [[3.0, 1.0], [1.0, -1.0]], [0.5, 1.0], 2)
    torch.testing.assert_close(plain.eta, step64.eta, rtol=1e-15, atol=0)
    assert set(CASES) == {"newton", "regularised", "hard", "unbounded"}


def test_bad_inputs():
    g, H, d = torch.ones(2), torch.eye(2), torch.ones(2)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(NonFiniteError, match="g_bar is not finite"):
            cubic_step(torch.tensor([1.0, bad]), H, d, 1.0)
        with pytest.raises(NonFiniteError, match="H_bar is not finite"):
            cubic_step(g, torch.tensor([[1.0, bad], [bad, 1.0]]), d, 1.0)
        with pytest.raises(NonFiniteError, match="d is not finite"):
            cubic_step(g, H, torch.tensor([bad, 1.0]), 1.0)
        with pytest.raises(CurvkitError, match="lambda_int must be a finite number >= 0"):
            cubic_step(g, H, d, bad)
    with pytest.raises(CurvkitError, match="lambda_int must be a finite number >= 0"):
        cubic_step(g, H, d, -0.1)
    with pytest.raises(CurvkitError, match="lambda_int must be a number"):
        cubic_step(g, H, d, "big")
    with pytest.raises(CurvkitError, match="d must be non-negative"):
        cubic_step(g, H, torch.tensor([1.0, -1.0]), 1.0)
    with pytest.raises(CurvkitError, match="not symmetric"):
        cubic_step(g, torch.tensor([[1.0, 0.0], [1.0, 1.0]]), d, 1.0)
    with pytest.raises(CurvkitError, match="must be real"):
        cubic_step(g.to(torch.complex64), H, d, 1.0)
    with pytest.raises(CurvkitError, match="unknown on_unbounded"):
        cubic_step(g, H, d, 1.0, on_unbounded="ignore")
    for args in (
        (torch.ones(2, 1), H, d),
        (g, torch.eye(3), d),
        (g, H, torch.ones(3)),
        (torch.ones(0), torch.ones(0, 0), torch.ones(0)),
    ):
        with pytest.raises(ShapeMismatchError, match=r"g_bar \[S\], H_bar \[S, S\] and d \[S\]"):
            cubic_step(*args, 1.0)
    # every error is a CurvkitError with a one-line message
    with pytest.raises(CurvkitError) as info:
        cubic_step(g, -H, d, 0.0)
    assert "\n" not in str(info.value)
