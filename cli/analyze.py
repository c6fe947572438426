"""``curvkit analyze``: checkpoints in, one HDF5 results file out.

The command parses options, calls :func:`curvkit.runs.analyze` (which validates
every checkpoint, then computes and stores each result as soon as it is
finished) and prints: the results on stdout as each run finishes (or one JSON
document with ``--json``), progress bars and diagnostics on stderr.
"""

from __future__ import annotations

import json
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from curvkit import distributed
from curvkit.analysis import AnalysisPlan
from curvkit.arguments import integer
from curvkit.errors import CurvkitError
from curvkit.linalg.lanczos import REORTHOGONALISATION
from curvkit.runs import AnalyzeEvent, AnalyzeReport, ProblemSettings, RunOutcome, analyze, resolve_device
from curvkit.store import ResultsStore
from curvkit.summaries import summarize


class SomeRunsFailedError(CurvkitError):
    """``--skip-bad``: the good checkpoints were analysed, some others failed."""

    exit_code = 1


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


def _comma_separated(values: list[str] | None) -> list[str]:
    """An option given once or more, each time one name or comma-separated ones."""
    return [name.strip() for value in values or [] for name in value.split(",") if name.strip()]


def _params_option(values: list[str] | None) -> str | list[str] | None:
    """``--params`` given once or more, each a name, glob or prefix, or comma-separated ones."""
    if not values:
        return None
    names = _comma_separated(values)
    if not names:
        raise CurvkitError("--params names no parameter: give names, globs, module prefixes or 'all'")
    return "all" if names == ["all"] else names


def _assignment(text: str, flag: str, example: str) -> tuple[str, Any]:
    """``NAME=VALUE`` as ``(NAME, VALUE)``, ``VALUE`` parsed as JSON when it parses, else a string."""
    name, equals, value = text.partition("=")
    name = name.strip()
    if not equals or not name:
        raise CurvkitError(f"{flag} {text!r} is not NAME=VALUE (e.g. {flag} {example})")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def _solver_options(assignments: list[str] | None) -> dict[str, dict[str, Any]]:
    """Every ``--ihvp-option SOLVER.NAME=VALUE``, by solver."""
    options: dict[str, dict[str, Any]] = {}
    for text in assignments or []:
        address, value = _assignment(text, "--ihvp-option", "lissa.repeats=8")
        solver, dot, name = address.partition(".")
        if not dot or not solver or not name:
            raise CurvkitError(
                f"--ihvp-option {text!r} names no solver: write SOLVER.NAME=VALUE (lissa.repeats=8)"
            )
        if name in options.setdefault(solver, {}):
            raise CurvkitError(f"--ihvp-option {address} is given twice")
        options[solver][name] = value
    return options


def _given(**options: Any) -> dict[str, Any]:
    """The options given on the command line (not ``None``): the others keep their defaults."""
    return {name: value for name, value in options.items() if value is not None}


def _refuse_ignored(*analyses: tuple[str, bool, dict[str, Any]]) -> None:
    """Refuse options given without the analysis that reads them (which would ignore them).

    Args:
        analyses: Each ``(needs, runs, options)``: the analysis (``"--ihvp SOLVERS"``),
            whether this command runs it, and the options only it reads, by flag,
            with their values (``None`` when not given).

    Raises:
        CurvkitError: One line naming every such option given and what it needs.
    """
    refused = []
    for needs, runs, options in analyses:
        flags = [flag for flag, value in options.items() if value is not None]
        if flags and not runs:
            one = len(flags) == 1
            refused.append(
                f"{', '.join(flags)} {'applies' if one else 'apply'} only with {needs}: "
                f"give {needs} or leave {'it' if one else 'them'} out"
            )
    if refused:
        raise CurvkitError("; ".join(refused))


def _estimator_options(assignments: list[str] | None, text: str | None) -> dict[str, Any]:
    """``--estimator-options JSON`` and every ``--option NAME=VALUE``, as one mapping by address.

    ``VALUE`` is JSON when it parses (``4``, ``true``, ``[1, 2]``), a string
    otherwise (``exact``). An address given twice is refused, whichever flags give it.
    """
    options = _json_option(text, "--estimator-options") or {}
    for assignment in assignments or []:
        name, value = _assignment(
            assignment, "--option", "mc_samples=4, or --option fisher.mode=exact for one estimator"
        )
        if name in options:
            raise CurvkitError(f"estimator option {name!r} is given twice (--option, --estimator-options)")
        options[name] = value
    return options


class _Display:
    """What the command shows while :func:`curvkit.runs.analyze` works.

    Progress bars (a terminal only) and diagnostics go to stderr; each run's
    results go to stdout as soon as the run finishes, without hard line wrapping.
    Every event also gives a pending Ctrl-C or SIGTERM its chance to stop the run.
    """

    def __init__(self, bars: Progress, interrupts: _Interrupts, output: Path, quiet: bool, as_json: bool):
        self.bars, self.interrupts, self.output = bars, interrupts, output
        self.quiet, self.as_json = quiet, as_json
        self.stdout = Console(file=sys.stdout, soft_wrap=True, highlight=False)
        self.stderr = Console(stderr=True, soft_wrap=True, highlight=False)
        self.tasks: dict[int, Any] = {}

    def __call__(self, event: AnalyzeEvent) -> None:
        self.interrupts.check()
        run, task = event.run, self.tasks.get(id(event.run))
        if event.kind == "run-started":
            self.tasks[id(run)] = self.bars.add_task(
                escape(f"{run.checkpoint.name} [{run.estimator}]"),
                total=len(run.keys),
                completed=len(run.resumed),
                info="",
            )
            for note in run.notes:
                self.stderr.print(f"curvkit: note: {run.checkpoint}: {note}", markup=False)
        elif event.kind == "counters" and task is not None:
            counters = " ".join(f"{k}={_counter(v)}" for k, v in (event.counters or {}).items())
            self.bars.update(task, info=escape(f"{event.key} {counters}"))
        elif event.kind == "result" and task is not None:
            self.bars.advance(task)
        elif event.kind == "run-finished":
            if task is not None:
                self.bars.remove_task(self.tasks.pop(id(run)))
            if not (self.quiet or self.as_json):
                self.bars.stop()  # a live display erases itself before stdout is written
                self._print(run)
                self.bars.start()

    def _print(self, run: RunOutcome) -> None:
        head = f"{run.checkpoint} [{run.estimator}]"
        if run.status == "failed":
            self.stdout.print(f"{head} FAILED: {run.error}", markup=False)
            return
        self.stdout.print(f"{head} {run.parameters} -> {self.output}", markup=False)
        for key in run.keys:
            resumed = "(resumed) " if key in run.resumed else ""
            self.stdout.print(f"  {key}: {resumed}{summarize(run.results[key])}", markup=False)


def _counter(value: Any) -> str:
    return f"{value:.2e}" if isinstance(value, float) else str(value)


def _json_document(report: AnalyzeReport) -> dict[str, Any]:
    """Every run of this command as stored in the file (numbers), plus what was resumed."""
    runs = []
    with ResultsStore(report.output, mode="r") as store:
        for outcome in report.runs:
            stored = store.run(outcome.run_id).to_dict() if outcome.run_id in store else {}
            runs.append(
                {
                    **stored,
                    "run_id": outcome.run_id,
                    "checkpoint": str(outcome.checkpoint),
                    "estimator": outcome.estimator,
                    "status": outcome.status,
                    "error": outcome.error,
                    "resumed": sorted(outcome.resumed),
                }
            )
    return {"output": str(report.output), "runs": runs}


def analyze_command(
    checkpoints: list[str] = typer.Argument(..., help="Checkpoint files, folders or globs (a trajectory)."),
    model: str | None = typer.Option(None, "--model", help="Model factory or class, module:name."),
    model_kwargs: str | None = typer.Option(
        None, "--model-kwargs", help="JSON keyword arguments of the model."
    ),
    weights_key: str | None = typer.Option(
        None, "--weights-key", help="The entry of a checkpoint dict that holds the weights."
    ),
    strict: bool = typer.Option(
        True, "--strict/--no-strict", help="Refuse weights with entries the model lacks, or lacking some."
    ),
    data: str | None = typer.Option(
        None, "--data", help="Bundled data set name, .pt/.npz/.h5 file, or module:function."
    ),
    loss: str | None = typer.Option(None, "--loss", help="cross_entropy, mse, bce_with_logits or nll."),
    params: list[str] | None = typer.Option(
        None, "--params", help="Parameters to analyse: names, globs, module prefixes, or 'all' (frozen too)."
    ),
    forward_kwargs: str | None = typer.Option(
        None, "--forward-kwargs", help="JSON keyword arguments of every model call, e.g. '{\"sr\": 16000}'."
    ),
    curvature: list[str] = typer.Option(
        ["hessian"],
        "--curvature",
        help="Registered estimator(s), comma-separated or repeated: one run per checkpoint and estimator.",
    ),
    option: list[str] | None = typer.Option(
        None,
        "--option",
        help="Estimator option NAME=VALUE (VALUE as JSON, else a string), for every estimator that "
        "takes it; ESTIMATOR.NAME=VALUE for one. Repeatable.",
    ),
    estimator_options: str | None = typer.Option(
        None, "--estimator-options", help="JSON object of estimator options, addressed as with --option."
    ),
    compare_to: str | None = typer.Option(
        None,
        "--compare-to",
        help="Compare every other estimator with this one: top-k eigenvalues, subspace angle, trace.",
    ),
    top_k: int | None = typer.Option(
        None,
        "--top-k",
        help="Largest eigenpairs (default 5 with no other analysis flag, or with --compare-to; else none).",
    ),
    bottom_k: int | None = typer.Option(None, "--bottom-k", help="Smallest eigenpairs."),
    trace: str | None = typer.Option(
        None, "--trace", help="Trace method: hutchinson, hutch++, xtrace, exact."
    ),
    trace_matvecs: int | None = typer.Option(
        None, "--trace-matvecs", help="Products for a stochastic trace (default 99)."
    ),
    density: bool = typer.Option(
        False, "--density", help="Spectral density (stochastic Lanczos quadrature)."
    ),
    check: bool = typer.Option(
        False, "--check", help="Eigenvalue checks (residuals, symmetry, PSD, agreement)."
    ),
    per_layer: bool = typer.Option(False, "--per-layer", help="Top eigenvalue and trace per layer."),
    summary: str | None = typer.Option(
        None,
        "--summary",
        help="Newton summary (Wolinski 2023) over a partition: canonical, wb or trivial: g_bar, H_bar, D3.",
    ),
    summary_damping_int: float | None = typer.Option(
        None,
        "--summary-damping-int",
        help="lambda_int of the cubic-regularised rates of --summary (default 10).",
    ),
    ihvp: list[str] | None = typer.Option(
        None,
        "--ihvp",
        help="Inverse-HVP accuracy of these solvers (comma-separated, e.g. cg,minres,neumann,lissa,kfac) "
        "against a float64 reference, per iteration.",
    ),
    damping: float | None = typer.Option(
        None, "--damping", help="Damping of --ihvp: (A + damping I)^-1 v (default 1e-3)."
    ),
    ihvp_vector: str | None = typer.Option(
        None,
        "--ihvp-vector",
        help="v of --ihvp: gradient (default), random, or a .pt file with a [P] tensor.",
    ),
    ihvp_tol: float | None = typer.Option(
        None, "--ihvp-tol", help="Relative residual each --ihvp solver stops at (default 1e-6)."
    ),
    ihvp_maxiter: int | None = typer.Option(
        None, "--ihvp-maxiter", help="Iteration cap of each --ihvp solver (default 100)."
    ),
    ihvp_option: list[str] | None = typer.Option(
        None,
        "--ihvp-option",
        help="A solver's option SOLVER.NAME=VALUE (VALUE as JSON, else a string), e.g. lissa.repeats=8. "
        "Repeatable.",
    ),
    tol: float = typer.Option(1e-4, "--tol", help="Relative residual tolerance of eigenpairs."),
    max_matvecs: int | None = typer.Option(
        None, "--max-matvecs", help="Product budget of each eigen-solve (default: the solver's)."
    ),
    reorthogonalisation: str = typer.Option(
        "auto",
        "--reorthogonalisation",
        help=f"Lanczos reorthogonalisation: {', '.join(REORTHOGONALISATION)}.",
    ),
    batch_size: int = typer.Option(1024, "--batch-size", help="Batch size of the passes over the data."),
    max_samples: int | None = typer.Option(None, "--max-samples", help="Use only the first N samples."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:i."),
    dtype: str = typer.Option(
        "float32", "--dtype", help="float32, float64, or bfloat16 (bfloat16 products, float32 analyses)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of every random vector."),
    output: Path = typer.Option(Path("results.h5"), "--output", "-o", help="HDF5 results file."),
    trust_pickle: bool = typer.Option(
        False,
        "--trust-pickle",
        help="Allow pickled whole models (runs code from the file: trusted files only).",
    ),
    check_deterministic: bool = typer.Option(
        True,
        "--check-deterministic/--no-check-deterministic",
        help="Compare two passes over the data before the first product (stateful models fail it).",
    ),
    skip_bad: bool = typer.Option(
        False, "--skip-bad", help="Analyse the good checkpoints and record the bad ones as failed runs."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars and no summary."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON document on stdout."),
    nproc: int = typer.Option(
        1,
        "--nproc",
        help="Processes to run data-parallel on this machine (torch.distributed; launches them as "
        "torchrun does). Under torchrun, its processes are used instead.",
    ),
) -> None:
    """Analyse the curvature of checkpoints and store every result in one HDF5 file.

    With no analysis flag (--top-k, --bottom-k, --trace, --density, --check, --per-layer,
    --summary, --ihvp): the top-5 eigenvalues with certificates, the trace and the
    spectral density. Running the same command again resumes and skips finished work.
    """
    integer(nproc, "--nproc")
    if nproc > 1 and distributed.launched_processes() == 1:
        status = distributed.launch_local(nproc, [sys.executable, "-m", "curvkit.cli.main", *sys.argv[1:]])
        raise typer.Exit(status)
    solvers = _comma_separated(ihvp)
    explicit = (
        top_k is not None
        or bottom_k is not None
        or trace is not None
        or density
        or check
        or per_layer
        or bool(solvers)
        or summary is not None
    )
    trace = trace if trace is not None else (None if explicit else "hutch++")
    _refuse_ignored(
        (  # a comparison estimates both traces too (hutch++ unless --trace says otherwise)
            "--trace METHOD or --compare-to ESTIMATOR",
            trace is not None or compare_to is not None,
            {"--trace-matvecs": trace_matvecs},
        ),
        (
            "--ihvp SOLVERS",
            bool(solvers),
            {
                "--damping": damping,
                "--ihvp-vector": ihvp_vector,
                "--ihvp-tol": ihvp_tol,
                "--ihvp-maxiter": ihvp_maxiter,
                "--ihvp-option": ihvp_option or None,
            },
        ),
        ("--summary PARTITION", summary is not None, {"--summary-damping-int": summary_damping_int}),
    )
    kinds: dict[str, dict[str, Any]] = {}
    if summary is not None:
        kinds["summary"] = {"partition": summary, **_given(damping_int=summary_damping_int)}
    if solvers:
        kinds["ihvp"] = {
            "solvers": solvers,
            **_given(damping=damping, vector=ihvp_vector, tol=ihvp_tol, maxiter=ihvp_maxiter),
            "solver_options": _solver_options(ihvp_option),
        }
    plan = AnalysisPlan(
        top_k=top_k if top_k is not None else (0 if explicit and compare_to is None else 5),
        bottom_k=bottom_k or 0,
        trace=trace,
        **_given(trace_matvecs=trace_matvecs),
        density=density or not explicit,
        check=check,
        per_layer=per_layer,
        tol=tol,
        seed=seed,
        max_matvecs=max_matvecs,
        reorthogonalisation=reorthogonalisation,
        compare_to=compare_to,
        options=kinds,
    )
    options = _estimator_options(option, estimator_options)
    settings = ProblemSettings(
        model=model,
        model_kwargs=_json_option(model_kwargs, "--model-kwargs"),
        weights_key=weights_key,
        strict=strict,
        data=data,
        loss=loss,
        params=_params_option(params),
        forward_kwargs=_json_option(forward_kwargs, "--forward-kwargs"),
        batch_size=batch_size,
        max_samples=max_samples,
        device=device,
        dtype=dtype,
        trust_pickle=trust_pickle,
        check_deterministic=check_deterministic,
    )
    with distributed.joined(resolve_device(device)) as (rank, _):
        if rank != 0:  # process 0 prints for all; the others compute
            quiet, as_json = True, False
        _analyze_and_print(checkpoints, output, plan, settings, curvature, options, skip_bad, quiet, as_json)


def _analyze_and_print(
    checkpoints: list[str],
    output: Path,
    plan: AnalysisPlan,
    settings: ProblemSettings,
    curvature: list[str],
    options: dict[str, Any] | None,
    skip_bad: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Runs :func:`curvkit.runs.analyze` with progress bars and interrupts; prints the report."""
    show_bars = not quiet and sys.stderr.isatty()
    try:
        with (
            _Interrupts() as interrupts,
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                disable=not show_bars,
                transient=True,
            ) as bars,
        ):
            report = analyze(
                checkpoints,
                output=output,
                plan=plan,
                settings=settings,
                estimators=_comma_separated(curvature),
                estimator_options=options,
                skip_bad=skip_bad,
                command_line=shlex.join(["curvkit", *sys.argv[1:]]),
                progress=_Display(bars, interrupts, output, quiet, as_json),
            )
            interrupts.check()  # one that came during the last run's summary
    except KeyboardInterrupt:
        raise AnalysisInterruptedError(
            f"interrupted; the analyses that finished are kept in {output}: "
            "run the same command again to resume"
        ) from None
    if as_json:
        typer.echo(json.dumps(_json_document(report), indent=2))
    if report.failed:
        listed = "; ".join(f"{run.checkpoint} [{run.estimator}]: {run.error}" for run in report.failed)
        raise SomeRunsFailedError(
            f"{len(report.failed)} of {len(report.runs)} runs failed, the others are in {output}: {listed}"
        )
