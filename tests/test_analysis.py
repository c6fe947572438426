"""The analysis plan and its runner: order, streaming of results, resume."""

from __future__ import annotations

import pytest

import curvkit
from curvkit.analysis import AnalysisPlan, Reference, run_plan
from curvkit.testing import dense_hessian_reference, get_case


@pytest.fixture(scope="module")
def problem():
    return get_case("tanh-mlp-ce").problem()


def test_keys_follow_the_plan():
    assert AnalysisPlan().keys() == ["eigen/largest", "trace/hutch++", "density/slq"]
    plan = AnalysisPlan(top_k=3, bottom_k=2, trace="exact", density=False, check=True, per_layer=True)
    assert plan.keys(psd=True) == [
        "eigen/largest",
        "eigen/smallest",
        "trace/exact",
        "checks/symmetry",
        "checks/residuals",
        "checks/psd",
        "checks/agreement",
        "per_layer/module",
    ]
    with pytest.raises(curvkit.CurvkitError, match="trace method"):
        AnalysisPlan(trace="median")


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"tol": 0.0}, r"--tol must be a number in \(0, 1\) \(1 is met by any vector\), got 0.0"),
        ({"tol": float("nan")}, r"--tol must be a number in \(0, 1\) \(1 is met by any vector\), got nan"),
        ({"tol": float("inf")}, r"--tol must be a number in \(0, 1\) \(1 is met by any vector\), got inf"),
        ({"trace_matvecs": 0}, "--trace-matvecs must be an integer >= 1, got 0"),
        ({"density_steps": 0}, "density steps must be an integer >= 1, got 0"),
        ({"density_runs": 2.5}, "density runs must be an integer >= 1, got 2.5"),
        ({"top_k": -1}, "--top-k must be an integer >= 0, got -1"),
        ({"top_k": 2.0}, "--top-k must be an integer >= 0, got 2.0"),
        ({"bottom_k": -1}, "--bottom-k must be an integer >= 0, got -1"),
        ({"max_matvecs": 0}, "--max-matvecs must be an integer >= 1, got 0"),
        ({"reorthogonalisation": "sometimes"}, "unknown reorthogonalisation"),
        ({"top_k": 0, "trace": None, "density": False}, "no analysis asked for"),
    ],
)
def test_a_plan_refuses_bad_options(options, fragment):
    with pytest.raises(curvkit.CurvkitError, match=fragment):
        AnalysisPlan(**options)


def test_a_plan_keeps_its_numbers_as_plain_python_numbers():
    """A tensor ``tol`` was kept as the tensor (and NumPy numbers as NumPy's) in the plan, whose
    settings are its results' requests; a float ``top_k`` was accepted and failed inside Lanczos."""
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    plan = AnalysisPlan(
        top_k=np.int64(3),
        bottom_k=np.int8(1),
        tol=torch.tensor(1e-5, dtype=torch.float64),
        trace_matvecs=np.int64(30),
        density_steps=np.int32(10),
        density_runs=np.int64(2),
        max_matvecs=np.int64(500),
    )
    numbers = {name: getattr(plan, name) for name in ("top_k", "bottom_k", "tol", "trace_matvecs")}
    numbers |= {name: getattr(plan, name) for name in ("density_steps", "density_runs", "max_matvecs")}
    assert numbers == {
        "top_k": 3,
        "bottom_k": 1,
        "tol": 1e-5,
        "trace_matvecs": 30,
        "density_steps": 10,
        "density_runs": 2,
        "max_matvecs": 500,
    }
    assert [type(value) for value in numbers.values()] == [int, int, float, int, int, int, int]
    plain = AnalysisPlan(top_k=3, bottom_k=1, tol=1e-5, max_matvecs=500)
    assert plan.request("eigen/largest") == plain.request("eigen/largest")
    for bad in (2.0, True):
        with pytest.raises(curvkit.CurvkitError, match=r"^--top-k must be an integer >= 0, got "):
            AnalysisPlan(top_k=bad)


def test_a_plan_refuses_more_eigenpairs_than_parameters():
    AnalysisPlan(top_k=5).check_dimension(5)
    with pytest.raises(curvkit.CurvkitError, match="--bottom-k 6 is larger than .* P=5"):
        AnalysisPlan(top_k=1, bottom_k=6).check_dimension(5)


def test_requests_name_what_determines_each_result():
    plan = AnalysisPlan(top_k=3, bottom_k=2, check=True, per_layer=True, tol=1e-5, seed=7)
    keys = plan.keys(psd=True)
    requests = {key: plan.request(key) for key in keys}
    solver = {"max_matvecs": None, "reorthogonalisation": "auto"}
    assert requests["eigen/largest"] == {"k": 3, "which": "largest", "tol": 1e-5, "seed": 7, **solver}
    assert requests["eigen/smallest"] == {"k": 2, "which": "smallest", "tol": 1e-5, "seed": 7, **solver}
    assert requests["trace/hutch++"] == {"method": "hutch++", "matvecs": 99, "seed": 7}
    assert requests["density/slq"] == {"steps": 60, "runs": 3, "seed": 7}
    assert all(r["seed"] == 7 for r in requests.values())
    # every option that changes a result changes its request
    assert AnalysisPlan(top_k=4).request("eigen/largest") != AnalysisPlan(top_k=5).request("eigen/largest")
    assert AnalysisPlan(tol=1e-6).request("eigen/largest") != AnalysisPlan().request("eigen/largest")
    assert AnalysisPlan(trace_matvecs=300).request("trace/hutch++") != AnalysisPlan().request("trace/hutch++")
    assert AnalysisPlan(density_runs=5).request("density/slq") != AnalysisPlan().request("density/slq")
    for option in ({"max_matvecs": 50}, {"reorthogonalisation": "full"}):
        assert AnalysisPlan(**option).request("eigen/largest") != AnalysisPlan().request("eigen/largest")
    with pytest.raises(curvkit.CurvkitError, match="no analysis"):
        plan.request("eigen/middle")


def test_results_stream_in_order_and_are_right(problem):
    H = curvkit.curvature("hessian", problem)
    truth = dense_hessian_reference(problem)
    streamed = []
    plan = AnalysisPlan(top_k=2, bottom_k=1, trace="exact", density=True, check=True, tol=1e-8)
    reference = Reference("the dense Hessian", lambda: truth)
    results = run_plan(
        H, plan, reference=reference, on_result=lambda k, r, s, m: streamed.append((k, r, s, m))
    )
    assert [k for k, _, _, _ in streamed] == plan.keys()
    assert all(seconds >= 0 and memory is None for _, _, seconds, memory in streamed)  # no counter on the CPU
    assert results["trace/exact"].estimate == pytest.approx(truth.trace().item(), rel=1e-10)
    assert all(results[k].passed for k in ("checks/symmetry", "checks/residuals", "checks/agreement"))


def test_done_keys_are_skipped(problem):
    H = curvkit.curvature("hessian", problem)
    plan = AnalysisPlan(top_k=2, check=True)
    results = run_plan(H, plan, done={"eigen/largest", "trace/hutch++", "density/slq"})
    assert set(results) == {"checks/symmetry", "checks/residuals", "checks/agreement"}
    assert results["checks/residuals"].passed  # eigenpairs recomputed for the check
    unchecked = results["checks/agreement"]  # no reference: not done, and saying so, never passed
    assert unchecked.passed is None and unchecked.detail == "not checked: no reference given"
