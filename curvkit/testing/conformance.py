"""The conformance battery: what every curvature estimator must satisfy.

Run it on your own estimator (registered by a plugin, or any factory)::

    from curvkit.testing import check_estimator
    report = check_estimator("my-estimator")       # over curvkit.testing.CASES
    report.raise_on_failure()                      # AssertionError listing failures

Checks, each recorded with the measured figure and its tolerance:

* ``shape``: ``A.shape == (P, P)``; products of a ``[P]``, ``[P, K]`` and a
  per-parameter list keep their form, dtype and device;
* ``symmetry`` (if ``SYMMETRIC``): ``|v.Aw - w.Av|`` relative to ``|v| |Aw| + |w| |Av|``;
* ``repeatable`` (unless ``STOCHASTIC``): the same product twice agrees;
* ``matmat``: ``A @ M`` equals the stacked ``A @ M[:, k]``;
* ``list-input``: a per-parameter list gives the flat product, unflattened;
* ``reference`` (if ``EXACT`` and a reference is known): ``to_dense()`` against a
  dense ground truth built independently (see :mod:`curvkit.testing.reference`);
* ``psd`` (if ``PSD``): smallest eigenvalue ``>= -tol * largest``;
* ``batch-size``: the same problem in batches of 3 and of the whole dataset
  gives the same products;
* ``restrict``: ``A.restrict(first parameter)`` equals that block of ``A``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvkit.operator import CurvatureOperator
from curvkit.problem import Problem
from curvkit.registry import EstimatorSpec, get_estimator
from curvkit.testing.cases import CASES, Case
from curvkit.testing.reference import resolve_reference

__all__ = ["CheckResult", "ConformanceReport", "check_estimator", "check_operator"]


@dataclass(frozen=True)
class CheckResult:
    """One check: its name, the case, whether it passed, and the measured figure."""

    check: str
    case: str
    passed: bool
    measured: float
    tolerance: float
    detail: str = ""

    def __str__(self) -> str:
        status = "ok  " if self.passed else "FAIL"
        figure = f"{self.measured:.3e} (tol {self.tolerance:.1e})"
        return f"{status} {self.case:>24} {self.check:<12} {figure} {self.detail}"


@dataclass
class ConformanceReport:
    """All checks run on one estimator."""

    estimator: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Whether every check passed."""
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        """The checks that failed."""
        return [r for r in self.results if not r.passed]

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


def check_operator(
    op: CurvatureOperator,
    case: str = "operator",
    *,
    reference: Tensor | None = None,
    rebuild: Callable[[Problem], CurvatureOperator] | None = None,
    problem: Problem | None = None,
    rtol: float | None = None,
    seed: int = 0,
) -> list[CheckResult]:
    """Run the checks on one operator.

    Args:
        op: The operator under test.
        case: Name recorded with the results.
        reference: Dense ground truth (for the ``reference`` check).
        rebuild: ``problem -> operator`` to build the same estimator on a
            re-batched problem (for the ``batch-size`` check).
        problem: The operator's problem (for the ``batch-size`` check).
        rtol: Relative tolerance (default 1e-9 in float64, 1e-4 in float32).
        seed: Seed of the random test vectors.

    Returns:
        One :class:`CheckResult` per check run.
    """
    tol = rtol if rtol is not None else _tolerance(op.dtype)
    gen = torch.Generator().manual_seed(seed)
    P = op.shape[0]
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=op.dtype).to(op.device)
    out: list[CheckResult] = []

    def record(check: str, passed: bool, measured: float, tolerance: float, detail: str = "") -> None:
        out.append(CheckResult(check, case, bool(passed), float(measured), float(tolerance), detail))

    v, w, M = rand(P), rand(P), rand(P, 3)
    Av, Aw, AM = op @ v, op @ w, op @ M
    shapes_ok = (
        op.shape == (op.layout.dim, op.layout.dim)
        and Av.shape == (P,)
        and AM.shape == (P, 3)
        and Av.dtype == op.dtype
        and Av.device == op.device
    )
    record("shape", shapes_ok, 0.0 if shapes_ok else 1.0, 0.0, f"P={P}")

    if op.SYMMETRIC:
        gap = abs(torch.dot(v, Aw).item() - torch.dot(w, Av).item())
        scale = v.norm().item() * Aw.norm().item() + w.norm().item() * Av.norm().item()
        record("symmetry", gap <= tol * max(scale, 1e-300), gap / max(scale, 1e-300), tol)

    if not op.STOCHASTIC:
        again = _rel(op @ v, Av)
        record("repeatable", again <= tol, again, tol)
        stacked = torch.stack([op @ M[:, k] for k in range(M.shape[1])], dim=1)
        err = _rel(AM, stacked)
        record("matmat", err <= tol, err, tol, "A @ M vs stacked A @ M[:, k]")
        as_list = op @ op.layout.unflatten(v)
        err = _rel(op.layout.flatten(as_list), Av)
        record("list-input", err <= tol, err, tol)

    dense = None
    if reference is not None and op.EXACT:
        dense = op.to_dense()
        err = _rel(dense, reference.to(dense))
        record("reference", err <= tol * 10, err, tol * 10, "to_dense() vs ground truth")

    if op.PSD:
        dense = op.to_dense() if dense is None else dense
        eig = torch.linalg.eigvalsh((dense + dense.T) / 2)
        ratio = -eig[0].item() / max(eig[-1].abs().item(), 1e-300)
        record("psd", ratio <= math.sqrt(tol), ratio, math.sqrt(tol), "-min eig / max eig")

    if rebuild is not None and problem is not None and not op.STOCHASTIC:
        try:
            small, whole = problem.rebatched(3), problem.rebatched(problem.num_samples())
        except Exception as exc:  # noqa: BLE001 - data whose batches the user fixed
            record("batch-size", True, 0.0, tol, f"skipped: {exc}")
        else:
            err = _rel(rebuild(small) @ M, rebuild(whole) @ M)
            record("batch-size", err <= tol, err, tol, "batches of 3 vs one batch")

    first = op.layout.names[0]
    block = op.restrict(first)
    idx = op.layout.indices([first]).to(op.device)
    u = rand(block.shape[0])
    embedded = torch.zeros(P, dtype=op.dtype, device=op.device)
    embedded[idx] = u
    err = _rel(block @ u, (op @ embedded)[idx])
    ok = block.shape == (len(idx), len(idx)) and (op.STOCHASTIC or err <= tol)
    record("restrict", ok, err, tol, f"block {first!r}")
    return out


def check_estimator(
    estimator: str | EstimatorSpec | Callable[..., CurvatureOperator],
    problems: Iterable[Problem | Case] | None = None,
    *,
    options: dict[str, Any] | None = None,
    reference: str | Callable[[Problem], Tensor] | None = None,
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
            :data:`~curvkit.testing.reference.REFERENCES` or a callable
            ``problem -> [P, P]``; by default the spec's ``reference``.
        rtol: Relative tolerance (see :func:`check_operator`).
        seed: Seed of the random test vectors.

    Returns:
        The :class:`ConformanceReport`; call ``raise_on_failure()`` in a test.
    """
    if isinstance(estimator, str):
        estimator = get_estimator(estimator)
    if isinstance(estimator, EstimatorSpec):
        name, factory = estimator.name, estimator.factory
        reference = reference if reference is not None else estimator.reference
    else:
        name, factory = getattr(estimator, "__name__", repr(estimator)), estimator
    make_reference = resolve_reference(reference)
    options = options or {}
    report = ConformanceReport(name)
    items: Sequence[Problem | Case] = list(CASES if problems is None else problems)
    for item in items:
        problem = item.problem() if isinstance(item, Case) else item
        case = item.name if isinstance(item, Case) else repr(problem)
        op = factory(problem, **options)
        truth = make_reference(problem) if make_reference is not None else None
        report.results += check_operator(
            op,
            case,
            reference=truth,
            rebuild=lambda p: factory(p, **options),
            problem=problem,
            rtol=rtol,
            seed=seed,
        )
    return report
