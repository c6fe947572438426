"""Layer rules (``curvkit.layers``): diagonals from layer inputs and output gradients, against dense truth.

Every case is checked for the three diagonals that use the rules (GGN, exact
Fisher, empirical Fisher) against the dense references of ``curvkit.testing``,
together with which parameters the rules covered: the rules must take the
layers they can, and refuse (to the generic per-sample path) those they cannot.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvkit
from curvkit.layers import LayerDiagonals
from curvkit.testing import LayerCalledTwice, dense_empirical_fisher_reference, dense_ggn_reference

DT = torch.float64
TIGHT = 1e-12


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / max(b.norm().item(), 1e-300)).item()


class Sequence(nn.Module):
    """Linear layers applied at every position of a sequence, then pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2, bias=False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).mean(1)


class SharedUse(nn.Module):
    """``a.weight`` also used outside its layer: its rule's sums disagree with autograd."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h @ self.a.weight)


class Tied(nn.Module):
    """Two layers sharing one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
        self.b.weight = self.a.weight
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _conv(**options) -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 6, 3, **options), nn.ReLU(inplace=True), nn.Flatten(), nn.LazyLinear(3))


CASES = {
    # name: (model, inputs, targets, loss, the layers the rules must cover)
    "mlp-inplace-relu": (
        lambda: nn.Sequential(nn.Linear(3, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)),
        (7, 3),
        "cross_entropy",
        {"0.weight", "0.bias", "2.weight", "2.bias"},
    ),
    "sequence-linear": (Sequence, (7, 5, 3), "cross_entropy", {"a.weight", "a.bias", "b.weight"}),
    "conv-stride-padding-dilation": (
        lambda: _conv(stride=2, padding=2, dilation=2),
        (5, 4, 7, 7),
        "cross_entropy",
        {"0.weight", "0.bias", "3.weight", "3.bias"},
    ),
    "conv-groups-no-bias": (
        lambda: _conv(groups=2, bias=False, padding=1),
        (5, 4, 5, 5),
        "mse",
        {"0.weight", "3.weight", "3.bias"},
    ),
    "conv-reflect-padding": (
        lambda: _conv(padding=1, padding_mode="reflect"),
        (5, 4, 5, 5),
        "mse",
        {"3.weight", "3.bias"},
    ),
    "batchnorm-eval": (
        lambda: nn.Sequential(
            nn.Conv2d(4, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(27, 3), nn.BatchNorm1d(3)
        ),
        (6, 4, 5, 5),
        "cross_entropy",
        {"0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias", "4.weight", "4.bias"},
    ),
    "layernorm-sequence": (
        lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Flatten(), nn.Linear(20, 3)),
        (6, 5, 3),
        "cross_entropy",
        {"0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias"},
    ),
    # the bias is used in its layer only: covered; the weight is not
    "weight-used-outside-its-layer": (SharedUse, (7, 3), "cross_entropy", {"a.bias", "b.weight", "b.bias"}),
    "layer-called-twice": (LayerCalledTwice, (7, 3), "cross_entropy", {"b.weight", "b.bias"}),
    "tied-weights": (Tied, (7, 3), "cross_entropy", {"a.bias", "b.bias", "head.weight", "head.bias"}),
}


def covered(op: curvkit.CurvatureOperator) -> set[str]:
    return {f"{key}.{local}" for key, (_, names) in op.layers.covered.items() for local in names}


def _problem(name: str, **kwargs) -> curvkit.Problem:
    make_model, shape, loss, _ = CASES[name]
    torch.manual_seed(0)
    model = make_model().double()
    X = torch.randn(*shape, dtype=DT)
    model(X)  # materialise lazy layers
    if name == "batchnorm-eval":  # running statistics away from the defaults
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -0.5, 0.5)
    if loss == "mse":
        y = torch.randn(model(X).shape, dtype=DT)
    else:
        y = torch.randint(0, model(X).shape[-1], (shape[0],))
    return curvkit.Problem(model, loss, (X, y), batch_size=4, **kwargs)


@pytest.mark.parametrize("name", list(CASES))
def test_diagonals_by_layer_rules_match_dense_truth(name):
    problem = _problem(name)
    G = curvkit.curvature("ggn", problem)
    assert rel(G.diagonal(), dense_ggn_reference(problem).diagonal()) < TIGHT
    assert covered(G) == CASES[name][3]
    F = curvkit.curvature("fisher", problem, mode="exact")
    assert rel(F.diagonal(), dense_ggn_reference(problem).diagonal()) < TIGHT  # canonical links
    E = curvkit.curvature("empirical-fisher", problem)
    assert rel(E.diagonal(), dense_empirical_fisher_reference(problem).diagonal()) < TIGHT
    assert covered(E) == CASES[name][3]


def test_only_selected_parameters_are_covered():
    restricted = _problem("mlp-inplace-relu", params=["0.weight", "2.bias"])
    G = curvkit.curvature("ggn", restricted)
    assert rel(G.diagonal(), dense_ggn_reference(restricted).diagonal()) < TIGHT
    model = restricted.model
    assert G.layers.covered == {"0": (model[0], {"weight": 0}), "2": (model[2], {"bias": 1})}


def test_rules_take_no_per_sample_gradients():
    """The rules' sums are the squared per-sample pullbacks, whatever the cotangents."""
    problem = _problem("mlp-inplace-relu")
    layers = LayerDiagonals(problem)
    cotangents = torch.randn(7, 2, 3, dtype=DT)
    torch.manual_seed(0)
    X = torch.randn(7, 3, dtype=DT)
    sums, _, _ = layers([p.detach() for p in problem.params], X, lambda outputs: cotangents)
    assert sorted(sums) == [0, 1, 2, 3]
    # truth: per sample, per cotangent, the squared pullback
    truth = [torch.zeros_like(p) for p in problem.params]
    for n in range(7):
        for q in range(2):
            leaves = [p.detach().requires_grad_(True) for p in problem.params]
            out = problem.forward(leaves, X[n : n + 1])
            grads = torch.autograd.grad(out, leaves, cotangents[n : n + 1, q])
            truth = [t + g.square() for t, g in zip(truth, grads)]
    for i, t in enumerate(truth):
        assert rel(sums[i], t) < TIGHT
