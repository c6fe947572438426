"""The ``KFAC`` and ``EKFAC`` optimizers: exact natural-gradient steps where KFAC is exact, and their state.

Truth is independent of the optimizer: the dense GGN (or exact Fisher) of
``curvkit.curvature("ggn" / "fisher", problem).to_dense()``, zeroed between layers,
and a dense damped solve, in float64. KFAC's blocks equal the GGN's for one datum
and for a deep linear network under the squared error (``tests/test_kfac.py``).
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvkit
from curvkit.optim.kfac import DAMPING_RANGE, EKFAC, KFAC

DT = torch.float64
TIGHT = 1e-10
EXACT = {"factor_decay": 0.0, "inv_update_freq": 1, "kl_clip": None, "momentum": 0.0, "adapt_damping": False}
"""Hyper-parameters under which a step is the damped natural-gradient step of the batch's KFAC."""


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / max(b.norm().item(), 1e-300)).item()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def mlp(n_in: int = 3, hidden: int = 4, n_out: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out)).to(DT)


def deep_linear() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)).to(DT)


def data(model: nn.Module, N: int, loss: str, n_in: int = 3, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(N, n_in, dtype=DT, generator=generator)
    out = model(X)
    if loss == "mse":
        return X, torch.randn(out.shape, dtype=DT, generator=generator)
    return X, torch.randint(0, out.shape[-1], (N,), generator=generator)


def layerwise(dense: torch.Tensor, layout) -> torch.Tensor:
    """``dense`` with every entry between two modules' parameters zeroed (what KFAC approximates)."""
    owners = [name.rsplit(".", 1)[0] for name in layout.names]
    index = {owner: i for i, owner in enumerate(dict.fromkeys(owners))}
    labels = torch.cat([torch.full((n,), index[o]) for o, n in zip(owners, layout.numels)])
    return dense * (labels[:, None] == labels[None, :])


def natural_step(model, loss, X, y, lr, damping, reference="ggn") -> torch.Tensor:
    """``-lr (G_blocks + damping I)^-1 g`` from the dense reference curvature, flat."""
    problem = curvkit.Problem(model, loss, (X, y))
    options = {"mode": "exact"} if reference == "fisher" else {}
    G = layerwise(curvkit.curvature(reference, problem, **options).to_dense(), problem.layout)
    _, g = problem.loss_and_gradient()
    return -lr * torch.linalg.solve(G + damping * torch.eye(problem.dim, dtype=DT), g)


def backward(model, loss, X, y) -> None:
    model.zero_grad()
    out = model(X)
    (F.cross_entropy(out, y) if loss == "cross_entropy" else F.mse_loss(out, y)).backward()


def take_step(optimizer, model, loss, X, y, from_grad: bool) -> torch.Tensor:
    """The step's update of the flat parameters."""
    if from_grad:
        backward(model, loss, X, y)
    else:
        model.zero_grad(set_to_none=True)
    before = flat(model)
    optimizer.step(batch=(X, y))
    return flat(model) - before


# ---------------------------------------------------------------------------- exactness
CASES = {
    "one-datum-mlp-ce-ggn": (mlp, 1, "cross_entropy", "ggn"),
    "one-datum-mlp-ce-fisher": (mlp, 1, "cross_entropy", "fisher"),
    "one-datum-mlp-mse": (mlp, 1, "mse", "ggn"),
    "deep-linear-mse-10": (deep_linear, 10, "mse", "ggn"),
}


@pytest.mark.parametrize("from_grad", [True, False], ids=["grad", "no-grad"])
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
@pytest.mark.parametrize("case", list(CASES))
def test_a_step_is_the_damped_natural_gradient_step_where_kfac_is_exact(case, cls, from_grad):
    make, N, loss, reference = CASES[case]
    torch.manual_seed(0)
    model = make()
    X, y = data(model, N, loss)
    expected = natural_step(model, loss, X, y, lr=0.5, damping=1e-2, reference=reference)
    optimizer = cls(model.parameters(), model=model, loss_fn=loss, lr=0.5, damping=1e-2, **EXACT)
    assert rel(take_step(optimizer, model, loss, X, y, from_grad), expected) < TIGHT


def test_where_kfac_is_not_exact_the_step_is_not_the_natural_gradient_step():
    """The comparison above can fail: with 8 data through a tanh the steps differ."""
    torch.manual_seed(0)
    model = mlp()
    X, y = data(model, 8, "cross_entropy")
    expected = natural_step(model, "cross_entropy", X, y, lr=0.5, damping=1e-2)
    optimizer = KFAC(model.parameters(), model=model, loss_fn="cross_entropy", lr=0.5, damping=1e-2, **EXACT)
    assert rel(take_step(optimizer, model, "cross_entropy", X, y, True), expected) > 1e-3


class Scale(nn.Module):
    """An elementwise scale: a module type with no KFAC layer rule."""

    def __init__(self, n: int):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, n, dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_parameters_in_no_block_get_the_plain_damped_gradient_step():
    torch.manual_seed(0)
    model = nn.Sequential(Scale(3), nn.Linear(3, 2).to(DT))
    X, y = data(model, 1, "cross_entropy")
    lr, damping = 0.5, 1e-2
    problem = curvkit.Problem(model, "cross_entropy", (X, y))
    _, g = problem.loss_and_gradient()
    expected = natural_step(model, "cross_entropy", X, y, lr, damping)
    optimizer = KFAC(
        model.parameters(), model=model, loss_fn="cross_entropy", lr=lr, damping=damping, **EXACT
    )
    delta = take_step(optimizer, model, "cross_entropy", X, y, True)
    torch.testing.assert_close(delta[:3], -lr * g[:3] / damping, rtol=1e-12, atol=0)
    assert rel(delta[3:], expected[3:]) < TIGHT  # the Linear block: one datum, exact
    strict = KFAC(model.parameters(), model=model, loss_fn="cross_entropy", unsupported="error")
    with pytest.raises(curvkit.UnsupportedModelError, match=r"no KFAC block for 0 \(Scale\)"):
        strict.step(batch=(X, y))


def test_parameter_groups_set_lr_and_weight_decay_and_a_subset_is_preconditioned_alone():
    """``theta <- theta - lr_group (v + w theta)``; the last layer alone is preconditioned by its block."""
    torch.manual_seed(0)
    model = mlp()
    X, y = data(model, 1, "cross_entropy")
    v = natural_step(model, "cross_entropy", X, y, lr=-1.0, damping=1e-2)  # (G_blocks + 1e-2 I)^-1 g
    theta = flat(model)
    groups = [
        {"params": model[0].parameters()},
        {"params": model[2].parameters(), "lr": 0.2, "weight_decay": 0.1},
    ]
    optimizer = KFAC(groups, model=model, loss_fn="cross_entropy", lr=0.5, damping=1e-2, **EXACT)
    delta = take_step(optimizer, model, "cross_entropy", X, y, True)
    first = sum(p.numel() for p in model[0].parameters())
    assert rel(delta[:first], -0.5 * v[:first]) < TIGHT
    assert rel(delta[first:], -0.2 * (v[first:] + 0.1 * theta[first:])) < TIGHT
    head = mlp()
    head.load_state_dict(model.state_dict())
    before = flat(head)
    last = KFAC(head[2].parameters(), model=head, loss_fn="cross_entropy", lr=0.5, damping=1e-2, **EXACT)
    expected = natural_step(head, "cross_entropy", X, y, lr=0.5, damping=1e-2)[first:]
    delta = take_step(last, head, "cross_entropy", X, y, True)
    assert torch.equal(delta[:first], torch.zeros(first, dtype=DT)) and rel(delta[first:], expected) < TIGHT
    assert [b.name for b in last.kronecker().blocks] == ["2"] and torch.equal(
        flat(head)[:first], before[:first]
    )


# ---------------------------------------------------------------------------- running averages
def batches(model, count: int, N: int = 6, loss: str = "cross_entropy"):
    return [data(model, N, loss, seed=10 + i) for i in range(count)]


def test_the_factors_are_running_averages():
    torch.manual_seed(0)
    model = mlp()
    (X1, y1), (X2, y2) = batches(model, 2)
    optimizer = KFAC(
        model.parameters(), model=model, loss_fn="cross_entropy", factor_decay=0.7, adapt_damping=False
    )
    first = curvkit.curvature("kfac", curvkit.Problem(model, "cross_entropy", (X1, y1))).kronecker()
    take_step(optimizer, model, "cross_entropy", X1, y1, True)
    second = curvkit.curvature("kfac", curvkit.Problem(model, "cross_entropy", (X2, y2))).kronecker()
    take_step(optimizer, model, "cross_entropy", X2, y2, True)
    averaged = optimizer.averaged_factors()
    assert len(averaged.blocks) == 2
    for block, b1, b2 in zip(averaged.blocks, first.blocks, second.blocks):
        assert (block.weight, block.bias, block.name) == (b1.weight, b1.bias, b1.name)
        torch.testing.assert_close(block.A, 0.7 * b1.A + 0.3 * b2.A, rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(block.B, 0.7 * b1.B + 0.3 * b2.B, rtol=1e-14, atol=1e-15)
        assert rel(b2.A, b1.A) > 1e-3  # the two batches' factors differ


def test_ekfac_averages_the_scalings_in_the_frozen_eigenbasis():
    """Between refreshes ``K = Q diag(s) Q^T`` with ``s = 0.6 q^T E_1 q + 0.4 q^T E_2 q`` for the frozen
    eigenvectors ``q`` (those of the first batch's EKFAC ``E_1``)."""
    torch.manual_seed(0)
    model = mlp()
    (X1, y1), (X2, y2) = batches(model, 2)
    optimizer = EKFAC(
        model.parameters(),
        model=model,
        loss_fn="cross_entropy",
        factor_decay=0.6,
        inv_update_freq=100,
        adapt_damping=False,
    )
    E1 = curvkit.curvature("ekfac", curvkit.Problem(model, "cross_entropy", (X1, y1)))
    V = curvkit.eigenvalues(E1, k=E1.shape[0]).vectors
    E1 = E1.to_dense()  # at the first parameters (the operator follows the model)
    take_step(optimizer, model, "cross_entropy", X1, y1, True)
    E2 = curvkit.curvature("ekfac", curvkit.Problem(model, "cross_entropy", (X2, y2))).to_dense()
    take_step(optimizer, model, "cross_entropy", X2, y2, True)
    rotated = V.T @ optimizer.kronecker().to_dense() @ V
    expected = 0.6 * torch.diagonal(V.T @ E1 @ V) + 0.4 * torch.diagonal(V.T @ E2 @ V)
    assert rel(torch.diagonal(rotated), expected) < TIGHT
    assert (rotated - torch.diag(torch.diagonal(rotated))).abs().max() < 1e-12 * rotated.abs().max()
    assert rel(torch.diagonal(V.T @ E2 @ V), torch.diagonal(V.T @ E1 @ V)) > 1e-3


def test_the_inverse_is_refreshed_every_inv_update_freq_steps():
    torch.manual_seed(0)
    model = mlp()
    optimizer = KFAC(
        model.parameters(),
        model=model,
        loss_fn="cross_entropy",
        lr=0.2,
        inv_update_freq=3,
        factor_decay=0.5,
        kl_clip=None,
        momentum=0.0,
        adapt_damping=False,
    )
    preconditioners, averages = [], []
    for k, (X, y) in enumerate(batches(model, 5)):
        problem = curvkit.Problem(model, "cross_entropy", (X, y))
        _, g = problem.loss_and_gradient()
        delta = take_step(optimizer, model, "cross_entropy", X, y, True)
        P = optimizer.preconditioner().to_dense()
        if k:  # the step used the preconditioner after the previous step, unless it refreshed it
            used = P if k == 3 else preconditioners[-1]
            assert rel(delta, -0.2 * used @ g) < TIGHT
        preconditioners.append(P)
        averages.append(optimizer.averaged_factors().to_dense())
    assert torch.equal(preconditioners[0], preconditioners[1]) and torch.equal(
        preconditioners[1], preconditioners[2]
    )
    assert rel(preconditioners[3], preconditioners[2]) > 1e-3 and torch.equal(
        preconditioners[3], preconditioners[4]
    )
    assert all(rel(a, b) > 1e-3 for a, b in zip(averages, averages[1:]))  # the averages move every step


# ---------------------------------------------------------------------------- KL clipping, damping
def test_kl_clipping_bounds_the_step():
    """``nu = min(1, sqrt(kappa / (lr^2 g^T v)))``: with ``kappa`` a quarter of the free step's
    ``lr^2 g^T v`` the step halves and its length in the preconditioner's metric is ``kappa``."""
    torch.manual_seed(0)
    model = mlp()
    X, y = data(model, 16, "cross_entropy")
    lr = 0.5
    free_options = {**EXACT, "lr": lr, "damping": 1e-2}
    free_model = copy.deepcopy(model)
    free = KFAC(free_model.parameters(), model=free_model, loss_fn="cross_entropy", **free_options)
    delta_free = take_step(free, free_model, "cross_entropy", X, y, True)
    problem = curvkit.Problem(model, "cross_entropy", (X, y))
    _, g = problem.loss_and_gradient()
    length = -lr * torch.dot(g, delta_free).item()  # lr^2 g^T v
    metric = free.kronecker().to_dense() + 1e-2 * torch.eye(problem.dim, dtype=DT)
    for kappa, factor in [(length / 4, 0.5), (4 * length, 1.0)]:
        clipped_model = copy.deepcopy(model)
        clipped = KFAC(
            clipped_model.parameters(),
            model=clipped_model,
            loss_fn="cross_entropy",
            **{**free_options, "kl_clip": kappa},
        )
        delta = take_step(clipped, clipped_model, "cross_entropy", X, y, True)
        assert rel(delta, factor * delta_free) < TIGHT
        assert (delta @ metric @ delta).item() <= kappa * (1 + 1e-10)
    assert math.isclose((0.5 * delta_free) @ metric @ (0.5 * delta_free), length / 4, rel_tol=1e-10)


def linear_regression(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(5, 2).to(DT)
    X = torch.randn(64, 5, dtype=DT)
    y = X @ torch.randn(5, 2, dtype=DT) + 0.3 * torch.randn(64, 2, dtype=DT)
    return model, X, y


def mse(model, X, y) -> float:
    return F.mse_loss(model(X), y).item()


def test_the_levenberg_marquardt_rule_adapts_the_damping():
    """``rho = (h1 - h0) / (g^T d + d^T (K + l I) d / 2)`` for the step ``d`` and the batch's KFAC ``K``.

    On linear least squares with the GGN (``K`` exact) the model predicts the step well (``rho > 3/4``)
    and the damping falls by ``(19/20)^2``; with the empirical Fisher near the solution ``K``
    underestimates the curvature, the step overshoots (``rho < 1/4``) and the damping rises.
    """
    for fisher_type, direction in [("type-2", -1), ("empirical", +1)]:
        model, X, y = linear_regression()
        if fisher_type == "empirical":
            design = torch.cat([X, torch.ones(64, 1, dtype=DT)], 1)
            solution = torch.linalg.lstsq(design, y).solution
            with torch.no_grad():
                model.weight.copy_(solution[:5].T + 0.01)
                model.bias.copy_(solution[5])
        optimizer = KFAC(
            model.parameters(),
            model=model,
            loss_fn="mse",
            **{**EXACT, "adapt_damping": True},
            adapt_every=2,
            lr=1.0,
            damping=1e-2,
            fisher_type=fisher_type,
        )
        take_step(optimizer, model, "mse", X, y, True)
        assert optimizer.damping == 1e-2 and optimizer.last_reduction_ratio is None  # not yet due
        problem = curvkit.Problem(model, "mse", (X, y))
        K = curvkit.curvature("kfac", problem, fisher_type=fisher_type).to_dense()
        h0, g = problem.loss_and_gradient()
        delta = take_step(optimizer, model, "mse", X, y, True)
        predicted = g @ delta + 0.5 * delta @ (K + 1e-2 * torch.eye(problem.dim, dtype=DT)) @ delta
        rho = (mse(model, X, y) - h0.item()) / predicted.item()
        assert math.isclose(optimizer.last_reduction_ratio, rho, rel_tol=1e-9)
        assert (rho > 0.75) if direction < 0 else (rho < 0.25)
        assert math.isclose(optimizer.damping, 1e-2 * (19 / 20) ** (2 * -direction), rel_tol=1e-12)
    assert DAMPING_RANGE == (1e-8, 1e8)


# ---------------------------------------------------------------------------- training
def test_loss_decreases_on_convex_problems():
    model, X, y = linear_regression()
    solution = torch.linalg.lstsq(torch.cat([X, torch.ones(64, 1, dtype=DT)], 1), y).solution
    optimum = F.mse_loss(torch.cat([X, torch.ones(64, 1, dtype=DT)], 1) @ solution, y).item()
    optimizer = KFAC(model.parameters(), model=model, loss_fn="mse", **{**EXACT, "lr": 1.0, "damping": 1e-9})
    first = mse(model, X, y)
    take_step(optimizer, model, "mse", X, y, True)
    assert mse(model, X, y) - optimum < 1e-10 * (first - optimum)  # one Newton step
    torch.manual_seed(0)
    logistic = nn.Linear(5, 3).to(DT)
    X, y = torch.randn(128, 5, dtype=DT), torch.randint(0, 3, (128,))
    losses = []
    optimizer = KFAC(
        logistic.parameters(), model=logistic, loss_fn="cross_entropy", lr=0.3, kl_clip=1e-2, momentum=0.0
    )
    for _ in range(15):
        logistic.zero_grad()
        loss = F.cross_entropy(logistic(X), y)
        loss.backward()
        losses.append(loss.item())
        optimizer.step(batch=(X, y))
    assert all(b < a for a, b in zip(losses, losses[1:]))  # monotone on the convex full-batch problem
    assert losses[-1] < 0.95 * losses[0]
    # (momentum 0.9 with such near-Newton full-batch steps overshoots and oscillates, as heavy ball does)


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_the_defaults_train_a_small_mlp_on_random_data(cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    X, y = torch.randn(256, 10), torch.randint(0, 3, (256,))
    optimizer = cls(model.parameters(), model=model, loss_fn="cross_entropy")
    first = F.cross_entropy(model(X), y).item()
    for _ in range(60):
        index = torch.randint(0, 256, (32,))
        optimizer.zero_grad()
        F.cross_entropy(model(X[index]), y[index]).backward()
        optimizer.step(batch=(X[index], y[index]))
    assert F.cross_entropy(model(X), y).item() < 0.8 * first
    assert optimizer.steps == 60 and optimizer.skipped_steps == 0
    assert DAMPING_RANGE[0] <= optimizer.damping < 1e-3  # the rule lowered it: the steps were well predicted


# ---------------------------------------------------------------------------- state
@pytest.mark.parametrize(
    "cls, options, from_grad",
    [(KFAC, {}, True), (EKFAC, {"fisher_type": "mc"}, False)],
    ids=["kfac-grad", "ekfac-mc-no-grad"],
)
def test_the_state_dict_round_trip_resumes_bit_identically(cls, options, from_grad):
    torch.manual_seed(0)
    model = mlp()
    data_batches = batches(model, 8)
    hyper = {"inv_update_freq": 3, "adapt_every": 2, "factor_decay": 0.8, **options}
    optimizer = cls(model.parameters(), model=model, loss_fn="cross_entropy", **hyper)
    for X, y in data_batches[:4]:  # then steps 4 and 5 use the factors frozen at step 3, from the state
        take_step(optimizer, model, "cross_entropy", X, y, from_grad)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    for X, y in data_batches[4:]:
        take_step(optimizer, model, "cross_entropy", X, y, from_grad)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed_model = mlp()
    resumed_model.load_state_dict(saved["model"])
    resumed = cls(resumed_model.parameters(), model=resumed_model, loss_fn="cross_entropy", **hyper)
    resumed.load_state_dict(saved["optimizer"])
    for X, y in data_batches[4:]:
        take_step(resumed, resumed_model, "cross_entropy", X, y, from_grad)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))
    assert (resumed.damping, resumed.steps) == (optimizer.damping, optimizer.steps) == (optimizer.damping, 8)
    assert torch.equal(resumed.preconditioner().to_dense(), optimizer.preconditioner().to_dense())
    assert optimizer.damping != 1e-3  # the damping was adapted, and resumed


# ---------------------------------------------------------------------------- checks
BAD = [
    ("lr", -0.1, "lr must be a finite number >= 0"),
    ("lr", float("inf"), "lr must be a finite number >= 0"),
    ("damping", 0.0, "damping must be a finite number > 0"),
    ("damping", float("nan"), "damping must be a finite number > 0"),
    ("damping", 1e-12, r"damping must be in \[1e-08, 1e\+08\] with adapt_damping=True .*, got 1e-12"),
    ("damping", 1e9, r"damping must be in \[1e-08, 1e\+08\] with adapt_damping=True .*, got 1000000000.0"),
    ("factor_decay", 1.0, r"factor_decay must be a number in \[0, 1\)"),
    ("factor_decay", -0.1, r"factor_decay must be a number in \[0, 1\)"),
    ("inv_update_freq", 0, "inv_update_freq must be an integer >= 1"),
    ("inv_update_freq", 2.5, "inv_update_freq must be an integer >= 1"),
    ("adapt_damping", "yes", "adapt_damping must be True or False"),
    ("adapt_every", 0, "adapt_every must be an integer >= 1"),
    ("kl_clip", 0.0, "kl_clip must be a finite number > 0"),
    ("kl_clip", -1.0, "kl_clip must be a finite number > 0"),
    ("momentum", 1.0, r"momentum must be a number in \[0, 1\)"),
    ("momentum", -0.5, r"momentum must be a number in \[0, 1\)"),
    ("weight_decay", -1e-4, "weight_decay must be a finite number >= 0"),
    ("seed", -1, "seed must be an integer >= 0"),
    ("seed", 2**70, r"seed must be an integer >= 0 and < 2\*\*63, got 1180591620717411303424"),
    (
        "fisher",
        "mc",
        r"takes no argument 'fisher' \(did you mean 'fisher_type'\?\): its arguments are params",
    ),
]


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
@pytest.mark.parametrize("name, value, message", BAD, ids=[f"{n}={v}" for n, v, _ in BAD])
def test_invalid_hyper_parameters_raise_value_errors(cls, name, value, message):
    model = mlp()
    with pytest.raises(ValueError, match=message):
        cls(model.parameters(), model=model, loss_fn="cross_entropy", **{name: value})


def test_invalid_groups_models_and_batches():
    model = mlp()
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        KFAC([{"params": model[0].parameters(), "lr": -1.0}], model=model, loss_fn="cross_entropy")
    with pytest.raises(ValueError, match="KFAC needs model= and loss_fn="):
        KFAC(model.parameters(), model=None, loss_fn="cross_entropy")
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        KFAC(model.parameters(), model="net", loss_fn="cross_entropy")
    with pytest.raises(ValueError, match=r"KFAC.step needs batch=\(inputs, targets\)"):
        KFAC(model.parameters(), model=model, loss_fn="cross_entropy").step()


def test_a_non_finite_gradient_skips_the_step_with_a_warning():
    torch.manual_seed(0)
    model = mlp()
    X, y = data(model, 6, "cross_entropy")
    optimizer = EKFAC(model.parameters(), model=model, loss_fn="cross_entropy")
    backward(model, "cross_entropy", X, y)
    model[0].weight.grad[0, 0] = float("nan")
    before = flat(model)
    with pytest.warns(curvkit.CurvkitWarning, match=r"EKFAC: step skipped: the gradient is not finite"):
        optimizer.step(batch=(X, y))
    assert torch.equal(flat(model), before) and optimizer.skipped_steps == 1 and optimizer.steps == 0
    assert optimizer.kronecker() is None and not optimizer.state  # no factors, no momentum
    backward(model, "cross_entropy", X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step(batch=(X, y))
    assert optimizer.steps == 1 and not torch.equal(flat(model), before)
    assert optimizer.state_dict()["curvkit"]["skipped_steps"] == 1


def test_the_step_returns_the_closures_loss_or_the_batch_loss():
    torch.manual_seed(0)
    model = mlp()
    X, y = data(model, 6, "cross_entropy")
    optimizer = KFAC(model.parameters(), model=model, loss_fn="cross_entropy")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(X), y)
        loss.backward()
        return loss

    expected = F.cross_entropy(model(X), y).item()
    assert optimizer.step(closure, batch=(X, y)).item() == pytest.approx(expected, rel=1e-14)
    optimizer.zero_grad(set_to_none=True)
    expected = F.cross_entropy(model(X), y).item()
    assert optimizer.step(batch=(X, y)).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_a_damping_outside_the_adapted_range_is_taken_without_adaptation_and_refused_on_loading(cls):
    model = mlp()
    fixed = cls(model.parameters(), model=model, loss_fn="cross_entropy", damping=1e-12, adapt_damping=False)
    assert fixed.damping == 1e-12  # never adapted, so never clamped
    adapted = cls(model.parameters(), model=model, loss_fn="cross_entropy")
    state = adapted.state_dict()
    state["curvkit"]["damping"] = 1e-12
    with pytest.raises(ValueError, match=r"damping must be in \[1e-08, 1e\+08\] with adapt_damping=True"):
        adapted.load_state_dict(state)
    assert adapted.damping == 1e-3
