"""The analyses of ``curvkit analyze`` on one operator: a plan and its runner.

An :class:`AnalysisPlan` says what to compute on a curvature operator; its
:meth:`~AnalysisPlan.keys` name each analysis (``"eigen/largest"``,
``"trace/hutch++"``, ``"density/slq"``, ``"checks/symmetry"``, ``"per_layer/module"``,
``"compare/hessian"``...), the ``kind/name`` keys of :mod:`curvkit.store`.
:func:`run_plan` computes them in that order and hands each result to
``on_result`` as soon as it is finished, so a caller can store it at once; keys
in ``done`` are skipped, which is how an interrupted run resumes.
:mod:`curvkit.runs` turns checkpoints into operators and stores the results.

Two analyses look beyond the operator:

* ``checks/agreement`` compares its top-k eigenpairs with its
  :class:`Reference`: for a registered estimator, the estimator its spec names
  as reference (:attr:`curvkit.EstimatorSpec.reference`) on a float64 copy of
  the problem, solved by Lanczos to :data:`REFERENCE_TOL` (``O(k)`` products,
  never a dense matrix); see :func:`estimator_reference`.
* ``compare/<baseline>`` (``AnalysisPlan(compare_to=...)``) measures how far it is
  from another estimator, its :class:`Baseline`, on the same problem
  (:mod:`curvkit.comparison`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from curvkit import checks
from curvkit.comparison import ComparisonResult, compare_spectra
from curvkit.errors import CurvkitError
from curvkit.linalg._common import Progress, staged
from curvkit.linalg.eigen import EigenResult, eigenvalues
from curvkit.linalg.lanczos import REORTHOGONALISATION
from curvkit.linalg.per_layer import per_layer
from curvkit.linalg.slq import density
from curvkit.linalg.trace import METHODS as TRACE_METHODS
from curvkit.linalg.trace import trace

__all__ = [
    "DENSE_REFERENCE_MAX_DIM",
    "REFERENCE_TOL",
    "AnalysisPlan",
    "Baseline",
    "Reference",
    "estimator_reference",
    "run_plan",
]

REFERENCE_TOL = 1e-10
"""Relative residual tolerance of the float64 reference solve of ``checks/agreement``."""

DENSE_REFERENCE_MAX_DIM = 2000
"""Largest number of parameters for which a callable reference's dense matrix is built.

A callable reference (``EstimatorSpec(reference=function)``) returns a dense
``[P, P]`` matrix: 32 MB at ``P = 2000`` in float64, and typically ``P`` products
to build. Above this size the agreement check is not done, and says so."""


@dataclass(frozen=True)
class Reference:
    """What ``checks/agreement`` compares an estimator with, or why there is nothing to.

    Attributes:
        label: What the reference is (``"hessian in float64"``), for the check's detail.
        build: Returns it: an operator, solved by Lanczos to :data:`REFERENCE_TOL`,
            or a dense ``[P, P]`` tensor. ``None``: there is none.
        reason: Why there is none; the check is then stored as not done
            (``passed=None``) with this reason, never as passed.
    """

    label: str = ""
    build: Callable[[], Any] | None = None
    reason: str = ""


def estimator_reference(
    spec: Any, problem: Any, *, max_dense_dim: int = DENSE_REFERENCE_MAX_DIM
) -> Reference:
    """The reference of a registered estimator on a problem (built lazily: :attr:`Reference.build`).

    * ``spec.reference`` names an estimator: that estimator with
      ``spec.reference_options`` on a float64 copy of ``problem``
      (:meth:`curvkit.Problem.to`), solved by Lanczos: ``O(k)`` products.
    * A callable: its dense matrix of the float64 copy, when
      ``problem.dim <= max_dense_dim``.
    * Otherwise, or when the named reference is not registered or refuses the
      options (a plugin's mistake, not the user's), none, with the reason, which
      the agreement check reports instead of a result.

    Args:
        spec: The estimator's :class:`~curvkit.EstimatorSpec`.
        problem: The problem it is analysed on.
        max_dense_dim: Largest ``P`` for a dense reference.
    """
    from curvkit.registry import check_options, curvature, get_estimator

    target = spec.reference
    if target is None:
        return Reference(reason=f"estimator {spec.name!r} declares no reference (EstimatorSpec.reference)")
    if isinstance(target, str):
        options = dict(spec.reference_options or {})
        try:
            check_options(get_estimator(target), options)
        except CurvkitError as exc:
            return Reference(reason=f"the reference of {spec.name!r} cannot be used: {exc}")
        described = ", ".join(f"{k}={v!r}" for k, v in options.items())
        label = f"{target}({described}) in float64" if described else f"{target} in float64"
        return Reference(label, lambda: curvature(target, problem.to(torch.float64), **options))
    name = getattr(target, "__qualname__", type(target).__name__)
    if problem.dim > max_dense_dim:
        return Reference(
            reason=f"the reference of {spec.name!r} ({name}) is a dense matrix, built only up to "
            f"P={max_dense_dim:,} parameters (this problem has P={problem.dim:,})"
        )
    return Reference(f"the dense matrix of {name} in float64", lambda: target(problem.to(torch.float64)))


@dataclass
class Baseline:
    """The estimator that ``compare/<name>`` measures an operator against, on the same problem.

    Attributes:
        name: The baseline estimator's registered name.
        options: Its options (part of the comparison's request).
        build: Returns the baseline's operator on the analysed operator's problem.
        results: The baseline's results on this problem already at hand, by
            analysis key (``"eigen/largest"``, ``"trace/<method>"``), computed
            under the same plan: its own run's in the same command, or an earlier
            comparison's. A comparison reuses what fits (eigenpairs need their
            vectors) and adds the baseline results it computes, so that the
            next estimator compared on the same checkpoint reuses them.
    """

    name: str
    options: Mapping[str, Any]
    build: Callable[[], Any]
    results: dict[str, Any] = field(default_factory=dict)


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
            agreement of the top-k eigenpairs with the estimator's reference).
        per_layer: Tabulate top eigenvalue and trace per layer.
        tol: Relative residual tolerance of the eigenpairs.
        seed: Seed of every random start vector and probe.
        max_matvecs: Budget of products of each eigenpair solve (``None``: the
            solver's default, see :func:`curvkit.eigenvalues`).
        reorthogonalisation: ``"auto"``, ``"full"`` or ``"partial"``, see
            :func:`curvkit.eigenvalues`.
        compare_to: A registered estimator (the baseline): compare every other
            estimator with it (``compare/<compare_to>``): its top-k eigenvalues,
            subspace and trace. Needs ``top_k``.

    Raises:
        CurvkitError: An option out of range, or a plan that computes nothing.
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
    max_matvecs: int | None = None
    reorthogonalisation: str = "auto"
    compare_to: str | None = None

    def __post_init__(self) -> None:
        if self.top_k < 0 or self.bottom_k < 0:
            raise CurvkitError(
                f"--top-k and --bottom-k must be 0 or more, got {self.top_k} and {self.bottom_k}"
            )
        if self.trace is not None and self.trace not in TRACE_METHODS:
            raise CurvkitError(f"unknown trace method {self.trace!r}; use one of {list(TRACE_METHODS)}")
        if not (math.isfinite(self.tol) and self.tol > 0):
            raise CurvkitError(f"--tol must be a positive number, got {self.tol:g}")
        for name, value in (
            ("--trace-matvecs", self.trace_matvecs),
            ("density steps", self.density_steps),
            ("density runs", self.density_runs),
        ):
            if value < 1:
                raise CurvkitError(f"{name} must be at least 1, got {value}")
        if self.max_matvecs is not None and self.max_matvecs < 1:
            raise CurvkitError(f"--max-matvecs must be at least 1, got {self.max_matvecs}")
        if self.reorthogonalisation not in REORTHOGONALISATION:
            raise CurvkitError(
                f"unknown reorthogonalisation {self.reorthogonalisation!r}; use one of "
                f"{list(REORTHOGONALISATION)}"
            )
        if self.compare_to is not None and not self.top_k:
            raise CurvkitError(
                f"--compare-to {self.compare_to} compares the top-k eigenpairs: give --top-k 1 or more"
            )
        if not self.keys():
            raise CurvkitError(
                "no analysis asked for (--top-k 0 and nothing else): ask for --top-k, --bottom-k, "
                "--trace, --density, --check or --per-layer"
            )

    def check_dimension(self, dim: int) -> None:
        """Refuse a plan that asks for more eigenpairs than the operator's dimension ``dim``.

        Raises:
            CurvkitError: ``top_k`` or ``bottom_k`` exceeds ``dim``.
        """
        for name, k in (("--top-k", self.top_k), ("--bottom-k", self.bottom_k)):
            if k > dim:
                raise CurvkitError(f"{name} {k} is larger than the number of parameters analysed, P={dim:,}")

    def keys(self, psd: bool = False, estimator: str | None = None) -> list[str]:
        """The analyses of this plan, in the order they run.

        Args:
            psd: The operator claims to be positive semi-definite (``checks/psd``).
            estimator: The operator's estimator: ``compare/<compare_to>`` is left
                out when it is the baseline itself.
        """
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
            keys += ["checks/agreement"] if self.top_k else []
        if self.per_layer:
            keys.append("per_layer/module")
        if self.compare_to is not None and estimator != self.compare_to:
            keys.append(f"compare/{self.compare_to}")
        return keys

    def request(self, key: str) -> dict[str, Any]:
        """The options that determine the result of analysis ``key`` under this plan.

        A stored result is reused on resume only when it was made with the same
        request: asking for ``--top-k 10`` after a run with ``--top-k 5`` recomputes
        ``eigen/largest`` instead of returning the five stored pairs. The request
        of ``compare/<baseline>`` lacks the baseline's options, which the caller
        adds (``"baseline_options"``, see :class:`Baseline`).
        """
        seed, tol = self.seed, self.tol
        kind, _, name = key.partition("/")
        solver = {"max_matvecs": self.max_matvecs, "reorthogonalisation": self.reorthogonalisation}
        if key == "eigen/largest":
            return {"k": self.top_k, "which": "largest", "tol": tol, "seed": seed, **solver}
        if key == "eigen/smallest":
            return {"k": self.bottom_k, "which": "smallest", "tol": tol, "seed": seed, **solver}
        if kind == "trace":
            return {"method": name, "matvecs": self.trace_matvecs, "seed": seed}
        if key == "density/slq":
            return {"steps": self.density_steps, "runs": self.density_runs, "seed": seed}
        if key == "checks/residuals":
            return {"k": self.top_k, "tol": tol, "seed": seed, **solver}
        if key == "checks/agreement":
            return {"k": self.top_k, "tol": tol, "seed": seed, "reference_tol": REFERENCE_TOL, **solver}
        if kind == "compare" and name == self.compare_to:
            trace = {"trace": self.trace or "hutch++", "trace_matvecs": self.trace_matvecs}
            return {"baseline": name, "k": self.top_k, "tol": tol, "seed": seed, **solver, **trace}
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
    known: Mapping[str, Any] | None = None,
    reference: Reference | None = None,
    baseline: Baseline | None = None,
    on_result: Callable[[str, Any, float], None] | None = None,
    progress: Callable[[str, dict], None] | None = None,
) -> dict[str, Any]:
    """Run a plan on an operator; report each result as soon as it is finished.

    Args:
        op: The curvature operator (its ``name``, set by :func:`curvkit.curvature`,
            tells whether it is the plan's baseline).
        plan: What to compute.
        done: Keys already computed (skipped: resume).
        known: Results already at hand (those of ``done``, read back from a file),
            used as inputs of later analyses where they suffice: a trace for a
            comparison. Eigenpairs read back without vectors are recomputed when
            an analysis needs the vectors.
        reference: The reference of ``checks/agreement`` (see
            :func:`estimator_reference`); without one the check is stored as not
            done, saying why.
        baseline: The baseline of ``compare/<plan.compare_to>``; needed when the
            plan compares and ``op`` is not the baseline.
        on_result: Called as ``on_result(key, result, seconds)`` after each analysis.
        progress: Called as ``progress(key, counters)`` while each analysis works.

    Returns:
        The results computed in this call, by key.

    Raises:
        CurvkitError: The plan compares, ``op`` is not the baseline, and no
            ``baseline`` is given; or an analysis failed.
    """
    results: dict[str, Any] = {}
    at_hand = _AtHand(results, known or {})

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
    keys = plan.keys(psd=bool(getattr(op, "PSD", False)), estimator=getattr(op, "name", None))
    if any(key.startswith("compare/") for key in keys) and baseline is None:
        raise CurvkitError(f"the plan compares with {plan.compare_to!r}, but run_plan was given no baseline")
    for key in keys:
        if key == "eigen/largest":
            step(key, lambda key=key: _eigenpairs(op, plan, plan.top_k, "largest", report(key)))
        elif key == "eigen/smallest":
            step(key, lambda key=key: _eigenpairs(op, plan, plan.bottom_k, "smallest", report(key)))
        elif key.startswith("trace/"):
            step(key, lambda key=key: _trace(op, plan, plan.trace, report(key)))
        elif key == "density/slq":
            step(
                key,
                lambda key=key: density(
                    op, steps=plan.density_steps, runs=plan.density_runs, seed=seed, progress=report(key)
                ),
            )
        elif key == "checks/symmetry":
            step(key, lambda key=key: checks.check_symmetry(op, seed=seed, progress=report(key)))
        elif key == "checks/residuals":
            step(
                key,
                lambda key=key: checks.check_residuals(
                    op, at_hand.eigen(op, plan, report(key)), tol=tol, progress=report(key)
                ),
            )
        elif key == "checks/psd":
            step(key, lambda key=key: _psd(op, plan, report(key)))
        elif key == "checks/agreement":
            step(key, lambda key=key: _agreement(op, plan, reference, at_hand, report(key)))
        elif key == "per_layer/module":
            step(key, lambda key=key: per_layer(op, tol=tol, seed=seed, progress=report(key)))
        elif key.startswith("compare/"):
            step(key, lambda key=key: _compare(op, plan, baseline, at_hand, report(key)))
    return results


def _eigenpairs(op: Any, plan: AnalysisPlan, k: int, which: str, progress: Progress | None = None) -> Any:
    """``k`` eigenpairs at one end of the spectrum, with the plan's solver options."""
    return eigenvalues(
        op,
        k=k,
        which=which,
        tol=plan.tol,
        seed=plan.seed,
        max_matvecs=plan.max_matvecs,
        reorthogonalisation=plan.reorthogonalisation,
        progress=progress,
    )


def _psd(op: Any, plan: AnalysisPlan, progress: Progress | None) -> checks.CheckResult:
    """``checks/psd``: both ends solved to the plan's ``tol``, so the ratio is held to
    :func:`~curvkit.checks.agreement_accuracy` (the extreme eigenvalues are known to
    ``tol * ||A||``, never below half the digits of the operator's precision)."""
    accuracy = checks.agreement_accuracy(plan.tol, op.dtype)
    return checks.check_psd(op, tol=accuracy, eig_tol=plan.tol, seed=plan.seed, progress=progress)


def _trace(op: Any, plan: AnalysisPlan, method: str, progress: Progress | None = None) -> Any:
    """The trace by ``method`` with the plan's budget and seed."""
    return trace(op, method=method, matvecs=plan.trace_matvecs, seed=plan.seed, progress=progress)


@dataclass(frozen=True)
class _AtHand:
    """The results of one run available as inputs of its later analyses: this call's, then ``known``."""

    computed: Mapping[str, Any]
    known: Mapping[str, Any]

    def get(self, key: str) -> Any:
        found = self.computed.get(key)
        return found if found is not None else self.known.get(key)

    def eigen(self, op: Any, plan: AnalysisPlan, progress: Progress | None) -> EigenResult:
        """The top eigenpairs with vectors: the run's own, or recomputed (resumed without vectors)."""
        found = _with_vectors(self.get("eigen/largest"))
        return found if found is not None else _eigenpairs(op, plan, plan.top_k, "largest", progress)


def _with_vectors(result: Any) -> EigenResult | None:
    return result if isinstance(result, EigenResult) and result.vectors is not None else None


def _agreement(
    op: Any, plan: AnalysisPlan, reference: Reference | None, at_hand: _AtHand, progress: Progress | None
) -> checks.CheckResult:
    """``checks/agreement``: the run's top-k pairs against the reference, or why it is not done."""
    if reference is None or reference.build is None:
        reason = "no reference given" if reference is None else reference.reason
        return checks.CheckResult("agreement", None, math.nan, math.nan, f"not checked: {reason}")
    estimate = _with_vectors(at_hand.get("eigen/largest"))
    spent = 0
    if estimate is None:  # resumed: the file keeps no vectors
        estimate = _eigenpairs(op, plan, plan.top_k, "largest", staged(progress, "estimator"))
        spent = estimate.matvecs
    result = checks.check_agreement(
        op,
        reference.build(),
        k=min(plan.top_k, op.shape[0]),
        tol=plan.tol,
        seed=plan.seed,
        estimate=estimate,
        reference_tol=REFERENCE_TOL,
        label=reference.label,
        progress=progress,
    )
    result = replace(result, figures={**result.figures, "matvecs": float(spent)})
    if getattr(op, "STOCHASTIC", False):  # one draw of a Monte-Carlo estimate: the figures inform
        return replace(
            result,
            passed=None,
            threshold=math.nan,
            detail=f"{result.detail}; a Monte-Carlo estimate differs from its reference by sampling "
            "error, so this is no pass/fail (the conformance battery checks the estimator in expectation)",
        )
    return result


def _comparison_trace_method(plan: AnalysisPlan, op: Any, other: Any) -> str:
    """The trace method of a comparison: ``"exact"`` when both operators have a cheap
    diagonal (``CHEAP_DIAGONAL``: no products), else the plan's method (``"hutch++"``
    when it has none), with its budget and seed, so both traces see the same probes."""
    if getattr(op, "CHEAP_DIAGONAL", False) and getattr(other, "CHEAP_DIAGONAL", False):
        return "exact"
    return plan.trace or "hutch++"


_OWNERS = {"estimator": "", "baseline": "baseline "}
"""How :attr:`ComparisonResult.reused` names the inputs of each side."""


def _compare(
    op: Any, plan: AnalysisPlan, baseline: Baseline, at_hand: _AtHand, progress: Progress | None
) -> ComparisonResult:
    """``compare/<baseline>``: reuse what the run and the baseline already have, compute the rest."""
    other = baseline.build()
    method = _comparison_trace_method(plan, op, other)
    trace_key = f"trace/{method}"
    reused: list[str] = []
    spent = {"estimator": 0, "baseline": 0}

    def eigenpairs(owner: str, operator: Any, found: Any) -> EigenResult:
        pairs = _with_vectors(found)
        if pairs is not None:
            reused.append(f"{_OWNERS[owner]}eigenpairs")
            return pairs
        pairs = _eigenpairs(operator, plan, plan.top_k, "largest", staged(progress, f"{owner} eigenpairs"))
        spent[owner] += pairs.matvecs
        return pairs

    def traced(owner: str, operator: Any, found: Any) -> Any:
        if found is not None:
            reused.append(f"{_OWNERS[owner]}trace")
            return found
        result = _trace(operator, plan, method, staged(progress, f"{owner} trace"))
        spent[owner] += result.matvecs
        return result

    mine = eigenpairs("estimator", op, at_hand.get("eigen/largest"))
    theirs = baseline.results["eigen/largest"] = eigenpairs(
        "baseline", other, baseline.results.get("eigen/largest")
    )
    my_trace = traced("estimator", op, at_hand.get(trace_key))
    their_trace = baseline.results[trace_key] = traced("baseline", other, baseline.results.get(trace_key))
    return compare_spectra(
        mine,
        theirs,
        my_trace,
        their_trace,
        estimator=getattr(op, "name", type(op).__name__),
        baseline_name=baseline.name,
        matvecs=spent["estimator"],
        baseline_matvecs=spent["baseline"],
        reused=tuple(reused),
    )
