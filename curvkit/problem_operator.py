"""The template for data-backed operators: curvature of a :class:`~curvkit.Problem`.

A :class:`ProblemOperator` owns what every data-backed estimator shares: the
problem, the estimator's options, the determinism probe before the first
product, the data-pass counter, and restriction to a block of parameters by
differentiating only that block. A subclass implements
``_problem_matmat(M) -> A @ M``; during that call ``self.state`` is the
:class:`~curvkit.ModelSnapshot` of the model the product is for, which caches
(gradient graphs, dense matrices) can be keyed on with ``is``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from curvkit.operator import CurvatureOperator, _resolve_names
from curvkit.problem import ModelSnapshot, Problem

__all__ = ["ProblemOperator"]


class ProblemOperator(CurvatureOperator):
    """Base class of curvature operators defined by a problem's loss and data.

    Args:
        problem: The problem whose curvature this is.
        **options: Estimator options, kept to rebuild the operator on a block of
            parameters (:meth:`restrict`).
    """

    def __init__(self, problem: Problem, **options: Any):
        super().__init__(problem.layout, dtype=problem.dtype, device=problem.device)
        self.problem = problem
        self.options = options
        self.state: ModelSnapshot | None = None

    def _problem_matmat(self, M: Tensor) -> Tensor:
        """``A @ M`` for ``M`` of shape ``[P, K]``; subclasses implement this."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _problem_matmat")

    def _matmat(self, M: Tensor) -> Tensor:
        self.state = self.problem.current_snapshot()
        self.problem.ensure_deterministic(self.state)
        return self._problem_matmat(M)

    def restrict(self, params: str | Sequence[str]) -> CurvatureOperator:
        """The same estimator on a block of parameters, differentiating only those."""
        names = _resolve_names(self.layout, params)
        return type(self)(self.problem.with_params(names), **self.options)
