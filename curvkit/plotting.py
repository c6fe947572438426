"""Figures of analysis results, with matplotlib (imported only when a figure is made).

Each ``plot_*`` function takes a result (the library's own result types, or what
:mod:`curvkit.store` reads back) and an optional :class:`matplotlib.axes.Axes`,
draws on it, and returns it; :func:`figures` draws every figure of one result
(its kind's, :mod:`curvkit.kinds`); :func:`save_figure` writes the files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from curvkit.errors import CurvkitError

__all__ = [
    "DENSITY_FLOOR",
    "check_formats",
    "figures",
    "plot_comparison",
    "plot_comparisons",
    "plot_density",
    "plot_eigenvalues",
    "plot_ihvp",
    "plot_matrix",
    "plot_per_layer",
    "plot_trajectory",
    "save_figure",
]

DENSITY_FLOOR = 1e-6
"""On a logarithmic axis a density is drawn down to this fraction of its peak.

A Gaussian-broadened density falls to ``1e-300`` and below between separated
eigenvalues; drawn to there, the axis would span hundreds of decades and the
spectrum's shape would be lost. Values below the floor are left undrawn (a gap
in the line), not clipped to it: the floor is the axis's lower limit, not data."""


def _pyplot() -> Any:
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo"):
        matplotlib.use("Agg")  # files only: never open a window
    import matplotlib.pyplot as plt

    return plt


def _axes(ax: Any) -> Any:
    return ax if ax is not None else _pyplot().subplots(figsize=(6, 4))[1]


def _integer_ticks(axis: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def plot_eigenvalues(result: Any, ax: Any = None, label: str | None = None, title: str | None = None) -> Any:
    """Eigenvalues (most extreme first) with their residual certificates as error bars.

    Every bar ``[lambda - r, lambda + r]`` contains an eigenvalue of the operator.

    Args:
        result: An :class:`~curvkit.EigenResult`.
        ax: Axes to draw on (a new figure when ``None``).
        label: Legend label (default: the part of the spectrum).
        title: Title, e.g. the run's name; the solve's products and status follow it.
    """
    ax = _axes(ax)
    values = result.values.detach().cpu().double().numpy()
    residuals = result.residuals.detach().cpu().double().numpy()
    index = range(1, len(values) + 1)
    ax.errorbar(
        index, values, yerr=residuals, fmt="o", capsize=4, label=label or f"{result.which} eigenvalues"
    )
    ax.set_xlabel("index")
    _integer_ticks(ax.xaxis)
    ax.set_ylabel("eigenvalue")
    status = "converged" if result.converged else "NOT converged"
    detail = f"{result.which} eigenvalues, {result.matvecs} products, {status}"
    ax.set_title(f"{title}\n{detail}" if title else detail, fontsize=10)
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.legend(fontsize=8)
    return ax


def plot_density(
    result: Any, ax: Any = None, log: bool = True, label: str | None = None, title: str | None = None
) -> Any:
    """The SLQ spectral density on its grid, with the quadrature nodes as ticks.

    Args:
        result: A :class:`~curvkit.DensityResult`.
        ax: Axes to draw on (a new figure when ``None``).
        log: Logarithmic density axis (default), from :data:`DENSITY_FLOOR` times
            the peak; values below are not drawn.
        label: Legend label.
        title: Title, e.g. the run's name.
    """
    import numpy as np

    ax = _axes(ax)
    grid = result.grid.detach().cpu().double().numpy()
    dens = result.density.detach().cpu().double().numpy()
    peak = float(dens.max()) if dens.size else 0.0
    if log and peak > 0:
        floor = peak * DENSITY_FLOOR
        dens = np.where(dens >= floor, dens, np.nan)
        ax.set_yscale("log")
        ax.set_ylim(floor, peak * 2)
    ax.plot(grid, dens, label=label or f"{result.runs} runs x {result.steps} steps")
    nodes = result.nodes.detach().cpu().double().numpy().ravel()
    weights = result.weights.detach().cpu().double().numpy().ravel()
    ticks = nodes[weights > 0]
    transform = ax.get_xaxis_transform()  # x in data, y in axes: ticks at the bottom on any scale
    ax.plot(ticks, [0.0] * len(ticks), "|", color="black", ms=8, alpha=0.5, transform=transform)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density" + (" (log)" if log else ""))
    detail = f"spectral density (Gaussian width {result.sigma:.3g})"
    ax.set_title(f"{title}\n{detail}" if title else detail, fontsize=10)
    ax.legend(fontsize=8)
    return ax


def plot_per_layer(
    table: Any, quantity: str = "top_eigenvalue", ax: Any = None, title: str | None = None
) -> Any:
    """Bars of one quantity per layer (``"top_eigenvalue"`` or ``"trace"``), with error bars.

    Traces get their standard errors, top eigenvalues their residuals.
    """
    if quantity not in ("top_eigenvalue", "trace"):
        raise ValueError(f"quantity must be 'top_eigenvalue' or 'trace', got {quantity!r}")
    ax = _axes(ax)
    rows = list(table)
    names = [r.name for r in rows]
    values = [getattr(r, quantity) for r in rows]
    errors = [r.residual if quantity == "top_eigenvalue" else r.trace_stderr for r in rows]
    ax.bar(range(len(rows)), values, yerr=errors, capsize=3)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_ylabel(quantity.replace("_", " "))
    detail = f"{quantity.replace('_', ' ')} per layer"
    ax.set_title(f"{title}\n{detail}" if title else detail, fontsize=10)
    return ax


def plot_trajectory(
    labels: Sequence[str],
    values: Sequence[float],
    errors: Sequence[float] | None = None,
    ax: Any = None,
    ylabel: str = "",
    label: str | None = None,
    positions: Sequence[float] | None = None,
    xlabel: str = "checkpoint",
    title: str | None = None,
) -> Any:
    """A quantity across checkpoints, with optional error bars.

    Args:
        labels: The checkpoints' names.
        values: The quantity, one per checkpoint.
        errors: Error bars (residuals, standard errors).
        ax: Axes to draw on (a new figure when ``None``).
        ylabel: What the quantity is.
        label: Legend label.
        positions: The checkpoints' training steps or epochs: the x-axis. Without
            them the x-axis is the checkpoints' order, labelled with ``labels``.
        xlabel: Name of the x-axis (``"step"``, ``"epoch"``; default ``"checkpoint"``).
        title: Title, e.g. what the runs share.
    """
    ax = _axes(ax)
    x = list(positions) if positions is not None else list(range(len(values)))
    ax.errorbar(
        x, list(values), yerr=None if errors is None else list(errors), marker="o", capsize=3, label=label
    )
    if positions is None:
        ax.set_xticks(x)
        ax.set_xticklabels(list(labels), rotation=45, ha="right")
    else:
        _integer_ticks(ax.xaxis)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title, fontsize=10)
    if label:
        ax.legend(fontsize=8)
    return ax


def plot_comparison(result: Any, ax: Any = None, title: str | None = None) -> Any:
    """An estimator's top-k eigenvalues beside its baseline's, with the three figures in the title.

    Args:
        result: A :class:`~curvkit.comparison.ComparisonResult`.
        ax: Axes to draw on (a new figure when ``None``).
        title: Title, e.g. the run's name.
    """
    ax = _axes(ax)
    index = list(range(1, result.k + 1))
    ax.plot(index, result.baseline_values.double().tolist(), "s", mfc="none", ms=9, label=result.baseline)
    ax.plot(index, result.values.double().tolist(), "o", label=result.estimator)
    ax.set_xlabel("index")
    _integer_ticks(ax.xaxis)
    ax.set_ylabel("eigenvalue")
    ax.axhline(0.0, color="grey", lw=0.5)
    detail = (
        f"{result.estimator} vs {result.baseline}: eigenvalues {result.value_error:.1e} (rel.), "
        f"angle {result.max_principal_angle:.1e} rad, trace {result.trace_difference:+.1%}"
    )
    ax.set_title(f"{title}\n{detail}" if title else detail, fontsize=10)
    ax.legend(fontsize=8)
    return ax


def plot_matrix(matrix: Any, labels: Sequence[str], ax: Any = None, title: str | None = None) -> Any:
    """A small symmetric matrix (the Newton summary's ``H_bar``) as a heat map, centred at zero.

    Args:
        matrix: ``[S, S]``.
        labels: One per row and column.
        ax: Axes to draw on (a new figure when ``None``).
        title: Title, e.g. the run's name.
    """
    values = matrix.double().cpu().numpy()
    ax = (
        ax
        if ax is not None
        else _pyplot().subplots(figsize=(1.5 + 0.5 * len(labels), 1 + 0.5 * len(labels)))[1]
    )
    limit = float(abs(values).max()) or 1.0
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.figure.colorbar(image, ax=ax)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(list(labels), rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(list(labels), fontsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    return ax


IHVP_AXES = {"matvecs": "products with the operator", "seconds": "seconds"}
"""The x-axes of :func:`plot_ihvp`."""


def plot_ihvp(result: Any, x: str = "matvecs", axes: Any = None, title: str | None = None) -> Any:
    """Convergence curves of inverse-HVP solvers: relative error and cosine to the reference, one line each.

    A solver without a curve (one that could not run, e.g. ``lowrank`` without
    damping) is named under the title with its reason; when no solver has a
    curve, the axes say so and there is no legend.

    Args:
        result: An :class:`~curvkit.IhvpResult`.
        x: ``"matvecs"`` or ``"seconds"`` on the horizontal axes.
        axes: Two axes side by side (a new figure when ``None``).
        title: Title, e.g. the run's name.

    Returns:
        The first axes (the error's); the figure holds both.
    """
    import textwrap

    if x not in IHVP_AXES:
        raise CurvkitError(f"x must be one of {list(IHVP_AXES)}, got {x!r}")
    if axes is None:
        axes = _pyplot().subplots(1, 2, figsize=(10, 4))[1]
    error_ax, cosine_ax = axes
    tiny = 1e-300
    undrawn = []
    for name, curve in result.curves.items():
        if not curve.columns or not len(curve.columns["error"]):
            undrawn.append(f"{name}: {curve.reason or curve.status}")
            continue
        label = name if curve.converged else f"{name} ({curve.status})"
        xs = curve.columns[x].tolist()
        error_ax.plot(xs, [max(e, tiny) for e in curve.columns["error"].tolist()], marker=".", label=label)
        cosine_ax.plot(xs, curve.columns["cosine"].tolist(), marker=".", label=label)
    error_ax.set_yscale("log")
    error_ax.set_ylabel("relative error to the reference")
    cosine_ax.set_ylabel("cosine similarity to the reference")
    cosine_ax.axhline(1.0, color="grey", lw=0.5)
    for ax in axes:
        ax.set_xlabel(IHVP_AXES[x])
    if error_ax.lines:
        error_ax.legend(fontsize=8)
    else:
        for ax in axes:
            ax.text(0.5, 0.5, "no solver produced a curve", transform=ax.transAxes, ha="center", color="grey")
    detail = f"(A + {result.damping:g} I)^-1 {result.vector}; reference: {result.reference}"
    if undrawn:
        width = max(40, int(error_ax.figure.get_figwidth() * 11))  # characters of a 10-point line
        detail += "\n" + textwrap.fill(f"no curve: {'; '.join(undrawn)}", width, break_on_hyphens=False)
    error_ax.figure.suptitle(f"{title}\n{detail}" if title else detail, fontsize=10)
    return error_ax


COMPARISON_FIGURES = (
    ("value_error", "top-k eigenvalues (relative error)"),
    ("max_principal_angle", "largest principal angle (rad)"),
    ("trace_difference", "trace (|relative difference|)"),
)
"""The figures of a comparison that :func:`plot_comparisons` draws, with their labels."""


def plot_comparisons(
    results: Sequence[Any], labels: Sequence[str], ax: Any = None, title: str | None = None
) -> Any:
    """Bars of the three figures of several comparisons (estimators against one baseline), log scale.

    The figures' names are on two lines (name, unit) and the legend is beside the
    axes, so neither the names nor the bars are covered; a figure made here (no
    ``ax``) is laid out with ``tight_layout``.

    Args:
        results: :class:`~curvkit.comparison.ComparisonResult` objects.
        labels: One label per result (the estimator, or the run).
        ax: Axes to draw on (a new figure when ``None``).
        title: Title, e.g. the checkpoint and the baseline.
    """
    import numpy as np

    made = ax is None
    ax = ax if ax is not None else _pyplot().subplots(figsize=(7.5, 4))[1]
    width = 0.8 / max(len(results), 1)
    positions = np.arange(len(COMPARISON_FIGURES))
    tiny = np.finfo(np.float64).tiny
    for i, (result, label) in enumerate(zip(results, labels)):
        heights = [max(abs(getattr(result, name)), tiny) for name, _ in COMPARISON_FIGURES]
        ax.bar(positions + (i - (len(results) - 1) / 2) * width, heights, width, label=label)
    ax.set_yscale("log")
    ax.set_xticks(positions)
    # the unit on a line of its own: on one line, neighbouring labels ran into each other
    ax.set_xticklabels([label.replace(" (", "\n(") for _, label in COMPARISON_FIGURES], fontsize=8)
    ax.set_ylabel("difference from the baseline")
    if title:
        ax.set_title(title, fontsize=10)
    if results:  # beside the bars, which it would hide with many estimators
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    if made:
        ax.figure.tight_layout()
    return ax


def figures(result: Any, title: str, log: bool = True) -> list[tuple[str, Any]]:
    """Every figure of one result, as ``(suffix, axes)`` pairs (none for a kind without figures).

    The figures are its kind's (:attr:`curvkit.kinds.AnalysisKind.figures`).

    Args:
        result: A result of any analysis (eigenpairs, density, per-layer table...).
        title: The figures' title, e.g. the run's name.
        log: Logarithmic density axis.
    """
    from curvkit.kinds import analysis_kinds

    for kind in analysis_kinds().values():
        if type(result) is kind.result_type:
            return kind.figures(result, title, log)
    return []


def check_formats(formats: Sequence[str]) -> list[str]:
    """The figure formats, checked against what matplotlib can write.

    Raises:
        CurvkitError: No format, or one matplotlib does not know (with the known ones).
    """
    names = [f.strip().lower().lstrip(".") for f in formats if f.strip()]
    known = _pyplot().figure().canvas.get_supported_filetypes()
    _pyplot().close("all")
    unknown = [f for f in names if f not in known]
    if not names or unknown:
        raise CurvkitError(
            f"unknown figure format {', '.join(unknown) or '(none given)'}; use a comma-separated "
            f"list of {', '.join(sorted(known))}"
        )
    return names


def save_figure(ax: Any, path: str | Path, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Save the figure holding ``ax`` as ``path.<format>`` for each format, and close it."""
    plt = _pyplot()
    fig = ax.figure
    fig.tight_layout()
    written = []
    try:
        for fmt in formats:
            target = Path(f"{path}.{fmt}")  # not with_suffix: stems may contain dots
            fig.savefig(target, dpi=120)
            written.append(target)
    finally:
        plt.close(fig)
    return written
