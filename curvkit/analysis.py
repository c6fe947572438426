"""The analyses of ``curvkit analyze``, as a library: a plan and its runner.

An :class:`AnalysisPlan` says what to compute on a curvature operator; its
:meth:`~AnalysisPlan.keys` name each analysis (``"eigen/largest"``,
``"trace/hutch++"``, ``"density/slq"``, ``"checks/symmetry"``, ``"per_layer/module"``...),
the ``kind/name`` keys of :mod:`curvkit.store`.
:func:`run_plan` computes them in that order and hands each result to
``on_result`` as soon as it is finished, so a caller can store it at once; keys
in ``done`` are skipped, which is how an interrupted run resumes.
"""

from __future__ import annotations

import glob
import re
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from curvkit import checks
from curvkit.errors import CurvkitError
from curvkit.linalg._common import Progress
from curvkit.linalg.eigen import eigenvalues
from curvkit.linalg.per_layer import per_layer
from curvkit.linalg.slq import density
from curvkit.linalg.trace import METHODS as TRACE_METHODS
from curvkit.linalg.trace import trace

__all__ = [
    "AnalysisPlan",
    "PreparedAnalysis",
    "expand_checkpoints",
    "prepare_analysis",
    "resolve_device",
    "run_plan",
]


@dataclass(frozen=True)
class AnalysisPlan:
    """What to compute on one operator.

    Attributes:
        top_k: Largest eigenpairs (0: none).
        bottom_k: Smallest eigenpairs (0: none).
        trace: Trace method (``None``: none), see :func:`curvkit.trace`.
        trace_matvecs: Products for a stochastic trace.
        density: Compute the SLQ spectral density.
        density_steps: Lanczos steps per SLQ run.
        density_runs: SLQ runs.
        check: Run the eigenvalue checks (residuals, symmetry, PSD if claimed,
            agreement with a dense reference when one is given).
        per_layer: Tabulate top eigenvalue and trace per layer.
        tol: Relative residual tolerance of the eigenpairs.
        seed: Seed of every random start vector and probe.
    """

    top_k: int = 5
    bottom_k: int = 0
    trace: str | None = "hutch++"
    trace_matvecs: int = 99
    density: bool = True
    density_steps: int = 60
    density_runs: int = 3
    check: bool = False
    per_layer: bool = False
    tol: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.top_k < 0 or self.bottom_k < 0:
            raise CurvkitError("top-k and bottom-k must be 0 or more")
        if self.trace is not None and self.trace not in TRACE_METHODS:
            raise CurvkitError(f"unknown trace method {self.trace!r}; use one of {list(TRACE_METHODS)}")

    def keys(self, psd: bool = False, reference: bool = False) -> list[str]:
        """The analyses of this plan, in the order they run."""
        keys = []
        if self.top_k:
            keys.append("eigen/largest")
        if self.bottom_k:
            keys.append("eigen/smallest")
        if self.trace:
            keys.append(f"trace/{self.trace}")
        if self.density:
            keys.append("density/slq")
        if self.check:
            keys += ["checks/symmetry"]
            keys += ["checks/residuals"] if self.top_k else []
            keys += ["checks/psd"] if psd else []
            keys += ["checks/agreement"] if reference and self.top_k else []
        if self.per_layer:
            keys.append("per_layer/module")
        return keys

    def request(self, key: str) -> dict[str, Any]:
        """The options that determine the result of analysis ``key`` under this plan.

        A stored result is reused on resume only when it was made with the same
        request: asking for ``--top-k 10`` after a run with ``--top-k 5`` recomputes
        ``eigen/largest`` instead of returning the five stored pairs.
        """
        seed, tol = self.seed, self.tol
        kind, _, name = key.partition("/")
        if key == "eigen/largest":
            return {"k": self.top_k, "which": "largest", "tol": tol, "seed": seed}
        if key == "eigen/smallest":
            return {"k": self.bottom_k, "which": "smallest", "tol": tol, "seed": seed}
        if kind == "trace":
            return {"method": name, "matvecs": self.trace_matvecs, "seed": seed}
        if key == "density/slq":
            return {"steps": self.density_steps, "runs": self.density_runs, "seed": seed}
        if key in ("checks/residuals", "checks/agreement"):
            return {"k": self.top_k, "tol": tol, "seed": seed}
        if kind == "checks":
            return {"seed": seed}
        if key == "per_layer/module":
            return {"tol": tol, "seed": seed}
        raise CurvkitError(f"no analysis {key!r} in a plan")


def run_plan(
    op: Any,
    plan: AnalysisPlan,
    *,
    done: Collection[str] = (),
    reference: Callable[[], Tensor] | None = None,
    on_result: Callable[[str, Any, float], None] | None = None,
    progress: Callable[[str, dict], None] | None = None,
) -> dict[str, Any]:
    """Run a plan on an operator; report each result as soon as it is finished.

    Args:
        op: The curvature operator.
        plan: What to compute.
        done: Keys already computed (skipped: resume).
        reference: Returns the dense reference matrix for ``checks/agreement``.
        on_result: Called as ``on_result(key, result, seconds)`` after each analysis.
        progress: Called as ``progress(key, counters)`` during long analyses.

    Returns:
        The results computed in this call, by key.
    """
    results: dict[str, Any] = {}

    def report(key: str) -> Progress | None:
        return None if progress is None else (lambda counters: progress(key, counters))

    def step(key: str, compute: Callable[[], Any]) -> None:
        if key in done:
            return
        start = time.perf_counter()
        result = compute()
        results[key] = result
        if on_result is not None:
            on_result(key, result, time.perf_counter() - start)

    seed, tol = plan.seed, plan.tol
    keys = plan.keys(psd=bool(getattr(op, "PSD", False)), reference=reference is not None)
    for key in keys:
        if key == "eigen/largest":
            step(key, lambda key=key: eigenvalues(op, k=plan.top_k, tol=tol, seed=seed, progress=report(key)))
        elif key == "eigen/smallest":
            step(
                key,
                lambda key=key: eigenvalues(
                    op, k=plan.bottom_k, which="smallest", tol=tol, seed=seed, progress=report(key)
                ),
            )
        elif key.startswith("trace/"):
            step(
                key,
                lambda key=key: trace(
                    op, method=plan.trace, matvecs=plan.trace_matvecs, seed=seed, progress=report(key)
                ),
            )
        elif key == "density/slq":
            step(
                key,
                lambda key=key: density(
                    op, steps=plan.density_steps, runs=plan.density_runs, seed=seed, progress=report(key)
                ),
            )
        elif key == "checks/symmetry":
            step(key, lambda: checks.check_symmetry(op, seed=seed))
        elif key == "checks/residuals":
            step(key, lambda: checks.check_residuals(op, _eigen(op, plan, results), tol=tol))
        elif key == "checks/psd":
            step(key, lambda: checks.check_psd(op, seed=seed))
        elif key == "checks/agreement":
            step(
                key,
                lambda: checks.check_agreement(op, reference(), k=min(plan.top_k, op.shape[0]), seed=seed),
            )
        elif key == "per_layer/module":
            step(key, lambda key=key: per_layer(op, tol=tol, seed=seed, progress=report(key)))
    return results


def _eigen(op: Any, plan: AnalysisPlan, results: dict[str, Any]) -> Any:
    """The top eigenpairs of this call, or recomputed (with vectors) when resumed."""
    found = results.get("eigen/largest")
    if found is not None and found.vectors is not None:
        return found
    return eigenvalues(op, k=plan.top_k, tol=plan.tol, seed=plan.seed)


@dataclass
class PreparedAnalysis:
    """A checkpoint made ready for analysis: its operator, problem and provenance.

    Attributes:
        operator: The curvature operator of the estimator.
        problem: The :class:`~curvkit.Problem`.
        provenance: Where the results come from (see ``docs/hdf5-schema.md``).
        reference: Returns the dense exact Hessian for ``checks/agreement``, or
            ``None`` when the problem is too large for a dense reference.
    """

    operator: Any
    problem: Any
    provenance: dict[str, Any]
    reference: Callable[[], Tensor] | None


def resolve_device(device: str) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"`` as a device.

    Raises:
        CurvkitError: CUDA is asked for but not available, or the name is unknown.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CurvkitError("--device cuda asked for, but no CUDA device is available; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise CurvkitError(f"unknown device {device!r}; use auto, cpu or cuda") from exc


DTYPES = {"float32": torch.float32, "float64": torch.float64}


def prepare_analysis(
    checkpoint: str | Path,
    *,
    estimator: str = "hessian",
    estimator_options: dict[str, Any] | None = None,
    model: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    data: str | None = None,
    loss: str | None = None,
    batch_size: int = 1024,
    max_samples: int | None = None,
    device: str = "auto",
    dtype: str = "float32",
    trust_pickle: bool = False,
    reference_max_dim: int = 2000,
) -> PreparedAnalysis:
    """Load a checkpoint, its data and loss, and build the estimator's operator.

    What the command line does not give comes from the checkpoint's curvkit
    metadata (``model_factory``, ``model_kwargs``, ``data``, ``loss``; see
    :func:`curvkit.checkpoints.save_checkpoint`).

    Raises:
        CurvkitError: Anything that makes the checkpoint, data or loss unusable,
            with a one-line message.
    """
    from curvkit import checkpoints, datasets
    from curvkit.problem import Problem
    from curvkit.registry import curvature

    if dtype not in DTYPES:
        raise CurvkitError(f"unknown dtype {dtype!r}; use one of {list(DTYPES)}")
    target = resolve_device(device)
    loaded = checkpoints.load_checkpoint(
        checkpoint, model_factory=model, model_kwargs=model_kwargs, trust_pickle=trust_pickle
    )
    meta = loaded.metadata or {}
    data_spec = data or meta.get("data")
    if not data_spec:
        raise CurvkitError(f"{checkpoint}: no --data given and the checkpoint names no data set")
    loss_name = loss or meta.get("loss") or "cross_entropy"
    net = loaded.model.to(device=target, dtype=DTYPES[dtype])
    problem = Problem(
        net, loss_name, datasets.load_data_spec(data_spec), batch_size=batch_size, max_samples=max_samples
    )
    options = dict(estimator_options or {})
    operator = curvature(estimator, problem, **options)
    reference = None
    if problem.dim <= reference_max_dim:
        reference = lambda: curvature("exact-hessian", problem).to_dense()  # noqa: E731
    import curvkit

    provenance = {
        "checkpoint": str(Path(checkpoint)),
        "checkpoint_sha256": loaded.sha256,
        "checkpoint_format": loaded.format,
        "model": model or meta.get("model_factory") or type(net).__name__,
        "model_kwargs": model_kwargs if model_kwargs is not None else meta.get("model_kwargs"),
        "parameter_count": problem.dim,
        "data": str(data_spec),
        "sample_count": problem.num_samples(),
        "loss": loss_name,
        "estimator": estimator,
        "estimator_options": options,
        "dtype": dtype,
        "device": str(target),
        "batch_size": batch_size,
        "max_samples": max_samples,
        "curvkit_version": curvkit.__version__,
        "torch_version": torch.__version__,
    }
    return PreparedAnalysis(operator, problem, provenance, reference)


def expand_checkpoints(patterns: Sequence[str]) -> list[Path]:
    """Paths and globs to existing checkpoint files, in natural sort order.

    A directory stands for the checkpoint files in it (``*.pt``, ``*.pth``,
    ``*.ckpt``, ``*.safetensors``, ``*.pt2``). Natural order sorts ``step-9``
    before ``step-10``, so a folder of checkpoints forms a trajectory.

    Raises:
        CurvkitError: A path or pattern matches no file.
    """
    suffixes = {".pt", ".pth", ".ckpt", ".safetensors", ".pt2", ".bin"}
    found: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if any(ch in pattern for ch in "*?["):
            matches = [Path(p) for p in glob.glob(pattern)]
        elif path.is_dir():
            matches = [p for p in path.iterdir() if p.suffix in suffixes]
        else:
            matches = [path] if path.exists() else []
        if not matches:
            raise CurvkitError(f"no checkpoint file at {pattern!r}; check the path")
        found += sorted(matches, key=_natural_key)
    return sorted(dict.fromkeys(found), key=_natural_key)


def _natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", str(path))]
