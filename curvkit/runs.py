"""``curvkit analyze`` as a library: checkpoints in, one HDF5 results file out.

:func:`analyze` is what the command runs, callable from Python with the same
result file. It works in two phases:

1. **Validation, before anything is written.** Every checkpoint (a trajectory
   is validated whole) is loaded with its model, data, loss and estimator; the
   model and loss are applied to one batch, the determinism probe runs, and the
   plan is checked against the numbers of parameters and of samples (once per
   run: :meth:`AnalysisPlan.check_dimension`). A bad checkpoint stops
   the command naming every bad file, unless ``skip_bad`` asks to analyse the
   others (each bad one is then recorded as a failed run with its reason).
2. **Analysis.** Each run is begun in the results file, its analyses computed
   in plan order and each written as soon as it is finished.

**Several estimators** give one run per checkpoint and estimator. Their options
are addressed to all or to one (:func:`resolve_estimator_options`): ``seed`` goes
to every estimator that takes it, ``fisher.seed`` to ``fisher`` alone. An
estimator that takes a ``seed`` and is given none gets the command's seed (the
plan's), so that a Monte-Carlo estimator's numbers are reproducible. With a
baseline (``AnalysisPlan(compare_to=...)``) every other estimator's run gets a
``compare/<baseline>`` analysis; the baseline's own run, when the command has
one, comes first for each checkpoint, and the comparisons reuse its eigenpairs
and trace instead of recomputing them (eigenpairs only when computed by this
command: a file stores eigenvalues without their vectors).

**A run is keyed by everything that determines its numbers** (:func:`run_key`):
the checkpoint's path and content hash, the model factory and its arguments,
the weights entry and strictness, the data (its spec and a fingerprint of its
contents), ``max_samples``, the loss, the selected parameters, the forward
arguments, the estimator and its options, the dtype, the device type, the seed
and :data:`RESULTS_VERSION`. Another value of any of them is another run; the
same values reopen the run and resume it. Inside a run, an analysis is reused
only when its stored request equals the new one (see
:meth:`curvkit.analysis.AnalysisPlan.request`); otherwise it is recomputed. The
batch size is not part of the key: the curvature is that of the full-data
loss, so it changes results only by rounding.

h5py is imported when :func:`analyze` opens the results file, not on import.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from curvkit import checkpoints as _checkpoints
from curvkit import distributed
from curvkit._version import __version__
from curvkit.analysis import (
    DENSE_REFERENCE_MAX_DIM,
    AnalysisPlan,
    Baseline,
    Reference,
    estimator_reference,
    run_checked_plan,
)
from curvkit.arguments import integer
from curvkit.data import (
    BatchSource,
    DataSummary,
    is_tensor_pair,
    same_device,
    slice_batch,
    summarize_data,
    to_device,
)
from curvkit.errors import CurvkitError, UnknownEstimatorError, UnknownOptionError, describe_error, one_line
from curvkit.memory import fits
from curvkit.operator import CurvatureOperator

__all__ = [
    "DTYPES",
    "RESULTS_VERSION",
    "AnalyzeEvent",
    "AnalyzeReport",
    "PreparedAnalysis",
    "ProblemSettings",
    "RunOutcome",
    "Trajectory",
    "analyze",
    "expand_checkpoints",
    "prepare_analysis",
    "resolve_device",
    "resolve_estimator_options",
    "run_key",
    "trajectories",
]

RESULTS_VERSION = 2
"""Version of what curvkit's stored numbers mean, part of every run key.

Raised whenever a change in curvkit changes the results of the same settings by
more than rounding (a fixed bug, another normalisation), so that a results file
never mixes the old numbers with the new under one run. Version 2: runs keyed
by everything that determines them."""

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
"""The precisions of the model and its products in ``curvkit analyze``."""

ANALYSIS_DTYPES = {"bfloat16": torch.float32}
"""The analyses' own arithmetic where it differs from the products' (mixed precision).

bfloat16 keeps 8 significant bits: enough for the forward and backward passes of
a product (where a GPU gains), far too few for a Krylov basis or a tridiagonal
eigenproblem, so those run in float32 (:meth:`curvkit.CurvatureOperator.astype`)."""


@dataclass(frozen=True)
class ProblemSettings:
    """How to turn a checkpoint into a problem: everything but the checkpoint itself.

    What is not given comes from the checkpoint's curvkit metadata
    (``model_factory``, ``model_kwargs``, ``data``, ``loss``; see
    :func:`curvkit.save_checkpoint`).

    Attributes:
        model: Model factory or class, ``"module:name"``.
        model_kwargs: Keyword arguments of the factory.
        weights_key: The entry of a checkpoint dict that holds the weights.
        strict: Refuse weights with missing or unexpected entries.
        data: Bundled data set name, data file or ``"module:function"``.
        loss: Loss name.
        params: Parameters to differentiate (names, globs, module prefixes, or
            ``"all"`` with frozen ones); ``None``: all that require grad.
        forward_kwargs: Extra keyword arguments of every call of the model.
        batch_size: Batch size of the passes over the data.
        max_samples: Use only the first ``max_samples`` samples.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        dtype: ``"float32"``, ``"float64"`` or ``"bfloat16"`` (products in
            bfloat16, analyses in float32: :data:`ANALYSIS_DTYPES`).
        trust_pickle: Allow unpickling code from the checkpoint.
        check_deterministic: Run the determinism probe (two passes compared).
    """

    model: str | None = None
    model_kwargs: Mapping[str, Any] | None = None
    weights_key: str | None = None
    strict: bool = True
    data: str | None = None
    loss: str | None = None
    params: str | Sequence[str] | None = None
    forward_kwargs: Mapping[str, Any] | None = None
    batch_size: int = 1024
    max_samples: int | None = None
    device: str = "auto"
    dtype: str = "float32"
    trust_pickle: bool = False
    check_deterministic: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise CurvkitError(f"unknown dtype {self.dtype!r}; use one of {list(DTYPES)}")
        # kept as plain Python integers (max_samples is part of the run's key)
        object.__setattr__(self, "batch_size", integer(self.batch_size, "--batch-size"))  # frozen
        if self.max_samples is not None:
            object.__setattr__(self, "max_samples", integer(self.max_samples, "--max-samples"))
        resolve_device(self.device)


def place_tensor_pair(data: Any, device: torch.device, dtype: torch.dtype, max_samples: int | None) -> Any:
    """A tensor pair's first ``max_samples`` samples moved once to ``device`` (floating ones to ``dtype``).

    Other data (a Dataset, a DataLoader), a pair whose moved copy would not fit
    in half the device's free memory, and any data in a data-parallel run (where
    each process reads only its shard, batch by batch) are returned as given: the
    problem then moves each batch as it uses it.
    """
    if distributed.process()[1] > 1 or not is_tensor_pair(data):
        return data
    n = data[1].shape[0] if max_samples is None else min(max_samples, data[1].shape[0])
    inputs, targets = slice_batch(data[0], data[1], n)
    tensors = list(inputs.values()) if isinstance(inputs, Mapping) else [inputs]
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return data
    moved = [*tensors, targets]
    needed = sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size()) for t in moved)
    already = all(
        same_device(t.device, device) and (not t.is_floating_point() or t.dtype == dtype) for t in moved
    )
    if already or not fits(needed, device):
        return data
    return to_device(inputs, device, dtype), to_device(targets, device, dtype)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:i"`` as a device.

    Any other name torch knows (``"mps"``, ``"xpu"``, ``"meta"``...) is refused here,
    naming it, rather than failing later with a traceback where the first tensor
    is moved there.

    Raises:
        CurvkitError: CUDA is asked for but not available, a ``cuda:i`` this
            machine does not have, or another name.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    cuda = re.fullmatch(r"cuda(?::(\d+))?", device)
    if cuda is None:
        raise CurvkitError(f"--device {device!r} is not supported; use auto, cpu, cuda or cuda:i")
    if not torch.cuda.is_available():
        raise CurvkitError(f"--device {device} asked for, but no CUDA device is available; use --device cpu")
    count = torch.cuda.device_count()
    if cuda.group(1) is not None and int(cuda.group(1)) >= count:
        raise CurvkitError(
            f"--device {device} asked for, but this machine has {count} CUDA device(s): "
            f"cuda:0 to cuda:{count - 1}"
        )
    return torch.device(device)


@dataclass
class PreparedAnalysis:
    """A checkpoint made ready for analysis: its operator, problem, key and provenance.

    Attributes:
        operator: The curvature operator of the estimator.
        problem: The :class:`~curvkit.Problem`.
        run_id: The run's id in a results file (from :attr:`key`).
        key: Everything that determines the run's numbers (:func:`run_key`).
        provenance: Where the results come from (see ``docs/hdf5-schema.md``).
        reference: The reference of ``checks/agreement``
            (:func:`curvkit.analysis.estimator_reference`), or why there is none.
        baseline: The operator of the baseline estimator on the same problem,
            when one was asked for and the estimator is not the baseline.
        seconds: Time taken to load and validate it.
        precise: Builds the same estimator on a float64 copy of the problem
            (the reference solve of ``ihvp``); called only when needed.
    """

    operator: Any
    problem: Any
    run_id: str
    key: dict[str, Any]
    provenance: dict[str, Any]
    reference: Reference
    baseline: Any = None
    seconds: float = 0.0
    precise: Callable[[], Any] | None = None


class _DataCache:
    """Data sets loaded once per spec, fingerprinted once per spec and sample count, and moved once.

    A tensor pair (what data files and bundled sets give) is moved to the run's
    device and dtype once per spec, sample count, device and dtype
    (:meth:`placed`), so that the passes over the data of every product do not
    copy it again (on a GPU, a host-to-device copy per batch and product), where
    it fits in half the device's free memory (:func:`curvkit.memory.fits`);
    otherwise, and for Datasets and DataLoaders, each batch is moved as it is used.
    """

    def __init__(self) -> None:
        self._data: dict[str, Any] = {}
        self._summaries: dict[tuple[str, int | None], DataSummary] = {}
        self._placed: dict[tuple[str, int | None, torch.device, torch.dtype], Any] = {}

    def placed(self, spec: str, settings: ProblemSettings, device: torch.device, dtype: torch.dtype) -> Any:
        """The loaded data (:meth:`load` first) within ``max_samples``, moved once where they fit."""
        key = (spec, settings.max_samples, device, dtype)
        if key not in self._placed:
            self._placed[key] = place_tensor_pair(self._data[spec], device, dtype, settings.max_samples)
        return self._placed[key]

    def load(self, spec: str, settings: ProblemSettings) -> tuple[Any, DataSummary]:
        from curvkit import datasets

        if spec not in self._data:
            self._data[spec] = datasets.load_data_spec(spec)
        data = self._data[spec]
        key = (spec, settings.max_samples)
        if key not in self._summaries:
            source = BatchSource(data, batch_size=settings.batch_size, max_samples=settings.max_samples)
            self._summaries[key] = summarize_data(source)
        return data, self._summaries[key]


def run_key(
    *,
    checkpoint: str | os.PathLike[str],
    checkpoint_sha256: str,
    model: str,
    model_kwargs: Any,
    settings: ProblemSettings,
    data: str,
    data_fingerprint: str,
    loss: str,
    parameter_names: Sequence[str],
    estimator: str,
    estimator_options: Mapping[str, Any],
    device: torch.device,
    seed: int,
) -> dict[str, Any]:
    """Everything that determines the numbers of a run, as plain JSON-able values.

    Two commands with equal keys compute the same numbers (to rounding), so the
    second resumes the first's run; any difference starts another run.
    """
    names = hashlib.sha256("\n".join(parameter_names).encode()).hexdigest()
    return {
        "results_version": RESULTS_VERSION,
        "checkpoint": os.path.abspath(os.fspath(checkpoint)),
        "checkpoint_sha256": checkpoint_sha256,
        "model": model,
        "model_kwargs": dict(model_kwargs or {}),
        "weights_key": settings.weights_key,
        "strict": settings.strict,
        "data": data,
        "data_fingerprint": data_fingerprint,
        "max_samples": settings.max_samples,
        "loss": loss,
        "parameter_names_sha256": names,
        "forward_kwargs": dict(settings.forward_kwargs or {}),
        "estimator": estimator,
        "estimator_options": dict(estimator_options),
        "dtype": settings.dtype,
        "device": device.type,
        "seed": seed,
    }


def _seeded(estimator: str, options: Mapping[str, Any] | None, seed: int) -> dict[str, Any]:
    """``options`` with the command's ``seed`` for an estimator that takes one and was given none.

    A Monte-Carlo estimator draws a fresh seed when given none; the command's
    ``--seed`` makes its numbers reproducible, and part of the run's key. An
    estimator takes a seed when its factory names ``seed``, or takes
    ``**kwargs`` and is registered ``stochastic`` (the operator contract's
    ``seed``: :mod:`curvkit.problem_operator`). One whose factory hides both
    draws its own seed, which :func:`_drawn_seed` puts in the run's key.
    """
    from curvkit.registry import estimator_options, get_estimator

    spec = get_estimator(estimator)
    named = estimator_options(spec)
    takes = "seed" in named if named is not None else bool(spec.flags.get("stochastic"))
    options = dict(options or {})
    if "seed" not in options and takes:
        options["seed"] = seed
    return options


def _drawn_seed(operator: CurvatureOperator, options: Mapping[str, Any]) -> dict[str, Any]:
    """``{"estimator_seed": ...}`` for a Monte-Carlo operator whose samples no setting of the command fixes.

    That is, one that is ``STOCHASTIC`` and whose seed (:attr:`ProblemOperator.seed`) is not the
    ``seed`` it was given: it drew its own (its factory took none, or dropped it). Its numbers come
    from that seed, so it goes in the run's key, and a second command starts another run instead of
    resuming this one with other samples. An operator that does not say its seed (a wrapper
    made by the factory) counts as one that drew its own: its key gets a seed of its own.
    """
    if not operator.STOCHASTIC:
        return {}
    seed = getattr(operator, "seed", None)
    if seed is not None and seed == options.get("seed"):
        return {}
    return {"estimator_seed": int(seed) if seed is not None else f"unknown {uuid.uuid4().hex}"}


def resolve_estimator_options(
    estimators: Sequence[str], options: Mapping[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """The options of each estimator of a command, from options addressed to all of them or to one.

    * ``NAME`` (``"mc_samples"``) goes to every estimator that takes it (whose
      factory names it, or takes ``**kwargs``); it is an error when none does.
    * ``ESTIMATOR.NAME`` (``"fisher.mc_samples"``) goes to that estimator alone,
      which must be one of ``estimators`` and take it, and replaces a plain
      ``NAME`` for it.

    Args:
        estimators: Registered estimator names (a baseline included).
        options: Option values by address.

    Returns:
        ``{estimator: {option: value}}`` for every estimator, in order.

    Raises:
        UnknownEstimatorError: An estimator is not registered.
        UnknownOptionError: An option that no estimator takes, or an addressed one
            its estimator does not take (the message lists the options each takes).
        CurvkitError: An address that names no option, an estimator the command
            does not run, or a ``seed`` that is not an integer in ``[0, 2**63)``
            (:func:`curvkit.registry.check_options`).

    Example:
        >>> resolve_estimator_options(["hessian", "exact-hessian"], {"hessian.strategy": "reverse"})
        {'hessian': {'strategy': 'reverse'}, 'exact-hessian': {}}
    """
    from curvkit.registry import check_options, estimator_options, get_estimator

    specs = {name: get_estimator(name) for name in estimators}
    resolved: dict[str, dict[str, Any]] = {name: {} for name in specs}
    addressed: dict[str, dict[str, Any]] = {}
    for key, value in (options or {}).items():
        target, dot, option = str(key).rpartition(".")
        if not option.isidentifier() or (dot and not target):
            raise CurvkitError(
                f"option {key!r} is not NAME or ESTIMATOR.NAME (e.g. mc_samples, fisher.mc_samples)"
            )
        if not dot:
            takers = [name for name, spec in specs.items() if _takes(estimator_options(spec), option)]
            if not takers:
                _refuse(specs, option)
            for name in takers:
                resolved[name][option] = value
        elif target not in specs:
            raise CurvkitError(
                f"option {key!r} is addressed to estimator {target!r}, which this command does not run "
                f"(it runs {', '.join(specs)})"
            )
        else:
            addressed.setdefault(target, {})[option] = value
    for name, given in addressed.items():
        check_options(specs[name], given)
        resolved[name].update(given)
    # every estimator's options checked here, before any checkpoint is loaded (a seed's value too)
    return {name: check_options(specs[name], given) for name, given in resolved.items()}


def _takes(known: list[str] | None, option: str) -> bool:
    return known is None or option in known


def _refuse(specs: Mapping[str, Any], option: str) -> None:
    """Raise :class:`UnknownOptionError` for a plain option none of the estimators takes."""
    from curvkit.registry import check_options, estimator_options

    if len(specs) == 1:
        check_options(next(iter(specs.values())), {option: None})  # the estimator's own message
    takes = "; ".join(
        f"{name} takes {', '.join(estimator_options(spec) or []) or 'no options'}"
        for name, spec in specs.items()
    )
    raise UnknownOptionError(f"no estimator of this command takes option {option!r} ({takes})")


def prepare_analysis(
    checkpoint: str | os.PathLike[str],
    *,
    estimator: str = "hessian",
    estimator_options: Mapping[str, Any] | None = None,
    settings: ProblemSettings = ProblemSettings(),  # noqa: B008 - frozen, never mutated
    seed: int = 0,
    reference_max_dim: int = DENSE_REFERENCE_MAX_DIM,
    baseline: str | None = None,
    baseline_options: Mapping[str, Any] | None = None,
    _data: _DataCache | None = None,
) -> PreparedAnalysis:
    """Load a checkpoint, its data and loss, build the estimator's operator, and validate them.

    The model and loss are applied to one batch, and the determinism probe runs
    (unless ``settings.check_deterministic`` is off), so that a checkpoint that
    cannot be analysed fails here, before any result file is touched. The
    baseline's operator is built here too, for the same reason.

    Args:
        checkpoint: The checkpoint file.
        estimator: A registered estimator.
        estimator_options: Its options (for this estimator alone: see
            :func:`resolve_estimator_options`).
        settings: Model, data, loss, precision and device.
        seed: The seed of the analyses (part of the run key).
        reference_max_dim: Largest ``P`` for which a callable (dense) reference
            is built for ``checks/agreement``.
        baseline: An estimator to compare with (``None``, or the estimator
            itself: none).
        baseline_options: The baseline's options.

    Raises:
        CurvkitError: Anything that makes the checkpoint, data, loss or estimator
            unusable, with a one-line message.
    """
    from curvkit.problem import Problem
    from curvkit.registry import curvature, get_estimator, loaded_plugins
    from curvkit.store import make_run_id

    started = time.perf_counter()
    target = resolve_device(settings.device)
    loaded = _checkpoints.load_checkpoint(
        checkpoint,
        model_factory=settings.model,
        model_kwargs=settings.model_kwargs,
        weights_key=settings.weights_key,
        strict=settings.strict,
        trust_pickle=settings.trust_pickle,
    )
    meta = loaded.metadata or {}
    data_spec = settings.data or meta.get("data")
    if not data_spec:
        raise CurvkitError(f"{checkpoint}: no --data given and the checkpoint names no data set")
    data_spec = str(data_spec)
    loss_name = settings.loss or meta.get("loss") or "cross_entropy"
    cache = _data or _DataCache()
    _, summary = cache.load(data_spec, settings)
    net = loaded.model.to(device=target, dtype=DTYPES[settings.dtype])
    data = cache.placed(data_spec, settings, target, DTYPES[settings.dtype])
    problem = Problem(
        net,
        loss_name,
        data,
        params=settings.params,
        batch_size=settings.batch_size,
        max_samples=settings.max_samples,
        forward_kwargs=settings.forward_kwargs,
        check_deterministic=settings.check_deterministic,
    )
    problem.check_batch()
    problem.ensure_deterministic()
    options = _seeded(estimator, estimator_options, seed)
    analysis_dtype = ANALYSIS_DTYPES.get(settings.dtype, problem.dtype)
    built = curvature(estimator, problem, **options)
    operator = built.astype(analysis_dtype)
    spec = get_estimator(estimator)
    reference = estimator_reference(spec, problem, max_dense_dim=reference_max_dim, options=options)
    other = None
    if baseline is not None and baseline != estimator:
        other = curvature(baseline, problem, **_seeded(baseline, baseline_options, seed))
        other = other.astype(analysis_dtype)
    model = settings.model or meta.get("model_factory") or type(net).__name__
    model_kwargs = settings.model_kwargs if settings.model_kwargs is not None else meta.get("model_kwargs")
    key = run_key(
        checkpoint=checkpoint,
        checkpoint_sha256=loaded.sha256,
        model=model,
        model_kwargs=model_kwargs,
        settings=settings,
        data=data_spec,
        data_fingerprint=summary.fingerprint,
        loss=loss_name,
        parameter_names=problem.param_names,
        estimator=estimator,
        estimator_options=options,
        device=target,
        seed=seed,
    )
    key.update(_drawn_seed(built, options))
    provenance = {  # the key's settings, as the user gave them, and what was found
        **{name: value for name, value in key.items() if name not in ("checkpoint", "device")},
        "checkpoint": str(Path(checkpoint)),
        "checkpoint_format": loaded.format,
        "checkpoint_info": loaded.info,
        "checkpoint_notes": [*loaded.notes, *([loaded.ignored_summary] if loaded.ignored_summary else [])],
        "weights_key": loaded.weights_key or settings.weights_key,
        "parameter_count": problem.dim,
        "parameter_total": problem.total_parameters,
        "frozen_parameter_count": problem.frozen_parameters,
        "parameters": problem.describe_parameters(),
        "params": settings.params,
        "sample_count": summary.samples,
        "batch_size": settings.batch_size,
        "device": str(target),
        "estimator_plugin": spec.plugin,
        "estimator_plugin_version": {p.name: p.version for p in loaded_plugins()}.get(spec.plugin, ""),
        "curvkit_version": __version__,
        "torch_version": torch.__version__,
    }
    run_id = make_run_id(checkpoint, estimator, key)
    seconds = time.perf_counter() - started
    precise = lambda: curvature(estimator, problem.to(torch.float64), **options)  # noqa: E731
    return PreparedAnalysis(operator, problem, run_id, key, provenance, reference, other, seconds, precise)


# ----------------------------------------------------------------------------- checkpoints
def expand_checkpoints(arguments: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Checkpoint arguments (files, folders, globs) to the files they name, in order.

    Files named explicitly keep the order they are given in. A folder stands
    for every file in it that curvkit reads (:func:`curvkit.checkpoints.is_checkpoint`:
    every format, plugins' included), and a glob for the files it matches; the
    files of one folder or glob are in natural order (``step-9`` before
    ``step-10``), so a folder of checkpoints forms a trajectory. A file named
    twice is analysed once, where it first appears.

    Raises:
        CurvkitError: An argument names no file.
    """
    found: list[Path] = []
    for argument in arguments:
        path = Path(argument)
        text = os.fspath(argument)
        if path.is_dir() and not _checkpoints.is_checkpoint(path):  # a folder a plugin reads is one
            matches = sorted(_checkpoints.find_checkpoints(path), key=_natural_key)
            if not matches:
                raise CurvkitError(f"no checkpoint file in the folder {text!r}")
        elif path.exists():
            matches = [path]
        elif any(ch in text for ch in "*?["):
            hits = [Path(p) for p in glob.glob(text)]
            found_here = [p for p in hits if p.is_file() or _checkpoints.is_checkpoint(p)]
            matches = sorted(found_here, key=_natural_key)
        else:
            matches = []
        if not matches:
            raise CurvkitError(f"no checkpoint file at {text!r}; check the path")
        found += matches
    unique: dict[str, Path] = {}
    for p in found:
        unique.setdefault(os.path.realpath(p), p)
    return list(unique.values())


def _natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", str(path))]


# ----------------------------------------------------------------------------- the runs
@dataclass
class RunOutcome:
    """One checkpoint analysed with one estimator: what :func:`analyze` did.

    Attributes:
        checkpoint: The checkpoint file.
        estimator: The estimator's name.
        index: Position of the checkpoint in the trajectory.
        run_id: The run's id in the results file (``None`` if none was written).
        status: ``"pending"``, ``"running"``, ``"complete"`` or ``"failed"``.
        error: One line, for a failed run.
        parameters: What was differentiated (``"P=3,466"``, or
            ``"P=264,450 of 462,594: 198,144 frozen"``).
        keys: The run's analyses, in plan order.
        resumed: The analyses found finished in the file and reused.
        results: Every analysis's result, by key (computed or read back).
        notes: What loading the checkpoint noted (ignored entries, stripped prefixes).
    """

    checkpoint: Path
    estimator: str
    index: int
    run_id: str | None = None
    status: str = "pending"
    error: str | None = None
    parameters: str = ""
    keys: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class AnalyzeEvent:
    """What :func:`analyze` reports to its ``progress`` callback as it works.

    Attributes:
        kind: ``"run-started"`` (``run`` has its keys and resumed analyses),
            ``"counters"`` (an analysis's counters: products, residual...),
            ``"result"`` (an analysis was computed and stored), or
            ``"run-finished"`` (``run.status`` says how).
        run: The run it is about.
        key: The analysis (``"counters"`` and ``"result"``).
        counters: The analysis's counters (``"counters"``).
        seconds: Time the analysis took (``"result"``).
        peak_memory_bytes: The peak memory allocated on the device while it
            ran (``"result"``; ``None`` on the CPU, see :mod:`curvkit.memory`).
    """

    kind: str
    run: RunOutcome
    key: str | None = None
    counters: Mapping[str, Any] | None = None
    seconds: float | None = None
    peak_memory_bytes: int | None = None


@dataclass
class AnalyzeReport:
    """What :func:`analyze` did: the results file and every run."""

    output: Path
    runs: list[RunOutcome]

    @property
    def failed(self) -> list[RunOutcome]:
        """The runs that failed (bad checkpoints skipped with ``skip_bad`` included)."""
        return [run for run in self.runs if run.status == "failed"]


def analyze(
    checkpoints: Sequence[str | os.PathLike[str]],
    *,
    output: str | os.PathLike[str] = "results.h5",
    plan: AnalysisPlan = AnalysisPlan(),  # noqa: B008 - frozen, never mutated
    settings: ProblemSettings = ProblemSettings(),  # noqa: B008 - frozen, never mutated
    estimators: Sequence[str] = ("hessian",),
    estimator_options: Mapping[str, Any] | None = None,
    skip_bad: bool = False,
    command_line: str | None = None,
    progress: Callable[[AnalyzeEvent], None] | None = None,
) -> AnalyzeReport:
    """Analyse checkpoints (a trajectory) and store every result in one HDF5 file.

    Every checkpoint is validated before the file is opened for writing (see the
    module documentation); each analysis is written as soon as it finishes, so an
    interrupted call loses nothing finished, and calling again with the same
    arguments resumes.

    In a data-parallel run (every process of a :mod:`torch.distributed` group
    calling it alike, e.g. under ``torchrun``; see :mod:`curvkit.distributed`)
    each process analyses its shard of the data, every product is reduced over
    the processes, and process 0 alone writes the file and reports ``progress``;
    the others learn from it what a resumed run holds.

    Args:
        checkpoints: Files, folders and globs (:func:`expand_checkpoints`).
        output: The HDF5 results file (created, or appended to).
        plan: What to compute on each operator.
        settings: Model, data, loss, precision and device.
        estimators: Registered estimator names: one run per checkpoint and
            estimator (a name given twice runs once). With ``plan.compare_to``
            among them, its run comes first for each checkpoint.
        estimator_options: Keyword options of the estimators (and of the
            baseline), addressed to every estimator that takes them (``"seed"``)
            or to one (``"fisher.seed"``): see :func:`resolve_estimator_options`.
        skip_bad: Analyse the good checkpoints when some are bad (or fail during
            their analysis), recording each bad one as a failed run; otherwise a
            bad checkpoint stops the call before anything is written.
        command_line: The command, recorded in each new run's provenance.
        progress: Called with an :class:`AnalyzeEvent` as runs start, analyses
            report counters, results are stored and runs finish. An exception
            it raises (``KeyboardInterrupt`` from a signal handler) stops the
            call, marking the run ``failed`` with the error ``interrupted``.

    Returns:
        An :class:`AnalyzeReport` (check :attr:`AnalyzeReport.failed` with ``skip_bad``).

    Raises:
        CurvkitError: Bad options, a bad checkpoint (all of them named), an
            unusable results file, or an analysis that failed.
    """
    from curvkit.registry import get_estimator
    from curvkit.store import ResultsStore

    ResultsStore.check_path(output)
    names = list(dict.fromkeys(estimators))
    if not names:
        raise CurvkitError("no estimator given: name one with --curvature (curvkit plugins lists them)")
    baseline = plan.compare_to
    if baseline is not None:
        try:
            get_estimator(baseline)
        except UnknownEstimatorError as exc:
            raise UnknownEstimatorError(f"--compare-to: {exc}") from None
        if names == [baseline]:
            raise CurvkitError(
                f"--compare-to {baseline} compares the other estimators with {baseline}, but the only "
                f"estimator is {baseline}: add others with --curvature"
            )
    options = resolve_estimator_options(
        [*names, *([baseline] if baseline is not None and baseline not in names else [])], estimator_options
    )
    paths = expand_checkpoints(checkpoints)
    cache = _DataCache()
    order = sorted(names, key=lambda name: name != baseline)  # the baseline's run first: the others reuse it
    targets = [RunOutcome(path, estimator, index) for index, path in enumerate(paths) for estimator in order]

    def prepare(run: RunOutcome) -> PreparedAnalysis:
        return prepare_analysis(
            run.checkpoint,
            estimator=run.estimator,
            estimator_options=options[run.estimator],
            settings=settings,
            seed=plan.seed,
            baseline=baseline,
            baseline_options=options.get(baseline) if baseline is not None else None,
            _data=cache,
        )

    kept: PreparedAnalysis | None = None  # the first one is analysed next: not loaded twice
    keys: dict[int, dict[str, Any]] = {}
    failures: dict[int, CurvkitError] = {}
    for i, run in enumerate(targets):
        try:
            prepared = prepare(run)
            # once per run: one prepared again below has the same key (checkpoint, parameters, data and
            # settings), hence the same P and N, and run_checked_plan does not check it again; N is the
            # count of the data's summary (made with its fingerprint), not another pass over the data
            plan.check_dimension(prepared.problem.dim, prepared.provenance["sample_count"])
        except CurvkitError as exc:
            failures[i] = exc
            continue
        keys[i] = prepared.key
        if kept is None:
            kept = prepared
    if failures and not skip_bad:
        _raise_bad(targets, failures)

    extra = {} if command_line is None else {"command_line": command_line}
    shared: dict[str, Any] = {}  # the baseline's results on the current checkpoint
    first = distributed.process()[0] == 0  # in a data-parallel run, process 0 writes and reports
    progress = progress if first else None
    with ResultsStore(output) if first else _OtherProcessStore() as store:
        for i, run in enumerate(targets):
            if i == 0 or run.index != targets[i - 1].index:
                shared = {}
            if i in failures:
                _record_bad(store, run, str(failures[i]), extra, progress)
                continue
            try:
                prepared = kept if kept is not None and kept.key == keys[i] else prepare(run)
                kept = None
                if prepared.key != keys[i]:
                    raise CurvkitError(f"{run.checkpoint} changed while curvkit analyze was running")
                compared = None
                if prepared.baseline is not None:
                    other = prepared.baseline
                    compared = Baseline(baseline, options[baseline], lambda other=other: other, shared)
                _analyze_one(store, prepared, run, plan, {**prepared.provenance, **extra}, progress, compared)
                if run.estimator == baseline:
                    shared.update(run.results)
            except CurvkitError as exc:
                if not skip_bad:
                    raise
                if run.run_id is None:  # failed before its run was begun
                    _record_bad(store, run, str(exc), extra, progress)
    return AnalyzeReport(Path(output), targets)


class _OtherRecord:
    """The run record of a process other than process 0 in a data-parallel :func:`analyze`: writes nothing.

    Process 0 alone opens the results file and writes; the other processes
    compute the same analyses (every product is a collective) and learn what a
    resumed run already holds from process 0 (:func:`curvkit.distributed.broadcast_object`).
    """

    def has(self, key: str, request: Mapping[str, Any] | None = None) -> bool:
        return False

    def write(self, key: str, result: Any, *, request: Mapping[str, Any] | None = None) -> None:
        pass

    def write_timing(self, key: str, seconds: float, peak_memory_bytes: int | None = None) -> None:
        pass

    def finish(self, status: str = "complete", error: str | None = None) -> None:
        pass


class _OtherProcessStore:
    """The results store of a process other than process 0 (see :class:`_OtherRecord`)."""

    def __enter__(self) -> _OtherProcessStore:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def begin_run(self, run_id: str, provenance: Any = None, **options: Any) -> _OtherRecord:
        return _OtherRecord()


def _raise_bad(targets: list[RunOutcome], failures: dict[int, CurvkitError]) -> None:
    """Refuse the whole command, naming every bad checkpoint and why (its first reason)."""
    if len(targets) == 1:
        raise failures[0]
    reasons: dict[Path, str] = {}
    for i, exc in failures.items():
        run = targets[i]
        reasons.setdefault(run.checkpoint, f"{run.checkpoint} [{run.estimator}]: {exc}")
    raise CurvkitError(
        f"{len(failures)} of {len(targets)} runs cannot be analysed, so nothing was: "
        f"{'; '.join(reasons.values())}; fix or remove them, or pass --skip-bad to analyse the others"
    )


def _record_bad(
    store: Any,
    run: RunOutcome,
    error: str,
    extra: Mapping[str, Any],
    progress: Callable[[AnalyzeEvent], None] | None,
) -> None:
    """A failed run for a checkpoint that could not be prepared (``skip_bad``).

    Its key holds only what is known without loading it: the path and the
    estimator, marked ``validation_failed``.
    """
    from curvkit.store import make_run_id

    key = {
        "checkpoint": os.path.abspath(run.checkpoint),
        "estimator": run.estimator,
        "validation_failed": True,
    }
    run.run_id = make_run_id(run.checkpoint, run.estimator, key)
    provenance = {"checkpoint": str(run.checkpoint), "estimator": run.estimator, **extra}
    record = store.begin_run(run.run_id, provenance, key=key, index=run.index)
    _fail(record, run, error, progress)


def _fail(record: Any, run: RunOutcome, error: str, progress: Callable[[AnalyzeEvent], None] | None) -> None:
    record.finish("failed", error=error)
    run.status, run.error = "failed", one_line(error)
    if progress is not None:
        progress(AnalyzeEvent("run-finished", run))


def _analyze_one(
    store: Any,
    prepared: PreparedAnalysis,
    run: RunOutcome,
    plan: AnalysisPlan,
    provenance: dict[str, Any],
    progress: Callable[[AnalyzeEvent], None] | None,
    baseline: Baseline | None = None,
) -> None:
    """Begin (or resume) one run, compute what it lacks, store each result at once.

    Anything that stops the run once it is begun, its resumption included, is the
    run's failed attempt (``"interrupted"`` for Ctrl-C), recorded with its error.
    The caller's bad input is refused before: :func:`analyze` prepares every run
    and checks the plan against its parameters and samples (:meth:`AnalysisPlan.check_dimension`)
    before it opens the results file.
    """
    operator = prepared.operator
    record = store.begin_run(prepared.run_id, provenance, key=prepared.key, index=run.index)
    run.run_id, run.status = prepared.run_id, "running"
    try:
        record.write_timing("prepare", prepared.seconds)
        run.parameters = prepared.problem.describe_parameters()
        run.notes = list(provenance.get("checkpoint_notes") or [])
        run.keys = plan.keys(psd=bool(getattr(operator, "PSD", False)), estimator=run.estimator)
        requests = {key: plan.request(key) for key in run.keys}
        if baseline is not None:  # the comparison depends on the baseline's options too
            requests[f"compare/{baseline.name}"]["baseline_options"] = dict(baseline.options)
        run.resumed = [key for key in run.keys if record.has(key, requests[key])]
        run.results = {key: record.read(key) for key in run.resumed}
        run.resumed, run.results = distributed.broadcast_object((run.resumed, run.results))  # process 0's
        if progress is not None:
            progress(AnalyzeEvent("run-started", run))

        def on_result(key: str, result: Any, seconds: float, peak_memory_bytes: int | None) -> None:
            record.write(key, result, request=requests[key])
            record.write_timing(key, seconds, peak_memory_bytes)
            run.results[key] = result
            if progress is not None:
                event = AnalyzeEvent(
                    "result", run, key=key, seconds=seconds, peak_memory_bytes=peak_memory_bytes
                )
                progress(event)

        def on_counters(key: str, counters: dict[str, Any]) -> None:
            if progress is not None:
                progress(AnalyzeEvent("counters", run, key=key, counters=counters))

        run_checked_plan(  # the plan was checked against the run before the file was opened
            operator,
            plan,
            done=set(run.resumed),
            known=run.results,
            reference=prepared.reference,
            baseline=baseline,
            precise=prepared.precise,
            on_result=on_result,
            progress=on_counters,
        )
    except CurvkitError as exc:
        _fail(record, run, str(exc), progress)
        raise
    except BaseException as exc:  # Ctrl-C included ("interrupted")
        _fail(record, run, describe_error(exc), None)
        raise
    record.finish("complete")
    run.status = "complete"
    if progress is not None:
        progress(AnalyzeEvent("run-finished", run))


# ----------------------------------------------------------------------------- trajectories
_PER_CHECKPOINT = ("checkpoint", "checkpoint_sha256")
"""Key entries in which the runs of one trajectory differ."""

_PER_CHECKPOINT_PROVENANCE = (
    *_PER_CHECKPOINT,
    "checkpoint_format",
    "checkpoint_info",
    "checkpoint_notes",
    "command_line",
    "curvkit_version",
    "torch_version",
)
"""Provenance entries that differ between checkpoints (for runs stored without a key)."""

STEP_KEYS = ("global_step", "step", "iteration", "epoch")
"""Entries of a checkpoint dict that place it in training, most precise first."""


@dataclass(frozen=True)
class Trajectory:
    """Runs that differ in their checkpoint alone, in training order.

    Attributes:
        runs: The runs (:class:`curvkit.store.Run`), ordered by ``positions`` when
            known, else by their index in the command that analysed them.
        positions: Each checkpoint's training step or epoch, when every checkpoint
            records the same one (``None`` otherwise).
        xlabel: What the positions are (``"step"``, ``"epoch"``), or ``"checkpoint"``.
        labels: The checkpoints' file names.
        title: What the runs share: estimator, data, loss, dtype.
    """

    runs: list[Any]
    positions: list[float] | None
    xlabel: str
    labels: list[str]
    title: str


def _shared_key(run: Any) -> str:
    import json

    key = run.key
    if key is not None:
        shared = {k: v for k, v in key.items() if k not in _PER_CHECKPOINT}
    else:
        shared = {k: v for k, v in run.provenance.items() if k not in _PER_CHECKPOINT_PROVENANCE}
    return json.dumps(shared, sort_keys=True, default=str)


def _positions(runs: list[Any]) -> tuple[list[float] | None, str]:
    infos = [run.provenance.get("checkpoint_info") or {} for run in runs]
    for name in STEP_KEYS:
        values = [info.get(name) for info in infos]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            return [float(v) for v in values], name.replace("global_", "")
    return None, "checkpoint"


def trajectories(runs: Sequence[Any]) -> list[Trajectory]:
    """Group the runs of a results file into trajectories: same settings, other checkpoints.

    Two runs belong to one trajectory when their keys (:func:`run_key`) differ in
    the checkpoint (path and content) alone; so a file holding one trajectory
    analysed with two estimators, or with two seeds, gives two trajectories, and
    runs that failed or hold nothing are left out. Groups of one run are not
    trajectories.

    Args:
        runs: Runs of a :class:`curvkit.store.ResultsStore`.
    """
    groups: dict[str, list[Any]] = {}
    for run in runs:
        if run.analyses():
            groups.setdefault(_shared_key(run), []).append(run)
    found = []
    for group in groups.values():
        if len(group) < 2:
            continue
        positions, xlabel = _positions(group)
        if positions is not None:
            order = sorted(range(len(group)), key=lambda i: positions[i])
            group, positions = [group[i] for i in order], [positions[i] for i in order]
        prov = group[0].provenance
        title = (
            f"{prov.get('estimator', '?')} on {prov.get('data', '?')} ({prov.get('loss', '?')}, "
            f"{prov.get('dtype', '?')}, seed {prov.get('seed', '?')})"
        )
        labels = [Path(str(run.provenance.get("checkpoint", run.run_id))).name for run in group]
        found.append(Trajectory(group, positions, xlabel, labels, title))
    return found
