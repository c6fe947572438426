"""NaturalGradient (low-rank damped GGN / Fisher steps) and CurvaturePreconditioner (any estimator)."""

from __future__ import annotations

import copy
import types
import warnings

import pytest
import torch
from torch import nn

import curvkit
from curvkit.optim.natural_gradient import NaturalGradient, woodbury_solve
from curvkit.optim.preconditioner import CurvaturePreconditioner

DT = torch.float64
DAMPING = 1e-3


def mlp(classes: int = 3, log_softmax: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, classes)]
    if log_softmax:
        layers.append(nn.LogSoftmax(dim=1))
    return nn.Sequential(*layers).to(DT)


def batch(loss: str, classes: int = 3, n: int = 7, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, dtype=DT, generator=generator)
    if loss == "mse":
        return X, torch.randn(n, classes, dtype=DT, generator=generator)
    return X, torch.randint(0, classes, (n,), generator=generator)


def dense_step(model: nn.Module, loss: str, X, y, estimator: str = "ggn", **options) -> torch.Tensor:
    """``-(A + DAMPING I)^-1 g`` from the estimator's dense matrix."""
    problem = curvkit.Problem(model, loss, (X, y))
    A = curvkit.curvature(estimator, problem, **options).to_dense()
    _, g = problem.loss_and_gradient()
    return -torch.linalg.solve(A + DAMPING * torch.eye(A.shape[0], dtype=DT), g)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------- NaturalGradient
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_the_low_rank_step_is_the_dense_damped_ggn_solve(loss):
    model = mlp()
    X, y = batch(loss)
    expected = dense_step(model, loss, X, y)
    before = flat(model)
    NaturalGradient(
        model.parameters(), model=model, loss_fn=loss, damping=DAMPING, adaptive_damping=False
    ).step(batch=(X, y))
    assert relative(flat(model) - before, expected) < 1e-9


def test_the_fisher_step_is_the_dense_exact_fisher_solve_where_it_differs_from_the_ggn():
    model = mlp(log_softmax=True)  # NLL of log-probabilities: zero GGN, Fisher diag(p) pulled back
    X, y = batch("nll")
    expected = dense_step(model, "nll", X, y, "fisher", mode="exact")
    assert relative(expected, dense_step(model, "nll", X, y)) > 0.5  # really another matrix
    before = flat(model)
    opt = NaturalGradient(
        model.parameters(),
        model=model,
        loss_fn="nll",
        curvature="fisher",
        damping=DAMPING,
        adaptive_damping=False,
    )
    opt.step(batch=(X, y))
    assert relative(flat(model) - before, expected) < 1e-9


def test_a_custom_loss_and_interacting_samples_take_the_whole_batch_path():
    model = mlp(classes=2)
    X, y = batch("mse", classes=2)

    def quartic(o, t):  # a callable: its factor has no per-sample layout
        return ((o - t) ** 2).mean() + (o**4).mean()

    expected = dense_step(model, quartic, X, y)
    before = flat(model)
    NaturalGradient(
        model.parameters(), model=model, loss_fn=quartic, damping=DAMPING, adaptive_damping=False
    ).step(batch=(X, y))
    assert relative(flat(model) - before, expected) < 1e-9

    torch.manual_seed(0)
    bn = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    X, y = batch("cross_entropy")
    problem = curvkit.Problem(bn, "cross_entropy", (X, y), eval_mode=False)  # batch statistics
    G = curvkit.curvature("ggn", problem).to_dense()
    _, g = problem.loss_and_gradient()
    expected = -torch.linalg.solve(G + DAMPING * torch.eye(G.shape[0], dtype=DT), g)
    before = flat(bn)
    opt = NaturalGradient(
        bn.parameters(),
        model=bn,
        loss_fn="cross_entropy",
        damping=DAMPING,
        eval_mode=False,
        adaptive_damping=False,
    )
    opt.step(batch=(X, y))
    assert relative(flat(bn) - before, expected) < 1e-9


def test_a_parameter_subset_and_groups_with_their_own_learning_rates():
    model = mlp()
    X, y = batch("cross_entropy")
    problem = curvkit.Problem(model, "cross_entropy", (X, y), params="2")
    G = curvkit.curvature("ggn", problem).to_dense()
    _, g = problem.loss_and_gradient()
    d = torch.linalg.solve(G + DAMPING * torch.eye(G.shape[0], dtype=DT), g)
    weight, bias = model[2].weight, model[2].bias
    before = [weight.detach().clone(), bias.detach().clone(), model[0].weight.detach().clone()]
    groups = [{"params": [bias], "lr": 0.5}, {"params": [weight]}]  # another order than the model's
    NaturalGradient(
        groups, model=model, loss_fn="cross_entropy", damping=DAMPING, adaptive_damping=False
    ).step(batch=(X, y))
    dw, db = d[: weight.numel()].reshape(weight.shape), d[weight.numel() :]
    torch.testing.assert_close(weight - before[0], -dw, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(bias - before[1], -0.5 * db, rtol=1e-9, atol=1e-12)
    assert torch.equal(model[0].weight, before[2])  # not optimized


def test_woodbury_matches_the_dense_solve_and_needs_no_p_by_p_matrix():
    generator = torch.Generator().manual_seed(0)
    U, g = torch.randn(50, 6, dtype=DT, generator=generator), torch.randn(50, dtype=DT, generator=generator)
    dense = torch.linalg.solve(U @ U.T + 0.1 * torch.eye(50, dtype=DT), g)
    assert relative(woodbury_solve(U, g, 0.1), dense) < 1e-12
    assert torch.isnan(woodbury_solve(U * float("nan"), g, 0.1)).all()


def test_the_rank_limit_refuses_in_one_line():
    model = mlp()
    X, y = batch("cross_entropy", n=7)  # K = 7 samples x 3 classes = 21
    opt = NaturalGradient(model.parameters(), model=model, loss_fn="cross_entropy", max_rank=20)
    before = flat(model)
    with pytest.raises(
        curvkit.CurvkitError,
        match=r"^NaturalGradient: the batch's low-rank system is 21 x 21 "
        r"\(7 samples x 3 output directions\), above max_rank=20: use a smaller batch",
    ) as info:
        opt.step(batch=(X, y))
    assert "\n" not in str(info.value)
    assert torch.equal(flat(model), before)
    opt.max_rank = 21
    opt.step(batch=(X, y))


def test_loss_decreases_on_logistic_regression_to_its_minimum():
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(64, 5, dtype=DT, generator=generator)
    noise = torch.randn(64, dtype=DT, generator=generator)
    y = (X @ torch.randn(5, dtype=DT, generator=generator) + noise > 0).long()  # not separable
    torch.manual_seed(0)
    model = nn.Linear(5, 2).to(DT)
    problem = curvkit.Problem(model, "cross_entropy", (X, y))
    first = problem.loss_and_gradient()[1].norm().item()
    opt = NaturalGradient(model.parameters(), model=model, loss_fn="cross_entropy", damping=1e-4)
    losses = [opt.step(batch=(X, y)).item() for _ in range(8)]  # linear model: GGN = Hessian, damped Newton
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert problem.loss_and_gradient()[1].norm().item() < 1e-6 * first


def test_defaults_train_a_small_mlp_on_random_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(DT)
    X, y = torch.randn(32, 6, dtype=DT), torch.randint(0, 3, (32,))
    opt = NaturalGradient(model.parameters(), model=model, loss_fn="cross_entropy")  # lr=1, damping=1e-3
    first = opt.step(batch=(X, y)).item()
    for _ in range(15):
        last = opt.step(batch=(X, y)).item()
    assert last < 0.5 * first, (first, last)
    assert opt.steps == 16 and opt.skipped_steps == 0


def test_adaptive_damping_undoes_a_step_that_increases_the_loss_and_solves_again():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(DT)
    X, y = torch.randn(32, 6, dtype=DT), torch.randint(0, 3, (32,))
    start = flat(model)
    problem = curvkit.Problem(copy.deepcopy(model), "cross_entropy", (X, y))  # at the start
    G = curvkit.curvature("ggn", problem).to_dense()
    loss, g = problem.loss_and_gradient()

    def solve(damping):
        return -torch.linalg.solve(G + damping * torch.eye(G.shape[0], dtype=DT), g)

    plain = curvkit.Problem(mlp_like(model, start + solve(DAMPING)), "cross_entropy", (X, y))
    assert plain.loss_and_gradient()[0] > 3 * loss  # the plain full step overshoots
    opt = NaturalGradient(model.parameters(), model=model, loss_fn="cross_entropy")
    assert opt.step(batch=(X, y)).item() == pytest.approx(loss.item(), rel=1e-14)
    tries = opt.rejected_trials
    assert tries >= 1 and opt.skipped_steps == 0
    used = DAMPING * 10.0**tries  # the solve kept: ten times the damping per undone solve
    assert relative(flat(model) - start, solve(used)) < 1e-9
    after = curvkit.Problem(model, "cross_entropy", (X, y)).loss_and_gradient()[0]
    assert after < loss
    assert opt.damping in (used / 1.5, used, used * 1.5) and opt.last_reduction_ratio > 0


def mlp_like(model: nn.Module, values: torch.Tensor) -> nn.Module:
    other = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(values, other.parameters())
    return other


def test_momentum_and_a_state_dict_round_trip_resume_bit_identically():
    model = mlp()
    X, y = batch("cross_entropy", n=10)
    batches = [(X[i : i + 5], y[i : i + 5]) for i in (0, 5)] * 3

    def make(m):
        return NaturalGradient(
            m.parameters(), model=m, loss_fn="cross_entropy", lr=0.5, momentum=0.9, damping=0.1
        )

    opt = make(model)
    for b in batches[:3]:
        opt.step(batch=b)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert saved_opt["curvkit"]["steps"] == 3 and saved_opt["state"][0]["momentum_buffer"].dtype == DT
    for b in batches[3:]:
        opt.step(batch=b)
    resumed = mlp(seed=5)
    resumed.load_state_dict(saved_model)
    other = make(resumed)
    other.load_state_dict(saved_opt)
    for b in batches[3:]:
        other.step(batch=b)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    assert other.steps == 6
    fisher = NaturalGradient(resumed.parameters(), model=resumed, loss_fn="cross_entropy", curvature="fisher")
    with pytest.raises(ValueError, match="curvature='ggn', not 'fisher'"):
        fisher.load_state_dict(saved_opt)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": -1}, r"lr must be a finite number >= 0, got -1"),
        ({"lr": float("nan")}, r"lr must be a finite number >= 0"),
        ({"damping": 0}, r"damping must be a finite number > 0, got 0"),
        ({"damping": -1e-3}, r"damping must be a finite number > 0"),
        ({"momentum": 1.0}, r"momentum must be a number in \[0, 1\), got 1.0"),
        ({"momentum": -0.1}, r"momentum must be a number in \[0, 1\)"),
        ({"curvature": "hessian"}, r"curvature must be one of \['ggn', 'fisher'\], got 'hessian'"),
        ({"max_rank": 0}, r"max_rank must be an integer >= 1, got 0"),
        ({"max_rank": 2.5}, r"max_rank must be an integer >= 1"),
        ({"loss_fn": None}, r"needs model= and loss_fn="),
        (
            {"loss_fn": nn.CrossEntropyLoss(label_smoothing=0.1), "curvature": "fisher"},
            r"negative log-likelihood",
        ),
    ],
)
def test_invalid_hyper_parameters_raise_value_errors(options, message):
    model = mlp()
    kwargs = {"model": model, "loss_fn": "cross_entropy", **options}
    with pytest.raises(ValueError, match=message):
        NaturalGradient(model.parameters(), **kwargs)


def test_invalid_groups_and_strangers_raise_value_errors():
    model = mlp()
    with pytest.raises(ValueError, match=r"parameter group 1: lr must be a finite number >= 0"):
        NaturalGradient(
            [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": -1.0}],
            model=model,
            loss_fn="mse",
        )
    with pytest.raises(ValueError, match="1 optimized tensor"):
        NaturalGradient([nn.Parameter(torch.zeros(2))], model=model, loss_fn="mse")
    opt = NaturalGradient(model.parameters(), model=model, loss_fn="mse")
    with pytest.raises(ValueError, match=r"needs batch=\(inputs, targets\)"):
        opt.step()


def test_a_nan_gradient_skips_the_step_with_a_warning():
    model = mlp()
    X, y = batch("cross_entropy")
    X[2, 1] = float("nan")
    opt = NaturalGradient(model.parameters(), model=model, loss_fn="cross_entropy", momentum=0.5)
    before = flat(model)
    with pytest.warns(
        curvkit.CurvkitWarning, match="NaturalGradient: step skipped: the natural-gradient step"
    ):
        opt.step(batch=(X, y))
    assert torch.equal(flat(model), before) and opt.skipped_steps == 1
    assert not any(state for state in opt.state.values())  # no momentum buffer from a skipped step
    X[2, 1] = 0.0
    opt.step(batch=(X, y))
    assert torch.isfinite(flat(model)).all() and not torch.equal(flat(model), before)


# ---------------------------------------------------------------------- CurvaturePreconditioner
def backward(model: nn.Module, X, y, loss: str = "cross_entropy") -> None:
    model.zero_grad()
    out = model(X)
    value = nn.functional.cross_entropy(out, y) if loss == "cross_entropy" else nn.functional.mse_loss(out, y)
    value.backward()


def train_steps(model, precond, sgd, batches):
    """``backward``, ``precond.step`` and ``sgd.step`` on each batch in turn."""
    for b in batches:
        backward(model, *b)
        precond.step(batch=b)
        sgd.step()


@pytest.mark.parametrize(("solver", "tolerance"), [("exact", 1e-9), ("auto", 1e-7)])
def test_the_ggn_preconditioner_with_sgd_is_the_damped_natural_step(solver, tolerance):
    model = mlp()
    X, y = batch("cross_entropy")
    expected = dense_step(model, "cross_entropy", X, y)
    natural = copy.deepcopy(model)
    NaturalGradient(
        natural.parameters(), model=natural, loss_fn="cross_entropy", damping=DAMPING, adaptive_damping=False
    ).step(batch=(X, y))
    precond = CurvaturePreconditioner(
        model, "ggn", loss_fn="cross_entropy", damping=DAMPING, solver=solver, solver_options={"tol": 1e-12}
    )
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    before = flat(model)
    backward(model, X, y)
    assert precond.step(batch=(X, y))
    sgd.step()
    assert relative(flat(model) - before, expected) < tolerance
    assert relative(flat(model), flat(natural)) < tolerance
    assert precond.last_solve.method == ("exact" if solver == "exact" else "cg")


def test_kfac_by_default_preconditions_with_its_structured_inverse():
    model = mlp()
    X, y = batch("cross_entropy")
    precond = CurvaturePreconditioner(model, loss_fn="cross_entropy", damping=0.1)
    backward(model, X, y)
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    precond.step(batch=(X, y))
    K = curvkit.curvature("kfac", curvkit.Problem(model, "cross_entropy", (X, y)))
    expected = K.inverse(0.1) @ g
    assert relative(torch.cat([p.grad.reshape(-1) for p in model.parameters()]), expected) < 1e-12
    assert precond.last_solve is None and precond.operator.name == "kfac"


class _Diagonal(curvkit.ProblemOperator):
    """``diag(scale * (1, 2, ..., P))``, with its exact inverse (STRUCTURE)."""

    PSD, EXACT = True, False
    STRUCTURE = frozenset({"inverse"})

    def __init__(self, problem, scale=1.0):
        super().__init__(problem)
        self.values = scale * torch.arange(1, problem.dim + 1, dtype=problem.dtype, device=problem.device)

    def _product(self, M, snapshot):
        return self.values[:, None] * M

    def _inverse(self, damping):
        return curvkit.DiagonalOperator(1.0 / (self.values + damping), self.layout)


class _Broken(curvkit.ProblemOperator):
    """Products that are not finite."""

    PSD, EXACT = True, False

    def _product(self, M, snapshot):
        return M * float("nan")


class _ScaledIdentity(curvkit.ProblemOperator):
    """``scale * I``, matrix-free (no structure: conjugate gradients invert it)."""

    PSD, EXACT = True, False

    def __init__(self, problem, scale=2.0):
        super().__init__(problem)
        self.scale = scale

    def _product(self, M, snapshot):
        return self.scale * M


@curvkit.hookimpl
def _register():
    return [
        curvkit.EstimatorSpec(name="test-diagonal", factory=_Diagonal, description="A diagonal ramp."),
        curvkit.EstimatorSpec(name="test-scaled-identity", factory=_ScaledIdentity, description="scale * I."),
        curvkit.EstimatorSpec(name="test-broken", factory=_Broken, description="NaN products."),
    ]


@pytest.fixture
def third_party():
    module = types.ModuleType("optim_natural_test_plugin")
    module.curvkit_register_estimators = _register
    name = curvkit.register_plugin(module, name="optim-natural-test-plugin")
    yield name
    curvkit.unregister_plugin(name=name)
    assert "test-diagonal" not in {s.name for s in curvkit.estimators()}


def test_a_third_party_estimator_preconditions_with_its_exact_damped_solve(third_party):
    model = mlp()
    X, y = batch("cross_entropy")
    precond = CurvaturePreconditioner(model, "test-diagonal", loss_fn="cross_entropy", damping=0.5, scale=3.0)
    backward(model, X, y)
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    precond.step(batch=(X, y))
    d = 3.0 * torch.arange(1, g.numel() + 1, dtype=DT)
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, g * (1.0 / (d + 0.5)), rtol=0, atol=0)  # the estimator's own inverse
    assert precond.operator.name == "test-diagonal" and precond.last_solve is None

    identity = CurvaturePreconditioner(model, "test-scaled-identity", loss_fn="cross_entropy", damping=0.5)
    backward(model, X, y)
    identity.step(batch=(X, y))  # matrix-free: conjugate gradients, exact in one iteration
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, g / 2.5, rtol=1e-14, atol=0)
    assert identity.last_solve.method == "cg" and identity.last_solve.iterations == 1
    broken = CurvaturePreconditioner(model, "test-broken", loss_fn="cross_entropy")
    backward(model, X, y)
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.warns(
        curvkit.CurvkitWarning,
        match=r"left unchanged: the 'test-broken' curvature of this batch is not finite \(no curvature yet",
    ):
        assert not broken.step(batch=(X, y))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert broken.skipped_steps == 1 and broken.operator is None
    with pytest.raises(
        curvkit.UnknownOptionError, match="^CurvaturePreconditioner takes no argument 'scale'"
    ):
        CurvaturePreconditioner(model, "ggn", loss_fn="cross_entropy", scale=2.0)


def test_a_parameter_selection_preconditions_only_those_gradients(third_party):
    model = mlp()
    X, y = batch("cross_entropy")
    precond = CurvaturePreconditioner(
        model, "test-scaled-identity", loss_fn="cross_entropy", params="2", scale=1.0
    )
    backward(model, X, y)
    first = model[0].weight.grad.clone()
    last = model[2].weight.grad.clone()
    precond.step(batch=(X, y))
    assert torch.equal(model[0].weight.grad, first)
    torch.testing.assert_close(model[2].weight.grad, last / (1.0 + DAMPING), rtol=1e-14, atol=0)


def test_non_finite_gradients_are_left_unchanged_with_a_warning_and_counted():
    model = mlp()
    X, y = batch("cross_entropy")
    precond = CurvaturePreconditioner(model, "ggn", loss_fn="cross_entropy", solver="exact")
    backward(model, X, y)
    model[0].bias.grad[1] = float("nan")
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.warns(curvkit.CurvkitWarning, match="gradients left unchanged: the gradient is not finite"):
        assert not precond.step(batch=(X, y))
    assert all(
        torch.allclose(p.grad, g, equal_nan=True, rtol=0, atol=0) for p, g in zip(model.parameters(), grads)
    )
    assert precond.skipped_steps == 1 and precond.state_dict()["skipped_steps"] == 1
    with pytest.raises(ValueError, match="no parameter has a .grad"):
        model.zero_grad(set_to_none=True)
        precond.step(batch=(X, y))


def test_update_freq_reuses_the_operator_and_the_state_dict_round_trip_resumes_exactly():
    model = mlp()
    X, y = batch("cross_entropy", n=12)
    batches = [(X[i : i + 4], y[i : i + 4]) for i in (0, 4, 8)] * 2

    def make(m):
        return CurvaturePreconditioner(m, "kfac", loss_fn="cross_entropy", damping=0.1, update_freq=2)

    precond = make(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_steps(model, precond, sgd, batches[:2])
    assert precond.steps == 2 and precond.updates == 1  # the second step reused the first's KFAC
    saved = copy.deepcopy((model.state_dict(), sgd.state_dict(), precond.state_dict()))
    train_steps(model, precond, sgd, batches[2:])
    assert precond.updates == 3
    resumed = mlp(seed=3)
    resumed.load_state_dict(saved[0])
    sgd2 = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    sgd2.load_state_dict(saved[1])
    precond2 = CurvaturePreconditioner(resumed, "ggn", loss_fn="cross_entropy")  # options come from the state
    precond2.load_state_dict(saved[2])
    assert (precond2.estimator, precond2.damping, precond2.update_freq) == ("kfac", 0.1, 2)
    train_steps(resumed, precond2, sgd2, batches[2:])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    assert precond2.state_dict() == precond.state_dict()
    with pytest.raises(ValueError, match="not a CurvaturePreconditioner state_dict"):
        precond2.load_state_dict({"steps": 1})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"damping": -1.0}, r"damping must be a finite number >= 0, got -1.0"),
        ({"update_freq": 0}, r"update_freq must be an integer >= 1, got 0"),
        ({"solver": "magic"}, r"solver must be 'auto' or one of \["),
        ({"estimator": "no-such-estimator"}, r"unknown estimator 'no-such-estimator'"),
        ({"loss_fn": None}, r"needs loss_fn="),
        ({"solver_options": 3}, r"solver_options must be a dict"),
        ({"solver": "cg", "solver_options": {"bogus": 1}}, r"^solver 'cg' takes no option 'bogus'"),
        ({"solver_options": {"bogus": 1}}, r"^solver 'cg' takes no option 'bogus'"),  # auto: cg's
        ({"solver": "lissa", "solver_options": {"depth": 3}}, r"^solver 'lissa' takes no option 'depth'"),
        ({"solver_options": {"damping": 1.0}}, r"solver_options may not set damping: pass damping="),
    ],
)
def test_invalid_preconditioner_options_raise_value_errors(options, message):
    model = mlp()
    kwargs = {"loss_fn": "cross_entropy", **options}
    with pytest.raises(ValueError, match=message):
        CurvaturePreconditioner(model, **kwargs)
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        CurvaturePreconditioner("net", loss_fn="mse")


def test_solve_s_own_settings_are_solver_options_of_the_preconditioner():
    precond = CurvaturePreconditioner(
        mlp(), "ggn", loss_fn="cross_entropy", solver="lissa", solver_options={"tol": 1e-3, "seed": 1}
    )
    assert precond.solver_options == {"tol": 1e-3, "seed": 1}


def test_decay_preconditions_with_the_running_average_of_the_update_batches():
    model = mlp()
    X, y = batch("cross_entropy", n=12)
    batches = [(X[i : i + 4], y[i : i + 4]) for i in (0, 4, 8)]
    precond = CurvaturePreconditioner(model, "kfac", loss_fn="cross_entropy", damping=0.1, decay=0.6)
    reference = curvkit.RunningCurvature("kfac", decay=0.6)
    template = curvkit.Problem(model, "cross_entropy", batches[0])
    for b in batches:  # without an optimizer step the parameters stay: the averages are comparable
        backward(model, *b)
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        average = reference.update(template.on_batch(*b)).to_dense()
        assert precond.step(batch=b)
        expected = torch.linalg.solve(average + 0.1 * torch.eye(len(g), dtype=DT), g)
        torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in model.parameters()]), expected)
    assert precond.running.updates == 3
    with pytest.raises(curvkit.CurvkitError, match="has no structure to average"):
        hessian = CurvaturePreconditioner(model, "hessian", loss_fn="cross_entropy", decay=0.9)
        hessian.step(batch=batches[0])
    with pytest.raises(ValueError, match=r"decay must be a number in \[0, 1\)"):
        CurvaturePreconditioner(model, "kfac", loss_fn="cross_entropy", decay=1.0)


def test_decay_a_non_finite_batch_is_skipped_and_the_state_resumes_exactly_between_updates():
    model = mlp()
    X, y = batch("cross_entropy", n=16)
    batches = [(X[i : i + 4], y[i : i + 4]) for i in (0, 4, 8, 12)] * 2

    def make(m):
        return CurvaturePreconditioner(
            m, "kfac", loss_fn="cross_entropy", damping=0.1, update_freq=2, decay=0.5
        )

    precond = make(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    train_steps(model, precond, sgd, batches[:3])  # stops between two updates (steps 0 and 2 update)
    saved = copy.deepcopy((model.state_dict(), sgd.state_dict(), precond.state_dict()))
    train_steps(model, precond, sgd, batches[3:])
    resumed = mlp(seed=3)
    resumed.load_state_dict(saved[0])
    sgd2 = torch.optim.SGD(resumed.parameters(), lr=0.1)
    sgd2.load_state_dict(saved[1])
    precond2 = CurvaturePreconditioner(resumed, "kfac", loss_fn="cross_entropy")
    precond2.load_state_dict(saved[2])
    assert precond2.running is not None and precond2.running.updates == 2
    train_steps(resumed, precond2, sgd2, batches[3:])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    bad = (batches[0][0].clone(), batches[0][1])
    bad[0][0, 0] = float("nan")
    backward(model, *batches[0])
    grads = [p.grad.clone() for p in model.parameters()]
    before = precond.running.operator().to_dense()
    precond.steps = 0  # an update step
    with pytest.warns(
        curvkit.CurvkitWarning,
        match=r"gradients left unchanged: .*not finite.*\(the running average unchanged\)",
    ) as record:
        assert not precond.step(batch=bad)
    assert record[0].filename == __file__
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert torch.equal(precond.running.operator().to_dense(), before)


def test_without_decay_a_non_finite_update_batch_keeps_the_previous_curvature():
    model = mlp()
    X, y = batch("cross_entropy", n=16)
    bad = X[:8].clone()
    bad[0, 0] = float("nan")
    precond = CurvaturePreconditioner(model, "ggn", loss_fn="cross_entropy", update_freq=3)
    backward(model, X[:8], y[:8])
    assert precond.step(batch=(X[:8], y[:8]))  # step 0: an update
    operator = precond.operator
    for step, inputs in enumerate([X[8:], X[8:], bad, X[8:], X[8:]], start=1):  # step 3: an update
        backward(model, inputs, y[8:])
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always", curvkit.CurvkitWarning)
            rewritten = precond.step(batch=(inputs, y[8:]))
        messages = [str(w.message) for w in record if issubclass(w.category, curvkit.CurvkitWarning)]
        if step == 3:
            assert not rewritten and messages == [
                "CurvaturePreconditioner: gradients left unchanged: the 'ggn' curvature of this batch is not "
                "finite (the previous curvature kept)"
            ]
        else:  # the batch before the refused one preconditions the steps after it
            assert rewritten and messages == []
        assert precond.operator is operator
    assert precond.updates == 1 and precond.skipped_steps == 1 and precond.steps == 6
