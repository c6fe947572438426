"""``curvkit analyze --compare-to``: estimators against a baseline, stored, shown, plotted, exported, resumed.

The estimators compared are the ``test_estimators`` fixture's (``tests/conftest.py``):
``shifted-hessian`` (``H + diag(ramp)``: other eigenvalues, eigenvectors and trace)
and ``scaled-hessian`` (``1.5 H``), against the Hessian, on the last layer of the
bundled MLP (P=330) in float64.
"""

from __future__ import annotations

import csv
import io
import json

import pytest
import scipy.linalg
import torch
from curvkit.cli.main import app
from typer.testing import CliRunner

import curvkit
from curvkit.analysis import AnalysisPlan
from curvkit.datasets import bundled_file, load_dataset
from curvkit.runs import ProblemSettings
from curvkit.store import ResultsStore
from curvkit.testing import dense_hessian_reference

MLP = str(bundled_file("digits_mlp.pt"))
SETTINGS = ["--params", "4", "--max-samples", "300", "--dtype", "float64"]
ANALYSES = ["--top-k", "3", "--tol", "1e-10", "--trace", "exact"]
COMMAND = [
    "analyze",
    MLP,
    *SETTINGS,
    *ANALYSES,
    "--curvature",
    "shifted-hessian,hessian,scaled-hessian",
    "--compare-to",
    "hessian",
    "--quiet",
    "--json",
]


def invoke(*args: str, columns: int = 250):
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def compared(tmp_path_factory, test_estimators):
    """A results file with two estimators compared with the Hessian, and the command's runs."""
    out = tmp_path_factory.mktemp("compare") / "r.h5"
    runs = json.loads(invoke(*COMMAND, "-o", str(out)).stdout)["runs"]
    return out, {run["estimator"]: run for run in runs}


def truth(shift: float = 0.05, k: int = 3) -> dict[str, float]:
    """The three figures of ``H + diag(ramp)`` against ``H``, from dense matrices and SciPy."""
    ckpt = torch.load(MLP, weights_only=True)
    model = curvkit.models.digits_mlp(**ckpt["curvkit"]["model_kwargs"])
    model.load_state_dict(ckpt["model_state_dict"])
    X, y = load_dataset("digits")
    problem = curvkit.Problem(model.double(), "cross_entropy", (X[:300].double(), y[:300]), params=["4"])
    H = dense_hessian_reference(problem)
    S = H + torch.diag(torch.linspace(0, shift, problem.dim, dtype=torch.float64))
    (mu, U), (lam, V) = (torch.linalg.eigh(M) for M in (H, S))
    mu, U, lam, V = mu[-k:].flip(0), U[:, -k:], lam[-k:].flip(0), V[:, -k:]
    return {
        "value_error": ((lam - mu).abs().max() / mu.abs().max()).item(),
        "max_principal_angle": float(scipy.linalg.subspace_angles(U.numpy(), V.numpy()).max()),
        "trace_difference": ((S.trace() - H.trace()) / H.trace().abs()).item(),
    }


def test_the_figures_match_an_independent_computation(compared):
    _, runs = compared
    assert list(runs) == ["hessian", "shifted-hessian", "scaled-hessian"]  # the baseline's run first
    assert "compare/hessian" not in runs["hessian"]["analyses"]  # not compared with itself
    found = runs["shifted-hessian"]["analyses"]["compare/hessian"]
    expected = truth()
    assert found["value_error"] == pytest.approx(expected["value_error"], rel=1e-6)
    assert found["max_principal_angle"] == pytest.approx(expected["max_principal_angle"], rel=1e-4)
    assert found["trace_difference"] == pytest.approx(expected["trace_difference"], rel=1e-9)
    assert 1e-3 < found["max_principal_angle"] < 1 and found["trace_difference"] > 0.01  # far from zero
    scaled = runs["scaled-hessian"]["analyses"]["compare/hessian"]  # 1.5 H: the same eigenvectors
    assert scaled["value_error"] == pytest.approx(0.5, rel=1e-9)
    assert scaled["trace_difference"] == pytest.approx(0.5, rel=1e-9)
    assert scaled["max_principal_angle"] < 1e-6
    # everything came from the runs of the same command: no product spent on the comparison
    for result in (found, scaled):
        assert sorted(result["reused"]) == ["baseline eigenpairs", "baseline trace", "eigenpairs", "trace"]
        assert result["matvecs"] == result["baseline_matvecs"] == 0 and result["trace_method"] == "exact"


def test_show_lists_the_comparisons_in_one_table(compared):
    out, _ = compared
    shown = invoke("show", str(out)).stdout
    table = shown[shown.index("comparisons: each estimator against its baseline") :]
    rows = [line for line in table.splitlines() if "digits_mlp.pt" in line]
    assert len(rows) == 2
    assert "shifted-hessian" in rows[0] and "hessian" in rows[0] and "+" in rows[0]
    assert "scaled-hessian" in rows[1] and "5.00e-01" in rows[1] and "+50.00% (exact)" in rows[1]
    assert "compare/hessian: shifted-hessian vs hessian: top-3 eigenvalues differ by" in shown


def test_plot_draws_each_comparison_and_the_estimators_side_by_side(compared, tmp_path):
    out, runs = compared
    invoke("plot", str(out), "-o", str(tmp_path), "--formats", "png")
    for name in ("shifted-hessian", "scaled-hessian"):
        assert (tmp_path / f"{runs[name]['run_id']}-compare-hessian.png").exists()
    assert not list(tmp_path.glob(f"{runs['hessian']['run_id']}-compare*"))
    assert (tmp_path / "comparison-1-hessian.png").exists()  # the two estimators, bars of the figures


def test_export_gives_every_figure_as_json_and_csv(compared):
    out, runs = compared
    data = json.loads(invoke("export", str(out)).stdout)
    exported = {run["provenance"]["estimator"]: run["analyses"] for run in data["runs"]}
    assert (
        exported["shifted-hessian"]["compare/hessian"]
        == runs["shifted-hessian"]["analyses"]["compare/hessian"]
    )
    rows = list(csv.DictReader(io.StringIO(invoke("export", str(out), "--format", "csv").stdout)))
    mine = {
        (row["quantity"], row["item"]): float(row["value"])
        for row in rows
        if row["estimator"] == "shifted-hessian" and row["analysis"] == "compare/hessian"
    }
    stored = exported["shifted-hessian"]["compare/hessian"]
    for quantity in ("value_error", "max_principal_angle", "trace_difference", "trace", "baseline_trace"):
        assert mine[(quantity, "")] == pytest.approx(stored[quantity], rel=1e-12)
    assert mine[("eigenvalue", "0")] == pytest.approx(stored["values"][0], rel=1e-12)
    assert mine[("baseline_eigenvalue", "2")] == pytest.approx(stored["baseline_values"][2], rel=1e-12)


def test_a_rerun_resumes_the_comparisons(compared):
    out, runs = compared
    again = {run["estimator"]: run for run in json.loads(invoke(*COMMAND, "-o", str(out)).stdout)["runs"]}
    for name in ("shifted-hessian", "scaled-hessian"):
        assert "compare/hessian" in again[name]["resumed"]
        assert again[name]["analyses"]["compare/hessian"] == runs[name]["analyses"]["compare/hessian"]


def test_a_comparison_added_later_reuses_what_the_file_holds(tmp_path, test_estimators):
    """A run analysed without --compare-to, then with it: its trace is read back, its
    eigenpairs (stored without vectors) recomputed, and the baseline, not among the
    estimators, computed with its progress reported."""
    out = tmp_path / "r.h5"
    settings = ProblemSettings(params=["4"], max_samples=300, dtype="float64")
    plan = AnalysisPlan(top_k=3, tol=1e-10, trace="exact", density=False)
    first = curvkit.analyze([MLP], output=out, plan=plan, settings=settings, estimators=["shifted-hessian"])
    events = []
    later = AnalysisPlan(top_k=3, tol=1e-10, trace="exact", density=False, compare_to="hessian")
    (run,) = curvkit.analyze(
        [MLP],
        output=out,
        plan=later,
        settings=settings,
        estimators=["shifted-hessian"],
        progress=events.append,
    ).runs
    assert run.run_id == first.runs[0].run_id and run.resumed == ["eigen/largest", "trace/exact"]
    result = run.results["compare/hessian"]
    assert result.reused == ("trace",) and result.matvecs > 0 and result.baseline_matvecs > 0
    assert result.value_error == pytest.approx(truth()["value_error"], rel=1e-6)
    counted = [e for e in events if e.kind == "counters" and e.key == "compare/hessian"]
    stages = {e.counters["stage"].split(":")[0] for e in counted}
    assert stages == {"estimator eigenpairs", "baseline eigenpairs", "baseline trace"}
    with ResultsStore(out, mode="r") as store:
        request = store.run(run.run_id).request("compare/hessian")
    assert request["baseline"] == "hessian" and request["baseline_options"] == {} and request["k"] == 3


def test_a_comparison_needs_another_estimator(tmp_path):
    plan = AnalysisPlan(top_k=2, compare_to="hessian")
    with pytest.raises(curvkit.CurvkitError, match="but the only estimator is hessian"):
        curvkit.analyze([MLP], output=tmp_path / "r.h5", plan=plan, estimators=["hessian"])
    assert not (tmp_path / "r.h5").exists()


def test_a_comparison_needs_eigenpairs():
    with pytest.raises(curvkit.CurvkitError, match="--compare-to hessian compares the top-k eigenpairs"):
        AnalysisPlan(top_k=0, compare_to="hessian")
    keys = AnalysisPlan(compare_to="hessian").keys(estimator="ggn")
    assert keys[-1] == "compare/hessian" and "compare/hessian" not in AnalysisPlan(compare_to="hessian").keys(
        estimator="hessian"
    )
