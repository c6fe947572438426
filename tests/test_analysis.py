"""The analysis plan and its runner: order, streaming of results, resume."""

from __future__ import annotations

import pytest

import curvkit
from curvkit.analysis import AnalysisPlan, run_plan
from curvkit.testing import dense_hessian_reference, get_case


@pytest.fixture(scope="module")
def problem():
    return get_case("tanh-mlp-ce").problem()


def test_keys_follow_the_plan():
    assert AnalysisPlan().keys() == ["eigen/largest", "trace/hutch++", "density/slq"]
    plan = AnalysisPlan(top_k=3, bottom_k=2, trace="exact", density=False, check=True, per_layer=True)
    assert plan.keys(psd=True, reference=True) == [
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


def test_results_stream_in_order_and_are_right(problem):
    H = curvkit.curvature("hessian", problem)
    truth = dense_hessian_reference(problem)
    streamed = []
    plan = AnalysisPlan(top_k=2, bottom_k=1, trace="exact", density=True, check=True, tol=1e-8)
    results = run_plan(H, plan, reference=lambda: truth, on_result=lambda k, r, s: streamed.append((k, r, s)))
    assert [k for k, _, _ in streamed] == plan.keys(reference=True)
    assert all(seconds >= 0 for _, _, seconds in streamed)
    assert results["trace/exact"].estimate == pytest.approx(truth.trace().item(), rel=1e-10)
    assert all(results[k].passed for k in ("checks/symmetry", "checks/residuals", "checks/agreement"))


def test_done_keys_are_skipped(problem):
    H = curvkit.curvature("hessian", problem)
    plan = AnalysisPlan(top_k=2, check=True)
    results = run_plan(H, plan, done={"eigen/largest", "trace/hutch++", "density/slq"})
    assert set(results) == {"checks/symmetry", "checks/residuals"}
    assert results["checks/residuals"].passed  # eigenpairs recomputed for the check
