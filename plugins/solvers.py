"""The built-in solvers: a plugin on ``curvkit_register_solvers``.

``exact``, ``cg``, ``minres``, ``neumann``, ``lissa``, ``kfac``, ``ekfac`` and
``lowrank``.

The algorithms are in :mod:`curvkit.linalg.krylov`, :mod:`curvkit.linalg.series`
and :mod:`curvkit.linalg.direct`; this plugin registers them exactly as a
third-party package registers its own.
"""

from __future__ import annotations

from functools import partial

import curvkit
from curvkit.linalg.direct import approximate_inverse, exact_solve, lowrank
from curvkit.linalg.krylov import conjugate_gradient, minres
from curvkit.linalg.series import lissa, neumann


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
        ),
        curvkit.SolverSpec(
            "lissa",
            lissa,
            "LiSSA: the Neumann series on a fresh seeded mini-batch per step, repeats averaged; the "
            "residual is measured only with check_every.",
            psd_only=True,
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
        ),
    ]
