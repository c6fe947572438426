"""The ``d3`` estimator, ``T(u) = d/dt H(theta + t u)``, against independent truth in float64.

Three independent ground truths:

* ``torch.func.jacfwd`` of a Hessian built from Hessian-vector products with basis
  vectors (forward over reverse, no ``vmap`` over the HVPs), the ``[P, P, P]`` tensor
  contracted with ``u``; for LayerNorm on a twin model whose LayerNorm is written with
  elementary operations, because in torch 2.13 every automatic third derivative through
  the fused ``layer_norm`` kernel is wrong (and ``torch.func.hessian`` already at second
  order);
* central differences along ``u`` of Hessian-vector products (plain double backward,
  right through every layer);
* sixth-order central differences along ``u`` of dense Hessians
  (:func:`curvkit.testing.dense_hessian_reference`), which check the spec's reference.
"""

from __future__ import annotations

import json

import pytest
import torch
from curvkit.cli.main import app
from curvkit.plugins.d3 import D3_WAYS, D3Operator, D3Reference, d3_batch_product, dense_d3_reference
from torch import nn
from torch.func import grad as func_grad
from torch.func import jacfwd, jvp
from typer.testing import CliRunner

import curvkit
from curvkit import CompositeNorms
from curvkit.datasets import bundled_file
from curvkit.registry import BUILTIN_PLUGINS
from curvkit.store import ResultsStore
from curvkit.testing import CASES, check_estimator, dense_hessian_reference, get_case

DT = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


class ElementaryLayerNorm(nn.Module):
    """LayerNorm over the last dimension from elementary operations (same parameter names)."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(-1, keepdim=True)
        variance = (centred * centred).mean(-1, keepdim=True)
        return centred / torch.sqrt(variance + self.eps) * self.weight + self.bias


def _perturb_affine(model: nn.Module) -> None:
    """Move normalisation layers off their (1, 0) initialisation."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm | nn.GroupNorm | nn.InstanceNorm2d | nn.BatchNorm2d):
                module.weight.add_(0.3 * torch.randn_like(module.weight))
                module.bias.add_(0.3 * torch.randn_like(module.bias))


def tanh_mlp(norm: type[nn.Module] | None = None) -> nn.Module:
    layers = [nn.Linear(3, 4)] + ([norm(4)] if norm else []) + [nn.Tanh(), nn.Linear(4, 3)]
    return nn.Sequential(*layers)


def tanh_cnn(norm: str | None = None) -> nn.Module:
    norms = {
        None: [],
        "group": [nn.GroupNorm(2, 4)],
        "instance": [nn.InstanceNorm2d(4, affine=True)],
        "batch": [nn.BatchNorm2d(4)],
    }
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), *norms[norm], nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4, 3)
    )


def make_problem(model_fn, loss: str, N: int = 10, image: bool = False, batch_size: int = 4, **kwargs):
    torch.manual_seed(0)
    model = model_fn().to(DT)
    _perturb_affine(model)
    X = torch.randn(N, 1, 5, 5, dtype=DT) if image else torch.randn(N, 3, dtype=DT)
    y = torch.randint(0, 3, (N,)) if loss == "cross_entropy" else torch.randn(N, 3, dtype=DT)
    return curvkit.Problem(model, loss, (X, y), batch_size=batch_size, **kwargs)


PROBLEMS = {
    "tanh-mlp-ce": lambda **kw: make_problem(tanh_mlp, "cross_entropy", **kw),
    "layernorm-mlp-mse": lambda **kw: make_problem(lambda: tanh_mlp(nn.LayerNorm), "mse", **kw),
    "tanh-cnn-ce": lambda **kw: make_problem(tanh_cnn, "cross_entropy", image=True, **kw),
}
NORM_PROBLEMS = {
    "layernorm": lambda: make_problem(lambda: tanh_mlp(nn.LayerNorm), "mse"),
    "groupnorm": lambda: make_problem(lambda: tanh_cnn("group"), "cross_entropy", image=True),
    "instancenorm": lambda: make_problem(lambda: tanh_cnn("instance"), "cross_entropy", image=True),
    "batchnorm-train": lambda: make_problem(lambda: tanh_cnn("batch"), "mse", image=True, eval_mode=False),
    "attention-layernorm": lambda: get_case("attention-layernorm-ce").problem(),
}


def set_flat(problem: curvkit.Problem, flat: torch.Tensor) -> None:
    with torch.no_grad():
        for p, value in zip(problem.params, problem.layout.unflatten(flat)):
            p.copy_(value)


# --------------------------------------------------------------------------- ground truths
def jacfwd_truth(problem: curvkit.Problem, u: torch.Tensor) -> torch.Tensor:
    """``sum_k T_ijk u_k`` with ``T = jacfwd(H)``, ``H(theta)`` from HVPs with basis vectors.

    LayerNorm is replaced by :class:`ElementaryLayerNorm` in a twin model with the same
    weights (the fused kernel's third derivatives are wrong in torch 2.13).
    """
    batches = list(problem.batches())
    inputs, targets = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    twin = problem.model
    if any(isinstance(m, nn.LayerNorm) for m in twin.modules()):
        layers = [
            ElementaryLayerNorm(m.normalized_shape[0]) if isinstance(m, nn.LayerNorm) else m for m in twin
        ]
        twin = nn.Sequential(*layers).to(DT)
        twin.load_state_dict(problem.model.state_dict())
    twin_problem = curvkit.Problem(twin, problem.loss.name, (inputs, targets), batch_size=len(targets))
    layout = twin_problem.layout

    def loss(flat: torch.Tensor) -> torch.Tensor:
        total, count = twin_problem.loss_terms(layout.unflatten(flat), inputs, targets)
        return total / count

    def hessian(flat: torch.Tensor) -> torch.Tensor:
        basis = torch.eye(flat.numel(), dtype=DT)
        return torch.stack([jvp(func_grad(loss), (flat,), (e,))[1] for e in basis])

    T = jacfwd(hessian)(twin_problem.flat_params())  # [P, P, P], the last index differentiates
    assert rel(T, T.permute(2, 1, 0)) < 1e-12 and rel(T, T.permute(0, 2, 1)) < 1e-12  # a symmetric tensor
    return T @ u


def hvp_differences(problem: curvkit.Problem, u: torch.Tensor, V: torch.Tensor, step: float = 1e-4):
    """``(H(theta + h u) V - H(theta - h u) V) / 2h`` with ``h ||u|| = step``, by double backward."""
    copy = problem.to(dtype=DT)
    theta, h = copy.flat_params(), step / u.norm().item()

    def hvp_at(shift: float) -> torch.Tensor:
        set_flat(copy, theta + shift * u)
        return curvkit.curvature("hessian", copy, strategy="reverse", cache_graph=False).matmat(V)

    return (hvp_at(h) - hvp_at(-h)) / (2 * h)


def dense_hessian_differences(problem: curvkit.Problem, u: torch.Tensor, step: float = 1e-3):
    """Sixth-order central differences along ``u`` of dense Hessians (``h ||u|| = step``)."""
    copy = problem.to(dtype=DT)
    theta, h = copy.flat_params(), step / u.norm().item()

    def hessian_at(shift: float) -> torch.Tensor:
        set_flat(copy, theta + shift * u)
        return dense_hessian_reference(copy)

    stencil = ((1, 45.0), (2, -9.0), (3, 1.0))
    return sum(w * (hessian_at(m * h) - hessian_at(-m * h)) for m, w in stencil) / (60 * h)


# --------------------------------------------------------------------------- (a) the tensor
@pytest.mark.parametrize("strategy", D3_WAYS)
@pytest.mark.parametrize("name", PROBLEMS)
def test_dense_equals_jacfwd_of_a_hessian_contracted_with_u(name, strategy):
    problem = PROBLEMS[name]()
    T = curvkit.curvature("d3", problem, strategy=strategy)
    u = problem.loss_and_gradient()[1]
    torch.testing.assert_close(T.direction, u, rtol=0, atol=0)
    dense = T.to_dense()  # T(u) e_i for every basis vector
    truth = jacfwd_truth(problem, u)
    assert rel(dense, truth) < 1e-10
    # another direction: the tensor is the same, contracted with another vector
    w = torch.randn(problem.dim, generator=torch.Generator().manual_seed(5), dtype=DT)
    assert (
        rel(D3Operator(problem, direction=w, strategy=strategy).to_dense(), jacfwd_truth(problem, w)) < 1e-10
    )


# --------------------------------------------------------------------------- (b) finite differences
@pytest.mark.parametrize("strategy", D3_WAYS)
@pytest.mark.parametrize("name", [*PROBLEMS, *NORM_PROBLEMS])
def test_products_equal_central_differences_of_hvps(name, strategy):
    problem = {**PROBLEMS, **NORM_PROBLEMS}[name]()
    generator = torch.Generator().manual_seed(1)
    V = torch.randn(problem.dim, 3, generator=generator, dtype=DT)
    for direction in ("gradient", torch.randn(problem.dim, generator=generator, dtype=DT)):
        T = curvkit.curvature("d3", problem, direction=direction, strategy=strategy)
        assert rel(T @ V, hvp_differences(problem, T.direction, V)) < 1e-6


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_the_specs_reference_equals_differences_of_dense_hessians(case):
    problem = case.problem()
    reference = dense_d3_reference(problem)
    truth = dense_hessian_differences(problem, problem.loss_and_gradient()[1])
    assert rel(reference, truth) < 1e-10
    assert rel(curvkit.curvature("d3", problem).to_dense(), reference) < 1e-12


def test_composite_norms_compute_the_same_values():
    torch.manual_seed(0)
    x, image = torch.randn(6, 5, dtype=DT), torch.randn(3, 4, 5, 5, dtype=DT)
    modules = [
        (nn.LayerNorm(5), x),
        (nn.GroupNorm(2, 4), image),
        (nn.InstanceNorm2d(4, affine=True), image),
        (nn.BatchNorm2d(4), image),  # training mode: batch statistics
        (nn.BatchNorm2d(4).eval(), image),  # running statistics: the fused kernel
    ]
    for module, inputs in modules:
        module = module.to(DT)
        _perturb_affine(module)
        state = {k: v.clone() for k, v in module.state_dict().items()}
        with CompositeNorms():
            composite = module(inputs)
        module.load_state_dict(state)  # the fused kernel updates the running statistics
        torch.testing.assert_close(composite, module(inputs), rtol=1e-13, atol=1e-13)


# --------------------------------------------------------------------------- (c) symmetric, indefinite
@pytest.mark.parametrize("name", PROBLEMS)
def test_symmetric_and_indefinite(name):
    T = curvkit.curvature("d3", PROBLEMS[name]()).to_dense()
    assert (T - T.T).abs().max() <= 1e-13 * T.abs().max()
    eigenvalues = torch.linalg.eigvalsh(T)
    assert eigenvalues[0] < 0 < eigenvalues[-1]
    flags = curvkit.get_estimator("d3").flags
    assert flags == {"symmetric": True, "psd": False, "exact": True, "stochastic": False, "resamples": False}


# --------------------------------------------------------------------------- (d) batch size
@pytest.mark.parametrize("name", PROBLEMS)
def test_independent_of_the_batch_size(name):
    small, whole = PROBLEMS[name](batch_size=3), PROBLEMS[name](batch_size=10**6)
    M = torch.randn(small.dim, 4, generator=torch.Generator().manual_seed(2), dtype=DT)
    A, B = curvkit.curvature("d3", small), curvkit.curvature("d3", whole)
    torch.testing.assert_close(A.direction, B.direction, rtol=1e-13, atol=1e-15)
    assert rel(A @ M, B @ M) < 1e-12


# --------------------------------------------------------------------------- (e) directions
def test_directions():
    problem = PROBLEMS["tanh-mlp-ce"]()
    P = problem.dim
    gradient = curvkit.curvature("d3", problem)
    torch.testing.assert_close(gradient.direction, problem.loss_and_gradient()[1], rtol=0, atol=0)
    random = curvkit.curvature("d3", problem, direction="random", seed=3)
    expected = torch.randn(P, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(random.direction, expected, rtol=0, atol=0)
    assert not torch.equal(curvkit.curvature("d3", problem, direction="random", seed=4).direction, expected)
    assert random.options == {"direction": "random", "seed": 3}
    # a tensor is copied; T(u) is linear in u
    u, w = gradient.direction.clone(), expected.clone()
    given = curvkit.curvature("d3", problem, direction=u)
    u.zero_()
    torch.testing.assert_close(given.direction, gradient.direction, rtol=0, atol=0)
    combined = curvkit.curvature("d3", problem, direction=2 * gradient.direction + w).to_dense()
    assert rel(combined, 2 * gradient.to_dense() + random.to_dense()) < 1e-13


@pytest.mark.parametrize(
    "direction, error, match",
    [
        ("grad", curvkit.CurvkitError, "unknown d3 direction 'grad'"),
        (torch.zeros(5, dtype=DT), curvkit.ShapeMismatchError, r"\[P\] tensor with P = 31, got \(5,\)"),
        (torch.zeros(31, 1, dtype=DT), curvkit.ShapeMismatchError, r"got \(31, 1\)"),
        (torch.zeros(31, dtype=torch.long), curvkit.ShapeMismatchError, r"must be a floating-point .*int64"),
        (torch.full((31,), float("nan"), dtype=DT), curvkit.CurvkitError, "NaN or infinite"),
        ([0.0] * 31, curvkit.CurvkitError, "got list"),
    ],
)
def test_a_bad_direction_is_a_one_line_error(direction, error, match):
    problem = PROBLEMS["tanh-mlp-ce"]()
    with pytest.raises(error, match=match) as info:
        curvkit.curvature("d3", problem, direction=direction)
    assert "\n" not in str(info.value)


def test_bad_options():
    problem = PROBLEMS["tanh-mlp-ce"]()
    with pytest.raises(curvkit.CurvkitError, match="unknown strategy 'fast'"):
        curvkit.curvature("d3", problem, strategy="fast")
    with pytest.raises(curvkit.UnknownOptionError, match="its options: direction, seed, strategy"):
        curvkit.curvature("d3", problem, dirction="random")


def test_the_direction_is_fixed_at_construction():
    problem = PROBLEMS["tanh-mlp-ce"]()
    T = curvkit.curvature("d3", problem)
    before, M = T.direction.clone(), torch.randn(problem.dim, 2, dtype=DT)
    set_flat(problem, problem.flat_params() + 0.1)
    torch.testing.assert_close(T.direction, before, rtol=0, atol=0)
    assert not torch.allclose(problem.loss_and_gradient()[1], before)
    # products at the new parameters, along the old direction
    assert rel(T @ M, D3Operator(problem, direction=before) @ M) < 1e-13


def test_with_problem_keeps_the_direction_and_restrict_takes_the_block():
    problem = PROBLEMS["tanh-mlp-ce"]()
    T = curvkit.curvature("d3", problem, direction="random", seed=1)
    batch = T.with_problem(problem.subset([0, 3, 5]))
    torch.testing.assert_close(batch.direction, T.direction, rtol=0, atol=0)
    assert batch.name == "d3" and isinstance(batch, D3Operator)
    float32 = curvkit.curvature("d3", problem.to(torch.float32))
    precise = float32.with_problem(float32.problem.to(DT))
    torch.testing.assert_close(precise.direction, float32.direction.to(DT), rtol=0, atol=0)
    with pytest.raises(curvkit.ShapeMismatchError, match="same parameters"):
        T.with_problem(problem.with_params("0"))
    dense = T.to_dense()
    block = T.restrict("2")
    idx = problem.layout.indices(["2.weight", "2.bias"])
    assert block.shape == (len(idx), len(idx)) and block.SYMMETRIC and block.EXACT and not block.PSD
    assert rel(block.to_dense(), dense[idx][:, idx]) < 1e-13


def test_batch_product_is_a_pure_function():
    problem = PROBLEMS["layernorm-mlp-mse"]()
    params = [p.detach() for p in problem.params]
    inputs, targets = next(iter(problem.batches()))
    U = list(problem.layout.unflatten(problem.loss_and_gradient()[1]))
    V = [torch.randn(2, *p.shape, dtype=DT) for p in params]
    forward, count = d3_batch_product(problem, params, inputs, targets, U, V, way="forward")
    reverse, _ = d3_batch_product(problem, params, inputs, targets, U, V, way="reverse")
    assert count == targets.numel()
    for a, b in zip(forward, reverse):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    with pytest.raises(curvkit.CurvkitError, match="unknown d3 way"):
        d3_batch_product(problem, params, inputs, targets, U, V, way="sideways")


# --------------------------------------------------------------------------- (f) registry and battery
def test_registered_as_a_builtin_plugin():
    assert "curvkit.plugins.d3" in BUILTIN_PLUGINS
    spec = curvkit.get_estimator("d3")
    assert spec.plugin == "curvkit.plugins.d3" and spec.factory is D3Operator
    assert spec.reference is D3Reference and spec.description and "\n" not in spec.description
    assert "d3" in [s.name for s in curvkit.estimators()]  # so tests/test_conformance.py runs it
    info = {p.name: p for p in curvkit.loaded_plugins()}["curvkit.plugins.d3"]
    assert info.builtin and info.estimators == ("d3",)


def test_the_battery_checks_it_against_its_reference():
    cases = [get_case("attention-layernorm-ce"), get_case("cnn-pool-ce"), get_case("dropout-batchnorm-mse")]
    report = check_estimator("d3", cases, options={"strategy": "forward"})
    report.raise_on_failure()
    assert {r.case for r in report.results if r.check == "reference" and r.passed} == {c.name for c in cases}
    # other options: the reference takes them too
    report = check_estimator(
        "d3",
        [get_case("tanh-mlp-ce")],
        options={"direction": "random", "seed": 2, "strategy": "reverse"},
        reference=lambda problem: dense_d3_reference(problem, direction="random", seed=2),
    )
    report.raise_on_failure()
    assert [r.status for r in report.results if r.check == "reference"] == ["pass"]


# --------------------------------------------------------------------------- (g) the command line
def test_curvkit_analyze_curvature_d3(tmp_path):
    out = tmp_path / "d3.h5"
    common = ["analyze", str(bundled_file("digits_mlp.pt")), "--curvature", "d3", "--max-samples", "200"]
    common += ["-o", str(out), "--json", "--quiet"]
    args = [*common, "--top-k", "2", "--bottom-k", "2", "--trace", "hutchinson"]
    result = CliRunner().invoke(app, args, catch_exceptions=True)
    assert result.exit_code == 0, result.output
    (run,) = json.loads(result.stdout)["runs"]
    assert (
        run["provenance"]["estimator"] == "d3"
        and run["provenance"]["estimator_plugin"] == "curvkit.plugins.d3"
    )
    with ResultsStore(out, mode="r") as store:
        (stored,) = store.runs()
        assert stored.status == "complete"
        assert set(stored.analyses()) == {"eigen/largest", "eigen/smallest", "trace/hutchinson"}
        top, bottom = stored.read("eigen/largest"), stored.read("eigen/smallest")
    assert top.values.shape == (2,) and bottom.values.shape == (2,)
    assert top.values[0] > 0 > bottom.values[0]  # indefinite
    # the stored values are d3's: the top eigenvalue against a fresh computation
    checkpoint = torch.load(bundled_file("digits_mlp.pt"), weights_only=True)
    model = curvkit.models.digits_mlp(**checkpoint["curvkit"]["model_kwargs"])
    model.load_state_dict(checkpoint["model_state_dict"])
    problem = curvkit.Problem(
        model, "cross_entropy", curvkit.datasets.load_dataset("digits"), max_samples=200
    )
    fresh = curvkit.eigenvalues(curvkit.curvature("d3", problem), k=1, tol=1e-6)
    assert abs(fresh.values[0].item() - top.values[0].item()) <= 1e-3 * abs(fresh.values[0].item())
    # a named direction from the command line: another run
    random = CliRunner().invoke(app, [*common, "--top-k", "1", "--option", "d3.direction=random"])
    assert random.exit_code == 0, random.output
    (run,) = json.loads(random.stdout)["runs"]
    assert run["key"]["estimator_options"] == {"direction": "random", "seed": 0}


def test_the_agreement_reference_follows_the_estimators_options():
    """``--check --option d3.direction=random`` compares with the reference along the same random
    direction (the estimator's options reach a callable reference that names them)."""
    from curvkit.analysis import estimator_reference

    problem = make_problem(lambda: tanh_mlp(), "mse")
    options = {"direction": "random", "seed": 5}
    T = curvkit.curvature("d3", problem, **options)
    reference = estimator_reference(curvkit.get_estimator("d3"), problem, options=options)
    assert reference.label == "D3Reference(direction='random', seed=5) in float64"
    assert rel(reference.build().to_dense(), T.to_dense()) < 1e-10
    default = estimator_reference(curvkit.get_estimator("d3"), problem).build()
    assert rel(default.to_dense(), T.to_dense()) > 0.1  # the gradient's direction: another matrix


def test_the_check_solves_the_reference_by_lanczos_in_o_k_products():
    """``curvkit analyze --curvature d3 --check`` built the reference's dense ``T(u)`` (``P`` backward
    passes through a graph of the whole dataset: 234 s on the bundled CNN, ``P = 1,898``) and did not
    check above ``P = 2,000``. The reference is an operator now (``EstimatorSpec.reference`` a
    ``CurvatureOperator`` class), solved by Lanczos in float64 as another estimator's: ``O(k)``
    products, whatever ``P``."""
    from curvkit.analysis import estimator_reference
    from curvkit.checks import check_agreement

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Linear(64, 3))
    problem = curvkit.Problem(model, "cross_entropy", (torch.randn(40, 6), torch.randint(0, 3, (40,))))
    P = problem.dim
    assert P == 643
    reference = estimator_reference(curvkit.get_estimator("d3"), problem, max_dense_dim=10)
    assert reference.build is not None, reference.reason  # no dense matrix: no bound on P
    R = reference.build()
    assert (
        isinstance(R, D3Reference)
        and R.dtype == torch.float64
        and reference.label == "D3Reference() in float64"
    )
    T = curvkit.curvature("d3", problem)
    result = check_agreement(T, R, k=2, reference_tol=1e-10, label=reference.label)
    assert result.passed, result.detail
    assert result.figures["reference_matvecs"] <= P / 4 and R.matvecs == result.figures["reference_matvecs"]


def test_curvkit_analyze_check_of_d3_above_2000_parameters(tmp_path):
    """The bundled MLP (``P = 3,466``): its agreement check was stored as not done ("a dense matrix,
    built only up to P=2,000")."""
    from curvkit.analysis import AnalysisPlan
    from curvkit.runs import ProblemSettings, analyze

    out = tmp_path / "r.h5"
    plan = AnalysisPlan(top_k=1, trace=None, density=False, check=True)
    (run,) = analyze(
        [bundled_file("digits_mlp.pt")],
        output=out,
        plan=plan,
        settings=ProblemSettings(max_samples=50),
        estimators=["d3"],
    ).runs
    agreement = run.results["checks/agreement"]
    assert agreement.passed is True, agreement.detail
    assert "D3Reference(seed=0) in float64" in agreement.detail  # analyze seeds the estimator
