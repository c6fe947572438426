"""Diagonals: ``A.diagonal()`` of the operator contract, and ``curvkit.diagonal`` (exact, Hutchinson)."""

from __future__ import annotations

import pytest
import torch

import curvkit
from curvkit.testing import dense_hessian_reference, get_case

DT = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def spd(P: int = 30, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    B = torch.randn(P, P, generator=gen, dtype=DT)
    return B @ B.T / P + torch.diag(torch.linspace(0.5, 3.0, P, dtype=DT))


class ProductsOnly(curvkit.CurvatureOperator):
    """A matrix known only by its products (no cheap diagonal)."""

    def __init__(self, matrix: torch.Tensor):
        super().__init__(curvkit.DenseOperator(matrix).layout, dtype=matrix.dtype, device=matrix.device)
        self.matrix = matrix

    def _matmat(self, M):
        return self.matrix @ M


# ---------------------------------------------------------- the operator contract
def test_cheap_diagonals_cost_no_product_and_pass_through_algebra():
    M, N = spd(12, 0), spd(12, 1)
    A, B = curvkit.DenseOperator(M), curvkit.DenseOperator(N)
    identity = curvkit.IdentityOperator(A.layout, scale=0.5, dtype=DT, device="cpu")
    cases = {
        "dense": (A, M),
        "identity": (identity, 0.5 * torch.eye(12, dtype=DT)),
        "scaled": (-2.0 * A, -2 * M),
        "sum": (A + B - A.damped(0.1), N - 0.1 * torch.eye(12, dtype=DT)),
        "transposed": (curvkit.DenseOperator(M + torch.triu(N)).T, M + torch.triu(N)),
    }
    for name, (op, matrix) in cases.items():
        assert op.CHEAP_DIAGONAL, name
        assert torch.allclose(op.diagonal(), torch.diagonal(matrix), rtol=1e-14, atol=1e-14), name
    assert A.matvecs == B.matvecs == 0
    block = curvkit.RestrictedOperator(A, ["x"])
    assert block.CHEAP_DIAGONAL and torch.equal(block.diagonal(), torch.diagonal(M))


def test_the_generic_diagonal_is_made_of_basis_products_and_refuses_large_operators(monkeypatch):
    M = spd(10)
    op = ProductsOnly(M)
    assert not op.CHEAP_DIAGONAL
    assert torch.allclose(op.diagonal(block_size=4), torch.diagonal(M), rtol=1e-14, atol=0)
    assert op.matvecs == 10
    with pytest.raises(curvkit.DenseTooLargeError, match="exceeds the limit"):
        op.diagonal(max_dim=9)
    monkeypatch.setenv("CURVKIT_MAX_DENSE_DIM", "5")
    with pytest.raises(curvkit.DenseTooLargeError):
        op.diagonal()
    scaled = 3.0 * op  # passes through to the operator's generic diagonal
    assert not scaled.CHEAP_DIAGONAL
    assert torch.allclose(scaled.diagonal(max_dim=10), 3 * torch.diagonal(M), rtol=1e-14, atol=0)
    resampling = ProductsOnly(M)
    resampling.RESAMPLES = True
    with pytest.raises(curvkit.CurvkitError, match="resamples on every product.*hutchinson"):
        resampling.diagonal(max_dim=10)


def test_the_hessian_has_the_generic_diagonal():
    problem = get_case("tanh-mlp-ce").problem()
    H = curvkit.curvature("hessian", problem)
    assert not H.CHEAP_DIAGONAL
    assert rel(H.diagonal(), torch.diagonal(dense_hessian_reference(problem))) < 1e-12
    assert H.matvecs == problem.dim


class BadDiagonal(curvkit.ProblemOperator):
    """A plugin whose per-batch diagonal has the wrong shape."""

    def batch_product(self, params, inputs, targets, V, generator):
        return [v.clone() for v in V], 1.0

    def batch_diagonal(self, params, inputs, targets, generator):
        return [p.new_ones(3) for p in params], 1.0


def test_a_batch_diagonal_makes_a_cheap_diagonal_and_is_checked():
    problem = get_case("mlp-mse").problem()
    op = BadDiagonal(problem)
    op.name = "bad"
    assert BadDiagonal.CHEAP_DIAGONAL and not curvkit.ProblemOperator.CHEAP_DIAGONAL
    with pytest.raises(curvkit.PluginError, match=r"estimator 'bad' returned shape \(12,\).*diagonal.*\[P\]"):
        op.diagonal()
    assert op.data_passes == 1


# -------------------------------------------------------------- curvkit.diagonal
def test_exact_uses_the_contract():
    M = spd(25)
    res = curvkit.diagonal(curvkit.DenseOperator(M), method="exact")
    assert torch.equal(res.estimate, torch.diagonal(M)) and res.matvecs == 0
    assert torch.equal(res.stderr, torch.zeros(25, dtype=DT)) and res.method == "exact"
    op = ProductsOnly(M)
    seen = []
    res = curvkit.diagonal(op, method="exact", batch_size=10, progress=seen.append)
    assert torch.allclose(res.estimate, torch.diagonal(M), rtol=1e-14, atol=0)
    assert res.matvecs == op.matvecs == 25 and [s["matvecs"] for s in seen] == [10, 20, 25]

    problem = get_case("attention-layernorm-ce").problem()
    G = curvkit.curvature("ggn", problem)
    res = curvkit.diagonal(G, method="exact")
    assert res.matvecs == 0 and G.matvecs == 0 and G.data_passes == 1
    assert rel(res.estimate, torch.diagonal(G.to_dense())) < 1e-12
    tr = curvkit.trace(G, method="exact")  # the trace uses the same contract
    assert tr.matvecs == 0 and abs(tr.estimate - res.estimate.sum().item()) < 1e-12


def test_hutchinson_estimates_within_its_standard_errors():
    M = spd(40, seed=3)
    truth = torch.diagonal(M)
    res = curvkit.diagonal(curvkit.DenseOperator(M), matvecs=400, seed=1, batch_size=64)
    assert res.method == "hutchinson" and res.matvecs == 400
    z = (res.estimate - truth) / res.stderr
    assert z.abs().max() < 4.5 and 0.5 < z.std().item() < 1.5  # calibrated errors
    # the variance of entry i is sum_{k != i} M_ik^2 / m
    predicted = ((M * M).sum(1) - truth**2).sqrt() / 400**0.5
    assert torch.allclose(res.stderr, predicted, rtol=0.25)
    again = curvkit.diagonal(curvkit.DenseOperator(M), matvecs=400, seed=1, batch_size=7)
    assert torch.allclose(again.estimate, res.estimate, rtol=1e-12)  # probes do not depend on blocks
    assert torch.allclose(again.stderr, res.stderr, rtol=1e-10)
    other = curvkit.diagonal(curvkit.DenseOperator(M), matvecs=400, seed=2)
    assert not torch.equal(other.estimate, res.estimate)


@pytest.mark.montecarlo
def test_hutchinson_is_unbiased():
    """Over 200 seeds of 8 probes the mean error is within the standard error of the mean."""
    M = spd(20, seed=4)
    A = curvkit.DenseOperator(M)
    estimates = torch.stack([curvkit.diagonal(A, matvecs=8, seed=s).estimate for s in range(200)])
    stderr = estimates.std(0) / 200**0.5
    assert ((estimates.mean(0) - torch.diagonal(M)).abs() < 4 * stderr).all()


def test_hutchinson_is_exact_on_a_diagonal_matrix_and_has_no_stderr_from_one_probe():
    d = torch.arange(1.0, 8.0, dtype=DT)
    res = curvkit.diagonal(curvkit.DenseOperator(torch.diag(d)), matvecs=5, seed=0)
    assert torch.equal(res.estimate, d) and torch.equal(res.stderr, torch.zeros(7, dtype=DT))
    one = curvkit.diagonal(curvkit.DenseOperator(torch.diag(d)), matvecs=1)
    assert torch.isnan(one.stderr).all()


def test_anything_with_matmat_and_float32():
    class Plain:
        shape, dtype, device = (6, 6), torch.float32, torch.device("cpu")

        def matmat(self, M):
            return 2 * M

    res = curvkit.diagonal(Plain(), method="exact")
    assert torch.equal(res.estimate, torch.full((6,), 2.0)) and res.matvecs == 6
    res = curvkit.diagonal(Plain(), matvecs=3, seed=None)
    assert res.estimate.dtype == torch.float32 and isinstance(res.seed, int)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"method": "xtrace"}, "unknown diagonal method 'xtrace'; choose one of hutchinson, exact"),
        ({"matvecs": 0}, "diagonal method 'hutchinson': matvecs must be an integer >= 1, got 0"),
        ({"matvecs": 2.0}, "matvecs must be an integer >= 1, got 2.0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1 or None, got 0"),
    ],
)
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(curvkit.CurvkitError, match=fragment.replace("(", r"\(")):
        curvkit.diagonal(curvkit.DenseOperator(spd(4)), **kwargs)
    with pytest.raises(curvkit.ShapeMismatchError):
        curvkit.diagonal(torch.eye(3))


def test_non_finite_products_are_named():
    M = spd(10)
    M[3, 3] = float("nan")
    with pytest.raises(curvkit.NonFiniteError, match=r"1st product of the diagonal estimate \(hutchinson"):
        curvkit.diagonal(ProductsOnly(M), matvecs=4)
    with pytest.raises(curvkit.NonFiniteError, match=r"the diagonal of the operator \(diagonal, exact\)"):
        curvkit.diagonal(curvkit.DenseOperator(M), method="exact")
