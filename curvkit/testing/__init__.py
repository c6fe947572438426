"""Testing helpers for curvkit and its plugin authors.

* :mod:`curvkit.testing.cases`: small models and data (MLP, CNN with pooling,
  BatchNorm in eval mode, attention with LayerNorm, tied weights, dict inputs);
* :mod:`curvkit.testing.reference`: dense ground truth (Hessian, GGN, Fisher,
  empirical Fisher) and finite differences;
* :mod:`curvkit.testing.conformance`: the battery every estimator must pass.

This package does not import pytest; use ``report.raise_on_failure()`` in tests.
"""

from curvkit.testing.cases import CASES, Case, LayerCalledTwice, get_case
from curvkit.testing.conformance import CheckResult, ConformanceReport, check_estimator, check_operator
from curvkit.testing.reference import (
    REFERENCES,
    dense_empirical_fisher_reference,
    dense_fisher_reference,
    dense_ggn_reference,
    dense_hessian_reference,
    finite_difference_hessian,
)

__all__ = [
    "CASES",
    "REFERENCES",
    "Case",
    "CheckResult",
    "ConformanceReport",
    "LayerCalledTwice",
    "check_estimator",
    "check_operator",
    "dense_empirical_fisher_reference",
    "dense_fisher_reference",
    "dense_ggn_reference",
    "dense_hessian_reference",
    "finite_difference_hessian",
    "get_case",
]
