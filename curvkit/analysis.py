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

import inspect
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from curvkit import arguments
from curvkit.arguments import integer, relative_tolerance
from curvkit.errors import CurvkitError
from curvkit.kinds.checks import REFERENCE_TOL
from curvkit.linalg.ihvp import DENSE_REFERENCE_MAX_DIM
from curvkit.linalg.lanczos import REORTHOGONALISATION
from curvkit.linalg.trace import METHODS as TRACE_METHODS
from curvkit.memory import peak_memory
from curvkit.snapshot import fixed_model_state

__all__ = [
    "DENSE_REFERENCE_MAX_DIM",
    "REFERENCE_TOL",
    "AnalysisPlan",
    "Baseline",
    "Reference",
    "estimator_reference",
    "run_plan",
]


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
    spec: Any,
    problem: Any,
    *,
    max_dense_dim: int = DENSE_REFERENCE_MAX_DIM,
    options: Mapping[str, Any] | None = None,
) -> Reference:
    """The reference of a registered estimator on a problem (built lazily: :attr:`Reference.build`).

    * ``spec.reference`` names an estimator: that estimator with
      ``spec.reference_options`` on a float64 copy of ``problem``
      (:meth:`curvkit.Problem.to`), solved by Lanczos: ``O(k)`` products.
    * A :class:`~curvkit.CurvatureOperator` class (``d3``'s
      :class:`~curvkit.plugins.d3.D3Reference`): the operator it makes of the
      float64 copy, solved by Lanczos the same way, for any ``P``.
    * Another callable: its dense matrix of the float64 copy, when
      ``problem.dim <= max_dense_dim``.
    * Otherwise, or when the named reference is not registered or refuses the
      options (a plugin's mistake, not the user's), none, with the reason, which
      the agreement check reports instead of a result.

    Args:
        spec: The estimator's :class:`~curvkit.EstimatorSpec`.
        problem: The problem it is analysed on.
        max_dense_dim: Largest ``P`` for a dense reference.
        options: The estimator's own options; a callable reference (or operator
            class) gets those its signature names (``direction`` for ``d3``), so
            that it is the reference of the estimator as configured.
    """
    from curvkit.operator import CurvatureOperator
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
    accepted = inspect.signature(target).parameters
    given = {k: v for k, v in (options or {}).items() if k in accepted}
    build = lambda: target(problem.to(torch.float64), **given)  # noqa: E731
    if isinstance(target, type) and issubclass(target, CurvatureOperator):
        described = ", ".join(f"{k}={v!r}" for k, v in given.items())
        return Reference(f"{name}({described}) in float64", build)
    if problem.dim > max_dense_dim:
        return Reference(
            reason=f"the reference of {spec.name!r} ({name}) is a dense matrix, built only up to "
            f"P={max_dense_dim:,} parameters (this problem has P={problem.dim:,})"
        )
    described = "".join(f", {k}={v!r}" for k, v in given.items())
    return Reference(f"the dense matrix of {name}{described} in float64", build)


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
        seed: Seed of every random start vector and probe, and of the estimators that take a
            ``seed`` and are given none: an integer in ``[0, 2**63)``.
        max_matvecs: Budget of products of each eigenpair solve (``None``: the
            solver's default, see :func:`curvkit.eigenvalues`).
        reorthogonalisation: ``"auto"``, ``"full"`` or ``"partial"``, see
            :func:`curvkit.eigenvalues`.
        compare_to: A registered estimator (the baseline): compare every other
            estimator with it (``compare/<compare_to>``): its top-k eigenvalues,
            subspace and trace. Needs ``top_k``.
        options: The options of the analysis kinds that take theirs here, by
            kind name (:attr:`curvkit.kinds.AnalysisKind.check`): e.g.
            ``{"ihvp": {"solvers": ["cg", "neumann"], "damping": 1e-3}}`` for the
            inverse-HVP accuracy analysis (:mod:`curvkit.kinds.ihvp`), or a
            plugin's kind. A kind named here runs.

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
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # kept as plain Python numbers: the plan's settings are part of its results' requests
        checked = {
            "top_k": integer(self.top_k, "--top-k", minimum=0),
            "bottom_k": integer(self.bottom_k, "--bottom-k", minimum=0),
            "tol": relative_tolerance(self.tol, "--tol"),
            "seed": arguments.seed(self.seed, "--seed"),  # and of estimators given none (run keys)
            "trace_matvecs": integer(self.trace_matvecs, "--trace-matvecs"),
            "density_steps": integer(self.density_steps, "density steps"),
            "density_runs": integer(self.density_runs, "density runs"),
            "max_matvecs": None if self.max_matvecs is None else integer(self.max_matvecs, "--max-matvecs"),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)  # frozen
        if self.trace is not None and self.trace not in TRACE_METHODS:
            raise CurvkitError(f"unknown trace method {self.trace!r}; use one of {list(TRACE_METHODS)}")
        if self.reorthogonalisation not in REORTHOGONALISATION:
            raise CurvkitError(
                f"unknown reorthogonalisation {self.reorthogonalisation!r}; use one of "
                f"{list(REORTHOGONALISATION)}"
            )
        if self.compare_to is not None and not self.top_k:
            raise CurvkitError(
                f"--compare-to {self.compare_to} compares the top-k eigenpairs: give --top-k 1 or more"
            )
        from curvkit.kinds import plan_kinds

        kinds = plan_kinds(self.options)
        for name, options in self.options.items():
            kinds[name].check(options)
        if not self.keys():
            raise CurvkitError(
                "no analysis asked for (--top-k 0 and nothing else): ask for --top-k, --bottom-k, "
                "--trace, --density, --check, --per-layer, --summary or --ihvp"
            )

    def check_dimension(self, dim: int, samples: int | None = None) -> None:
        """Refuse a plan that does not fit an operator of dimension ``dim``: called before any work on it.

        More eigenpairs than ``dim``, or options of an analysis kind that its
        :attr:`~curvkit.kinds.AnalysisKind.check_dimension` refuses (``ihvp``: a vector
        file of another size, a solver option above ``P``, or above ``N``:
        ``lissa``'s ``batch_size``).

        Args:
            dim: The number of parameters ``P`` analysed.
            samples: The number of samples ``N`` of the operator's data
                (:func:`curvkit.problem_operator.sample_count`); ``None`` for an
                operator without data, whose bounds on ``N`` are left to the solver.

        Raises:
            CurvkitError: ``top_k`` or ``bottom_k`` exceeds ``dim``, or a kind's options do not fit it.
        """
        from curvkit.kinds import plan_kinds

        for name, k in (("--top-k", self.top_k), ("--bottom-k", self.bottom_k)):
            if k > dim:
                raise CurvkitError(f"{name} {k} is larger than the number of parameters analysed, P={dim:,}")
        kinds = plan_kinds(self.options)
        for name, options in self.options.items():
            check = kinds[name].check_dimension
            if check is not None:
                check(options, dim, samples)

    def keys(self, psd: bool = False, estimator: str | None = None) -> list[str]:
        """The analyses of this plan, in the order they run (kind by kind, :mod:`curvkit.kinds`).

        Args:
            psd: The operator claims to be positive semi-definite (``checks/psd``).
            estimator: The operator's estimator: ``compare/<compare_to>`` is left
                out when it is the baseline itself.
        """
        from curvkit.kinds import plan_kinds

        return [key for kind in plan_kinds(self.options).values() for key in kind.keys(self, psd, estimator)]

    def request(self, key: str) -> dict[str, Any]:
        """The options that determine the result of analysis ``key`` under this plan.

        A stored result is reused on resume only when it was made with the same
        request: asking for ``--top-k 10`` after a run with ``--top-k 5`` recomputes
        ``eigen/largest`` instead of returning the five stored pairs. The request
        of ``compare/<baseline>`` lacks the baseline's options, which the caller
        adds (``"baseline_options"``, see :class:`Baseline`).

        Raises:
            CurvkitError: ``key`` is not an analysis of this plan.
        """
        from curvkit.kinds import plan_kinds

        if key not in self.keys(psd=True):
            raise CurvkitError(f"no analysis {key!r} in this plan")
        return plan_kinds(self.options)[key.partition("/")[0]].request(self, key)


def run_plan(
    op: Any,
    plan: AnalysisPlan,
    *,
    done: Collection[str] = (),
    known: Mapping[str, Any] | None = None,
    reference: Reference | None = None,
    baseline: Baseline | None = None,
    precise: Callable[[], Any] | None = None,
    on_result: Callable[[str, Any, float], None] | None = None,
    progress: Callable[[str, dict], None] | None = None,
) -> dict[str, Any]:
    """Run a plan on an operator; report each result as soon as it is finished.

    Each analysis is computed by its kind's ``compute`` (:mod:`curvkit.kinds`).

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
        precise: Returns the same curvature in float64, for the reference solve
            of ``ihvp/<vector>`` (default: ``op`` itself, in its own precision).
        on_result: Called as ``on_result(key, result, seconds, peak_memory_bytes)``
            after each analysis: its wall time and the peak memory allocated on
            the operator's device meanwhile (``None`` on the CPU; see
            :mod:`curvkit.memory`).
        progress: Called as ``progress(key, counters)`` while each analysis works.

    Returns:
        The results computed in this call, by key.

    Raises:
        CurvkitError: The plan does not fit ``op``'s dimension or the number of
            samples of its data (:meth:`AnalysisPlan.check_dimension`, before any
            analysis starts); the plan compares, ``op`` is not the baseline, and no
            ``baseline`` is given; or an analysis failed.
    """
    from curvkit.problem_operator import sample_count

    plan.check_dimension(op.shape[0], sample_count(op))  # before any analysis starts
    return run_checked_plan(
        op,
        plan,
        done=done,
        known=known,
        reference=reference,
        baseline=baseline,
        precise=precise,
        on_result=on_result,
        progress=progress,
    )


@fixed_model_state()
def run_checked_plan(
    op: Any,
    plan: AnalysisPlan,
    *,
    done: Collection[str] = (),
    known: Mapping[str, Any] | None = None,
    reference: Reference | None = None,
    baseline: Baseline | None = None,
    precise: Callable[[], Any] | None = None,
    on_result: Callable[[str, Any, float], None] | None = None,
    progress: Callable[[str, dict], None] | None = None,
) -> dict[str, Any]:
    """:func:`run_plan` for a plan already checked against ``op`` (:meth:`AnalysisPlan.check_dimension`).

    What :func:`curvkit.runs.analyze` calls: it checks the plan once per run,
    before it opens the results file, so the check (which reads an ``--ihvp-vector``
    file and counts the samples) is not repeated here. The arguments, the result
    and the other errors are :func:`run_plan`'s.
    """
    from curvkit.kinds import AnalysisContext, plan_kinds

    keys = plan.keys(psd=bool(getattr(op, "PSD", False)), estimator=getattr(op, "name", None))
    if any(key.startswith("compare/") for key in keys) and baseline is None:
        raise CurvkitError(f"the plan compares with {plan.compare_to!r}, but run_plan was given no baseline")
    context = AnalysisContext(
        op,
        plan,
        known=known or {},
        reference=reference,
        baseline=baseline,
        precise=precise,
        report=lambda key: None if progress is None else (lambda counters: progress(key, counters)),
    )
    kinds = plan_kinds(plan.options)
    for key in keys:
        if key in done:
            continue
        start = time.perf_counter()
        with peak_memory(getattr(op, "device", "cpu")) as memory:
            result = kinds[key.partition("/")[0]].compute(context, key)
        context.computed[key] = result
        if on_result is not None:
            on_result(key, result, time.perf_counter() - start, memory.bytes)
    return dict(context.computed)
