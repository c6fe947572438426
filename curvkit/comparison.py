"""Comparing two estimators on one problem: the design's "eigenvalue checks" between estimators.

:func:`compare_spectra` turns the top-k eigenpairs and the traces of an
estimator and of a baseline (say the GGN against the Hessian, on the same model,
data and precision) into a :class:`ComparisonResult` with three figures:

* the relative error of the top-k eigenvalues,
  ``max_i |lambda_i - mu_i| / max_i |mu_i|`` (``lambda`` the estimator's,
  ``mu`` the baseline's, both in decreasing order);
* the largest principal angle between the two top-k eigenspaces
  (:func:`curvkit.checks.largest_principal_angle`), in radians;
* the relative trace difference ``(tr A - tr B) / |tr B|``, signed.

Unlike :func:`curvkit.checks.check_agreement`, which asks whether an estimator
computes what it claims to (against its own reference, with a pass/fail), a
comparison measures how far two different curvatures are apart: there is no
threshold. ``curvkit analyze --compare-to NAME`` stores one per run, as
``compare/<NAME>`` (see :mod:`curvkit.analysis`).

Example:
    >>> import torch, curvkit
    >>> from curvkit.comparison import compare_spectra
    >>> A = curvkit.DenseOperator(torch.diag(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)))
    >>> B = curvkit.DenseOperator(torch.diag(torch.tensor([5.0, 2.0, 1.0], dtype=torch.float64)))
    >>> pairs = [curvkit.eigenvalues(op, k=2, tol=1e-10) for op in (A, B)]
    >>> traces = [curvkit.trace(op, method="exact") for op in (A, B)]
    >>> result = compare_spectra(pairs[0], pairs[1], traces[0], traces[1], estimator="a", baseline_name="b")
    >>> round(result.value_error, 6), round(result.max_principal_angle, 6), round(result.trace_difference, 6)
    (0.2, 0.0, -0.125)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvkit.checks import largest_principal_angle
from curvkit.linalg.eigen import EigenResult
from curvkit.linalg.trace import TraceResult
from curvkit.snapshot import fixed_model_state

__all__ = ["ComparisonResult", "compare_spectra"]


@dataclass(frozen=True)
class ComparisonResult:
    """An estimator against a baseline on the same problem: eigenvalues, subspace, trace.

    Attributes:
        estimator: The estimator's name.
        baseline: The baseline estimator's name.
        values: ``[k]`` the estimator's top-k eigenvalues, largest first.
        baseline_values: ``[k]`` the baseline's.
        value_error: ``max_i |values_i - baseline_values_i| / max_i |baseline_values_i|``.
        max_principal_angle: Largest principal angle (radians) between the two
            top-k eigenspaces; only meaningful where the baseline's k-th and
            (k+1)-th eigenvalues are apart.
        trace: The estimator's trace (estimate).
        trace_stderr: Its standard error (0 when exact).
        baseline_trace: The baseline's trace, by the same method and probes.
        baseline_trace_stderr: Its standard error.
        trace_difference: ``(trace - baseline_trace) / |baseline_trace|``.
        trace_method: The trace method both used.
        matvecs: Products with the estimator spent by the comparison (0 when its
            eigenpairs and trace were reused from the run).
        baseline_matvecs: Products with the baseline spent by the comparison (0
            when reused from the baseline's run).
        reused: What was taken from results already computed instead of being
            recomputed: ``"eigenpairs"``, ``"trace"``, ``"baseline eigenpairs"``,
            ``"baseline trace"``.
    """

    estimator: str
    baseline: str
    values: Tensor
    baseline_values: Tensor
    value_error: float
    max_principal_angle: float
    trace: float
    trace_stderr: float
    baseline_trace: float
    baseline_trace_stderr: float
    trace_difference: float
    trace_method: str
    matvecs: int = 0
    baseline_matvecs: int = 0
    reused: tuple[str, ...] = field(default_factory=tuple)

    @property
    def k(self) -> int:
        """Number of eigenpairs compared."""
        return len(self.values)

    @property
    def value_errors(self) -> Tensor:
        """``[k]`` relative error of each eigenvalue, ``|values_i - baseline_values_i| / max |baseline|``."""
        mu = self.baseline_values.to(torch.float64)
        scale = mu.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
        return (self.values.to(torch.float64) - mu).abs() / scale

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values, for JSON and HDF5."""
        return {
            "estimator": self.estimator,
            "baseline": self.baseline,
            "k": self.k,
            "values": self.values.tolist(),
            "baseline_values": self.baseline_values.tolist(),
            "value_error": self.value_error,
            "max_principal_angle": self.max_principal_angle,
            "trace": self.trace,
            "trace_stderr": self.trace_stderr,
            "baseline_trace": self.baseline_trace,
            "baseline_trace_stderr": self.baseline_trace_stderr,
            "trace_difference": self.trace_difference,
            "trace_method": self.trace_method,
            "matvecs": self.matvecs,
            "baseline_matvecs": self.baseline_matvecs,
            "reused": list(self.reused),
        }


@fixed_model_state()
def compare_spectra(
    estimate: EigenResult,
    baseline: EigenResult,
    trace: TraceResult,
    baseline_trace: TraceResult,
    *,
    estimator: str,
    baseline_name: str,
    matvecs: int = 0,
    baseline_matvecs: int = 0,
    reused: tuple[str, ...] = (),
) -> ComparisonResult:
    """The three figures of an estimator against a baseline, from their eigenpairs and traces.

    Args:
        estimate: The estimator's top-k eigenpairs (``which="largest"``, with vectors).
        baseline: The baseline's, with at least as many pairs.
        trace: The estimator's trace.
        baseline_trace: The baseline's, by the same method (and, for an estimate,
            the same seed: the same probes, so that most of the noise is shared).
        estimator: The estimator's name.
        baseline_name: The baseline's name.
        matvecs: Products with the estimator spent to get its inputs.
        baseline_matvecs: Products with the baseline spent to get its inputs.
        reused: Which inputs were reused (see :class:`ComparisonResult`).

    Raises:
        ValueError: Eigenpairs without vectors, or a baseline with fewer pairs.
    """
    k = len(estimate.values)
    if estimate.vectors is None or baseline.vectors is None or len(baseline.values) < k:
        raise ValueError("compare_spectra needs eigenvectors of both, and as many baseline pairs")
    mu = baseline.values[:k].to(torch.float64)
    scale = mu.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    value_error = ((estimate.values.to(torch.float64) - mu).abs().max() / scale).item()
    angle = largest_principal_angle(baseline.vectors[:, :k], estimate.vectors)
    reference = baseline_trace.estimate
    difference = (trace.estimate - reference) / abs(reference) if reference != 0 else math.nan
    return ComparisonResult(
        estimator=estimator,
        baseline=baseline_name,
        values=estimate.values.detach().cpu(),
        baseline_values=baseline.values[:k].detach().cpu(),
        value_error=value_error,
        max_principal_angle=angle,
        trace=float(trace.estimate),
        trace_stderr=float(trace.stderr),
        baseline_trace=float(reference),
        baseline_trace_stderr=float(baseline_trace.stderr),
        trace_difference=difference,
        trace_method=trace.method,
        matvecs=int(matvecs),
        baseline_matvecs=int(baseline_matvecs),
        reused=tuple(reused),
    )
