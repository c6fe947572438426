"""``curvkit.resolve_direction``: one reading of ``"gradient"``, ``"random"`` or a ``[P]`` tensor."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvkit

DT = torch.float64


def problem(dtype: torch.dtype = DT) -> curvkit.Problem:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(dtype)
    return curvkit.Problem(model, "mse", (torch.randn(8, 3, dtype=dtype), torch.randn(8, 1, dtype=dtype)))


def test_named_directions_and_tensors():
    assert curvkit.DIRECTIONS == ("gradient", "random")
    p = problem()
    torch.testing.assert_close(
        curvkit.resolve_direction(p, "gradient"), p.loss_and_gradient()[1], rtol=0, atol=0
    )
    # random: float64 on the CPU from the seed, then cast, so every dtype draws the same numbers
    expected = torch.randn(p.dim, generator=torch.Generator().manual_seed(3), dtype=DT)
    torch.testing.assert_close(curvkit.resolve_direction(p, "random", 3), expected, rtol=0, atol=0)
    single = curvkit.resolve_direction(problem(torch.float32), "random", 3)
    assert single.dtype == torch.float32 and torch.equal(single, expected.float())
    fresh = [curvkit.resolve_direction(p, "random", None) for _ in range(2)]
    assert not torch.equal(*fresh)
    # a tensor is cast and copied
    given = torch.ones(p.dim, dtype=torch.float32)
    u = curvkit.resolve_direction(p, given)
    given.zero_()
    assert u.dtype == DT and bool((u == 1).all())


def test_a_given_gradient_is_used_and_an_operator_is_a_source():
    p = problem()
    g = torch.arange(p.dim, dtype=DT)
    torch.testing.assert_close(curvkit.resolve_direction(p, "gradient", gradient=g), g, rtol=0, atol=0)
    with pytest.raises(curvkit.ShapeMismatchError, match="the gradient has shape"):
        curvkit.resolve_direction(p, "gradient", gradient=g[:3])
    H = curvkit.curvature("hessian", p)
    torch.testing.assert_close(
        curvkit.resolve_direction(H, "gradient"), p.loss_and_gradient()[1], rtol=0, atol=0
    )
    dense = curvkit.DenseOperator(torch.eye(3, dtype=torch.float32))
    assert curvkit.resolve_direction(dense, "random").dtype == torch.float32
    with pytest.raises(curvkit.CurvkitError, match="'gradient' needs a data-backed operator"):
        curvkit.resolve_direction(dense, "gradient", what="vector")


def test_the_callers_read_directions_alike():
    """ihvp_accuracy, newton_summary and the d3 estimator draw the same random vector and
    refuse a bad one with the same message (naming it their way)."""
    p = problem()
    u = curvkit.resolve_direction(p, "random", 5)
    T = curvkit.curvature("d3", p, direction="random", seed=5)
    torch.testing.assert_close(T.direction, u, rtol=0, atol=0)
    summary = curvkit.newton_summary(p, "trivial", "random", seed=5)
    given = curvkit.newton_summary(p, "trivial", u)
    torch.testing.assert_close(summary.g_bar, given.g_bar, rtol=0, atol=0)
    assert (summary.direction, given.direction) == ("random", "tensor")
    short = torch.ones(3, dtype=DT)
    for call, what in (
        (lambda: curvkit.ihvp_accuracy(curvkit.curvature("hessian", p), ["cg"], vector=short), "vector"),
        (lambda: curvkit.newton_summary(p, "trivial", short), "direction"),
        (lambda: curvkit.curvature("d3", p, direction=short), "d3 direction"),
    ):
        with pytest.raises(curvkit.ShapeMismatchError) as info:
            call()
        assert str(info.value) == (
            f"the {what} must be a floating-point [P] tensor with P = {p.dim}, got (3,) torch.float64"
        )
    for bad in ("sideways", [0.0] * p.dim, torch.full((p.dim,), float("inf"), dtype=DT)):
        with pytest.raises(curvkit.CurvkitError, match="unknown direction|got list|NaN or infinite"):
            curvkit.newton_summary(p, "trivial", bad)
