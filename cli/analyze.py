"""``curvkit analyze``: checkpoints in, one HDF5 results file out.

The command parses options and loops over checkpoints and estimators; the work
is done by :mod:`curvkit.analysis` (preparing and running the analyses) and
:mod:`curvkit.store` (writing each result as soon as it is finished).
"""

from __future__ import annotations

import json
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from curvkit.analysis import AnalysisPlan, expand_checkpoints, prepare_analysis, run_plan
from curvkit.errors import CurvkitError
from curvkit.store import ResultsStore, make_run_id


class AnalysisInterruptedError(CurvkitError):
    """Ctrl-C or SIGTERM stopped ``curvkit analyze``; what finished is in the results file."""

    exit_code = 130  # 128 + SIGINT, the shell's convention for an interrupted command


class _Interrupts:
    """Ctrl-C and SIGTERM (``kill``, a scheduler's time limit) stop ``curvkit analyze``.

    Both raise :class:`KeyboardInterrupt`, so the current run is marked
    interrupted before the command exits instead of being left for the next reader
    to find half-written. Python runs a signal handler between bytecodes wherever
    the main thread is, and an exception raised inside a weakref callback or a
    ``__del__`` (which autograd's bookkeeping runs all the time) is printed and
    swallowed. The handler therefore also records the signal, and :meth:`check`,
    called at every progress report, after every stored result and at the end,
    raises again until the command stops.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        raise KeyboardInterrupt

    def check(self) -> None:
        """Raise :class:`KeyboardInterrupt` if a signal came (even one swallowed)."""
        if self.received is not None:
            raise KeyboardInterrupt

    def __enter__(self) -> _Interrupts:
        try:
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread (an embedding application): leave signals alone
            pass
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


def _json_option(text: str | None, name: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CurvkitError(f"{name} is not valid JSON ({exc.msg}): {text!r}") from exc
    if not isinstance(value, dict):
        raise CurvkitError(f"{name} must be a JSON object, got {text!r}")
    return value


def _summary(key: str, result: Any) -> str:
    """One short line per analysis for the terminal."""
    if key.startswith("eigen/"):
        values = ", ".join(f"{v:.4g}" for v in result.values.tolist())
        converged = "" if result.converged else ", NOT converged"
        return (
            f"[{values}] (max residual {result.residuals.max().item():.1e}, {result.matvecs} products"
            f"{converged})"
        )
    if key.startswith("trace/"):
        return f"{result.estimate:.5g} +- {result.stderr:.2g} ({result.matvecs} products)"
    if key.startswith("density/"):
        low, high = result.nodes.min().item(), result.nodes.max().item()
        return f"{result.runs} runs x {result.steps} steps, nodes in [{low:.3g}, {high:.3g}]"
    if key.startswith("checks/"):
        return str(result)
    if key.startswith("per_layer/"):
        return f"{len(result)} layers"
    return type(result).__name__


def analyze(
    checkpoints: list[str] = typer.Argument(..., help="Checkpoint files, folders or globs (a trajectory)."),
    model: str | None = typer.Option(None, "--model", help="Model factory or class, module:name."),
    model_kwargs: str | None = typer.Option(
        None, "--model-kwargs", help="JSON keyword arguments of the model."
    ),
    data: str | None = typer.Option(
        None, "--data", help="Bundled data set name, .pt/.npz/.h5 file, or module:function."
    ),
    loss: str | None = typer.Option(None, "--loss", help="cross_entropy, mse, bce_with_logits or nll."),
    curvature: list[str] = typer.Option(["hessian"], "--curvature", help="Registered estimator(s)."),
    top_k: int | None = typer.Option(None, "--top-k", help="Largest eigenpairs (default 5)."),
    bottom_k: int | None = typer.Option(None, "--bottom-k", help="Smallest eigenpairs."),
    trace: str | None = typer.Option(
        None, "--trace", help="Trace method: hutchinson, hutch++, xtrace, exact."
    ),
    trace_matvecs: int = typer.Option(99, "--trace-matvecs", help="Products for a stochastic trace."),
    density: bool = typer.Option(
        False, "--density", help="Spectral density (stochastic Lanczos quadrature)."
    ),
    check: bool = typer.Option(
        False, "--check", help="Eigenvalue checks (residuals, symmetry, PSD, agreement)."
    ),
    per_layer: bool = typer.Option(False, "--per-layer", help="Top eigenvalue and trace per layer."),
    tol: float = typer.Option(1e-4, "--tol", help="Relative residual tolerance of eigenpairs."),
    batch_size: int = typer.Option(1024, "--batch-size", help="Batch size of the passes over the data."),
    max_samples: int | None = typer.Option(None, "--max-samples", help="Use only the first N samples."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or float64."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random vector."),
    output: Path = typer.Option(Path("results.h5"), "--output", "-o", help="HDF5 results file."),
    trust_pickle: bool = typer.Option(
        False,
        "--trust-pickle",
        help="Allow pickled whole models (runs code from the file: trusted files only).",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars and no summary."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
) -> None:
    """Analyse the curvature of checkpoints and store every result in one HDF5 file.

    With no analysis flag: the top-5 eigenvalues with certificates, the trace and the
    spectral density. Running the same command again resumes and skips finished work.
    """
    explicit = top_k is not None or bottom_k is not None or trace is not None or density or check or per_layer
    plan = AnalysisPlan(
        top_k=top_k if top_k is not None else (0 if explicit else 5),
        bottom_k=bottom_k or 0,
        trace=trace if trace is not None else (None if explicit else "hutch++"),
        trace_matvecs=trace_matvecs,
        density=density or not explicit,
        check=check,
        per_layer=per_layer,
        tol=tol,
        seed=seed,
    )
    kwargs = _json_option(model_kwargs, "--model-kwargs")
    paths = expand_checkpoints(checkpoints)
    console = Console(stderr=True, quiet=quiet)
    show_progress = not quiet and sys.stderr.isatty()
    command_line = shlex.join(["curvkit", *sys.argv[1:]])
    summary: list[dict[str, Any]] = []
    try:
        with (
            _Interrupts() as interrupts,
            ResultsStore(output) as store,
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                console=console,
                disable=not show_progress,
                transient=True,
            ) as bars,
        ):
            for index, path in enumerate(paths):
                for estimator in curvature:
                    interrupts.check()
                    started = time.perf_counter()
                    prepared = prepare_analysis(
                        path,
                        estimator=estimator,
                        model=model,
                        model_kwargs=kwargs,
                        data=data,
                        loss=loss,
                        batch_size=batch_size,
                        max_samples=max_samples,
                        device=device,
                        dtype=dtype,
                        trust_pickle=trust_pickle,
                    )
                    provenance = {**prepared.provenance, "seed": seed, "command_line": command_line}
                    run = store.begin_run(
                        make_run_id(path, estimator, prepared.provenance["estimator_options"]),
                        provenance,
                        index=index,
                    )
                    run.write_timing("load", time.perf_counter() - started)
                    psd = bool(getattr(prepared.operator, "PSD", False))
                    keys = plan.keys(psd=psd, reference=prepared.reference is not None)
                    requests = {key: plan.request(key) for key in keys}
                    done = {key for key in keys if run.has(key, requests[key])}
                    task = bars.add_task(
                        escape(f"{path.name} [{estimator}]"),
                        total=len(keys),
                        info="",
                        completed=len(done),
                    )
                    lines: dict[str, str] = {
                        key: "(resumed) " + _summary(key, run.read(key)) for key in sorted(done)
                    }

                    def store_result(
                        key: str,
                        result: Any,
                        seconds: float,
                        run=run,
                        task=task,
                        lines=lines,
                        requests=requests,
                    ) -> None:
                        run.write(key, result, request=requests[key])
                        run.write_timing(key, seconds)
                        lines[key] = _summary(key, result)
                        bars.advance(task)
                        interrupts.check()

                    def report(key: str, counters: dict, task=task) -> None:
                        interrupts.check()
                        bars.update(
                            task,
                            info=escape(f"{key} " + " ".join(f"{k}={v}" for k, v in counters.items())),
                        )

                    try:
                        run_plan(
                            prepared.operator,
                            plan,
                            done=done,
                            reference=prepared.reference,
                            on_result=store_result,
                            progress=report,
                        )
                    except BaseException as exc:
                        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
                        run.finish("failed", error=reason or type(exc).__name__)
                        raise
                    run.finish("complete")
                    bars.remove_task(task)
                    summary.append(
                        {
                            "run_id": run.run_id,
                            "checkpoint": str(path),
                            "estimator": estimator,
                            "parameters": prepared.problem.dim,
                            "resumed": sorted(done),
                            "results": {key: lines[key] for key in keys},
                        }
                    )
                    if not as_json:
                        console.print(
                            f"[bold]{escape(str(path))}[/bold] {escape(f'[{estimator}]')} "
                            f"P={prepared.problem.dim:,} -> {escape(str(output))}"
                        )
                        for key in keys:
                            console.print(f"  {key}: {lines[key]}", markup=False, highlight=False)
            interrupts.check()  # one that came during the last result's summary
    except KeyboardInterrupt:
        raise AnalysisInterruptedError(
            f"interrupted; the analyses that finished are kept in {output}: "
            "run the same command again to resume"
        ) from None
    if as_json:
        typer.echo(json.dumps({"output": str(output), "runs": summary}, indent=2))
