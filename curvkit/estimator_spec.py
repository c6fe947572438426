"""The record a plugin registers a curvature estimator with.

A module of its own, importing neither :mod:`curvkit.registry` nor
:mod:`curvkit.hookspecs`, so that both can refer to it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from curvkit.operator import FLAGS, CurvatureOperator

__all__ = ["EstimatorSpec"]


@dataclass
class EstimatorSpec:
    """A registered curvature estimator.

    Attributes:
        name: The name users pass to :func:`curvkit.curvature` (e.g. ``"hessian"``).
        factory: ``factory(problem, **options) -> CurvatureOperator``; typically
            a :class:`~curvkit.CurvatureOperator` subclass.
        description: One line shown by ``curvkit plugins``.
        flags: ``symmetric``, ``psd``, ``exact``, ``stochastic``, ``resamples``. Read from the
            factory's class attributes when it is an operator class and this is
            left empty.
        reference: What the estimator computes exactly, or approximates: the
            name of a registered estimator (``"hessian"``, ``"ggn"``), with
            ``reference_options`` (``{"mode": "exact"}``); a
            :class:`~curvkit.CurvatureOperator` class, ``cls(problem, **options)``,
            computed independently of the estimator (``d3``'s
            :class:`~curvkit.plugins.d3.D3Reference`); or a callable
            ``problem -> dense [P, P] tensor``. ``curvkit analyze --check``
            compares the estimator's top eigenpairs with a tightly converged
            float64 Lanczos solve of the reference estimator or operator
            (``O(k)`` products), or with the callable's dense matrix (``P`` up to
            2,000); the conformance battery compares it with the reference's dense
            matrix built independently by :mod:`curvkit.testing` (a name it
            knows), by the operator (``to_dense()``) or by the callable.
        reference_options: Options of the reference estimator.
        reference_on: Case tags (:attr:`curvkit.testing.Case.tags`) on which an
            approximation equals its reference exactly (KFAC and the GGN:
            ``("single-datum", "deep-linear")``); the conformance battery compares
            them there only. ``None``: wherever the estimator claims ``EXACT`` (or,
            for a Monte-Carlo estimator, in expectation on every case).
        losses: The loss names the estimator supports (``None``: every loss);
            the conformance battery runs it on cases with these losses only.
        plugin: Name of the plugin that registered it (filled in by the registry).
    """

    name: str
    factory: Callable[..., CurvatureOperator]
    description: str = ""
    flags: dict[str, bool] = field(default_factory=dict)
    reference: str | Callable[..., Any] | None = None
    reference_options: dict[str, Any] = field(default_factory=dict)
    reference_on: tuple[str, ...] | None = None
    losses: tuple[str, ...] | None = None
    plugin: str = ""

    def __post_init__(self) -> None:
        if not self.flags and isinstance(self.factory, type) and issubclass(self.factory, CurvatureOperator):
            self.flags = {f.lower(): bool(getattr(self.factory, f)) for f in FLAGS}
