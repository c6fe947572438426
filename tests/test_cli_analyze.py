"""``curvkit analyze``, ``show``, ``plot`` and ``export`` end to end on the bundled checkpoints."""

from __future__ import annotations

import json
import os
import shutil

import h5py
import pytest
import torch
from curvkit.cli.main import app
from typer.testing import CliRunner

import curvkit
from curvkit.datasets import bundled_file
from curvkit.store import ResultsStore

runner = CliRunner()
MLP = str(bundled_file("digits_mlp.pt"))


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=True)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    out = tmp_path_factory.mktemp("analyze") / "results.h5"
    result = invoke("analyze", MLP, "-o", str(out), "--json", "--quiet")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_default_analyses_are_stored(analysed):
    out, summary = analysed
    assert summary["runs"][0]["provenance"]["parameter_count"] == 3466
    with ResultsStore(out, mode="r") as store:
        (run,) = store.runs()
        assert run.status == "complete"
        assert set(run.analyses()) == {"eigen/largest", "trace/hutch++", "density/slq"}
        top = run.read("eigen/largest")
        assert top.values.shape == (5,) and top.converged
        prov = run.provenance
        assert prov["checkpoint_sha256"] and prov["estimator"] == "hessian" and prov["sample_count"] == 1797
        assert prov["loss"] == "cross_entropy" and prov["curvkit_version"] == curvkit.__version__
    # the stored values are the Hessian's: check the top eigenvalue against a fresh computation
    ckpt = torch.load(MLP, weights_only=True)
    model = curvkit.models.digits_mlp(**ckpt["curvkit"]["model_kwargs"])
    model.load_state_dict(ckpt["model_state_dict"])
    problem = curvkit.Problem(model, "cross_entropy", curvkit.datasets.load_dataset("digits"))
    fresh = curvkit.eigenvalues(curvkit.curvature("hessian", problem), k=1, tol=1e-6)
    assert abs(fresh.values[0].item() - top.values[0].item()) <= 1e-3 * fresh.values[0].item()


def test_rerun_resumes_without_recomputing(analysed):
    out, _ = analysed
    result = invoke("analyze", MLP, "-o", str(out), "--json", "--quiet")
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout)["runs"][0]
    assert run["resumed"] == sorted(["eigen/largest", "trace/hutch++", "density/slq"])
    with ResultsStore(out, mode="r") as store:
        assert store.runs()[0].attempts == 2


@pytest.mark.parametrize("skip_bad", [False, True])
def test_a_failure_during_a_run_is_recorded_as_its_failed_attempt(tmp_path, monkeypatch, skip_bad):
    """A failure of the work once a run is begun (the model's forward running out of memory, which
    ``Problem`` reports as a ``DataError``) is the run's failed attempt, with its error, whatever its
    exception class: a complete run resumed reads ``failed`` (2 attempts), keeps what the attempt
    finished, and the next command resumes it. (An error class taken for the caller's bad input
    once left no trace of such a failure in the file.)"""
    from curvkit import runs
    from curvkit.analysis import AnalysisPlan
    from curvkit.runs import ProblemSettings, analyze

    out = tmp_path / "r.h5"
    settings = ProblemSettings(max_samples=100)
    analyze([MLP], output=out, plan=AnalysisPlan(top_k=1, trace=None, density=False), settings=settings)
    more = AnalysisPlan(top_k=1, trace="hutchinson", trace_matvecs=3, density=False)

    def out_of_memory(operator, plan, *, on_result, **_):
        on_result("trace/hutchinson", curvkit.TraceResult(12.5, 0.25, "hutchinson", 3, None, 0), 0.1, None)
        raise curvkit.DataError("the model cannot be applied to a batch: CUDA out of memory")

    monkeypatch.setattr(runs, "run_checked_plan", out_of_memory)
    if skip_bad:
        (failed,) = analyze([MLP], output=out, plan=more, settings=settings, skip_bad=True).failed
        assert "out of memory" in failed.error
    else:
        with pytest.raises(curvkit.DataError, match="out of memory"):
            analyze([MLP], output=out, plan=more, settings=settings)
    with ResultsStore(out, "r") as store:
        (run,) = store.runs()
        assert run.status == "failed" and run.attempts == 2 and "out of memory" in run.error
        assert run.has("trace/hutchinson")  # finished by the attempt: kept
    monkeypatch.undo()
    (resumed,) = analyze([MLP], output=out, plan=more, settings=settings).runs
    assert resumed.status == "complete" and "trace/hutchinson" in resumed.resumed


def test_changed_options_recompute_instead_of_resuming(tmp_path):
    out = str(tmp_path / "r.h5")

    def analyze(*flags: str) -> dict:
        result = invoke("analyze", MLP, *flags, "-o", out, "--json", "--quiet")
        assert result.exit_code == 0, result.output
        (run,) = json.loads(result.stdout)["runs"]
        return run

    assert analyze("--top-k", "2")["resumed"] == []
    assert analyze("--top-k", "3")["resumed"] == []  # another k: recomputed, not the stored pair
    assert analyze("--top-k", "3", "--tol", "1e-5")["resumed"] == []  # another tolerance
    assert analyze("--top-k", "3", "--tol", "1e-5")["resumed"] == ["eigen/largest"]  # the same request
    with ResultsStore(out, mode="r") as store:
        (run,) = store.runs()
        top = run.read("eigen/largest")
        assert top.values.shape == (3,) and top.tol == 1e-5 and run.attempts == 4


def test_explicit_flags_select_analyses(tmp_path):
    out = tmp_path / "r.h5"
    result = invoke(
        "analyze",
        MLP,
        "-o",
        str(out),
        "--quiet",
        "--top-k",
        "2",
        "--check",
        "--per-layer",
        "--max-samples",
        "300",
        "--trace",
        "xtrace",
        "--trace-matvecs",
        "20",
    )
    assert result.exit_code == 0, result.output
    with ResultsStore(out, mode="r") as store:
        run = store.runs()[0]
        assert set(run.analyses()) == {
            "eigen/largest",
            "trace/xtrace",
            "checks/symmetry",
            "checks/residuals",
            "checks/agreement",
            "per_layer/module",
        }  # P = 3466: the agreement check needs no dense matrix, whatever P
        assert run.read("checks/residuals").passed and run.provenance["sample_count"] == 300
        assert run.read("checks/agreement").passed


def test_show_plot_export(analysed, tmp_path):
    out, _ = analysed
    shown = invoke("show", str(out))
    assert shown.exit_code == 0 and "complete" in shown.stdout and "hessian" in shown.stdout
    plotted = invoke("plot", str(out), "-o", str(tmp_path / "fig"))
    assert plotted.exit_code == 0, plotted.output
    assert (
        len(list((tmp_path / "fig").glob("*.png"))) == 2 and len(list((tmp_path / "fig").glob("*.pdf"))) == 2
    )
    exported = invoke("export", str(out), "--format", "json")
    data = json.loads(exported.stdout)
    assert data["runs"][0]["status"] == "complete"
    csv_out = tmp_path / "r.csv"
    assert invoke("export", str(out), "--format", "csv", "-o", str(csv_out)).exit_code == 0
    assert csv_out.read_text().splitlines()[0].startswith("run_id")


def test_trajectory_of_checkpoints(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for step in (2, 10):
        shutil.copy(MLP, folder / f"step-{step}.pt")
    out = tmp_path / "traj.h5"
    result = invoke("analyze", str(folder), "-o", str(out), "--quiet", "--top-k", "1", "--trace", "exact")
    assert result.exit_code == 0, result.output
    with ResultsStore(out, mode="r") as store:
        names = [os.path.basename(r.provenance["checkpoint"]) for r in store.runs()]
    assert names == ["step-2.pt", "step-10.pt"]  # natural order
    assert invoke("plot", str(out), "-o", str(tmp_path / "f"), "--formats", "png").exit_code == 0
    assert (tmp_path / "f" / "trajectory-1-hessian-top-eigenvalue.png").exists()


def test_analyze_checks_the_plan_once_per_run(tmp_path, monkeypatch):
    """``AnalysisPlan.check_dimension`` (which reads an ``--ihvp-vector`` file) ran in ``prepare`` and
    again at the top of ``run_plan``; a checkpoint of a trajectory after the first, prepared again
    for its analysis, a third time. Once per run now; ``run_plan`` called from Python still checks."""
    from curvkit.analysis import AnalysisPlan, run_plan
    from curvkit.kinds import ihvp
    from curvkit.runs import ProblemSettings, analyze

    for step in (1, 2):
        shutil.copy(MLP, tmp_path / f"step-{step}.pt")
    vector = tmp_path / "v.pt"
    torch.save(torch.ones(3466), vector)
    ihvp_options = {"solvers": ["cg"], "vector": str(vector), "maxiter": 2, "reference": "cg"}
    plan = AnalysisPlan(top_k=0, trace=None, density=False, options={"ihvp": ihvp_options})
    checked, loaded = [], []
    check_dimension, load_vector = AnalysisPlan.check_dimension, ihvp._load_vector
    monkeypatch.setattr(
        AnalysisPlan,
        "check_dimension",
        lambda self, *args: (checked.append(args), check_dimension(self, *args))[1],
    )
    monkeypatch.setattr(ihvp, "_load_vector", lambda path: (loaded.append(path), load_vector(path))[1])
    settings = ProblemSettings(max_samples=20)
    report = analyze(
        [tmp_path / "step-1.pt", tmp_path / "step-2.pt"],
        output=tmp_path / "r.h5",
        plan=plan,
        settings=settings,
        estimators=["ggn"],
    )
    assert [run.status for run in report.runs] == ["complete", "complete"]
    assert checked == [(3466, 20), (3466, 20)]
    assert len(loaded) == 4  # per run: its check, its analysis
    # run_plan from Python still checks (tests/test_analysis_kinds.py: a vector of another size)
    problem = curvkit.Problem(torch.nn.Linear(2, 1), "mse", (torch.randn(20, 2), torch.randn(20, 1)))
    with pytest.raises(curvkit.ShapeMismatchError, match="with P = 3, got"):
        run_plan(curvkit.curvature("ggn", problem), plan)
    assert len(checked) == 3


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["analyze", "missing.pt"], "no checkpoint file"),
        (["analyze", MLP, "--data", "nosuchdata"], "nosuchdata"),
        (["analyze", MLP, "--model-kwargs", "{bad"], "--model-kwargs"),
        (["analyze", MLP, "--curvature", "hesian"], "did you mean 'hessian'"),
        (["analyze", MLP, "--device", "cuda"] if not torch.cuda.is_available() else ["show", "x.h5"], "cuda"),
        (
            ["analyze", MLP, "--device", "mps"],
            "--device 'mps' is not supported; use auto, cpu, cuda or cuda:i",
        ),
        (["analyze", MLP, "--device", "meta"], "--device 'meta' is not supported"),
        (["analyze", MLP, "-o", "/nonexistent-dir/r.h5"], "nonexistent-dir"),
        (["show", "missing.h5"], "missing.h5"),
        (["analyze", "corrupt.pt"], "corrupt.pt"),
        (["analyze", "nan.pt"], "non-finite weights"),
        (["analyze", MLP, "--model", "curvkit.models:digits_cnn"], "digits_cnn"),
        (["show", "foreign.h5"], "another tool"),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, fragment, run_curvkit):
    """More bad input, with the results file checked unchanged, is in test_cli_validation.py."""
    (tmp_path / "corrupt.pt").write_bytes(open(MLP, "rb").read()[:5000])  # truncated
    ckpt = torch.load(MLP, weights_only=True)
    ckpt["model_state_dict"]["0.weight"] = torch.full_like(ckpt["model_state_dict"]["0.weight"], float("nan"))
    torch.save(ckpt, tmp_path / "nan.pt")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = [1, 2, 3]
    proc = run_curvkit(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("curvkit: error:") and fragment in lines[0], proc.stderr


def test_a_device_is_auto_cpu_or_a_cuda_device_of_this_machine(monkeypatch):
    from curvkit.runs import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    for name in ("mps", "xpu", "cuda:x", "cpu:0", "CUDA"):  # torch knows most: refused in one line anyway
        with pytest.raises(curvkit.CurvkitError, match=f"^--device '{name}' is not supported; use auto, cpu"):
            resolve_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda") and resolve_device("cuda:1") == torch.device(
        "cuda:1"
    )
    with pytest.raises(curvkit.CurvkitError, match="^--device cuda:2 asked for, but this machine has 2 CUDA"):
        resolve_device("cuda:2")


def test_unreachable_float32_tolerance_warns_in_one_line(tmp_path, run_curvkit):
    proc = run_curvkit("analyze", MLP, "--top-k", "2", "--tol", "1e-9", "-o", "r.h5", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("curvkit: warning: tol=1e-09 is below what torch.float32 products can certify")
    (run,) = json.loads(proc.stdout)["runs"]
    assert run["analyses"]["eigen/largest"]["converged"] is False
    with ResultsStore(tmp_path / "r.h5", mode="r") as store:
        (stored,) = store.runs()
        top = stored.read("eigen/largest")
        assert not top.converged and (top.residuals / top.values[0] < 1e-6).all()


def test_solver_budget_and_reorthogonalisation_from_the_command_line(tmp_path):
    out = tmp_path / "r.h5"
    result = invoke("analyze", MLP, "--top-k", "3", "--tol", "1e-6", "--max-matvecs", "6", "-o", str(out))
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if "eigen/largest" in line)
    assert "6 products, NOT converged: product budget spent" in line
    result = invoke(
        "analyze", MLP, "--top-k", "3", "--reorthogonalisation", "full", "-o", str(out), "--json", "--quiet"
    )
    (run,) = json.loads(result.stdout)["runs"]
    assert run["resumed"] == []  # another solver setting: recomputed, not the budget-limited pairs
    assert run["analyses"]["eigen/largest"]["stop_reason"] == "converged"
    with ResultsStore(out, mode="r") as store:
        (stored,) = store.runs()
        assert stored.request("eigen/largest")["reorthogonalisation"] == "full"


def test_bfloat16_products_with_float32_analyses(analysed, tmp_path):
    out = tmp_path / "bf16.h5"
    result = invoke(
        "analyze", MLP, "--dtype", "bfloat16", "--top-k", "2", "--tol", "1e-2", "--check",
        "-o", str(out), "--json", "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (run,) = json.loads(result.stdout)["runs"]
    assert run["provenance"]["dtype"] == "bfloat16" and run["status"] == "complete"
    top = run["analyses"]["eigen/largest"]
    assert top["converged"]  # 1e-2 is within bfloat16's reach; the solve's arithmetic is float32's
    float32_top = analysed[1]["runs"][0]["analyses"]["eigen/largest"]["values"][0]
    assert abs(top["values"][0] - float32_top) < 2e-2 * abs(float32_top)
    assert run["analyses"]["checks/agreement"]["passed"] and run["analyses"]["checks/symmetry"]["passed"]
    assert top["data_passes"] > 0  # counted by the bfloat16 operator, reported through the conversion
