"""Eigenpairs with certificates, against dense eigendecompositions."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import curvkit
from curvkit.linalg import lanczos
from curvkit.linalg.eigen import eigenvalues
from curvkit.testing import CASES, dense_hessian_reference, get_case

DT = torch.float64


def orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))[0]


def operator_with_spectrum(spectrum: torch.Tensor, seed: int = 0) -> curvkit.DenseOperator:
    Q = orthogonal(spectrum.numel(), seed)
    return curvkit.DenseOperator(Q @ torch.diag(spectrum) @ Q.T, symmetric=True)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_top_and_bottom_k_match_dense_eigh(case):
    problem = case.problem()
    H = curvkit.curvature("hessian", problem)
    truth = torch.linalg.eigvalsh(dense_hessian_reference(problem))
    top = eigenvalues(H, k=3, which="largest", tol=1e-10)
    bottom = eigenvalues(H, k=3, which="smallest", tol=1e-10)
    assert top.converged and bottom.converged
    torch.testing.assert_close(top.values, truth[-3:].flip(0), rtol=1e-8, atol=1e-10 * truth.abs().max())
    torch.testing.assert_close(bottom.values, truth[:3], rtol=1e-8, atol=1e-10 * truth.abs().max())


def test_known_spectrum_low_rank_plus_identity():
    P = 300
    spectrum = torch.ones(P, dtype=DT)
    spectrum[:5] += torch.tensor([50.0, 20.0, 10.0, 5.0, 2.0], dtype=DT)
    A = operator_with_spectrum(spectrum)
    res = eigenvalues(A, k=5, tol=1e-10)
    torch.testing.assert_close(
        res.values, torch.tensor([51.0, 21.0, 11.0, 6.0, 3.0], dtype=DT), rtol=1e-10, atol=0
    )
    assert res.converged and res.matvecs < 120


@pytest.mark.parametrize("which", ["largest", "smallest", "both_ends", "largest_magnitude"])
def test_which_selects_the_right_end(which):
    spectrum = torch.cat(
        [torch.linspace(-3, 2, 196, dtype=DT), torch.tensor([-9.0, -8.0, 7.0, 6.0], dtype=DT)]
    )
    A = operator_with_spectrum(spectrum, seed=1)
    res = eigenvalues(A, k=4, which=which, tol=1e-10)
    expected = {
        "largest": [7.0, 6.0, 2.0, 2.0 - 5 / 195],
        "smallest": [-9.0, -8.0, -3.0, -3.0 + 5 / 195],
        "both_ends": [7.0, 6.0, -8.0, -9.0],
        "largest_magnitude": [-9.0, -8.0, 7.0, 6.0],
    }[which]
    torch.testing.assert_close(res.values, torch.tensor(expected, dtype=DT), rtol=1e-8, atol=1e-9)


def test_residuals_are_certificates():
    case = get_case("attention-layernorm-ce")
    problem = case.problem()
    H = curvkit.curvature("hessian", problem)
    truth = torch.linalg.eigvalsh(dense_hessian_reference(problem))
    res = eigenvalues(H, k=4, tol=1e-3)  # loose: residuals are not tiny
    V = res.vectors
    recomputed = (H.matmat(V) - V * res.values).norm(dim=0)
    torch.testing.assert_close(res.residuals, recomputed, rtol=1e-6, atol=1e-14)
    for value, residual in zip(res.values, res.residuals):  # [value - r, value + r] holds an eigenvalue
        assert (truth - value).abs().min() <= residual + 1e-12


def test_unreachable_tolerance_reports_not_converged():
    A = operator_with_spectrum(torch.linspace(0, 1, 400, dtype=DT) ** 3)
    res = eigenvalues(A, k=5, tol=1e-14, max_matvecs=30)
    assert not res.converged
    assert res.residuals.max() > 1e-14 * res.values.abs().max()
    assert torch.isfinite(res.values).all() and res.matvecs <= 30 + 5


def test_counts_products_and_data_passes():
    problem = get_case("tanh-mlp-ce").problem(batch_size=4)
    H = curvkit.curvature("hessian", problem)
    res = eigenvalues(H, k=2, tol=1e-8)
    assert res.matvecs == H.matvecs
    assert res.data_passes == 1  # the gradient graph is kept after the first product
    uncached = curvkit.curvature("hessian", problem, cache_graph=False)
    res = eigenvalues(uncached, k=2, tol=1e-8)
    assert res.data_passes == res.matvecs  # one pass per product; certificates from stored products


def test_certificates_without_stored_products_cost_one_batched_product(monkeypatch):
    problem = get_case("tanh-mlp-ce").problem(batch_size=4)
    H = curvkit.curvature("hessian", problem, cache_graph=False)
    stored = eigenvalues(H, k=3, tol=1e-10)
    monkeypatch.setattr(lanczos, "PRODUCT_STORE_BYTES", 0)
    explicit = eigenvalues(H, k=3, tol=1e-10)
    assert explicit.matvecs == stored.matvecs + 3
    assert explicit.data_passes == stored.data_passes + 1  # one pass for the three pairs
    torch.testing.assert_close(explicit.values, stored.values, rtol=0, atol=1e-13)
    # both are explicit residuals of the same pairs: they agree far below the tolerance
    scale = stored.values.abs().max()
    torch.testing.assert_close(explicit.residuals / scale, stored.residuals / scale, rtol=0, atol=1e-13)
    dense = dense_hessian_reference(problem)
    for value, vector, residual in zip(stored.values, stored.vectors.T, stored.residuals):
        assert abs((dense @ vector - value * vector).norm() - residual) <= 1e-13 * scale


def test_restricted_block():
    problem = get_case("cnn-pool-ce").problem()
    H = curvkit.curvature("hessian", problem)
    names = ["0.weight", "0.bias"]
    idx = problem.layout.indices(names)
    truth = torch.linalg.eigvalsh(dense_hessian_reference(problem)[idx][:, idx])
    res = eigenvalues(H.restrict("0"), k=2, tol=1e-10)
    torch.testing.assert_close(res.values, truth[-2:].flip(0), rtol=1e-8, atol=1e-12)


def test_float32_operator():
    problem = get_case("mlp-mse").problem(dtype=torch.float32)
    truth = torch.linalg.eigvalsh(dense_hessian_reference(get_case("mlp-mse").problem()))
    res = eigenvalues(curvkit.curvature("hessian", problem), k=2, tol=1e-5)
    assert res.values.dtype == torch.float32 and res.converged
    torch.testing.assert_close(res.values.double(), truth[-2:].flip(0), rtol=1e-5, atol=1e-6)


def test_power_iteration_parity_finds_largest_magnitude():
    A = operator_with_spectrum(torch.tensor([-5.0, 3.0, 1.0, 0.5, 0.1, 0.0], dtype=DT))
    res = eigenvalues(A, k=2, which="largest_magnitude", method="power", tol=1e-12, max_matvecs=4000)
    torch.testing.assert_close(res.values, torch.tensor([-5.0, 3.0], dtype=DT), rtol=1e-6, atol=0)
    with pytest.raises(curvkit.CurvkitError, match="largest_magnitude"):
        eigenvalues(A, k=1, method="power")


def test_progress_and_reproducibility():
    A = operator_with_spectrum(torch.linspace(0, 1, 100, dtype=DT))
    seen = []
    a = eigenvalues(A, k=2, tol=1e-6, seed=3, progress=seen.append)
    b = eigenvalues(A, k=2, tol=1e-6, seed=3)
    assert seen and seen[-1]["matvecs"] == a.matvecs  # certificates come from stored products
    assert torch.equal(a.values, b.values)


def test_bad_input():
    A = operator_with_spectrum(torch.arange(5, dtype=DT))
    with pytest.raises(curvkit.CurvkitError, match="between 1 and"):
        eigenvalues(A, k=6)
    for bad in (2.0, True, None):  # 2.0 failed inside Lanczos (an IndexError), None with a TypeError
        with pytest.raises(curvkit.CurvkitError, match=rf"^k must be an integer >= 1, got {bad}$"):
            eigenvalues(A, k=bad)
    with pytest.raises(curvkit.CurvkitError, match="which"):
        eigenvalues(A, k=1, which="top")
    with pytest.raises(curvkit.ShapeMismatchError):
        eigenvalues(torch.zeros(3, 4), k=1)
    to_dict = eigenvalues(A, k=2).to_dict()
    assert to_dict["values"] == pytest.approx([4.0, 3.0]) and to_dict["converged"]


@pytest.mark.parametrize("method, which", [("lanczos", "largest"), ("power", "largest_magnitude")])
def test_tol_is_a_relative_tolerance_below_one_and_max_matvecs_an_integer(method, which):
    """``tol=inf``, and any ``tol >= 1`` (``||A v - lambda v|| <= ||A||`` holds for every unit
    vector), was accepted: the first Ritz values came back marked converged. A NumPy integer
    ``max_matvecs`` was refused."""
    np = pytest.importorskip("numpy")
    A = operator_with_spectrum(torch.arange(1, 11, dtype=DT))
    for bad in (math.inf, math.nan, 0.0, -1.0, 1, 2.0, True):
        with pytest.raises(curvkit.CurvkitError, match=r"^tol must be a number in \(0, 1\) .*, got "):
            eigenvalues(A, k=2, method=method, which=which, tol=bad)
    expected = eigenvalues(A, k=2, method=method, which=which, tol=1e-8, max_matvecs=500)
    for tol in (np.float64(1e-8), torch.tensor([1e-8], dtype=DT)):
        got = eigenvalues(A, k=2, method=method, which=which, tol=tol, max_matvecs=np.int64(500))
        assert torch.equal(got.values, expected.values) and type(got.tol) is float


def test_tolerance_below_float32_precision_warns_and_stops_at_the_floor():
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(400, 400, generator=gen, dtype=DT))
    spectrum = torch.logspace(0, -3, 400, dtype=DT)
    A = curvkit.DenseOperator(((Q * spectrum) @ Q.T).float())
    with pytest.warns(curvkit.CurvkitWarning, match="below what torch.float32 products can certify"):
        res = eigenvalues(A, k=3, tol=1e-10)
    # the residuals stop improving at the products' rounding: the run stops there,
    # long before the default budget of 300 products
    assert res.stop_reason == "stagnated" and not res.converged and res.matvecs < 120
    relative = res.residuals / res.values.abs().max()
    assert relative.max().item() == pytest.approx(res.precision_floor, rel=1e-5)
    assert res.precision_floor < 8 * torch.finfo(torch.float32).eps  # clean products: a few eps
    torch.testing.assert_close(res.values.double(), spectrum[:3], rtol=1e-6, atol=0)


def test_reachable_float32_tolerance_does_not_warn(recwarn):
    problem = get_case("mlp-mse").problem(dtype=torch.float32)
    eigenvalues(curvkit.curvature("hessian", problem), k=2, tol=1e-5)
    assert not [w for w in recwarn if issubclass(w.category, curvkit.CurvkitWarning)]


def test_default_budget_is_a_few_hundred_products_scaled_with_k():
    """Slow convergence (a flat spectrum, a small basis) runs to the budget, not for hours:
    ``max(300, 30 k)`` products, then ``converged=False`` with the residuals reached."""
    assert lanczos.default_max_matvecs(1) == 300 and lanczos.default_max_matvecs(20) == 600
    A = operator_with_spectrum(torch.linspace(0, 1, 500, dtype=DT))
    res = eigenvalues(A, k=1, tol=1e-12, max_basis=4)
    assert res.stop_reason == "budget" and not res.converged and res.precision_floor is None
    assert res.matvecs == 300 and torch.isfinite(res.residuals).all()
    assert res.residuals.max() > 1e-12 * res.values.abs().max()  # the residual reached, reported
    assert eigenvalues(A, k=1, tol=1e-12, max_basis=4, max_matvecs=40).matvecs == 40


@pytest.mark.parametrize("reorthogonalisation", ["full", "partial", "auto"])
def test_reorthogonalisation_options_give_the_spectrum_without_ghosts(reorthogonalisation):
    """A dominant eigenvalue converges first and would come back as a copy ("ghost")
    without reorthogonalisation; each mode returns the true top-4, each once."""
    spectrum = torch.cat(
        [torch.linspace(0, 1, 396, dtype=DT), torch.tensor([1.9, 1.95, 2.0, 100.0], dtype=DT)]
    )
    res = eigenvalues(
        operator_with_spectrum(spectrum),
        k=4,
        tol=1e-10,
        max_basis=16,
        reorthogonalisation=reorthogonalisation,
    )
    assert res.converged and res.stop_reason == "converged" and res.restarts >= 1
    torch.testing.assert_close(
        res.values, torch.tensor([100.0, 2.0, 1.95, 1.9], dtype=DT), rtol=1e-10, atol=0
    )
    V = res.vectors
    torch.testing.assert_close(V.T @ V, torch.eye(4, dtype=DT), rtol=0, atol=1e-12)


def test_progress_reports_products_and_the_residual_after_each_product():
    A = operator_with_spectrum(torch.linspace(0, 1, 300, dtype=DT) ** 2)
    seen = []
    res = eigenvalues(A, k=3, tol=1e-8, progress=seen.append)
    assert [c["matvecs"] for c in seen] == list(range(1, res.matvecs + 1))
    assert {"matvecs", "basis", "restarts", "residual", "reorthogonalisation"} <= set(seen[0])
    assert seen[0]["residual"] == float("inf")  # fewer than k Ritz values yet
    assert seen[-1]["residual"] <= 1e-8 < seen[len(seen) // 2]["residual"]


def test_options_are_validated_and_the_stop_is_recorded():
    A = operator_with_spectrum(torch.arange(1, 11, dtype=DT))
    with pytest.raises(curvkit.CurvkitError, match="reorthogonalisation must be one of"):
        eigenvalues(A, k=1, reorthogonalisation="sometimes")
    for bad in (0, -5, 2.5, True):
        with pytest.raises(curvkit.CurvkitError, match="max_matvecs must be an integer >= 1 or None"):
            eigenvalues(A, k=1, max_matvecs=bad)
    record = eigenvalues(A, k=2).to_dict()
    assert record["stop_reason"] == "converged" and record["precision_floor"] is None
    # results built without the new fields (e.g. read from an older file) stay valid
    old = curvkit.EigenResult(
        values=torch.ones(1), vectors=None, residuals=torch.ones(1), matvecs=3, data_passes=None,
        converged=False, which="largest", method="lanczos", tol=1e-6, restarts=0,
    )  # fmt: skip
    assert old.stop_reason is None and old.precision_floor is None
    assert dataclasses.replace(old, converged=True).stop_reason == "converged"
