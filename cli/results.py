"""``curvkit show``, ``curvkit plot`` and ``curvkit export``: reading a results file.

All reading goes through :class:`curvkit.store.ResultsStore`, which returns the
library's own result types.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from curvkit.comparison import ComparisonResult
from curvkit.errors import CurvkitError
from curvkit.kinds import ResultTable, analysis_kinds
from curvkit.store import ResultsStore, Run


def _short(digest: Any) -> str:
    return str(digest)[:12] if digest else "?"


def _call(model: Any, kwargs: Any) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in (kwargs or {}).items())
    return f"{model}({args})"


def _provenance_lines(prov: dict[str, Any]) -> list[tuple[str, str]]:
    """What a reader needs to know of a run's origin, as ``(label, text)`` rows.

    A run recording a checkpoint that could not be loaded has only its checkpoint
    and estimator: the rows that would be unknown are left out.
    """
    checkpoint = str(prov.get("checkpoint", "?"))
    if "checkpoint_sha256" not in prov:
        return [("checkpoint", checkpoint), ("estimator", _call(prov.get("estimator", "?"), None))]
    weights = f", weights {prov['weights_key']!r}" if prov.get("weights_key") else ""
    data = f"{prov.get('data')}: {prov.get('sample_count', 0):,} samples"
    data += f" (fingerprint {_short(prov.get('data_fingerprint'))}, batch size {prov.get('batch_size')})"
    rows = [
        (
            "checkpoint",
            f"{checkpoint} ({prov.get('checkpoint_format')}{weights}, "
            f"sha256 {_short(prov.get('checkpoint_sha256'))})",
        ),
        ("model", _call(prov.get("model"), prov.get("model_kwargs"))),
        ("data", data),
        ("loss", str(prov.get("loss"))),
        ("parameters", str(prov.get("parameters") or prov.get("parameter_count"))),
        ("precision", f"{prov.get('dtype')} on {prov.get('device')}, seed {prov.get('seed')}"),
        ("estimator", _call(prov.get("estimator"), prov.get("estimator_options")) + _plugin(prov)),
    ]
    given = {
        "max_samples": prov.get("max_samples"),
        "params": prov.get("params"),
        "forward_kwargs": prov.get("forward_kwargs"),
        "strict": None if prov.get("strict", True) else False,
    }
    if any(value is not None and value != {} for value in given.values()):
        options = ", ".join(f"{k}={v!r}" for k, v in given.items() if v is not None and v != {})
        rows.append(("options", options))
    rows += [("note", str(note)) for note in prov.get("checkpoint_notes") or []]
    return rows


def _plugin(prov: dict[str, Any]) -> str:
    """`` from plugin NAME VERSION``, for runs that record it."""
    if not prov.get("estimator_plugin"):
        return ""
    return f" from plugin {prov['estimator_plugin']} {prov.get('estimator_plugin_version', '')}".rstrip()


def _rich_table(table: ResultTable) -> Table:
    """A kind's table (:attr:`curvkit.kinds.AnalysisKind.tables`) drawn by rich."""
    out = Table(title=escape(table.title), title_justify="left")
    for column in table.columns:
        out.add_column(escape(column))
    for row in table.rows:
        out.add_row(*(escape(cell) for cell in row))
    return out


def _comparisons_table(rows: list[tuple[str, ComparisonResult]]) -> Table:
    table = Table(title="comparisons: each estimator against its baseline", title_justify="left")
    for column in (
        "checkpoint",
        "estimator",
        "baseline",
        "k",
        "eigenvalues (rel. error)",
        "angle (rad)",
        "trace",
    ):
        table.add_column(column)
    for checkpoint, c in rows:
        table.add_row(
            escape(checkpoint),
            escape(c.estimator),
            escape(c.baseline),
            str(c.k),
            f"{c.value_error:.2e}",
            f"{c.max_principal_angle:.2e}",
            f"{c.trace_difference:+.2%} ({c.trace_method})",
        )
    return table


def run_label(run: Run) -> str:
    """A run named by its checkpoint and estimator: ``"step-10.pt [hessian]"``."""
    prov = run.provenance
    name = Path(str(prov.get("checkpoint", run.run_id))).name
    return f"{name} [{prov.get('estimator', '?')}]"


def show(results: Path = typer.Argument(..., help="HDF5 results file written by curvkit analyze.")) -> None:
    """Print every run of a results file: provenance, eigenpairs, traces, densities, checks,
    comparisons, inverse-HVP accuracy, timings."""
    console = Console(highlight=False, soft_wrap=True)
    with ResultsStore(results, mode="r") as store:
        runs = store.runs()
        if not runs:
            console.print(f"{results}: no runs", markup=False)
            return
        comparisons: list[tuple[str, ComparisonResult]] = []
        for number, run in enumerate(runs, 1):
            state = run.status + (f": {run.error}" if run.error else "")
            attempts = f"{run.attempts} attempt" + ("s" if run.attempts != 1 else "")
            console.rule(f"{number}/{len(runs)} {escape(run_label(run))}", align="left")
            console.print(f"  run {run.run_id}: {state} ({attempts})", markup=False)
            for label, text in _provenance_lines(run.provenance):
                console.print(f"  {label:<11} {text}", markup=False)
            by_kind: dict[str, list[tuple[str, Any]]] = {}
            for key in run.analyses():
                by_kind.setdefault(key.partition("/")[0], []).append((key, run.read(key)))
            kinds = analysis_kinds()
            for kind, items in by_kind.items():
                tables = kinds[kind].tables(items)
                if tables is None:
                    for key, result in items:
                        console.print(f"  {key}: {kinds[kind].summarize(result)}", markup=False)
                else:
                    for table in tables:
                        console.print(_rich_table(table))
                        for note in table.notes:
                            console.print(f"    {note}", markup=False)
                for _, result in items:
                    if isinstance(result, ComparisonResult):
                        comparisons.append((Path(str(run.provenance.get("checkpoint", "?"))).name, result))
            timings = ", ".join(f"{k} {v:.3g} s" for k, v in run.timings.items())
            if timings:
                console.print(f"  {'timings':<11} {timings}", markup=False)
            peaks = ", ".join(f"{k} {v / 2**20:.4g} MiB" for k, v in run.peak_memory.items())
            if peaks:
                console.print(f"  {'peak memory':<11} {peaks}", markup=False)
        if comparisons:
            console.print(_comparisons_table(comparisons))


def plot(
    results: Path = typer.Argument(..., help="HDF5 results file written by curvkit analyze."),
    out: Path = typer.Option(Path("figures"), "-o", "--out", help="Folder for the figures."),
    log: bool = typer.Option(True, "--log/--linear", help="Logarithmic (default) or linear density axis."),
    formats: str = typer.Option("png,pdf", "--formats", help="Comma-separated figure formats."),
) -> None:
    """Draw every analysis of a results file, each trajectory of checkpoints, and the
    comparisons of several estimators with one baseline on one checkpoint."""
    from curvkit import plotting
    from curvkit.runs import trajectories

    file_formats = plotting.check_formats(formats.split(","))
    with ResultsStore(results, mode="r") as store:
        runs = store.runs()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CurvkitError(f"cannot create the figure folder {out}: {exc.strerror}") from exc
        written: list[Path] = []
        compared: dict[tuple[str, str], list[ComparisonResult]] = {}
        for run in runs:
            for key in run.analyses():
                stem = f"{run.run_id}-{key.replace('/', '-').replace('+', 'p')}"
                result = run.read(key)
                for suffix, ax in plotting.figures(result, title=run_label(run), log=log):
                    written += plotting.save_figure(
                        ax, out / (f"{stem}-{suffix}" if suffix else stem), file_formats
                    )
                if isinstance(result, ComparisonResult):
                    checkpoint = str(run.provenance.get("checkpoint", run.run_id))
                    compared.setdefault((checkpoint, result.baseline), []).append(result)
        for number, ((checkpoint, baseline), group) in enumerate(compared.items(), 1):
            if len(group) < 2:  # one estimator: its run's figure says it all
                continue
            ax = plotting.plot_comparisons(
                group, [c.estimator for c in group], title=f"{Path(checkpoint).name}: against {baseline}"
            )
            written += plotting.save_figure(ax, out / f"comparison-{number}-{baseline}", file_formats)
        kinds = analysis_kinds()
        for number, trajectory in enumerate(trajectories(runs), 1):
            estimator = trajectory.runs[0].provenance.get("estimator", "run")
            for stem, (ylabel, lines) in _trajectory_lines(trajectory.runs, kinds).items():
                ax = None
                for label, points in lines.items():
                    ax = plotting.plot_trajectory(
                        trajectory.labels,
                        [value for value, _ in points],
                        [error for _, error in points],
                        ax=ax,
                        ylabel=ylabel,
                        positions=trajectory.positions,
                        xlabel=trajectory.xlabel,
                        title=trajectory.title,
                        label=label or f"{len(trajectory.runs)} checkpoints",
                    )
                if ax is not None:
                    written += plotting.save_figure(
                        ax, out / f"trajectory-{number}-{estimator}-{stem}", file_formats
                    )
    typer.echo(f"{len(written)} files written to {out}")


def _trajectory_lines(runs: list[Run], kinds: dict[str, Any]) -> dict[str, tuple[str, dict[str, list]]]:
    """Every kind's trajectory numbers (:attr:`curvkit.kinds.AnalysisKind.trajectory`) across the
    runs: ``{stem: (ylabel, {label: [(value, error) per run]})}``, lines every run has."""
    per_run = []
    for run in runs:
        found: dict[str, tuple[str, dict[str, tuple[float, float]]]] = {}
        for key in run.analyses():
            for stem, (ylabel, lines) in kinds[key.partition("/")[0]].trajectory(key, run.read(key)).items():
                found.setdefault(stem, (ylabel, {}))[1].update(lines)
        per_run.append(found)
    shared: dict[str, tuple[str, dict[str, list]]] = {}
    for stem, (ylabel, lines) in per_run[0].items():
        kept = {
            label: [found[stem][1][label] for found in per_run]
            for label in lines
            if all(stem in found and label in found[stem][1] for found in per_run)
        }
        if kept:
            shared[stem] = (ylabel, kept)
    return shared


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
