"""The Newton summary: the Hessian and third-order information reduced to one number per subset.

P. Wolinski ("Adapting Newton's Method to Neural Networks through a Summary of
Higher-Order Derivatives", arXiv 2312.03885, 2023) takes a direction ``u`` (the
gradient, with momentum in training) and a partition ``T_1..T_S`` of the
parameters (:mod:`curvkit.partition`), and steps
``theta <- theta - sum_s eta_s v_s`` with ``v_s`` the restriction of ``u`` to
``T_s`` (zeros elsewhere). The second-order model of the loss along these ``S``
directions, and its third-order regulariser, need only

.. math::

    \\bar g_s = g \\cdot v_s, \\qquad \\bar H_{st} = v_s^T H v_t, \\qquad
    D^{(3)}_s = \\frac{d^3}{dt^3} L(\\theta + t v_s)\\Big|_{t=0}, \\qquad
    D = \\operatorname{diag}(|D^{(3)}_s|^{1/3}),

that is one gradient, one product of ``H`` with the ``S`` columns ``v_s`` (one
pass over the data) and ``S`` third directional derivatives (nested forward-mode
derivatives: :func:`curvkit.third_order.third_directional_derivatives`), instead of
anything of size ``P x P``. :meth:`SummaryResult.learning_rates` turns it into
the per-subset learning rates: the Newton step ``H_bar^-1 g_bar``, or the
anisotropic Nesterov cubic-regularised step (:func:`curvkit.cubic.cubic_step`).

``H_bar`` may be built from another curvature than the Hessian (``curvature=``,
e.g. the GGN: a positive semi-definite summary); ``D3`` is always the loss's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvkit.directions import resolve_direction
from curvkit.errors import CurvkitError, ShapeMismatchError
from curvkit.snapshot import fixed_model_state

__all__ = ["SummaryResult", "newton_summary", "subset_directions"]


@dataclass
class SummaryResult:
    """``(g_bar, H_bar, D3, D)`` of a model over a partition, along a direction.

    Attributes:
        partition: Its name (``"canonical"``, ``"wb"``, ``"trivial"``, ``"custom"``).
        subsets: The parameter names of each subset.
        direction: What ``u`` is: ``"gradient"``, ``"random"`` or ``"tensor"``.
        curvature: The operator ``H_bar`` comes from (``"hessian"`` unless another was given).
        g_bar: ``[S]``: ``g . v_s``.
        H_bar: ``[S, S]``: ``v_s^T H v_t``, symmetrised.
        D3: ``[S]``: the third directional derivatives of the loss along each ``v_s``.
        asymmetry: ``||H_bar - H_bar^T|| / ||H_bar||`` before symmetrising (rounding).
        matvecs: Products with the curvature operator (columns).
        damping_int: ``lambda_int`` of the cubic-regularised learning rates this
            summary is shown with (:meth:`learning_rates`); 0: Newton's.
    """

    partition: str
    subsets: list[list[str]]
    direction: str
    curvature: str
    g_bar: Tensor
    H_bar: Tensor
    D3: Tensor
    asymmetry: float = 0.0
    matvecs: int = 0
    damping_int: float = 0.0

    @property
    def d(self) -> Tensor:
        """``d_s = |D3_s|^(1/3)``: the diagonal of ``D``."""
        return self.D3.abs().pow(1.0 / 3.0)

    def learning_rates(self, damping_int: float | None = None, on_unbounded: str = "raise") -> Any:
        """The per-subset learning rates: :func:`curvkit.cubic.cubic_step` of this summary.

        ``damping_int`` (default: :attr:`damping_int`) 0 gives the Newton step
        ``H_bar^-1 g_bar``; above, the anisotropic Nesterov cubic-regularised step
        of Wolinski (the solution of largest ``||D eta||`` of
        ``eta = (H_bar + (damping_int / 2) ||D eta|| D^2)^-1 g_bar``).

        Returns:
            A :class:`curvkit.cubic.CubicStep` (``.eta``, ``.case``, ``.detail``).

        Raises:
            UnboundedModelError: The model has no minimiser (``H_bar`` indefinite on
                unregularised subsets) and ``on_unbounded="raise"``.
        """
        from curvkit.cubic import cubic_step

        damping = self.damping_int if damping_int is None else damping_int
        return cubic_step(self.g_bar, self.H_bar, self.d, damping, on_unbounded=on_unbounded)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (numbers and lists), e.g. for JSON."""
        return {
            "partition": self.partition,
            "subsets": self.subsets,
            "direction": self.direction,
            "curvature": self.curvature,
            "g_bar": self.g_bar.tolist(),
            "H_bar": self.H_bar.tolist(),
            "D3": self.D3.tolist(),
            "asymmetry": self.asymmetry,
            "matvecs": self.matvecs,
            "damping_int": self.damping_int,
        }


def subset_directions(problem: Any, subsets: Sequence[Sequence[str]], u: Tensor) -> Tensor:
    """``V`` ``[P, S]``: column ``s`` is ``u`` on the parameters of subset ``s``, zero elsewhere.

    Raises:
        CurvkitError: A subset naming a parameter the problem does not analyse, an
            empty subset, or a parameter in two subsets.
    """
    slices = problem.layout.slices()
    V = torch.zeros(u.shape[0], len(subsets), dtype=u.dtype, device=u.device)
    seen: set[str] = set()
    for s, names in enumerate(subsets):
        if not names:
            raise CurvkitError(f"subset {s} of the partition is empty")
        for name in names:
            if name not in slices:
                raise CurvkitError(
                    f"subset {s} names {name!r}, which the problem does not analyse (its parameters: "
                    f"{', '.join(list(slices)[:4])}{', ...' if len(slices) > 4 else ''})"
                )
            if name in seen:
                raise CurvkitError(f"parameter {name!r} is in two subsets of the partition")
            seen.add(name)
            V[slices[name], s] = u[slices[name]]
    return V


def _subsets(problem: Any, partition: Any) -> tuple[str, list[list[str]]]:
    from curvkit import partition as partitions

    if isinstance(partition, str):
        return partition, partitions.named(problem.model, partition)[1]
    if isinstance(partition, tuple) and len(partition) == 2 and isinstance(partition[1], list):
        return "custom", [list(group) for group in partition[1]]
    return "custom", partitions.custom(problem.model, partition)[1]


@fixed_model_state()
def newton_summary(
    problem: Any,
    partition: Any = "canonical",
    direction: str | Tensor = "gradient",
    *,
    curvature: Any = None,
    seed: int | None = 0,
    damping_int: float = 0.0,
) -> SummaryResult:
    """``(g_bar, H_bar, D3)`` of ``problem`` over ``partition`` along ``direction``.

    Args:
        problem: A :class:`~curvkit.Problem` (its full data; ``problem.to(torch.float64)``
            for a float64 summary).
        partition: ``"canonical"``, ``"wb"``, ``"trivial"``, a ``(param_groups,
            name_groups)`` pair from :mod:`curvkit.partition`, or subsets for
            :func:`curvkit.partition.custom`. Subsets name parameters the problem analyses.
        direction: ``"gradient"`` (the full-data gradient), ``"random"`` (seeded
            standard normal) or a ``[P]`` tensor (:func:`curvkit.resolve_direction`).
        curvature: The operator ``H_bar`` is built from (default: the Hessian of
            ``problem``, ``curvkit.curvature("hessian", problem)``).
        seed: Seed of a random direction (``None``: a fresh one).
        damping_int: Kept in the result for :meth:`SummaryResult.learning_rates`.

    Raises:
        CurvkitError: A bad partition or direction (a tensor with NaN or infinite
            entries too), a non-finite summary.
        ShapeMismatchError: A direction tensor of the wrong size, or not floating point.
    """
    from curvkit.registry import curvature as build
    from curvkit.third_order import third_directional_derivatives

    name, subsets = _subsets(problem, partition)
    _, g = problem.loss_and_gradient()
    u = resolve_direction(problem, direction, seed, gradient=g)
    label = direction if isinstance(direction, str) else "tensor"
    V = subset_directions(problem, subsets, u)
    A = curvature if curvature is not None else build("hessian", problem)
    if A.shape[0] != problem.dim:
        raise ShapeMismatchError(f"the curvature has P = {A.shape[0]:,}, the problem P = {problem.dim:,}")
    AV = A.matmat(V.to(A.dtype)).to(V.dtype)  # an operator in another dtype (astype) computes in its own
    H_bar = V.T @ AV
    scale = H_bar.norm().clamp_min(torch.finfo(H_bar.dtype).tiny)
    asymmetry = float((H_bar - H_bar.T).norm() / scale)
    H_bar = (H_bar + H_bar.T) / 2
    D3 = third_directional_derivatives(problem, V)
    g_bar = V.T @ g
    for what, value in (("g_bar", g_bar), ("H_bar", H_bar), ("D3", D3)):
        if not bool(torch.isfinite(value).all()):
            raise CurvkitError(f"the summary's {what} is not finite: {value.tolist()}")
    return SummaryResult(
        name,
        subsets,
        label,
        getattr(A, "name", type(A).__name__),
        g_bar.detach().cpu(),
        H_bar.detach().cpu(),
        D3.detach().cpu(),
        asymmetry,
        V.shape[1],
        float(damping_int),
    )
