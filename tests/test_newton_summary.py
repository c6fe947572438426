"""Partitions and the Newton summary ``(g_bar, H_bar, D3)`` against dense truth in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvkit
from curvkit import partition
from curvkit.newton import newton_summary, subset_directions

DT = torch.float64


def model_and_problem(norm: bool = False, N: int = 12, batch_size: int = 1024):
    torch.manual_seed(0)
    layers = [nn.Linear(3, 4), nn.Tanh()] + ([nn.LayerNorm(4)] if norm else []) + [nn.Linear(4, 2)]
    model = nn.Sequential(*layers).double()
    X, y = torch.randn(N, 3, dtype=DT), torch.randint(0, 2, (N,))
    return model, curvkit.Problem(model, "cross_entropy", (X, y), batch_size=batch_size)


def set_flat(problem, flat):
    with torch.no_grad():
        for p, part in zip(problem.params, problem.layout.unflatten(flat)):
            p.copy_(part)


def dense_derivatives(problem, h: float = 1e-5):
    """Gradient, Hessian (products with basis vectors) and third-derivative tensor (central finite
    differences of those Hessians, O(h^2)) of the full-data loss; torch.func.hessian and jacfwd of
    jacrev are wrong with LayerNorm in torch 2.13, so neither is used."""
    theta = problem.flat_params().detach().clone()

    def hessian(flat):
        set_flat(problem, flat)
        return curvkit.curvature("hessian", problem).to_dense()

    T = torch.stack(
        [
            (hessian(theta + h * e) - hessian(theta - h * e)) / (2 * h)
            for e in torch.eye(len(theta), dtype=DT)
        ],
        dim=2,
    )
    H = hessian(theta)
    return problem.loss_and_gradient()[1], H, T


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("name", ["canonical", "wb", "trivial"])
def test_summary_equals_dense_truth(norm, name):
    model, problem = model_and_problem(norm)
    g, H, T = dense_derivatives(problem)
    result = newton_summary(problem, name)
    subsets = partition.named(model, name)[1]
    V = torch.zeros(problem.dim, len(subsets), dtype=DT)
    for s, names in enumerate(subsets):
        for n in names:
            V[problem.layout.slices()[n], s] = g[problem.layout.slices()[n]]
    assert result.subsets == subsets and result.direction == "gradient" and result.curvature == "hessian"
    torch.testing.assert_close(result.g_bar, V.T @ g, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(result.H_bar, V.T @ H @ V, rtol=1e-9, atol=1e-12)
    D3 = torch.einsum("ijk,is,js,ks->s", T, V, V, V)
    torch.testing.assert_close(result.D3, D3, rtol=1e-6, atol=1e-10)  # finite differences: O(h^2)
    torch.testing.assert_close(result.d, result.D3.abs() ** (1 / 3), rtol=1e-12, atol=0)


def test_d3_matches_finite_differences_of_hessian_vector_products_and_is_batch_size_free():
    _, problem = model_and_problem(norm=True, N=20, batch_size=7)
    H = curvkit.curvature("hessian", problem)
    result = newton_summary(problem, "canonical", "random", seed=3)
    u = torch.randn(problem.dim, generator=torch.Generator().manual_seed(3), dtype=DT)
    V = subset_directions(problem, result.subsets, u)
    h = 1e-4
    theta = problem.flat_params().detach().clone()
    fd = []
    for s in range(V.shape[1]):
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                for p, part in zip(problem.params, problem.layout.unflatten(theta + sign * h * V[:, s])):
                    p.copy_(part)
            H = curvkit.curvature("hessian", problem)
            values.append(V[:, s] @ H.matvec(V[:, s]))
        fd.append((values[0] - values[1]) / (2 * h))
    with torch.no_grad():
        for p, part in zip(problem.params, problem.layout.unflatten(theta)):
            p.copy_(part)
    torch.testing.assert_close(result.D3, torch.stack(fd), rtol=1e-5, atol=1e-9)  # this check's own O(h^2)
    whole = newton_summary(problem.rebatched(1024), "canonical", "random", seed=3)
    torch.testing.assert_close(result.D3, whole.D3, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(result.H_bar, whole.H_bar, rtol=1e-10, atol=1e-13)


class Scalars(nn.Module):
    """``a tanh(b x + c) + d``: four scalar parameters, so the canonical partition has S = P."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (
            nn.Parameter(torch.tensor(v, dtype=DT)) for v in (1.3, -0.7, 0.2, 0.1)
        )

    def forward(self, x):
        return self.a * torch.tanh(self.b * x + self.c) + self.d


def test_one_subset_gives_the_step_along_the_direction_and_s_equal_p_the_newton_step():
    model, problem = model_and_problem()
    g, H, _ = dense_derivatives(problem)
    one = newton_summary(problem, "trivial")
    assert one.H_bar.shape == (1, 1)
    torch.testing.assert_close(one.g_bar / one.H_bar[0], (g @ g / (g @ H @ g)).reshape(1), rtol=1e-9, atol=0)
    torch.manual_seed(1)
    x = torch.randn(16, 1, dtype=DT)
    scalar = curvkit.Problem(Scalars(), "mse", (x, 0.5 * torch.sin(3 * x)))
    summary = newton_summary(scalar, "canonical")
    g, H = scalar.loss_and_gradient()[1], curvkit.curvature("hessian", scalar).to_dense()
    eta = torch.linalg.solve(summary.H_bar, summary.g_bar)
    step = g * eta  # sum_s eta_s v_s, v_s = g_s e_s
    torch.testing.assert_close(step, torch.linalg.solve(H, g), rtol=1e-9, atol=1e-12)


def test_partitions_and_their_errors():
    model, _ = model_and_problem()
    groups, names = partition.canonical(model)
    assert names == [["0.weight"], ["0.bias"], ["2.weight"], ["2.bias"]]
    assert [g["params"][0] is p for g, p in zip(groups, model.parameters())] == [True] * 4
    assert partition.trivial(model)[1] == [["0.weight", "0.bias", "2.weight", "2.bias"]]
    assert partition.wb(model)[1] == [["0.weight", "2.weight"], ["0.bias", "2.bias"]]
    assert partition.custom(model, ["*.weight", [model[0].bias, "2.bias"]])[1] == partition.wb(model)[1]
    with pytest.raises(curvkit.CurvkitError, match="subset 1 is empty"):
        partition.custom(model, ["*", []])
    with pytest.raises(curvkit.CurvkitError, match="misses 2 parameter"):
        partition.custom(model, ["*.weight"])
    with pytest.raises(curvkit.CurvkitError, match="in subsets 0 and 1"):
        partition.custom(model, ["*", "0.bias"])
    with pytest.raises(curvkit.CurvkitError, match="matches no trainable parameter"):
        partition.custom(model, ["*", "nosuch*"])
    with pytest.raises(curvkit.CurvkitError, match="unknown partition 'w'"):
        partition.named(model, "w")
    with torch.no_grad():
        frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(curvkit.CurvkitError, match="no parameter that requires grad"):
        partition.canonical(frozen)
    _, problem = model_and_problem()
    with pytest.raises(curvkit.CurvkitError, match="unknown direction"):
        newton_summary(problem, "wb", "sideways")
    with pytest.raises(curvkit.ShapeMismatchError, match="P = 26"):
        newton_summary(problem, "wb", torch.ones(3, dtype=DT))


def test_third_derivatives_through_fused_layernorm_are_wrong_in_torch_so_curvkit_uses_composites():
    """Records torch 2.13's bug: triple backward through the fused LayerNorm is wrong (along the first
    layer's weights it gives -0.0063 where differences of the loss give -0.0043453); under
    CompositeNorms, as every curvkit third derivative is taken, it is right, and so are the
    finite differences of Hessian-vector products."""
    from curvkit.third_order import directional_summary, third_directional_derivatives

    _, problem = model_and_problem(norm=True)
    _, g = problem.loss_and_gradient()
    result = newton_summary(problem, "canonical")
    V = subset_directions(problem, result.subsets, g)
    theta = problem.flat_params().detach().clone()

    def loss_along(t):
        set_flat(problem, theta + t * V[:, 0])
        return problem.loss_and_gradient()[0]

    h = 5e-3  # 7-point central difference of the third derivative of the loss itself, O(h^4)
    f = {k: loss_along(k * h) for k in (-3, -2, -1, 1, 2, 3)}
    set_flat(problem, theta)
    truth = (-f[3] + 8 * f[2] - 13 * f[1] + 13 * f[-1] - 8 * f[-2] + f[-3]) / (8 * h**3)
    assert result.D3[0].item() == pytest.approx(truth.item(), rel=1e-5)
    differences = third_directional_derivatives(problem, V[:, :1], "finite-difference")[0]
    assert differences.item() == pytest.approx(truth.item(), rel=1e-5)

    leaves = [p.detach().requires_grad_(True) for p in problem.params]
    inputs, targets = next(iter(problem.batches()))  # one batch of all 12 samples
    total, count = problem.loss_terms(leaves, inputs, targets)  # the fused kernels
    direction = problem.layout.unflatten(V[:, 0])
    wrong = directional_summary(total / count, leaves, [direction])[2][0]
    assert abs(wrong - truth) > 0.1 * abs(truth)  # if this fails, torch fixed it: CompositeNorms may go
    with pytest.raises(curvkit.CurvkitError, match="unknown third-derivative method"):
        third_directional_derivatives(problem, V, "magic")


def test_summary_analysis_on_the_command_line(tmp_path, run_curvkit):
    """``curvkit analyze --summary wb`` stores the summary; show prints H_bar's eigenvalues and the
    Newton rates; plot draws H_bar and, across a trajectory, the rates; resume reuses it."""
    import shutil

    from curvkit.cli.main import app
    from typer.testing import CliRunner

    from curvkit.datasets import bundled_file
    from curvkit.store import ResultsStore

    runner = CliRunner()
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for step in (1, 2):
        shutil.copy(bundled_file("digits_mlp.pt"), folder / f"step-{step}.pt")
    out = tmp_path / "r.h5"
    args = [
        "analyze",
        str(folder),
        "--curvature",
        "ggn",
        "--summary",
        "wb",
        "--max-samples",
        "200",
        "-o",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "summary/wb: 2 subsets (wb) along the gradient, ggn: H_bar eigenvalues" in result.stdout
    with ResultsStore(out, "r") as store:
        run = store.runs()[0]
        assert run.analyses() == ["summary/wb"]
        stored = run.read("summary/wb")
        assert stored.subsets[0][0] == "0.weight" and stored.H_bar.dtype == torch.float64  # float64 copy
        assert (torch.linalg.eigvalsh(stored.H_bar) > 0).all()  # the GGN's summary is PSD here
    shown = runner.invoke(app, ["show", str(out)])
    assert shown.exit_code == 0 and "H_bar eigenvalues:" in shown.stdout and "Newton" in shown.stdout
    assert "cubic rate: lambda_int = 10, regularised" in shown.stdout
    plotted = runner.invoke(app, ["plot", str(out), "-o", str(tmp_path / "fig"), "--formats", "png"])
    assert plotted.exit_code == 0, plotted.output
    names = sorted(p.name for p in (tmp_path / "fig").iterdir())
    assert any(n.endswith("summary-wb-H_bar.png") for n in names)
    assert {"trajectory-1-ggn-newton-rates-wb.png", "trajectory-1-ggn-cubic-rates-wb.png"} <= set(names)
    again = runner.invoke(app, [*args, "--json", "--quiet"])
    assert [run["resumed"] for run in __import__("json").loads(again.stdout)["runs"]] == [["summary/wb"]] * 2
    bad = run_curvkit("analyze", str(folder), "--summary", "wbb", "-o", str(out), cwd=tmp_path)
    assert bad.returncode == 2 and "--summary must be one of canonical, trivial, wb" in bad.stderr


def test_learning_rates_are_the_cubic_step_of_the_summary():
    """lambda_int = 0: the Newton step; above: a stationary point of the cubic model (the cubic solve
    itself is tested in test_cubic.py)."""
    _, problem = model_and_problem()
    summary = newton_summary(
        curvkit.Problem(problem.model, "cross_entropy", next(iter(problem.batches()))), "wb"
    )
    newton = summary.learning_rates(0.0)
    torch.testing.assert_close(
        newton.eta, torch.linalg.solve(summary.H_bar, summary.g_bar), rtol=1e-10, atol=0
    )
    step = summary.learning_rates(10.0)
    D = torch.diag(summary.d)
    r = (D @ step.eta).norm()
    lhs = (summary.H_bar + 5.0 * r * D @ D) @ step.eta
    torch.testing.assert_close(lhs, summary.g_bar, rtol=1e-9, atol=1e-12)
    assert step.radius == pytest.approx(r.item(), rel=1e-10)


@pytest.mark.parametrize("damping_int", [0.0, 10.0])
def test_the_step_is_invariant_when_the_direction_is_rescaled_per_subset(damping_int):
    """u -> c_s u on subset s (c_s > 0): g_bar -> C g_bar, H_bar -> C H_bar C, d -> C d, so eta -> C^-1 eta
    and the step sum_s eta_s v_s is unchanged (Wolinski 2023, the summary's invariance)."""
    model, problem = model_and_problem()
    u = torch.randn(problem.dim, dtype=DT, generator=torch.Generator().manual_seed(2))
    subsets = partition.canonical(model)[1]
    scales = torch.tensor([0.1, 3.0, 7.0, 0.5], dtype=DT)
    scaled = u.clone()
    for s, names in enumerate(subsets):
        scaled[problem.layout.slices()[names[0]]] *= scales[s]

    def step(direction):
        summary = newton_summary(problem, "canonical", direction)
        eta = summary.learning_rates(damping_int, on_unbounded="stationary").eta
        return subset_directions(problem, summary.subsets, direction) @ eta

    torch.testing.assert_close(step(scaled), step(u), rtol=1e-8, atol=1e-12)
