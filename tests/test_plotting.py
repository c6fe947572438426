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


@pytest.mark.parametrize("solvers", [["lowrank"], ["cg", "lowrank"]], ids=["none-ran", "one-ran"])
def test_ihvp_figure_says_which_solvers_have_no_curve_and_warns_nothing(solvers, tmp_path):
    """``lowrank`` cannot run without damping: no curve, named with its reason; a legend only of curves."""
    import warnings

    import torch

    A = curvkit.DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)), psd=True)
    result = curvkit.ihvp_accuracy(A, solvers, vector="random", damping=0.0, maxiter=5)
    assert result.curves["lowrank"].status == "not-run"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warned "No artists with labels found to put in legend"
        for _, ax in plotting.figures(result, "run"):
            suptitle = ax.figure.get_suptitle().replace("\n", " ")
            assert "no curve: lowrank: could not run: lowrank needs damping > 0" in suptitle
            texts = [t.get_text() for a in ax.figure.axes for t in a.texts]
            if solvers == ["lowrank"]:
                assert ax.get_legend() is None and texts == ["no solver produced a curve"] * 2
            else:
                assert [t.get_text() for t in ax.get_legend().get_texts()] == ["cg"] and texts == []
            plotting.save_figure(ax, tmp_path / "ihvp", formats=("png",))


@pytest.mark.parametrize("tight", [False, True], ids=["as-drawn", "as-saved"])
def test_comparison_bars_have_labels_that_do_not_overlap(tight):
    """The bars of ``curvkit analyze --curvature ... --compare-to hessian``: the other built-in estimators."""
    from itertools import combinations

    import matplotlib.pyplot as plt
    import torch

    from curvkit.comparison import ComparisonResult

    names = ["ggn", "fisher", "empirical-fisher", "kfac", "ekfac", "exact-hessian", "d3"]
    figures = [(0.07 * i, 0.3 * i, -0.04 * i) for i in range(1, len(names) + 1)]  # like the real run's
    results = [
        ComparisonResult(
            name, "hessian", torch.ones(5), torch.ones(5), error, angle, 2.0, 0.1, 2.1, 0.1, trace, ""
        )
        for name, (error, angle, trace) in zip(names, figures)
    ]
    ax = plotting.plot_comparisons(results, names, title="digits_mlp.pt: against hessian")
    fig = ax.figure
    if tight:  # what save_figure does
        fig.tight_layout()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ticks = [label.get_window_extent(renderer) for label in ax.get_xticklabels() if label.get_text()]
    legend = ax.get_legend()
    assert len(ticks) == len(plotting.COMPARISON_FIGURES)
    assert [text.get_text() for text in legend.get_texts()] == names
    for a, b in combinations(ticks, 2):
        assert not a.overlaps(b), (a, b)
    legend_box = legend.get_window_extent(renderer)
    assert not legend_box.overlaps(ax.get_window_extent(renderer))  # beside the bars, not over them
    assert not any(legend_box.overlaps(t) for t in ticks)
    for box in [*ticks, legend_box]:  # nothing cut off
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0, box
    plt.close(fig)
