"""The ``hessian`` and ``exact-hessian`` estimators against independent dense truth."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvkit
import curvkit.snapshot
from curvkit.testing import CASES, dense_hessian_reference, finite_difference_hessian, get_case


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_reference_agrees_with_finite_differences(case):
    problem = case.problem()
    truth = dense_hessian_reference(problem)
    assert (truth - truth.T).abs().max() < 1e-12
    assert rel(finite_difference_hessian(problem), truth) < 1e-7


@pytest.mark.parametrize("name", ["hessian", "exact-hessian"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_dense_matches_reference(case, name):
    problem = case.problem(batch_size=4)
    truth = dense_hessian_reference(problem)
    H = curvkit.curvature(name, problem)
    assert H.shape == truth.shape
    assert rel(H.to_dense(), truth) < 1e-12


def layernorm_trap():
    """The minimal reproduction of torch.func.hessian's LayerNorm error (torch 2.13)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Tanh()).double()
    with torch.no_grad():  # move LayerNorm off its (1, 0) initialisation
        model[1].weight.add_(0.3 * torch.randn(3, dtype=torch.float64))
        model[1].bias.add_(0.3 * torch.randn(3, dtype=torch.float64))
    c = torch.randn(3, dtype=torch.float64)
    X = torch.randn(6, 4, dtype=torch.float64)
    return curvkit.Problem(model, lambda out, _y: (out * c).sum(dim=1).mean(), (X, torch.zeros(6)))


def test_layernorm_regression_against_finite_differences():
    problem = layernorm_trap()
    H = curvkit.curvature("exact-hessian", problem).to_dense()
    fd = finite_difference_hessian(problem)
    assert (H - H.T).abs().max() < 1e-12
    assert rel(H, fd) < 1e-7


def test_exact_hessian_never_calls_torch_func_hessian(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.func.hessian is wrong with LayerNorm in torch 2.13")

    for name in ("hessian", "jacrev", "jacfwd"):
        monkeypatch.setattr(torch.func, name, refuse)
    problem = layernorm_trap()
    H = curvkit.curvature("exact-hessian", problem).to_dense()
    assert rel(H, finite_difference_hessian(problem)) < 1e-7


def test_float32_close_to_float64():
    case = get_case("attention-layernorm-ce")
    H64 = curvkit.curvature("hessian", case.problem()).to_dense()
    H32 = curvkit.curvature("hessian", case.problem(dtype=torch.float32)).to_dense()
    assert H32.dtype == torch.float32
    assert rel(H32.double(), H64) < 1e-4


def test_problem_to_float64_runs_a_copy():
    model, X, y = get_case("tanh-mlp-ce").build(torch.float32)
    problem = curvkit.Problem(model, "cross_entropy", (X, y))
    p64 = problem.to(torch.float64)
    assert p64.dtype == torch.float64 and problem.dtype == torch.float32
    assert next(model.parameters()).dtype == torch.float32
    H = curvkit.curvature("hessian", p64).to_dense()
    assert rel(H, dense_hessian_reference(p64)) < 1e-12


class CountingBatches:
    """A re-iterable of batches that counts full passes."""

    def __init__(self, X, y, size):
        self.batches = [(X[i : i + size], y[i : i + size]) for i in range(0, len(X), size)]
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


@pytest.mark.parametrize("cache_graph", [False, True])
def test_matmat_makes_one_pass_over_the_data(cache_graph):
    model, X, y = get_case("tanh-mlp-ce").build()
    data = CountingBatches(X, y, 4)
    problem = curvkit.Problem(model, "cross_entropy", data, check_deterministic=False)
    H = curvkit.curvature("hessian", problem, cache_graph=cache_graph)
    M = torch.randn(problem.dim, 6, dtype=torch.float64)
    out = H @ M
    assert data.passes == 1 and H.data_passes == 1
    assert rel(out, dense_hessian_reference(problem) @ M) < 1e-12
    H @ M
    assert data.passes == (1 if cache_graph else 2) + 1  # +1: the reference's pass


def test_products_follow_parameter_updates():
    problem = get_case("cnn-pool-ce").problem()
    H = curvkit.curvature("hessian", problem)
    E = curvkit.curvature("exact-hessian", problem)
    v = torch.randn(problem.dim, dtype=torch.float64)
    before = H @ v
    E.to_dense()
    opt = torch.optim.SGD(problem.model.parameters(), lr=0.5)
    loss, _ = problem.loss_and_gradient()
    for p, g in zip(problem.params, problem.layout.unflatten(problem.loss_and_gradient()[1])):
        p.grad = g.clone()
    opt.step()
    truth = dense_hessian_reference(problem)
    assert rel(H @ v, truth @ v) < 1e-12
    assert rel(E.to_dense(), truth) < 1e-12
    assert rel(before, truth @ v) > 1e-6


def test_exact_hessian_refuses_large_models():
    model = nn.Linear(200, 100)
    problem = curvkit.Problem(model, "mse", (torch.randn(4, 200), torch.randn(4, 100)))
    with pytest.raises(curvkit.DenseTooLargeError, match="restrict"):
        curvkit.curvature("exact-hessian", problem, max_dim=1000)
    block = curvkit.curvature("exact-hessian", problem.with_params("bias"), max_dim=1000)
    assert block.shape == (100, 100)
    assert rel(block.to_dense(), 2 / 100 * torch.eye(100)) < 1e-6  # mse: H_bias = 2/(N d) * N I


def test_restrict_differentiates_only_the_block():
    problem = get_case("attention-layernorm-ce").problem()
    H = curvkit.curvature("hessian", problem)
    block = H.restrict("norm")
    assert block.layout.names == ("norm.weight", "norm.bias")
    idx = problem.layout.indices(["norm.weight", "norm.bias"])
    truth = dense_hessian_reference(problem)[idx][:, idx]
    assert rel(block.to_dense(), truth) < 1e-12


@pytest.mark.parametrize("name", ["hessian", "exact-hessian"])
def test_edits_through_data_are_noticed(name):
    problem = get_case("tanh-mlp-ce").problem()
    H = curvkit.curvature(name, problem)
    v = torch.randn(problem.dim, dtype=torch.float64)
    H @ v
    problem.params[0].data.mul_(1.5)  # bypasses the version counter
    assert rel(H @ v, dense_hessian_reference(problem) @ v) < 1e-12


def _counting_comparisons(monkeypatch) -> list[int]:
    """Counts the content comparisons of model snapshots from now on (one entry per comparison)."""
    calls: list[int] = []
    compare = curvkit.snapshot.contents_equal

    def counted(tensors, values):
        calls.append(1)
        return compare(tensors, values)

    monkeypatch.setattr(curvkit.snapshot, "contents_equal", counted)
    return calls


def test_an_analysis_compares_the_models_contents_once(monkeypatch):
    problem = get_case("tanh-mlp-ce").problem()
    H = curvkit.curvature("hessian", problem)
    H @ torch.randn(problem.dim, dtype=torch.float64)
    calls = _counting_comparisons(monkeypatch)
    res = curvkit.eigenvalues(H, k=2, tol=1e-8)
    assert res.matvecs > 10 and len(calls) == 1  # not one per product (a sync each on a GPU)
    curvkit.trace(H, method="hutchinson", matvecs=8, batch_size=1)
    assert len(calls) == 2
    for _ in range(3):  # products outside an analysis: each compared
        H @ torch.randn(problem.dim, dtype=torch.float64)
    assert len(calls) == 5


def test_changes_within_an_analysis_that_move_version_counters_are_noticed():
    problem = get_case("tanh-mlp-ce").problem()
    H = curvkit.curvature("hessian", problem)
    v = torch.randn(problem.dim, dtype=torch.float64)
    with curvkit.fixed_model_state():
        H @ v
        with torch.no_grad():
            problem.params[0].mul_(1.5)  # moves the version counter
        assert rel(H @ v, dense_hessian_reference(problem) @ v) < 1e-12


def test_edits_through_data_between_analyses_are_noticed():
    problem = get_case("tanh-mlp-ce").problem()
    H = curvkit.curvature("hessian", problem)
    before = curvkit.eigenvalues(H, k=1, tol=1e-10).values
    problem.params[0].data.mul_(1.5)  # bypasses the version counter
    after = curvkit.eigenvalues(H, k=1, tol=1e-10).values
    truth = torch.linalg.eigvalsh(dense_hessian_reference(problem))[-1]
    assert rel(after, truth.reshape(1)) < 1e-8 and rel(before, after) > 1e-3


def test_snapshots_replaced_within_a_scope_are_freed():
    import gc
    import weakref

    problem = get_case("tanh-mlp-ce").problem()
    H = curvkit.curvature("hessian", problem)
    v = torch.randn(problem.dim, dtype=torch.float64)
    with curvkit.fixed_model_state():
        H @ v
        first = weakref.ref(problem.current_snapshot())
        for _ in range(3):  # a training loop inside the scope: each update replaces the snapshot
            with torch.no_grad():
                problem.params[0].mul_(0.9)
            H @ v
        gc.collect()
        assert first() is None  # not kept alive by the scope (each holds a copy of the parameters)
        assert rel(H @ v, dense_hessian_reference(problem) @ v) < 1e-12


def test_train_mode_batchnorm_keeps_running_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double().train()
    X, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 2, (20,))
    problem = curvkit.Problem(model, "cross_entropy", (X, y), eval_mode=False, batch_size=5)
    stats = model[1].running_mean.clone()
    H = curvkit.curvature("hessian", problem)
    v = torch.randn(problem.dim, dtype=torch.float64)
    first = H @ v
    assert torch.equal(model[1].running_mean, stats) and model[1].num_batches_tracked == 0
    assert H.engine.graph_cached
    assert rel(H @ v, first) < 1e-14


def test_auto_chooses_after_timed_trials_without_extra_products():
    problem = get_case("cnn-pool-ce").problem()
    H = curvkit.curvature("hessian", problem)
    truth = dense_hessian_reference(problem)
    M = torch.randn(problem.dim, 3, dtype=torch.float64)
    for call in range(7):
        assert rel(H @ M, truth @ M) < 1e-12
        decided = H.engine.batched.chosen(3) is not None
        assert decided == (call >= 5)  # six alternating trials, then a choice
    assert H.data_passes == 1 and H.matvecs == 21


def test_a_nan_the_model_does_not_use_is_no_change_of_the_model(monkeypatch):
    """A NaN equals itself in the snapshot's comparison: products reuse the snapshot and the
    determinism probe runs once, while a change of any other entry is still noticed."""
    problem = get_case("tanh-mlp-ce").problem()
    problem.model.register_buffer("unused", torch.tensor([1.0, float("nan")], dtype=torch.float64))
    passes: list[int] = []  # the determinism probe's passes over the data
    pass_over_data = curvkit.Problem.loss_and_gradient

    def counted(self, *args, **kwargs):
        passes.append(1)
        return pass_over_data(self, *args, **kwargs)

    monkeypatch.setattr(curvkit.Problem, "loss_and_gradient", counted)
    H = curvkit.curvature("hessian", problem)
    snapshots = {id(problem.current_snapshot()) for _ in range(3)}
    v = torch.randn(problem.dim, dtype=torch.float64)
    first = H @ v
    for _ in range(3):
        assert torch.equal(H @ v, first)
    assert len(snapshots) == 1 and id(problem.current_snapshot()) in snapshots
    assert len(passes) == 2  # one probe: two passes
    problem.model.unused.data[0] = 2.0  # bypasses the version counter: found by the comparison
    assert id(problem.current_snapshot()) not in snapshots
    problem.params[0].data.mul_(1.5)
    assert rel(H @ v, dense_hessian_reference(problem) @ v) < 1e-12
