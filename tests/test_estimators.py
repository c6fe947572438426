"""The ``ggn``, ``fisher`` and ``empirical-fisher`` estimators against independent dense truth.

Truth (``curvkit.testing.reference``) is built from first-order ``torch.func.jacrev``
Jacobians, dense output Hessians by double backward, Fisher expectations by
enumerating outcomes, and per-sample gradients by one autograd pass per sample;
the references are checked here against each other and against closed forms.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from curvkit.plugins.fisher import FisherOperator
from torch import nn

import curvkit
from curvkit.choice import Choice
from curvkit.jacobians import per_sample_gradients
from curvkit.testing import (
    CASES,
    Case,
    check_estimator,
    dense_empirical_fisher_reference,
    dense_fisher_reference,
    dense_ggn_reference,
    dense_hessian_reference,
    get_case,
)

DT = torch.float64
TIGHT = 1e-12
CANONICAL = [c for c in CASES if c.loss != "nll"]  # cross-entropy, mse, bce: Fisher = GGN
NLL_CASES = CASES  # every default case's loss is a negative log-likelihood


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / max(b.norm().item(), 1e-300)).item()


class Tanh(torch.autograd.Function):
    """``tanh`` with a hand-written backward and no forward-mode or vmap rule."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class CustomFunctionMLP(nn.Module):
    """torch.func can neither jvp (NotImplementedError) nor vmap (RuntimeError) through it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(Tanh.apply(self.a(x)))


def _sequence_targets(ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    targets = torch.randint(0, 3, (6, 4))
    targets[0, :2] = targets[3, 1] = ignore_index  # some positions ignored
    return torch.randn(6, 2, 4), targets


# Cases beyond curvkit.testing.CASES: positions, ignored targets, an ignore_index that is a
# class, a loss known only as a callable (one dense Hessian block per batch), outputs of one
# dim, class weights, and a model torch.func cannot transform.
SEQUENCE = Case(
    "sequence-ce-ignored",
    lambda: nn.Conv1d(2, 3, 3, padding=1),
    lambda: _sequence_targets(-100),
    nn.CrossEntropyLoss(ignore_index=-100),
)
IGNORED_CLASS = Case(
    "sequence-ce-ignore-class-1",
    lambda: nn.Conv1d(2, 3, 3, padding=1),
    lambda: _sequence_targets(1),
    nn.CrossEntropyLoss(ignore_index=1),
)
CUSTOM = Case(
    "mlp-callable-loss",
    lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)),
    lambda: (torch.randn(7, 3), torch.randn(7, 2)),
    lambda outputs, targets: ((outputs - targets) ** 2).sum(dim=1).mean(),
)
SCALAR_OUTPUTS = Case(
    "scalar-outputs-bce",
    lambda: nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1), nn.Flatten(0)),
    lambda: (torch.randn(8, 3), torch.randint(0, 2, (8,)).float()),
    "bce_with_logits",
)
WEIGHTED = Case(
    "class-weighted-ce",
    lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)),
    lambda: (torch.randn(9, 3), torch.randint(0, 3, (9,))),
    nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0, 0.5])),
)
UNTRANSFORMABLE = Case(
    "custom-function-ce",
    CustomFunctionMLP,
    lambda: (torch.randn(7, 3), torch.randint(0, 3, (7,))),
    "cross_entropy",
)
EXTRA = (SEQUENCE, IGNORED_CLASS, CUSTOM, SCALAR_OUTPUTS, WEIGHTED, UNTRANSFORMABLE)
EXTRA_NLL = (SEQUENCE, IGNORED_CLASS, SCALAR_OUTPUTS, UNTRANSFORMABLE)


# ------------------------------------------------------------- the references
def test_ggn_reference_is_the_hessian_of_a_model_linear_in_its_parameters():
    torch.manual_seed(0)
    for loss, targets in (("cross_entropy", torch.randint(0, 3, (10,))), ("mse", torch.randn(10, 3))):
        problem = curvkit.Problem(nn.Linear(4, 3).double(), loss, (torch.randn(10, 4, dtype=DT), targets))
        assert rel(dense_ggn_reference(problem), dense_hessian_reference(problem)) < TIGHT


@pytest.mark.parametrize("case", [*CANONICAL, SEQUENCE, SCALAR_OUTPUTS], ids=lambda c: c.name)
def test_fisher_reference_equals_ggn_reference_for_canonical_links(case):
    problem = case.problem(batch_size=4)  # outcome enumeration vs double backward
    assert rel(dense_fisher_reference(problem), dense_ggn_reference(problem)) < TIGHT


def test_nll_fisher_is_the_ggn_of_cross_entropy_on_the_logits():
    """``NLL(log_softmax(z))``: ``J^T diag(p) J`` through ``log_softmax`` is ``J_z^T (diag p - pp^T) J_z``."""
    case = get_case("dict-inputs-nll")
    model, inputs, targets = case.build()
    nll = curvkit.Problem(model, "nll", (inputs, targets), batch_size=4)
    logits = curvkit.Problem(
        model.net, "cross_entropy", (inputs["x"] * inputs["mask"], targets), batch_size=4
    )
    truth = dense_ggn_reference(logits)
    assert rel(dense_fisher_reference(nll), truth) < TIGHT
    assert rel(curvkit.curvature("fisher", nll, mode="exact").to_dense(), truth) < TIGHT
    assert curvkit.curvature("ggn", nll).to_dense().abs().max() == 0  # NLL is linear in its inputs


def test_empirical_fisher_reference_in_closed_form():
    X = torch.tensor([[1.0, 0.0], [0.5, 2.0], [-1.0, 1.0]], dtype=DT)
    y = torch.tensor([[1.0], [0.0], [2.0]], dtype=DT)
    model = nn.Linear(2, 1, bias=False).double()
    problem = curvkit.Problem(model, "mse", (X, y), batch_size=2)
    residuals = X @ model.weight.detach().T - y
    G = 2 * residuals * X  # g_n = 2 (x_n^T w - y_n) x_n
    assert rel(dense_empirical_fisher_reference(problem), G.T @ G / 3) < TIGHT


# -------------------------------------------------- estimators against truth
ESTIMATORS = {
    "ggn": ({}, dense_ggn_reference),
    "fisher": ({"mode": "exact"}, dense_fisher_reference),
    "empirical-fisher": ({}, dense_empirical_fisher_reference),
}


def _applicable(name: str, case: Case) -> bool:
    return name != "fisher" or case in (*NLL_CASES, *EXTRA_NLL)


@pytest.mark.parametrize("name", list(ESTIMATORS))
@pytest.mark.parametrize("case", [*CASES, *EXTRA], ids=lambda c: c.name)
def test_products_and_diagonals_match_dense_truth(case, name):
    if not _applicable(name, case):
        pytest.skip(f"{case.name}: not a negative log-likelihood")
    options, reference = ESTIMATORS[name]
    problem = case.problem(batch_size=4)
    truth = reference(problem)
    assert (truth - truth.T).abs().max() <= 1e-14 * truth.abs().max()
    A = curvkit.curvature(name, problem, **options)
    v = torch.randn(problem.dim, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    assert rel(A @ v, truth @ v) < TIGHT
    assert rel(A.to_dense(), truth) < TIGHT
    products = A.matvecs
    assert A.CHEAP_DIAGONAL and rel(A.diagonal(), truth.diagonal()) < TIGHT
    assert A.matvecs == products  # the diagonal costs no product
    assert torch.linalg.eigvalsh(truth)[0] >= -1e-12 * truth.abs().max()  # PSD


@pytest.mark.parametrize("name", ["ggn", "fisher"])
@pytest.mark.parametrize("case", CASES[:5], ids=lambda c: c.name)
def test_autograd_paths_agree_with_torch_func_paths(case, name):
    """The fallbacks (double-vjp ``J V``, looped pullbacks, per-sample loop) give the same matrices."""
    problem = case.problem(batch_size=4)
    options = ESTIMATORS[name][0]
    fast, slow = curvkit.curvature(name, problem, **options), curvkit.curvature(name, problem, **options)
    fast.way.pin("forward")
    fast.layers.covered = {}  # no layer rules: the generic vmapped per-sample pullbacks
    slow.way.pin("reverse")
    slow.vectorize.pin(False)
    slow.layers.covered = {}
    assert rel(slow.to_dense(), fast.to_dense()) < TIGHT
    assert rel(slow.diagonal(), fast.diagonal()) < TIGHT
    assert fast.vectorize.chosen() is True


def test_a_model_torch_func_cannot_transform_falls_back_once():
    problem = UNTRANSFORMABLE.problem(batch_size=4)
    ggn = curvkit.curvature("ggn", problem)
    truth = dense_ggn_reference(problem)
    assert rel(ggn.to_dense(), truth) < TIGHT and ggn.way.ruled_out == ["forward"]
    assert rel(ggn.diagonal(), truth.diagonal()) < TIGHT and set(ggn.layers.covered) == {"a", "b"}
    ggn.layers.covered = {}  # without layer rules, vmap fails and the loop takes over
    assert rel(ggn.diagonal(), truth.diagonal()) < TIGHT and ggn.vectorize.chosen() is False
    mc = curvkit.curvature("fisher", problem, seed=3)  # the fallback redraws the same samples
    M = torch.randn(problem.dim, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    first = mc @ M
    assert mc.way.chosen() == "reverse"
    assert torch.equal(mc @ M, first)
    fresh = curvkit.curvature("fisher", problem, seed=3)
    fresh.way.pin("reverse")  # never tried torch.func
    fresh.layers.covered = {}
    assert torch.equal(fresh @ M, first)
    # the diagonal's vmap fails after the draws: the fallback must redraw the same targets
    assert rel(fresh.diagonal(), torch.diagonal(fresh.to_dense())) < TIGHT
    assert fresh.vectorize.chosen() is False


def test_the_fallback_sees_the_generator_as_the_first_try_found_it():
    def compute(fast: bool, generator: torch.Generator) -> torch.Tensor:
        drawn = torch.rand(3, generator=generator)
        if fast:
            raise RuntimeError("no batching rule")
        return drawn

    generator = torch.Generator().manual_seed(0)
    choice = Choice((True, False))
    drawn = choice(lambda fast: compute(fast, generator), generator)
    assert choice.chosen() is False
    assert torch.equal(drawn, torch.rand(3, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ZeroDivisionError):  # other errors are the computation's own
        Choice((True, False))(lambda fast: 1 / 0)


@pytest.mark.parametrize("case", CANONICAL, ids=lambda c: c.name)
def test_exact_fisher_equals_ggn_for_canonical_links(case):
    problem = case.problem(batch_size=4)
    F = curvkit.curvature("fisher", problem, mode="exact")
    G = curvkit.curvature("ggn", problem)
    assert rel(F.to_dense(), G.to_dense()) < TIGHT
    assert rel(F.diagonal(), G.diagonal()) < TIGHT


def test_exact_fisher_differs_from_ggn_where_ignore_index_is_a_class():
    problem = IGNORED_CLASS.problem(batch_size=4)
    F = curvkit.curvature("fisher", problem, mode="exact").to_dense()
    assert rel(F, dense_fisher_reference(problem)) < TIGHT
    assert rel(F, curvkit.curvature("ggn", problem).to_dense()) > 0.01


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_batch_size_independence(name):
    """Products and diagonals with batches of 3, 5 and the whole dataset (positions, ignored targets)."""
    options = ESTIMATORS[name][0]
    for case in (get_case("attention-layernorm-ce"), SEQUENCE):
        ops = [curvkit.curvature(name, case.problem(batch_size=b), **options) for b in (3, 5, 100)]
        M = torch.randn(ops[0].shape[0], 3, dtype=DT, generator=torch.Generator().manual_seed(0))
        for op in ops[1:]:
            assert rel(op @ M, ops[0] @ M) < TIGHT
            assert rel(op.diagonal(), ops[0].diagonal()) < TIGHT


def test_restricted_estimators_are_blocks_with_their_own_cheap_diagonal():
    problem = get_case("cnn-pool-ce").problem()
    idx = problem.layout.indices(["3.weight", "3.bias"])
    for name, (options, reference) in ESTIMATORS.items():
        block = curvkit.curvature(name, problem, **options).restrict("3")
        truth = reference(problem)[idx][:, idx]
        assert rel(block.to_dense(), truth) < TIGHT and rel(block.diagonal(), truth.diagonal()) < TIGHT


# ---------------------------------------------------------- empirical Fisher
def test_empirical_fisher_normalisation():
    """(1/C) sum_n g_n is the gradient; reduction="sum" is C times "mean"; C counts as the loss does."""
    for case in (SEQUENCE, WEIGHTED, get_case("mlp-mse")):
        model, inputs, targets = case.build()
        mean = curvkit.Problem(model, case.loss, (inputs, targets), batch_size=4)
        total = curvkit.Problem(model, case.loss, (inputs, targets), batch_size=4, reduction="sum")
        params = [p.detach() for p in mean.params]
        grads, _, count = per_sample_gradients(mean, params, inputs, targets)
        assert grads[0].shape[0] == len(targets)  # one gradient per sample, not per position
        gradient = mean.layout.flatten([g.sum(0) for g in grads]) / count
        assert rel(gradient, mean.loss_and_gradient()[1]) < TIGHT
        E_mean = curvkit.curvature("empirical-fisher", mean).to_dense()
        E_sum = curvkit.curvature("empirical-fisher", total).to_dense()
        assert rel(E_sum, count * E_mean) < TIGHT
        if case is SEQUENCE:
            expected = float((targets != -100).sum())  # the positions not ignored: 21 of 24
        elif case is WEIGHTED:
            expected = float(torch.tensor([1.0, 3.0, 0.5], dtype=DT)[targets].sum())  # their weights
        else:
            expected = float(targets.numel())  # mse: every entry
        assert count == expected


def test_empirical_fisher_is_not_the_fisher():
    """At targets drawn from the model it is the Fisher in expectation; at the data's it is not."""
    problem = get_case("tanh-mlp-ce").problem()
    E = curvkit.curvature("empirical-fisher", problem).to_dense()
    F = dense_fisher_reference(problem)
    assert rel(E, F) > 0.1


def test_empirical_fisher_falls_back_to_a_loop_where_vmap_fails():
    problem = UNTRANSFORMABLE.problem(batch_size=4)
    truth = dense_empirical_fisher_reference(problem)
    E = curvkit.curvature("empirical-fisher", problem, strategy="per-sample")
    assert rel(E.to_dense(), truth) < TIGHT
    assert E.vectorize.chosen() is False
    auto = curvkit.curvature("empirical-fisher", problem)
    assert rel(auto.to_dense(), truth) < TIGHT and auto.way.ruled_out == ["forward"]


STRATEGIES = {
    "ggn": ("forward", "reverse"),
    "fisher": ("forward", "reverse"),
    "empirical-fisher": ("forward", "reverse", "per-sample"),
}


@pytest.mark.parametrize("name", list(STRATEGIES))
@pytest.mark.parametrize("case", [*CASES[:4], SEQUENCE, SCALAR_OUTPUTS, WEIGHTED], ids=lambda c: c.name)
def test_every_strategy_matches_dense_truth(case, name):
    if not _applicable(name, case):
        pytest.skip(f"{case.name}: not a negative log-likelihood")
    options, reference = ESTIMATORS[name]
    problem = case.problem(batch_size=4)
    truth = reference(problem)
    M = torch.randn(problem.dim, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    for strategy in STRATEGIES[name]:
        A = curvkit.curvature(name, problem, strategy=strategy, **options)
        assert rel(A @ M, truth @ M) < TIGHT, strategy
        assert rel(A @ M[:, 0], truth @ M[:, 0]) < TIGHT, strategy  # one direction: its own path
        assert A.way.chosen() == strategy


def test_auto_strategy_times_the_ways_on_real_products_and_keeps_one_per_key():
    problem = get_case("tanh-mlp-ce").problem(batch_size=64)  # one batch
    truth = dense_empirical_fisher_reference(problem)
    E = curvkit.curvature("empirical-fisher", problem)
    M = torch.randn(problem.dim, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    for _ in range(3 * 3):  # three ways, three timed products each
        assert E.way.chosen((2, problem.num_samples())) is None
        assert rel(E @ M, truth @ M) < TIGHT
    assert E.way.chosen((2, problem.num_samples())) in STRATEGIES["empirical-fisher"]
    assert E.way.chosen((1, problem.num_samples())) is None  # another K decides on its own
    assert E.matvecs == 18 and E.data_passes == 9  # choosing cost no extra products


def test_unknown_strategy_and_per_sample_memory_limit(monkeypatch):
    problem = get_case("mlp-mse").problem()
    for name in STRATEGIES:
        with pytest.raises(curvkit.CurvkitError, match="unknown strategy 'fast'; use one of"):
            curvkit.curvature(name, problem, strategy="fast")
    from curvkit.plugins import empirical_fisher

    monkeypatch.setattr(empirical_fisher, "PER_SAMPLE_BYTES", 16)
    v = torch.ones(problem.dim, dtype=DT)
    pinned = curvkit.curvature("empirical-fisher", problem, strategy="per-sample")
    with pytest.raises(empirical_fisher.PerSampleGradientsTooLargeError, match="GiB"):
        pinned @ v
    auto = curvkit.curvature("empirical-fisher", problem)
    truth = dense_empirical_fisher_reference(problem)
    for _ in range(7):  # the per-sample way is ruled out on its first turn, the others compete
        assert rel(auto @ v, truth @ v) < TIGHT
    assert auto.way.ruled_out == ["per-sample"]


def test_choice_keeps_the_fastest_way_per_key():
    import time

    delays = {"slow": 0.004, "fast": 0.0}

    def compute(way: str) -> str:
        time.sleep(delays[way])
        return way

    choice = Choice(("slow", "fast"), trials=2)
    ways = [choice(compute, key="K") for _ in range(4)]
    assert ways == ["slow", "fast", "slow", "fast"]  # taking turns, the preferred first
    assert choice.chosen("K") == "fast" and choice(compute, key="K") == "fast"
    assert choice.chosen("other") is None
    choice.pin("slow")
    assert choice.chosen("K") == "slow" and choice(compute, key="K") == "slow"


def _train_mode_batchnorm_problem() -> curvkit.Problem:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double().train()
    X, y = torch.randn(12, 3, dtype=DT), torch.randint(0, 2, (12,))
    return curvkit.Problem(model, "cross_entropy", (X, y), eval_mode=False, batch_size=6)


def test_samples_coupled_by_train_mode_batchnorm():
    problem = _train_mode_batchnorm_problem()
    with pytest.raises(curvkit.CurvkitError, match="couples the samples.*eval_mode=True"):
        curvkit.curvature("empirical-fisher", problem)
    G = curvkit.curvature("ggn", problem)  # products need no per-sample quantity
    assert not G.CHEAP_DIAGONAL
    dense = G.to_dense()
    assert rel(dense, dense_ggn_reference(problem)) < TIGHT
    assert rel(G.diagonal(), dense.diagonal()) < TIGHT  # the generic diagonal, from products


# ----------------------------------------------------------------- Monte Carlo
def _monte_carlo_check(problem: curvkit.Problem, truth: torch.Tensor, seeds: int, **options) -> float:
    """Average ``seeds`` independent MC Fishers; the error must be within what their spread predicts.

    Returns the relative Frobenius error of the average.
    """
    draws = torch.stack(
        [curvkit.curvature("fisher", problem, seed=s, **options).to_dense() for s in range(seeds)]
    )
    mean, stderr = draws.mean(0), draws.std(0) / seeds**0.5
    # per entry: within 5 standard errors (fixed seeds; about 1e-3 chance over all entries)
    assert ((mean - truth).abs() <= 5 * stderr + 1e-12 * truth.abs().max()).all()
    # overall: E ||mean - F||_F^2 = sum of the entries' variances / seeds
    expected = stderr.square().sum().sqrt().item()
    error = (mean - truth).norm().item()
    assert error < 1.5 * expected
    return error / truth.norm().item()


@pytest.mark.montecarlo
@pytest.mark.parametrize(
    "case",
    [get_case(n) for n in ("tanh-mlp-ce", "mlp-mse", "batchnorm-eval-bce", "dict-inputs-nll")]
    + [IGNORED_CLASS],
    ids=lambda c: c.name,
)
def test_monte_carlo_fisher_converges_to_the_exact_fisher(case):
    problem = case.problem(batch_size=4)
    truth = curvkit.curvature("fisher", problem, mode="exact").to_dense()
    err_100 = _monte_carlo_check(problem, truth, seeds=100)
    assert err_100 < 0.25
    err_1 = rel(curvkit.curvature("fisher", problem, seed=0).to_dense(), truth)
    assert err_100 < err_1 / 3  # about 1/sqrt(100) of one draw's error


@pytest.mark.montecarlo
def test_monte_carlo_fisher_of_a_callable_with_a_sampler():
    """A Gaussian NLL given as a callable: its Fisher is ``2 J^T J / N``, ``d = 2`` times the mse one."""
    case = get_case("mlp-mse")
    model, X, y = case.build()

    def draw(outputs, targets, generator):
        noise = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype)
        return outputs + 0.5**0.5 * noise

    loss = curvkit.losses.CustomLoss(lambda o, t: ((o - t) ** 2).sum(dim=1).mean(), sample_targets=draw)
    problem = curvkit.Problem(model, loss, (X, y), batch_size=4)
    truth = 2 * curvkit.curvature("fisher", case.problem(batch_size=4), mode="exact").to_dense()
    assert _monte_carlo_check(problem, truth, seeds=60, mc_samples=2) < 0.25
    with pytest.raises(curvkit.NoExactFisherError, match="mode='mc'"):
        curvkit.curvature("fisher", problem, mode="exact")


def test_a_seeded_monte_carlo_fisher_is_a_fixed_symmetric_map():
    problem = get_case("attention-layernorm-ce").problem(batch_size=4)
    F = curvkit.curvature("fisher", problem, mc_samples=2, seed=5)
    assert F.STOCHASTIC and not F.RESAMPLES and not F.EXACT
    M = torch.randn(problem.dim, 4, dtype=DT, generator=torch.Generator().manual_seed(2))
    once = F @ M
    assert rel(F @ M, once) < TIGHT  # repeatable ("auto" may round differently once it has chosen)
    pinned = curvkit.curvature("fisher", problem, mc_samples=2, seed=5, strategy="reverse")
    assert torch.equal(pinned @ M, pinned @ M) and rel(pinned @ M, once) < TIGHT  # bit for bit
    stacked = torch.stack([F @ M[:, k] for k in range(4)], dim=1)
    assert rel(stacked, once) < TIGHT  # one matmat = its stacked matvecs
    assert curvkit.checks.check_symmetry(F).passed
    dense = F.to_dense()
    assert (dense - dense.T).abs().max() < 1e-14 and torch.linalg.eigvalsh(dense)[0] > -1e-14
    assert rel(F.diagonal(), dense.diagonal()) < TIGHT  # the diagonal of the very same map
    assert curvkit.eigenvalues(F, k=2).converged
    block = F.restrict("head")
    idx = problem.layout.indices(["head.weight", "head.bias"])
    assert block.seed == 5 and rel(block.to_dense(), dense[idx][:, idx]) < TIGHT
    assert rel(curvkit.curvature("fisher", problem, mc_samples=2, seed=6) @ M, once) > 1e-3
    report = check_estimator("fisher", [get_case("tanh-mlp-ce")], options={"seed": 1, "mc_samples": 2})
    report.raise_on_failure()


class ResamplingFisher(FisherOperator):
    """A Monte-Carlo Fisher that draws fresh targets for every product: not one linear map."""

    RESAMPLES = True


def test_lanczos_refuses_a_resampling_fisher():
    problem = get_case("tanh-mlp-ce").problem()
    F = ResamplingFisher(problem, seed=0)
    v = torch.ones(problem.dim, dtype=DT)
    assert not torch.equal(F @ v, F @ v)
    for analysis in (lambda: curvkit.eigenvalues(F, k=1), lambda: curvkit.density(F, steps=4, runs=1)):
        with pytest.raises(curvkit.CurvkitError, match="resamples on every product"):
            analysis()
    for exact in (lambda: curvkit.trace(F, method="exact"), lambda: curvkit.diagonal(F, method="exact")):
        with pytest.raises(curvkit.CurvkitError, match="RESAMPLES"):
            exact()
    assert curvkit.trace(F, method="hutchinson", matvecs=3).matvecs == 3
    assert curvkit.diagonal(F, matvecs=3).matvecs == 3


# ---------------------------------------------------------- the battery, errors
@pytest.mark.parametrize(
    "name, options, cases",
    [
        ("ggn", {}, None),
        ("fisher", {"mode": "exact"}, None),
        ("empirical-fisher", {}, None),
        ("ggn", {}, [SEQUENCE, CUSTOM, SCALAR_OUTPUTS]),
        ("fisher", {"mode": "exact"}, [SEQUENCE, SCALAR_OUTPUTS]),
        ("empirical-fisher", {}, [SEQUENCE, CUSTOM, WEIGHTED]),
    ],
)
def test_conformance(name, options, cases):
    report = check_estimator(name, cases, options=options)
    report.raise_on_failure()
    assert {"reference", "psd", "batch-size", "symmetry", "restrict"} <= {r.check for r in report.results}


def test_registration():
    specs = {s.name: s for s in curvkit.estimators()}
    for name in ESTIMATORS:
        spec = specs[name]
        assert spec.plugin == f"curvkit.plugins.{name.replace('-', '_')}"
        assert spec.reference == name and spec.flags["symmetric"] and spec.flags["psd"]
    assert specs["fisher"].reference_options == {"mode": "exact"}
    assert set(specs["fisher"].losses) == set(curvkit.losses.LOSS_NAMES)
    assert specs["ggn"].losses is None and specs["empirical-fisher"].losses is None
    assert specs["fisher"].flags["stochastic"]  # the default mode
    assert curvkit.curvature("fisher", get_case("mlp-mse").problem(), mode="exact").EXACT


@pytest.mark.parametrize(
    "loss, targets",
    [
        (lambda o, t: ((o - t) ** 2).mean(), torch.randn(6, 3)),
        (nn.CrossEntropyLoss(label_smoothing=0.1), torch.randint(0, 3, (6,))),
        (nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)), torch.ones(6, 3)),
    ],
    ids=["callable", "label-smoothing", "pos-weight"],
)
@pytest.mark.parametrize("mode", ["mc", "exact"])
def test_fisher_refuses_a_loss_that_is_not_a_negative_log_likelihood(loss, targets, mode):
    problem = curvkit.Problem(nn.Linear(2, 3), loss, (torch.randn(6, 2), targets))
    name = problem.loss.name
    with pytest.raises(curvkit.NotNegativeLogLikelihoodError) as info:
        curvkit.curvature("fisher", problem, mode=mode)
    message = str(info.value)
    for fragment in (repr(name), f"mode={mode!r}", "'ggn'", "'empirical-fisher'", "sampler"):
        assert fragment in message, fragment


def test_options_are_checked():
    problem = get_case("mlp-mse").problem()
    with pytest.raises(curvkit.UnknownOptionError, match="'ggn' takes no option 'mode'; its options: strat"):
        curvkit.curvature("ggn", problem, mode="exact")
    with pytest.raises(curvkit.UnknownOptionError, match="its options: mode, mc_samples, seed"):
        curvkit.curvature("fisher", problem, samples=3)
    with pytest.raises(curvkit.UnknownOptionError, match="'empirical-fisher' takes no option 'seed'"):
        curvkit.curvature("empirical-fisher", problem, seed=0)
    with pytest.raises(curvkit.CurvkitError, match="unknown Fisher mode 'true'; use one of mc, exact"):
        curvkit.curvature("fisher", problem, mode="true")
    for estimator in ("fisher", "kfac"):
        options = {"fisher_type": "mc"} if estimator == "kfac" else {}
        for bad in (0, 2.5, True):
            with pytest.raises(
                curvkit.CurvkitError, match=rf"^mc_samples must be an integer >= 1, got {bad}$"
            ):
                curvkit.curvature(estimator, problem, mc_samples=bad, **options)
        # a NumPy integer (refused before) is taken, kept as a Python int
        op = curvkit.curvature(estimator, problem, mc_samples=np.int64(2), seed=0, **options)
        assert op.mc_samples == 2 and type(op.mc_samples) is int


SEEDED = ["d3", "ekfac", "fisher", "kfac"]
"""The built-in estimators that take a ``seed``."""


def test_the_seeded_estimators_are_those_that_name_a_seed():
    from curvkit.registry import estimator_options

    named = [spec.name for spec in curvkit.estimators() if "seed" in (estimator_options(spec) or [])]
    assert named == SEEDED


@pytest.mark.parametrize("name", SEEDED)
@pytest.mark.parametrize("bad", [1.5, "abc", -1, 2**63, True, 3.0], ids=repr)
def test_a_seed_is_an_integer_in_0_to_2_63_for_every_estimator(name, bad, monkeypatch):
    """Checked once for every estimator (``curvkit.registry.check_options``), before its factory runs:
    ``fisher`` took ``seed=1.5`` as 1 and ``d3`` ``seed="abc"`` unused (its direction was the gradient)."""
    from curvkit.registry import get_estimator

    problem = get_case("mlp-mse").problem()
    called = []
    monkeypatch.setattr(get_estimator(name), "factory", lambda *a, **k: called.append(k))
    with pytest.raises(curvkit.CurvkitError) as info:
        curvkit.curvature(name, problem, seed=bad)
    assert str(info.value) == f"{name}.seed must be an integer >= 0 and < 2**63 or None, got {bad!r}"
    assert called == []


@pytest.mark.parametrize("name", SEEDED)
def test_a_seed_may_be_none_or_a_numpy_integer(name):
    problem = get_case("mlp-mse").problem()
    for seed in (None, np.int64(3), 2**63 - 1):
        curvkit.curvature(name, problem, seed=seed)
    fisher = curvkit.curvature("fisher", problem, seed=np.int64(3))
    assert fisher.seed == 3 and type(fisher.seed) is int


def test_estimator_options_of_a_command_check_the_seed_before_any_checkpoint_is_loaded():
    from curvkit.runs import resolve_estimator_options

    with pytest.raises(curvkit.CurvkitError, match=r"^fisher.seed must be an integer >= 0 and < 2\*\*63"):
        resolve_estimator_options(["fisher"], {"fisher.seed": 1.5})
    with pytest.raises(curvkit.CurvkitError, match=r"^d3.seed must be an integer >= 0 and < 2\*\*63"):
        resolve_estimator_options(["hessian", "d3"], {"seed": "abc"})  # to every estimator that takes it
    resolved = resolve_estimator_options(["hessian", "fisher"], {"seed": np.int64(4)})
    assert resolved == {"hessian": {}, "fisher": {"seed": 4}} and type(resolved["fisher"]["seed"]) is int
