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

The Gauss-Newton family is built from dense matrices of a whole batch, by code
that shares nothing with the estimators' products:

* the ``[M, P]`` Jacobian of the batch's ``M`` outputs w.r.t. the flat
  parameters, by first-order ``torch.func.jacrev`` (correct, unlike the
  second-order ``torch.func.hessian``);
* ``ggn``: ``J^T H J`` with the dense output Hessian ``H`` by double backward of
  the batch's summed loss w.r.t. the outputs;
* ``fisher``: ``J^T F J`` with the dense ``F = E_y[g g^T]`` by enumerating the
  outcomes of the predictive distribution (classes for cross-entropy and NLL,
  ``{0, 1}`` per entry for binary cross-entropy) with gradients by autograd, and
  ``4 sigma^2 I = 2 I`` for the squared error as the Gaussian of variance 1/2;
* ``empirical-fisher``: ``sum_n g_n g_n^T`` with each sample's gradient from its
  own plain autograd pass (a batch of one).

Each is summed over batches and normalised by the problem's one loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from curvkit.errors import CurvkitError
from curvkit.losses import BinaryCrossEntropyWithLogits, CrossEntropy, MeanSquaredError, NegativeLogLikelihood
from curvkit.operator import CurvatureOperator
from curvkit.problem import Problem

__all__ = [
    "REFERENCES",
    "dense_empirical_fisher_reference",
    "dense_fisher_reference",
    "dense_ggn_reference",
    "dense_hessian_reference",
    "finite_difference_hessian",
    "resolve_reference",
]


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


def _jacobian(problem: Problem, inputs: Any) -> tuple[Tensor, Tensor]:
    """A batch's outputs and their ``[M, P]`` Jacobian w.r.t. the flat parameters (``jacrev``)."""

    def outputs_of(flat: Tensor) -> Tensor:
        return problem.forward(problem.layout.unflatten(flat), inputs)

    flat = problem.flat_params()
    outputs = outputs_of(flat).detach()
    return outputs, torch.func.jacrev(outputs_of)(flat).reshape(outputs.numel(), flat.numel())


def _output_gradient(
    problem: Problem, outputs: Tensor, targets: Tensor, create_graph: bool = False
) -> Tensor:
    """``dS_b / do`` by autograd (with its graph w.r.t. the leaf ``outputs`` if asked)."""
    total, _ = problem.loss.sum_and_count(outputs, targets)
    if not total.requires_grad:
        return torch.zeros_like(outputs)
    (gradient,) = torch.autograd.grad(total, outputs, create_graph=create_graph, allow_unused=True)
    return torch.zeros_like(outputs) if gradient is None else gradient


def _output_hessian(problem: Problem, outputs: Tensor, targets: Tensor) -> Tensor:
    """The dense ``[M, M]`` Hessian of ``S_b`` w.r.t. the outputs, row by row (double backward)."""
    M = outputs.numel()
    H = outputs.new_zeros(M, M)
    leaf = outputs.detach().requires_grad_(True)
    with torch.enable_grad():
        gradient = _output_gradient(problem, leaf, targets, create_graph=True).reshape(-1)
        if not gradient.requires_grad:  # linear in the outputs (NLL)
            return H
        for i in range(M):
            (row,) = torch.autograd.grad(gradient[i], leaf, retain_graph=True, allow_unused=True)
            if row is not None:
                H[i] = row.reshape(-1)
    return H


def _output_fisher(problem: Problem, outputs: Tensor, targets: Tensor) -> Tensor:
    """The dense ``[M, M]`` ``E_{y ~ p(y|o)}[g g^T]``, ``g = dS_b(o, y)/do``, by enumerating outcomes."""
    loss = problem.loss
    if not loss.is_negative_log_likelihood:
        raise CurvkitError(f"loss {loss.name!r} is not a negative log-likelihood: it has no Fisher")
    M = outputs.numel()
    leaf = outputs.detach().requires_grad_(True)
    if isinstance(loss, MeanSquaredError):  # y = o + sigma eps, sigma^2 = 1/2: g = -2 sigma eps
        return 4 * 0.5 * torch.eye(M, dtype=outputs.dtype, device=outputs.device)
    F = outputs.new_zeros(M, M)
    with torch.enable_grad():
        if isinstance(loss, BinaryCrossEntropyWithLogits):  # independent Bernoulli entries
            s = torch.sigmoid(outputs).reshape(-1)
            for y, probability in ((1.0, s), (0.0, 1 - s)):
                g = _output_gradient(problem, leaf, torch.full_like(outputs, y)).reshape(-1)
                F += torch.diag(probability * g * g)
            return F
        if not isinstance(loss, CrossEntropy | NegativeLogLikelihood):
            raise CurvkitError(f"no dense Fisher reference for loss {loss.name!r}")
        C = outputs.shape[1]  # categorical over dim 1 at every sample and position
        blocks = torch.arange(M, device=outputs.device).reshape(outputs.shape).movedim(1, -1).reshape(-1, C)
        p = torch.softmax(outputs, dim=1).movedim(1, -1).reshape(-1, C)
        ignored = (
            targets == loss.ignore_index
            if not targets.is_floating_point()
            else torch.zeros(targets.shape[:1] + targets.shape[2:], dtype=torch.bool)
        )
        for c in range(C):
            y = torch.full(ignored.shape, c, dtype=torch.long, device=outputs.device)
            y[ignored] = loss.ignore_index  # ignored positions stay ignored
            g = _output_gradient(problem, leaf, y).movedim(1, -1).reshape(-1, C)
            F[blocks[:, :, None], blocks[:, None, :]] += p[:, c, None, None] * g[:, :, None] * g[:, None, :]
    return F


def _sandwich_reference(problem: Problem, middle: Callable[[Problem, Tensor, Tensor], Tensor]) -> Tensor:
    """``(1/C) sum_b J_b^T middle(o_b) J_b`` with dense per-batch matrices."""

    def per_batch(inputs: Any, targets: Tensor) -> tuple[Tensor, float]:
        outputs, J = _jacobian(problem, inputs)
        return J.T @ middle(problem, outputs, targets) @ J, problem.loss.count(outputs, targets)

    return problem.data_mean(per_batch)


def dense_ggn_reference(problem: Problem) -> Tensor:
    """The ``[P, P]`` generalised Gauss-Newton matrix ``(1/C) sum_b J_b^T H_b J_b`` (small problems)."""
    return _sandwich_reference(problem, _output_hessian)


def dense_fisher_reference(problem: Problem) -> Tensor:
    """The ``[P, P]`` exact Fisher ``(1/C) sum_b J_b^T E[g g^T] J_b`` of a negative log-likelihood.

    For the closed-form losses (cross-entropy, NLL, binary cross-entropy on
    logits, squared error).

    Raises:
        CurvkitError: The loss is not a negative log-likelihood, or not one of those.
    """
    return _sandwich_reference(problem, _output_fisher)


def dense_empirical_fisher_reference(problem: Problem) -> Tensor:
    """The ``[P, P]`` empirical Fisher ``(1/C) sum_n g_n g_n^T``, one autograd pass per sample."""
    leaves = [p.detach().requires_grad_(True) for p in problem.params]
    P = problem.dim

    def per_batch(inputs: Any, targets: Tensor) -> tuple[Tensor, float]:
        total, count = torch.zeros(P, P, dtype=problem.dtype, device=problem.device), 0.0
        for n in range(targets.shape[0]):
            sample = (
                {k: v[n : n + 1] for k, v in inputs.items()}
                if isinstance(inputs, Mapping)
                else inputs[n : n + 1]
            )
            s, c = problem.loss_terms(leaves, sample, targets[n : n + 1])
            grads = (
                torch.autograd.grad(s, leaves, allow_unused=True) if s.requires_grad else [None] * len(leaves)
            )
            g = torch.cat(
                [(torch.zeros_like(p) if d is None else d).reshape(-1) for d, p in zip(grads, leaves)]
            )
            total += torch.outer(g, g)
            count += c
        return total, count

    with torch.enable_grad():
        return problem.data_mean(per_batch)


REFERENCES: dict[str, Callable[[Problem], Tensor]] = {
    "hessian": dense_hessian_reference,
    "ggn": dense_ggn_reference,
    "fisher": dense_fisher_reference,
    "empirical-fisher": dense_empirical_fisher_reference,
}


def resolve_reference(
    reference: str | type[CurvatureOperator] | Callable[[Problem], Tensor] | None,
) -> Callable[[Problem], Tensor] | None:
    """A reference name (see :data:`REFERENCES`), operator class (its dense matrix) or callable, as a
    callable ``problem -> [P, P]``."""
    if isinstance(reference, type) and issubclass(reference, CurvatureOperator):
        operator = reference
        return lambda problem: operator(problem).to_dense(max_dim=problem.dim)
    if reference is None or callable(reference):
        return reference
    if reference not in REFERENCES:
        raise KeyError(f"unknown reference {reference!r}; known: {sorted(REFERENCES)}")
    return REFERENCES[reference]
