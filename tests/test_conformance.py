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
    ran = {r.check for r in report.results if r.status == "pass"}
    assert {"shape", "symmetry", "matmat", "batch-size", "restrict"} <= ran
    if spec.reference is not None and (spec.flags.get("exact") or spec.flags.get("stochastic")):
        assert "reference" in ran


def failed_checks(op, **kwargs):
    return {r.check for r in check_operator(op, **kwargs) if r.status in ("fail", "error")}


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


# --------------------------------------------------------------------------- modes of the battery
from curvkit.autodiff import hessian_batch_product  # noqa: E402
from curvkit.testing import CASES  # noqa: E402


class RandomlyWeightedHessian(curvkit.ProblemOperator):
    """Monte-Carlo: each batch's Hessian weighted by ``w`` in {0, 2 * bias}, so ``E = bias * H``."""

    SYMMETRIC, PSD, EXACT, STOCHASTIC = True, False, False, True
    BIAS = 1.0

    def __init__(self, problem, seed=None):
        super().__init__(problem, seed=seed)

    def batch_product(self, params, inputs, targets, V, generator):
        weight = 2.0 * self.BIAS * float(torch.randint(0, 2, (), generator=generator))
        parts, count = hessian_batch_product(self.problem, params, inputs, targets, V)
        return [weight * part for part in parts], count


class BiasedWeightedHessian(RandomlyWeightedHessian):
    BIAS = 2.0  # a normalisation bug: twice the expectation


class ResampledWeightedHessian(RandomlyWeightedHessian):
    RESAMPLES = True


def _statuses(report, check):
    return {r.case: r.status for r in report.results if r.check == check}


def test_monte_carlo_estimators_are_checked_in_expectation():
    cases = [get_case("tanh-mlp-ce"), get_case("mlp-mse")]
    good = check_estimator(RandomlyWeightedHessian, cases, reference="hessian")
    good.raise_on_failure()
    assert set(_statuses(good, "reference").values()) == {"pass"}
    assert set(_statuses(good, "repeatable").values()) == {"pass"}  # a seeded one is a fixed map
    biased = check_estimator(BiasedWeightedHessian, cases, reference="hessian")
    assert set(_statuses(biased, "reference").values()) == {"fail"}  # the bias is caught
    resampled = check_estimator(ResampledWeightedHessian, cases, reference="hessian")
    resampled.raise_on_failure()
    assert set(_statuses(resampled, "reference").values()) == {"pass"}
    assert set(_statuses(resampled, "matmat").values()) == {"skipped"}  # not one linear map


def test_a_raising_estimator_is_recorded_per_case_and_the_battery_goes_on():
    def flaky(problem):
        if problem.loss.name == "mse":
            raise RuntimeError("cannot handle\nregression")
        return curvkit.curvature("hessian", problem)

    report = check_estimator(flaky, [get_case("mlp-mse"), get_case("tanh-mlp-ce")], reference="hessian")
    (error,) = report.failures
    assert (error.case, error.check, error.status) == ("mlp-mse", "construct", "error")
    assert error.detail == "RuntimeError: cannot handle regression"
    assert _statuses(report, "reference") == {"tanh-mlp-ce": "pass"}


def test_skipped_checks_are_never_passes_and_say_why():
    X, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    model = torch.nn.Linear(3, 2).double()
    fixed_batches = [(X[:5], y[:5]), (X[5:], y[5:])]
    report = check_estimator("hessian", [curvkit.Problem(model, "mse", fixed_batches)])
    (batch_size,) = [r for r in report.results if r.check == "batch-size"]
    assert (
        batch_size.status == "skipped" and not batch_size.passed and "fixed by the user" in batch_size.detail
    )
    assert report.passed and batch_size in report.skipped


def test_declared_losses_select_the_cases():
    spec = curvkit.EstimatorSpec("mse-only", lambda p: curvkit.curvature("hessian", p), losses=("mse",))
    spec.flags = dict(curvkit.get_estimator("hessian").flags)
    report = check_estimator(spec, reference="hessian")
    skipped = {r.case for r in report.results if r.check == "case"}
    assert skipped == {c.name for c in CASES if c.problem().loss.name != "mse"}
    assert {r.case for r in report.results if r.check == "reference" and r.passed} == {
        c.name for c in CASES if c.problem().loss.name == "mse"
    }


def test_an_exact_estimator_without_a_reference_is_reported_unverified():
    report = check_estimator(lambda p: curvkit.curvature("hessian", p), [get_case("mlp-mse")])
    (reference,) = [r for r in report.results if r.check == "reference"]
    assert reference.status == "skipped" and "exactness unverified" in reference.detail


class TwiceTheHessian(curvkit.ProblemOperator):
    """An approximation, claimed exact on one datum only, and wrong even there."""

    SYMMETRIC, PSD, EXACT, STOCHASTIC = True, False, False, False

    def _product(self, M, snapshot):
        return 2.0 * curvkit.curvature("hessian", self.problem).matmat(M)


def test_a_reference_that_holds_on_some_cases_is_checked_there_only():
    cases = [get_case("single-datum-ce"), get_case("tanh-mlp-ce")]
    exact_there = check_estimator(
        lambda p: curvkit.curvature("hessian", p), cases, reference="hessian", reference_on={"single-datum"}
    )
    assert _statuses(exact_there, "reference") == {"single-datum-ce": "pass", "tanh-mlp-ce": "skipped"}
    wrong = check_estimator(TwiceTheHessian, cases, reference="hessian", reference_on={"single-datum"})
    assert _statuses(wrong, "reference") == {"single-datum-ce": "fail", "tanh-mlp-ce": "skipped"}
    untagged = check_estimator(TwiceTheHessian, cases, reference="hessian")
    assert set(_statuses(untagged, "reference").values()) == {"skipped"}  # an approximation: not claimed
