"""Figures are drawn from real results and written as PNG and PDF."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

import curvkit  # noqa: E402
from curvkit import plotting  # noqa: E402
from curvkit.testing import get_case  # noqa: E402


@pytest.fixture(scope="module")
def results():
    H = curvkit.curvature("hessian", get_case("tanh-mlp-ce").problem())
    return {
        "eigen": curvkit.eigenvalues(H, k=3),
        "density": curvkit.density(H, steps=10, runs=2),
        "layers": curvkit.per_layer(H),
    }


def test_eigenvalue_plot_has_residual_bars(results, tmp_path):
    ax = plotting.plot_eigenvalues(results["eigen"])
    assert len(ax.containers) == 1  # the errorbar container
    written = plotting.save_figure(ax, tmp_path / "eig")
    assert [p.suffix for p in written] == [".png", ".pdf"] and all(p.stat().st_size > 1000 for p in written)


@pytest.mark.parametrize("log", [False, True])
def test_density_plot(results, tmp_path, log):
    ax = plotting.plot_density(results["density"], log=log)
    line = ax.lines[0]
    assert len(line.get_xdata()) == results["density"].grid.numel()
    assert ax.get_yscale() == ("log" if log else "linear")
    plotting.save_figure(ax, tmp_path / "density", formats=("png",))
    assert (tmp_path / "density.png").exists()


@pytest.mark.parametrize("quantity", ["top_eigenvalue", "trace"])
def test_per_layer_plot(results, quantity):
    ax = plotting.plot_per_layer(results["layers"], quantity)
    heights = [patch.get_height() for patch in ax.patches]
    expected = [getattr(row, quantity) for row in results["layers"]]
    assert heights == pytest.approx(expected)


def test_trajectory_plot():
    ax = plotting.plot_trajectory(["a", "b", "c"], [1.0, 2.0, 1.5], errors=[0.1, 0.1, 0.2], ylabel="top")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    with pytest.raises(ValueError):
        plotting.plot_per_layer([], "median")
