"""The template of data-backed operators: one loop, one reduction, pure per-batch products.

Also what ``STOCHASTIC`` and ``RESAMPLES`` mean: a seeded Monte-Carlo estimator is a
fixed linear map that every analysis accepts; one that resamples on every product
is refused by the Krylov analyses.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import curvkit
from curvkit.autodiff import hessian_batch_product
from curvkit.testing import dense_hessian_reference, get_case

REPO = Path(__file__).resolve().parents[1]
DT = torch.float64


@pytest.fixture(scope="module")
def problem():
    return get_case("tanh-mlp-ce").problem(batch_size=5)


class SignFlippedHessian(curvkit.ProblemOperator):
    """A Monte-Carlo toy: ``(1/C) sum_b s_b H_b`` with a random sign ``s_b = +-1`` per batch.

    Its expectation is 0; with a seed it is one fixed symmetric matrix.
    """

    SYMMETRIC, PSD, EXACT, STOCHASTIC = True, False, False, True

    def __init__(self, problem, seed=None, scale=1.0):
        super().__init__(problem, seed=seed)
        self.scale = scale

    def batch_product(self, params, inputs, targets, V, generator):
        sign = float(torch.randint(0, 2, (), generator=generator)) * 2 - 1
        parts, count = hessian_batch_product(self.problem, params, inputs, targets, V)
        return [sign * self.scale * part for part in parts], count


class ResampledSignFlippedHessian(SignFlippedHessian):
    RESAMPLES = True


def test_the_per_batch_product_is_pure_and_sums_to_the_full_product(problem):
    params = [p.detach() for p in problem.params]
    v = torch.randn(problem.dim, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    V = [block.movedim(-1, 0) for block in problem.layout.unflatten(v)]
    total, count = None, 0
    for inputs, targets in problem.batches():  # the test sums the batches itself
        parts, c = hessian_batch_product(problem, params, inputs, targets, V)
        flat = torch.cat([part.reshape(3, -1) for part in parts], dim=1).T
        total, count = (flat if total is None else total + flat), count + c
    expected = dense_hessian_reference(problem) @ v
    torch.testing.assert_close(total / count, expected, rtol=1e-10, atol=1e-12)
    for strategy in ("batched-reverse", "forward-over-reverse"):
        inputs, targets = next(iter(problem.batches()))
        again, _ = hessian_batch_product(problem, params, inputs, targets, V, strategy)
        first, _ = hessian_batch_product(problem, params, inputs, targets, V)
        for a, b in zip(again, first):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "options", [{"strategy": "reverse", "cache_graph": False}, {"strategy": "forward-over-reverse"}, {}]
)
def test_every_hessian_path_counts_its_passes_and_agrees(problem, options):
    H = curvkit.curvature("hessian", problem, **options)
    v = torch.randn(problem.dim, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(H @ v, dense_hessian_reference(problem) @ v, rtol=1e-10, atol=1e-12)
    assert H.data_passes == 1


def test_the_data_loop_is_written_once():
    """Every pass over a problem's data goes through Problem.batch_sums (one reduction point)."""
    loops = []
    for path in [*sorted((REPO / "curvkit").rglob("*.py")), *sorted((REPO / "plugins").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.For) and "batches()" in ast.unparse(node.iter):
                loops.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert len(loops) == 1 and loops[0].startswith("curvkit/problem.py"), loops


def test_options_are_captured_by_the_base_and_rebuild_a_block(problem):
    op = SignFlippedHessian(problem, seed=3, scale=2.0)
    assert op.options == {"seed": 3, "scale": 2.0}
    block = op.restrict("0")
    assert isinstance(block, SignFlippedHessian) and (block.scale, block.seed) == (2.0, 3)
    fresh = SignFlippedHessian(problem)  # seed None: one drawn, kept by a restriction
    assert fresh.seed is not None and fresh.restrict("0").seed == fresh.seed
    idx = problem.layout.indices(["0.weight", "0.bias"])
    torch.testing.assert_close(block.to_dense(), op.to_dense()[idx][:, idx], rtol=1e-10, atol=1e-12)


def test_a_seeded_monte_carlo_estimator_is_a_fixed_symmetric_map(problem):
    op = SignFlippedHessian(problem, seed=5)
    M = torch.randn(problem.dim, 4, dtype=DT, generator=torch.Generator().manual_seed(2))
    once = op.matmat(M)
    torch.testing.assert_close(op.matmat(M), once, rtol=0, atol=0)  # repeatable
    stacked = torch.stack([op.matvec(M[:, k]) for k in range(4)], dim=1)
    torch.testing.assert_close(stacked, once, rtol=1e-12, atol=1e-12)  # matmat = stacked matvecs
    assert curvkit.checks.check_symmetry(op).passed
    assert curvkit.eigenvalues(op, k=2).converged  # every analysis applies
    other = SignFlippedHessian(problem, seed=6).matmat(M)
    assert not torch.allclose(other, once)  # another seed, another map


def test_a_resampling_operator_is_refused_by_krylov_analyses_but_not_by_traces(problem):
    op = ResampledSignFlippedHessian(problem, seed=5)
    M = torch.randn(problem.dim, 1, dtype=DT, generator=torch.Generator().manual_seed(2))
    products = [op.matmat(M) for _ in range(4)]
    assert any(not torch.equal(products[0], p) for p in products[1:])  # fresh samples each time
    for analysis in (
        lambda: curvkit.eigenvalues(op, k=1),
        lambda: curvkit.density(op, steps=5, runs=1),
        lambda: curvkit.checks.check_symmetry(op),
    ):
        with pytest.raises(curvkit.CurvkitError, match="resamples on every product"):
            analysis()
    assert curvkit.trace(op, method="hutchinson", matvecs=4).matvecs == 4


class WrongShape(curvkit.ProblemOperator):
    def _product(self, M, snapshot):
        return M.T.clone()


class WrongDtype(curvkit.ProblemOperator):
    def _product(self, M, snapshot):
        return M.float()


@pytest.mark.parametrize(("cls", "fragment"), [(WrongShape, "shape"), (WrongDtype, "float32")])
def test_a_malformed_product_is_a_plugin_error_naming_the_estimator(problem, cls, fragment):
    op = cls(problem)
    op.name = "my-estimator"
    with pytest.raises(curvkit.PluginError, match=f"estimator 'my-estimator' returned .*{fragment}"):
        op.matmat(torch.ones(problem.dim, 2, dtype=DT))


def test_the_model_is_in_evaluation_mode_during_a_product():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2))
    X, y = torch.randn(16, 3, dtype=DT), torch.randint(0, 2, (16,))
    model = model.double().train()
    seen = []

    class Probe(curvkit.ProblemOperator):
        def batch_product(self, params, inputs, targets, V, generator):
            seen.append(self.problem.model.training)
            return hessian_batch_product(self.problem, params, inputs, targets, V)

    op = Probe(curvkit.Problem(model, "cross_entropy", (X, y), batch_size=8))
    op.matvec(torch.ones(op.shape[0], dtype=DT))
    assert seen == [False, False] and model.training  # eval during the pass, restored after
