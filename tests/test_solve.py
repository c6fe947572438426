"""Solvers of ``(A + damping I) X = B`` against ``torch.linalg.solve`` in float64."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

import curvkit
from curvkit.analysis import AnalysisPlan
from curvkit.arguments import fraction
from curvkit.linalg.krylov import conjugate_gradient
from curvkit.linalg.solve import (
    SOLVE_STATUSES,
    SolveHistory,
    SolveResult,
    check_solver_options,
    solver_options,
)

DT = torch.float64


def spd(P: int = 30, seed: int = 0, condition: float | None = None) -> curvkit.DenseOperator:
    gen = torch.Generator().manual_seed(seed)
    R = torch.randn(P, P, dtype=DT, generator=gen)
    if condition is None:
        M = R @ R.T / P + 0.1 * torch.eye(P, dtype=DT)
    else:  # a given spread of eigenvalues, on a random basis, with a dominant diagonal scale
        Q, _ = torch.linalg.qr(R)
        M = Q @ torch.diag(torch.logspace(0, 1, P, dtype=DT)) @ Q.T
        scale = torch.logspace(0, condition, P, dtype=DT).sqrt()
        M = scale[:, None] * M * scale[None, :]
    return curvkit.DenseOperator((M + M.T) / 2, psd=True)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def truth(A, B, damping):
    return torch.linalg.solve(A.to_dense() + damping * torch.eye(A.shape[0], dtype=DT), B)


@pytest.mark.parametrize("method", ["exact", "cg", "minres"])
def test_solvers_equal_the_dense_solve(method):
    A = spd()
    B = torch.randn(30, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    res = curvkit.solve(A, B, method, damping=0.01, tol=1e-11)
    assert res.converged and res.reason == "converged" and res.method == method
    assert rel(res.x, truth(A, B, 0.01)) < 1e-9
    assert res.residual <= 1e-11 and res.history[-1]["residual"] == res.residual
    assert [row["matvecs"] for row in res.history] == sorted(row["matvecs"] for row in res.history)
    columns = torch.stack([curvkit.solve(A, B[:, k], method, damping=0.01, tol=1e-11).x for k in range(3)], 1)
    assert rel(res.x, columns) < 1e-9  # a block of right-hand sides = column by column


def test_cg_stops_at_non_positive_curvature_and_minres_solves_the_indefinite_system():
    D = torch.diag(torch.linspace(-1.0, 2.0, 30, dtype=DT))
    A = curvkit.DenseOperator(D)
    b = torch.torch.ones(30, dtype=DT)
    with pytest.warns(curvkit.CurvkitWarning, match="'cg' needs A \\+ damping I positive definite"):
        res = curvkit.solve(A, b, "cg", tol=1e-10)
    assert not res.converged and "non-positive curvature" in res.reason and "iteration" in res.reason
    assert torch.isfinite(res.x).all()
    damping = 0.0345  # not an eigenvalue's negative: an indefinite, non-singular system
    good = curvkit.solve(A, b, "minres", damping=damping, tol=1e-10)
    assert good.converged and rel(good.x, truth(A, b, damping)) < 1e-8


def test_a_preconditioner_saves_iterations_on_an_ill_conditioned_system():
    A = spd(60, seed=3, condition=4.0)
    b = torch.randn(60, dtype=DT, generator=torch.Generator().manual_seed(0))
    plain = curvkit.solve(A, b, "cg", tol=1e-8, maxiter=2000)
    jacobi = curvkit.DiagonalOperator(A.diagonal())
    preconditioned = curvkit.solve(A, b, "cg", tol=1e-8, maxiter=2000, preconditioner=jacobi)
    assert plain.converged and preconditioned.converged
    assert preconditioned.iterations < plain.iterations / 2
    assert rel(preconditioned.x, truth(A, b, 0.0)) < 1e-6


def test_warm_start_and_the_inverse_operator():
    A = spd()
    b = torch.randn(30, dtype=DT)
    x = truth(A, b, 0.1)
    assert curvkit.solve(A, b, "cg", damping=0.1, x0=x, tol=1e-8).iterations == 0
    Ainv = curvkit.inverse(A, "cg", damping=0.1, tol=1e-11)
    V = torch.randn(30, 2, dtype=DT)
    assert rel(Ainv @ V, truth(A, V, 0.1)) < 1e-9 and Ainv.last.converged and Ainv.last.matvecs > 0


def test_exact_uses_the_operators_structure():
    gen = torch.Generator().manual_seed(0)
    block = curvkit.KroneckerBlock(
        0,
        None,
        (lambda R: R @ R.mT)(torch.randn(1, 3, 3, dtype=DT, generator=gen)),
        (lambda R: R @ R.mT)(torch.randn(1, 2, 2, dtype=DT, generator=gen)),
    )
    K = curvkit.KroneckerOperator(
        curvkit.ParameterLayout(("w",), (torch.Size([2, 3]),)), [block], dtype=DT, device="cpu"
    )
    b = torch.randn(6, dtype=DT)
    res = curvkit.solve(K, b, "exact", damping=0.5)
    assert res.converged and rel(res.x, truth(K, b, 0.5)) < 1e-12 and res.matvecs == 1  # the certificate


class NaNAfter(curvkit.DenseOperator):
    """Products turn NaN after ``n`` of them."""

    def __init__(self, matrix, n):
        super().__init__(matrix, psd=True)
        self.n = n

    def _matmat(self, M):
        out = super()._matmat(M)
        return out * float("nan") if self.matvecs > self.n else out


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_a_non_finite_product_stops_the_solve_with_the_last_finite_iterate(method):
    A = NaNAfter(spd().to_dense(), 4)
    res = curvkit.solve(A, torch.torch.ones(30, dtype=DT), method, tol=1e-12)
    assert not res.converged and res.reason == "non-finite value at iteration 5"
    assert torch.isfinite(res.x).all() and res.x.norm() > 0


DAMPED = {
    "solve": lambda A, b, damping: curvkit.solve(A, b, "cg", damping=damping, tol=1e-12).x,
    "inverse": lambda A, b, damping: A.inverse(damping) @ b,
    "logdet": lambda A, b, damping: torch.tensor(A.logdet(damping)),
    "ihvp_accuracy": lambda A, b, damping: (
        curvkit.ihvp_accuracy(A, ["cg"], vector=b, damping=damping).curves["cg"].columns["error"]
    ),
}
"""Every entry point that takes a damping, as ``(A, b, damping) -> a tensor it determines``."""


@pytest.mark.filterwarnings("ignore:solver 'cg' needs A")
@pytest.mark.parametrize("entry", DAMPED)
def test_a_damping_is_a_finite_non_negative_number_of_any_kind(entry):
    """A float, a NumPy number and a one-element tensor give the same result; an infinite, NaN,
    negative or boolean damping is one error, where ``inf`` failed inside ``eigh`` or gave zeros."""
    np = pytest.importorskip("numpy")
    A, b = spd(), torch.linspace(-1.0, 1.0, 30, dtype=DT)
    expected = DAMPED[entry](A, b, 0.5)
    for same in (np.float64(0.5), torch.tensor(0.5), torch.tensor([0.5], dtype=torch.float32)):
        assert torch.equal(DAMPED[entry](A, b, same), expected), same
    for bad in (math.inf, math.nan, -1.0, True, torch.tensor(math.inf), torch.ones(2), "0.5"):
        with pytest.raises(curvkit.CurvkitError, match="damping must be a finite number >= 0"):
            DAMPED[entry](A, b, bad)


@pytest.mark.parametrize("method", ["cg", "minres", "exact"])
def test_tol_is_a_relative_tolerance_below_one_and_maxiter_an_integer(method):
    """``tol=inf``, and any ``tol >= 1``, was accepted: every solver stopped before its first step
    and returned ``x = 0`` marked converged. A NumPy integer ``maxiter`` was refused."""
    np = pytest.importorskip("numpy")
    A, b = spd(), torch.linspace(-1.0, 1.0, 30, dtype=DT)
    for bad in (math.inf, math.nan, 0.0, -1e-6, 1, 2.0, True, torch.ones(2), "1e-6"):
        with pytest.raises(curvkit.CurvkitError, match=r"^tol must be a number in \(0, 1\) .*, got "):
            curvkit.solve(A, b, method, tol=bad)
    expected = curvkit.solve(A, b, method, tol=1e-8, maxiter=200)
    for tol in (np.float64(1e-8), torch.tensor(1e-8), torch.tensor([1e-8], dtype=torch.float64)):
        for maxiter in (200, np.int64(200)):
            assert torch.equal(curvkit.solve(A, b, method, tol=tol, maxiter=maxiter).x, expected.x)
    for bad in (0, 2.5, True, torch.tensor(5)):
        with pytest.raises(curvkit.CurvkitError, match=r"^maxiter must be an integer >= 1, got "):
            curvkit.solve(A, b, method, maxiter=bad)


def test_bad_input():
    A = spd()
    b = torch.torch.ones(30, dtype=DT)
    with pytest.raises(curvkit.CurvkitError, match="damping must be a finite number >= 0"):
        curvkit.solve(A, b, damping=-1.0)
    with pytest.raises(curvkit.ShapeMismatchError, match=r"must be \[P\] or \[P, K\] with P = 30"):
        curvkit.solve(A, torch.ones(29, dtype=DT))
    with pytest.raises(curvkit.ShapeMismatchError, match="floating-point"):
        curvkit.solve(A, torch.ones(30, dtype=torch.long))
    with pytest.raises(
        curvkit.CurvkitError,
        match="unknown solver .gmres.; available: cg, ekfac, exact, kfac, lissa, lowrank, minres, neumann",
    ):
        curvkit.solve(A, b, "gmres")
    with pytest.raises(curvkit.CurvkitError, match="maxiter must be an integer >= 1, got 0"):
        curvkit.solve(A, b, maxiter=0)
    with pytest.raises(curvkit.CurvkitError, match="minres takes no preconditioner"):
        curvkit.solve(A, b, "minres", preconditioner=A)


class TwiceCG:
    @curvkit.hookimpl
    def curvkit_register_solvers(self):
        return [curvkit.SolverSpec("cg-again", conjugate_gradient, "CG under another name", psd_only=True)]


def test_a_plugin_adds_a_solver():
    plugin = TwiceCG()
    curvkit.register_plugin(plugin, name="cg-again")
    try:
        assert "cg-again" in [s.name for s in curvkit.solvers()]
        res = curvkit.solve(spd(), torch.torch.ones(30, dtype=DT), "cg-again", tol=1e-10)
        assert res.converged and res.method == "cg-again"
    finally:
        curvkit.unregister_plugin(plugin)
    assert "cg-again" not in [s.name for s in curvkit.solvers()]


def test_block_solve_of_a_data_backed_operator_makes_one_pass_per_iteration():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(20, 3, dtype=DT), torch.randint(0, 2, (20,))
    G = curvkit.curvature("ggn", curvkit.Problem(model, "cross_entropy", (X, y), batch_size=7))
    B = torch.randn(G.shape[0], 4, dtype=DT)
    passes = G.data_passes
    res = curvkit.solve(G, B, "cg", damping=0.1, tol=1e-10)
    assert res.converged and G.data_passes - passes == res.iterations + 1  # and one to confirm the residual
    assert rel(res.x, truth(curvkit.DenseOperator(G.to_dense()), B, 0.1)) < 1e-8


def test_the_seed_notebook_done_right():
    """A 3-5-1 sigmoid MLP with the squared error on 10 samples: the Hessian is indefinite and
    ill-conditioned. CG on it reports what goes wrong; MINRES on the indefinite system, and CG with
    damping that makes it positive definite, match the exact solve (cosine > 0.999)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Sigmoid(), nn.Linear(5, 1)).double()
    X, y = torch.randn(10, 3, dtype=DT), torch.randn(10, 1, dtype=DT)
    problem = curvkit.Problem(model, "mse", (X, y))
    H = curvkit.curvature("hessian", problem)
    _, g = problem.loss_and_gradient()
    dense = H.to_dense()
    values = torch.linalg.eigvalsh(dense)
    assert values[0] < 0 < values[-1]  # indefinite
    cosine = lambda a, b: (a @ b / (a.norm() * b.norm())).item()  # noqa: E731
    exact = torch.linalg.solve(dense, g)
    with pytest.warns(curvkit.CurvkitWarning, match="not known to be positive semi-definite") as warned:
        cg = curvkit.solve(H, g, "cg", maxiter=40)
    assert warned[0].filename == __file__  # the warning points at the caller's line
    assert not cg.converged and ("non-positive curvature" in cg.reason or cg.reason == "maxiter")
    mr = curvkit.solve(H, g, "minres", tol=1e-12, maxiter=200)
    assert mr.converged and cosine(mr.x, exact) > 0.999
    damping = 2 * abs(values[0].item())
    with pytest.warns(curvkit.CurvkitWarning):  # the Hessian is not flagged PSD, even damped
        damped = curvkit.solve(H, g, "cg", damping=damping, tol=1e-12, maxiter=200)
    assert damped.converged
    assert cosine(damped.x, torch.linalg.solve(dense + damping * torch.eye(len(g), dtype=DT), g)) > 0.999


def test_neumann_converges_with_its_estimated_scale_and_stops_when_it_diverges():
    A = spd(20, seed=4)
    b = torch.randn(20, 2, dtype=DT, generator=torch.Generator().manual_seed(5))
    res = curvkit.solve(A, b, "neumann", damping=0.5, tol=1e-9, maxiter=5000)
    assert res.converged and rel(res.x, truth(A, b, 0.5)) < 1e-7
    assert res.history[0]["matvecs"] > 0  # the largest-eigenvalue estimate is counted
    lam = torch.linalg.eigvalsh(A.to_dense())[-1].item()
    too_large = curvkit.solve(A, b, "neumann", damping=0.5, scale=3.0 / (lam + 0.5), maxiter=500)
    assert not too_large.converged and too_large.reason.startswith("diverging at iteration")
    indefinite = curvkit.DenseOperator(torch.diag(torch.linspace(-1.0, 2.0, 20, dtype=DT)))
    with pytest.warns(curvkit.CurvkitWarning, match="not known to be positive semi-definite"):
        res = curvkit.solve(indefinite, b, "neumann", maxiter=2000)
    assert not res.converged and "diverging" in res.reason and torch.isfinite(res.x).all()


def test_a_series_scale_is_a_finite_positive_number_of_any_kind():
    """``scale=inf`` was accepted (a NaN iterate at the first step); a tensor is taken as its value."""
    A = spd(20, seed=4)
    b = torch.randn(20, dtype=DT, generator=torch.Generator().manual_seed(5))
    expected = curvkit.solve(A, b, "neumann", damping=0.5, scale=0.05, maxiter=50)
    same = curvkit.solve(A, b, "neumann", damping=0.5, scale=torch.tensor([0.05], dtype=DT), maxiter=50)
    assert torch.equal(same.x, expected.x)
    for method in ("neumann", "lissa"):
        for bad in (math.inf, math.nan, 0.0, True):
            with pytest.raises(curvkit.CurvkitError, match=r"^scale must be a finite number > 0, got "):
                curvkit.solve(A, b, method, scale=bad)


# ---------------------------------------------------------------- lissa, kfac, ekfac, lowrank
def mlp_problem(reduction: str = "mean", N: int = 64, **kwargs) -> curvkit.Problem:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    X, y = torch.randn(N, 4, dtype=DT), torch.randn(N, 2, dtype=DT)
    return curvkit.Problem(model, "mse", (X, y), reduction=reduction, **kwargs)


def test_the_new_solvers_are_registered():
    names = [s.name for s in curvkit.solvers()]
    assert {"lissa", "kfac", "ekfac", "lowrank"} <= set(names) and names == sorted(names)


BUILTIN_SOLVERS = ["cg", "ekfac", "exact", "kfac", "lissa", "lowrank", "minres", "neumann"]


@pytest.mark.parametrize("method", BUILTIN_SOLVERS)
def test_every_builtin_solver_refuses_an_unknown_option_before_working(method):
    """One mechanism: :func:`curvkit.solve` checks a solver's options against its signature (kfac and
    ekfac pass theirs to the estimator, which refuses them); none is swallowed by a ``**kwargs``."""
    assert {s.name for s in curvkit.solvers() if s.plugin == "curvkit.plugins.solvers"} == set(
        BUILTIN_SOLVERS
    )
    G = curvkit.curvature("ggn", mlp_problem(N=20))
    counted = {"products": 0}
    matvec = G.matmat
    G.matmat = lambda X: (counted.__setitem__("products", counted["products"] + 1), matvec(X))[1]
    who = f"estimator {method!r}" if method in ("kfac", "ekfac") else f"solver {method!r}"
    with pytest.raises(curvkit.UnknownOptionError, match=f"^{who} takes no option 'bogus'; ") as raised:
        curvkit.solve(G, torch.ones(G.shape[0], dtype=DT), method, damping=0.1, bogus=1)
    assert "\n" not in str(raised.value) and counted["products"] == 0


def test_a_solvers_options_are_the_keywords_of_its_solve_besides_those_solve_passes():
    assert solver_options("lissa") == ["scale", "batch_size", "repeats", "seed", "check_every"]
    assert solver_options("cg") == solver_options("exact") == [] and solver_options("kfac") is None
    with pytest.raises(
        curvkit.UnknownOptionError, match="^solver 'cg' takes no option 'tol'; it takes no opt"
    ):
        check_solver_options("cg", {"tol": 1e-3})  # solve's own argument, not an option


OUT_OF_RANGE = [
    ("neumann", {"scale": 0}, "scale must be a finite number > 0, got 0"),
    ("lissa", {"batch_size": 0}, "batch_size must be an integer >= 1 or None, got 0"),
    ("lissa", {"repeats": 0}, "repeats must be an integer >= 1, got 0"),
    ("lissa", {"scale": -1}, "scale must be a finite number > 0, got -1"),
    ("lissa", {"check_every": "abc"}, "check_every must be an integer >= 1 or None, got 'abc'"),
    ("lissa", {"seed": 1.5}, "seed must be an integer >= 0 and < 2**63, got 1.5"),
    ("lissa", {"seed": -1}, "seed must be an integer >= 0 and < 2**63, got -1"),
    ("lowrank", {"rank": 0}, "rank must be an integer >= 1, got 0"),
    ("lowrank", {"rank": 2.0}, "rank must be an integer >= 1, got 2.0"),
    ("lowrank", {"eigen_tol": 0}, "eigen_tol must be a number in (0, 1) (1 is met by any vector), got 0"),
    ("lowrank", {"eigen_tol": 1}, "eigen_tol must be a number in (0, 1) (1 is met by any vector), got 1"),
    ("lowrank", {"max_matvecs": 0}, "max_matvecs must be an integer >= 1 or None, got 0"),
    ("lowrank", {"seed": 2**63}, "seed must be an integer >= 0 and < 2**63, got 9223372036854775808"),
]


@pytest.mark.parametrize("method, options, message", OUT_OF_RANGE, ids=lambda x: repr(x)[:40])
def test_a_builtin_solver_refuses_an_option_value_out_of_range_before_any_product(method, options, message):
    """Each built-in solver declares how its options' values are checked (``SolverSpec.option_checks``):
    ``check_solver_options`` applies the checks, so ``solve`` and ``inverse`` refuse a value out of range
    before any product (``lissa`` took ``seed=1.5``, ``lowrank`` ``eigen_tol=0`` as far as Lanczos)."""
    exact = "^" + re.escape(message) + "$"
    with pytest.raises(curvkit.CurvkitError, match=exact):
        check_solver_options(method, options)
    with pytest.raises(curvkit.CurvkitError, match="^" + re.escape(f"--ihvp-option {method}.{message}")):
        check_solver_options(method, options, prefix=f"--ihvp-option {method}.")
    G = curvkit.curvature("ggn", mlp_problem(N=20))
    counted = {"products": 0}
    matvec = G.matmat
    G.matmat = lambda X: (counted.__setitem__("products", counted["products"] + 1), matvec(X))[1]
    with pytest.raises(curvkit.CurvkitError, match=exact):
        curvkit.solve(G, torch.ones(G.shape[0], dtype=DT), method, damping=0.1, **options)
    with pytest.raises(curvkit.CurvkitError, match=exact):
        curvkit.inverse(G, method, 0.1, **options)
    assert counted["products"] == 0


def test_a_bound_that_depends_on_p_is_checked_where_p_is_known_before_any_product():
    """``lowrank``'s ``rank`` is an integer >= 1 up front (``option_checks``) and at most ``P`` once ``P``
    is known (``dimension_checks``): by ``solve`` and ``inverse`` before Lanczos' first product."""
    assert check_solver_options("lowrank", {"rank": 21}) == {"rank": 21}  # P not known yet
    with pytest.raises(curvkit.CurvkitError, match=r"^rank must be an integer in 1..20, got 21$"):
        check_solver_options("lowrank", {"rank": 21}, dim=20)
    with pytest.raises(curvkit.CurvkitError, match=r"^lowrank.rank must be an integer in 1..20, got 21$"):
        check_solver_options("lowrank", {"rank": 21}, prefix="lowrank.", dim=20)
    assert check_solver_options("lowrank", {"rank": 20}, dim=20) == {"rank": 20}
    G = curvkit.curvature("ggn", mlp_problem(N=20))
    counted = {"products": 0}
    matvec = G.matmat
    G.matmat = lambda X: (counted.__setitem__("products", counted["products"] + 1), matvec(X))[1]
    P = G.shape[0]
    with pytest.raises(curvkit.CurvkitError, match=f"^rank must be an integer in 1..{P}, got {P + 1}$"):
        curvkit.inverse(G, "lowrank", 0.1, rank=P + 1)
    assert counted["products"] == 0


def test_a_bound_that_depends_on_the_samples_is_checked_where_n_is_known_before_any_product():
    """``lissa``'s ``batch_size`` is at most the samples ``N`` (``sample_checks``): ``check_solver_options``
    checks it given ``samples``, ``solve`` and ``inverse`` for an operator with data before any product
    (``inverse`` refused it only at its first product, inside lissa)."""
    assert check_solver_options("lissa", {"batch_size": 21}) == {"batch_size": 21}  # N not known yet
    message = r"^batch_size must be an integer in 1..20 \(the samples\), got 21$"
    with pytest.raises(curvkit.CurvkitError, match=message):
        check_solver_options("lissa", {"batch_size": 21}, samples=20)
    with pytest.raises(curvkit.CurvkitError, match=message.replace("^", "^lissa.")):
        check_solver_options("lissa", {"batch_size": 21}, prefix="lissa.", samples=20)
    assert check_solver_options("lissa", {"batch_size": 20, "scale": None}, samples=20)["batch_size"] == 20
    assert check_solver_options("lissa", {"batch_size": None}, samples=20) == {"batch_size": None}
    G = curvkit.curvature("ggn", mlp_problem(N=20))
    counted = {"products": 0}
    matvec = G.matmat
    G.matmat = lambda X: (counted.__setitem__("products", counted["products"] + 1), matvec(X))[1]
    with pytest.raises(curvkit.CurvkitError, match=message):
        curvkit.inverse(G, "lissa", 0.1, batch_size=21)
    with pytest.raises(curvkit.CurvkitError, match=message):
        curvkit.solve(G, torch.ones(G.shape[0], dtype=DT), "lissa", damping=0.1, batch_size=21)
    assert counted["products"] == 0 and G.data_passes == 0
    # an operator without data has no N: lissa is the Neumann series there, batch_size unused
    dense = curvkit.DenseOperator(G.to_dense(), psd=True)
    assert (
        curvkit.solve(dense, torch.ones(G.shape[0], dtype=DT), "lissa", damping=0.1, batch_size=21)
        .x.isfinite()
        .all()
    )


class Sampled:
    """A plugin's solver whose option ``draws`` is bounded by the samples ``N`` (``sample_checks``)."""

    calls = 0

    @curvkit.hookimpl
    def curvkit_register_solvers(self):
        def solve(A, B, *, damping, tol, maxiter, callback=None, draws=1, **_):
            Sampled.calls += 1
            history = SolveHistory(A, damping, B, callback)
            return history.measured(B, B, 1, tol, "approximate", "sampled: {residual}")

        def at_most_n(value, name, N):
            if value > N:
                raise curvkit.CurvkitError(f"{name} must be at most the {N} samples, got {value}")

        return [curvkit.SolverSpec("sampled", solve, "B", sample_checks={"draws": at_most_n})]


def test_a_plugin_solver_declares_a_bound_on_the_samples_checked_before_it_runs():
    plugin = Sampled()
    curvkit.register_plugin(plugin, name="sampled")
    try:
        G = curvkit.curvature("ggn", mlp_problem(N=20))
        b = torch.ones(G.shape[0], dtype=DT)
        with pytest.raises(curvkit.CurvkitError, match=r"^draws must be at most the 20 samples, got 21$"):
            curvkit.solve(G, b, "sampled", draws=21)
        assert Sampled.calls == 0 and G.data_passes == 0
        curvkit.solve(G, b, "sampled", draws=20)
        assert Sampled.calls == 1
        plan = AnalysisPlan(
            top_k=1,
            trace=None,
            density=False,
            options={"ihvp": {"solvers": ["sampled"], "solver_options": {"sampled": {"draws": 21}}}},
        )
        plan.check_dimension(G.shape[0])  # N unknown: left to the solver
        with pytest.raises(
            curvkit.CurvkitError, match="^--ihvp-option sampled.draws must be at most the 20 "
        ):
            plan.check_dimension(G.shape[0], 20)
    finally:
        curvkit.unregister_plugin(plugin)


def test_checked_options_are_passed_as_the_checks_return_them():
    checked = check_solver_options("lissa", {"scale": torch.tensor([0.5]), "seed": np.int64(3), "repeats": 2})
    assert checked == {"scale": 0.5, "seed": 3, "repeats": 2}
    assert [type(v) for v in checked.values()] == [float, int, int]
    assert check_solver_options("lissa", {"scale": None, "batch_size": None}) == {
        "scale": None,
        "batch_size": None,
    }


class Relaxed:
    """A plugin's solvers: ``relaxed`` declares a check of its ``omega``, ``plain`` declares none."""

    seen: dict = {}

    @curvkit.hookimpl
    def curvkit_register_solvers(self):
        def solve(A, B, *, damping, tol, maxiter, callback=None, omega=0.5, **_):
            Relaxed.seen = {"omega": omega}
            history = SolveHistory(A, damping, B, callback)
            return history.measured(B, omega * B, 1, tol, "approximate", "relaxed: {residual}")

        return [
            curvkit.SolverSpec("relaxed", solve, "omega B", option_checks={"omega": fraction}),
            curvkit.SolverSpec("plain", solve, "omega B, its options unchecked"),
        ]


def test_a_plugin_solver_declares_how_its_options_values_are_checked():
    from curvkit.arguments import fraction as fraction_check

    assert Relaxed.curvkit_register_solvers(Relaxed())[0].option_checks == {"omega": fraction_check}
    plugin = Relaxed()
    curvkit.register_plugin(plugin, name="relaxed")
    try:
        b = torch.ones(30, dtype=DT)
        with pytest.raises(curvkit.CurvkitError, match=r"^omega must be a number in \[0, 1\], got 2$"):
            curvkit.solve(spd(), b, "relaxed", omega=2)
        curvkit.solve(spd(), b, "relaxed", omega=torch.tensor(0.25, dtype=DT))
        assert Relaxed.seen == {"omega": 0.25} and type(Relaxed.seen["omega"]) is float  # as checked
        with pytest.raises(curvkit.CurvkitError, match="--ihvp-option relaxed.omega must be a number in"):
            AnalysisPlan(
                options={"ihvp": {"solvers": ["relaxed"], "solver_options": {"relaxed": {"omega": 2}}}}
            )
        # one that declares nothing gets its options as given, checked only by its solve
        curvkit.solve(spd(), b, "plain", omega=2)
        assert Relaxed.seen == {"omega": 2}
    finally:
        curvkit.unregister_plugin(plugin)


def test_a_subset_problem_holds_the_samples_asked_for_in_any_form_of_data():
    problem = mlp_problem(N=10, batch_size=4)
    X, y = problem._data_arg
    index = [7, 2, 9, 2]
    forms = {
        "pair": problem,
        "dataset": curvkit.Problem(problem.model, "mse", torch.utils.data.TensorDataset(X, y), batch_size=3),
        "batches": curvkit.Problem(problem.model, "mse", [(X[:6], y[:6]), (X[6:], y[6:])]),
    }
    for form, full in forms.items():
        inputs, targets = zip(*full.subset(index).batches())
        assert torch.equal(torch.cat(inputs), X[index]) and torch.equal(torch.cat(targets), y[index]), form
    with pytest.raises(curvkit.DataError, match="sample index 10 is outside the data's 10 samples"):
        forms["batches"].subset([3, 10])
    with pytest.raises(curvkit.DataError, match="sample index -1"):
        problem.subset([-1])
    capped = curvkit.Problem(problem.model, "mse", (X, y), max_samples=6)
    with pytest.raises(curvkit.DataError, match="outside the data's 6 samples"):
        capped.subset([6])
    # the same estimator on a permutation of all the samples is the same operator
    G = curvkit.curvature("ggn", problem)
    whole = G.with_problem(problem.subset(torch.randperm(10)))
    assert whole.name == "ggn" and type(whole) is type(G)
    assert torch.allclose(whole.to_dense(), G.to_dense(), atol=1e-13)


def test_lissa_on_all_the_data_is_the_neumann_series():
    problem = mlp_problem()
    G = curvkit.curvature("ggn", problem)
    B = torch.randn(G.shape[0], 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    res = curvkit.solve(G, B, "lissa", damping=0.5, maxiter=30, batch_size=64)
    series = curvkit.solve(G, B, "neumann", damping=0.5, maxiter=31, tol=1e-300)
    assert rel(res.x, series.x) < 1e-10
    # nothing measured, nothing claimed
    assert not res.converged and np_isnan(res.residual) and res.iterations == 30
    assert "stochastic: residual not measured" in res.reason and "mini-batches of 64 of 64" in res.reason
    assert all(np_isnan(row["residual"]) for row in res.history)
    assert res.history[-1]["samples"] >= 30 * 64 and res.matvecs >= 30 * 2
    # an operator without data is used whole: the same series, and the reason says so
    dense = curvkit.DenseOperator(G.to_dense(), psd=True)
    plain = curvkit.solve(dense, B, "lissa", damping=0.5, maxiter=30)
    assert rel(plain.x, series.x) < 1e-10 and "has no data to sample" in plain.reason


def np_isnan(x: float) -> bool:
    return x != x


@pytest.mark.montecarlo
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_lissa_averages_to_the_damped_solve(reduction):
    """Fixed seeds: 16 repeats of 30 steps on mini-batches of 8 of 64 samples (a sum is scaled by N / 8)."""
    problem = mlp_problem(reduction)
    G = curvkit.curvature("ggn", problem)
    dense = G.to_dense()
    damping = 0.25 * torch.linalg.eigvalsh(dense)[-1].item()
    b = torch.randn(G.shape[0], dtype=DT, generator=torch.Generator().manual_seed(1))
    settings = dict(damping=damping, maxiter=30, batch_size=8)
    res = curvkit.solve(G, b, "lissa", **settings, repeats=16, check_every=15)
    exact = truth(curvkit.DenseOperator(dense), b, damping)
    assert rel(res.x, exact) < 5e-2  # measured: 0.0115 for both reductions
    one = curvkit.solve(G, b, "lissa", **settings)
    assert rel(one.x, exact) > 2 * rel(res.x, exact)  # one repeat: 0.060
    # the measured residual is the true one; convergence is claimed from it only
    assert res.residual == pytest.approx(rel(dense @ res.x + damping * res.x, b), rel=1e-8)
    assert res.converged == (res.residual <= 1e-6) and not res.converged and "measured" in res.reason
    measured = [row["iteration"] for row in res.history if not np_isnan(row["residual"])]
    assert measured == list(range(15, 481, 15))  # every 15 steps, and the answer after the last
    assert res.history[-1]["samples"] >= 480 * 8 + 32 * 64  # the mini-batches, the checks
    # the seed fixes the draws (the products' rounding may differ between runs)
    small = dict(settings, maxiter=5, repeats=2, scale=0.5 / damping)
    first, again = (curvkit.solve(G, b, "lissa", **small).x for _ in range(2))
    other = curvkit.solve(G, b, "lissa", **small, seed=1).x
    assert rel(again, first) < 1e-12 and rel(other, first) > 1e-3


def test_lissa_stops_when_it_diverges_or_meets_a_non_finite_value_and_refuses_bad_options():
    G = curvkit.curvature("ggn", mlp_problem())
    b = torch.ones(G.shape[0], dtype=DT)
    lam = torch.linalg.eigvalsh(G.to_dense())[-1].item()
    res = curvkit.solve(G, b, "lissa", damping=0.1, scale=3.0 / lam, maxiter=200, batch_size=16)
    assert not res.converged and res.reason.startswith("diverging at iteration") and "repeat 1" in res.reason
    assert torch.isfinite(res.x).all() and res.iterations < 200
    A = NaNAfter(spd().to_dense(), 4)
    res = curvkit.solve(A, torch.torch.ones(30, dtype=DT), "lissa", scale=0.1, maxiter=50)
    assert not res.converged and res.reason == "non-finite value at iteration 5"
    assert torch.isfinite(res.x).all() and res.x.norm() > 0
    for options, message in [
        ({"batch_size": 65}, r"batch_size must be an integer in 1..64"),
        ({"repeats": 0}, "repeats must be an integer >= 1, got 0"),
        ({"repeats": None}, "repeats must be an integer >= 1, got None"),
        ({"check_every": 0}, "check_every must be an integer >= 1 or None, got 0"),
        ({"scale": -1.0}, "scale must be a finite number > 0, got -1.0"),
        ({"scale": math.inf}, "scale must be a finite number > 0, got inf"),
        ({"depth": 3}, "solver 'lissa' takes no option 'depth'"),
        ({"preconditioner": G}, "lissa takes no preconditioner"),
    ]:
        with pytest.raises(curvkit.CurvkitError, match=message):
            curvkit.solve(G, b, "lissa", damping=0.1, **options)


def test_lissa_called_directly_takes_a_numpy_batch_size_as_solve_does():
    """``lissa`` checks ``batch_size`` with :mod:`curvkit.arguments` as ``repeats`` (a NumPy integer
    from a config was refused by a check of its own) and the bound by the samples after."""
    np = pytest.importorskip("numpy")
    from curvkit.linalg.series import lissa

    G = curvkit.curvature("ggn", mlp_problem())
    B = torch.ones(G.shape[0], 1, dtype=DT)
    options = dict(damping=0.5, tol=1e-6, maxiter=3, x0=None, preconditioner=None, scale=0.5)
    expected = lissa(G, B, batch_size=8, **options).x
    assert torch.equal(lissa(G, B, batch_size=np.int64(8), **options).x, expected)
    for bad, message in [(65, r"in 1\.\.64"), (0, ">= 1, got 0"), (8.0, ">= 1, got 8.0")]:
        with pytest.raises(curvkit.CurvkitError, match=f"batch_size must be an integer {message}"):
            lissa(G, B, batch_size=bad, **options)


@pytest.mark.parametrize("estimator", ["kfac", "ekfac"])
def test_kfac_solvers_apply_the_inverse_of_the_dense_approximation(estimator):
    problem = mlp_problem(N=20)
    G = curvkit.curvature("ggn", problem)
    K = curvkit.curvature(estimator, problem)
    B = torch.randn(G.shape[0], 3, dtype=DT, generator=torch.Generator().manual_seed(2))
    res = curvkit.solve(G, B, estimator, damping=0.1)
    K_dense = K.to_dense()
    assert rel(res.x, truth(curvkit.DenseOperator(K_dense), B, 0.1)) < 1e-10
    # the residual reported is the true one against A (the GGN), not against K
    true_residual = ((G.to_dense() @ res.x + 0.1 * res.x - B).norm(dim=0) / B.norm(dim=0)).max().item()
    assert res.residual == pytest.approx(true_residual, rel=1e-8) and res.residual > 1e-3
    assert not res.converged and f"approximate inverse ({estimator}): relative residual" in res.reason
    assert res.matvecs == 3 and len(res.history) == 1
    # on the approximation itself it is the exact solve
    exact, direct = curvkit.solve(K, B, "exact", damping=0.1), curvkit.solve(K, B, estimator, damping=0.1)
    assert direct.converged and rel(direct.x, exact.x) < 1e-12
    # options go to the estimator
    empirical = curvkit.curvature(estimator, problem, fisher_type="empirical").to_dense()
    res = curvkit.solve(G, B[:, 0], estimator, damping=0.1, fisher_type="empirical")
    assert rel(res.x, truth(curvkit.DenseOperator(empirical), B[:, 0], 0.1)) < 1e-10


def test_kfac_solvers_refuse_what_they_cannot_build():
    b = torch.torch.ones(30, dtype=DT)
    with pytest.raises(curvkit.CurvkitError, match="solver 'kfac' builds KFAC on the operator's problem"):
        curvkit.solve(spd(), b, "kfac", damping=0.1)
    problem = mlp_problem(N=20)
    G = curvkit.curvature("ggn", problem)
    with pytest.raises(curvkit.UnknownOptionError, match="takes no option 'rank'"):
        curvkit.solve(G, torch.ones(G.shape[0], dtype=DT), "kfac", damping=0.1, rank=3)
    K = curvkit.curvature("kfac", problem)
    with pytest.raises(curvkit.CurvkitError, match="is a 'kfac' operator already"):
        curvkit.solve(K, torch.ones(K.shape[0], dtype=DT), "kfac", damping=0.1, fisher_type="empirical")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.PReLU(), nn.Linear(6, 2)).double()
    odd = curvkit.Problem(model, "mse", (torch.randn(8, 4, dtype=DT), torch.randn(8, 2, dtype=DT)))
    H = curvkit.curvature("ggn", odd)
    with pytest.raises(curvkit.UnsupportedModelError, match="no KFAC block for 1 \\(PReLU\\)"):
        curvkit.solve(H, torch.ones(H.shape[0], dtype=DT), "kfac", damping=0.1)


def test_lowrank_is_exact_when_the_rank_is_within_reach():
    gen = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(20, 3, dtype=DT, generator=gen))[0]
    A = curvkit.DenseOperator(U @ torch.diag(torch.tensor([5.0, 2.0, 0.5], dtype=DT)) @ U.T, psd=True)
    B = torch.randn(20, 2, dtype=DT, generator=gen)
    res = curvkit.solve(A, B, "lowrank", damping=0.1, rank=3, tol=1e-8)
    assert res.converged and rel(res.x, truth(A, B, 0.1)) < 1e-8
    assert res.matvecs > 2 and res.history[-1]["matvecs"] == res.matvecs  # Lanczos, then the residual
    columns = torch.stack([curvkit.solve(A, B[:, k], "lowrank", damping=0.1, rank=3).x for k in range(2)], 1)
    assert rel(res.x, columns) < 1e-10
    # fewer pairs than the rank: the inverse of the truncation, and the residual against A says how far
    short = curvkit.solve(A, B, "lowrank", damping=0.1, rank=2)
    values, vectors = torch.linalg.eigh(A.to_dense())
    A2 = vectors[:, -2:] @ torch.diag(values[-2:]) @ vectors[:, -2:].T
    assert rel(short.x, truth(curvkit.DenseOperator(A2), B, 0.1)) < 1e-8
    assert not short.converged and "rank-2 approximation: relative residual" in short.reason
    with pytest.raises(curvkit.CurvkitError, match="lowrank needs damping > 0"):
        curvkit.solve(A, B, "lowrank", rank=3)
    with pytest.raises(curvkit.CurvkitError, match=r"rank must be an integer in 1..20"):
        curvkit.solve(A, B, "lowrank", damping=0.1, rank=21)


def test_kfac_preconditions_cg_on_the_ggn():
    """KFAC as CG's preconditioner, (K + damping I)^-1 from its factors: the same answer in fewer
    iterations (62 instead of 71 here, to 1e-10)."""
    problem = mlp_problem(N=64)
    G = curvkit.curvature("ggn", problem)
    K = curvkit.curvature("kfac", problem)
    _, g = problem.loss_and_gradient()
    damping = 1e-3
    plain = curvkit.solve(G, g, "cg", damping=damping, tol=1e-10, maxiter=500)
    preconditioned = curvkit.solve(G, g, "cg", damping=damping, tol=1e-10, maxiter=500, preconditioner=K)
    assert plain.converged and preconditioned.converged
    assert preconditioned.iterations < plain.iterations
    assert rel(preconditioned.x, truth(G, g, damping)) < 1e-7


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_convergence_is_confirmed_by_the_true_residual_in_float32(method):
    """In float32 the recurrence's residual drifts below the true one: on this system (condition
    number 1e3, P = 300) it claims 1e-5 while the true residual is 1.6e-5. The solver restarts from
    the true residual and, when that no longer improves, says it stagnated at the true figure."""
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(300, 300, dtype=DT, generator=gen))
    M = Q @ torch.diag(torch.logspace(0, 3, 300, dtype=DT)) @ Q.T
    M = (M + M.T) / 2
    b = torch.randn(300, dtype=DT, generator=gen)
    res = curvkit.solve(curvkit.DenseOperator(M.float(), psd=True), b.float(), method, tol=1e-5, maxiter=3000)
    true = ((b - M @ res.x.double()).norm() / b.norm()).item()
    assert not res.converged and res.reason.startswith("stagnated at a true relative residual")
    assert true > 1e-5 and res.residual == pytest.approx(true, rel=0.5)  # the true figure, in float32
    assert res.history[-1]["residual"] == res.residual
    exact = curvkit.solve(curvkit.DenseOperator(M, psd=True), b, method, tol=1e-5, maxiter=3000)
    assert exact.converged and ((b - M @ exact.x).norm() / b.norm()).item() <= 1e-5  # float64: confirmed


def test_lissa_counts_the_samples_its_products_ran_through():
    problem = mlp_problem(N=64)
    G = curvkit.curvature("ggn", problem)
    v = torch.randn(G.shape[0], dtype=DT, generator=torch.Generator().manual_seed(0))
    res = curvkit.solve(G, v, "lissa", damping=0.5, maxiter=5, batch_size=8, scale=0.5)
    samples = [row["samples"] for row in res.history]
    assert samples[:6] == [0, 8, 16, 24, 32, 40]  # one mini-batch of 8 per step, no full-data product
    dense = curvkit.solve(
        curvkit.DenseOperator(G.to_dense(), psd=True), v, "lissa", damping=0.5, maxiter=5, scale=0.5
    )
    assert all("samples" not in row for row in dense.history)  # no data: nothing to count


# ---------------------------------------------------------------- statuses: why a solve stopped, as a token
def float32_ill_conditioned() -> curvkit.DenseOperator:
    """Condition number 1e3, P = 300, in float32: CG asked for 1e-5 stagnates above it."""
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(300, 300, dtype=DT, generator=gen))
    M = Q @ torch.diag(torch.logspace(0, 3, 300, dtype=DT)) @ Q.T
    return curvkit.DenseOperator(((M + M.T) / 2).float(), psd=True)


def diagonal(*values: float) -> curvkit.DenseOperator:
    """``diag(values)``, flagged PSD whatever the values so that no solver warns (the stops are tested)."""
    return curvkit.DenseOperator(torch.diag(torch.tensor(values, dtype=DT)), psd=True)


def rank3() -> curvkit.DenseOperator:
    U = torch.linalg.qr(torch.randn(20, 3, dtype=DT, generator=torch.Generator().manual_seed(0)))[0]
    return curvkit.DenseOperator(U @ torch.diag(torch.tensor([5.0, 2.0, 0.5], dtype=DT)) @ U.T, psd=True)


def ggn() -> curvkit.CurvatureOperator:
    return curvkit.curvature("ggn", mlp_problem(N=20))


def nan_after_4() -> curvkit.DenseOperator:
    return NaNAfter(spd().to_dense(), 4)


def indefinite() -> curvkit.DenseOperator:
    return diagonal(*torch.linspace(-1.0, 2.0, 30).tolist())


def negative() -> curvkit.DenseOperator:
    return diagonal(-1.0, -2.0, -3.0)


def spread() -> curvkit.DenseOperator:
    """Eigenvalues from 0.1 to 1: a scale of 3 puts the largest of ``scale A`` at 3, outside ``(0, 2)``."""
    return diagonal(*torch.linspace(0.1, 1.0, 30).tolist())


def nan_diagonal() -> curvkit.DiagonalOperator:
    return curvkit.DiagonalOperator(torch.tensor([math.nan, 1.0], dtype=DT))


def kfac() -> curvkit.CurvatureOperator:
    return curvkit.curvature("kfac", mlp_problem(N=20))


STOPS = {  # every built-in solver's ways to stop: (operator, solver, options, status), solving A x = ones
    "cg converged": (spd, "cg", {"tol": 1e-10}, "converged"),
    "cg maxiter": (spd, "cg", {"tol": 1e-10, "maxiter": 3}, "maxiter"),
    "cg stagnated": (float32_ill_conditioned, "cg", {"tol": 1e-5, "maxiter": 3000}, "stagnated"),
    "cg indefinite": (indefinite, "cg", {}, "non-positive-curvature"),
    "cg nan": (nan_after_4, "cg", {}, "non-finite"),
    "minres converged": (indefinite, "minres", {}, "converged"),
    "minres maxiter": (spd, "minres", {"tol": 1e-10, "maxiter": 3}, "maxiter"),
    "minres stagnated": (float32_ill_conditioned, "minres", {"tol": 1e-5, "maxiter": 3000}, "stagnated"),
    "minres nan": (nan_after_4, "minres", {}, "non-finite"),
    "neumann converged": (spd, "neumann", {"damping": 0.5, "maxiter": 5000}, "converged"),
    "neumann maxiter": (spd, "neumann", {"damping": 0.5, "maxiter": 3}, "maxiter"),
    "neumann scale too large": (spread, "neumann", {"scale": 3.0}, "diverging"),
    "neumann negative definite": (negative, "neumann", {}, "non-positive-curvature"),
    "neumann nan": (nan_after_4, "neumann", {"scale": 0.1}, "non-finite"),
    "lissa unmeasured": (ggn, "lissa", {"damping": 0.5}, "unmeasured"),
    "lissa measured above tol": (ggn, "lissa", {"damping": 0.5, "maxiter": 4, "check_every": 2}, "maxiter"),
    "lissa measured within tol": (lambda: diagonal(1.0, 1.0), "lissa", {"check_every": 1}, "converged"),
    "lissa scale too large": (spread, "lissa", {"scale": 3.0}, "diverging"),
    "lissa negative definite": (negative, "lissa", {}, "non-positive-curvature"),
    "lissa nan": (nan_after_4, "lissa", {"scale": 0.1}, "non-finite"),
    "exact converged": (spd, "exact", {}, "converged"),
    "exact above tol": (spd, "exact", {"tol": 1e-30}, "above-tol"),
    "exact nan": (nan_diagonal, "exact", {}, "non-finite"),
    "kfac of the ggn": (ggn, "kfac", {"damping": 0.1}, "approximate"),
    "ekfac of the ggn": (ggn, "ekfac", {"damping": 0.1}, "approximate"),
    "kfac of itself": (kfac, "kfac", {"damping": 0.1}, "converged"),
    "lowrank within reach": (rank3, "lowrank", {"damping": 0.1, "rank": 3, "tol": 1e-8}, "converged"),
    "lowrank truncated": (rank3, "lowrank", {"damping": 0.1, "rank": 2}, "approximate"),
    "lowrank negative definite": (negative, "lowrank", {"damping": 0.1, "rank": 2}, "non-positive-curvature"),
}
UNREACHED = {"breakdown"}
"""Statuses no case reaches: MINRES' breakdown (``beta <= tiny`` while a column is active) comes second in
practice, since ``beta = 0`` makes ``sn = beta / gamma``, hence the recurrence's residual ``phibar``, zero
first and the column inactive (only subnormal ``beta`` and ``gbar`` could reach it)."""


@pytest.mark.parametrize("case", STOPS)
def test_every_way_a_builtin_solver_stops_has_its_status(case):
    operator, method, options, expected = STOPS[case]
    A = operator()
    res = curvkit.solve(A, torch.ones(A.shape[0], dtype=A.dtype), method, **options)
    assert res.status == expected, (case, res.status, res.reason)
    assert res.converged == (expected == "converged") and res.status in SOLVE_STATUSES


def test_the_cases_reach_every_status_of_the_table():
    assert {case[-1] for case in STOPS.values()} | UNREACHED == set(SOLVE_STATUSES)
    assert {case[1] for case in STOPS.values()} == {spec.name for spec in curvkit.solvers()}
    assert all(meaning and "\n" not in meaning for meaning in SOLVE_STATUSES.values())
    doc = curvkit.linalg.solve.__doc__
    assert all(f"``{token}``" in doc for token in SOLVE_STATUSES), "the module docstring lists every status"


class ReturnsStatus:
    """A plugin solver ``returns-status`` answering ``B`` itself, with ``converged`` and ``status`` as set."""

    converged, status = False, "maxiter"

    @curvkit.hookimpl
    def curvkit_register_solvers(self):
        def solve(A, B, **_):
            return SolveResult(B, self.converged, "as told", 0, 0, float("nan"), status=self.status)

        return [curvkit.SolverSpec("returns-status", solve, "answers B, stopping as told")]


@pytest.mark.parametrize(
    "converged, status, message",
    [
        (False, "done", "the status 'done'"),
        (False, "", "the status ''"),  # none given
        (False, "Converged", "the status 'Converged'"),
        (True, "maxiter", "returned converged=True with the status 'maxiter'"),
        (False, "converged", "returned converged=False with the status 'converged'"),
    ],
)
def test_a_plugin_solver_must_give_a_known_status_that_agrees_with_converged(converged, status, message):
    plugin = ReturnsStatus()
    plugin.converged, plugin.status = converged, status
    curvkit.register_plugin(plugin, name="returns-status")
    try:
        with pytest.raises(curvkit.CurvkitError) as raised:
            curvkit.solve(spd(), torch.ones(30, dtype=DT), "returns-status")
        text = str(raised.value)
        assert "\n" not in text and "solver 'returns-status'" in text and message in text
        if "with the status" not in message:
            assert ", ".join(SOLVE_STATUSES) in text  # the known tokens, named
        plugin.converged, plugin.status = False, "maxiter"
        assert curvkit.solve(spd(), torch.ones(30, dtype=DT), "returns-status").status == "maxiter"
    finally:
        curvkit.unregister_plugin(plugin)


def test_a_plugin_solver_gives_its_status_through_the_history():
    """``SolveHistory.result`` and ``measured`` take the status token; ``converged`` follows from it."""

    class Jacobi:
        @curvkit.hookimpl
        def curvkit_register_solvers(self):
            def solve(A, B, *, damping, tol, maxiter, callback=None, **_):
                history = SolveHistory(A, damping, B, callback)
                X = B / (A.diagonal()[:, None] + damping)
                return history.measured(B, X, 1, tol, "approximate", "Jacobi: relative residual {residual}")

            return [curvkit.SolverSpec("jacobi", solve, "the inverse of the diagonal")]

    plugin = Jacobi()
    curvkit.register_plugin(plugin, name="jacobi")
    try:
        diagonal = curvkit.DenseOperator(torch.diag(torch.arange(1.0, 31.0, dtype=DT)), psd=True)
        assert curvkit.solve(diagonal, torch.ones(30, dtype=DT), "jacobi").status == "converged"
        res = curvkit.solve(spd(), torch.ones(30, dtype=DT), "jacobi")
        assert (res.status, res.converged) == ("approximate", False) and res.reason.startswith("Jacobi: ")
    finally:
        curvkit.unregister_plugin(plugin)


def test_refuse_options_is_kept_for_plugins_that_sort_their_own_options():
    from curvkit.linalg.solve import refuse_options

    refuse_options("mine", {})
    with pytest.raises(curvkit.CurvkitError, match=r"^solver 'mine' takes no option 'a', 'b'$"):
        refuse_options("mine", {"b": 1, "a": 2})
