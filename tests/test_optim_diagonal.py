"""DiagonalNewton, AdaHessian and SophiaH: Hutchinson diagonals through the user's gradient graph."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch import nn

import curvkit
from curvkit.optim.diagonal import AdaHessian, DiagonalNewton, SophiaH, rademacher

DT = torch.float64
OPTIMIZERS = [DiagonalNewton, AdaHessian, SophiaH]

pytestmark = pytest.mark.filterwarnings(
    "ignore:Using backward\\(\\) with create_graph=True:UserWarning"  # the optimizers break the cycle
)


def quadratic(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``d`` (positive), ``b`` and a start ``x0`` of ``L = 1/2 sum d_i x_i^2 - b.x``."""
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(n, generator=g, dtype=DT) * 4.5 + 0.5
    return d, torch.randn(n, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)


def quadratic_step(optimizer, x, d, b, create_graph: bool = True) -> torch.Tensor:
    optimizer.zero_grad()
    loss = 0.5 * (d * x**2).sum() - (b * x).sum()
    loss.backward(create_graph=create_graph)
    before = x.detach().clone()
    optimizer.step()
    return x.detach() - before


# ---------------------------------------------------------------------------- exactness on a quadratic
@pytest.mark.parametrize("probes", [1, 3])
@pytest.mark.parametrize("seed", [0, 7])
def test_diagonal_newton_solves_a_diagonal_quadratic_in_one_step(probes, seed):
    d, b, x0 = quadratic()
    x = nn.Parameter(x0.clone())
    optimizer = DiagonalNewton([x], lr=1.0, damping=1e-14, clip=None, probes=probes, seed=seed)
    quadratic_step(optimizer, x, d, b)
    assert (x.detach() - b / d).abs().max().item() < 1e-10
    # z * (H z) = d exactly for a diagonal H, whatever the probes
    torch.testing.assert_close(optimizer.state[x]["diagonal"], d, rtol=1e-15, atol=0)
    assert optimizer.state[x]["hessian_step"] == 1 and optimizer.refreshes == 1


def test_diagonal_newton_power_damping_and_clip():
    d, b, x0 = quadratic()
    x = nn.Parameter(x0.clone())
    optimizer = DiagonalNewton([x], lr=0.5, damping=0.1, clip=None, hessian_power=0.5)
    g = d * x0 - b
    torch.testing.assert_close(quadratic_step(optimizer, x, d, b), -0.5 * g / (d.sqrt() + 0.1))
    x = nn.Parameter(x0.clone())
    optimizer = DiagonalNewton([x], lr=1.0, damping=1e-14, clip=0.05)
    delta = quadratic_step(optimizer, x, d, b)
    torch.testing.assert_close(delta, (-(d * x0 - b) / d).clamp(-0.05, 0.05))
    assert delta.abs().max().item() == pytest.approx(0.05, rel=1e-12)  # clipped


def test_adahessian_second_moment_is_the_ema_of_the_exact_diagonal():
    d, b, x0 = quadratic()
    x = nn.Parameter(x0.clone())
    beta1, beta2, eps, lr = 0.9, 0.999, 1e-4, 0.15
    optimizer = AdaHessian([x], lr=lr, betas=(beta1, beta2), eps=eps)
    g1 = d * x0 - b
    delta = quadratic_step(optimizer, x, d, b)
    # t = 1: bias-corrected moments are g and d^2: the step is -lr g / (|d| + eps)
    torch.testing.assert_close(delta, -lr * g1 / (d + eps), rtol=1e-13, atol=0)
    for t in range(2, 6):
        quadratic_step(optimizer, x, d, b)
        state = optimizer.state[x]
        assert state["step"] == state["hessian_step"] == t
        torch.testing.assert_close(state["exp_hessian_diag_sq"], (1 - beta2**t) * d**2, rtol=1e-13, atol=0)


def test_adahessian_refreshes_every_update_each_steps_and_its_weight_decay_is_decoupled():
    d, b, x0 = quadratic()
    x = nn.Parameter(x0.clone())
    beta2, lr, wd = 0.99, 0.1, 0.01
    optimizer = AdaHessian([x], lr=lr, betas=(0.0, beta2), weight_decay=wd, update_each=3)
    for t in range(7):
        due = optimizer.hessian_due
        assert due == (t % 3 == 0)
        before = x.detach().clone()
        delta = quadratic_step(optimizer, x, d, b, create_graph=due)  # plain backward when not due
        n = t // 3 + 1
        assert optimizer.state[x]["hessian_step"] == n and optimizer.steps == t + 1
        torch.testing.assert_close(optimizer.state[x]["exp_hessian_diag_sq"], (1 - beta2**n) * d**2)
        g = d * before - b  # beta1 = 0: m = g
        torch.testing.assert_close(delta, -lr * wd * before - lr * g / (d + 1e-4), rtol=1e-12, atol=0)
    assert optimizer.refreshes == 3


def conv_case() -> tuple[nn.Conv2d, torch.Tensor]:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel_size=3).to(DT)
    return conv, torch.randn(4, 2, 5, 5, dtype=DT)


def conv_loss(conv: nn.Conv2d, x: torch.Tensor, weight=None, bias=None) -> torch.Tensor:
    weight = conv.weight if weight is None else weight
    bias = conv.bias if bias is None else bias
    return torch.nn.functional.conv2d(x, weight, bias).tanh().pow(2).sum() / 2


@pytest.mark.parametrize("spatial_averaging", [True, False])
def test_spatial_averaging_averages_over_kernel_positions_as_a_dense_computation(spatial_averaging):
    conv, x = conv_case()
    beta2, seed = 0.999, 3
    optimizer = AdaHessian(
        conv.parameters(), betas=(0.9, beta2), spatial_averaging=spatial_averaging, seed=seed
    )
    W, c = conv.weight.detach().clone(), conv.bias.detach().clone()
    conv_loss(conv, x).backward(create_graph=True)
    optimizer.step()
    # the dense Hessian over (weight, bias) and the probes the optimizer drew
    nw = W.numel()
    flat = torch.cat([W.flatten(), c])
    H = torch.autograd.functional.hessian(
        lambda v: conv_loss(conv, x, v[:nw].view_as(W), v[nw:]), flat
    )  # [nw + 3, nw + 3], not diagonal
    generator = torch.Generator().manual_seed(seed)
    z = torch.cat([rademacher((1, *W.shape), W, generator).flatten(), rademacher((1, 3), c, generator)[0]])
    D = z * (H @ z)
    D_w, D_b = D[:nw].view_as(W), D[nw:]
    if spatial_averaging:
        D_w = D_w.abs().mean(dim=(2, 3), keepdim=True).expand_as(W)
        assert D_w[:, :, 0, 0].std() > 0  # one value per (out, in) pair, not one for all
    v_w, v_b = (
        optimizer.state[conv.weight]["exp_hessian_diag_sq"],
        optimizer.state[conv.bias]["exp_hessian_diag_sq"],
    )
    torch.testing.assert_close(v_w, (1 - beta2) * D_w**2, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(v_b, (1 - beta2) * D_b**2, rtol=1e-10, atol=1e-14)  # 1-d: never averaged


def test_spatial_averaging_of_an_exact_diagonal():
    torch.manual_seed(1)
    W = nn.Parameter(torch.randn(2, 3, 3, 3, dtype=DT))
    c = torch.rand(2, 3, 3, 3, dtype=DT) * 4 - 2  # curvatures of both signs
    optimizer = AdaHessian([W], betas=(0.9, 0.5))
    (0.5 * (c * W**2).sum()).backward(create_graph=True)
    optimizer.step()
    expected = c.abs().mean(dim=(2, 3), keepdim=True).expand_as(c) ** 2 * 0.5
    torch.testing.assert_close(optimizer.state[W]["exp_hessian_diag_sq"], expected, rtol=1e-14, atol=0)


# ---------------------------------------------------------------------------- SophiaH
@pytest.mark.parametrize(
    ("scale", "betas", "rho", "regime"),
    [(50.0, (0.96, 0.99), 0.04, "clipped"), (0.2, (0.5, 0.5), 1.0, "mixed")],
    ids=["clipped", "mixed"],
)
def test_sophia_clips_every_entry_to_lr_and_follows_the_papers_formula(scale, betas, rho, regime):
    d, b, x0 = quadratic()
    d = d * torch.tensor([1, -1, 1, -1, 1, 1], dtype=DT)  # negative curvature: the sign of the momentum
    b = b * scale
    x = nn.Parameter(x0.clone())
    (beta1, beta2), lr, eps = betas, 0.05, 1e-12
    optimizer = SophiaH([x], lr=lr, betas=betas, rho=rho, eps=eps, update_period=2)
    m, h = torch.zeros_like(d), torch.zeros_like(d)
    clipped = 0
    for t in range(1, 8):
        g = d * x.detach() - b
        m = beta1 * m + (1 - beta1) * g
        if t % 2 == 1:
            h = beta2 * h + (1 - beta2) * d
        expected = -lr * (m / (rho * h).clamp(min=eps)).clamp(-1, 1)
        delta = quadratic_step(optimizer, x, d, b, create_graph=optimizer.hessian_due)
        torch.testing.assert_close(delta, expected, rtol=1e-12, atol=1e-15)
        assert delta.abs().max().item() <= lr * (1 + 1e-12)
        clipped += int((delta.abs() >= lr * (1 - 1e-12)).sum())
        negative = d < 0
        torch.testing.assert_close(delta[negative], -lr * m[negative].sign())
    # 7 steps of 6 entries; the 2 of negative curvature are always at lr
    assert (clipped == 42) if regime == "clipped" else (14 < clipped < 30), clipped
    assert optimizer.state[x]["hessian_step"] == 4


def test_sophia_weight_decay_is_decoupled():
    d, b, x0 = quadratic()
    x = nn.Parameter(x0.clone())
    optimizer = SophiaH([x], lr=0.01, weight_decay=0.5)
    without = SophiaH([y := nn.Parameter(x0.clone())], lr=0.01)
    delta = quadratic_step(optimizer, x, d, b)
    torch.testing.assert_close(delta, quadratic_step(without, y, d, b) - 0.01 * 0.5 * x0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_sophia_moves_every_entry_by_at_most_lr_for_any_finite_moments(dtype):
    """Why SophiaH's update needs no finiteness check of its own without weight decay: for finite
    moments, however extreme (m at the dtype's largest value, h zero, negative or subnormal, m = h = 0
    where the default floor eps / rho = 2.5e-11 is zero in float16), every entry of the step is
    finite and at most lr (``SophiaH._implied``)."""
    info = torch.finfo(dtype)
    big, tiny = info.max, info.tiny
    m = torch.tensor([big, -big, big / 2, -tiny, 0.0, 1.0, -1.0, big, 0.0], dtype=dtype)
    h = torch.tensor([tiny, tiny / 4, 0.0, tiny, 0.0, -big, big, -tiny, -1.0], dtype=dtype)
    x = nn.Parameter(torch.zeros(9, dtype=dtype))
    lr = 0.5
    optimizer = SophiaH([x], lr=lr, update_period=100)
    (0.5 * (x**2).sum()).backward(create_graph=True)
    optimizer.step()  # the first step estimates h; then the moments are set to the extremes
    optimizer.state[x].update(exp_avg=m, hessian=h)
    before = x.detach().clone()
    optimizer.zero_grad()
    (0.5 * (x**2).sum()).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error", curvkit.CurvkitWarning)  # not skipped
        optimizer.step()
    delta = (x.detach() - before).double()
    assert torch.isfinite(delta).all() and delta.abs().max().item() <= lr * (1 + 4 * info.eps)
    assert delta.abs().min().item() > 0 or (delta == 0).sum().item() <= 2  # the zero momenta stay put


def test_sophia_with_a_ratio_lr_over_rho_too_large_for_float16_steps_in_the_papers_order():
    """``lr / rho = 1e5`` is no float16 number: the step is formed as ``lr clip(x / rho, 1)`` and
    checked, so a group with float16 and float32 parameters steps both by at most lr, and an ``lr``
    float16 cannot hold skips the step whole (nothing applied halfway)."""
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3, dtype=torch.float16))
    optimizer = SophiaH([a, b], lr=1.0, rho=1e-5, update_period=1)
    before = [a.detach().clone(), b.detach().clone()]
    ((a**2).sum() + (b.float() ** 2).sum()).backward(create_graph=True)
    optimizer.step()
    for p, old in zip((a, b), before):
        delta = (p.detach() - old).double()
        assert torch.isfinite(delta).all() and 0 < delta.abs().max().item() <= 1.0 * (1 + 1e-3)
    assert optimizer.steps == 1 and optimizer.skipped_steps == 0
    optimizer.param_groups[0]["lr"] = 1e6  # more than float16 holds
    before = [a.detach().clone(), b.detach().clone()]
    optimizer.zero_grad()
    ((a**2).sum() + (b.float() ** 2).sum()).backward(create_graph=True)
    with pytest.warns(curvkit.CurvkitWarning, match="SophiaH: step skipped: the update is not finite"):
        optimizer.step()
    assert torch.equal(a.detach(), before[0]) and torch.equal(b.detach(), before[1])


def test_sophia_with_an_lr_too_large_for_float16_checks_its_update_whatever_lr_over_rho():
    """``lr / rho = 1e4`` is a float16 number but ``lr = 1e5`` is not, and an update's entries reach
    ``lr``: the update is checked, so the step is skipped instead of sending a parameter to -inf."""
    x = nn.Parameter(torch.ones(3, dtype=torch.float16))
    optimizer = SophiaH([x], lr=1e5, rho=10.0, update_period=1)
    (x.float() ** 2).sum().backward(create_graph=True)
    with pytest.warns(curvkit.CurvkitWarning, match="SophiaH: step skipped: the update is not finite"):
        optimizer.step()
    assert torch.equal(x.detach(), torch.ones(3, dtype=torch.float16)) and optimizer.skipped_steps == 1


def test_sophia_steps_each_group_by_its_own_lr():
    d, b, x0 = quadratic()
    x, y = nn.Parameter(x0.clone()), nn.Parameter(x0.clone())
    optimizer = SophiaH([{"params": [x], "lr": 0.1}, {"params": [y], "lr": 0.01}], rho=0.04)
    alone = [SophiaH([z := nn.Parameter(x0.clone())], lr=lr, rho=0.04) for lr in (0.1, 0.01)]
    zs = [next(iter(o.param_groups[0]["params"])) for o in alone]
    for _ in range(3):
        optimizer.zero_grad()
        (0.5 * (d * x**2).sum() - (b * x).sum() + 0.5 * (d * y**2).sum() - (b * y).sum()).backward(
            create_graph=True
        )
        optimizer.step()
        for o, z in zip(alone, zs):
            quadratic_step(o, z, d, b)
    torch.testing.assert_close(x.detach(), zs[0].detach(), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(y.detach(), zs[1].detach(), rtol=1e-14, atol=1e-15)
    assert not torch.allclose(x.detach(), y.detach())


def test_adahessian_in_float16_steps_an_entry_without_curvature():
    """The bias corrections are applied to the momentum before the division (m / (sqrt(v) + c eps)
    alone is 1/c times the step): an entry with zero curvature (denominator c eps) steps in float16."""
    x = nn.Parameter(torch.ones(2, dtype=torch.float16))
    optimizer = AdaHessian([x], lr=0.15)
    (0.5 * x[0] ** 2 + 10 * x[1]).backward(create_graph=True)
    optimizer.step()
    assert optimizer.skipped_steps == 0 and torch.isfinite(x).all() and (x.detach() != 1).all()


def test_loaded_state_that_is_not_finite_is_refused():
    d, b, x0 = quadratic()
    x = nn.Parameter(x0.clone())
    optimizer = SophiaH([x], update_period=5)
    quadratic_step(optimizer, x, d, b)
    state = optimizer.state_dict()
    state["state"][0]["hessian"] = state["state"][0]["hessian"].clone()
    state["state"][0]["hessian"][1] = float("nan")
    fresh = SophiaH([nn.Parameter(x0.clone())], update_period=5)
    with pytest.raises(ValueError, match="SophiaH: the state dict's 'hessian' of parameter 0 is not finite"):
        fresh.load_state_dict(state)
    assert not fresh.state


def test_sophia_with_weight_decay_checks_its_update_and_never_makes_an_infinite_parameter_nan():
    """With weight decay the update holds ``lr wd theta``: it is checked, so an infinite entry (set by
    hand; its loss term linear, so the gradient stays finite) skips the step instead of becoming NaN."""
    d, b, x0 = quadratic()
    x = nn.Parameter(x0.clone())
    optimizer = SophiaH([x], lr=0.01, weight_decay=0.5, update_period=100)
    quadratic_step(optimizer, x, d, b)
    with torch.no_grad():
        x[0] = float("inf")
    optimizer.zero_grad()
    (0.5 * (d[1:] * x[1:] ** 2).sum() - (b * x).sum()).backward()
    assert torch.isfinite(x.grad).all()
    with pytest.warns(curvkit.CurvkitWarning, match="SophiaH: step skipped: the update is not finite"):
        optimizer.step()
    assert not torch.isnan(x).any() and x[0].item() == float("inf") and optimizer.skipped_steps == 1


# ---------------------------------------------------------------------------- training
LOGISTIC_SETTINGS = {
    DiagonalNewton: {"lr": 1.0},
    AdaHessian: {"lr": 0.15},
    SophiaH: {"lr": 0.05, "update_period": 1},
}


def logistic_problem() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(80, 5, generator=generator, dtype=DT)
    w = torch.randn(5, generator=generator, dtype=DT)
    y = (X @ w + 0.5 * torch.randn(80, generator=generator, dtype=DT) > 0).to(DT)
    return X, y


def train(optimizer, loss_fn, steps: int) -> list[float]:
    losses = []

    def closure():
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward(create_graph=True)
        return loss

    for _ in range(steps):
        losses.append(optimizer.step(closure).item())
    return losses


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_loss_decreases_on_logistic_regression(cls):
    X, y = logistic_problem()
    w = nn.Parameter(torch.zeros(5, dtype=DT))
    bias = nn.Parameter(torch.zeros(1, dtype=DT))
    optimizer = cls([w, bias], **LOGISTIC_SETTINGS[cls])

    def loss_fn():
        return nn.functional.binary_cross_entropy_with_logits(X @ w + bias, y)

    losses = train(optimizer, loss_fn, 30)
    assert losses[0] == pytest.approx(math.log(2))
    assert losses[-1] < 0.6 * losses[0], losses[::5]
    assert sum(b > a + 1e-12 for a, b in zip(losses, losses[1:])) <= 3, losses  # (nearly) monotone
    assert optimizer.skipped_steps == 0 and all(not p.grad.requires_grad for p in (w, bias))


def small_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
    return model, torch.randn(64, 10), torch.randint(0, 3, (64,))


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_defaults_train_a_small_mlp(cls):
    model, X, y = small_mlp()
    optimizer = cls(model.parameters())
    losses = train(optimizer, lambda: nn.functional.cross_entropy(model(X), y), 40)
    assert losses[-1] < 0.75 * losses[0], losses[::5]
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------- state
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_state_dict_round_trip_resumes_bit_identically(cls):
    period = {"update_period": 2} if cls is SophiaH else {"update_each": 2}
    model, X, y = small_mlp()
    optimizer = cls(model.parameters(), seed=5, **period)

    def run(optimizer, model, steps):
        return train(optimizer, lambda: nn.functional.cross_entropy(model(X), y), steps)

    run(optimizer, model, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    assert "generator_state" in optimizer.state_dict()["curvkit"]
    losses = run(optimizer, model, 5)

    buffer.seek(0)
    saved = torch.load(buffer)
    resumed_model, _, _ = small_mlp()
    resumed_model.load_state_dict(saved["model"])
    resumed = cls(resumed_model.parameters(), seed=99, **period)  # the saved generator state wins
    resumed.load_state_dict(saved["optimizer"])
    assert resumed.steps == 3 and resumed.seed == 5
    assert run(resumed, resumed_model, 5) == losses
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
        for key, value in optimizer.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(resumed.state[q][key])), key


def test_the_probes_depend_on_the_seed_and_only_on_it():
    conv, x = conv_case()

    def first_moment(seed: int) -> torch.Tensor:
        model = nn.Conv2d(2, 3, kernel_size=3).to(DT)
        model.load_state_dict(conv.state_dict())
        optimizer = AdaHessian(model.parameters(), seed=seed, spatial_averaging=False)
        conv_loss(model, x).backward(create_graph=True)
        optimizer.step()
        return optimizer.state[model.weight]["exp_hessian_diag_sq"]

    assert torch.equal(first_moment(1), first_moment(1))
    assert not torch.equal(first_moment(1), first_moment(2))


# ---------------------------------------------------------------------------- errors and safety
INVALID = [
    (DiagonalNewton, {"lr": -1e-3}, "lr must be a finite number >= 0"),
    (DiagonalNewton, {"damping": 0.0}, "damping must be a finite number > 0"),
    (DiagonalNewton, {"clip": -1.0}, "clip must be a finite number > 0"),
    (DiagonalNewton, {"hessian_power": 1.5}, r"hessian_power must be a number in \[0, 1\]"),
    (DiagonalNewton, {"probes": 0}, "probes must be an integer >= 1"),
    (DiagonalNewton, {"update_each": 0}, "update_each must be an integer >= 1"),
    (DiagonalNewton, {"seed": -1}, "seed must be an integer >= 0"),
    (AdaHessian, {"lr": float("nan")}, "lr must be a finite number >= 0"),
    (AdaHessian, {"betas": (0.9, 1.0)}, r"betas\[1\] must be a number in \[0, 1\)"),
    (AdaHessian, {"betas": 0.9}, r"betas must be a pair \(beta1, beta2\)"),
    (AdaHessian, {"eps": 0.0}, "eps must be a finite number > 0"),
    (AdaHessian, {"weight_decay": -0.1}, "weight_decay must be a finite number >= 0"),
    (AdaHessian, {"hessian_power": -0.5}, r"hessian_power must be a number in \[0, 1\]"),
    (AdaHessian, {"update_each": 1.5}, "update_each must be an integer >= 1"),
    (AdaHessian, {"spatial_averaging": "yes"}, "spatial_averaging must be True or False"),
    (SophiaH, {"lr": -1.0}, "lr must be a finite number >= 0"),
    (SophiaH, {"betas": (-0.1, 0.99)}, r"betas\[0\] must be a number in \[0, 1\)"),
    (SophiaH, {"rho": 0.0}, "rho must be a finite number > 0"),
    (SophiaH, {"eps": -1e-12}, "eps must be a finite number > 0"),
    (SophiaH, {"weight_decay": float("inf")}, "weight_decay must be a finite number >= 0"),
    (SophiaH, {"update_period": 0}, "update_period must be an integer >= 1"),
    (SophiaH, {"seed": 1.0}, "seed must be an integer >= 0"),
    (AdaHessian, {"seed": 2**64}, r"seed must be an integer >= 0 and < 2\*\*63, got 18446744073709551616"),
    (SophiaH, {"seed": 2**63}, r"seed must be an integer >= 0 and < 2\*\*63, got 9223372036854775808"),
]


@pytest.mark.parametrize(("cls", "kwargs", "match"), INVALID, ids=lambda v: str(v))
def test_invalid_hyper_parameters_raise(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([nn.Parameter(torch.zeros(2))], **kwargs)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_invalid_group_hyper_parameters_raise(cls):
    good, bad = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="lr must be a finite number >= 0, got -0.1"):
        cls([{"params": [good]}, {"params": [bad], "lr": -0.1}])
    with pytest.raises(ValueError, match="parameter group 0 is empty"):
        cls([{"params": []}])


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_a_gradient_without_its_graph_is_a_one_line_error(cls):
    d, b, x0 = quadratic()
    x = nn.Parameter(x0.clone())
    optimizer = cls([x])
    with pytest.raises(ValueError, match=r"call loss.backward\(create_graph=True\) before step\(\)") as error:
        quadratic_step(optimizer, x, d, b, create_graph=False)
    assert "\n" not in str(error.value) and str(error.value).startswith(cls.__name__)
    assert torch.equal(x.detach(), x0) and optimizer.steps == 0


def test_a_gradient_constant_in_the_parameters_has_zero_curvature():
    d, b, x0 = quadratic()
    x, y = nn.Parameter(x0.clone()), nn.Parameter(torch.ones(3, dtype=DT))
    optimizer = DiagonalNewton([x, y], clip=None)
    optimizer.zero_grad()
    (0.5 * (d * x**2).sum() - (b * x).sum() + y.sum()).backward(create_graph=True)
    assert not y.grad.requires_grad  # linear in y: no graph, H's rows for y are zero
    optimizer.step()
    assert torch.equal(optimizer.state[y]["diagonal"], torch.zeros(3, dtype=DT))
    torch.testing.assert_close(y.detach(), 1 - 1 / optimizer.defaults["damping"] * torch.ones(3, dtype=DT))


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_a_nan_gradient_skips_the_step_with_a_warning(cls):
    d, b, x0 = quadratic()
    x = nn.Parameter(x0.clone())
    optimizer = cls([x])
    b_nan = b.clone()
    b_nan[2] = float("nan")
    with pytest.warns(
        curvkit.CurvkitWarning, match=f"{cls.__name__}: step skipped: the gradient is not finite"
    ):
        quadratic_step(optimizer, x, d, b_nan)
    assert torch.equal(x.detach(), x0) and optimizer.skipped_steps == 1
    assert (
        optimizer.steps == 0 and "exp_avg" not in optimizer.state[x] and "diagonal" not in optimizer.state[x]
    )
    assert not x.grad.requires_grad  # the graph is freed all the same
    quadratic_step(optimizer, x, d, b)  # then training goes on
    assert torch.isfinite(x).all() and not torch.equal(x.detach(), x0) and optimizer.steps == 1


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("refresh", [True, False], ids=["refresh", "between-refreshes"])
def test_every_non_finite_gradient_is_caught_whatever_the_state_carries(cls, bad, refresh):
    """The one check of new state and updates also covers what the state carries (CARRIED_BY_STATE):
    an infinite gradient a clipped step would turn finite is still caught and named."""
    d, b, x0 = quadratic()
    x = nn.Parameter(x0.clone())
    optimizer = cls([x], **({"update_period": 2} if cls is SophiaH else {"update_each": 2}))
    if not refresh:
        quadratic_step(optimizer, x, d, b)  # the next step keeps the diagonal
        assert not optimizer.hessian_due
    before = x.detach().clone()
    b_bad = b.clone()
    b_bad[2] = bad
    with pytest.warns(
        curvkit.CurvkitWarning, match=f"{cls.__name__}: step skipped: the gradient is not finite"
    ):
        quadratic_step(optimizer, x, d, b_bad, create_graph=refresh)
    assert torch.equal(x.detach(), before) and optimizer.skipped_steps == 1


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_a_non_finite_curvature_estimate_skips_the_step(cls):
    x = nn.Parameter(torch.zeros(3, dtype=DT))
    optimizer = cls([x])
    (x.abs().pow(1.5).sum() + x.sum()).backward(create_graph=True)  # finite gradient, infinite curvature
    assert torch.isfinite(x.grad).all()
    with pytest.warns(
        curvkit.CurvkitWarning, match="Hutchinson estimate of the Hessian's diagonal is not finite"
    ):
        optimizer.step()
    assert torch.equal(x.detach(), torch.zeros(3, dtype=DT)) and optimizer.skipped_steps == 1


def test_a_non_finite_update_is_skipped_by_apply_updates():
    x = nn.Parameter(torch.ones(2))  # float32: g / (d + damping) overflows
    optimizer = DiagonalNewton([x], damping=1e-10, clip=None)
    (1e30 * x.sum() + 1e-20 * (x**2).sum()).backward(create_graph=True)
    with pytest.warns(curvkit.CurvkitWarning, match="DiagonalNewton: step skipped: the update is not finite"):
        optimizer.step()
    assert torch.equal(x.detach(), torch.ones(2)) and optimizer.skipped_steps == 1


def test_a_parameter_without_gradient_is_left_alone():
    d, b, x0 = quadratic()
    x, unused = nn.Parameter(x0.clone()), nn.Parameter(torch.ones(2, dtype=DT))
    optimizer = AdaHessian([x, unused])
    quadratic_step(optimizer, x, d, b)
    assert unused.grad is None and torch.equal(unused.detach(), torch.ones(2, dtype=DT))
    assert not optimizer.state[unused] and optimizer.state[x]["step"] == 1


def test_a_generator_saved_on_another_kind_of_device_is_reseeded_with_a_warning():
    d, b, x0 = quadratic()
    x = nn.Parameter(x0.clone())
    optimizer = SophiaH([x], seed=3)
    quadratic_step(optimizer, x, d, b)
    state = optimizer.state_dict()
    state["curvkit"] = {**state["curvkit"], "generator_device": "cuda:0"}
    fresh = SophiaH([x])
    with pytest.warns(curvkit.CurvkitWarning, match="saved on cuda and cannot be restored on cpu: reseeded"):
        fresh.load_state_dict(state)
    assert fresh.steps == 1 and fresh.seed == 3
    expected = torch.Generator().manual_seed(4).get_state()  # seed + steps
    assert torch.equal(fresh.generator.get_state(), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_on_cuda_the_probes_are_drawn_there_and_resume_bit_identically(cls):
    d, b, x0 = (t.cuda() for t in quadratic())
    x = nn.Parameter(x0.clone())
    optimizer = cls([x], seed=2)
    assert optimizer.generator.device.type == "cuda"
    quadratic_step(optimizer, x, d, b)
    saved = {"x": x.detach().clone(), "optimizer": optimizer.state_dict()}
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    expected = [quadratic_step(optimizer, x, d, b) for _ in range(3)]
    buffer.seek(0)
    saved = torch.load(buffer)
    y = nn.Parameter(saved["x"])
    resumed = cls([y])
    resumed.load_state_dict(saved["optimizer"])
    for delta in expected:
        assert torch.equal(quadratic_step(resumed, y, d, b), delta)


def test_a_skipped_step_that_estimates_the_diagonal_has_drawn_its_probes_whatever_was_not_finite():
    """As the module docstring says: a NaN gradient too (the probes are drawn before the check)."""
    x = nn.Parameter(torch.ones(3, dtype=torch.float64))
    optimizer = AdaHessian([x], seed=2**63 - 1)  # the largest seed
    drawn = optimizer.generator.get_state()
    ((x**2).sum() * float("nan")).backward(create_graph=True)
    with pytest.warns(curvkit.CurvkitWarning, match="AdaHessian: step skipped: the gradient is not finite"):
        optimizer.step()
    assert optimizer.steps == 0 and not optimizer.state[x]
    assert not torch.equal(optimizer.generator.get_state(), drawn)
    state = optimizer.state_dict()
    state["curvkit"]["seed"] = 2**63
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0 and < 2\*\*63"):
        optimizer.load_state_dict(state)


# ------------------------------------------------------------------------ gradient graphs, kept denominators
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_the_step_detaches_the_gradients_in_place(cls):
    """The gradient tensors backward made stay the parameters' gradients, without their graph (torch's
    own zero_grad(set_to_none=False) detaches in place too); one that is a view is replaced instead."""
    d, b, x0 = quadratic()
    x, y = nn.Parameter(x0.clone()), nn.Parameter(x0[:3].clone())
    optimizer = cls([x, y])
    (0.5 * (d * x**2).sum() - (b * x).sum()).backward(create_graph=True)
    y.grad = (3 * y)[:]  # a view with a graph: its own loss 3/2 |y|^2
    made, view = x.grad, y.grad
    assert made.requires_grad and view._is_view()
    optimizer.step()
    assert x.grad is made and not made.requires_grad
    assert y.grad is not view and not y.grad.requires_grad and torch.equal(y.grad, view.detach())
    assert optimizer.skipped_steps == 0


def sophia_run(optimizer, model, X, y, steps, change=None):
    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward(create_graph=True)
        return loss

    for step in range(steps):
        if change is not None:
            change(step)
        optimizer.step(closure)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "change",
    [
        lambda optimizer, step: step == 3 and optimizer.param_groups[0].update(eps=1e-2),
        lambda optimizer, step: (
            step == 3 and [state["hessian"].mul_(3.0) for state in optimizer.state.values()]
        ),
        lambda optimizer, step: (
            step == 3 and [state.update(hessian=state["hessian"] * 3.0) for state in optimizer.state.values()]
        ),
    ],
    ids=["eps", "hessian-in-place", "hessian-replaced"],
)
def test_sophia_denominators_kept_between_refreshes_follow_a_change_of_eps_or_of_the_hessian(change):
    """Between refreshes SophiaH uses its last denominators max(h, eps / rho) again; a new eps, or h
    changed (in place or replaced) between two steps, makes them anew: the same steps as an optimizer
    that never kept them (one that forgets them before every step)."""
    model, X, y = small_mlp()
    twin, _, _ = small_mlp()
    twin.load_state_dict(model.state_dict())
    optimizer = SophiaH(model.parameters(), update_period=5)
    fresh = SophiaH(twin.parameters(), update_period=5)

    def forget(step):
        change(fresh, step)
        fresh._floored.clear()

    kept = sophia_run(optimizer, model, X, y, 8, lambda step: change(optimizer, step))
    assert all(torch.equal(p, q) for p, q in zip(kept, sophia_run(fresh, twin, X, y, 8, forget)))
    assert optimizer._floored and optimizer.skipped_steps == fresh.skipped_steps == 0


def test_sophia_denominators_are_dropped_with_the_state_a_state_dict_replaces():
    model, X, y = small_mlp()
    optimizer = SophiaH(model.parameters(), update_period=5)
    sophia_run(optimizer, model, X, y, 2)
    assert optimizer._floored
    resumed = SophiaH(small_mlp()[0].parameters(), update_period=5)
    sophia_run(resumed, model, X, y, 1)
    resumed.load_state_dict(optimizer.state_dict())
    assert not resumed._floored
