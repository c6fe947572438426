"""Eigenvalue checks pass on good operators and fail when they should."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

import curvkit
from curvkit.checks import (
    check_agreement,
    check_psd,
    check_residuals,
    check_symmetry,
    condition_number,
    largest_principal_angle,
    negative_mass,
)
from curvkit.linalg.eigen import eigenvalues
from curvkit.testing import dense_hessian_reference, get_case

DT = torch.float64


def spd(n: int, seed: int = 0, shift: float = 0.1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=g, dtype=DT)
    return B @ B.T / n + shift * torch.eye(n, dtype=DT)


def test_symmetry_check():
    assert check_symmetry(curvkit.DenseOperator(spd(20))).passed
    A = spd(20) + 0.1 * torch.triu(torch.ones(20, 20, dtype=DT), 1)
    result = check_symmetry(curvkit.DenseOperator(A, symmetric=True))
    assert result.passed is False and result.measured > 1e-3


def test_psd_check():
    good = check_psd(curvkit.DenseOperator(spd(30), psd=True))
    assert good.passed and good.figures["lambda_min"] > 0
    M = spd(30)
    M[0, 0] -= 5.0  # indefinite now
    bad = check_psd(curvkit.DenseOperator(M, psd=True))
    assert bad.passed is False
    assert math.isclose(bad.figures["lambda_min"], torch.linalg.eigvalsh(M)[0].item(), rel_tol=1e-6)


def test_residual_check_recomputes_certificates():
    A = curvkit.DenseOperator(spd(40))
    res = eigenvalues(A, k=3, tol=1e-10)
    assert check_residuals(A, res).passed
    spoiled = dataclasses.replace(res, values=res.values * 1.01)
    check = check_residuals(A, spoiled)
    assert check.passed is False and check.measured > 1e-3


@pytest.mark.parametrize("theta", [1e-9, 1e-6, 1e-3, 0.5, math.pi / 2])
def test_largest_principal_angle_is_exact_for_small_and_large_angles(theta):
    e = torch.eye(6, dtype=DT)
    U = e[:, :2]
    V = torch.stack([math.cos(theta) * e[:, 0] + math.sin(theta) * e[:, 2], e[:, 1]], dim=1)
    assert largest_principal_angle(U, V) == pytest.approx(theta, rel=1e-9)
    # any basis of the same spans: scaled, mixed, in float32
    mixed = V @ torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=DT)
    assert largest_principal_angle(U, mixed) == pytest.approx(theta, rel=1e-6, abs=1e-12)
    assert largest_principal_angle(U, V.float()) == pytest.approx(theta, abs=1e-7)


def test_agreement_of_float32_eigenvectors_is_measured_not_rounded():
    """arccos of the singular values of U^T V reads ~1e-3 for float32 vectors (sqrt of
    float32's rounding); the sine-based angle sees the true, tiny, angle."""
    spectrum = torch.cat([torch.linspace(0.0, 1.0, 197, dtype=DT), torch.tensor([2.0, 3.0, 4.0], dtype=DT)])
    g = torch.Generator().manual_seed(3)
    Q = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=DT))[0]
    M = Q @ torch.diag(spectrum) @ Q.T
    result = check_agreement(curvkit.DenseOperator(M.float()), M, k=3, tol=1e-6)
    assert result.passed
    assert result.figures["max_principal_angle"] < 1e-5  # float32 vectors: a few eps / gap


def test_agreement_with_exact_hessian():
    problem = get_case("tanh-mlp-ce").problem()
    H = curvkit.curvature("hessian", problem)
    truth = dense_hessian_reference(problem)
    good = check_agreement(H, truth, k=3)
    assert good.passed and good.figures["max_principal_angle"] < 1e-6
    bad = check_agreement(H.damped(0.05), truth, k=3)
    assert bad.passed is False and bad.measured > 1e-2
    rotated = check_agreement(curvkit.DenseOperator(truth.flip(0).flip(1)), truth, k=3, value_rtol=1.0)
    assert rotated.passed is False and rotated.figures["max_principal_angle"] > 0.1


def test_condition_number_and_negative_mass():
    A = curvkit.DenseOperator(torch.diag(torch.tensor([0.5, 1.0, 2.0, 8.0], dtype=DT)))
    kappa = condition_number(eigenvalues(A, k=2, which="both_ends"))
    assert kappa.passed is None and math.isclose(kappa.measured, 16.0, rel_tol=1e-9)
    fake = SimpleNamespace(
        nodes=torch.tensor([[-1.0, 0.5, 2.0], [-2.0, -1.0, 3.0]], dtype=DT),
        weights=torch.tensor([[0.2, 0.3, 0.5], [0.1, 0.3, 0.6]], dtype=DT),
    )
    info = negative_mass(fake)
    assert info.passed is None and math.isclose(info.measured, (0.2 + 0.4) / 2)
    assert negative_mass(fake, max_mass=0.1).passed is False
    assert negative_mass(fake, max_mass=0.5).passed is True
    assert set(info.to_dict()) == {"name", "passed", "measured", "threshold", "detail", "figures"}


def test_agreement_refuses_mismatched_shapes():
    with pytest.raises(curvkit.ShapeMismatchError, match="restrict"):
        check_agreement(curvkit.DenseOperator(spd(5)), spd(6), k=2)
