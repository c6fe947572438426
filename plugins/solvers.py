"""The built-in solvers (exact, cg, minres, neumann): a plugin on ``curvkit_register_solvers``.

The algorithms are in :mod:`curvkit.linalg.solve`; this plugin registers them
exactly as a third-party package registers its own.
"""

from __future__ import annotations

import curvkit
from curvkit.linalg.solve import conjugate_gradient, exact_solve, minres, neumann


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
    ]
