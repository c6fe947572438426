"""``curvkit show``, ``curvkit plot`` and ``curvkit export``: reading a results file.

All reading goes through :class:`curvkit.store.ResultsStore`, which returns the
library's own result types.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from curvkit.errors import CurvkitError
from curvkit.store import ResultsStore


def show(results: Path = typer.Argument(..., help="HDF5 results file written by curvkit analyze.")) -> None:
    """Print the runs of a results file as tables."""
    console = Console(width=max(Console().width, 120))
    with ResultsStore(results, mode="r") as store:
        runs = store.runs()
        if not runs:
            console.print(f"{results}: no runs")
            return
        overview = Table(title=str(results))
        for column in ("#", "checkpoint", "estimator", "P", "status", "top eigenvalues", "trace"):
            overview.add_column(column, overflow="fold")
        for run in runs:
            prov = run.provenance
            top = run.read("eigen/largest") if run.has("eigen/largest") else None
            traces = [key for key in run.analyses() if key.startswith("trace/")]
            tr = run.read(traces[0]) if traces else None
            overview.add_row(
                str(run.index if run.index is not None else ""),
                str(prov.get("checkpoint", "")),
                str(prov.get("estimator", "")),
                f"{prov.get('parameter_count', '')}",
                run.status + (f": {run.error}" if run.error else ""),
                ", ".join(f"{v:.4g}" for v in top.values.tolist()) if top is not None else "-",
                f"{tr.estimate:.5g} +- {tr.stderr:.2g} ({tr.method})" if tr is not None else "-",
            )
        console.print(overview)
        for run in runs:
            checks = [key for key in run.analyses() if key.startswith("checks/")]
            layers = [key for key in run.analyses() if key.startswith("per_layer/")]
            if checks:
                table = Table(title=f"checks of {run.run_id}")
                for column in ("check", "passed", "measured", "threshold", "what"):
                    table.add_column(column)
                for key in checks:
                    c = run.read(key)
                    table.add_row(c.name, str(c.passed), f"{c.measured:.3g}", f"{c.threshold:.3g}", c.detail)
                console.print(table)
            for key in layers:
                table = Table(title=f"per layer, {run.run_id}")
                for column in ("layer", "P", "top eigenvalue", "residual", "trace", "stderr"):
                    table.add_column(column)
                for row in run.read(key):
                    table.add_row(
                        row.name,
                        str(row.dim),
                        f"{row.top_eigenvalue:.4g}",
                        f"{row.residual:.1e}",
                        f"{row.trace:.4g}",
                        f"{row.trace_stderr:.2g}",
                    )
                console.print(table)


def plot(
    results: Path = typer.Argument(..., help="HDF5 results file written by curvkit analyze."),
    out: Path = typer.Option(Path("figures"), "-o", "--out", help="Folder for the figures."),
    log: bool = typer.Option(False, "--log", help="Logarithmic density axis."),
    formats: str = typer.Option("png,pdf", "--formats", help="Comma-separated figure formats."),
) -> None:
    """Draw every analysis of a results file (PNG and PDF), and trajectories across checkpoints."""
    from curvkit import plotting

    kinds = [f.strip() for f in formats.split(",") if f.strip()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CurvkitError(f"cannot create the figure folder {out}: {exc.strerror}") from exc
    written: list[Path] = []
    with ResultsStore(results, mode="r") as store:
        runs = store.runs()
        for run in runs:
            for key in run.analyses():
                stem = out / f"{run.run_id}-{key.replace('/', '-').replace('+', 'p')}"
                result = run.read(key)
                if key.startswith("eigen/"):
                    written += plotting.save_figure(plotting.plot_eigenvalues(result), stem, kinds)
                elif key.startswith("density/"):
                    written += plotting.save_figure(plotting.plot_density(result, log=log), stem, kinds)
                elif key.startswith("per_layer/"):
                    for quantity in ("top_eigenvalue", "trace"):
                        ax = plotting.plot_per_layer(result, quantity)
                        written += plotting.save_figure(ax, Path(f"{stem}-{quantity}"), kinds)
        by_estimator: dict[str, list] = {}
        for run in runs:
            by_estimator.setdefault(str(run.provenance.get("estimator", "")), []).append(run)
        for estimator, group in by_estimator.items():
            if len(group) < 2:
                continue
            labels = [Path(str(r.provenance.get("checkpoint", r.run_id))).stem for r in group]
            tops = [r.read("eigen/largest") if r.has("eigen/largest") else None for r in group]
            if all(t is not None for t in tops):
                ax = plotting.plot_trajectory(
                    labels,
                    [t.values[0].item() for t in tops],
                    [t.residuals[0].item() for t in tops],
                    ylabel="top eigenvalue",
                )
                written += plotting.save_figure(ax, out / f"trajectory-{estimator}-top-eigenvalue", kinds)
            traces = [next((k for k in r.analyses() if k.startswith("trace/")), None) for r in group]
            if all(traces):
                results_ = [r.read(k) for r, k in zip(group, traces)]
                ax = plotting.plot_trajectory(
                    labels, [t.estimate for t in results_], [t.stderr for t in results_], ylabel="trace"
                )
                written += plotting.save_figure(ax, out / f"trajectory-{estimator}-trace", kinds)
    typer.echo(f"{len(written)} files written to {out}")


def export(
    results: Path = typer.Argument(..., help="HDF5 results file written by curvkit analyze."),
    fmt: str = typer.Option("json", "--format", help="json or csv."),
    output: Path | None = typer.Option(None, "-o", "--output", help="File to write (default: stdout)."),
) -> None:
    """Export a results file as JSON (everything but eigenvectors) or CSV (one row per number)."""
    if fmt not in ("json", "csv"):
        raise CurvkitError(f"--format must be json or csv, got {fmt!r}")
    with ResultsStore(results, mode="r") as store:
        try:
            stream = sys.stdout if output is None else output.open("w", newline="")
        except OSError as exc:
            raise CurvkitError(f"cannot write {output}: {exc.strerror}") from exc
        try:
            if fmt == "json":
                json.dump(store.to_dict(), stream, indent=2)
                stream.write("\n")
            else:
                store.write_csv(stream)
        finally:
            if output is not None:
                stream.close()
