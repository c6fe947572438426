"""The inverse-HVP accuracy analysis keeps each solver's status: in the result, its store, its figure."""

from __future__ import annotations

import h5py
import matplotlib
import pytest
import torch

import curvkit
from curvkit.store import ResultsStore

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def result() -> curvkit.IhvpResult:
    """cg converges on ``diag(1, 2, 3)``, neumann does not in 5 steps, kfac cannot run (no problem)."""
    A = curvkit.DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)), psd=True)
    return curvkit.ihvp_accuracy(
        A, ["cg", "neumann", "kfac"], vector="random", damping=0.1, maxiter=5, tol=1e-10
    )


STATUSES = {"cg": "converged", "neumann": "maxiter", "kfac": "not-run"}


def statuses(result: curvkit.IhvpResult) -> dict[str, str]:
    return {name: curve.status for name, curve in result.curves.items()}


def test_each_curve_has_its_solvers_status(result):
    assert statuses(result) == STATUSES
    assert result.curves["kfac"].reason.startswith("could not run") and not result.curves["kfac"].columns
    assert {name: curve["status"] for name, curve in result.to_dict()["curves"].items()} == STATUSES


def test_the_status_is_stored_and_an_old_store_without_it_is_read(result, tmp_path):
    path = tmp_path / "r.h5"
    with ResultsStore(path) as store, store.begin_run("r") as run:
        run.write("ihvp/x", result, request={"k": 1})
    with ResultsStore(path, "r") as store:
        assert statuses(store.run("r").read("ihvp/x")) == STATUSES
    with h5py.File(path, "a") as f:  # as written before statuses were stored
        for group in f["runs/r/ihvp/x/solvers"].values():
            del group.attrs["status"]
    with ResultsStore(path, "r") as store:
        old = store.run("r").read("ihvp/x")
    # only convergence is known: the converged solver's status follows from it, the others' is unknown
    assert statuses(old) == {"cg": "converged", "neumann": "unknown", "kfac": "unknown"}
    assert [curve.reason for curve in old.curves.values()] == [c.reason for c in result.curves.values()]


def test_the_figure_labels_a_solver_that_did_not_converge_with_its_status(result):
    from curvkit.plotting import plot_ihvp

    ax = plot_ihvp(result)
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["cg", "neumann (maxiter)"]
