"""The NewtonSummary optimizer (Wolinski 2023): the reference semantics, state, and bad input.

Every step is checked against an independent recomputation: momentum buffers by hand,
the summary by :func:`curvkit.newton_summary` on a Problem of the same batch (itself
checked against dense truth in ``test_newton_summary.py``) and the rates by
:func:`curvkit.cubic.cubic_step`.
"""

from __future__ import annotations

import copy
import inspect
import io
from pathlib import Path

import pytest
import torch
from torch import nn

import curvkit
from curvkit import partition
from curvkit.cubic import cubic_step
from curvkit.newton import subset_directions
from curvkit.third_order import third_directional_derivatives

DT = torch.float64
DOCS = Path(__file__).resolve().parents[1] / "docs" / "newton.md"


def tiny(norm: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(3, 5), nn.Tanh()] + ([nn.LayerNorm(5)] if norm else []) + [nn.Linear(5, 3)]
    return nn.Sequential(*layers).to(DT)


def batches(n_batches: int = 3, size: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 3, generator=g, dtype=DT), torch.randint(0, 3, (size,), generator=g))
        for _ in range(n_batches)
    ]


def loss_fn(output, target):
    return nn.functional.cross_entropy(output, target)


def train(model, optimizer, data, steps, start=0):
    for k in range(start, start + steps):
        x, target = data[k % len(data)]
        optimizer.zero_grad()
        loss_fn(model(x), target).backward()
        optimizer.step()


def make(model, hg, **options):
    groups, _ = partition.canonical(model)
    return curvkit.NewtonSummary(groups, lambda x, t: loss_fn(model(x), t), hg, **options)


def test_the_docs_example_runs_as_written_and_trains(python_blocks):
    """The seed README's minimal example, with grnewt replaced by curvkit (docs/newton.md)."""
    block = python_blocks(DOCS)[-1]
    assert "curvkit.NewtonSummary(" in block.source and "grnewt" not in block.source
    torch.manual_seed(0)
    scope: dict = {}
    exec(block.compile(), scope)  # noqa: S102 - our own docs
    model, X, y, optimizer = scope["model"], scope["X"], scope["y"], scope["optimizer"]
    with torch.no_grad():
        final = nn.functional.cross_entropy(model(X), y).item()
    assert final < 0.3  # from 2.3; 0.093 on this machine
    assert optimizer.summaries == 23 and optimizer.skipped_steps == 0
    rates = [group["lr"] for group in optimizer.param_groups]
    assert all(rate >= 0 for rate in rates) and any(rate > 0 for rate in rates)
    assert optimizer.last_summary.cubic.case in ("regularised", "hard", "newton")


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
def test_each_step_follows_the_reference_semantics(norm, nesterov):
    """Momentum buffers, summaries on the next hg batch every period_hg steps, the cubic (or
    Newton) rates, negatives removed, averaged with mom_lrs (not at the first), times damping."""
    model, data = tiny(norm), batches()
    hg = batches(2, size=16, seed=7)
    options = dict(
        damping=0.3, period_hg=2, mom_lrs=0.5, remove_negative=True, momentum=0.9, momentum_damp=0.2
    )
    if nesterov:
        options["dct_nesterov"] = {"use": True, "damping_int": 10.0}
    mirror = copy.deepcopy(model)
    optimizer = make(model, hg, **options)
    params = list(mirror.parameters())
    buffers: list[torch.Tensor] = []
    lrs = [0.0] * len(params)
    for k in range(5):
        x, target = data[k % len(data)]
        grads = torch.autograd.grad(loss_fn(mirror(x), target), params)
        buffers = (
            [g.clone() for g in grads] if k == 0 else [0.9 * b + 0.8 * g for b, g in zip(buffers, grads)]
        )
        if k % 2 == 0:
            hx, ht = hg[(k // 2) % 2]
            problem = curvkit.Problem(mirror, "cross_entropy", (hx, ht))
            u = problem.layout.flatten(buffers)
            names = [[name] for name, _ in mirror.named_parameters()]
            summary = curvkit.newton_summary(problem, names, u)
            step = cubic_step(
                summary.g_bar, summary.H_bar, summary.d, 10.0 if nesterov else 0.0, on_unbounded="stationary"
            )
            r = 0.5 if k > 0 else 0.0
            lrs = [r * lr + (1 - r) * 0.3 * max(0.0, eta) for lr, eta in zip(lrs, step.eta.tolist())]
        with torch.no_grad():
            for p, b, lr in zip(params, buffers, lrs):
                p.sub_(lr * b)
        train(model, optimizer, data, 1, start=k)
        assert [group["lr"] for group in optimizer.param_groups] == pytest.approx(lrs, rel=1e-9, abs=1e-12)
        for p, q in zip(model.parameters(), params):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    assert optimizer.summaries == 3 and optimizer.last_summary.step == 4
    assert any(lr > 0 for lr in lrs)


def test_the_summary_third_derivatives_are_right_through_layernorm():
    """The optimizer's D3 (triple backward under CompositeNorms) equals finite differences of
    Hessian-vector products, which never differentiate thrice."""
    model, data = tiny(norm=True), batches()
    hx, ht = batches(1, size=16, seed=3)[0]
    optimizer = make(model, [(hx, ht)], period_hg=1)
    problem = curvkit.Problem(copy.deepcopy(model), "cross_entropy", (hx, ht))  # before the step
    train(model, optimizer, data, 1)
    u = problem.layout.flatten([optimizer.state[p]["momentum_buffer"] for p in model.parameters()])
    V = subset_directions(problem, [[n] for n, _ in model.named_parameters()], u)
    truth = third_directional_derivatives(problem, V, "finite-difference")
    torch.testing.assert_close(optimizer.last_summary.summary.D3, truth, rtol=1e-6, atol=1e-9)
    assert truth.abs().max() > 1e-3


def test_one_subset_without_regularisation_gives_g_u_over_u_h_u():
    model, data = tiny(), batches()
    hx, ht = batches(1, size=16, seed=3)[0]
    optimizer = curvkit.NewtonSummary(model.parameters(), lambda x, t: loss_fn(model(x), t), [(hx, ht)])
    x, target = data[0]
    optimizer.zero_grad()
    loss_fn(model(x), target).backward()
    u = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    problem = curvkit.Problem(copy.deepcopy(model), "cross_entropy", (hx, ht))
    H = curvkit.curvature("hessian", problem).to_dense()
    g = problem.loss_and_gradient()[1]
    optimizer.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx((g @ u / (u @ H @ u)).item(), rel=1e-10)


def test_state_dict_round_trip_resumes_bit_identically(tmp_path):
    """Stopped after 4 steps (mid-way through hg's second pass), saved with torch.save, loaded
    with weights_only=True into a fresh optimizer: 5 more steps equal the uninterrupted run."""
    data, hg = batches(), batches(3, size=16, seed=7)
    options = dict(
        damping=0.5, dct_nesterov={"use": True, "damping_int": 5.0}, period_hg=1, mom_lrs=0.3, momentum=0.8
    )
    model = tiny()
    optimizer = make(model, hg, **options)
    train(model, optimizer, data, 9)

    resumed = tiny()
    first = make(resumed, hg, **options)
    train(resumed, first, data, 4)
    buffer = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "optimizer": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = tiny(seed=5)
    fresh.load_state_dict(saved["model"])
    second = make(fresh, hg, **options)
    second.load_state_dict(saved["optimizer"])
    train(fresh, second, data, 5, start=4)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    assert second.summaries == optimizer.summaries == 9
    assert [g["lr"] for g in second.param_groups] == [g["lr"] for g in optimizer.param_groups]
    with pytest.raises(ValueError, match="not a NewtonSummary state_dict"):
        second.load_state_dict(torch.optim.SGD(fresh.parameters(), lr=0.1).state_dict())


def test_a_closure_is_evaluated_and_its_loss_returned():
    model, data = tiny(), batches()
    optimizer = make(model, batches(1, seed=4))
    x, target = data[0]

    def closure():
        optimizer.zero_grad()
        loss = loss_fn(model(x), target)
        loss.backward()
        return loss

    before = closure().item()
    assert optimizer.step(closure).item() == pytest.approx(before)
    assert optimizer.summaries == 1


def test_a_non_finite_gradient_skips_the_step_with_a_warning():
    model, data = tiny(), batches()
    optimizer = make(model, batches(1, seed=4))
    train(model, optimizer, data, 1)
    before = [p.detach().clone() for p in model.parameters()]
    buffers = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    x, target = data[1]
    optimizer.zero_grad()
    loss_fn(model(x), target).backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    with pytest.warns(
        curvkit.CurvkitWarning, match="NewtonSummary: step skipped: the gradient is not finite"
    ):
        optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(
        torch.equal(optimizer.state[p]["momentum_buffer"], b) for p, b in zip(model.parameters(), buffers)
    )
    assert optimizer.skipped_steps == 1


@pytest.mark.parametrize(("curvature", "dtype"), [(1e-39, torch.float32), (1e-5, torch.float16)])
def test_a_learning_rate_that_overflows_skips_the_step_and_keeps_everything(curvature, dtype):
    """A nearly flat direction gives a rate ``g / h`` that the parameters' dtype cannot hold: the step
    is skipped, parameters, momentum and rates unchanged, and the next step tries a new summary."""
    x = nn.Parameter(torch.tensor([1.0, 0.0], dtype=dtype))
    loss = lambda inputs, target: 0.5 * curvature * x[0].float() ** 2 + 4.0 * x[0].float()
    optimizer = curvkit.NewtonSummary([x], loss, [(torch.zeros(1), torch.zeros(1))])
    loss(None, None).backward()
    with pytest.warns(curvkit.CurvkitWarning, match="step skipped: the update is not finite"):
        optimizer.step()
    assert torch.equal(x.detach(), torch.tensor([1.0, 0.0], dtype=dtype))
    assert optimizer.state[x] == {} and optimizer.param_groups[0]["lr"] == 0.0
    assert optimizer.skipped_steps == 1 and optimizer.summaries == 1
    assert optimizer.last_summary.learning_rates == (0.0,)
    assert optimizer.last_summary.kept == "the step with these learning rates is not finite"
    assert optimizer.last_summary.cubic.eta.item() > torch.finfo(dtype).max  # what the solve gave
    with pytest.warns(curvkit.CurvkitWarning, match="step skipped"):
        optimizer.step()  # still due: the summary is taken again
    assert optimizer.summaries == 2 and optimizer.skipped_steps == 2


def test_a_step_whose_parameters_would_overflow_is_skipped():
    """The rate ``1 / h`` (16,529) and ``lr u`` (65,116) fit float16, but ``p - lr u`` (-66,116)
    does not: what is checked is what the parameters become, not the update alone."""
    h = 6.05e-5
    x = nn.Parameter(torch.tensor([-1000.0, 0.0], dtype=torch.float16))
    loss = lambda inputs, target: 0.5 * h * x[0].float() ** 2 + 4.0 * x[0].float()
    optimizer = curvkit.NewtonSummary([x], loss, [(torch.zeros(1), torch.zeros(1))])
    loss(None, None).backward()
    largest = torch.finfo(torch.float16).max
    assert (1 / h) * x.grad[0].item() < largest < 1000 + (1 / h) * x.grad[0].item()
    with pytest.warns(curvkit.CurvkitWarning, match="step skipped: the update is not finite"):
        optimizer.step()
    assert torch.equal(x.detach(), torch.tensor([-1000.0, 0.0], dtype=torch.float16))


def test_a_non_finite_summary_keeps_the_rates_with_a_warning():
    model, data = tiny(), batches()
    hx, ht = batches(1, size=16, seed=3)[0]
    bad = hx.clone()
    bad[0, 0] = float("nan")
    optimizer = make(model, [(hx, ht), (bad, ht)], period_hg=1)
    train(model, optimizer, data, 1)
    rates = [g["lr"] for g in optimizer.param_groups]
    with pytest.warns(
        curvkit.CurvkitWarning,
        match=r"learning rates kept at step 1: the summary's g_bar and H_bar and D3 not finite",
    ):
        train(model, optimizer, data, 1, start=1)
    assert [g["lr"] for g in optimizer.param_groups] == rates
    assert optimizer.last_summary.kept and optimizer.last_summary.cubic is None
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_an_indefinite_summary_without_regularisation_takes_the_stationary_point():
    """The reference package's H_bar^-1 g_bar, recorded as case "unbounded"; with
    remove_negative its negative rates are zero."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # saturated tanh: an indefinite Hessian
    data = batches()
    cases = set()
    for seed in range(6):
        trial = copy.deepcopy(model)
        optimizer = make(trial, batches(1, size=16, seed=seed), remove_negative=True)
        train(trial, optimizer, data, 1)
        last = optimizer.last_summary
        cases.add(last.cubic.case)
        if last.cubic.case == "unbounded":
            assert torch.linalg.eigvalsh(last.summary.H_bar).min() < 0
            assert torch.allclose(
                last.summary.H_bar @ last.cubic.eta, last.summary.g_bar, rtol=1e-8, atol=1e-10
            )
            assert all(rate >= 0 for rate in last.learning_rates)
    assert "unbounded" in cases


def test_bad_partitions_are_refused_in_one_line():
    model = tiny()
    full_loss = lambda x, t: loss_fn(model(x), t)  # noqa: E731
    first, second = model[0], model[2]
    hg = batches(1)
    with pytest.raises(ValueError, match="subset 1 of the partition is empty"):
        curvkit.NewtonSummary([{"params": list(first.parameters())}, {"params": []}], full_loss, hg)
    with pytest.raises(ValueError, match=r"shape \(5, 3\) is in subsets 0 and 1"):
        curvkit.NewtonSummary(
            [{"params": [first.weight]}, {"params": [first.weight, first.bias]}], full_loss, hg
        )
    with pytest.raises(ValueError, match="appears twice in subset 0"):
        curvkit.NewtonSummary([{"params": [first.weight, first.weight]}], full_loss, hg)
    missing = curvkit.NewtonSummary(
        [{"params": list(first.parameters())}, {"params": [second.weight]}], full_loss, hg
    )
    x, target = batches()[0]
    missing.zero_grad()
    full_loss(x, target).backward()
    with pytest.raises(
        ValueError, match=r"depends on 1 parameter tensor\(s\) outside the partition \(shapes \(3,\)\)"
    ):
        missing.step()


def test_bad_loaders_and_losses_are_refused_in_one_line():
    model = tiny()
    x, target = batches()[0]

    def step(optimizer):
        optimizer.zero_grad()
        loss_fn(model(x), target).backward()
        optimizer.step()

    with pytest.raises(curvkit.DataError, match="hg_loader yielded no batch on its pass 1"):
        step(make(model, []))
    once = make(model, (b for b in batches(1)))
    step(once)
    with pytest.raises(curvkit.DataError, match="no batch on its pass 2 .a generator can be read once"):
        step(once)
    with pytest.raises(curvkit.DataError, match=r"must yield \(x, target\) pairs, got Tensor"):
        step(make(model, [torch.zeros(3)]))
    with pytest.raises(ValueError, match="hg_loader must be an iterable"):
        make(model, 3)
    groups, _ = partition.canonical(model)
    with pytest.raises(ValueError, match=r"must return a scalar tensor .* got shape \(8, 3\)"):
        step(curvkit.NewtonSummary(groups, lambda a, t: model(a), batches(1)))
    with pytest.raises(ValueError, match="without a graph"):
        step(curvkit.NewtonSummary(groups, lambda a, t: loss_fn(model(a), t).detach(), batches(1)))
    with pytest.raises(ValueError, match="full_loss must be a callable"):
        curvkit.NewtonSummary(groups, 1.0, batches(1))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(damping=0.0), "damping must be a finite number > 0"),
        (dict(damping=float("nan")), "damping must be a finite number > 0"),
        (dict(momentum=1.5), r"momentum must be a number in \[0, 1\]"),
        (dict(momentum_damp=-0.1), r"momentum_damp must be a number in \[0, 1\]"),
        (dict(mom_lrs=1.0), r"mom_lrs must be a number in \[0, 1\)"),
        (dict(period_hg=0), "period_hg must be an integer >= 1"),
        (dict(period_hg=2.5), "period_hg must be an integer >= 1"),
        (dict(remove_negative="yes"), "remove_negative must be True or False"),
        (dict(dct_nesterov={"use": True}), r"dct_nesterov\['damping_int'\] is needed"),
        (dict(dct_nesterov={"use": True, "damping_int": -1.0}), "must be a finite number >= 0"),
        (dict(dct_nesterov={"use": 1, "damping_int": 1.0}), r"dct_nesterov\['use'\] must be True or False"),
        (dict(dct_nesterov={"use": True, "damping": 1.0}), r"unknown key\(s\) \['damping'\]"),
        (dict(dct_nesterov=[1]), "dct_nesterov must be a dict"),
    ],
)
def test_invalid_hyper_parameters_raise(options, message):
    with pytest.raises(ValueError, match=message):
        make(tiny(), batches(1), **options)


def test_a_group_can_override_the_hyper_parameters():
    model = tiny()
    first, second = model[0], model[2]
    optimizer = curvkit.NewtonSummary(
        [{"params": list(first.parameters()), "damping": 0.5}, {"params": list(second.parameters())}],
        lambda x, t: loss_fn(model(x), t),
        batches(1),
        damping=0.1,
    )
    assert [g["damping"] for g in optimizer.param_groups] == [0.5, 0.1]
    with pytest.raises(ValueError, match="mom_lrs must be"):
        curvkit.NewtonSummary(
            [{"params": list(first.parameters()), "mom_lrs": 2.0}], lambda x, t: 0, batches(1)
        )


def test_a_parameter_without_gradient_is_left_alone_as_in_sgd():
    """Its momentum is neither updated nor applied and it is no part of the summary's direction
    (a zero subset: a flat direction of the model, rate 0)."""
    model, data = tiny(), batches()
    optimizer = make(model, batches(1, size=16, seed=3), dct_nesterov={"use": True, "damping_int": 10.0})
    train(model, optimizer, data, 1)
    frozen = model[2].bias
    before, buffer = frozen.detach().clone(), optimizer.state[frozen]["momentum_buffer"].clone()
    x, target = data[1]
    optimizer.zero_grad()
    loss_fn(model(x), target).backward()
    frozen.grad = None
    optimizer.step()
    assert torch.equal(frozen, before) and torch.equal(optimizer.state[frozen]["momentum_buffer"], buffer)
    summary = optimizer.last_summary
    assert summary.summary.g_bar[3] == 0 and summary.summary.D3[3] == 0 and summary.cubic.eta[3] == 0
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_a_group_setting_a_hyper_parameter_of_the_whole_optimizer_is_refused():
    model = tiny()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    signature = inspect.signature(curvkit.NewtonSummary.__init__).parameters.values()
    settings = {p.name for p in signature if p.kind in named} - {"self", "params"}
    optimizer = make(model, batches(1))
    assert settings - set(optimizer.defaults) == set(optimizer.GLOBAL)  # none accepted and ignored
    for setting in optimizer.GLOBAL:
        groups, _ = partition.canonical(tiny())
        groups[0][setting] = 3
        with pytest.raises(ValueError, match=f"{setting} applies to the whole optimizer"):
            curvkit.NewtonSummary(groups, lambda x, t: loss_fn(model(x), t), batches(1))
