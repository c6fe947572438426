"""The Newton and HessianFree optimizers against dense float64 truth, their state and bad input.

The truth is independent of curvkit's estimators: the loss written with
``torch.nn.functional`` on a flat parameter vector, differentiated by
``torch.autograd.functional`` (gradient and dense Hessian), and solved densely.
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import curvkit
from curvkit.optim.hessian_free import HessianFree, backtracking_schedule
from curvkit.optim.newton import Newton

DT = torch.float64
LOSSES = {
    "mse": nn.functional.mse_loss,
    "cross_entropy": nn.functional.cross_entropy,
    "bce_with_logits": nn.functional.binary_cross_entropy_with_logits,
}


# ---------------------------------------------------------------------- fixtures and truth
def least_squares(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X, Y = torch.randn(32, 4, generator=g, dtype=DT), torch.randn(32, 2, generator=g, dtype=DT)
    torch.manual_seed(seed)
    return nn.Linear(4, 2).to(DT), X, Y


def lstsq_minimiser(X: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, bias)`` minimising ``||X W^T + b - Y||``."""
    solution = torch.linalg.lstsq(torch.cat([X, torch.ones(len(X), 1, dtype=DT)], 1), Y).solution
    return solution[:-1].T, solution[-1]


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def teacher_data(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs, labels of a random linear teacher with noise: learnable, not separable."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 6, generator=g, dtype=DT)
    W = torch.randn(6, 3, generator=g, dtype=DT)
    return X, (X @ W + 0.5 * torch.randn(n, 3, generator=g, dtype=DT)).argmax(1)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def dense_truth(model: nn.Module, loss: str, X: torch.Tensor, y: torch.Tensor):
    """``(f, g, H, f_of)`` of the batch loss at the model's parameters, by plain autograd."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def f_of(theta: torch.Tensor) -> torch.Tensor:
        parts = torch.split(theta, [math.prod(s) for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return LOSSES[loss](functional_call(model, params, (X,)), y)

    theta = flat(model)
    g = torch.autograd.functional.jacobian(f_of, theta)
    H = torch.autograd.functional.hessian(f_of, theta)
    return f_of(theta).detach(), g, (H + H.T) / 2, f_of


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    error = (actual - expected).norm() / max(expected.norm(), 1e-300)
    assert error <= tol, f"relative error {error:.3g} > {tol:g}"


# ---------------------------------------------------------------------- Newton
def test_newton_solves_linear_least_squares_in_one_step():
    model, X, Y = least_squares()
    optimizer = Newton(model.parameters(), model=model, loss_fn="mse")
    f0, _, _, _ = dense_truth(model, "mse", X, Y)
    returned = optimizer.step(batch=(X, Y))
    W, b = lstsq_minimiser(X, Y)
    assert_close(model.weight.detach(), W, 1e-10)
    assert_close(model.bias.detach(), b, 1e-10)
    assert float(returned) == pytest.approx(float(f0), rel=1e-12)  # the batch's loss before the step
    assert optimizer.last_info["skipped"] is False and optimizer.skipped_steps == 0


def test_newton_damped_is_the_dense_levenberg_marquardt_step():
    model, (X, y) = mlp(), teacher_data(32)
    _, g, H, _ = dense_truth(model, "cross_entropy", X, y)
    damping = float(-torch.linalg.eigvalsh(H)[0]) + 0.5  # H + damping I positive definite
    theta = flat(model)
    optimizer = Newton(
        model.parameters(), model=model, loss_fn="cross_entropy", mode="damped", damping=damping, lr=0.7
    )
    optimizer.step(batch=(X, y))
    expected = theta - 0.7 * torch.linalg.solve(H + damping * torch.eye(len(g), dtype=DT), g)
    assert_close(flat(model), expected, 1e-10)


def test_saddle_free_is_the_absolute_hessian_step_computed_densely():
    model, (X, y) = mlp(1), teacher_data(32, seed=1)
    _, g, H, _ = dense_truth(model, "cross_entropy", X, y)
    lam, Q = torch.linalg.eigh(H)
    assert lam[0] < 0  # the MLP's Hessian is indefinite here: exact Newton would not descend
    theta = flat(model)
    optimizer = Newton(
        model.parameters(), model=model, loss_fn="cross_entropy", mode="saddle-free", damping=1e-3
    )
    optimizer.step(batch=(X, y))
    expected = theta - Q @ ((Q.T @ g) / lam.abs().clamp_min(1e-3))
    assert_close(flat(model), expected, 1e-10)
    assert optimizer.last_info["eigenvalues"] == pytest.approx((float(lam[0]), float(lam[-1])), rel=1e-10)


def saddle() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``f(w1, w2) = (w2 w1 - 1)^2``: a saddle at 0 (Hessian eigenvalues +-2), near which we start."""
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)).to(DT)
    with torch.no_grad():
        model[0].weight.fill_(0.01)
        model[1].weight.fill_(0.02)
    return model, torch.ones(1, 1, dtype=DT), torch.ones(1, 1, dtype=DT)


def test_saddle_free_moves_away_from_a_saddle_where_exact_newton_refuses():
    model, X, Y = saddle()
    before = flat(model)
    f0, g, H, f_of = dense_truth(model, "mse", X, Y)
    exact = Newton(model.parameters(), model=model, loss_fn="mse")
    with pytest.warns(
        curvkit.CurvkitWarning, match=r"H is not positive definite \(its eigenvalues span"
    ) as caught:
        exact.step(batch=(X, Y))
    assert caught[0].filename == __file__  # the warning points at the caller's line
    assert torch.equal(flat(model), before) and exact.skipped_steps == 1
    assert float((before + torch.linalg.solve(H, -g)).norm()) < float(
        before.norm()
    )  # it would go to the saddle

    free = Newton(model.parameters(), model=model, loss_fn="mse", mode="saddle-free")
    free.step(batch=(X, Y))
    lam, Q = torch.linalg.eigh(H)
    assert_close(flat(model), before - Q @ ((Q.T @ g) / lam.abs()), 1e-10)
    assert float(flat(model).norm()) > 1.5 * float(before.norm())  # away from the saddle
    assert float(f_of(flat(model))) < float(f0)


def test_the_trust_region_step_solves_the_subproblem():
    model, (X, y) = mlp(1), teacher_data(32, seed=1)
    _, g, H, _ = dense_truth(model, "cross_entropy", X, y)
    lam, Q = torch.linalg.eigh(H)
    M = Q @ torch.diag(lam.abs().clamp_min(1e-2)) @ Q.T  # |H| of the saddle-free mode
    free = torch.linalg.solve(M, -g)
    radius = 0.25 * float(free.norm())
    theta = flat(model)
    optimizer = Newton(
        model.parameters(), model=model, loss_fn="cross_entropy", mode="saddle-free", damping=1e-2,
        trust_radius=radius,
    )  # fmt: skip
    optimizer.step(batch=(X, y))
    d = flat(model) - theta
    sigma = optimizer.last_info["multiplier"]
    assert sigma > 0 and float(d.norm()) == pytest.approx(radius, rel=1e-10)  # on the boundary
    assert_close((M + sigma * torch.eye(len(g), dtype=DT)) @ d, -g, 1e-10)  # KKT: (M + sigma I) d = -g
    # a radius the Newton step fits in changes nothing
    model2 = mlp(1)
    Newton(
        model2.parameters(), model=model2, loss_fn="cross_entropy", mode="saddle-free", damping=1e-2,
        trust_radius=2 * float(free.norm()),
    ).step(batch=(X, y))  # fmt: skip
    assert_close(flat(model2) - theta, free, 1e-10)


def test_per_group_learning_rates_scale_their_part_of_the_step():
    model, X, Y = least_squares()
    reference = copy.deepcopy(model)
    Newton(reference.parameters(), model=reference, loss_fn="mse").step(batch=(X, Y))
    groups = [{"params": [model.weight]}, {"params": [model.bias], "lr": 0.25}]
    Newton(groups, model=model, loss_fn="mse").step(batch=(X, Y))
    torch.testing.assert_close(model.weight, reference.weight, rtol=0, atol=1e-13)
    start = least_squares()[0].bias.detach()
    assert_close(model.bias.detach() - start, 0.25 * (reference.bias.detach() - start), 1e-12)


def test_newton_refuses_a_model_above_max_dim_at_construction():
    model = mlp()  # P = 6*8 + 8 + 8*3 + 3 = 83
    with pytest.raises(
        ValueError, match=r"^Newton needs the dense P x P Hessian: P=83 parameters exceeds max_dim=50 "
    ):
        Newton(model.parameters(), model=model, loss_fn="cross_entropy", max_dim=50)


def test_newtons_max_dim_counts_the_trained_parameters_at_construction_and_at_each_step():
    """Frozen parameters (``requires_grad=False``) are not stepped, so they do not count: a fine-tuned
    head of 27 parameters was refused as ``P=83``. One unfrozen later counts at the next step."""
    model = mlp()  # P = 56 + 27
    model[0].requires_grad_(False)
    X, y = teacher_data(32)
    optimizer = Newton(
        model.parameters(), model=model, loss_fn="cross_entropy", mode="damped", damping=1.0, max_dim=50
    )
    optimizer.step(batch=(X, y))
    assert optimizer.steps == 1 and optimizer.skipped_steps == 0
    model[0].requires_grad_(True)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(
        ValueError, match=r"^Newton needs the dense P x P Hessian: P=83 parameters exceeds max_dim=50 "
    ):
        optimizer.step(batch=(X, y))
    assert optimizer.steps == 1 and all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


# ---------------------------------------------------------------------- HessianFree
def hf_exact(model: nn.Module, **options) -> HessianFree:
    """HF with a converged CG and a fixed damping: a damped Newton step."""
    settings = dict(adapt_damping=False, warm_start=False, cg_maxiter=200, cg_tol=1e-13)
    return HessianFree(model.parameters(), model=model, **{**settings, **options})


@pytest.mark.parametrize("preconditioner", [None, "diagonal"])
def test_hessian_free_equals_newton_on_linear_least_squares(preconditioner):
    # GGN = Hessian for a linear model and the squared error; damping 0
    model, X, Y = least_squares()
    twin = copy.deepcopy(model)
    Newton(twin.parameters(), model=twin, loss_fn="mse").step(batch=(X, Y))
    optimizer = hf_exact(model, loss_fn="mse", damping=0.0, preconditioner=preconditioner)
    optimizer.step(batch=(X, Y))
    assert_close(flat(model), flat(twin), 1e-8)
    W, b = lstsq_minimiser(X, Y)
    assert_close(model.weight.detach(), W, 1e-8)
    assert optimizer.last_solve.iterations <= 10  # P = 10: CG's finite termination


def test_hessian_free_with_fixed_damping_is_the_damped_gauss_newton_step():
    model, (X, y) = mlp(), teacher_data(32)
    theta = flat(model)
    _, g, _, f_of = dense_truth(model, "cross_entropy", X, y)
    # the GGN J^T H_out J densely, from the Jacobian of the outputs
    outputs_of = lambda t: functional_call(  # noqa: E731
        model, dict(zip([n for n, _ in model.named_parameters()], _split(model, t))), (X,)
    )
    J = torch.autograd.functional.jacobian(outputs_of, theta).reshape(-1, len(theta))
    p = torch.softmax(outputs_of(theta).detach(), 1)
    H_out = torch.block_diag(*[(torch.diag(q) - torch.outer(q, q)) / len(X) for q in p])
    G = J.T @ H_out @ J
    optimizer = hf_exact(model, loss_fn="cross_entropy", damping=0.3, backtracking=False)
    optimizer.step(batch=(X, y))
    expected = theta - torch.linalg.solve(G + 0.3 * torch.eye(len(g), dtype=DT), g)
    assert_close(flat(model), expected, 1e-8)
    assert optimizer.last_info["loss_after"] == pytest.approx(float(f_of(flat(model))), rel=1e-12)


def _split(model: nn.Module, theta: torch.Tensor) -> list[torch.Tensor]:
    shapes = [p.shape for p in model.parameters()]
    return [t.reshape(s) for t, s in zip(torch.split(theta, [math.prod(s) for s in shapes]), shapes)]


def test_damping_shrinks_when_the_quadratic_model_is_exact():
    # a quadratic: rho = 1 > 3/4, so lambda <- 2/3 lambda
    model, X, Y = least_squares()
    optimizer = HessianFree(model.parameters(), model=model, loss_fn="mse", damping=0.5)
    optimizer.step(batch=(X, Y))
    assert optimizer.last_info["rho"] == pytest.approx(1.0, abs=1e-10)
    assert optimizer.damping == 0.5 * (2.0 / 3.0)
    assert optimizer.state_dict()["curvkit"]["damping"] == optimizer.damping


def test_damping_grows_when_the_quadratic_model_overpromises():
    # a misclassified point of logistic regression, z = w x = -5: the loss is nearly linear
    # there and its curvature tiny, so the Gauss-Newton step is huge and promises a decrease
    # of ~74 where the loss can fall by at most 5: rho < 1/4, so lambda <- 3/2 lambda
    model = nn.Linear(1, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.fill_(-5.0)
    X, y = torch.ones(1, 1, dtype=DT), torch.ones(1, 1, dtype=DT)
    optimizer = HessianFree(
        model.parameters(), model=model, loss_fn="bce_with_logits", damping=1e-6, backtracking=False
    )
    optimizer.step(batch=(X, y))
    s = torch.sigmoid(torch.tensor(5.0, dtype=DT))
    g, G = -float(s), float(s * (1 - s))  # f(w) = log(1 + exp(-w)) at w = -5
    d = -g / (G + 1e-6)
    f = lambda w: math.log1p(math.exp(-w))  # noqa: E731
    rho = (f(-5.0 + d) - f(-5.0)) / (g * d + 0.5 * G * d * d)
    assert optimizer.last_info["rho"] == pytest.approx(rho, rel=1e-8) and rho < 0.25
    assert optimizer.damping == 1e-6 * 1.5
    assert model.weight.item() == pytest.approx(-5.0 + d, rel=1e-8)


def test_backtracking_takes_a_kept_iterate_no_worse_than_the_last_and_warm_starts_from_the_last():
    model, (X, y) = mlp(1), teacher_data(64, seed=1)
    backtracked = []
    optimizer = HessianFree(
        model.parameters(),
        model=model,
        loss_fn="cross_entropy",
        damping=1e-3,
        cg_maxiter=30,
        line_search=False,
    )
    for _ in range(2):
        theta = flat(model)
        _, g, _, f_of = dense_truth(model, "cross_entropy", X, y)
        warm = [optimizer.state[p].get("warm_start") for p in model.parameters()]
        G = curvkit.curvature("ggn", curvkit.Problem(model, "cross_entropy", (X, y))).to_dense()
        optimizer.step(batch=(X, y))
        info, solved = optimizer.last_info, optimizer.last_solve
        final = solved.x
        backtracked.append(info["cg_iteration"] < info["cg_iterations"])
        assert info["cg_iteration"] in [*backtracking_schedule(30), info["cg_iterations"]]
        assert info["loss_after"] == pytest.approx(float(f_of(flat(model))), rel=1e-12)
        assert info["loss_after"] <= float(f_of(theta + final)) + 1e-15
        assert torch.equal(
            torch.cat([optimizer.state[p]["warm_start"].reshape(-1) for p in model.parameters()]), final
        )
        if warm[0] is not None:  # CG started from 0.95 times the previous final solution
            x0 = 0.95 * torch.cat([w.reshape(-1) for w in warm])
            residual = (-g - (G + info["damping"] * torch.eye(len(g), dtype=DT)) @ x0).norm() / g.norm()
            assert solved.history[0]["residual"] == pytest.approx(float(residual), rel=1e-8)
    assert backtracked == [True, True]  # (iterations 3 of 24, then 18 of 30)


def test_the_line_search_scales_the_step_down_to_sufficient_decrease():
    # lr = 3 overshoots on a quadratic: f(theta + a d) < f(theta) + 0.01 a g.d needs a <= 0.66
    model, X, Y = least_squares()
    theta = flat(model)
    f0, g, H, f_of = dense_truth(model, "mse", X, Y)
    optimizer = hf_exact(model, loss_fn="mse", damping=0.0, lr=3.0, line_search=True, backtracking=False)
    optimizer.step(batch=(X, Y))
    alpha = optimizer.last_info["alpha"]
    assert alpha == pytest.approx(0.8**2)  # 1 and 0.8 fail, 0.64 passes
    assert_close(flat(model) - theta, -3.0 * alpha * torch.linalg.solve(H, g), 1e-8)


# ---------------------------------------------------------------------- both
def logistic_regression() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    X, y = teacher_data(128, seed=3)
    torch.manual_seed(3)
    return nn.Linear(6, 3).to(DT), X, y


@pytest.mark.parametrize(
    "make",
    [
        lambda m: Newton(m.parameters(), model=m, loss_fn="cross_entropy", mode="damped", damping=1e-3),
        lambda m: HessianFree(m.parameters(), model=m, loss_fn="cross_entropy"),
    ],
    ids=["newton", "hessian-free"],
)
def test_the_loss_decreases_at_every_step_on_logistic_regression(make):
    model, X, y = logistic_regression()
    optimizer = make(model)
    losses = [float(optimizer.step(batch=(X, y))) for _ in range(6)]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.6 * losses[0]


def test_hessian_free_defaults_train_a_small_mlp_on_mini_batches():
    X, y = teacher_data(256, seed=4)
    model = mlp(4)
    full = lambda: float(nn.functional.cross_entropy(model(X), y).detach())  # noqa: E731
    optimizer = HessianFree(model.parameters(), model=model, loss_fn="cross_entropy")
    start = full()
    for i in range(6):
        optimizer.step(batch=(X[64 * (i % 4) : 64 * (i % 4 + 1)], y[64 * (i % 4) : 64 * (i % 4 + 1)]))
    assert full() < 0.6 * start and optimizer.skipped_steps == 0


def test_saddle_free_newton_trains_a_small_mlp_on_mini_batches():
    X, y = teacher_data(256, seed=4)
    model = mlp(4)
    full = lambda: float(nn.functional.cross_entropy(model(X), y).detach())  # noqa: E731
    optimizer = Newton(
        model.parameters(),
        model=model,
        loss_fn="cross_entropy",
        mode="saddle-free",
        damping=1e-2,
        trust_radius=1.0,
    )
    start = full()
    for i in range(6):
        optimizer.step(batch=(X[64 * (i % 4) : 64 * (i % 4 + 1)], y[64 * (i % 4) : 64 * (i % 4 + 1)]))
    assert full() < 0.6 * start and optimizer.skipped_steps == 0


MAKERS = {
    "newton": lambda m: Newton(
        m.parameters(), model=m, loss_fn="cross_entropy", mode="saddle-free", damping=1e-2, trust_radius=0.5
    ),
    "hessian-free": lambda m: HessianFree(
        m.parameters(),
        model=m,
        loss_fn="cross_entropy",
        cg_maxiter=20,
        preconditioner="diagonal",
        line_search=True,
    ),
}


@pytest.mark.parametrize("name", MAKERS)
def test_state_dict_round_trip_resumes_bit_identically(name):
    X, y = teacher_data(96, seed=5)
    batches = [(X[32 * i : 32 * (i + 1)], y[32 * i : 32 * (i + 1)]) for i in range(3)]
    model = mlp(5)
    optimizer = MAKERS[name](model)
    for i in range(3):
        optimizer.step(batch=batches[i % 3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    for i in range(3, 7):
        optimizer.step(batch=batches[i % 3])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = mlp(6)
    resumed.load_state_dict(saved["model"])
    second = MAKERS[name](resumed)
    second.load_state_dict(saved["optimizer"])
    for i in range(3, 7):
        second.step(batch=batches[i % 3])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert second.state_dict()["curvkit"] == optimizer.state_dict()["curvkit"]
    if name == "hessian-free":
        for p, q in zip(model.parameters(), resumed.parameters()):
            assert torch.equal(optimizer.state[p]["warm_start"], second.state[q]["warm_start"])
    with pytest.raises(ValueError, match="has no 'curvkit' entry"):
        second.load_state_dict(torch.optim.SGD(resumed.parameters(), lr=0.1).state_dict())


@pytest.mark.parametrize("name", MAKERS)
def test_a_non_finite_gradient_skips_the_step_with_a_warning(name):
    X, y = teacher_data(32)
    model = mlp()
    optimizer = MAKERS[name](model)
    before = flat(model)
    damping = optimizer.damping
    X = X.clone()
    X[3, 2] = float("nan")
    with pytest.warns(
        curvkit.CurvkitWarning,
        match=f"{type(optimizer).__name__}: step skipped: the batch's loss or gradient is not finite",
    ) as caught:
        optimizer.step(batch=(X, y))
    assert caught[0].filename == __file__
    assert torch.equal(flat(model), before) and bool(torch.isfinite(flat(model)).all())
    assert optimizer.skipped_steps == 1 and optimizer.damping == damping
    assert optimizer.state_dict()["curvkit"]["skipped_steps"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step(batch=teacher_data(32))  # a finite batch steps again
    assert not torch.equal(flat(model), before)


def test_hessian_free_skips_a_step_whose_loss_would_not_be_finite_and_raises_the_damping():
    model, X, Y = least_squares()
    before = flat(model)
    optimizer = HessianFree(model.parameters(), model=model, loss_fn="mse", lr=1e300, damping=1.0)
    with pytest.warns(curvkit.CurvkitWarning, match="the batch's loss after the step would not be finite"):
        optimizer.step(batch=(X, Y))
    assert torch.equal(flat(model), before) and optimizer.damping == 1.5 and optimizer.skipped_steps == 1


@pytest.mark.parametrize(
    "lr, why",
    [
        (1e300, "the batch's loss after the step would not be finite"),
        (1e6, "the line search found no sufficient decrease"),
    ],
)
def test_a_skipped_hessian_free_step_keeps_the_warm_start_of_the_last_step_taken(lr, why):
    model, X, Y = least_squares()
    optimizer = HessianFree(model.parameters(), model=model, loss_fn="mse", cg_maxiter=3)
    optimizer.step(batch=(X, Y))
    taken = optimizer.last_solve
    kept = [optimizer.state[p]["warm_start"].clone() for p in model.parameters()]
    for group in optimizer.param_groups:
        group["lr"] = lr
    with pytest.warns(curvkit.CurvkitWarning, match=why):
        optimizer.step(batch=(X, 2 * Y))  # another batch: another CG solution
    assert optimizer.last_info["skipped"] and optimizer.skipped_steps == 1
    assert optimizer.last_solve is not taken and not torch.equal(optimizer.last_solve.x, taken.x)
    assert all(torch.equal(optimizer.state[p]["warm_start"], w) for p, w in zip(model.parameters(), kept))


def test_step_needs_the_batch_and_a_closure_only_gives_the_loss():
    model, X, Y = least_squares()
    for optimizer in (
        Newton(model.parameters(), model=model, loss_fn="mse"),
        HessianFree(model.parameters(), model=model, loss_fn="mse"),
    ):
        name = type(optimizer).__name__
        with pytest.raises(
            ValueError,
            match=rf"{name}.step needs batch=\(inputs, targets\): the mini-batch whose curvature it uses",
        ):
            optimizer.step()
        with pytest.raises(ValueError, match=r"must be an \(inputs, targets\) pair"):
            optimizer.step(batch=X)
        closure = lambda: torch.tensor(42.0)  # noqa: E731
        assert float(optimizer.step(closure, batch=(X, Y))) == 42.0
        assert all(p.grad is None for p in model.parameters())  # p.grad neither read nor written


def _newton(**kw):
    model = mlp()
    return Newton(model.parameters(), model=model, loss_fn="cross_entropy", **kw)


def _hf(**kw):
    model = mlp()
    return HessianFree(model.parameters(), model=model, loss_fn="cross_entropy", **kw)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: _newton(lr=-0.5), "lr must be a finite number >= 0"),
        (lambda: _newton(lr=float("nan")), "lr must be a finite number >= 0"),
        (lambda: _newton(damping=-1.0, mode="damped"), "damping must be a finite number >= 0"),
        (lambda: _newton(damping=0.1), "damping must be 0 with mode='exact'"),
        (lambda: _newton(mode="newton"), "mode must be one of"),
        (lambda: _newton(max_dim=0), "max_dim must be an integer >= 1"),
        (lambda: _newton(trust_radius=0.0), "trust_radius must be a finite number > 0"),
        (lambda: _newton(curvature="fisher"), "curvature must be one of"),
        (lambda: _newton(curvature_options={"nope": 1}), "estimator 'hessian' takes no option 'nope'"),
        (lambda: _hf(damping=0.0), "damping must be a finite number > 0"),
        (lambda: _hf(damping=-1.0, adapt_damping=False), "damping must be a finite number >= 0"),
        (lambda: _hf(cg_maxiter=0), "cg_maxiter must be an integer >= 1"),
        (lambda: _hf(cg_maxiter=2.5), "cg_maxiter must be an integer >= 1"),
        (lambda: _hf(cg_tol=0.0), "cg_tol must be a finite number > 0"),
        (lambda: _hf(warm_start_decay=1.5), r"warm_start_decay must be a number in \[0, 1\]"),
        (lambda: _hf(preconditioner="kfac"), "preconditioner must be one of"),
        (
            lambda: _hf(preconditioner="diagonal", curvature="hessian"),
            "preconditioner='diagonal' needs curvature='ggn'",
        ),
        (lambda: _hf(preconditioner_exponent=2.0), "preconditioner_exponent must be a number in"),
        (lambda: _hf(adapt_damping="yes"), "adapt_damping must be True or False"),
        (lambda: _hf(backtracking=1), "backtracking must be True or False"),
        (lambda: _hf(lr=-1.0), "lr must be a finite number >= 0"),
        (lambda: _hf(curvature="kfac"), "curvature must be one of"),
    ],
)
def test_invalid_hyper_parameters_raise_value_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("cls", [Newton, HessianFree])
def test_construction_needs_the_model_and_loss_and_refuses_global_settings_per_group(cls):
    model = mlp()
    with pytest.raises(ValueError, match="needs model= and loss_fn="):
        cls(model.parameters(), model=model, loss_fn=None)
    with pytest.raises(ValueError, match=r"1 optimized tensor\(s\) \(shapes \[\(3,\)\]\) are not parameters"):
        cls([nn.Parameter(torch.zeros(3, dtype=DT))], model=model, loss_fn="mse")
    with pytest.raises(
        ValueError, match="takes only lr per parameter group: damping applies to the whole optimizer"
    ):
        cls([{"params": model.parameters(), "damping": 1.0}], model=model, loss_fn="mse")
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        cls([{"params": model.parameters(), "lr": -1.0}], model=model, loss_fn="mse")


def test_hessian_free_on_an_indefinite_hessian_stops_cg_and_raises_the_damping():
    # at the saddle's edge g^T H g < 0: CG stops at its first direction, no step, lambda <- 3/2 lambda
    model, X, Y = saddle()
    before = flat(model)
    optimizer = HessianFree(model.parameters(), model=model, loss_fn="mse", curvature="hessian", damping=1e-3)
    optimizer.step(batch=(X, Y))
    assert optimizer.last_info["cg_reason"].startswith("non-positive curvature p^T A p")
    assert optimizer.damping == 1.5e-3 and torch.equal(flat(model), before)
