"""Figures of analysis results, with matplotlib (imported only when a figure is made).

Each function takes a result (the library's own result types, or what
:mod:`curvkit.store` reads back) and an optional :class:`matplotlib.axes.Axes`,
draws on it, and returns it; :func:`save_figure` writes PNG and PDF files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_density", "plot_eigenvalues", "plot_per_layer", "plot_trajectory", "save_figure"]


def _axes(ax: Any) -> Any:
    if ax is not None:
        return ax
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo"):
        matplotlib.use("Agg")  # files only: never open a window
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6, 4))[1]


def plot_eigenvalues(result: Any, ax: Any = None, label: str | None = None) -> Any:
    """Eigenvalues (most extreme first) with their residual certificates as error bars.

    Every bar ``[lambda - r, lambda + r]`` contains an eigenvalue of the operator.
    """
    ax = _axes(ax)
    values = result.values.detach().cpu().double().numpy()
    residuals = result.residuals.detach().cpu().double().numpy()
    index = range(1, len(values) + 1)
    ax.errorbar(index, values, yerr=residuals, fmt="o", capsize=4, label=label or result.which)
    ax.set_xlabel("index")
    ax.set_ylabel("eigenvalue")
    status = "converged" if result.converged else "NOT converged"
    ax.set_title(f"{result.which} eigenvalues ({result.matvecs} products, {status})")
    ax.axhline(0.0, color="grey", lw=0.5)
    return ax


def plot_density(result: Any, ax: Any = None, log: bool = False, label: str | None = None) -> Any:
    """The SLQ spectral density on its grid, with the quadrature nodes as ticks.

    Args:
        result: A :class:`~curvkit.DensityResult`.
        ax: Axes to draw on (a new figure when ``None``).
        log: Logarithmic density axis (the bulk near zero and the outliers at once).
        label: Legend label.
    """
    ax = _axes(ax)
    grid = result.grid.detach().cpu().double().numpy()
    dens = result.density.detach().cpu().double().numpy()
    if log:
        dens = dens.clip(min=max(dens.max() * 1e-12, 1e-300))
        ax.set_yscale("log")
    ax.plot(grid, dens, label=label or f"{result.runs} runs x {result.steps} steps")
    nodes = result.nodes.detach().cpu().double().numpy().ravel()
    weights = result.weights.detach().cpu().double().numpy().ravel()
    ax.plot(nodes[weights > 0], [0] * int((weights > 0).sum()), "|", color="black", ms=8, alpha=0.5)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(f"spectral density (Gaussian width {result.sigma:.3g})")
    return ax


def plot_per_layer(table: Any, quantity: str = "top_eigenvalue", ax: Any = None) -> Any:
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
    ax.set_title(f"{quantity.replace('_', ' ')} per layer")
    return ax


def plot_trajectory(
    labels: Sequence[str],
    values: Sequence[float],
    errors: Sequence[float] | None = None,
    ax: Any = None,
    ylabel: str = "",
    label: str | None = None,
) -> Any:
    """A quantity across checkpoints (in the given order), with optional error bars."""
    ax = _axes(ax)
    x = list(range(len(values)))
    ax.errorbar(
        x, list(values), yerr=None if errors is None else list(errors), marker="o", capsize=3, label=label
    )
    ax.set_xticks(x)
    ax.set_xticklabels(list(labels), rotation=45, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_xlabel("checkpoint")
    return ax


def save_figure(ax: Any, path: str | Path, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Save the figure holding ``ax`` as ``path.<format>`` for each format, and close it."""
    import matplotlib.pyplot as plt

    fig = ax.figure
    fig.tight_layout()
    written = []
    for fmt in formats:
        target = Path(f"{path}.{fmt}")  # not with_suffix: stems may contain dots
        fig.savefig(target, dpi=120)
        written.append(target)
    plt.close(fig)
    return written
