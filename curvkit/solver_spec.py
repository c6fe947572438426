"""The description of a registered solver (what ``curvkit_register_solvers`` returns)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
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
        option_checks: How the values of its options are checked, by option name:
            ``check(value, name)`` returns the value to use or raises a one-line
            :class:`~curvkit.CurvkitError` naming ``name`` (the checks of
            :mod:`curvkit.arguments`, e.g. ``curvkit.arguments.integer``, or
            ``lambda value, name: None if value is None else positive_number(value, name)``
            for an option whose ``None`` means a default).
            :func:`curvkit.linalg.solve.check_solver_options` applies them, so that
            :func:`curvkit.solve` refuses a value out of range before any product and
            ``curvkit analyze --ihvp-option`` before anything runs. An option not
            listed is passed as given (the solver checks it itself, when it runs).
        dimension_checks: The bounds of its options that depend on the number of
            parameters ``P`` (``lowrank``'s ``rank`` at most ``P``), by option name:
            ``check(value, name, P)`` raises a one-line :class:`~curvkit.CurvkitError`.
            Applied, after ``option_checks``, where ``P`` is known before the solver
            runs: by :func:`curvkit.solve` (the operator's size), and by
            ``curvkit analyze`` once the model is loaded, before anything is written.
        sample_checks: The bounds of its options that depend on the number of samples
            ``N`` of the operator's data (``lissa``'s ``batch_size`` at most ``N``), by
            option name: ``check(value, name, N)`` raises a one-line
            :class:`~curvkit.CurvkitError`. Applied, after ``option_checks``, where ``N``
            is known before the solver runs: by :func:`curvkit.solve` and
            :func:`curvkit.inverse` for an operator with data (one pass over them to
            count the samples, only when such an option is given), and by
            ``curvkit analyze`` once the data are loaded, before anything is written.
            An operator without data (a dense matrix) has no ``N``: the solver decides.
        plugin: Set by the registry.
    """

    name: str
    solve: Callable[..., Any]
    description: str = ""
    psd_only: bool = False
    option_checks: dict[str, Callable[[Any, str], Any]] = field(default_factory=dict)
    dimension_checks: dict[str, Callable[[Any, str, int], Any]] = field(default_factory=dict)
    sample_checks: dict[str, Callable[[Any, str, int], Any]] = field(default_factory=dict)
    plugin: str = ""
