"""The conformance battery: what every curvature estimator must satisfy.

Run it on your own estimator (registered by a plugin, or any factory)::

    from curvkit.testing import check_estimator
    report = check_estimator("my-estimator")       # over curvkit.testing.CASES
    report.raise_on_failure()                      # AssertionError listing failures
    print(report)                                  # every check, skipped ones with why

Every check ends in one of four states, recorded with the measured figure and its
tolerance: ``pass``, ``fail``, ``error`` (the estimator raised: the message is
kept and the battery goes on with the next case) or ``skipped`` (the check could
not apply: the reason is kept; a skipped check is never counted as passed). A
report passes when nothing failed or raised.

The checks, per case:

* ``shape``: ``A.shape == (P, P)``; products of a ``[P]`` and a ``[P, K]``
  tensor keep their form, dtype and device;
* ``symmetry`` (if ``SYMMETRIC``): ``|v.Aw - w.Av|`` relative to ``|v| |Aw| + |w| |Av|``;
* ``repeatable``: the same product twice agrees;
* ``matmat``: ``A @ M`` equals the stacked ``A @ M[:, k]``;
* ``list-input``: a per-parameter list gives the flat product, unflattened;
* ``reference``: against a dense ground truth built independently (see
  :mod:`curvkit.testing.reference`), for an ``EXACT`` estimator to rounding
  (``to_dense()``), for a Monte-Carlo one (``STOCHASTIC``) *in expectation*:
  the mean of :data:`MONTE_CARLO_SEEDS` independently seeded operators' products,
  within a tolerance derived from their sample spread (see
  :func:`monte_carlo_agreement`); a reference that holds on some cases only
  (``reference_on``, by case tags) is skipped elsewhere, saying so; an ``EXACT``
  estimator without a reference is reported as ``skipped`` (unverified), not passed;
* ``psd`` (if ``PSD``): smallest eigenvalue ``>= -sqrt(tol) * largest``;
* ``batch-size``: the same problem in batches of 3 and as one batch gives the
  same products (for a Monte-Carlo estimator, the same in expectation: the
  seeded differences average to zero within their standard errors); skipped,
  saying why, for data whose batches the user fixed;
* ``restrict``: ``A.restrict(first parameter)`` equals that block of ``A``.

Checks that need one fixed linear map (symmetry, repeatable, matmat, list-input,
restrict, psd, batch-size) are skipped for an operator that resamples on every
product (``RESAMPLES``). An estimator that declares the losses it supports
(``EstimatorSpec.losses``) is run on cases with those losses only; the others are
recorded as skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvkit.errors import DataError, UnsupportedModelError, describe_error
from curvkit.operator import CurvatureOperator
from curvkit.problem import Problem
from curvkit.registry import EstimatorSpec, get_estimator
from curvkit.testing.cases import CASES, Case
from curvkit.testing.reference import resolve_reference

__all__ = [
    "MONTE_CARLO_SEEDS",
    "CheckResult",
    "ConformanceReport",
    "check_estimator",
    "check_operator",
    "monte_carlo_agreement",
]

PASS, FAIL, ERROR, SKIPPED = "pass", "fail", "error", "skipped"

MONTE_CARLO_SEEDS = 64
"""Independently seeded operators averaged by the Monte-Carlo ``reference`` check."""

MONTE_CARLO_SIGMAS = 4.0
"""The Monte-Carlo check's bound, in standard errors of the mean (see :func:`monte_carlo_agreement`)."""


@dataclass(frozen=True)
class CheckResult:
    """One check on one case: its status, the measured figure, its tolerance and a note."""

    check: str
    case: str
    status: str
    measured: float = math.nan
    tolerance: float = math.nan
    detail: str = ""

    @property
    def passed(self) -> bool:
        """Whether the check ran and passed (a skipped check has not passed)."""
        return self.status == PASS

    def __str__(self) -> str:
        figure = "" if math.isnan(self.measured) else f"{self.measured:.3e} (tol {self.tolerance:.1e}) "
        return f"{self.status:<7} {self.case:>24} {self.check:<12} {figure}{self.detail}"


@dataclass
class ConformanceReport:
    """All checks run on one estimator."""

    estimator: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Whether nothing failed or raised (skipped checks do not count either way)."""
        return not self.failures

    @property
    def failures(self) -> list[CheckResult]:
        """The checks that failed or raised."""
        return [r for r in self.results if r.status in (FAIL, ERROR)]

    @property
    def skipped(self) -> list[CheckResult]:
        """The checks that could not apply, with the reason in ``detail``."""
        return [r for r in self.results if r.status == SKIPPED]

    def raise_on_failure(self) -> None:
        """Raise ``AssertionError`` listing the failed checks, if any."""
        if not self.passed:
            lines = "\n".join(str(r) for r in self.failures)
            raise AssertionError(f"estimator {self.estimator!r} fails conformance:\n{lines}")

    def __str__(self) -> str:
        return f"conformance of {self.estimator!r}:\n" + "\n".join(str(r) for r in self.results)


def _rel(a: Tensor, b: Tensor) -> float:
    scale = max(a.norm().item(), b.norm().item(), 1e-300)
    return (a - b).norm().item() / scale


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 1e-4


class _Recorder:
    """Collects one case's results; a check that raises is recorded as an error."""

    def __init__(self, case: str):
        self.case, self.results = case, []

    def record(self, check: str, passed: bool, measured: float, tolerance: float, detail: str = "") -> None:
        status = PASS if passed else FAIL
        self.results.append(CheckResult(check, self.case, status, float(measured), float(tolerance), detail))

    def skip(self, check: str, why: str) -> None:
        self.results.append(CheckResult(check, self.case, SKIPPED, detail=why))

    def error(self, check: str, exc: BaseException) -> None:
        self.results.append(CheckResult(check, self.case, ERROR, detail=describe_error(exc)))

    def run(self, check: str, body: Callable[[], None]) -> None:
        try:
            body()
        except Exception as exc:  # noqa: BLE001 - the battery reports any failure of the estimator
            self.error(check, exc)


def monte_carlo_agreement(
    samples: Tensor, expected: Tensor, rtol: float, others: Tensor | None = None
) -> float:
    """How far the mean of Monte-Carlo samples is from its expectation, in standard errors.

    With ``n`` independent samples ``Y_s`` (one per seed) of an unbiased estimator of
    ``R``, ``E ||mean(Y) - R||_F^2 = sum_ij var(Y_ij) / n``. The statistic is the
    ratio ``||mean(Y) - R||_F / sqrt(sum_ij s_ij^2 / n)``, with ``s_ij^2`` the
    sample variances: about 1 for an unbiased estimator whatever ``n`` and the
    noise (the many entries average the chi-square out), and growing like
    ``sqrt(n)`` times the bias for a biased one. The check passes below
    :data:`MONTE_CARLO_SIGMAS`. Differences within ``rtol`` of ``R`` count as
    rounding (a floor on the spread), so an estimator that happens to be exact on
    a case passes as it would as a deterministic one.

    Args:
        samples: ``[n, ...]``, one sample per seed.
        expected: ``[...]``, the expectation.
        rtol: Relative tolerance of rounding.
        others: ``[m, ...]`` samples of another estimator of the same expectation
            (a two-sample comparison: ``expected`` is then ignored, and the spread
            is that of both means).

    Returns:
        The statistic.
    """
    mean = samples.mean(dim=0)
    spread = samples.var(dim=0, unbiased=True).sum() / samples.shape[0]
    if others is not None:
        expected = others.mean(dim=0)
        spread = spread + others.var(dim=0, unbiased=True).sum() / others.shape[0]
    floor = (rtol * max(expected.norm().item(), mean.norm().item())) ** 2 + 1e-300
    return ((mean - expected).norm() / (spread + floor).sqrt()).item()


def check_operator(
    op: CurvatureOperator,
    case: str = "operator",
    *,
    reference: Tensor | None = None,
    rebuild: Callable[..., CurvatureOperator] | None = None,
    problem: Problem | None = None,
    rtol: float | None = None,
    seed: int = 0,
    reference_note: str = "",
) -> list[CheckResult]:
    """Run the checks on one operator.

    Args:
        op: The operator under test.
        case: Name recorded with the results.
        reference: Dense ground truth (for the ``reference`` check); ``None``:
            the check is recorded as skipped with ``reference_note``.
        rebuild: ``(problem, **options) -> operator`` building the same estimator
            (for the ``batch-size`` check, and, with ``seed=`` options, for the
            Monte-Carlo ``reference`` check).
        problem: The operator's problem (for the ``batch-size`` check).
        rtol: Relative tolerance (default 1e-9 in float64, 1e-4 in float32).
        seed: Seed of the random test vectors.
        reference_note: Why there is no reference, when there is none.

    Returns:
        One :class:`CheckResult` per check.
    """
    tol = rtol if rtol is not None else _tolerance(op.dtype)
    gen = torch.Generator().manual_seed(seed)
    P = op.shape[0]
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=op.dtype).to(op.device)
    out = _Recorder(case)
    v, w, M = rand(P), rand(P), rand(P, 3)
    products: dict[str, Tensor] = {}

    def shape() -> None:
        products.update(Av=op @ v, Aw=op @ w, AM=op @ M)
        Av, AM = products["Av"], products["AM"]
        ok = (
            op.shape == (op.layout.dim, op.layout.dim)
            and Av.shape == (P,)
            and AM.shape == (P, 3)
            and Av.dtype == op.dtype
            and Av.device == op.device
        )
        out.record("shape", ok, 0.0 if ok else 1.0, 0.0, f"P={P}")

    out.run("shape", shape)
    if not products:
        return out.results  # no product at all: nothing else can run
    Av, Aw, AM = products["Av"], products["Aw"], products["AM"]
    fixed = not op.RESAMPLES
    resampling = "skipped: the operator resamples on every product (RESAMPLES)"

    def symmetry() -> None:
        gap = abs(torch.dot(v, Aw).item() - torch.dot(w, Av).item())
        scale = v.norm().item() * Aw.norm().item() + w.norm().item() * Av.norm().item()
        out.record("symmetry", gap <= tol * max(scale, 1e-300), gap / max(scale, 1e-300), tol)

    def repeatable() -> None:
        again = _rel(op @ v, Av)
        out.record("repeatable", again <= tol, again, tol)

    def matmat() -> None:
        stacked = torch.stack([op @ M[:, k] for k in range(M.shape[1])], dim=1)
        err = _rel(AM, stacked)
        out.record("matmat", err <= tol, err, tol, "A @ M vs stacked A @ M[:, k]")

    def list_input() -> None:
        err = _rel(op.layout.flatten(op @ op.layout.unflatten(v)), Av)
        out.record("list-input", err <= tol, err, tol)

    for name, body, applies in (
        ("symmetry", symmetry, op.SYMMETRIC),
        ("repeatable", repeatable, True),
        ("matmat", matmat, True),
        ("list-input", list_input, True),
    ):
        if not applies:
            continue
        if fixed:
            out.run(name, body)
        else:
            out.skip(name, resampling)

    dense: list[Tensor] = []

    def reference_check() -> None:
        if op.STOCHASTIC:
            _monte_carlo_reference(out, op, reference, rebuild, problem, M, tol)
            return
        dense.append(op.to_dense())
        err = _rel(dense[0], reference.to(dense[0]))
        out.record("reference", err <= tol * 10, err, tol * 10, "to_dense() vs ground truth")

    if reference is None:
        out.skip("reference", reference_note or "skipped: no reference to compare with")
    else:
        out.run("reference", reference_check)

    def psd() -> None:
        matrix = dense[0] if dense else op.to_dense()
        eig = torch.linalg.eigvalsh((matrix + matrix.T) / 2)
        ratio = -eig[0].item() / max(eig[-1].abs().item(), 1e-300)
        out.record("psd", ratio <= math.sqrt(tol), ratio, math.sqrt(tol), "-min eig / max eig")

    if op.PSD:
        out.run("psd", psd) if fixed else out.skip("psd", resampling)

    def batch_size() -> None:
        try:
            small, whole = problem.rebatched(3), problem.rebatched(problem.num_samples())
        except DataError as exc:
            out.skip("batch-size", f"skipped: {exc}")
            return
        if op.STOCHASTIC:  # the samples may depend on the batching; their distribution must not
            seeds = range(MONTE_CARLO_SEEDS)
            in_threes = torch.stack([rebuild(small, seed=s) @ M for s in seeds])
            at_once = torch.stack([rebuild(whole, seed=s) @ M for s in seeds])
            statistic = monte_carlo_agreement(in_threes, at_once[0], tol, others=at_once)
            detail = f"batches of 3 vs one batch, means of {MONTE_CARLO_SEEDS} seeds, in standard errors"
            out.record("batch-size", statistic <= MONTE_CARLO_SIGMAS, statistic, MONTE_CARLO_SIGMAS, detail)
            return
        err = _rel(rebuild(small) @ M, rebuild(whole) @ M)
        out.record("batch-size", err <= tol, err, tol, "batches of 3 vs one batch")

    if rebuild is None or problem is None:
        out.skip("batch-size", "skipped: no problem to re-batch (an operator was checked on its own)")
    elif not fixed:
        out.skip("batch-size", resampling)
    else:
        out.run("batch-size", batch_size)

    def restrict() -> None:
        first = op.layout.names[0]
        block = op.restrict(first)
        idx = op.layout.indices([first]).to(op.device)
        u = rand(block.shape[0])
        embedded = torch.zeros(P, dtype=op.dtype, device=op.device)
        embedded[idx] = u
        err = _rel(block @ u, (op @ embedded)[idx])
        ok = block.shape == (len(idx), len(idx)) and err <= tol
        out.record("restrict", ok, err, tol, f"block {first!r}")

    out.run("restrict", restrict) if fixed else out.skip("restrict", resampling)
    return out.results


def _monte_carlo_reference(
    out: _Recorder,
    op: CurvatureOperator,
    reference: Tensor,
    rebuild: Callable[..., CurvatureOperator] | None,
    problem: Problem | None,
    M: Tensor,
    rtol: float,
) -> None:
    """The ``reference`` check of a Monte-Carlo estimator: its products in expectation."""
    if op.RESAMPLES:
        samples = torch.stack([op @ M for _ in range(MONTE_CARLO_SEEDS)])
    elif rebuild is None or problem is None:
        out.skip("reference", "skipped: a seeded Monte-Carlo operator checked on its own cannot be reseeded")
        return
    else:
        samples = torch.stack([rebuild(problem, seed=s) @ M for s in range(MONTE_CARLO_SEEDS)])
    statistic = monte_carlo_agreement(samples, reference.to(M) @ M, rtol)
    detail = f"mean of {MONTE_CARLO_SEEDS} seeds vs ground truth, in standard errors"
    out.record("reference", statistic <= MONTE_CARLO_SIGMAS, statistic, MONTE_CARLO_SIGMAS, detail)


def check_estimator(
    estimator: str | EstimatorSpec | Callable[..., CurvatureOperator],
    problems: Iterable[Problem | Case] | None = None,
    *,
    options: dict[str, Any] | None = None,
    reference: str | type[CurvatureOperator] | Callable[[Problem], Tensor] | None = None,
    reference_on: Collection[str] | None = None,
    losses: Collection[str] | None = None,
    rtol: float | None = None,
    seed: int = 0,
) -> ConformanceReport:
    """Run the conformance battery on an estimator over several problems.

    Args:
        estimator: A registered name, an :class:`~curvkit.EstimatorSpec`, or a
            factory ``(problem, **options) -> CurvatureOperator``.
        problems: Problems or :class:`~curvkit.testing.cases.Case` objects
            (default: every case in :data:`~curvkit.testing.cases.CASES`, float64).
        options: Keyword arguments for the factory.
        reference: Dense ground truth, a name in
            :data:`~curvkit.testing.reference.REFERENCES`, an operator class
            (its ``to_dense()``) or a callable ``problem -> [P, P]``; by default
            the spec's ``reference``.
        reference_on: Case tags on which the reference holds exactly (e.g.
            ``{"single-datum", "deep-linear"}`` for KFAC against the GGN); on other
            cases the check is skipped, saying so. By default the spec's
            ``reference_on`` (``None``: every case).
        losses: The loss names the estimator supports; cases with other losses
            are skipped. By default the spec's ``losses`` (``None``: every loss).
        rtol: Relative tolerance (see :func:`check_operator`).
        seed: Seed of the random test vectors.

    Returns:
        The :class:`ConformanceReport`; call ``raise_on_failure()`` in a test.
    """
    if isinstance(estimator, str):
        estimator = get_estimator(estimator)
    if isinstance(estimator, EstimatorSpec):
        name, factory = estimator.name, estimator.factory
        if reference is None:
            reference = estimator.reference
            reference_on = reference_on if reference_on is not None else estimator.reference_on
        losses = losses if losses is not None else estimator.losses
    else:
        name, factory = getattr(estimator, "__name__", repr(estimator)), estimator
    make_reference = resolve_reference(reference)
    options = options or {}
    report = ConformanceReport(name)
    items: Sequence[Problem | Case] = list(CASES if problems is None else problems)
    for item in items:
        case = item.name if isinstance(item, Case) else repr(item)
        recorder = _Recorder(case)
        try:
            problem = item.problem() if isinstance(item, Case) else item
            if losses is not None and problem.loss.name not in losses:
                recorder.skip("case", f"skipped: loss {problem.loss.name!r} is not among {sorted(losses)}")
                report.results += recorder.results
                continue
            op = factory(problem, **options)
        except UnsupportedModelError as exc:  # a deliberate refusal of this model, not a failure
            recorder.skip("case", f"skipped: {name} does not support this model: {exc}")
            report.results += recorder.results
            continue
        except Exception as exc:  # noqa: BLE001 - recorded, and the battery goes on
            recorder.error("construct", exc)
            report.results += recorder.results
            continue
        truth, note = None, ""
        tags = item.tags if isinstance(item, Case) else frozenset()
        if make_reference is None:
            note = "skipped: EXACT, but no reference: exactness unverified" if op.EXACT else ""
        elif reference_on is not None and not tags & set(reference_on):
            note = f"skipped: the reference holds on {sorted(reference_on)} cases only"
        elif reference_on is None and not (op.EXACT or op.STOCHASTIC):
            note = "skipped: an approximation of its reference; give reference_on, the cases it is exact on"
        else:
            try:
                truth = make_reference(problem)
            except Exception as exc:  # noqa: BLE001 - a reference that cannot be built is an error
                recorder.error("reference", exc)
                note = "skipped: the reference could not be built (see the error)"
        report.results += recorder.results
        report.results += check_operator(
            op,
            case,
            reference=truth,
            rebuild=lambda p, **extra: factory(p, **{**options, **extra}),
            problem=problem,
            rtol=rtol,
            seed=seed,
            reference_note=note,
        )
    return report
