"""The ``kfac`` and ``ekfac`` estimators: exact where KFAC is exact, and their structure.

Truth is the dense GGN (or empirical Fisher) of ``curvkit.testing``, built from
first-order Jacobians; KFAC equals its layer blocks for one datum and for deep
linear networks under the squared error, in float64 to 1e-10.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from curvkit.plugins.kfac import KFACLayerRule, layerwise_ggn
from torch import nn

import curvkit
from curvkit.layers import LayerRule
from curvkit.testing import LayerCalledTwice, dense_empirical_fisher_reference, dense_ggn_reference

DT = torch.float64
TIGHT = 1e-10


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / max(b.norm().item(), 1e-300)).item()


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 2, groups=2, dilation=1),
        nn.Flatten(),
        nn.Linear(36, 3),
    )


def problem_of(make, N: int, loss: str = "cross_entropy", shape=(3,), batch_size: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    model = make().double()
    X = torch.randn(N, *shape, dtype=DT)
    out = model(X)
    y = torch.randn(out.shape, dtype=DT) if loss == "mse" else torch.randint(0, out.shape[-1], (N,))
    return curvkit.Problem(model, loss, (X, y), batch_size=batch_size)


def whole_input_conv(groups: int = 1) -> nn.Module:
    """Convolutions applied at one position each (no weight sharing): padded and strided, then grouped."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, stride=3), nn.Tanh(), nn.Conv2d(4, 6, 1, groups=groups), nn.Flatten()
    )


def grouped_conv() -> nn.Module:
    return whole_input_conv(groups=2)


@pytest.mark.parametrize(
    "make, shape, loss",
    [
        (mlp, (3,), "cross_entropy"),
        (mlp, (3,), "mse"),
        (whole_input_conv, (2, 3, 3), "cross_entropy"),
        (grouped_conv, (2, 3, 3), "mse"),
    ],
    ids=["mlp-ce", "mlp-mse", "conv-ce", "grouped-conv-mse"],
)
@pytest.mark.parametrize("name", ["kfac", "ekfac"])
def test_one_datum_gives_the_ggn_layer_blocks(make, shape, loss, name):
    problem = problem_of(make, 1, loss, shape)
    K = curvkit.curvature(name, problem)
    assert rel(K.to_dense(), layerwise_ggn(problem)) < TIGHT


def test_groups_are_blocks_of_their_own():
    """Per group one Kronecker block: exact when the output Hessian does not couple the groups (the squared
    error, above), not when it does (a softmax over all channels)."""
    problem = problem_of(grouped_conv, 1, "cross_entropy", (2, 3, 3))
    K, truth = curvkit.curvature("kfac", problem).to_dense(), layerwise_ggn(problem)
    first, grouped = problem.layout.indices(["0.weight", "0.bias"]), problem.layout.indices(["2.weight"])
    assert rel(K[first][:, first], truth[first][:, first]) < TIGHT
    assert rel(K[grouped][:, grouped], truth[grouped][:, grouped]) > 1e-2
    group_of = torch.arange(6).repeat_interleave(2) // 3  # 2.weight is [6, 2, 1, 1]: output channel // 3
    within = group_of[:, None] == group_of[None, :]
    assert rel(K[grouped][:, grouped][within], truth[grouped][:, grouped][within]) < TIGHT
    assert K[grouped][:, grouped][~within].abs().max() == 0


def test_weight_sharing_makes_kfac_inexact_even_for_one_datum_but_not_for_a_linear_head():
    problem = problem_of(cnn, 1, shape=(2, 8, 8))
    K, truth = curvkit.curvature("kfac", problem).to_dense(), layerwise_ggn(problem)
    head = problem.layout.indices(["4.weight", "4.bias"])
    assert rel(K[head][:, head], truth[head][:, head]) < TIGHT
    assert rel(K, truth) > 1e-2  # the convolutions share their weights over positions


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_deep_linear_network_with_squared_error_gives_the_ggn_layer_blocks(approx):
    make = lambda: nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2))  # noqa: E731
    problem = problem_of(make, 10, "mse", batch_size=3)
    truth = layerwise_ggn(problem)
    for name in ("kfac", "ekfac"):
        assert rel(curvkit.curvature(name, problem, approx=approx).to_dense(), truth) < TIGHT


def test_reduce_equals_expand_without_weight_sharing():
    problem = problem_of(mlp, 9)
    expand = curvkit.curvature("kfac", problem).to_dense()
    assert rel(curvkit.curvature("kfac", problem, approx="reduce").to_dense(), expand) < TIGHT
    conv = problem_of(cnn, 5, shape=(2, 8, 8))
    differs = curvkit.curvature("kfac", conv, approx="reduce").to_dense()
    assert rel(differs, curvkit.curvature("kfac", conv).to_dense()) > 1e-3  # convolutions share weights


def test_a_separate_bias_block_and_the_empirical_and_forward_only_types():
    problem = problem_of(mlp, 1)
    separate = curvkit.curvature("kfac", problem, fold_bias=False).to_dense()
    truth = layerwise_ggn(problem)
    for names in (["0.weight"], ["0.bias"], ["2.weight"], ["2.bias"]):
        idx = problem.layout.indices(names)
        assert rel(separate[idx][:, idx], truth[idx][:, idx]) < TIGHT
    w, b = problem.layout.indices(["0.weight"]), problem.layout.indices(["0.bias"])
    assert separate[w][:, b].abs().max() == 0  # no weight-bias block
    empirical = curvkit.curvature("kfac", problem, fisher_type="empirical").to_dense()
    ef = dense_empirical_fisher_reference(problem)
    for names in (["0.weight", "0.bias"], ["2.weight", "2.bias"]):  # one datum: g g^T = (b b^T) (x) (a a^T)
        idx = problem.layout.indices(names)
        assert rel(empirical[idx][:, idx], ef[idx][:, idx]) < TIGHT
    forward = curvkit.curvature("kfac", problem, fisher_type="forward-only")
    x = torch.cat(
        [next(iter(problem.batches()))[0][0], torch.ones(1, dtype=DT)]
    )  # one sample: A = [x; 1][x; 1]^T
    kron = torch.kron(
        torch.eye(4, dtype=DT), torch.outer(x, x)
    )  # B = I, entries (o, k): k < 3 weight, k = 3 bias
    order = torch.tensor([o * 4 + k for o in range(4) for k in range(3)] + [o * 4 + 3 for o in range(4)])
    assert rel(forward.restrict("0").to_dense(), kron[order][:, order]) < TIGHT


def test_monte_carlo_kfac_is_the_type_2_kfac_in_expectation():
    problem = problem_of(mlp, 1)
    exact = curvkit.curvature("kfac", problem).to_dense()
    mc = curvkit.curvature("kfac", problem, fisher_type="mc", mc_samples=4000, seed=0)
    assert mc.STOCHASTIC and rel(mc.to_dense(), exact) < 0.1
    again = curvkit.curvature("kfac", problem, fisher_type="mc", mc_samples=4000, seed=0)
    assert torch.equal(again.to_dense(), mc.to_dense())  # a fixed map per seed


def test_ekfac_eigenvalues_are_the_frobenius_optimal_diagonal():
    """EKFAC's eigenvectors are KFAC's; its eigenvalues are ``q^T G q`` for them (``diag(Q^T G Q)``)."""
    problem = problem_of(mlp, 12)
    E = curvkit.curvature("ekfac", problem)
    G = layerwise_ggn(problem)
    res = curvkit.eigenvalues(E, k=problem.dim, tol=1e-8)
    assert res.method == "exact"
    V = res.vectors
    assert rel(torch.einsum("pk,pq,qk->k", V, G, V), res.values) < TIGHT
    K = curvkit.curvature("kfac", problem)
    assert rel(K.to_dense(), G) > 1e-3  # KFAC itself is not exact here
    # EKFAC is at least as close to the GGN blocks as KFAC in Frobenius norm (it is the best in its basis)
    assert (E.to_dense() - G).norm() <= (K.to_dense() - G).norm()


def test_structure_equals_dense_linear_algebra_of_the_kfac_matrix():
    problem = problem_of(cnn, 6, shape=(2, 8, 8))
    K = curvkit.curvature("kfac", problem)
    dense = K.to_dense()
    eye = torch.eye(problem.dim, dtype=DT)
    assert rel(K.diagonal(), torch.diagonal(dense)) < TIGHT
    assert math.isclose(K.trace(), torch.trace(dense).item(), rel_tol=1e-10)
    assert rel(K.inverse(0.1).to_dense(), torch.linalg.inv(dense + 0.1 * eye)) < 1e-9
    assert math.isclose(K.logdet(0.1), torch.logdet(dense + 0.1 * eye).item(), rel_tol=1e-10)
    values = curvkit.eigenvalues(K, k=3, tol=1e-8)
    assert values.method == "exact" and values.matvecs == 3
    assert rel(values.values, torch.linalg.eigvalsh(dense).flip(0)[:3]) < 1e-10
    trace = curvkit.trace(K)
    assert trace.structured and trace.matvecs == 0
    scaled = (2.0 * K).damped(0.5)
    assert rel(scaled.inverse(0.1).to_dense(), torch.linalg.inv(2 * dense + 0.6 * eye)) < 1e-9
    assert curvkit.eigenvalues(scaled, k=2).method == "exact"
    passes = K.data_passes
    K @ torch.ones(problem.dim, dtype=DT)
    assert K.data_passes == passes  # products come from the factors


def test_batch_size_independence():
    for approx in ("expand", "reduce"):
        small = curvkit.curvature("kfac", problem_of(cnn, 7, shape=(2, 8, 8), batch_size=2), approx=approx)
        whole = curvkit.curvature("kfac", problem_of(cnn, 7, shape=(2, 8, 8), batch_size=7), approx=approx)
        assert rel(small.to_dense(), whole.to_dense()) < TIGHT


class Scale(nn.Module):
    """A layer type curvkit has no rule for: ``x W^T + b`` written by hand."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class ScaleRules:
    """A third-party plugin adding a block for ``Scale`` through the hook the kfac plugin declares."""

    @staticmethod
    def inputs(module: Scale, a: torch.Tensor) -> torch.Tensor:
        return a[:, None, :, None]  # [N, groups 1, in, positions 1]

    @staticmethod
    def grads(module: Scale, g: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        return g[:, :, None, :, None]  # [N, Q, groups 1, out, positions 1]

    @curvkit.hookimpl
    def curvkit_kfac_layer_rules(self):
        shape = lambda m: (1, m.weight.shape[0], m.weight.shape[1])  # noqa: E731
        rule = LayerRule(lambda m: True, self.inputs, self.grads, shape)
        return [KFACLayerRule("scale", Scale, rule)]


def test_unsupported_modules_policy_and_a_plugin_block():
    make = lambda: nn.Sequential(Scale(3, 4), nn.Tanh(), nn.Linear(4, 3))  # noqa: E731
    problem = problem_of(make, 1)
    with pytest.raises(
        curvkit.UnsupportedModelError,
        match=r"no KFAC block for 0 \(Scale\).* with --option kfac.unsupported=skip \(unsupported='skip'\), "
        r".* with --params NAMES \(params=NAMES\);",
    ):
        curvkit.curvature("kfac", problem)
    with pytest.warns(curvkit.CurvkitWarning, match="no KFAC block for 0"):
        warned = curvkit.curvature("kfac", problem, unsupported="warn")
    skipped = curvkit.curvature("kfac", problem, unsupported="skip").to_dense()
    idx = problem.layout.indices(["0.weight", "0.bias"])
    assert skipped[idx].abs().max() == 0 and rel(skipped, warned.to_dense()) == 0
    plugin = ScaleRules()
    curvkit.register_plugin(plugin, name="scale-rules")
    try:
        K = curvkit.curvature("kfac", problem)
        assert rel(K.to_dense(), layerwise_ggn(problem)) < TIGHT
        assert "scale" in curvkit.registry.items("kfac_layer_rules")
    finally:
        curvkit.unregister_plugin(plugin)
    assert "scale" not in curvkit.registry.items("kfac_layer_rules")


def test_the_factor_memory_budget_is_checked_before_any_data_pass():
    """Layer 0: A 4 x 4 (3 inputs and the bias), B 4 x 4; layer 2: A 5 x 5, B 3 x 3; float64."""
    problem = problem_of(mlp, 4)
    with pytest.raises(
        curvkit.CurvkitError,
        match=r"would take 528 bytes, above the budget of 100 bytes \(largest: 2: 272 bytes, 0: 256 bytes\).*"
        r"--option kfac.max_factor_bytes=528 \(max_factor_bytes=528\)",
    ):
        curvkit.curvature("kfac", problem, max_factor_bytes=100)


def test_bad_options():
    problem = problem_of(mlp, 4)
    for option, value in [("fisher_type", "type-1"), ("approx", "mean"), ("unsupported", "ignore")]:
        with pytest.raises(curvkit.CurvkitError, match=f"unknown {option} '{value}'; use one of"):
            curvkit.curvature("kfac", problem, **{option: value})
    with pytest.raises(curvkit.CurvkitError, match="forward-only.*has none"):
        curvkit.curvature("ekfac", problem, fisher_type="forward-only")
    data = (torch.randn(4, 3, dtype=DT), torch.randint(0, 3, (4,)))
    smoothed = curvkit.Problem(problem.model, nn.CrossEntropyLoss(label_smoothing=0.1), data)
    with pytest.raises(curvkit.NotNegativeLogLikelihoodError, match="fisher_type='type-2' or 'empirical'"):
        curvkit.curvature("kfac", smoothed, fisher_type="mc", seed=0)
    data = (torch.randn(4, 3, dtype=DT), torch.randn(4, 3, dtype=DT))
    custom = curvkit.Problem(mlp().double(), lambda o, y: (o - y).square().sum(), data)
    with pytest.raises(curvkit.CurvkitError, match="known only as a callable: use fisher_type='empirical'"):
        curvkit.curvature("kfac", custom)
    assert curvkit.curvature("kfac", custom, fisher_type="empirical").trace() > 0


def test_layerwise_reference_is_block_diagonal():
    problem = problem_of(mlp, 5)
    G, L = dense_ggn_reference(problem), layerwise_ggn(problem)
    a, b = problem.layout.indices(["0.weight", "0.bias"]), problem.layout.indices(["2.weight", "2.bias"])
    assert torch.equal(L[a][:, a], G[a][:, a]) and L[a][:, b].abs().max() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        curvkit.curvature("kfac", problem).trace()


def test_a_layer_run_twice_is_found_on_the_first_batch():
    problem = problem_of(LayerCalledTwice, 4)
    K = curvkit.curvature("kfac", problem)  # its type has a rule: nothing to refuse before the data
    with pytest.raises(curvkit.UnsupportedModelError, match=r"ran more than once .* in a \(Linear\)"):
        K.trace()
    skipped = curvkit.curvature("kfac", problem, unsupported="skip")
    idx = problem.layout.indices(["a.weight", "a.bias"])
    assert skipped.diagonal()[idx].abs().max() == 0 and skipped.trace() > 0
