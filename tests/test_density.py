"""Spectral density by stochastic Lanczos quadrature (:mod:`curvkit.linalg.slq`).

Truth: ``torch.linalg.eigvalsh`` of dense matrices and of the dense reference
Hessian, and the exactness of Gauss quadrature for polynomials of degree below
``2 * steps``. Everything in float64 with fixed seeds unless a test says otherwise.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import curvkit
from curvkit.errors import CurvkitError, ShapeMismatchError
from curvkit.linalg.slq import DensityResult, _start_vectors, density, lanczos_quadrature
from curvkit.testing import dense_hessian_reference, get_case

DT = torch.float64


def _sym(P: int, seed: int = 0, dtype: torch.dtype = DT) -> torch.Tensor:
    M = torch.randn(P, P, generator=torch.Generator().manual_seed(seed), dtype=DT)
    return ((M + M.T) / (2 * math.sqrt(P))).to(dtype)


class CountingOperator(curvkit.DenseOperator):
    """A dense operator that records the shape of every ``matmat`` call."""

    def __init__(self, matrix: torch.Tensor):
        super().__init__(matrix)
        self.calls: list[tuple[int, ...]] = []

    def matmat(self, M: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(M.shape))
        return super().matmat(M)


# ------------------------------------------------------------ exact properties
def test_full_krylov_space_nodes_are_the_eigenvalues():
    M = _sym(30)
    dens = density(curvkit.DenseOperator(M), steps=30, runs=3, seed=1)
    assert dens.nodes.shape == (3, 30) and dens.run_steps == (30, 30, 30)
    ref = torch.linalg.eigvalsh(M)
    torch.testing.assert_close(dens.nodes, ref.expand(3, 30), rtol=0, atol=1e-12)


def test_full_krylov_space_on_the_hessian_of_a_small_model():
    problem = get_case("mlp-mse").problem()
    H = curvkit.curvature("hessian", problem)
    P = H.shape[0]
    ref = torch.linalg.eigvalsh(dense_hessian_reference(problem))
    dens = density(H, steps=P, runs=2, seed=0)
    assert dens.run_steps == (P, P)
    scale = ref.abs().max()
    torch.testing.assert_close(dens.nodes, ref.expand(2, P), rtol=0, atol=1e-10 * scale)


@pytest.mark.parametrize("steps", [1, 3, 6])
def test_quadrature_reproduces_moments_below_twice_the_steps(steps):
    P, runs, seed = 25, 3, 7
    M = _sym(P, seed=2)
    dens = density(curvkit.DenseOperator(M), steps=steps, runs=runs, seed=seed)
    V = _start_vectors(P, runs, seed, DT, "cpu")
    torch.testing.assert_close(V.norm(dim=0), torch.ones(runs, dtype=DT))
    AjV = V.clone()
    for j in range(2 * steps):
        exact = (V * AjV).sum(0)  # v^T A^j v for every run
        quad = (dens.weights * dens.nodes**j).sum(1)
        torch.testing.assert_close(quad, exact, rtol=1e-10, atol=1e-12)
        AjV = M @ AjV
    # ... and not beyond: degree 2 * steps is no longer exact in general
    exact = (V * AjV).sum(0)
    quad = (dens.weights * dens.nodes ** (2 * steps)).sum(1)
    assert (quad - exact).abs().max() > 1e-8


def test_custom_start_vectors_reproduce_their_moments():
    P = 20
    M = _sym(P, seed=3)
    start = torch.randn(P, 2, generator=torch.Generator().manual_seed(0), dtype=DT) * 3.0
    nodes, weights, run_steps = lanczos_quadrature(curvkit.DenseOperator(M), start, 4)
    assert run_steps == (4, 4)
    u = start / start.norm(dim=0)
    for j in range(8):
        exact = (u * (torch.linalg.matrix_power(M, j) @ u)).sum(0)
        torch.testing.assert_close((weights * nodes**j).sum(1), exact, rtol=1e-10, atol=1e-12)


def test_weights_sum_to_one_and_nodes_lie_in_the_spectrum():
    M = _sym(50, seed=4)
    ev = torch.linalg.eigvalsh(M)
    dens = density(curvkit.DenseOperator(M), steps=12, runs=4, seed=0)
    torch.testing.assert_close(dens.weights.sum(1), torch.ones(4, dtype=DT), rtol=0, atol=1e-13)
    assert (dens.weights >= 0).all()
    assert (dens.nodes >= ev[0] - 1e-12).all() and (dens.nodes <= ev[-1] + 1e-12).all()
    assert (dens.nodes.diff(dim=1) > 0).all()  # ascending, distinct


def test_density_integrates_to_one():
    dens = density(curvkit.DenseOperator(_sym(40, seed=5)), steps=15, runs=3, seed=0)
    assert dens.grid.shape == dens.density.shape == (1000,)
    assert (dens.density >= 0).all()
    assert abs(torch.trapezoid(dens.density, dens.grid).item() - 1.0) < 1e-5
    # default width and grid: 1% of the node range, 5 widths of margin
    lo, hi = dens.nodes.min().item(), dens.nodes.max().item()
    assert dens.sigma == pytest.approx(0.01 * (hi - lo))
    assert dens.grid[0].item() == pytest.approx(lo - 5 * dens.sigma)
    assert dens.grid[-1].item() == pytest.approx(hi + 5 * dens.sigma)


def test_density_is_the_average_of_broadened_quadratures():
    A = curvkit.DenseOperator(_sym(15, seed=6))
    dens = density(A, steps=5, runs=2, seed=3, sigma=0.2, grid=[0.0, 0.5])
    t = torch.tensor([0.0, 0.5], dtype=DT)[:, None, None]
    gauss = torch.exp(-((t - dens.nodes) ** 2) / (2 * 0.2**2)) / (0.2 * math.sqrt(2 * math.pi))
    torch.testing.assert_close(dens.density, (gauss * dens.weights).sum((1, 2)) / 2)
    assert dens.sigma == 0.2


def test_two_clusters_give_two_peaks():
    gen = torch.Generator().manual_seed(0)
    low = 1.0 + 0.02 * torch.randn(40, generator=gen, dtype=DT)
    high = 5.0 + 0.02 * torch.randn(20, generator=gen, dtype=DT)
    dens = density(curvkit.DenseOperator(torch.diag(torch.cat([low, high]))), steps=20, runs=5, seed=0)
    g, d = dens.grid, dens.density
    left, right = g < 3.0, g >= 3.0
    peak_left = g[left][d[left].argmax()].item()
    peak_right = g[right][d[right].argmax()].item()
    assert abs(peak_left - 1.0) < 0.1 and abs(peak_right - 5.0) < 0.1
    gap = (g > 2.0) & (g < 4.0)
    assert d[gap].max() < 1e-6 * d.max()
    # mass of each cluster: about 2/3 and 1/3 of the spectrum
    mass_left = torch.trapezoid(d[left], g[left]).item()
    assert 0.45 < mass_left < 0.85


def test_a_rank_one_shift_appears_as_an_outlier_with_mass_about_one_over_p():
    P = 60
    M = _sym(P, seed=8)
    u = torch.ones(P, dtype=DT) / math.sqrt(P)
    M = M + 10.0 * torch.outer(u, u)
    dens = density(curvkit.DenseOperator(M), steps=30, runs=5, seed=0)
    top = torch.linalg.eigvalsh(M)[-1]
    assert (dens.nodes.max(dim=1).values - top).abs().max() < 1e-10
    mass = dens.weights[dens.nodes > 5.0].sum() / dens.runs
    assert 0.0 < mass < 5.0 / P


# ------------------------------------------------------------------ the work
def test_one_matmat_per_lanczos_step():
    A = CountingOperator(_sym(50, seed=9))
    seen = []
    dens = density(A, steps=20, runs=5, seed=0, progress=seen.append)
    assert A.calls == [(50, 5)] * 20
    assert dens.matvecs == A.matvecs == 100 and dens.steps == 20 and dens.runs == 5
    assert [s["step"] for s in seen] == list(range(1, 21))
    assert all(s["steps"] == 20 for s in seen)
    assert [s["matvecs"] for s in seen] == list(range(5, 105, 5))


def test_steps_beyond_p_are_clipped():
    A = CountingOperator(_sym(6, seed=10))
    dens = density(A, steps=50, runs=2)
    assert dens.steps == 6 and dens.nodes.shape == (2, 6) and len(A.calls) == 6
    torch.testing.assert_close(dens.nodes[0], torch.linalg.eigvalsh(A.matrix), rtol=0, atol=1e-12)


def test_breakdown_on_a_low_rank_matrix():
    P = 40
    U = torch.randn(P, 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    M = U @ torch.diag(torch.tensor([3.0, -1.0, 0.5], dtype=DT)) @ U.T
    A = CountingOperator(M)
    dens = density(A, steps=10, runs=4, seed=0)
    # the Krylov space of a probe is span{v, Av, A^2 v, A^3 v}: four steps, then invariant
    assert dens.run_steps == (4, 4, 4, 4) and dens.steps == 4 and dens.matvecs == 16
    assert len(A.calls) == 4
    assert torch.isfinite(dens.nodes).all() and torch.isfinite(dens.density).all()
    torch.testing.assert_close(dens.weights.sum(1), torch.ones(4, dtype=DT), rtol=0, atol=1e-13)
    ev = torch.linalg.eigvalsh(M)
    expected = torch.cat([ev[:1], torch.zeros(1, dtype=DT), ev[-2:]])
    torch.testing.assert_close(dens.nodes, expected.expand(4, 4), rtol=0, atol=1e-10)
    assert abs(torch.trapezoid(dens.density, dens.grid).item() - 1.0) < 1e-5


def test_breakdown_of_one_run_leaves_the_others_going():
    diag = torch.arange(1.0, 9.0, dtype=DT)
    A = CountingOperator(torch.diag(diag))
    start = torch.ones(8, 2, dtype=DT)
    start[:, 0] = 0.0
    start[2, 0] = 1.0  # an eigenvector: invariant after one step
    nodes, weights, run_steps = lanczos_quadrature(A, start, 8)
    assert run_steps == (1, 8)
    assert A.calls[0] == (8, 2) and A.calls[1:] == [(8, 1)] * 7 and A.matvecs == 9
    torch.testing.assert_close(nodes[1], diag, rtol=0, atol=1e-12)
    torch.testing.assert_close(weights[0], torch.tensor([1.0] + [0.0] * 7, dtype=DT))
    assert (nodes[0] == 3.0).all()  # padded with its largest node


def test_zero_and_identity_operators():
    zero = density(curvkit.DenseOperator(torch.zeros(5, 5, dtype=DT)), steps=5, runs=2)
    assert zero.run_steps == (1, 1) and zero.sigma == 0.01
    assert (zero.nodes == 0).all() and torch.isfinite(zero.density).all()
    ident = density(curvkit.DenseOperator(2.0 * torch.eye(5, dtype=DT)), steps=5, runs=2)
    assert ident.nodes.shape == (2, 1) and ident.sigma == pytest.approx(0.02)
    torch.testing.assert_close(ident.nodes, torch.full((2, 1), 2.0, dtype=DT))


# --------------------------------------------------------- seeds and dtypes
def test_reproducible_by_seed():
    A = curvkit.DenseOperator(_sym(30, seed=11))
    a, b = density(A, steps=8, runs=3, seed=5), density(A, steps=8, runs=3, seed=5)
    c = density(A, steps=8, runs=3, seed=6)
    assert torch.equal(a.nodes, b.nodes) and torch.equal(a.weights, b.weights)
    assert torch.equal(a.density, b.density)
    assert not torch.equal(a.weights, c.weights)


def test_float32():
    M = _sym(40, seed=12, dtype=torch.float32)
    dens = density(curvkit.DenseOperator(M), steps=40, runs=3, seed=0)
    for t in (dens.grid, dens.density, dens.nodes, dens.weights):
        assert t.dtype == torch.float32 and t.device == M.device
    assert (dens.weights.sum(1) - 1).abs().max() < 1e-5
    ref = torch.linalg.eigvalsh(M.double()).float()
    k = dens.run_steps[0]
    assert k == 40
    torch.testing.assert_close(dens.nodes[0, :k], ref, rtol=0, atol=1e-4)
    assert abs(torch.trapezoid(dens.density.double(), dens.grid.double()).item() - 1.0) < 1e-4


def test_to_dict_is_plain():
    dens = density(curvkit.DenseOperator(_sym(10, seed=13)), steps=4, runs=2, grid_size=7)
    d = dens.to_dict()
    assert isinstance(dens, DensityResult)
    assert set(d) == {"grid", "density", "nodes", "weights", "sigma", "steps", "runs", "matvecs", "run_steps"}
    assert len(d["grid"]) == len(d["density"]) == 7
    assert len(d["nodes"]) == 2 and len(d["nodes"][0]) == 4 and isinstance(d["weights"][1][3], float)
    assert d["matvecs"] == 8 and d["run_steps"] == [4, 4] and isinstance(d["sigma"], float)
    assert json.loads(json.dumps(d)) == d
    with pytest.raises(AttributeError):
        dens.sigma = 1.0  # frozen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_on_cuda_matches_cpu():
    M = _sym(30, seed=14)
    cpu = density(curvkit.DenseOperator(M), steps=10, runs=3)
    gpu = density(curvkit.DenseOperator(M.cuda()), steps=10, runs=3)
    for t in (gpu.grid, gpu.density, gpu.nodes, gpu.weights):
        assert t.device.type == "cuda"
    torch.testing.assert_close(gpu.nodes.cpu(), cpu.nodes, rtol=0, atol=1e-10)
    torch.testing.assert_close(gpu.density.cpu(), cpu.density, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------- bad input
class _NonSquare:
    shape = (3, 4)
    dtype, device = DT, torch.device("cpu")

    def matmat(self, M):
        raise AssertionError("not called")


@pytest.mark.parametrize("A", [_NonSquare(), object(), torch.eye(3)])
def test_rejects_what_is_not_a_square_operator(A):
    with pytest.raises(ShapeMismatchError):
        density(A)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"steps": 0},
        {"steps": -3},
        {"steps": 2.5},
        {"runs": 0},
        {"sigma": 0.0},
        {"sigma": -1.0},
        {"sigma": float("nan")},
        {"grid_size": 1},
        {"grid": []},
    ],
)
def test_bad_arguments_raise_one_line_errors(kwargs):
    A = CountingOperator(_sym(5))
    with pytest.raises(CurvkitError) as info:
        density(A, **kwargs)
    assert "\n" not in str(info.value) and str(info.value)
    assert A.calls == []  # refused before any work


def test_sigma_is_a_finite_positive_number_of_any_kind():
    """A one-element tensor (a width computed with torch) was refused, a bool taken as 1."""
    np = pytest.importorskip("numpy")
    A = curvkit.DenseOperator(_sym(5))
    expected = density(A, steps=3, runs=2, sigma=0.5, grid_size=11)
    for sigma in (torch.tensor(0.5), torch.tensor([0.5], dtype=DT), np.float32(0.5)):
        got = density(A, steps=3, runs=2, sigma=sigma, grid_size=np.int64(11))
        assert torch.equal(got.density, expected.density) and type(got.sigma) is float
    for bad in (True, math.inf, torch.ones(2)):
        with pytest.raises(CurvkitError, match=r"^sigma must be a finite number > 0, got "):
            density(A, steps=3, runs=2, sigma=bad)


def test_rejects_non_symmetric_operators():
    M = torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=DT)
    with pytest.raises(CurvkitError, match="symmetric"):
        density(curvkit.DenseOperator(M))
