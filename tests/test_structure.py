"""Structured operators: exact trace, inverse, log-determinant and eigenpairs, kept under composition.

A small structured operator (a diagonal matrix that knows it) stands for KFAC here:
every method is checked against the dense matrix in float64, and so is every
composition (scaled, damped, summed, restricted).
"""

from __future__ import annotations

import math

import pytest
import torch

import curvkit
from curvkit.layout import ParameterLayout
from curvkit.operator import STRUCTURE_METHODS, ScaledOperator
from curvkit.testing import get_case

DT = torch.float64


class Diagonal(curvkit.CurvatureOperator):
    """``diag(d)``, with every structured method (and a counter of structured calls)."""

    CHEAP_DIAGONAL = True
    STRUCTURE = frozenset(STRUCTURE_METHODS)

    def __init__(self, d: torch.Tensor):
        super().__init__(ParameterLayout(("x",), (torch.Size([len(d)]),)), dtype=d.dtype, device=d.device)
        self.d = d
        self.PSD = bool((d >= 0).all())
        self.calls: list[str] = []

    def _matmat(self, M):
        return self.d[:, None] * M

    def _diagonal(self):
        return self.d.clone()

    def _trace(self):
        self.calls.append("trace")
        return self.d.sum().item()

    def _inverse(self, damping):
        self.calls.append("inverse")
        return Diagonal(1 / (self.d + damping))

    def _logdet(self, damping):
        self.calls.append("logdet")
        return torch.log(self.d + damping).sum().item()

    def _eigenpairs(self, k, which):
        self.calls.append("eigenvalues")
        order = torch.argsort(self.d, descending=which == "largest")[:k]
        return self.d[order], torch.eye(len(self.d), dtype=self.d.dtype)[:, order]


def dense_of(A: curvkit.CurvatureOperator) -> torch.Tensor:
    return A.to_dense()


D = torch.tensor([4.0, 1.0, 3.0, 0.5, 2.0, 6.0], dtype=DT)


@pytest.mark.parametrize(
    "build",
    [
        lambda A: A,
        lambda A: 2.5 * A,
        lambda A: A.damped(0.3),
        lambda A: (2.0 * A).damped(0.1),
        lambda A: 0.5 * A.damped(0.2),
    ],
    ids=["plain", "scaled", "damped", "scaled-damped", "damped-scaled"],
)
def test_structured_methods_equal_dense_linear_algebra(build):
    base = Diagonal(D.clone())
    A = build(base)
    M = dense_of(A)
    eye = torch.eye(len(D), dtype=DT)
    assert set(A.STRUCTURE) == set(STRUCTURE_METHODS)
    assert math.isclose(A.trace(), torch.trace(M).item(), rel_tol=1e-12)
    for damping in (0.0, 0.7):
        inverse = torch.linalg.inv(M + damping * eye)
        assert torch.allclose(dense_of(A.inverse(damping)), inverse, rtol=1e-12, atol=0)
        v = torch.randn(len(D), 2, dtype=DT)
        assert torch.allclose(A.solve(v, damping), inverse @ v, rtol=1e-12, atol=1e-14)
        assert math.isclose(A.logdet(damping), torch.logdet(M + damping * eye).item(), rel_tol=1e-12)
    truth = torch.linalg.eigvalsh(M)
    for which, want in [("largest", truth.flip(0)[:3]), ("smallest", truth[:3])]:
        res = curvkit.eigenvalues(A, k=3, which=which, tol=1e-10)
        assert res.method == "exact" and res.converged and res.matvecs == 3 and res.restarts == 0
        assert torch.allclose(res.values, want, rtol=1e-12)
    both, _ = A.eigenvalues(k=3, which="both_ends")
    assert torch.allclose(both, torch.stack([truth[-1], truth[-2], truth[0]]), rtol=1e-12)
    result = curvkit.trace(A, method="hutchinson", matvecs=10)
    assert result.structured and result.method == "exact" and result.matvecs == 0
    assert math.isclose(result.estimate, torch.trace(M).item(), rel_tol=1e-12)
    assert {"trace", "inverse", "logdet", "eigenvalues"} <= set(base.calls)  # no dense fallback used


def test_negative_scaling_flips_the_spectrum_and_drops_the_inverse():
    A = -2.0 * Diagonal(D.clone())
    assert A.STRUCTURE == frozenset({"trace", "eigenvalues"})
    res = curvkit.eigenvalues(A, k=2, which="largest", tol=1e-10)
    assert res.method == "exact"
    assert torch.allclose(res.values, torch.tensor([-1.0, -2.0], dtype=DT))
    largest_magnitude = curvkit.eigenvalues(A, k=2, which="largest_magnitude", tol=1e-10)
    assert torch.allclose(largest_magnitude.values, torch.tensor([-12.0, -8.0], dtype=DT))
    with pytest.raises(curvkit.CurvkitError, match="positive definite"):
        A.logdet(1.0)  # the generic path sees the indefinite matrix


def test_sums_keep_the_trace_when_every_term_has_it():
    A, B = Diagonal(D.clone()), Diagonal(D.flip(0).clone())
    total = A + B
    assert total.STRUCTURE == frozenset({"trace"})
    assert math.isclose(curvkit.trace(total, method="exact").estimate, 2 * D.sum().item())
    assert curvkit.trace(total).structured


def test_generic_fallbacks_from_the_dense_matrix():
    torch.manual_seed(0)
    R = torch.randn(5, 5, dtype=DT)
    A = curvkit.DenseOperator(R @ R.T + 0.1 * torch.eye(5, dtype=DT), psd=True)
    assert A.STRUCTURE == frozenset()
    M = A.to_dense()
    assert math.isclose(A.trace(), torch.trace(M).item(), rel_tol=1e-12)
    assert torch.allclose(A.inverse(0.5).to_dense(), torch.linalg.inv(M + 0.5 * torch.eye(5, dtype=DT)))
    assert math.isclose(A.logdet(), torch.logdet(M).item(), rel_tol=1e-12)
    values, vectors = A.eigenvalues(k=2)  # no structure: the dense matrix's eigendecomposition
    assert torch.allclose(values, torch.linalg.eigvalsh(M).flip(0)[:2], rtol=1e-12)
    assert torch.allclose(M @ vectors, vectors * values, atol=1e-12)
    assert curvkit.eigenvalues(A, k=2).method == "lanczos"
    singular = curvkit.DenseOperator(torch.diag(torch.tensor([1.0, 0.0], dtype=DT)))
    with pytest.raises(curvkit.CurvkitError, match="singular to working precision.*add damping"):
        singular.inverse()
    assert torch.allclose(singular.inverse(1.0).to_dense(), torch.diag(torch.tensor([0.5, 1.0], dtype=DT)))
    with pytest.raises(curvkit.CurvkitError, match="positive definite"):
        singular.logdet()
    for bad in (-1.0, "1", True, float("nan")):
        with pytest.raises(curvkit.CurvkitError, match="damping must be a finite number >= 0"):
            A.inverse(bad)


def test_identity_structure():
    layout = ParameterLayout(("x",), (torch.Size([4]),))
    eye = curvkit.IdentityOperator(layout, 2.0, dtype=DT, device="cpu")
    assert eye.trace() == 8.0 and math.isclose(eye.logdet(1.0), 4 * math.log(3.0))
    assert torch.allclose(eye.inverse(2.0).to_dense(), 0.25 * torch.eye(4, dtype=DT))
    assert torch.equal(curvkit.eigenvalues(eye, k=2).values, torch.tensor([2.0, 2.0], dtype=DT))


def test_a_scaled_operator_restricts_its_own_operator():
    problem = get_case("mlp-mse").problem()
    H = curvkit.curvature("hessian", problem)
    block = (2 * H).restrict("0")
    assert isinstance(block, ScaledOperator) and not isinstance(block.op, curvkit.RestrictedOperator)
    index = problem.layout.indices([n for n in problem.layout.names if n.startswith("0.")])
    truth = 2 * H.to_dense()[index][:, index]
    assert torch.allclose(block.to_dense(), truth, rtol=1e-12, atol=1e-14)
