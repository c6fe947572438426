"""The operator contract: products, shapes, algebra, flags, dense and SciPy views, restriction.

Checked on :class:`curvkit.DenseOperator` (truth: its matrix) and on the ``hessian``
estimator (truth: :func:`curvkit.testing.dense_hessian_reference`), in float64.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from torch import nn

import curvkit
import curvkit.problem_operator
from curvkit.testing import CASES, dense_hessian_reference, get_case

DT = torch.float64
LAYOUT = curvkit.ParameterLayout(
    ("a", "lin.weight", "lin.bias"), (torch.Size([2]), torch.Size([2, 3]), torch.Size([3]))
)
P = LAYOUT.dim  # 11


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sym(seed: int = 0, psd: bool = False) -> torch.Tensor:
    A = torch.randn(P, P, generator=_gen(seed), dtype=DT)
    return A @ A.T if psd else (A + A.T) / 2


def _dense(seed: int = 0, psd: bool = False, **kw) -> curvkit.DenseOperator:
    return curvkit.DenseOperator(_sym(seed, psd), LAYOUT, psd=psd, **kw)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-12) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * max(1.0, b.abs().max().item()))


@functools.cache
def _reference(case_name: str) -> torch.Tensor:
    H = dense_hessian_reference(get_case(case_name).problem())
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-12)  # the truth is symmetric
    return H


# --------------------------------------------------------------------------- products
def test_products_of_flat_vectors_and_matrices():
    A = _dense(1)
    v = torch.randn(P, generator=_gen(2), dtype=DT)
    M = torch.randn(P, 4, generator=_gen(3), dtype=DT)
    _close(A @ v, A.matrix @ v)
    _close(A @ M, A.matrix @ M)
    _close(A.matvec(v), A.matrix @ v)
    _close(A.matmat(M), A.matrix @ M)
    assert (A @ v).shape == (P,) and (A @ M).shape == (P, 4)
    # other float dtypes are cast to the operator's
    _close(A @ v.float(), A.matrix @ v.float().double())


def test_products_of_per_parameter_lists():
    A = _dense(1)
    v = torch.randn(P, generator=_gen(2), dtype=DT)
    M = torch.randn(P, 3, generator=_gen(3), dtype=DT)
    parts = LAYOUT.unflatten(v)
    assert [p.shape for p in parts] == [torch.Size([2]), torch.Size([2, 3]), torch.Size([3])]
    out = A @ parts
    assert isinstance(out, list) and [o.shape for o in out] == [p.shape for p in parts]
    _close(torch.cat([o.reshape(-1) for o in out]), A.matrix @ v)
    out = A @ tuple(parts)
    _close(torch.cat([o.reshape(-1) for o in out]), A.matrix @ v)
    # with a trailing K dimension on every tensor
    cols = LAYOUT.unflatten(M)
    assert [c.shape for c in cols] == [torch.Size([2, 3]), torch.Size([2, 3, 3]), torch.Size([3, 3])]
    out = A @ cols
    assert [o.shape for o in out] == [c.shape for c in cols]
    _close(torch.cat([o.reshape(-1, 3) for o in out]), A.matrix @ M)


def test_products_of_lists_on_a_problem_operator():
    problem = get_case("mlp-mse").problem()
    H = curvkit.curvature("hessian", problem)
    truth = _reference("mlp-mse")
    M = torch.randn(problem.dim, 2, generator=_gen(4), dtype=DT)
    params = [p.detach() for p in problem.params]
    vs = [torch.randn(p.shape, generator=_gen(5 + i), dtype=DT) for i, p in enumerate(params)]
    out = H @ vs
    flat = torch.cat([v.reshape(-1) for v in vs])
    _close(torch.cat([o.reshape(-1) for o in out]), truth @ flat, rtol=1e-10)
    out = H @ problem.layout.unflatten(M)
    assert [o.shape for o in out] == [(*p.shape, 2) for p in params]
    _close(problem.layout.flatten(out, batch_dims=1), truth @ M, rtol=1e-10)


@pytest.mark.parametrize(
    "operand",
    [
        torch.zeros(P + 1, dtype=DT),
        torch.zeros(P - 1, 2, dtype=DT),
        torch.zeros(P, 2, 2, dtype=DT),
        torch.zeros((), dtype=DT),
        [torch.zeros(2, dtype=DT), torch.zeros(2, 3, dtype=DT)],
        [torch.zeros(2, dtype=DT), torch.zeros(3, 2, dtype=DT), torch.zeros(3, dtype=DT)],
        [torch.zeros(2, 4, dtype=DT), torch.zeros(2, 3, 4, dtype=DT), torch.zeros(3, 5, dtype=DT)],
    ],
    ids=["long-vector", "short-matrix", "3d", "scalar", "short-list", "wrong-shape", "ragged-K"],
)
def test_shape_errors(operand):
    A = _dense()
    with pytest.raises(curvkit.ShapeMismatchError):
        A @ operand


def test_shape_errors_of_matvec_matmat_and_construction():
    A = _dense()
    with pytest.raises(curvkit.ShapeMismatchError):
        A.matvec(torch.zeros(P, 1, dtype=DT))
    with pytest.raises(curvkit.ShapeMismatchError):
        A.matmat(torch.zeros(P, dtype=DT))
    with pytest.raises(curvkit.ShapeMismatchError):
        curvkit.DenseOperator(torch.zeros(3, 4, dtype=DT))
    with pytest.raises(curvkit.ShapeMismatchError):
        curvkit.DenseOperator(torch.zeros(4, 4, dtype=DT), LAYOUT)
    other = curvkit.DenseOperator(torch.eye(P, dtype=DT))  # same size, other parameters
    with pytest.raises(curvkit.ShapeMismatchError):
        A + other
    assert isinstance(curvkit.ShapeMismatchError("x"), ValueError)


# --------------------------------------------------------------------------- algebra
def test_algebra_against_dense_matrices():
    A, B = _dense(1), _dense(2)
    MA, MB = A.matrix, B.matrix
    eye = torch.eye(P, dtype=DT)
    v = torch.randn(P, 3, generator=_gen(7), dtype=DT)
    expected = {
        "2*A": (2.0 * A, 2 * MA),
        "A*2": (A * 2, 2 * MA),
        "int*A": (3 * A, 3 * MA),
        "tensor-scalar": (A * torch.tensor(0.5), 0.5 * MA),
        "scalar-tensor": (torch.tensor(0.5, dtype=DT) * A, 0.5 * MA),
        "A+B": (A + B, MA + MB),
        "A-B": (A - B, MA - MB),
        "-A": (-A, -MA),
        "A/2": (A / 2, MA / 2),
        "damped": (A.damped(0.3), MA + 0.3 * eye),
        "combo": ((2.0 * A - B / 4).damped(1e-2) + (-A), 2 * MA - MB / 4 + 1e-2 * eye - MA),
    }
    for name, (op, M) in expected.items():
        assert isinstance(op, curvkit.CurvatureOperator), name
        assert op.shape == (P, P), name
        assert op.layout == LAYOUT, name
        _close(op.to_dense(), M)
        _close(op @ v, M @ v)
        _close(op @ v[:, 0], M @ v[:, 0])
    with pytest.raises(TypeError):
        A * "2"
    with pytest.raises(TypeError):
        A + MA


def test_algebra_on_the_hessian():
    case = get_case("tanh-mlp-ce")
    problem = case.problem()
    H = curvkit.curvature("hessian", problem)
    truth = _reference(case.name)
    G = curvkit.DenseOperator(_sym_like(truth, 11), problem.layout)
    v = torch.randn(problem.dim, 2, generator=_gen(8), dtype=DT)
    eye = torch.eye(problem.dim, dtype=DT)
    for op, M in [
        (2.0 * H, 2 * truth),
        (H + G, truth + G.matrix),
        (H - G, truth - G.matrix),
        (-H, -truth),
        (H / 2, truth / 2),
        (H.damped(0.1), truth + 0.1 * eye),
    ]:
        _close(op @ v, M @ v, rtol=1e-10)


def _sym_like(M: torch.Tensor, seed: int) -> torch.Tensor:
    A = torch.randn(*M.shape, generator=_gen(seed), dtype=M.dtype)
    return (A + A.T) / 2


class _Stochastic(curvkit.DenseOperator):
    STOCHASTIC = True


class _Resampling(curvkit.DenseOperator):
    STOCHASTIC = RESAMPLES = True


def test_flags_propagate():
    psd, indefinite = _dense(1, psd=True), _dense(2)
    assert psd.flags == {
        "symmetric": True,
        "psd": True,
        "exact": True,
        "stochastic": False,
        "resamples": False,
    }
    assert not indefinite.PSD
    assert psd.damped(0.1).PSD
    assert not psd.damped(-0.1).PSD
    assert not indefinite.damped(0.1).PSD  # unknown, so not claimed
    assert (2.0 * psd).PSD and (psd / 3).PSD
    assert not (-psd).PSD and not (psd * -1.0).PSD
    assert (psd + psd.damped(1.0)).PSD
    assert not (psd + indefinite).PSD
    assert not (psd - psd).PSD
    assert curvkit.IdentityOperator(LAYOUT, 2.0, dtype=DT, device="cpu").PSD
    assert not curvkit.IdentityOperator(LAYOUT, -2.0, dtype=DT, device="cpu").PSD

    noisy = _Stochastic(_sym(3), LAYOUT)
    assert noisy.STOCHASTIC
    assert (psd + noisy).STOCHASTIC and (noisy + psd).STOCHASTIC
    assert (2.0 * noisy).STOCHASTIC and noisy.damped(1.0).STOCHASTIC
    assert not (psd + psd).STOCHASTIC and not (psd + noisy).RESAMPLES
    resampling = _Resampling(_sym(3), LAYOUT)
    assert (psd + resampling).RESAMPLES and (2.0 * resampling).RESAMPLES
    assert resampling.restrict("a").RESAMPLES and resampling.T.RESAMPLES

    inexact = _dense(4, exact=False)
    assert not (psd + inexact).EXACT and (psd + psd).EXACT and not (3 * inexact).EXACT
    nonsym = curvkit.DenseOperator(torch.randn(P, P, generator=_gen(5), dtype=DT), LAYOUT)
    assert not nonsym.SYMMETRIC
    assert not (psd + nonsym).SYMMETRIC and (psd + indefinite).SYMMETRIC

    H = curvkit.curvature("hessian", get_case("mlp-mse").problem())
    assert H.flags == {
        "symmetric": True,
        "psd": False,
        "exact": True,
        "stochastic": False,
        "resamples": False,
    }
    assert not H.damped(1.0).PSD


# --------------------------------------------------------------------------- dense
def test_to_dense_refuses_past_max_dim():
    A = _dense()
    _close(A.to_dense(max_dim=P), A.matrix)
    scaled = 2.0 * A  # the generic, product-based path
    _close(scaled.to_dense(max_dim=P, block_size=4), 2 * A.matrix)
    for op in (A, scaled):
        with pytest.raises(curvkit.DenseTooLargeError) as info:
            op.to_dense(max_dim=P - 1)
        message = str(info.value)
        assert "\n" not in message
        assert "restrict" in message and str(P) in message
    assert isinstance(info.value, MemoryError) and isinstance(info.value, curvkit.CurvkitError)


def test_to_dense_limit_from_the_environment(monkeypatch):
    A = _dense()
    monkeypatch.setenv("CURVKIT_MAX_DENSE_DIM", str(P - 1))
    with pytest.raises(curvkit.DenseTooLargeError, match="restrict"):
        A.to_dense()
    with pytest.raises(curvkit.DenseTooLargeError):
        (A + A).to_dense()
    _close(A.to_dense(max_dim=P), A.matrix)  # an explicit limit wins
    problem = get_case("mlp-mse").problem()
    with pytest.raises(curvkit.DenseTooLargeError) as info:
        curvkit.curvature("hessian", problem).to_dense()
    assert "\n" not in str(info.value)
    with pytest.raises(curvkit.DenseTooLargeError):
        curvkit.curvature("exact-hessian", problem)
    # a block under the limit is fine
    block = curvkit.curvature("hessian", problem).restrict("2")
    assert block.shape[0] <= P - 1
    _close(block.to_dense(), _reference("mlp-mse")[-block.shape[0] :, -block.shape[0] :], rtol=1e-10)
    monkeypatch.setenv("CURVKIT_MAX_DENSE_DIM", str(P))
    _close(A.to_dense(), A.matrix)


def test_to_dense_counts_matvecs():
    A = _dense()
    scaled = 2.0 * A
    scaled.to_dense(block_size=4)
    assert scaled.matvecs == P and A.matvecs == P
    v = torch.ones(P, dtype=DT)
    A.matvecs = 0
    A @ v
    assert A.matvecs == 1
    A @ torch.ones(P, 5, dtype=DT)
    assert A.matvecs == 6
    A @ LAYOUT.unflatten(v)
    assert A.matvecs == 7
    A @ LAYOUT.unflatten(torch.ones(P, 2, dtype=DT))
    assert A.matvecs == 9
    A.T @ v
    assert A.matvecs == 10


def test_hessian_counts_matvecs_and_data_passes():
    H = curvkit.curvature("hessian", get_case("mlp-mse").problem(), cache_graph=False)
    H @ torch.ones(H.shape[0], 4, dtype=DT)
    assert H.matvecs == 4
    assert H.data_passes == 1  # all columns in one pass
    H @ torch.ones(H.shape[0], dtype=DT)
    assert H.matvecs == 5 and H.data_passes == 2


# --------------------------------------------------------------------------- scipy
def test_to_scipy_matches_torch():
    nonsym = curvkit.DenseOperator(torch.randn(P, P, generator=_gen(5), dtype=DT), LAYOUT)
    L = nonsym.to_scipy()
    assert L.shape == (P, P) and L.dtype == np.float64
    rng = np.random.default_rng(0)
    x, X = rng.standard_normal(P), rng.standard_normal((P, 3))
    M = nonsym.matrix.numpy()
    np.testing.assert_allclose(L.matvec(x), M @ x, rtol=1e-12)
    np.testing.assert_allclose(L @ x, M @ x, rtol=1e-12)
    np.testing.assert_allclose(L.matmat(X), M @ X, rtol=1e-12)
    np.testing.assert_allclose(L.rmatvec(x), M.T @ x, rtol=1e-12)
    assert L.matvec(x).shape == (P,) and L.matmat(X).shape == (P, 3)
    assert nonsym.to_scipy(dtype=np.float32).matvec(x).dtype == np.float32


def test_scipy_eigsh_finds_the_top_eigenvalue_of_the_hessian():
    case = get_case("tanh-mlp-ce")
    H = curvkit.curvature("hessian", case.problem())
    truth = _reference(case.name)
    top = scipy.sparse.linalg.eigsh(H.to_scipy(), k=1, which="LA", tol=1e-12, return_eigenvectors=False)
    np.testing.assert_allclose(top[0], torch.linalg.eigvalsh(truth)[-1].item(), rtol=1e-9)
    np.testing.assert_allclose(H.to_scipy().matvec(np.ones(H.shape[0])), truth.sum(1).numpy(), rtol=1e-10)


# --------------------------------------------------------------------------- restrict
@pytest.mark.parametrize(
    "params",
    ["2.weight", "0", ["2.bias", "0.weight"], ["0.bias"]],
    ids=["name", "module-prefix", "names-out-of-order", "one-bias"],
)
def test_restrict_hessian_equals_the_dense_block(params):
    case = get_case("tanh-mlp-ce")
    problem = case.problem()
    H = curvkit.curvature("hessian", problem)
    truth = _reference(case.name)
    block = H.restrict(params)
    wanted = [params] if isinstance(params, str) else params
    names = [n for n in problem.param_names if any(n == w or n.startswith(w + ".") for w in wanted)]
    assert block.layout.names == tuple(names)
    idx = problem.layout.indices(names)
    _close(block.to_dense(), truth[idx][:, idx], rtol=1e-10)
    # a ProblemOperator differentiates only the block: same estimator, smaller problem
    assert type(block) is type(H)
    assert block.problem.param_names == tuple(names)
    assert block.problem.dim == len(idx)
    assert block.problem.model is problem.model
    assert block.options == H.options
    # restricting a damped operator restricts each term
    damped = H.damped(0.25).restrict(params)
    _close(damped.to_dense(), truth[idx][:, idx] + 0.25 * torch.eye(len(idx), dtype=DT), rtol=1e-10)


def test_restrict_unknown_name():
    with pytest.raises(curvkit.ParameterSelectionError):
        curvkit.curvature("hessian", get_case("mlp-mse").problem()).restrict("nope")
    with pytest.raises(curvkit.ParameterSelectionError):
        _dense().restrict("lin.weigh")


def test_restrict_dense_identity_sum_and_scaled():
    A, B = _dense(1), _dense(2, psd=True)
    idx = LAYOUT.indices(["lin.weight", "lin.bias"])
    for params in ("lin", ["lin.bias", "lin.weight"]):
        block = A.restrict(params)
        assert isinstance(block, curvkit.DenseOperator)
        assert block.layout.names == ("lin.weight", "lin.bias")
        _close(block.matrix, A.matrix[idx][:, idx])
    assert B.restrict("a").PSD

    identity = curvkit.IdentityOperator(LAYOUT, 3.0, dtype=DT, device="cpu")
    block = identity.restrict("lin.weight")
    assert isinstance(block, curvkit.IdentityOperator) and block.shape == (6, 6)
    _close(block.to_dense(), 3.0 * torch.eye(6, dtype=DT))

    total = A + B.damped(0.5)
    block = total.restrict("lin")
    assert isinstance(block, curvkit.SumOperator)
    _close(block.to_dense(), (A.matrix + B.matrix + 0.5 * torch.eye(P, dtype=DT))[idx][:, idx])

    scaled = 2.0 * A  # generic restriction by embedding
    block = scaled.restrict(["a"])
    assert block.shape == (2, 2)
    _close(block.to_dense(), 2 * A.matrix[:2, :2])
    _close(block @ torch.ones(2, dtype=DT), 2 * A.matrix[:2, :2].sum(1))


# --------------------------------------------------------------------------- transpose
def test_transpose_of_a_non_symmetric_operator():
    M = torch.randn(P, P, generator=_gen(9), dtype=DT)
    A = curvkit.DenseOperator(M, LAYOUT)
    assert not A.SYMMETRIC
    v = torch.randn(P, 2, generator=_gen(10), dtype=DT)
    _close(A.T @ v, M.T @ v)
    _close(A.T.to_dense(), M.T)
    _close(A.T.T @ v, M @ v)
    _close(A.rmatmat(v), M.T @ v)
    _close((2.0 * A).T @ v, 2 * M.T @ v)
    _close((A + A.T).to_dense(), M + M.T)
    S = _dense(1)
    assert S.T is S


# --------------------------------------------------------------------------- cache invalidation
def _fresh(case, model: nn.Module, batch_size: int = 5) -> curvkit.Problem:
    """A new problem on the (updated) model and the case's data."""
    _, inputs, targets = case.build()
    return curvkit.Problem(model, case.loss, (inputs, targets), batch_size=batch_size)


def _sgd_step(problem: curvkit.Problem, lr: float = 0.3) -> None:
    optimizer = torch.optim.SGD(problem.model.parameters(), lr=lr, momentum=0.9)
    _, grad = problem.loss_and_gradient()
    for p, g in zip(problem.params, problem.layout.unflatten(grad)):
        p.grad = g.clone()
    optimizer.step()


@pytest.mark.parametrize("strategy", ["auto", "reverse", "batched-reverse", "forward-over-reverse"])
def test_products_follow_in_place_parameter_updates(strategy):
    case = get_case("tanh-mlp-ce")
    problem = case.problem()
    H = curvkit.curvature("hessian", problem, strategy=strategy, cache_graph=True)
    M = torch.randn(problem.dim, 3, generator=_gen(11), dtype=DT)
    before = H @ M
    _close(before, _reference(case.name) @ M, rtol=1e-10)
    _sgd_step(problem)
    after = H @ M
    fresh = dense_hessian_reference(_fresh(case, problem.model, batch_size=4))
    _close(after, fresh @ M, rtol=1e-10)
    assert (after - before).abs().max() > 1e-3  # the update changed the Hessian
    # and once more, with a load_state_dict (copy_ in place)
    state = {k: v * 0.5 for k, v in problem.model.state_dict().items()}
    problem.model.load_state_dict(state)
    fresh = dense_hessian_reference(_fresh(case, problem.model))
    _close(H @ M[:, 0], fresh @ M[:, 0], rtol=1e-10)


def test_exact_hessian_is_rebuilt_after_an_update():
    case = get_case("mlp-mse")
    problem = case.problem()
    E = curvkit.curvature("exact-hessian", problem)
    _close(E.to_dense(), _reference(case.name), rtol=1e-10)
    _sgd_step(problem)
    fresh = dense_hessian_reference(_fresh(case, problem.model))
    _close(E.to_dense(), fresh, rtol=1e-10)


def test_products_follow_buffer_updates():
    case = get_case("batchnorm-eval-bce")
    problem = case.problem()
    H = curvkit.curvature("hessian", problem, cache_graph=True)
    v = torch.randn(problem.dim, generator=_gen(12), dtype=DT)
    _close(H @ v, _reference(case.name) @ v, rtol=1e-10)
    bn = problem.model[1]
    with torch.no_grad():
        bn.running_var.mul_(3.0)
        bn.running_mean.add_(0.5)
    fresh = dense_hessian_reference(_fresh(case, problem.model))
    assert (fresh - _reference(case.name)).abs().max() > 1e-3
    _close(H @ v, fresh @ v, rtol=1e-10)


# --------------------------------------------------------------------------- strategies
STRATEGIES = ["reverse", "batched-reverse", "forward-over-reverse", "auto"]
CACHES = {  # cache_graph, graph_cache_bytes
    "cache-true": (True, None),
    "cache-false": (False, None),
    "cache-auto": ("auto", None),
    "tiny-budget": ("auto", 1),  # graphs do not fit: products fall back to one pass each
}


GRID = [
    (case.name, strategy, cache)
    for case in CASES
    for strategy in STRATEGIES
    # forward-over-reverse builds no gradient graph, so caching options do not apply
    for cache in (["cache-auto"] if strategy == "forward-over-reverse" else list(CACHES))
]


@pytest.mark.parametrize(("case", "strategy", "cache"), GRID)
def test_hvp_strategies_and_graph_caching_agree_with_the_reference(case, strategy, cache):
    cache_graph, budget = CACHES[cache]
    problem = get_case(case).problem(batch_size=4)
    H = curvkit.curvature(
        "hessian", problem, strategy=strategy, cache_graph=cache_graph, graph_cache_bytes=budget
    )
    truth = _reference(case)
    M = torch.randn(problem.dim, 3, generator=_gen(13), dtype=DT)
    _close(H @ M, truth @ M, rtol=1e-10)  # builds (and maybe keeps) the graphs
    _close(H @ M, truth @ M, rtol=1e-10)  # reuses them, if kept
    _close(H @ M[:, 1], truth @ M[:, 1], rtol=1e-10)
    if strategy != "forward-over-reverse":
        assert H.engine.graph_cached == (cache in ("cache-true", "cache-auto"))


def test_unknown_strategy_and_cache_option():
    problem = get_case("mlp-mse").problem()
    with pytest.raises(curvkit.CurvkitError, match="strategy"):
        curvkit.curvature("hessian", problem, strategy="sideways")
    with pytest.raises(curvkit.CurvkitError, match="cache_graph"):
        curvkit.curvature("hessian", problem, cache_graph="sometimes")


def test_restrict_leaves_the_model_alone_and_matches_a_closed_form():
    model = nn.Sequential(nn.Linear(3, 2)).to(DT)
    X, y = torch.randn(6, 3, dtype=DT), torch.randn(6, 2, dtype=DT)
    problem = curvkit.Problem(model, "mse", (X, y))
    H = curvkit.curvature("hessian", problem)
    H.restrict("0.bias") @ torch.ones(2, dtype=DT)
    assert all(p.requires_grad for p in model.parameters())
    assert problem.param_names == ("0.weight", "0.bias")
    # Hessian of the mean squared error of a linear model: 2/(N*out) X~^T X~ per output
    Xb = torch.cat([X, torch.ones(6, 1, dtype=DT)], dim=1)
    per_output = 2.0 / 12 * Xb.T @ Xb
    dense = H.to_dense()
    w_idx = [0, 1, 2, 6]  # first output row of the weight, and its bias
    _close(dense[w_idx][:, w_idx], per_output, rtol=1e-12)


# ---------------------------------------------------------------- mixed precision (astype)
def test_astype_computes_products_in_the_operators_precision():
    matrix = torch.randn(P, P, generator=_gen(7), dtype=DT)
    matrix = matrix + matrix.T
    low = curvkit.DenseOperator(matrix.to(torch.bfloat16), LAYOUT)
    A = low.astype(torch.float32)
    assert A.dtype == torch.float32 and A.product_dtype == torch.bfloat16 and A.SYMMETRIC
    M = torch.randn(P, 3, generator=_gen(8))
    expected = (low @ M.to(torch.bfloat16)).float()  # the bfloat16 product, converted
    assert torch.equal(A @ M, expected) and (A @ M).dtype == torch.float32
    assert torch.equal(A.diagonal(), low.diagonal().float())
    assert torch.equal(A.restrict("lin.bias").to_dense(), low.restrict("lin.bias").to_dense().float())
    assert (2.0 * A).product_dtype == torch.bfloat16 and A.T.product_dtype == torch.bfloat16
    assert (A + curvkit.DenseOperator(matrix.float(), LAYOUT)).product_dtype == torch.bfloat16
    assert low.astype(torch.bfloat16) is low and not A.STRUCTURE


def test_bfloat16_products_with_float32_analyses_find_the_spectrum_to_bfloat16_accuracy():
    problem = get_case("tanh-mlp-ce").problem()
    truth = torch.linalg.eigvalsh(dense_hessian_reference(problem)).flip(0)[:2]
    H = curvkit.curvature("hessian", problem.to(torch.bfloat16)).astype(torch.float32)
    with pytest.warns(curvkit.CurvkitWarning, match="torch.bfloat16 products can certify") as warned:
        res = curvkit.eigenvalues(H, k=2, tol=1e-8)
    assert warned[0].filename == __file__  # the warning points at the caller's line
    assert res.values.dtype == torch.float32 and not res.converged and res.precision_floor > 1e-5
    assert ((res.values.double() - truth).abs() / truth.abs()).max() < 2e-2
    assert curvkit.checks.agreement_accuracy(1e-4, H.product_dtype) == pytest.approx(2.0**-3.5)
    dens = curvkit.density(H, steps=12, runs=1)  # the float32 basis keeps its steps
    assert dens.density.dtype == torch.float32 and dens.run_steps[0] == 12


def test_a_converted_data_backed_operator_keeps_its_problem_structure_and_passes():
    problem = get_case("tanh-mlp-ce").problem()
    G = curvkit.curvature("ggn", problem.to(torch.float32))
    A = G.astype(DT)
    assert A.problem is G.problem and curvkit.problem_operator.data_backed(A)
    v = torch.randn(problem.dim, generator=_gen(3), dtype=DT)
    before = G.data_passes
    A @ v
    assert A.data_passes == G.data_passes == before + 1  # the operator's own passes, reported through
    res = curvkit.solve(A, v, "lissa", damping=1.0, maxiter=3, batch_size=4, scale=0.5)
    assert [row["samples"] for row in res.history][:3] == [0, 4, 8]  # mini-batches, not the whole data
    K = curvkit.curvature("kfac", problem.to(torch.float32))
    solved = curvkit.solve(A, v, "kfac", damping=0.1)  # KFAC built on the operator's problem, converted
    assert solved.x.dtype == DT and torch.allclose(solved.x, K.solve(v.float(), 0.1).double(), rtol=1e-5)
    B = K.astype(DT)
    assert B.STRUCTURE == K.STRUCTURE and abs(B.trace() - K.trace()) <= 1e-6 * abs(K.trace())
    assert curvkit.inverse(A, damping=1.0, method="cg").product_dtype == torch.float32


def test_sums_of_integer_operators_keep_working():
    M = torch.arange(4).reshape(2, 2)
    S = curvkit.DenseOperator(M, symmetric=False) + curvkit.DenseOperator(M, symmetric=False)
    assert torch.equal(S.to_dense(), 2 * M) and S.product_dtype == torch.int64
