"""``curvkit analyze`` with several estimators, their options, and the agreement check.

The third-party estimators of the ``test_estimators`` fixture (``tests/conftest.py``)
are built on the Hessian: ``scaled-hessian`` (``factor * H``, reference the
Hessian), ``shifted-hessian`` and ``dense-hessian`` (a callable, dense reference).
"""

from __future__ import annotations

import json

import pytest
import torch
from curvkit.cli.main import app
from typer.testing import CliRunner

import curvkit
from curvkit.analysis import AnalysisPlan
from curvkit.checks import agreement_accuracy
from curvkit.datasets import bundled_file
from curvkit.runs import resolve_estimator_options

MLP = str(bundled_file("digits_mlp.pt"))
CNN = str(bundled_file("digits_cnn.pt"))
QUICK = ["--top-k", "2", "--max-samples", "300", "--quiet", "--json"]


def analyze(out, *args: str) -> list[dict]:
    """The runs of ``curvkit analyze MLP ... --json``, in process."""
    result = CliRunner().invoke(app, ["analyze", MLP, *QUICK, *args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["runs"]


def test_check_on_the_cnn_solves_the_float64_reference_with_o_k_products(tmp_path, monkeypatch):
    """P=1,898: a dense exact Hessian would cost 1,898 products (it ran for over 30 minutes)."""

    def no_dense(self, *args, **kwargs):
        raise AssertionError("the agreement check built a dense matrix")

    monkeypatch.setattr(curvkit.CurvatureOperator, "to_dense", no_dense)
    events = []
    plan = AnalysisPlan(top_k=5, trace=None, density=False, check=True)
    report = curvkit.analyze([CNN], output=tmp_path / "r.h5", plan=plan, progress=events.append)
    (run,) = report.runs
    assert run.status == "complete" and run.parameters == "P=1,898"
    agreement = run.results["checks/agreement"]
    # a float32 estimator against its float64 reference, with the documented tolerances
    assert agreement.passed, agreement
    assert agreement.threshold == agreement_accuracy(1e-4, torch.float32)
    assert agreement.figures["max_principal_angle"] <= agreement.figures["max_angle_threshold"] < 0.5
    assert 0 < agreement.figures["reference_matvecs"] <= 10 * 6  # O(k): k + 1 pairs to 1e-10
    assert agreement.figures["matvecs"] == 0  # the run's own top-5 pairs, not solved again
    assert "hessian in float64" in agreement.detail
    # every analysis reports its progress; the reference solve is one stage of the check
    counted = [e for e in events if e.kind == "counters"]
    assert {e.key for e in counted} == set(run.keys)
    stages = {e.counters.get("stage") for e in counted if e.key == "checks/agreement"}
    assert stages == {"reference"}


def test_a_wrong_estimator_fails_agreement_and_its_option_fixes_it(tmp_path, test_estimators):
    out = tmp_path / "r.h5"
    (wrong,) = analyze(out, "--curvature", "scaled-hessian", "--check")
    check = wrong["analyses"]["checks/agreement"]
    assert check["passed"] is False and check["measured"] == pytest.approx(0.5, rel=1e-3)
    (right,) = analyze(out, "--curvature", "scaled-hessian", "--check", "--option", "factor=1")
    assert right["analyses"]["checks/agreement"]["passed"] is True
    # the option reached the estimator, its provenance and its run key
    assert right["provenance"]["estimator_options"] == {"factor": 1}
    assert right["key"]["estimator_options"] == {"factor": 1} and wrong["key"]["estimator_options"] == {}
    assert right["run_id"] != wrong["run_id"]


def test_a_callable_reference_is_dense_only_for_small_problems(tmp_path, test_estimators):
    out = tmp_path / "r.h5"
    (small,) = analyze(out, "--curvature", "dense-hessian", "--check", "--params", "4")
    check = small["analyses"]["checks/agreement"]
    assert check["passed"] is True and check["figures"]["reference_matvecs"] == 0
    assert "dense matrix of dense_hessian_reference" in check["detail"]
    (large,) = analyze(out, "--curvature", "dense-hessian", "--check")  # P=3,466: not done, saying why
    check = large["analyses"]["checks/agreement"]
    assert check["passed"] is None and check["measured"] is None
    assert "built only up to P=2,000 parameters (this problem has P=3,466)" in check["detail"]
    shown = CliRunner().invoke(app, ["show", str(out)], env={"COLUMNS": "250"})
    assert "not checked: the reference of 'dense-hessian'" in shown.stdout


def test_several_estimators_and_options_addressed_to_all_or_one(tmp_path, test_estimators):
    out = tmp_path / "r.h5"
    hessian, scaled = analyze(out, "--curvature", "hessian,scaled-hessian", "--option", "factor=2")
    assert (hessian["estimator"], scaled["estimator"]) == ("hessian", "scaled-hessian")
    assert hessian["provenance"]["estimator_options"] == {}  # hessian takes no factor
    assert scaled["provenance"]["estimator_options"] == {"factor": 2}
    top = [run["analyses"]["eigen/largest"]["values"][0] for run in (hessian, scaled)]
    assert top[1] == pytest.approx(2 * top[0], rel=1e-4)
    # repeated --curvature, and --estimator-options addressed to one estimator
    options = json.dumps({"scaled-hessian.factor": 3})
    runs = analyze(
        out, "--curvature", "hessian", "--curvature", "scaled-hessian", "--estimator-options", options
    )
    assert runs[0]["run_id"] == hessian["run_id"] and runs[0]["resumed"]  # the same run: resumed
    assert runs[1]["provenance"]["estimator_options"] == {"factor": 3}
    assert runs[1]["analyses"]["eigen/largest"]["values"][0] == pytest.approx(3 * top[0], rel=1e-4)
    # the plugin that registered each estimator, with its version
    assert hessian["provenance"]["estimator_plugin"] == "curvkit.plugins.hessian"
    assert hessian["provenance"]["estimator_plugin_version"] == curvkit.__version__
    assert scaled["provenance"]["estimator_plugin"] == test_estimators
    assert scaled["provenance"]["estimator_plugin_version"] == ""  # registered at run time: no distribution


@pytest.mark.parametrize(
    "estimators, options, error, fragment",
    [
        (
            ["hessian"],
            {"mc_samples": 4},
            curvkit.UnknownOptionError,
            "'hessian' takes no option 'mc_samples'",
        ),
        (
            ["hessian", "scaled-hessian"],
            {"shift": 1},
            curvkit.UnknownOptionError,
            "no estimator of this command takes option 'shift' (hessian takes strategy",
        ),
        (["hessian"], {"fisher.mc_samples": 4}, curvkit.CurvkitError, "which this command does not run"),
        (["scaled-hessian"], {"scaled-hessian.shift": 1}, curvkit.UnknownOptionError, "its options: factor"),
        (["hessian"], {".factor": 1}, curvkit.CurvkitError, "is not NAME or ESTIMATOR.NAME"),
        (["hessian"], {"hessian.": 1}, curvkit.CurvkitError, "is not NAME or ESTIMATOR.NAME"),
        (["hesian"], {}, curvkit.UnknownEstimatorError, "did you mean 'hessian'"),
    ],
)
def test_options_that_reach_no_estimator_are_refused(test_estimators, estimators, options, error, fragment):
    with pytest.raises(error) as caught:
        resolve_estimator_options(estimators, options)
    assert fragment in str(caught.value)


def test_addressed_options_replace_plain_ones_for_their_estimator(test_estimators):
    resolved = resolve_estimator_options(
        ["scaled-hessian", "shifted-hessian", "hessian"],
        {"factor": 2, "scaled-hessian.factor": 5, "shift": 0.1, "strategy": "reverse"},
    )
    assert resolved == {
        "scaled-hessian": {"factor": 5},
        "shifted-hessian": {"shift": 0.1},
        "hessian": {"strategy": "reverse"},
    }


def test_the_built_in_estimators_are_checked_against_their_references(tmp_path):
    runs = analyze(tmp_path / "r.h5", "--curvature", "ggn,fisher", "--check", "--compare-to", "hessian")
    by_estimator = {run["estimator"]: run["analyses"] for run in runs}
    ggn, fisher = by_estimator["ggn"], by_estimator["fisher"]
    assert ggn["checks/agreement"]["passed"] is True and ggn["checks/psd"]["passed"] is True
    # one draw of the Monte-Carlo Fisher: figures as information, never a pass or a fail
    agreement = fisher["checks/agreement"]
    assert (
        agreement["passed"] is None and agreement["measured"] > 0.0 and "Monte-Carlo" in agreement["detail"]
    )
    # the Hessian has no cheap diagonal: the comparison's traces are Hutch++ with the plan's
    # budget and probes, not an exact trace from P products
    compare = ggn["compare/hessian"]
    assert compare["trace_method"] == "hutch++"
    assert compare["matvecs"] + compare["baseline_matvecs"] < 3466


def test_a_comparison_takes_the_trace_budget_without_a_trace_of_its_own(tmp_path):
    """--trace-matvecs sets the comparison's traces (Hutch++ by default), so it is no stray option
    with --compare-to alone."""
    options = ["--curvature", "ggn", "--compare-to", "hessian", "--trace-matvecs", "40"]
    runs = analyze(tmp_path / "r.h5", *options)
    compare = {run["estimator"]: run["analyses"] for run in runs}["ggn"]["compare/hessian"]
    assert compare["trace_method"] == "hutch++" and compare["matvecs"] == 40


def test_a_monte_carlo_estimator_is_seeded_by_the_command(tmp_path):
    first = analyze(tmp_path / "a.h5", "--curvature", "fisher")[0]
    again = analyze(tmp_path / "b.h5", "--curvature", "fisher")[0]
    assert first["analyses"]["eigen/largest"]["values"] == again["analyses"]["eigen/largest"]["values"]
    assert first["key"]["estimator_options"] == {"seed": 0}
    other = analyze(tmp_path / "a.h5", "--curvature", "fisher", "--seed", "1")[0]
    assert other["key"]["estimator_options"] == {"seed": 1} and other["run_id"] != first["run_id"]
    own = analyze(tmp_path / "a.h5", "--curvature", "fisher", "--option", "seed=7")[0]
    assert own["key"]["estimator_options"] == {"seed": 7}


def test_the_checks_of_a_float32_estimator_warn_about_nothing(tmp_path, run_curvkit):
    proc = run_curvkit(
        "analyze", MLP, "--curvature", "ggn", "--top-k", "2", "--check", "-o", "r.h5", cwd=tmp_path
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr  # the psd check solves to --tol


def test_kfac_eigenvalues_and_trace_come_from_its_factors(tmp_path):
    runs = analyze(
        tmp_path / "r.h5", "--curvature", "kfac,ggn", "--trace", "hutchinson", "--compare-to", "ggn"
    )
    kfac = {run["estimator"]: run["analyses"] for run in runs}["kfac"]
    eigen = kfac["eigen/largest"]
    assert eigen["method"] == "exact" and eigen["matvecs"] == 2 and eigen["converged"]
    assert kfac["trace/hutchinson"]["structured"] is True and kfac["trace/hutchinson"]["matvecs"] == 0
    compare = kfac["compare/ggn"]
    assert compare["trace_method"] == "exact" and 0 < compare["value_error"] < 1 and compare["matvecs"] == 0


class _KeywordFisher(curvkit.ProblemOperator):
    """A Monte-Carlo Fisher whose constructor takes its options as ``**options`` (seed included)."""

    SYMMETRIC, PSD, EXACT, STOCHASTIC = True, True, False, True

    def __init__(self, problem, **options):
        super().__init__(problem, **options)
        self.fisher = curvkit.curvature("fisher", problem, seed=self.seed)

    def _product(self, M, snapshot):
        return self.fisher.matmat(M)


@pytest.fixture
def keyword_estimators():
    """``kw-fisher`` (the class above) and ``hidden-seed``, a factory that hides its seed."""
    plugin = type(json)("keyword_estimators")

    @curvkit.hookimpl
    def curvkit_register_estimators():
        return [
            curvkit.EstimatorSpec("kw-fisher", _KeywordFisher, "Fisher, options as **kwargs"),
            curvkit.EstimatorSpec(
                "hidden-seed", lambda problem, **options: _KeywordFisher(problem), "Fisher, own seed"
            ),
            curvkit.EstimatorSpec(  # says it is stochastic, takes the seed, and drops it
                "dropped-seed",
                lambda problem, **options: _KeywordFisher(problem),
                "Fisher, seed dropped",
                flags={"stochastic": True, "symmetric": True, "psd": True},
            ),
            curvkit.EstimatorSpec(  # a wrapper, which does not say its seed
                "wrapped-seed", lambda problem, **options: 2.0 * _KeywordFisher(problem), "2 x Fisher"
            ),
        ]

    plugin.curvkit_register_estimators = curvkit_register_estimators
    name = curvkit.register_plugin(plugin, name="keyword-estimators")
    yield
    curvkit.unregister_plugin(name=name)


def test_a_monte_carlo_estimator_taking_kwargs_is_seeded_by_the_command(tmp_path, keyword_estimators):
    first = analyze(tmp_path / "a.h5", "--curvature", "kw-fisher")[0]
    again = analyze(tmp_path / "b.h5", "--curvature", "kw-fisher")[0]
    assert first["key"]["estimator_options"] == {"seed": 0}
    assert first["analyses"]["eigen/largest"]["values"] == again["analyses"]["eigen/largest"]["values"]


@pytest.mark.parametrize("estimator", ["hidden-seed", "dropped-seed", "wrapped-seed"])
def test_an_estimator_that_draws_its_own_seed_never_resumes_another_draw(
    tmp_path, keyword_estimators, estimator
):
    """Its seed (or, where it does not say it, a mark of its own) is in the run's key: a second
    command starts a run of its own instead of adding analyses of other samples to the first's."""
    first = analyze(tmp_path / "a.h5", "--curvature", estimator)[0]
    second = analyze(tmp_path / "a.h5", "--curvature", estimator)[0]
    assert "estimator_seed" in first["key"]
    assert first["key"]["estimator_seed"] != second["key"]["estimator_seed"]
    assert first["run_id"] != second["run_id"] and not second["resumed"]
    assert "estimator_seed" not in analyze(tmp_path / "c.h5", "--curvature", "fisher")[0]["key"]


def test_a_block_of_a_kwargs_monte_carlo_estimator_keeps_its_seed(keyword_estimators):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    data = (torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 3, (10,)))
    problem = curvkit.Problem(model, "cross_entropy", data)
    operator = curvkit.curvature("kw-fisher", problem)
    block = operator.restrict(["0.weight", "0.bias"])
    assert block.seed == operator.seed
    n = block.shape[0]  # the first layer's entries come first
    full = operator.to_dense()
    assert torch.allclose(block.to_dense(), full[:n, :n], rtol=1e-12, atol=1e-14)
