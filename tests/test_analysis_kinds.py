"""The table of analysis kinds: every kind round-trips through HDF5; a plugin adds a kind end to end;
the inverse-HVP accuracy analysis (``ihvp``) in the library and on the command line."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from curvkit.cli.main import app
from torch import nn
from typer.testing import CliRunner

import curvkit
import curvkit.summaries
from curvkit.analysis import AnalysisPlan
from curvkit.comparison import compare_spectra
from curvkit.datasets import bundled_file
from curvkit.kinds import BUILTIN_KINDS, AnalysisKind, analysis_kinds, builtin_kinds
from curvkit.kinds.hdf5 import attr
from curvkit.store import ResultsStore
from curvkit.testing import get_case

DT = torch.float64
MLP = str(bundled_file("digits_mlp.pt"))
runner = CliRunner()


def seed_problem() -> curvkit.Problem:
    """The seed notebook's model: a 3-5-1 sigmoid MLP with the squared error on 10 samples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Sigmoid(), nn.Linear(5, 1)).double()
    return curvkit.Problem(model, "mse", (torch.randn(10, 3, dtype=DT), torch.randn(10, 1, dtype=DT)))


def example_results() -> dict[str, object]:
    """One real result of every built-in kind."""
    torch.manual_seed(0)
    M = torch.randn(12, 12, dtype=DT)
    A, B = curvkit.DenseOperator(M + M.T), curvkit.DenseOperator(M @ M.T, psd=True)
    eig = curvkit.eigenvalues(A, k=3)
    trace = curvkit.trace(A, method="hutch++", matvecs=6)
    other = curvkit.trace(B, method="hutch++", matvecs=6)
    return {
        "eigen": eig,
        "trace": trace,
        "density": curvkit.density(A, steps=10, runs=2),
        "checks": curvkit.checks.check_symmetry(A),
        "per_layer": curvkit.per_layer(curvkit.curvature("hessian", get_case("tanh-mlp-ce").problem())),
        "compare": compare_spectra(
            eig, curvkit.eigenvalues(B, k=3), trace, other, estimator="a", baseline_name="b"
        ),
        "ihvp": curvkit.ihvp_accuracy(
            B, ["cg", "minres", "neumann"], vector="random", damping=0.1, maxiter=30
        ),
        "summary": curvkit.newton_summary(seed_problem(), "wb"),
    }


def plain(value):
    """A result as comparable plain data (``to_dict``, NaN made comparable)."""
    data = value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)
    return json.loads(json.dumps(data, default=lambda t: t.tolist()).replace("NaN", '"nan"'))


def test_every_builtin_kind_round_trips_through_hdf5_and_is_summarised(tmp_path):
    results = example_results()
    assert set(results) == set(BUILTIN_KINDS) == set(analysis_kinds())  # a new kind needs an example here
    path = tmp_path / "r.h5"
    with ResultsStore(path) as store, store.begin_run("r") as run:
        for kind, result in results.items():
            run.write(f"{kind}/x", result, request={"k": 1})
    with ResultsStore(path, "r") as store:
        run = store.run("r")
        assert run.analyses() == [f"{kind}/x" for kind in BUILTIN_KINDS]
        for kind, result in results.items():
            back = run.read(f"{kind}/x")
            assert type(back) is type(result) and plain(back) == plain(result), kind
            spec = analysis_kinds()[kind]
            assert curvkit.summaries.summarize(back) == spec.summarize(result) != type(result).__name__
            assert list(spec.rows(back)), kind
        assert {row["analysis"] for row in store.csv_rows()} == {f"{kind}/x" for kind in BUILTIN_KINDS}


def test_a_wrong_result_type_is_refused_naming_the_kind(tmp_path):
    with ResultsStore(tmp_path / "r.h5") as store, store.begin_run("r") as run:
        with pytest.raises(TypeError, match="ihvp/x needs a IhvpResult"):
            run.write("ihvp/x", example_results()["trace"])


# ----------------------------------------------------------------------------- a plugin's kind
def _frobenius_keys(plan, psd, estimator):
    return ["frobenius/probes"] if "frobenius" in plan.options else []


def _frobenius(context, key):
    """``||A||_F^2 = E ||A z||^2`` for Rademacher ``z`` (Hutchinson on ``A^2``)."""
    probes = context.plan.options["frobenius"].get("probes", 8)
    gen = torch.Generator().manual_seed(context.plan.seed)
    Z = torch.randint(0, 2, (context.op.shape[0], probes), generator=gen).to(context.op.dtype) * 2 - 1
    squares = (context.op.matmat(Z) ** 2).sum(0).double()
    stderr = float(squares.std() / math.sqrt(probes)) if probes > 1 else math.nan
    return curvkit.TraceResult(float(squares.mean()), stderr, "frobenius", probes, None, context.plan.seed)


def _frobenius_check(options):
    if options.get("probes", 8) < 1:
        raise curvkit.CurvkitError("frobenius probes must be at least 1")


def _write(group, result):
    group.attrs["estimate"], group.attrs["stderr"], group.attrs["probes"] = (
        result.estimate,
        result.stderr,
        result.matvecs,
    )


def _read(group):
    probes = int(attr(group.attrs["probes"]))
    return curvkit.TraceResult(
        float(group.attrs["estimate"]), float(group.attrs["stderr"]), "frobenius", probes, None, 0
    )


class FrobeniusPlugin:
    @curvkit.hookimpl
    def curvkit_register_analysis_kinds(self):
        return [
            AnalysisKind(
                "frobenius",
                curvkit.TraceResult,
                _frobenius_keys,
                lambda plan, key: dict(plan.options["frobenius"]),
                _frobenius,
                _write,
                _read,
                lambda r: [("estimate", None, r.estimate)],
                lambda r: f"||A||_F^2 ~ {r.estimate:.4g}",
                check=_frobenius_check,
            )
        ]


@pytest.fixture
def frobenius_plugin():
    name = curvkit.register_plugin(FrobeniusPlugin(), name="frobenius-test")
    yield name
    curvkit.unregister_plugin(name=name)


def test_a_plugin_adds_a_kind_that_analyze_computes_stores_shows_and_exports(tmp_path, frobenius_plugin):
    plan = AnalysisPlan(top_k=1, trace=None, density=False, options={"frobenius": {"probes": 16}})
    assert plan.keys() == ["eigen/largest", "frobenius/probes"]
    out = tmp_path / "r.h5"
    report = curvkit.analyze([MLP], output=out, plan=plan)
    (run,) = report.runs
    assert run.status == "complete" and set(run.results) == {"eigen/largest", "frobenius/probes"}
    assert run.results["frobenius/probes"].estimate > 0
    with ResultsStore(out, "r") as store:
        (stored,) = store.runs()
        assert stored.read("frobenius/probes").estimate == run.results["frobenius/probes"].estimate
        assert stored.request("frobenius/probes") == {"probes": 16}
    shown = runner.invoke(app, ["show", str(out)])
    assert shown.exit_code == 0 and "frobenius/probes: ||A||_F^2 ~" in shown.stdout
    again = curvkit.analyze([MLP], output=out, plan=plan)  # resumes: nothing recomputed
    assert set(again.runs[0].resumed) == {"eigen/largest", "frobenius/probes"}
    with pytest.raises(curvkit.CurvkitError, match="frobenius probes must be at least 1"):
        AnalysisPlan(options={"frobenius": {"probes": 0}})


def test_a_plugin_kind_may_not_take_a_builtin_name_and_unknown_kinds_are_refused():
    class Clash:
        @curvkit.hookimpl
        def curvkit_register_analysis_kinds(self):
            return [dataclasses.replace(builtin_kinds()["trace"])]

    with pytest.raises(
        curvkit.PluginError, match="'trace' of plugin 'clash-test' has the name of a built-in"
    ):
        curvkit.register_plugin(Clash(), name="clash-test")  # refused, and not left registered
    assert analysis_kinds()["trace"].plugin == ""
    with pytest.raises(curvkit.CurvkitError, match="no analysis kind 'nosuch' takes options"):
        AnalysisPlan(options={"nosuch": {}})


# ----------------------------------------------------------------------------- ihvp
def test_ihvp_accuracy_reproduces_the_seed_experiment_honestly():
    """Damped CG and MINRES reach cosine > 0.999 against the exact solve; plain CG on the indefinite
    Hessian and an unscaled Neumann series say why they fail instead of returning a number."""
    H = curvkit.curvature("hessian", seed_problem())
    lowest = torch.linalg.eigvalsh(H.to_dense())[0].item()
    assert lowest < 0
    damping = 2 * abs(lowest)
    with pytest.warns(curvkit.CurvkitWarning):  # cg and neumann on a Hessian, not flagged PSD
        result = curvkit.ihvp_accuracy(
            H, ["cg", "minres", "neumann"], damping=damping, tol=1e-10, maxiter=200
        )
    assert result.reference == "exact dense solve in float64" and result.reference_residual < 1e-12
    for name in ("cg", "minres"):
        curve = result.curves[name]
        assert curve.converged and curve.final("cosine") > 0.999 and curve.final("error") < 1e-6, name
        assert list(curve.columns) == list(curvkit.linalg.ihvp.CURVE_COLUMNS)
        assert curve.columns["iteration"][0] == 0 and curve.columns["error"][0] == 1.0  # x0 = 0
        assert (curve.columns["seconds"].diff() >= 0).all() and (curve.columns["matvecs"].diff() > 0).all()
    with pytest.warns(curvkit.CurvkitWarning):
        undamped = curvkit.ihvp_accuracy(H, ["cg", "minres"], damping=0.0, tol=1e-10, maxiter=200)
    assert not undamped.curves["cg"].converged  # indefinite: stops, saying why
    assert (
        "non-positive curvature" in undamped.curves["cg"].reason or undamped.curves["cg"].reason == "maxiter"
    )
    assert undamped.curves["minres"].converged and undamped.curves["minres"].final("cosine") > 0.999
    with pytest.warns(curvkit.CurvkitWarning):
        unscaled = curvkit.ihvp_accuracy(
            H, ["neumann"], damping=0.0, maxiter=10, solver_options={"neumann": {"scale": 1.0}}
        )
    assert not unscaled.curves["neumann"].converged and "diverging" in unscaled.curves["neumann"].reason


def test_ihvp_float32_operator_is_compared_with_a_float64_reference_by_minres():
    problem = get_case("tanh-mlp-ce").problem().to(torch.float32)
    G = curvkit.curvature("ggn", problem)
    result = curvkit.ihvp_accuracy(G, ["cg"], damping=1e-2, reference="minres")
    assert result.reference.startswith("minres in float64") and result.reference_converged
    assert result.reference_residual <= 1e-10
    curve = result.curves["cg"]
    assert curve.converged and curve.final("cosine") > 0.9999  # float32 iterates, float64 truth


def test_ihvp_bad_input_and_solvers_that_cannot_run():
    G = curvkit.curvature("ggn", seed_problem())
    with pytest.raises(curvkit.CurvkitError, match="damping must be a finite number >= 0"):
        curvkit.ihvp_accuracy(G, ["cg"], damping=-1.0)
    with pytest.raises(curvkit.CurvkitError, match="unknown solver nosuch"):
        curvkit.ihvp_accuracy(G, ["nosuch"])
    with pytest.raises(curvkit.ShapeMismatchError, match="P = 26, got \\(3,\\)"):
        curvkit.ihvp_accuracy(G, ["cg"], vector=torch.ones(3, dtype=DT))
    with pytest.raises(curvkit.CurvkitError, match="needs a data-backed operator"):
        curvkit.ihvp_accuracy(curvkit.DenseOperator(torch.eye(3, dtype=DT)), ["cg"])
    result = curvkit.ihvp_accuracy(
        G, ["cg", "lowrank"], damping=1e-3, solver_options={"lowrank": {"nope": 1}}
    )
    assert result.curves["cg"].converged
    assert (
        result.curves["lowrank"].reason.startswith("could not run") and not result.curves["lowrank"].columns
    )
    with pytest.raises(curvkit.CurvkitError, match="--damping must be a finite number >= 0"):
        AnalysisPlan(options={"ihvp": {"solvers": ["cg"], "damping": -1}})
    with pytest.raises(curvkit.CurvkitError, match="unknown ihvp option"):
        AnalysisPlan(options={"ihvp": {"solvers": ["cg"], "dampnig": 1}})


@pytest.mark.parametrize(
    "options, message",
    [
        ({"tol": math.inf}, "the ihvp tol must be a number in (0, 1) (1 is met by any vector), got inf"),
        ({"tol": 0}, "the ihvp tol must be a number in (0, 1) (1 is met by any vector), got 0"),
        ({"tol": 1}, "the ihvp tol must be a number in (0, 1) (1 is met by any vector), got 1"),
        ({"maxiter": 0}, "the ihvp maxiter must be an integer >= 1, got 0"),
        ({"maxiter": True}, "the ihvp maxiter must be an integer >= 1, got True"),
        ({"damping": math.inf}, "--damping must be a finite number >= 0, got inf"),
        # kept as given in the run's request: Python numbers only (curvkit.arguments' plain=True)
        (
            {"tol": torch.tensor(1e-6)},
            "the ihvp tol must be a Python number in (0, 1) (1 is met by any vector), got tensor(",
        ),
        ({"maxiter": torch.tensor(5)}, "the ihvp maxiter must be a Python integer >= 1, got tensor(5)"),
        ({"maxiter": np.int64(5)}, "the ihvp maxiter must be a Python integer >= 1, got np.int64(5)"),
        ({"damping": torch.tensor([0.1])}, "--damping must be a finite Python number >= 0, got tensor("),
        ({"damping": np.float32(0.1)}, "--damping must be a finite Python number >= 0, got np.float32("),
    ],
    ids=repr,
)
def test_ihvp_numeric_options(options, message):
    with pytest.raises(curvkit.CurvkitError) as info:
        AnalysisPlan(options={"ihvp": {"solvers": ["cg"], **options}})
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    "damping_int, message",
    [
        (torch.tensor(1.0), "--summary-damping-int must be a finite Python number >= 0, got tensor(1.)"),
        (np.float32(1.0), "--summary-damping-int must be a finite Python number >= 0, got np.float32(1.0)"),
        (-1, "--summary-damping-int must be a finite number >= 0, got -1"),
        (math.inf, "--summary-damping-int must be a finite number >= 0, got inf"),
    ],
    ids=repr,
)
def test_summary_damping_int_is_a_plain_number_in_range(damping_int, message):
    """Kept as given in the run's request, so a Python number: one check (``plain=True``), one message."""
    with pytest.raises(curvkit.CurvkitError) as info:
        AnalysisPlan(top_k=0, trace=None, density=False, options={"summary": {"damping_int": damping_int}})
    assert str(info.value) == message
    for fine in (0, 2.5, np.float64(2.5)):  # a float subclass is a Python number
        AnalysisPlan(top_k=0, trace=None, density=False, options={"summary": {"damping_int": fine}})


@pytest.mark.parametrize(
    "solver, options, message",
    [
        ("lissa", {"batch_size": 0}, "--ihvp-option lissa.batch_size must be an integer >= 1 or None, got 0"),
        ("lissa", {"repeats": 0}, "--ihvp-option lissa.repeats must be an integer >= 1, got 0"),
        ("lissa", {"scale": -1}, "--ihvp-option lissa.scale must be a finite number > 0, got -1"),
        ("lissa", {"check_every": "abc"}, "--ihvp-option lissa.check_every must be an integer >= 1 or "),
        ("lissa", {"seed": 1.5}, "--ihvp-option lissa.seed must be an integer >= 0 and < 2**63, got 1.5"),
        ("lowrank", {"rank": 0}, "--ihvp-option lowrank.rank must be an integer >= 1, got 0"),
    ],
    ids=repr,
)
def test_ihvp_solver_option_values_are_checked_when_the_plan_is_made(solver, options, message):
    """They were checked by the solver only, after the reference solve: the analysis recorded
    ``could not run: repeats must be ...`` and the command exited 0."""
    with pytest.raises(curvkit.CurvkitError) as info:
        AnalysisPlan(options={"ihvp": {"solvers": [solver], "solver_options": {solver: options}}})
    assert str(info.value).startswith(message)


def test_ihvp_solver_options_above_p_are_refused_before_any_analysis():
    """``lowrank.rank`` above ``P``: refused once ``P`` is known (``check_dimension``), before any work."""
    plan = AnalysisPlan(
        top_k=1,
        trace=None,
        density=False,
        options={"ihvp": {"solvers": ["cg", "lowrank"], "solver_options": {"lowrank": {"rank": 27}}}},
    )
    plan.check_dimension(27)
    message = r"^--ihvp-option lowrank.rank must be an integer in 1..26, got 27$"
    with pytest.raises(curvkit.CurvkitError, match=message):
        plan.check_dimension(26)
    G = curvkit.curvature("ggn", seed_problem())
    assert G.shape[0] == 26
    computed = []
    with pytest.raises(curvkit.CurvkitError, match=message):
        curvkit.analysis.run_plan(G, plan, on_result=lambda key, *_: computed.append(key))
    assert computed == [] and G.data_passes == 0


def test_ihvp_solver_options_above_the_samples_are_refused_before_any_analysis():
    """``lissa.batch_size`` above ``N``: refused once ``N`` is known (``check_dimension``), before anything
    is written. ``curvkit analyze ... --ihvp lissa --ihvp-option lissa.batch_size=100000`` recorded
    ``lissa could not run: batch_size must be an integer in 1..1797`` after the reference solve and
    exited 0: only ``P`` was known to the checks made before the results file was opened."""
    ihvp = {"solvers": ["cg", "lissa"], "solver_options": {"lissa": {"batch_size": 11}}}
    plan = AnalysisPlan(top_k=1, trace=None, density=False, options={"ihvp": ihvp})
    plan.check_dimension(26)  # N not known: left to lissa
    plan.check_dimension(26, 11)
    message = r"^--ihvp-option lissa.batch_size must be an integer in 1..10 \(the samples\), got 11$"
    with pytest.raises(curvkit.CurvkitError, match=message):
        plan.check_dimension(26, 10)
    G = curvkit.curvature("ggn", seed_problem())
    computed = []
    with pytest.raises(curvkit.CurvkitError, match=message):
        curvkit.analysis.run_plan(G, plan, on_result=lambda key, *_: computed.append(key))
    assert computed == [] and G.data_passes == 0


def test_analyze_refuses_a_solver_option_above_the_samples_before_opening_the_file(tmp_path):
    from curvkit.runs import ProblemSettings, analyze

    out = tmp_path / "r.h5"
    ihvp = {"solvers": ["lissa"], "solver_options": {"lissa": {"batch_size": 101}}}
    plan = AnalysisPlan(top_k=0, trace=None, density=False, options={"ihvp": ihvp})
    message = r"^--ihvp-option lissa.batch_size must be an integer in 1..100 \(the samples\), got 101$"
    with pytest.raises(curvkit.CurvkitError, match=message):
        analyze([MLP], output=out, plan=plan, settings=ProblemSettings(max_samples=100), estimators=["ggn"])
    assert not out.exists()


def test_ihvp_on_the_command_line_show_plot_export(tmp_path, run_curvkit):
    out = tmp_path / "r.h5"
    args = [
        "analyze",
        MLP,
        "--curvature",
        "ggn",
        "--ihvp",
        "cg,minres",
        "--ihvp",
        "neumann",
        "--damping",
        "1e-2",
    ]
    # float32: a tolerance an order above the rounding floor (1e-6 stagnates at 1.1e-6 on AVX-512 CPUs)
    args += ["--ihvp-tol", "1e-5", "--max-samples", "300", "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if "ihvp/gradient" in line)
    assert "cg error" in line and "minres error" in line and "neumann error" in line
    with ResultsStore(out, "r") as store:
        (run,) = store.runs()
        assert run.analyses() == ["ihvp/gradient"]  # --ihvp alone asks for nothing else
        stored = run.read("ihvp/gradient")
        assert set(stored.curves) == {"cg", "minres", "neumann"} and stored.damping == 1e-2
        assert stored.curves["cg"].converged and stored.curves["cg"].final("cosine") > 0.999
    shown = runner.invoke(app, ["show", str(out)])
    assert shown.exit_code == 0 and "ihvp/gradient" in shown.stdout and "cosine" in shown.stdout
    for name, curve in stored.curves.items():  # a row per solver; why each that failed stopped, below
        assert any(line.startswith(f"│ {name} ") for line in shown.stdout.splitlines()), name
        assert (f"    {name}: {curve.reason}" in shown.stdout) != curve.converged, name
    plotted = runner.invoke(app, ["plot", str(out), "-o", str(tmp_path / "fig"), "--formats", "png"])
    assert plotted.exit_code == 0, plotted.output
    names = sorted(p.name for p in (tmp_path / "fig").iterdir())
    assert any(n.endswith("ihvp-gradient-matvecs.png") for n in names)
    assert any(n.endswith("ihvp-gradient-seconds.png") for n in names)
    exported = runner.invoke(app, ["export", str(out), "--format", "json"])
    curves = json.loads(exported.stdout)["runs"][0]["analyses"]["ihvp/gradient"]["curves"]
    assert set(curves) == {"cg", "minres", "neumann"}
    again = runner.invoke(app, [*args, "--json", "--quiet"])  # resumes
    assert json.loads(again.stdout)["runs"][0]["resumed"] == ["ihvp/gradient"]
    torch.save(torch.ones(5), tmp_path / "short.pt")
    for bad, fragment in (
        (["--damping", "-1"], "--damping must be a finite number >= 0"),
        (["--ihvp-vector", "nosuch.pt"], "--ihvp-vector must be gradient, random or an existing .pt file"),
        (["--ihvp-vector", "short.pt"], "must be a floating-point [P] tensor with P = 3,466"),
    ):
        proc = run_curvkit("analyze", MLP, "--ihvp", "cg", *bad, "-o", str(out), cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        (one,) = proc.stderr.strip().splitlines()
        assert fragment in one
    for bad, fragment in (
        (["--ihvp", "cgg"], "unknown solver cgg"),
        (
            ["--ihvp", "cg", "--ihvp-option", "lissa.repeats=2"],
            "--ihvp-option for lissa, which --ihvp does not",
        ),
        (["--ihvp", "cg", "--ihvp-option", "repeats=2"], "names no solver: write SOLVER.NAME=VALUE"),
        (["--ihvp", "cg", "--ihvp-maxiter", "0"], "the ihvp maxiter must be an integer >= 1, got 0"),
        (["--ihvp", "cg", "--ihvp-option", "cg.bogus=1"], "solver 'cg' takes no option 'bogus'"),
    ):
        proc = run_curvkit("analyze", MLP, *bad, "-o", str(out), cwd=tmp_path)
        assert proc.returncode == 2 and fragment in proc.stderr and "Traceback" not in proc.stderr, (
            proc.stderr
        )
    with ResultsStore(out, "r") as store:  # the finished results are kept
        assert store.runs()[0].read("ihvp/gradient").curves["cg"].converged


def test_ihvp_solver_options_from_the_command_line(tmp_path):
    out = tmp_path / "r.h5"
    args = [
        "analyze",
        MLP,
        "--curvature",
        "ggn",
        "--max-samples",
        "200",
        "--ihvp",
        "lissa,cg",
        "-o",
        str(out),
    ]
    args += [
        "--ihvp-option",
        "lissa.repeats=2",
        "--ihvp-option",
        "lissa.batch_size=50",
        "--ihvp-maxiter",
        "7",
    ]
    result = runner.invoke(app, [*args, "--ihvp-tol", "1e-3", "--quiet"])
    assert result.exit_code == 0, result.output
    with ResultsStore(out, "r") as store:
        (run,) = store.runs()
        assert run.request("ihvp/gradient")["solver_options"] == {"lissa": {"repeats": 2, "batch_size": 50}}
        lissa = run.read("ihvp/gradient").curves["lissa"]
        assert "2 repeat(s) of 7 steps on mini-batches of 50 of 200 samples" in lissa.reason
        assert run.read("ihvp/gradient").tol == 1e-3


def test_ihvp_vector_from_a_file(tmp_path):
    problem = get_case("tanh-mlp-ce").problem()
    v = torch.randn(problem.dim, dtype=DT, generator=torch.Generator().manual_seed(3))
    torch.save(v, tmp_path / "direction.pt")
    plan = AnalysisPlan(
        top_k=0,
        trace=None,
        density=False,
        options={"ihvp": {"solvers": ["cg"], "vector": str(tmp_path / "direction.pt")}},
    )
    assert plan.keys() == ["ihvp/file-direction"] and "vector_sha256" in plan.request("ihvp/file-direction")
    results = curvkit.analysis.run_plan(curvkit.curvature("ggn", problem), plan)
    assert results["ihvp/file-direction"].curves["cg"].converged


def test_ihvp_vector_file_is_checked_with_the_options_and_its_size_before_any_analysis(tmp_path):
    """A file that is not one floating-point tensor of one dimension is refused when the plan is made;
    one of another size than ``P`` once ``P`` is known, before any analysis starts. Both were found by
    the analysis itself, after the run was begun (and marked failed)."""
    one_dimension = "the vector must be a floating-point [P] tensor (one dimension), got"
    for name, content, message in [
        ("ints", torch.arange(26), f": {one_dimension} (26,) torch.int64"),
        ("column", torch.ones(26, 1), f": {one_dimension} (26, 1) torch.float32"),
        ("scalar", torch.tensor(1.0), f": {one_dimension} () torch.float32"),
        ("dict", {"v": torch.ones(26)}, " holds a dict, not a tensor"),
    ]:
        path = tmp_path / f"{name}.pt"
        torch.save(content, path)
        with pytest.raises(curvkit.CurvkitError) as info:
            AnalysisPlan(options={"ihvp": {"solvers": ["cg"], "vector": str(path)}})
        assert str(info.value) == f"--ihvp-vector {path}{message}"
    (tmp_path / "junk.pt").write_text("not a tensor")
    with pytest.raises(curvkit.CurvkitError, match=r"junk.pt: cannot read a tensor \(UnpicklingError\)$"):
        AnalysisPlan(options={"ihvp": {"solvers": ["cg"], "vector": str(tmp_path / "junk.pt")}})
    torch.save(torch.ones(10, dtype=DT), tmp_path / "short.pt")
    plan = AnalysisPlan(
        top_k=1,
        trace=None,
        density=False,
        options={"ihvp": {"solvers": ["cg"], "vector": str(tmp_path / "short.pt")}},
    )
    plan.check_dimension(10)
    message = r"the vector must be a floating-point \[P\] tensor with P = 26, got \(10,\) torch.float64$"
    with pytest.raises(curvkit.ShapeMismatchError, match=message):
        plan.check_dimension(26)
    G = curvkit.curvature("ggn", seed_problem())
    computed = []
    with pytest.raises(curvkit.ShapeMismatchError, match=message):
        curvkit.analysis.run_plan(G, plan, on_result=lambda key, *_: computed.append(key))
    assert computed == [] and G.data_passes == 0  # eigen/largest, first in the plan, not computed
