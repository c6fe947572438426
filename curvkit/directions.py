"""A direction in parameter space, by name or as a tensor: ``"gradient"``, ``"random"`` or ``[P]``.

Several analyses take a vector ``u`` of the ``P`` parameters: the right-hand side
of :func:`curvkit.ihvp_accuracy`, the direction of :func:`curvkit.newton_summary`,
the direction the ``d3`` estimator contracts its third derivatives with. They all
read it with :func:`resolve_direction`, so the names, the random numbers and the
errors are the same everywhere:

* ``"gradient"``: the full-data gradient of the problem (one pass over the data);
* ``"random"``: a standard normal vector drawn in float64 on the CPU from a
  seeded :class:`torch.Generator` (the same numbers on every device and dtype),
  then cast;
* a flat ``[P]`` floating-point tensor, checked, detached and copied.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvkit.errors import CurvkitError, ShapeMismatchError
from curvkit.linalg._common import probe_generator
from curvkit.problem import Problem

__all__ = ["DIRECTIONS", "resolve_direction"]

DIRECTIONS = ("gradient", "random")
"""The named directions; a ``[P]`` tensor is the third way."""


def resolve_direction(
    source: Any,
    direction: str | Tensor,
    seed: int | None = 0,
    *,
    gradient: Tensor | None = None,
    what: str = "direction",
) -> Tensor:
    """The flat ``[P]`` vector ``u`` that ``direction`` names, in the dtype and on the device of ``source``.

    Args:
        source: A :class:`~curvkit.Problem` (``P`` is its :attr:`~curvkit.Problem.dim`),
            or a curvature operator (``P`` is its size; ``"gradient"`` is that of its
            ``problem``, when it has one).
        direction: ``"gradient"`` (the full-data gradient, after
            :meth:`~curvkit.Problem.ensure_deterministic`), ``"random"`` (standard
            normal, drawn in float64 on the CPU from ``seed``, then cast) or a ``[P]``
            floating-point tensor (detached and copied).
        seed: Seed of ``"random"`` (``None``: a fresh one).
        gradient: The gradient, when the caller has already computed it: used for
            ``"gradient"`` instead of another pass over the data.
        what: What the vector is called in error messages (``"vector"``, ``"d3 direction"``).

    Returns:
        ``u``, a new ``[P]`` tensor (the gradient, given or computed, is not copied
        when it already has the dtype and device: a detached view of it).

    Raises:
        CurvkitError: An unknown name or another type, ``"gradient"`` without a
            problem to take it of, a tensor with NaN or infinite entries.
        ShapeMismatchError: A tensor that is not ``[P]`` or not floating-point, a
            gradient that is not ``[P]``.

    Example:
        >>> problem = Problem(torch.nn.Linear(2, 1).double(), "mse", (torch.ones(4, 2), torch.zeros(4, 1)))
        >>> resolve_direction(problem, "random", seed=0)
        tensor([ 1.5410, -0.2934, -2.1788], dtype=torch.float64)
        >>> resolve_direction(problem, torch.ones(2), what="vector")
        Traceback (most recent call last):
        ...
        curvkit.errors.ShapeMismatchError: the vector must be a floating-point [P] tensor ... got (2,) ...
    """
    is_problem = isinstance(source, Problem)
    P = source.dim if is_problem else source.shape[0]
    dtype, device = source.dtype, source.device
    if isinstance(direction, str):
        if direction == "gradient":
            if gradient is None:
                problem = source if is_problem else getattr(source, "problem", None)
                if problem is None:
                    raise CurvkitError(
                        f"the {what} 'gradient' needs a data-backed operator (one with a problem), not a "
                        f"{type(source).__name__}: give 'random' or a [P] tensor"
                    )
                problem.ensure_deterministic()
                gradient = problem.loss_and_gradient()[1]
            if tuple(gradient.shape) != (P,):
                raise ShapeMismatchError(
                    f"the gradient has shape {tuple(gradient.shape)}, the {what} P = {P:,}"
                )
            return gradient.detach().to(device=device, dtype=dtype)
        if direction == "random":
            u = torch.randn(P, generator=probe_generator(seed), dtype=torch.float64)  # None: fresh
            return u.to(device=device, dtype=dtype)
        raise CurvkitError(
            f"unknown {what} {direction!r}; use 'gradient', 'random' or a [P] tensor (P = {P:,})"
        )
    if not isinstance(direction, Tensor):
        raise CurvkitError(
            f"the {what} must be 'gradient', 'random' or a [P] tensor, got {type(direction).__name__}"
        )
    if tuple(direction.shape) != (P,) or not direction.is_floating_point():
        raise ShapeMismatchError(
            f"the {what} must be a floating-point [P] tensor with P = {P:,}, got {tuple(direction.shape)} "
            f"{direction.dtype}"
        )
    if not bool(torch.isfinite(direction).all()):
        raise CurvkitError(f"the {what} has NaN or infinite entries")
    return direction.detach().to(device=device, dtype=dtype, copy=True)
