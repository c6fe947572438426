"""The conformance battery over every registered estimator, and proof that it can fail."""

from __future__ import annotations

import pytest
import torch

import curvkit
from curvkit.testing import check_estimator, check_operator, dense_hessian_reference, get_case


@pytest.mark.parametrize("spec", curvkit.estimators(), ids=lambda s: s.name)
def test_every_registered_estimator_conforms(spec):
    report = check_estimator(spec)
    report.raise_on_failure()
    checks = {r.check for r in report.results}
    assert {"shape", "symmetry", "restrict"} <= checks
    if not spec.flags.get("stochastic"):  # a Monte-Carlo estimator (the default fisher) skips these
        assert {"matmat", "batch-size"} <= checks
    if spec.flags.get("exact") and spec.reference is not None:
        assert "reference" in checks


def failed_checks(op, **kwargs):
    return {r.check for r in check_operator(op, **kwargs) if not r.passed}


def test_battery_flags_a_non_symmetric_operator():
    A = torch.randn(6, 6, dtype=torch.float64)
    op = curvkit.DenseOperator(A, symmetric=True)
    assert "symmetry" in failed_checks(op)


def test_battery_flags_a_false_psd_claim():
    A = torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64))
    assert "psd" in failed_checks(curvkit.DenseOperator(A, psd=True))
    assert failed_checks(curvkit.DenseOperator(A.abs(), psd=True)) == set()


def test_battery_flags_disagreement_with_the_reference():
    A = torch.diag(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64))
    assert "reference" in failed_checks(curvkit.DenseOperator(A), reference=A + 1e-3)


class FirstBatchHessian(curvkit.ProblemOperator):
    """A wrong estimator: the Hessian of the first batch only (depends on batching)."""

    def _product(self, M, snapshot):
        inputs, targets = next(iter(self.problem.batches()))
        small = curvkit.Problem(
            self.problem.model, self.problem.loss.name, (inputs, targets), params=self.problem.param_names
        )
        return curvkit.curvature("hessian", small).matmat(M)


class StaleMatmat(curvkit.ProblemOperator):
    """A wrong estimator whose matmat ignores all columns but the first."""

    def _product(self, M, snapshot):
        col = curvkit.curvature("hessian", self.problem) @ M[:, 0]
        return col.unsqueeze(1).expand_as(M).clone()


def test_battery_flags_batch_size_dependence():
    report = check_estimator(FirstBatchHessian, [get_case("tanh-mlp-ce")], reference="hessian")
    assert {r.check for r in report.failures} >= {"batch-size", "reference"}
    with pytest.raises(AssertionError, match="batch-size"):
        report.raise_on_failure()


def test_battery_flags_a_broken_matmat():
    report = check_estimator(StaleMatmat, [get_case("mlp-mse")])
    assert "matmat" in {r.check for r in report.failures}


def test_battery_accepts_problems_and_callable_references():
    problem = get_case("mlp-mse").problem()
    report = check_estimator("hessian", [problem], reference=dense_hessian_reference)
    assert report.passed and any(r.check == "reference" for r in report.results)
