"""The optimizers' shared base and the per-batch problem path (Problem.on_batch)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvkit
from curvkit.optim.base import CurvatureOptimizer, check_choice, check_fraction, check_integer, check_positive

DT = torch.float64


def model_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    return model, torch.randn(6, 3, dtype=DT), torch.randint(0, 2, (6,))


def test_a_batch_problem_has_the_curvature_of_its_batch_without_copies_or_probes():
    model, X, y = model_and_batch()
    template = curvkit.Problem(model, "cross_entropy", (torch.zeros(2, 3, dtype=DT), torch.zeros(2).long()))
    light = template.on_batch(X, y)
    full = curvkit.Problem(model, "cross_entropy", (X, y))
    H_light = curvkit.curvature("hessian", light).to_dense()
    torch.testing.assert_close(H_light, curvkit.curvature("hessian", full).to_dense(), rtol=1e-12, atol=1e-14)
    G = curvkit.curvature("ggn", light).to_dense()
    torch.testing.assert_close(G, curvkit.curvature("ggn", full).to_dense(), rtol=1e-12, atol=1e-14)
    snapshot = light.current_snapshot()
    assert snapshot is light.current_snapshot() and not hasattr(snapshot, "values")  # nothing copied
    assert light.check_deterministic is False and light.track_state is False
    assert full.current_snapshot().values  # the analysis path copies the state


def test_the_optimizer_base_builds_the_batch_problem_of_its_parameters():
    model, X, y = model_and_batch()
    optimizer = CurvatureOptimizer(model[2].parameters(), {"lr": 0.1}, model=model, loss_fn="cross_entropy")
    problem = optimizer.batch_problem(X, y)
    assert problem.param_names == ("2.weight", "2.bias") and problem.num_samples() == 6
    with pytest.raises(ValueError, match="needs model= and loss_fn="):
        CurvatureOptimizer(model.parameters(), {"lr": 0.1}).batch_problem(X, y)
    stranger = CurvatureOptimizer([nn.Parameter(torch.zeros(3))], {"lr": 0.1}, model=model, loss_fn="mse")
    with pytest.raises(ValueError, match=r"1 optimized tensor\(s\) \(shapes \[\(3,\)\]\) are not parameters"):
        stranger.batch_problem(X, y)
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        CurvatureOptimizer(model.parameters(), {}, model="net")


def test_non_finite_updates_are_skipped_with_a_warning_and_counted_in_the_state():
    model, _, _ = model_and_batch()
    optimizer = CurvatureOptimizer(model.parameters(), {"lr": 0.1})
    p = next(model.parameters())
    before = p.detach().clone()
    assert optimizer.apply_updates([(p, torch.ones_like(p))])
    assert torch.equal(p, before + 1)
    with pytest.warns(
        curvkit.CurvkitWarning, match="CurvatureOptimizer: step skipped: the step is not finite"
    ):
        assert not optimizer.apply_updates([(p, torch.full_like(p, float("nan")))], what="step")
    assert torch.equal(p, before + 1) and optimizer.skipped_steps == 1
    state = optimizer.state_dict()
    fresh = CurvatureOptimizer(model.parameters(), {"lr": 0.1})
    fresh.load_state_dict(state)
    assert fresh.skipped_steps == 1
    with pytest.raises(ValueError, match="not a CurvatureOptimizer state_dict"):
        fresh.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())


def test_the_checks_name_the_hyper_parameter_and_its_range():
    assert check_positive("lr", 1) == 1.0 and check_positive("damping", 0, zero=True) == 0.0
    with pytest.raises(ValueError, match=r"lr must be a finite number > 0, got 0"):
        check_positive("lr", 0)
    with pytest.raises(ValueError, match=r"lr must be a finite number > 0, got True"):
        check_positive("lr", True)
    with pytest.raises(ValueError, match=r"beta must be a number in \[0, 1\), got 1"):
        check_fraction("beta", 1, below_one=True)
    with pytest.raises(ValueError, match="every must be an integer >= 1, got 0"):
        check_integer("every", 0)
    with pytest.raises(ValueError, match=r"mode must be one of \['a', 'b'\], got 'c'"):
        check_choice("mode", "c", ("a", "b"))
