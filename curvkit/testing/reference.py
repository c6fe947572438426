"""Dense ground truth for curvature estimators, computed independently.

The reference Hessian is assembled column by column from Hessian-vector
products with basis vectors, by plain autograd double backward through one graph
of the *whole* dataset loss (summed over the data by the problem's one loop, but
differentiated independently of :mod:`curvkit.autodiff`), and can be
cross-checked by central finite differences of the gradient:

.. math::
    H e_i \\approx \\frac{\\nabla L(\\theta + \\varepsilon e_i)
    - \\nabla L(\\theta - \\varepsilon e_i)}{2\\varepsilon}.

``torch.func.hessian`` is deliberately not used: in torch 2.13 it returns a
wrong, non-symmetric matrix when LayerNorm parameters are differentiated.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from curvkit.problem import Problem

__all__ = ["REFERENCES", "dense_hessian_reference", "finite_difference_hessian", "resolve_reference"]


def dense_hessian_reference(problem: Problem) -> Tensor:
    """The ``[P, P]`` Hessian of the problem's full-dataset loss (for small problems)."""
    leaves = [p.detach().requires_grad_(True) for p in problem.params]
    with torch.enable_grad():
        loss = problem.data_mean(lambda inputs, targets: problem.loss_terms(leaves, inputs, targets))
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        flat = torch.cat(
            [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, leaves)]
        )
        P = flat.numel()
        H = torch.zeros(P, P, dtype=problem.dtype, device=problem.device)
        if not flat.requires_grad:
            return H
        for i in range(P):
            row = torch.autograd.grad(flat[i], leaves, retain_graph=True, allow_unused=True)
            H[i] = torch.cat(
                [(r if r is not None else torch.zeros_like(p)).reshape(-1) for r, p in zip(row, leaves)]
            )
    return H


def finite_difference_hessian(problem: Problem, eps: float = 1e-5) -> Tensor:
    """Central finite differences of the full-dataset gradient (float64 advised).

    Perturbs the model's parameters in place, one coordinate at a time, and
    restores them afterwards.
    """
    params = problem.params
    P = problem.dim
    H = torch.zeros(P, P, dtype=problem.dtype, device=problem.device)
    offsets = problem.layout.offsets
    with torch.no_grad():
        for p, start in zip(params, offsets):
            flat = p.view(-1)
            for k in range(flat.numel()):
                original = flat[k].item()
                flat[k] = original + eps
                g_plus = problem.loss_and_gradient()[1]
                flat[k] = original - eps
                g_minus = problem.loss_and_gradient()[1]
                flat[k] = original
                H[:, start + k] = (g_plus - g_minus) / (2 * eps)
    return H


REFERENCES: dict[str, Callable[[Problem], Tensor]] = {"hessian": dense_hessian_reference}


def resolve_reference(
    reference: str | Callable[[Problem], Tensor] | None,
) -> Callable[[Problem], Tensor] | None:
    """A reference name (see :data:`REFERENCES`) or callable, as a callable."""
    if reference is None or callable(reference):
        return reference
    if reference not in REFERENCES:
        raise KeyError(f"unknown reference {reference!r}; known: {sorted(REFERENCES)}")
    return REFERENCES[reference]
