"""A run is keyed by everything that determines its numbers: change one, get another run.

Each test analyses into one results file twice, the second time with one setting
changed. The second command must start a fresh run with fresh numbers, leave the
first run exactly as it was (values, provenance, key), and a third command with
the first settings must resume the first run.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from curvkit.cli.main import app
from typer.testing import CliRunner

import curvkit
from curvkit.datasets import bundled_file, load_dataset
from curvkit.store import ResultsStore

MLP = str(bundled_file("digits_mlp.pt"))
BASE = ["--top-k", "2", "--trace", "hutchinson", "--trace-matvecs", "12", "--max-samples", "300"]


def analyze(out, *extra: str, checkpoint: str = MLP) -> dict:
    result = CliRunner().invoke(
        app, ["analyze", checkpoint, *BASE, *extra, "-o", str(out), "--quiet", "--json"]
    )
    assert result.exit_code == 0, result.output
    (run,) = json.loads(result.stdout)["runs"]
    return run


def stored(out) -> dict[str, dict]:
    """Every run of the file as plain data (values, provenance, key, status), by id."""
    with ResultsStore(out, mode="r") as store:
        data = store.to_dict()
    for run in data["runs"]:  # what a later resumption may change: the attempt bookkeeping
        for volatile in ("attempts", "started_at", "finished_at"):
            run.pop(volatile)
    return {run["run_id"]: run for run in data["runs"]}


def top_eigenvalue(X, y, loss="cross_entropy", dtype=torch.float32, max_samples=300) -> float:
    """An independent reference: the checkpoint's model on the given data, float64."""
    ckpt = torch.load(MLP, weights_only=True)
    model = curvkit.models.digits_mlp(**ckpt["curvkit"]["model_kwargs"])
    model.load_state_dict(ckpt["model_state_dict"])
    problem = curvkit.Problem(model.double(), loss, (X[:max_samples].double(), y[:max_samples]))
    return curvkit.eigenvalues(curvkit.curvature("hessian", problem), k=1, tol=1e-10).values[0].item()


@pytest.fixture
def other_data(tmp_path):
    X, y = load_dataset("digits")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(3))
    path = tmp_path / "shuffled.npz"
    np.savez(path, X=X[order].numpy(), y=y[order].numpy())
    return path, X[order], y[order]


CHANGES = {
    "max-samples": ["--max-samples", "150"],
    "loss": ["--loss", "nll"],
    "dtype": ["--dtype", "float64"],
    "seed": ["--seed", "1"],
    "params": ["--params", "4"],
    "estimator": ["--curvature", "exact-hessian"],
}


@pytest.mark.parametrize("change", list(CHANGES), ids=list(CHANGES))
def test_a_changed_setting_starts_a_fresh_run_and_leaves_the_old_one(tmp_path, change):
    out = tmp_path / "r.h5"
    first = analyze(out)
    before = stored(out)
    second = analyze(out, *CHANGES[change])
    assert second["run_id"] != first["run_id"] and second["resumed"] == [] and second["attempts"] == 1
    after = stored(out)
    assert after[first["run_id"]] == before[first["run_id"]]  # untouched: numbers, provenance, key
    again = analyze(out)  # the first settings again: the first run, resumed
    assert again["run_id"] == first["run_id"] and again["resumed"] == sorted(first["analyses"])
    assert again["analyses"] == first["analyses"]
    if change == "max-samples":  # the fresh numbers are those of the new settings
        X, y = load_dataset("digits")
        truth = top_eigenvalue(X, y, max_samples=150)
        assert second["analyses"]["eigen/largest"]["values"][0] == pytest.approx(truth, rel=1e-3)
    if change == "dtype":
        assert second["provenance"]["dtype"] == "float64"


def test_other_data_under_the_same_name_or_another_start_another_run(tmp_path, other_data):
    path, X, y = other_data
    out = tmp_path / "r.h5"
    first = analyze(out, "--data", "digits")
    second = analyze(out, "--data", str(path))
    assert second["run_id"] != first["run_id"] and second["resumed"] == []
    assert second["analyses"]["eigen/largest"]["values"][0] == pytest.approx(top_eigenvalue(X, y), rel=1e-3)
    # the same file name with other contents: another fingerprint, another run
    X2, y2 = load_dataset("digits")
    np.savez(path, X=X2.numpy()[::-1].copy(), y=y2.numpy()[::-1].copy())
    third = analyze(out, "--data", str(path))
    assert third["run_id"] not in (first["run_id"], second["run_id"]) and third["resumed"] == []
    assert third["provenance"]["data_fingerprint"] != second["provenance"]["data_fingerprint"]
    assert len(stored(out)) == 3


def test_a_checkpoint_rewritten_in_place_starts_another_run(tmp_path):
    ckpt = tmp_path / "model.pt"
    shutil.copy(MLP, ckpt)
    out = tmp_path / "r.h5"
    first = analyze(out, checkpoint=str(ckpt))
    before = stored(out)
    state = torch.load(ckpt, weights_only=True)
    state["model_state_dict"]["4.weight"] *= 2
    torch.save(state, ckpt)
    second = analyze(out, checkpoint=str(ckpt))
    assert second["run_id"] != first["run_id"] and second["resumed"] == []
    assert stored(out)[first["run_id"]] == before[first["run_id"]]
    assert second["provenance"]["checkpoint_sha256"] != first["provenance"]["checkpoint_sha256"]


def test_the_batch_size_does_not_change_the_run(tmp_path):
    """The curvature is that of the full-data loss: the batch size changes only rounding."""
    out = tmp_path / "r.h5"
    first = analyze(out)
    second = analyze(out, "--batch-size", "64")
    assert second["run_id"] == first["run_id"] and second["resumed"] == sorted(first["analyses"])
