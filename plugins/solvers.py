"""The built-in solvers: a plugin on ``curvkit_register_solvers``.

``exact``, ``cg``, ``minres``, ``neumann``, ``lissa``, ``kfac``, ``ekfac`` and
``lowrank``.

The algorithms are in :mod:`curvkit.linalg.krylov`, :mod:`curvkit.linalg.series`
and :mod:`curvkit.linalg.direct`; this plugin registers them exactly as a
third-party package registers its own. Each declares how its options' values are
checked (``SolverSpec.option_checks``, with the checks of :mod:`curvkit.arguments`;
``dimension_checks`` for ``lowrank``'s ``rank``, at most ``P``; ``sample_checks`` for
``lissa``'s ``batch_size``, at most the samples ``N`` of the operator's data), so
that a value out of range is refused before the solver runs. The solvers check
again themselves, for direct calls.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import curvkit
from curvkit.arguments import integer, positive_number, relative_tolerance, seed
from curvkit.linalg.direct import approximate_inverse, exact_solve, lowrank
from curvkit.linalg.krylov import conjugate_gradient, minres
from curvkit.linalg.series import lissa, neumann


def _scale(value: Any, name: str) -> float | None:
    """The scale ``eta`` of a Neumann series: a finite number ``> 0``, or ``None`` (estimated)."""
    return None if value is None else positive_number(value, name)


def _at_most_p(value: int, name: str, P: int) -> None:
    """An integer ``>= 1`` (checked first) that must also be at most ``P``: ``lowrank``'s ``rank``."""
    if value > P:
        raise curvkit.CurvkitError(f"{name} must be an integer in 1..{P}, got {value!r}")


def _at_most_n(value: int | None, name: str, N: int) -> None:
    """An integer ``>= 1`` or ``None`` (checked first) that must also be at most ``N``: ``lissa``'s
    ``batch_size``, samples per mini-batch."""
    if value is not None and value > N:
        raise curvkit.CurvkitError(f"{name} must be an integer in 1..{N} (the samples), got {value!r}")


@curvkit.hookimpl
def curvkit_register_solvers() -> list[curvkit.SolverSpec]:
    return [
        curvkit.SolverSpec(
            "exact",
            exact_solve,
            "A.solve(B, damping): the operator's structure (KFAC), else the dense matrix (small P).",
        ),
        curvkit.SolverSpec(
            "cg",
            conjugate_gradient,
            "Preconditioned conjugate gradients; stops at non-positive curvature, saying where.",
            psd_only=True,
        ),
        curvkit.SolverSpec("minres", minres, "MINRES for symmetric, possibly indefinite systems."),
        curvkit.SolverSpec(
            "neumann",
            neumann,
            "Truncated Neumann series, scale 1/lambda_max unless given; stops when it diverges.",
            psd_only=True,
            option_checks={"scale": _scale},
        ),
        curvkit.SolverSpec(
            "lissa",
            lissa,
            "LiSSA: the Neumann series on a fresh seeded mini-batch per step, repeats averaged; the "
            "residual is measured only with check_every.",
            psd_only=True,
            option_checks={
                "scale": _scale,
                "batch_size": partial(integer, allow_none=True),
                "repeats": integer,
                "seed": seed,
                "check_every": partial(integer, allow_none=True),
            },
            sample_checks={"batch_size": _at_most_n},
        ),
        curvkit.SolverSpec(
            "kfac",
            partial(approximate_inverse, estimator="kfac"),
            "KFAC of the operator's problem, inverted from its factors; the residual against A is reported.",
        ),
        curvkit.SolverSpec(
            "ekfac",
            partial(approximate_inverse, estimator="ekfac"),
            "EKFAC of the operator's problem, inverted in its eigenbasis; the residual against A is "
            "reported.",
        ),
        curvkit.SolverSpec(
            "lowrank",
            lowrank,
            "Top-k eigenpairs (Lanczos) inverted in their subspace, 1/damping in the complement.",
            psd_only=True,
            option_checks={
                "rank": integer,
                "eigen_tol": relative_tolerance,
                "max_matvecs": partial(integer, allow_none=True),
                "seed": seed,
            },
            dimension_checks={"rank": _at_most_p},
        ),
    ]
