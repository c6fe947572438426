"""Shampoo against closed forms and independent references in float64; training, state, checks."""

from __future__ import annotations

import copy
import io
import math

import pytest
import scipy.linalg
import torch
from torch import nn

import curvkit
from curvkit.optim.shampoo import Shampoo, inverse_root

DT = torch.float64


def one_step(G: torch.Tensor, **kwargs) -> tuple[torch.Tensor, Shampoo]:
    """The update of a parameter of gradient ``G`` at Shampoo's first step, and the optimizer."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(G.shape, dtype=G.dtype))
    before = p.detach().clone()
    optimizer = Shampoo([p], **kwargs)
    p.grad = G.clone()
    optimizer.step()
    return p.detach() - before, optimizer


def reference_direction(G: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``G x_1 (G_(1) G_(1)^T + eps I)^(-1/2k) ... x_k (...)`` with scipy's fractional matrix power."""
    k, out = G.ndim, G.numpy()
    for i in range(k):
        unfolded = G.movedim(i, 0).reshape(G.shape[i], -1).numpy()
        factor = unfolded @ unfolded.T + epsilon * torch.eye(G.shape[i], dtype=DT).numpy()
        root = scipy.linalg.fractional_matrix_power(factor, -1.0 / (2 * k)).real
        out = torch.from_numpy(root @ torch.from_numpy(out).movedim(i, 0).reshape(G.shape[i], -1).numpy())
        shape = (G.shape[i], *[n for j, n in enumerate(G.shape) if j != i])
        out = out.reshape(shape).movedim(0, i).numpy()
    return torch.from_numpy(out)


# ---------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("beta1", [0.0, 0.9])
@pytest.mark.parametrize("beta2", [0.999, 1.0])
@pytest.mark.parametrize("epsilon", [1e-12, 1e-3])
def test_the_first_step_on_a_rank_one_gradient_is_the_closed_form(beta1, beta2, epsilon):
    # G = u v^T: L = |v|^2 u u^T, R = |u|^2 v v^T, so u and v are eigenvectors of eigenvalue
    # |u|^2 |v|^2 of L + eps I and R + eps I: L^-1/4 G R^-1/4 = G / sqrt(|u|^2 |v|^2 + eps), exactly
    torch.manual_seed(1)
    u, v = torch.randn(5, dtype=DT), torch.randn(3, dtype=DT)
    G = torch.outer(u, v)
    delta, _ = one_step(G, lr=0.7, betas=(beta1, beta2), epsilon=epsilon, grafting="none")
    expected = -0.7 * G / math.sqrt(u.norm() ** 2 * v.norm() ** 2 + epsilon)
    # rank-deficient L and R with eps = 1e-12: rounding amplified by up to eps^-1/4 = 1e3 per factor
    torch.testing.assert_close(delta, expected, rtol=0, atol=1e-9)
    if epsilon < 1e-9:  # the polar factor of G: unit Frobenius norm
        assert abs(delta.norm().item() / 0.7 - 1) < 1e-10


def test_the_first_step_on_a_full_rank_gradient_is_its_polar_factor():
    # G = U S V^T: L^-1/4 G R^-1/4 = U S^-1/2 S S^-1/2 V^T = U V^T as eps -> 0
    torch.manual_seed(2)
    G = torch.randn(4, 6, dtype=DT)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    delta, _ = one_step(G, lr=1.0, betas=(0.0, 0.9), epsilon=1e-14, grafting="none")
    torch.testing.assert_close(-delta, U @ Vh, rtol=0, atol=1e-8)


def test_an_order_three_tensor_has_one_factor_per_dimension_with_inverse_sixth_roots():
    torch.manual_seed(3)
    G = torch.randn(3, 4, 5, dtype=DT)
    delta, optimizer = one_step(G, lr=1.0, betas=(0.0, 1.0), epsilon=1e-3, grafting="none")
    torch.testing.assert_close(-delta, reference_direction(G, 1e-3), rtol=0, atol=1e-12)
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    assert [tuple(state[f"statistic_{i}"].shape) for i in range(3)] == [(3, 3), (4, 4), (5, 5)]
    # dimensions of size 1 are dropped: a (5, 1, 3) tensor is preconditioned as a 5 x 3 matrix
    G = torch.randn(5, 1, 3, dtype=DT)
    delta, optimizer = one_step(G, lr=1.0, betas=(0.0, 1.0), epsilon=1e-3, grafting="none")
    torch.testing.assert_close(-delta, reference_direction(G[:, 0], 1e-3)[:, None], rtol=0, atol=1e-10)
    assert "statistic_2" not in optimizer.state[optimizer.param_groups[0]["params"][0]]


def test_a_bias_has_one_factor_and_an_inverse_square_root():
    torch.manual_seed(4)
    g = torch.randn(6, dtype=DT)
    delta, optimizer = one_step(g, lr=1.0, betas=(0.0, 1.0), epsilon=1e-12, grafting="none")
    # H = g g^T: H^-1/2 g = g / sqrt(|g|^2 + eps)
    torch.testing.assert_close(-delta, g / math.sqrt(g.norm() ** 2 + 1e-12), rtol=0, atol=1e-8)
    assert optimizer.state[optimizer.param_groups[0]["params"][0]]["preconditioner_0"].shape == (6, 6)


def test_the_inverse_fourth_root_to_the_fourth_inverts_the_matrix():
    torch.manual_seed(5)
    B = torch.randn(8, 8, dtype=DT)
    A = B @ B.T + 0.1 * torch.eye(8, dtype=DT)
    P = inverse_root(A, 4, epsilon=1e-15)
    assert P.dtype == DT and torch.allclose(P, P.T, rtol=0, atol=1e-14)
    torch.testing.assert_close(
        torch.linalg.matrix_power(P, 4) @ A, torch.eye(8, dtype=DT), rtol=0, atol=1e-12
    )
    # epsilon is added to the eigenvalues: P^4 (A + eps I) = I for any eps
    P = inverse_root(A, 4, epsilon=0.5)
    torch.testing.assert_close(
        torch.linalg.matrix_power(P, 4) @ (A + 0.5 * torch.eye(8, dtype=DT)),
        torch.eye(8, dtype=DT),
        rtol=0,
        atol=1e-12,
    )
    # float32 input, float64 output; a singular matrix's rounding negatives are clamped
    singular = torch.outer(torch.randn(8), torch.randn(8))
    singular = singular @ singular.T
    assert inverse_root(singular, 4, epsilon=1e-12).isfinite().all()
    assert inverse_root(singular, 4, epsilon=1e-12).dtype == DT
    assert inverse_root(torch.full((3, 3), float("nan")), 4, epsilon=1e-12).isnan().all()  # no exception


# ---------------------------------------------------------------------- grafting, schedule, dimensions
@pytest.mark.parametrize("grafting", ["sgd", "adagrad"])
def test_grafting_takes_shampoos_direction_and_the_grafted_steps_norm_per_tensor(grafting):
    torch.manual_seed(6)
    shapes = [(6, 4), (4,)]
    params = [nn.Parameter(torch.randn(s, dtype=DT)) for s in shapes]
    plain = [nn.Parameter(p.detach().clone()) for p in params]
    beta2, lr, graft_epsilon = 0.99, 0.3, 1e-8
    kwargs = {"lr": lr, "betas": (0.0, beta2), "update_freq": 2}
    grafted = Shampoo(params, grafting=grafting, graft_epsilon=graft_epsilon, **kwargs)
    ungrafted = Shampoo(plain, grafting="none", **kwargs)
    squares = [torch.zeros(s, dtype=DT) for s in shapes]
    for t in range(1, 5):
        grads = [torch.randn(s, dtype=DT) for s in shapes]
        with torch.no_grad():  # the direction does not depend on the parameters: start both from the same
            for p, q in zip(params, plain):
                q.copy_(p)
        before = [p.detach().clone() for p in params + plain]
        for p, q, g in zip(params, plain, grads):
            p.grad, q.grad = g.clone(), g.clone()
        grafted.step()
        ungrafted.step()
        for i, (p, q, g) in enumerate(zip(params, plain, grads)):
            delta, direction = p.detach() - before[i], q.detach() - before[i + 2]
            if grafting == "sgd":
                norm = lr * g.norm()
            else:  # RMSprop / Adam's bias-corrected second moment
                squares[i] = beta2 * squares[i] + (1 - beta2) * g**2
                norm = lr * (g / ((squares[i] / (1 - beta2**t)).sqrt() + graft_epsilon)).norm()
            assert abs(delta.norm() / norm - 1) < 1e-12
            torch.testing.assert_close(delta / delta.norm(), direction / direction.norm(), rtol=0, atol=1e-12)


def test_before_start_the_step_is_the_grafted_one_and_roots_refresh_every_update_freq_steps():
    torch.manual_seed(7)
    p = nn.Parameter(torch.randn(4, 3, dtype=DT))
    optimizer = Shampoo(
        [p], lr=0.1, betas=(0.0, 0.9), grafting="sgd", start_preconditioning_step=3, update_freq=4
    )
    roots = []
    for t in range(1, 13):
        g = torch.randn(4, 3, dtype=DT)
        before = p.detach().clone()
        p.grad = g
        optimizer.step()
        state = optimizer.state[p]
        if t < 3:
            torch.testing.assert_close(p.detach() - before, -0.1 * g, rtol=0, atol=1e-15)
            assert "preconditioner_0" not in state and "statistic_0" in state
        else:
            roots.append(state["preconditioner_0"])
    assert optimizer.steps == 12 and optimizer.refreshes == 3  # at steps 3, 7 and 11
    fresh = [i for i in range(1, len(roots)) if roots[i] is not roots[i - 1]]
    assert [i + 3 for i in fresh] == [7, 11]


def test_max_preconditioner_dim_gives_larger_dimensions_a_diagonal_factor():
    torch.manual_seed(8)
    G = torch.randn(5, 3, dtype=DT)
    epsilon = 1e-6
    delta, optimizer = one_step(
        G, lr=1.0, betas=(0.0, 1.0), epsilon=epsilon, grafting="none", max_preconditioner_dim=4
    )
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    assert tuple(state["statistic_0"].shape) == (5,) and tuple(state["preconditioner_0"].shape) == (5,)
    assert tuple(state["statistic_1"].shape) == (3, 3) and tuple(state["preconditioner_1"].shape) == (3, 3)
    left = ((G**2).sum(dim=1) + epsilon) ** -0.25
    right = scipy.linalg.fractional_matrix_power((G.T @ G + epsilon * torch.eye(3, dtype=DT)).numpy(), -0.25)
    torch.testing.assert_close(-delta, left[:, None] * G @ torch.from_numpy(right.real), rtol=0, atol=1e-10)
    # in a network: no factor larger than the bound
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    optimizer = Shampoo(model.parameters(), max_preconditioner_dim=16)
    nn.functional.cross_entropy(model(torch.randn(8, 10)), torch.randint(0, 3, (8,))).backward()
    optimizer.step()
    factors = ("statistic_", "preconditioner_")
    shapes = {tuple(v.shape) for s in optimizer.state.values() for k, v in s.items() if k.startswith(factors)}
    assert shapes == {(32,), (10, 10), (3, 3)}  # 32 > 16: diagonal; the (3,) bias: a 3 x 3 factor


# ---------------------------------------------------------------------- training
def logistic_regression() -> tuple[torch.Tensor, torch.Tensor, float]:
    """Data and the minimum of the mean logistic loss of a 5-feature linear model (L-BFGS)."""
    torch.manual_seed(9)
    X = torch.randn(200, 5, dtype=DT)
    y = torch.bernoulli(torch.sigmoid(X @ torch.randn(5, 1, dtype=DT)))
    model = nn.Linear(5, 1).to(DT)
    lbfgs = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        lbfgs.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(X), y)
        loss.backward()
        return loss

    for _ in range(3):
        best = lbfgs.step(closure).item()
    return X, y, best


@pytest.mark.parametrize(
    ("kwargs", "closed"),
    [({"lr": 0.1}, 0.95), ({"lr": 0.1, "betas": (0.0, 1.0), "grafting": "none"}, 0.6)],
    ids=["defaults", "gupta"],
)
def test_the_loss_decreases_on_logistic_regression(kwargs, closed):
    X, y, best = logistic_regression()
    torch.manual_seed(1)
    model = nn.Linear(5, 1).to(DT)
    optimizer = Shampoo(model.parameters(), **kwargs)

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(X), y)
        loss.backward()
        return loss

    losses = [optimizer.step(closure).item() for _ in range(50)]
    gap = (losses[-1] - best) / (losses[0] - best)
    assert gap < 1 - closed, (losses[0], losses[-1], best)
    if kwargs.get("grafting") == "none":  # AdaGrad-like sums: a monotone decrease
        assert all(b < a for a, b in zip(losses, losses[1:]))


def test_the_defaults_train_a_small_mlp_on_random_data():
    def train(make):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
        X, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
        optimizer = make(model.parameters())
        losses = []
        for _ in range(100):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(X), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses, model

    losses, model = train(Shampoo)
    adam, _ = train(lambda params: torch.optim.Adam(params, lr=1e-3))
    assert all(math.isfinite(v) for v in losses) and all(p.isfinite().all() for p in model.parameters())
    assert losses[-1] < 0.8 * losses[0] and losses[-1] < 1.05 * adam[-1], (losses[0], losses[-1], adam[-1])


# ---------------------------------------------------------------------- state
def test_a_state_dict_round_trip_resumes_bit_identically():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))  # float32: float64 statistics
    batches = [(torch.randn(16, 6), torch.randint(0, 3, (16,))) for _ in range(10)]
    kwargs = {
        "lr": 1e-2,
        "betas": (0.9, 0.99),
        "weight_decay": 1e-3,
        "update_freq": 3,
        "start_preconditioning_step": 2,
        "max_preconditioner_dim": 8,
    }

    def train(model, optimizer, part):
        for x, y in part:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

    optimizer = Shampoo(model.parameters(), **kwargs)
    train(model, optimizer, batches[:5])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    train(model, optimizer, batches[5:])

    buffer.seek(0)
    saved = torch.load(buffer)
    resumed_model = copy.deepcopy(model)
    resumed_model.load_state_dict(saved["model"])
    resumed = Shampoo(resumed_model.parameters(), **kwargs)
    resumed.load_state_dict(saved["optimizer"])
    assert resumed.steps == 5 and resumed.refreshes == 2  # steps 2 and 5
    dtypes = {k: v.dtype for s in resumed.state.values() for k, v in s.items() if torch.is_tensor(v)}
    assert dtypes["statistic_0"] == DT and dtypes["momentum_buffer"] == torch.float32
    train(resumed_model, resumed, batches[5:])
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        for key, value in optimizer.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(resumed.state[q][key])), key
    assert resumed.steps == optimizer.steps == 10 and resumed.refreshes == optimizer.refreshes == 3  # and 8


# ---------------------------------------------------------------------- checks
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, r"lr must be a finite number >= 0"),
        ({"lr": float("nan")}, r"lr must be a finite number >= 0"),
        ({"betas": (1.0, 0.9)}, r"betas\[0\] must be a number in \[0, 1\)"),
        ({"betas": (0.9, 1.5)}, r"betas\[1\] must be a number in \[0, 1\]"),
        ({"betas": (0.9,)}, r"betas must be a pair"),
        ({"epsilon": 0.0}, r"epsilon must be a finite number > 0"),
        ({"weight_decay": -1e-4}, r"weight_decay must be a finite number >= 0"),
        ({"update_freq": 0}, r"update_freq must be an integer >= 1"),
        ({"update_freq": 1.5}, r"update_freq must be an integer >= 1"),
        ({"start_preconditioning_step": 0}, r"start_preconditioning_step must be an integer >= 1"),
        ({"max_preconditioner_dim": 0}, r"max_preconditioner_dim must be an integer >= 1"),
        ({"grafting": "adam"}, r"grafting must be one of \['adagrad', 'sgd', 'none'\]"),
        ({"graft_epsilon": 0.0}, r"graft_epsilon must be a finite number > 0"),
        ({"decoupled_weight_decay": "yes"}, r"decoupled_weight_decay must be True or False"),
        ({"preconditioner_dtype": torch.float16}, r"preconditioner_dtype must be one of"),
    ],
)
def test_invalid_hyper_parameters_raise_value_errors(kwargs, message):
    p = nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=message):
        Shampoo([p], **kwargs)
    with pytest.raises(ValueError, match=message):  # a group's override is checked too
        Shampoo([{"params": [p], **kwargs}])


def test_an_integer_tensor_is_refused():
    with pytest.raises(ValueError, match="real floating-point tensors"):
        Shampoo([torch.zeros(2, 2, dtype=torch.long)])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_skips_the_step_and_leaves_parameters_and_state_unchanged(bad):
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    optimizer = Shampoo(model.parameters(), lr=1e-2)
    X, y = torch.randn(8, 4), torch.randint(0, 2, (8,))

    def backward():
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()

    backward()
    optimizer.step()
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(optimizer.state_dict()["state"])
    backward()
    model[0].weight.grad[1, 2] = bad
    skipped = r"Shampoo: step skipped: the gradient is not finite \(parameters and state unchanged\)"
    with pytest.warns(curvkit.CurvkitWarning, match=skipped):
        optimizer.step()
    assert optimizer.skipped_steps == 1 and optimizer.steps == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    for index, entries in state.items():
        for key, value in entries.items():
            assert torch.equal(
                torch.as_tensor(value), torch.as_tensor(optimizer.state_dict()["state"][index][key])
            )
    backward()
    optimizer.step()
    assert optimizer.steps == 2 and all(p.isfinite().all() for p in model.parameters())
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), params))


def test_decoupled_weight_decay_a_zero_gradient_and_parameters_without_gradient():
    p = nn.Parameter(torch.ones(3, 2, dtype=DT))
    idle = nn.Parameter(torch.ones(2, dtype=DT))
    optimizer = Shampoo([p, idle], lr=0.1, weight_decay=0.5, decoupled_weight_decay=True)
    p.grad = torch.zeros_like(p)  # Shampoo's and AdaGrad's directions are 0, not NaN
    loss = optimizer.step(lambda: torch.tensor(2.0))
    assert loss.item() == 2.0
    torch.testing.assert_close(p.detach(), torch.full((3, 2), 1 - 0.1 * 0.5, dtype=DT), rtol=0, atol=1e-15)
    assert torch.equal(idle.detach(), torch.ones(2, dtype=DT)) and idle not in optimizer.state
    # coupled (L2) weight decay is part of the gradient: before preconditioning, SGD's step on it
    optimizer = Shampoo(
        [p], lr=0.1, weight_decay=0.5, grafting="sgd", betas=(0.0, 0.9), start_preconditioning_step=2
    )
    before, g = p.detach().clone(), torch.randn(3, 2, dtype=DT)
    p.grad = g
    optimizer.step()
    torch.testing.assert_close(p.detach() - before, -0.1 * (g + 0.5 * before), rtol=0, atol=1e-15)


def test_the_batched_roots_are_each_factors_inverse_root():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4)).to(DT)  # factors of sizes 4 and 5
    optimizer = Shampoo(model.parameters(), lr=1e-2, betas=(0.9, 0.99), epsilon=1e-8)
    X, y = torch.randn(16, 5, dtype=DT), torch.randint(0, 4, (16,))
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        optimizer.step()
    correction = 1 - 0.99**3
    for p in model.parameters():
        state = optimizer.state[p]
        for i in range(p.ndim):
            expected = inverse_root(state[f"statistic_{i}"] / correction, 2 * p.ndim, 1e-8)
            torch.testing.assert_close(state[f"preconditioner_{i}"], expected, rtol=1e-10, atol=1e-12)


def test_a_failed_eigendecomposition_keeps_the_previous_root_or_takes_the_diagonal_one(monkeypatch):
    torch.manual_seed(4)
    w = nn.Parameter(torch.randn(3, 2, dtype=DT))
    optimizer = Shampoo([w], lr=1e-2, betas=(0.0, 1.0), epsilon=1e-6)
    eigh = torch.linalg.eigh

    def failing(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: the algorithm failed to converge")

    def step():
        w.grad = torch.randn(3, 2, dtype=DT)
        optimizer.step()

    monkeypatch.setattr(torch.linalg, "eigh", failing)
    with pytest.warns(curvkit.CurvkitWarning, match="its inverse root is that of its diagonal"):
        step()
    statistic = optimizer.state[w]["statistic_0"]
    diagonal = torch.diag((torch.diagonal(statistic) + 1e-6) ** -0.25)
    torch.testing.assert_close(optimizer.state[w]["preconditioner_0"], diagonal, rtol=1e-12, atol=0)
    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    step()
    kept = optimizer.state[w]["preconditioner_0"].clone()
    monkeypatch.setattr(torch.linalg, "eigh", failing)
    with pytest.warns(curvkit.CurvkitWarning, match="its inverse root is the previous one"):
        step()
    assert torch.equal(optimizer.state[w]["preconditioner_0"], kept) and optimizer.steps == 3


def test_float32_preconditioners_are_computed_in_float32_and_agree_with_float64():
    torch.manual_seed(5)
    G = torch.randn(6, 4)
    options = {"lr": 1.0, "betas": (0.0, 0.999), "epsilon": 1e-3, "grafting": "none"}
    delta64, optimizer64 = one_step(G, **options)
    delta32, optimizer32 = one_step(G, **options, preconditioner_dtype=torch.float32)
    (state32,) = optimizer32.state.values()
    assert all(state32[f"preconditioner_{i}"].dtype == torch.float32 for i in range(2))
    (state64,) = optimizer64.state.values()
    assert all(state64[f"preconditioner_{i}"].dtype == DT for i in range(2))
    torch.testing.assert_close(delta32, delta64, rtol=1e-5, atol=1e-6)
