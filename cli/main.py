"""The ``curvkit`` command: a thin Typer app over the library.

Each command parses its options, calls a library function that returns a
result, and prints a summary. Library errors (:class:`curvkit.CurvkitError`) and
command lines that do not parse (click's usage errors: an unknown command or
option, a bad value, a missing argument) become one ``curvkit: error:`` line on
stderr and exit status 2 (130 for an interrupted analysis), without a traceback;
curvkit's warnings become one ``curvkit: warning:`` line. ``curvkit`` alone prints
the help, as ``curvkit --help`` does, and exits 0.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import NoReturn, TextIO

import typer
from curvkit.cli import analyze as analyze_module
from curvkit.cli import results as results_module
from curvkit.cli.usage import ClickException, CurvkitCommand, CurvkitGroup, UsageError, usage_error_line
from rich.console import Console
from rich.table import Table

import curvkit
from curvkit.kinds import analysis_kinds

app = typer.Typer(
    name="curvkit",
    help="Curvature of PyTorch models: eigenvalues, traces and spectral densities of the estimators "
    "that `curvkit plugins` lists.",
    cls=CurvkitGroup,
    invoke_without_command=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        import torch

        typer.echo(f"curvkit {curvkit.__version__} (torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Curvature of PyTorch models: eigenvalues, traces and spectral densities of the estimators
    that `curvkit plugins` lists."""
    if ctx.invoked_subcommand is None:  # `curvkit` alone: the help, as `curvkit --help` prints it
        typer.echo(ctx.get_help(), color=ctx.color)
        raise typer.Exit()


@app.command("plugins", cls=CurvkitCommand)
def plugins_command() -> None:
    """List every registered estimator with its plugin, version, description and flags,
    every installed plugin that failed to import, with its error, and the solvers
    (for --ihvp) and analysis kinds."""
    specs = curvkit.estimators()
    versions = {p.name: p.version for p in curvkit.loaded_plugins()}
    table = Table(title="curvkit estimators")
    for column in ("estimator", "plugin", "version", "flags", "description"):
        table.add_column(column, overflow="fold")
    for spec in specs:
        flags = ", ".join(k for k, v in spec.flags.items() if v) or "-"
        table.add_row(spec.name, spec.plugin, versions.get(spec.plugin, ""), flags, spec.description)
    for broken in curvkit.registry.broken_plugins():
        table.add_row("-", broken.name, broken.package, "BROKEN", f"failed to import: {broken.error}")
    console = Console(width=max(Console().width, 120))
    console.print(table)
    solvers = Table(title="curvkit solvers (curvkit analyze --ihvp NAME,...)")
    for column in ("solver", "plugin", "needs", "description"):
        solvers.add_column(column, overflow="fold")
    for solver in curvkit.solvers():
        needs = "A + damping I positive definite" if solver.psd_only else "symmetric A"
        solvers.add_row(solver.name, solver.plugin, needs, solver.description)
    console.print(solvers)
    kinds = ", ".join(
        f"{name} ({kind.plugin})" if kind.plugin else name for name, kind in analysis_kinds().items()
    )
    console.print(f"analysis kinds: {kinds}", markup=False)


app.command("analyze", cls=CurvkitCommand)(analyze_module.analyze_command)
app.command("show", cls=CurvkitCommand)(results_module.show)
app.command("plot", cls=CurvkitCommand)(results_module.plot)
app.command("export", cls=CurvkitCommand)(results_module.export)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """curvkit's own warnings as one line, like its errors; others as Python shows them."""
    if issubclass(category, curvkit.CurvkitWarning):
        if _first_process():
            typer.echo(f"curvkit: warning: {message}", err=True)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def _first_process() -> bool:
    """Whether this is process 0 of those ``torchrun`` started (or the only one), which speaks for all."""
    return os.environ.get("RANK", "0") == "0"


def main() -> None:
    """Console-script entry point: run the app, turning curvkit's and click's errors into one line.

    The current directory goes first on the module path, as with ``python -m``, so
    that ``--model mymodels:Net`` and ``--data mydata:load`` find ``mymodels.py``
    and ``mydata.py`` there. Under ``torchrun`` only process 0 prints curvkit's
    errors and warnings: the processes run the same command on the same inputs,
    so they meet the same ones, and what one process's shard of the data alone
    causes reaches process 0 as a :class:`curvkit.ProcessFailedError` with its
    message (:func:`curvkit.distributed.shared_failures`).

    Click runs the app outside its standalone mode, so that its usage errors
    reach this function (:func:`curvkit.cli.usage.usage_error_line`) instead of
    being drawn as a box after the usage line; ``--help``, ``--version`` and
    ``Ctrl-C`` outside an analysis (130) come back as the exit status.
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    warnings.showwarning = _show_warning
    try:
        status = app(standalone_mode=False)
    except UsageError as exc:
        _error(usage_error_line(exc), exc.exit_code)
    except ClickException as exc:  # click's other errors (a file it could not open)
        _error(" ".join(exc.format_message().split()), exc.exit_code)
    except typer.Abort:  # end of input where a command read one
        _error("aborted", 1)
    except curvkit.CurvkitError as exc:
        _error(str(exc), getattr(exc, "exit_code", 2))
    sys.exit(status)


def _error(message: str, status: int) -> NoReturn:
    """Exit with ``status`` after one ``curvkit: error:`` line (from process 0 only)."""
    if _first_process():
        typer.echo(f"curvkit: error: {message}", err=True)
    sys.exit(status)


if __name__ == "__main__":  # pragma: no cover
    main()
