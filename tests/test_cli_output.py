"""What a researcher reads: ``--json`` numbers, ``show``, the summary streams, ``plot``."""

from __future__ import annotations

import json
import math
import re

import matplotlib
import pytest
import torch
from curvkit.cli.main import app
from typer.testing import CliRunner

from curvkit import plotting
from curvkit.datasets import bundled_file
from curvkit.runs import trajectories
from curvkit.store import ResultsStore

matplotlib.use("Agg")

MLP = str(bundled_file("digits_mlp.pt"))
runner = CliRunner()
ALL = ["--top-k", "2", "--trace", "hutchinson", "--trace-matvecs", "12", "--density", "--max-samples", "300"]


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    out = tmp_path_factory.mktemp("output") / "results.h5"
    result = runner.invoke(app, ["analyze", MLP, *ALL, "-o", str(out), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_json_holds_numbers_not_formatted_text(analysed):
    out, document = analysed
    assert document["output"] == str(out)
    (run,) = document["runs"]
    assert run["status"] == "complete" and run["resumed"] == [] and run["run_id"]
    top = run["analyses"]["eigen/largest"]
    assert all(isinstance(v, float) for v in top["values"] + top["residuals"])
    assert isinstance(top["matvecs"], int) and isinstance(top["converged"], bool)
    trace = run["analyses"]["trace/hutchinson"]
    assert isinstance(trace["estimate"], float) and isinstance(trace["stderr"], float)
    density = run["analyses"]["density/slq"]
    assert len(density["grid"]) == len(density["density"]) and isinstance(density["sigma"], float)
    prov = run["provenance"]
    assert prov["sample_count"] == 300 and prov["dtype"] == "float32" and prov["seed"] == 0
    assert prov["checkpoint_sha256"] and prov["data_fingerprint"] and prov["estimator"] == "hessian"
    assert set(run["timings"]) == {"prepare", "eigen/largest", "trace/hutchinson", "density/slq"}
    assert run["peak_memory"] == {}  # a CPU run: no device counter, no number
    with ResultsStore(out, mode="r") as store:  # the same document `curvkit export` writes
        assert store.run(run["run_id"]).to_dict()["analyses"] == run["analyses"]


def test_show_prints_provenance_results_and_timings(analysed):
    out, document = analysed
    result = runner.invoke(app, ["show", str(out)], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    text = result.stdout
    (run,) = document["runs"]
    prov = run["provenance"]
    for expected in (
        "digits_mlp.pt [hessian]",  # named by checkpoint
        "complete",
        "curvkit.models:digits_mlp",
        "digits: 300 samples",
        "cross_entropy",
        "P=3,466",
        "float32 on cpu, seed 0",
        prov["checkpoint_sha256"][:12],
        "relative residual",
        "trace/hutchinson",
        "density/slq: 3 runs x 60 steps",
        "timings",
    ):
        assert expected in text, expected
    values = run["analyses"]["eigen/largest"]["values"]
    assert f"{values[0]:.8g}" in text and "#0" not in text
    assert max(len(line) for line in text.splitlines() if "│" in line or "┃" in line) <= 100


def test_the_summary_goes_to_stdout_unwrapped_and_diagnostics_to_stderr(tmp_path, run_curvkit):
    deep = tmp_path / ("a-folder-with-a-rather-long-name-" * 3)
    deep.mkdir()
    checkpoint = deep / "digits_mlp.pt"
    checkpoint.write_bytes(open(MLP, "rb").read())
    proc = run_curvkit(
        "analyze", str(checkpoint), "--top-k", "1", "--tol", "1e-9", "-o", "r.h5", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{checkpoint} [hessian] P=3,466 -> r.h5"  # one line, however long
    assert lines[1].startswith("  eigen/largest: [") and len(lines) == 2
    assert proc.stderr.startswith("curvkit: warning: ")  # a diagnostic, on stderr
    # the remedies as the command line spells them (docs/cli.md, --tol), then as Python does
    assert "Use a float64 operator, --dtype float64 (problem.to(torch.float64))," in proc.stderr
    assert re.search(r"or a tolerance of at least (\S+), --tol \1 \(tol=\1\)$", proc.stderr.strip())


@pytest.fixture
def trajectory_file(tmp_path):
    """Three checkpoints recording their training step, analysed with two seeds."""
    folder = tmp_path / "ckpts"
    folder.mkdir()
    ckpt = torch.load(MLP, weights_only=True)
    for name, step in (("late", 900), ("early", 100), ("middle", 500)):
        torch.save({**ckpt, "step": step}, folder / f"{name}.pt")
    out = tmp_path / "r.h5"
    for seed in ("0", "1"):
        args = ["analyze", str(folder), "--top-k", "1", "--trace", "hutchinson", "--trace-matvecs", "6"]
        result = runner.invoke(app, [*args, "--max-samples", "100", "--seed", seed, "-o", str(out), "-q"])
        assert result.exit_code == 0, result.output
    return out


def test_trajectories_group_runs_that_differ_in_the_checkpoint_alone(trajectory_file):
    with ResultsStore(trajectory_file, mode="r") as store:
        found = trajectories(store.runs())
        assert len(found) == 2  # one per seed, never mixed
        for trajectory in found:
            assert trajectory.xlabel == "step" and trajectory.positions == [100.0, 500.0, 900.0]
            assert trajectory.labels == ["early.pt", "middle.pt", "late.pt"]
            assert len({run.provenance["seed"] for run in trajectory.runs}) == 1
        assert {t.runs[0].provenance["seed"] for t in found} == {0, 1}


@pytest.mark.parametrize("place", ["epoch", "step"])
def test_save_checkpoint_files_are_placed_by_their_epoch_or_step(tmp_path, place):
    """``save_checkpoint(..., epoch=e)`` writes ``epoch`` inside the curvkit metadata, not at the top."""
    from curvkit.checkpoints import save_checkpoint
    from curvkit.models import digits_mlp

    paths = []
    for position in (12, 3):  # saved out of order: the trajectory sorts them
        torch.manual_seed(position)
        paths.append(
            save_checkpoint(
                tmp_path / f"cv_{position}.pt",
                digits_mlp(),
                model_factory="curvkit.models:digits_mlp",
                data="digits",
                loss="cross_entropy",
                **{place: position},
            )
        )
    out = tmp_path / "cv.h5"
    args = ["analyze", *map(str, paths), "--top-k", "1", "--max-samples", "100", "-o", str(out), "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    with ResultsStore(out, mode="r") as store:
        (trajectory,) = trajectories(store.runs())
        assert [run.provenance["checkpoint_info"] for run in trajectory.runs] == [{place: 3}, {place: 12}]
    assert trajectory.xlabel == place and trajectory.positions == [3.0, 12.0]
    assert trajectory.labels == ["cv_3.pt", "cv_12.pt"]


def test_plot_draws_trajectories_against_the_training_step(trajectory_file, tmp_path):
    result = runner.invoke(app, ["plot", str(trajectory_file), "-o", str(tmp_path / "f"), "--formats", "png"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "f").glob("trajectory-*"))
    assert names == [
        "trajectory-1-hessian-top-eigenvalue.png",
        "trajectory-1-hessian-trace.png",
        "trajectory-2-hessian-top-eigenvalue.png",
        "trajectory-2-hessian-trace.png",
    ]
    with ResultsStore(trajectory_file, mode="r") as store:
        trajectory = trajectories(store.runs())[0]
        tops = [run.read("eigen/largest") for run in trajectory.runs]
    ax = plotting.plot_trajectory(
        trajectory.labels,
        [t.values[0].item() for t in tops],
        positions=trajectory.positions,
        xlabel=trajectory.xlabel,
        title=trajectory.title,
    )
    assert list(ax.lines[0].get_xdata()) == [100.0, 500.0, 900.0] and ax.get_xlabel() == "step"
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert "hessian on digits" in ax.get_title()


def test_densities_are_drawn_on_a_log_axis_above_an_undrawn_floor(analysed):
    out, _ = analysed
    with ResultsStore(out, mode="r") as store:
        (run,) = store.runs()
        density = run.read("density/slq")
        top = run.read("eigen/largest")
    ax = plotting.plot_density(density, title="digits_mlp.pt [hessian]")
    assert ax.get_yscale() == "log"
    drawn = ax.lines[0].get_ydata()
    peak = density.density.max().item()
    below = density.density.numpy() < peak * plotting.DENSITY_FLOOR
    assert below.any() and all(math.isnan(v) for v in drawn[below])  # a gap, not a floor of data
    assert ax.get_ylim()[0] == pytest.approx(peak * plotting.DENSITY_FLOOR)
    assert "digits_mlp.pt [hessian]" in ax.get_title() and ax.get_legend() is not None
    ax = plotting.plot_eigenvalues(top, title="digits_mlp.pt [hessian]")
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert ax.get_legend() is not None and "digits_mlp.pt" in ax.get_title()


def test_peak_device_memory_is_stored_and_shown_with_each_result(tmp_path, monkeypatch):
    """The path from the device's counter to the file, ``--json`` and ``show``, with a simulated counter."""
    import contextlib

    import curvkit.analysis
    from curvkit.memory import PeakMemory

    peaks = iter(range(1, 100))

    @contextlib.contextmanager
    def simulated(device):
        measured = PeakMemory(torch.device(device))
        yield measured
        measured.bytes = next(peaks) * 2**20

    monkeypatch.setattr(curvkit.analysis, "peak_memory", simulated)
    out = tmp_path / "results.h5"
    args = ["analyze", MLP, "--top-k", "1", "--trace", "hutchinson", "--trace-matvecs", "4"]
    result = runner.invoke(app, [*args, "--max-samples", "100", "-o", str(out), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    (run,) = json.loads(result.stdout)["runs"]
    assert run["peak_memory"] == {"eigen/largest": 2**20, "trace/hutchinson": 2 * 2**20}
    shown = runner.invoke(app, ["show", str(out)], env={"COLUMNS": "200"}).stdout
    assert "peak memory eigen/largest 1 MiB, trace/hutchinson 2 MiB" in shown
