"""Third-order directional information: the per-batch kernel of the Newton summary.

For a scalar loss ``L`` of parameters ``theta`` and ``S`` directions ``v_1..v_S``,

.. math::

    \\bar g_s = \\nabla L \\cdot v_s, \\qquad
    \\bar H_{ts} = v_t^T H v_s, \\qquad
    D^{(3)}_s = \\frac{d^3}{dt^3} L(\\theta + t v_s)\\Big|_{t=0}
             = v_s \\cdot \\nabla_\\theta (v_s^T H v_s),

(P. Wolinski, "Adapting Newton's Method to Neural Networks through a Summary of
Higher-Order Derivatives", arXiv 2312.03885, 2023). :func:`directional_summary`
computes all three from one graph of the loss: the gradient with its graph
(``create_graph``), then per direction one backward pass through it for
``H v_s`` (kept with its graph) and one more for ``grad(v_s^T H v_s)``. It is
the one loop shared by the analysis (:func:`third_directional_derivatives`, per
batch of a :class:`~curvkit.Problem`, through its one reduction) and the
``NewtonSummary`` optimizer (on its ``hg_loader`` batch).

Third derivatives through the fused normalisation kernels are wrong in torch
2.13, so callers build the loss under :class:`curvkit.CompositeNorms`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from curvkit.autodiff import hessian_batch_product
from curvkit.composite_norms import CompositeNorms
from curvkit.errors import CurvkitError
from curvkit.problem import Problem

__all__ = ["D3_METHODS", "directional_summary", "third_directional_derivatives"]

D3_METHODS = ("autodiff", "finite-difference")
"""How :func:`third_directional_derivatives` differentiates thrice."""


def _dot(a: Sequence[Tensor | None], b: Sequence[Tensor | None]) -> Tensor:
    """``sum_i <a_i, b_i>`` over the parts where both are present (a 0-dim tensor)."""
    terms = [(x * y).sum() for x, y in zip(a, b) if x is not None and y is not None]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def directional_summary(
    loss: Tensor,
    leaves: Sequence[Tensor],
    directions: Sequence[Sequence[Tensor | None]],
    *,
    hessian: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(g_bar [S], H_bar [S, S], D3 [S])`` of ``loss`` along each direction (see the module docstring).

    Args:
        loss: A 0-dim tensor computed from ``leaves`` with autograd recording (its
            gradient graph is built here; nothing is accumulated into ``.grad``).
        leaves: The tensors differentiated for (``requires_grad``); a leaf the loss
            does not use has zero derivatives.
        directions: ``S`` directions, each one tensor per leaf shaped like it, or
            ``None`` where the direction is zero (a subset's direction: ``u`` on the
            subset's leaves, ``None`` elsewhere).
        hessian: ``False`` leaves ``H_bar``'s off-diagonal entries zero (they cost one
            ``[P, S]`` matrix product per direction, no extra pass).

    Returns:
        Detached tensors in the loss's dtype; ``H_bar`` is the measured matrix
        (symmetric up to rounding), not symmetrised.
    """
    leaves = list(leaves)
    grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    S = len(directions)
    options = {"dtype": loss.dtype, "device": loss.device}
    g_bar = torch.zeros(S, **options)
    H_bar = torch.zeros(S, S, **options)
    D3 = torch.zeros(S, **options)
    # the directions as one [P, S] matrix: a column of H_bar is one product with it
    V = torch.stack([_flat(v, leaves) for v in directions], dim=1) if hessian else None
    for s, v in enumerate(directions):
        gv = _dot(grads, v)
        g_bar[s] = gv.detach()
        if not gv.requires_grad:  # the loss is affine along v_s
            continue
        hv = torch.autograd.grad(gv, leaves, create_graph=True, allow_unused=True)
        if V is not None:
            H_bar[:, s] = V.T @ _flat(hv, leaves).detach()
        vhv = _dot(hv, v)
        if V is None:
            H_bar[s, s] = vhv.detach()
        if vhv.requires_grad:  # else the loss is quadratic along v_s: D3_s = 0
            tv = torch.autograd.grad(vhv, leaves, retain_graph=True, allow_unused=True)
            D3[s] = _dot(tv, v).detach()
    return g_bar, H_bar, D3


def _flat(parts: Sequence[Tensor | None], leaves: Sequence[Tensor]) -> Tensor:
    """Per-leaf parts (``None``: zeros) as one flat ``[P]`` vector."""
    return torch.cat(
        [(torch.zeros_like(leaf) if part is None else part).reshape(-1) for part, leaf in zip(parts, leaves)]
    )


def third_directional_derivatives(problem: Problem, V: Tensor, method: str = "autodiff") -> Tensor:
    """``d^3/dt^3 L(theta + t v_s)`` at ``t = 0`` for every column ``v_s`` of ``V`` ``[P, S]``.

    The third derivative of the full-dataset loss along each direction,
    ``sum_ijk T_ijk v_i v_j v_k`` with ``T`` the third-derivative tensor, no
    tensor formed, in one pass over the data for all columns (each batch's sums
    through :meth:`~curvkit.Problem.data_mean`, so the result does not depend on
    the batch size). Two ways:

    * ``"autodiff"`` (default): :func:`directional_summary` on each batch's loss
      sum, built under :class:`~curvkit.CompositeNorms`: three reverse passes
      per direction.
    * ``"finite-difference"``: the central difference of ``q(t) = v^T H(theta + t v) v``
      (Hessian-vector products by double backward), extrapolated (Richardson)
      from the steps ``h`` and ``h / 2``, ``h = eps^(1/5) max(1, |theta|) / |v|``:
      error ``O(h^4)``, computed in float64 whatever the problem's dtype (four
      products per direction). An independent cross-check.

    Returns:
        ``[S]``, in the problem's dtype.

    Raises:
        CurvkitError: An unknown method.
    """
    if method not in D3_METHODS:
        raise CurvkitError(f"unknown third-derivative method {method!r}; use one of {list(D3_METHODS)}")
    if method == "finite-difference":
        precise = problem if problem.dtype == torch.float64 else problem.to(torch.float64)
        return _third_by_differences(precise, V.to(torch.float64)).to(problem.dtype)
    directions = [problem.layout.unflatten(V[:, s].to(problem.dtype)) for s in range(V.shape[1])]

    def per_batch(inputs: Any, targets: Tensor) -> tuple[Tensor, float]:
        leaves = [p.detach().requires_grad_(True) for p in problem.params]
        with CompositeNorms():
            total, count = problem.loss_terms(leaves, inputs, targets)
        _, _, D3 = directional_summary(total, leaves, directions, hessian=False)
        return D3.to(problem.dtype), count

    with torch.enable_grad():
        return problem.data_mean(per_batch)


def _third_by_differences(problem: Problem, V: Tensor) -> Tensor:
    """Richardson-extrapolated central differences of ``v^T H(theta + t v) v`` (see above)."""
    theta = problem.layout.flatten([p.detach() for p in problem.params])
    eps = torch.finfo(torch.float64).eps
    steps = []
    for s in range(V.shape[1]):
        norm = V[:, s].norm().item()
        steps.append(eps**0.2 * max(1.0, theta.norm().item()) / norm if norm > 0 else 0.0)

    def per_batch(inputs: Any, targets: Tensor) -> tuple[Tensor, float]:
        values, count = [], 0.0
        for s, h in enumerate(steps):
            v = V[:, s]
            if h == 0.0:
                values.append(V.new_zeros(()))
                continue
            parts = problem.layout.unflatten(v.unsqueeze(0).T)  # per parameter [1, *shape]
            parts = [p.movedim(-1, 0) for p in parts]

            def q(t: float) -> Tensor:
                nonlocal count
                shifted = problem.layout.unflatten(theta + t * v)
                products, count = hessian_batch_product(problem, shifted, inputs, targets, parts)
                return sum((hp[0] * vp[0]).sum() for hp, vp in zip(products, parts))

            coarse = (q(h) - q(-h)) / (2 * h)
            fine = (q(h / 2) - q(-h / 2)) / h
            values.append((4 * fine - coarse) / 3)
        return torch.stack(values).detach(), count

    return problem.data_mean(per_batch)
