"""The description of a registered solver (what ``curvkit_register_solvers`` returns)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["SolverSpec"]


@dataclass
class SolverSpec:
    """A registered solver.

    Attributes:
        name: What users pass as ``method``.
        solve: ``(A, B, *, damping, tol, maxiter, x0, preconditioner, **options) ->
            SolveResult`` for ``B`` of shape ``[P, K]`` (``x0`` the same shape or
            ``None``).
        description: One line for listings.
        psd_only: The solver needs ``A + damping I`` positive definite: :func:`curvkit.solve`
            warns (a :class:`~curvkit.CurvkitWarning`) when the operator is not flagged
            ``PSD``.
        plugin: Set by the registry.
    """

    name: str
    solve: Callable[..., Any]
    description: str = ""
    psd_only: bool = False
    plugin: str = ""
