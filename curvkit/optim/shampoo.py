"""``Shampoo``: one Kronecker factor per tensor dimension, inverse roots, grafting (Gupta 2018, Anil 2020).

V. Gupta, T. Koren and Y. Singer ("Shampoo: Preconditioned Stochastic Tensor
Optimization", ICML 2018) precondition the gradient ``G`` of an order-``k``
tensor by one statistic per dimension; R. Anil, V. Gupta, T. Koren, K. Regan and
Y. Singer ("Scalable Second Order Optimization for Deep Learning", arXiv
2002.09018, 2020) add moving-average statistics, inverse roots refreshed every
few steps, grafting and a start-up period. At the step ``t`` of a parameter
(counted from 1; with ``beta2 = 1`` the statistics are sums, as in Gupta et al.):

1. **Gradient.** ``G = grad + weight_decay * p`` (``G = grad`` with
   ``decoupled_weight_decay``). Dimensions of size 1 are dropped; ``G`` is then
   an order-``k`` tensor of sizes ``n_1, ..., n_k`` (``k = 2`` for a matrix,
   ``k = 1`` for a bias; a scalar is a vector of size 1). No reshaping to a matrix:
   every dimension gets its own factor, as in Gupta et al.'s tensor case.
2. **Statistics**, one per dimension ``i``, with ``G_(i)`` the mode-``i``
   unfolding of ``G`` (an ``n_i x prod_{j != i} n_j`` matrix)::

       H_i <- beta2 H_i + (1 - beta2) G_(i) G_(i)^T      (beta2 < 1)
       H_i <- H_i + G_(i) G_(i)^T                         (beta2 = 1)

   For a matrix, ``H_1 = L`` (``G G^T``) and ``H_2 = R`` (``G^T G``). A dimension
   with ``n_i > max_preconditioner_dim`` gets a **diagonal** factor: only the
   diagonal of ``G_(i) G_(i)^T`` (the sums of squares of the slices of ``G``) is
   kept, an ``n_i`` vector instead of an ``n_i x n_i`` matrix.
3. **Inverse roots**, at ``t = start_preconditioning_step`` and every
   ``update_freq`` steps after it: with ``c_t = 1 - beta2^t`` (Adam's bias
   correction; ``c_t = 1`` when ``beta2 = 1``)::

       P_i = (H_i / c_t + epsilon I)^(-1 / (2k))

   computed in ``preconditioner_dtype`` (eigendecomposed, eigenvalues clamped
   at 0 before ``epsilon`` is added; elementwise for a diagonal factor), the
   factors of one size together in one batched eigendecomposition. Between
   refreshes the last ``P_i`` are used: early on, while a statistic is
   rank-deficient, a new gradient's component outside its range is amplified
   by up to ``epsilon^(-1/(2k))``. Grafting (the default) bounds the step's
   norm; without it, use a larger ``epsilon``, a later
   ``start_preconditioning_step`` or ``update_freq=1``.
4. **Direction** (from ``t >= start_preconditioning_step``)::

       D = G x_1 P_1 x_2 P_2 ... x_k P_k      (D = P_1 G P_2 = L^-1/4 G R^-1/4 for a matrix,
                                               D = H^-1/2 g for a vector)

   Before ``start_preconditioning_step`` the direction is the grafted
   optimizer's step (the gradient with ``grafting="none"``).
5. **Grafting** (Anil et al., Section 3): ``D <- (||A|| / ||D||) D`` per
   parameter tensor, with ``A`` the step of the grafted optimizer: ``G`` for
   ``"sgd"``; for ``"adagrad"``, ``A = G / (sqrt(S / c_t) + graft_epsilon)`` with
   ``S <- beta2 S + (1 - beta2) G**2`` (AdaGrad's sum when ``beta2 = 1``, RMSprop /
   Adam's second moment otherwise). ``"none"`` keeps Shampoo's own scale.
6. **Momentum** on the final direction (``beta1 > 0``):
   ``M <- beta1 M + (1 - beta1) D``, ``D <- M / (1 - beta1^t)``.
7. **Step**: ``p <- p - lr * D`` (``- lr * weight_decay * p`` too with
   ``decoupled_weight_decay``).

With ``betas = (0, beta2)``, ``grafting="none"`` and a rank-1 gradient
``G = u v^T`` at the first step, ``L = |v|^2 u u^T``, ``R = |u|^2 v v^T`` and
``D = G / sqrt(|u|^2 |v|^2 + epsilon)``; for any gradient of singular value
decomposition ``U S V^T`` of full rank, ``D -> U V^T`` as ``epsilon -> 0``.

What curvkit adds:

* **Never NaN parameters, nor state.** The new statistics, preconditioners and
  momentum are computed aside and kept only when the whole step is finite: a
  non-finite gradient (or statistic) skips the step with a
  :class:`curvkit.CurvkitWarning`. The gradients and statistics are checked
  before the eigendecompositions, the momentum and updates at the end
  (:meth:`~curvkit.optim.CurvatureOptimizer.apply_updates`): two host-device
  synchronisations per step, each one fused check. An eigendecomposition
  that does not converge keeps the previous inverse root (the diagonal one the
  first time), with a warning.
* **Precision.** The statistics and inverse roots are kept, computed, and
  applied to the gradient in ``preconditioner_dtype``: float64 by default, also
  for float32 parameters, since an inverse root of a rank-deficient statistic
  amplifies the rounding of its small eigenvalues by up to
  ``epsilon^(-1/(2k))``. float32 is faster (about twice for the
  eigendecompositions on CPUs, more on GPUs with slow float64); use it with a
  larger ``epsilon`` (the peers' 1e-6 to 1e-4), since float32's rounding of the
  eigenvalues, about ``1e-7`` of the largest, swamps a smaller one;
  ``state_dict()`` / ``load_state_dict`` keep every tensor's dtype, so training
  resumes bit-identically (on a model cast since, the grafting sums and momentum
  follow the parameters' dtype).
* **Checked hyper-parameters**, per parameter group: one :class:`ValueError`
  naming each invalid one.

Example:
    A rank-1 gradient ``G = u v^T`` with ``u = v = (1, 1)``: the step is
    ``lr * G / (|u| |v|) = G / 2``.

    >>> import torch
    >>> from curvkit.optim.shampoo import Shampoo
    >>> w = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    >>> optimizer = Shampoo([w], lr=1.0, betas=(0.0, 0.999), grafting="none")
    >>> w.sum().backward()
    >>> _ = optimizer.step()
    >>> w.detach()
    tensor([[0.5000, 1.5000],
            [2.5000, 3.5000]])
    >>> [tuple(optimizer.state[w][f"preconditioner_{i}"].shape) for i in range(2)]
    [(2, 2), (2, 2)]
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from curvkit.errors import CurvkitWarning
from curvkit.optim import fused
from curvkit.optim.base import (
    CurvatureOptimizer,
    by_group,
    check_betas,
    check_choice,
    check_flag,
    check_integer,
    check_learning_rate,
    check_positive,
    first_non_finite,
    floating_tensors,
)

__all__ = ["GRAFTINGS", "PRECONDITIONER_DTYPES", "Shampoo", "inverse_root"]

GRAFTINGS = ("adagrad", "sgd", "none")
"""The values of ``grafting``."""

PRECONDITIONER_DTYPES = (torch.float64, torch.float32)
"""The values of ``preconditioner_dtype``."""


def inverse_root(matrix: Tensor, exponent: float | Tensor, epsilon: float | Tensor) -> Tensor:
    """``(A + epsilon I)^(-1/exponent)`` of symmetric positive semi-definite matrices, in float64.

    ``A`` is symmetrised (``(A + A^T) / 2``) and eigendecomposed in float64,
    ``A = Q diag(lambda) Q^T``; rounding's negative eigenvalues are clamped at 0::

        (A + epsilon I)^(-1/exponent) = Q diag((max(lambda, 0) + epsilon)^(-1/exponent)) Q^T

    A batch ``[..., n, n]`` is decomposed in one call (one eigendecomposition per
    matrix, without a Python loop), each with its own exponent and epsilon. A
    matrix with a non-finite entry gives a matrix of NaNs, without an exception
    or a host-device synchronisation (its neighbours in the batch are unaffected).

    Args:
        matrix: ``A``, ``[..., n, n]``, of any floating dtype and device.
        exponent: ``p > 0`` (4 for Shampoo's matrix factors, ``2k`` for order ``k``),
            a number or a tensor of the batch's shape ``[...]``.
        epsilon: ``>= 0``, added to the eigenvalues (``> 0`` for a singular ``A``);
            a number or a tensor of the batch's shape.

    Returns:
        The float64 ``[..., n, n]`` roots, on ``matrix``'s device.

    Raises:
        torch.linalg.LinAlgError: An eigendecomposition did not converge.

    Example:
        >>> A = torch.tensor([[4.0, 0.0], [0.0, 16.0]])
        >>> inverse_root(A, 2, epsilon=0.0)
        tensor([[0.5000, 0.0000],
                [0.0000, 0.2500]], dtype=torch.float64)
    """
    A = matrix.to(torch.float64)
    finite = torch.isfinite(A).flatten(-2).all(-1)[..., None, None]
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    A = torch.where(finite, (A + A.mT) / 2, eye)
    power = -1.0 / torch.as_tensor(exponent, dtype=torch.float64, device=A.device)[..., None]
    epsilon = torch.as_tensor(epsilon, dtype=torch.float64, device=A.device)[..., None]
    root = _inverse_root_of_finite(A, power, epsilon)
    return torch.where(finite, root, torch.full_like(root, math.nan))


def _inverse_root_of_finite(A: Tensor, power: float | Tensor, epsilon: float | Tensor) -> Tensor:
    """``(A + epsilon I)^power`` of finite symmetric matrices ``[..., n, n]``, in their dtype, without guards.

    :func:`inverse_root` with ``power = -1/exponent``. Only the lower triangles
    are read (by ``torch.linalg.eigh``): a matrix that is symmetric up to
    rounding need not be symmetrised. ``power`` and ``epsilon``: numbers, or
    ``[..., 1]`` tensors.
    """
    values, vectors = torch.linalg.eigh(A)
    roots = values.clamp_(min=0.0).add_(epsilon).pow_(power)
    return (vectors * roots.unsqueeze(-2)) @ vectors.mT


def _per_matrix(values: list[float], dtype: torch.dtype, device: torch.device) -> float | Tensor:
    """A batch's numbers, one per matrix: one number if all are equal, else a ``[batch, 1]`` tensor."""
    if all(value == values[0] for value in values):
        return values[0]
    return torch.tensor(values, dtype=dtype, device=device)[:, None]


def _diagonal_inverse_root(diagonal: Tensor, exponent: float, epsilon: float) -> Tensor:
    """``(d + epsilon)^(-1/exponent)`` elementwise, in float64 (the inverse root of ``diag(d)``)."""
    return (diagonal.to(torch.float64).clamp(min=0.0) + epsilon).pow(-1.0 / exponent)


def _dims(p: Tensor) -> tuple[int, ...]:
    """The sizes Shampoo preconditions: ``p``'s, without those equal to 1 (``(1,)`` if none is left)."""
    return tuple(n for n in p.shape if n != 1) or (1,)


def _mode_statistic(
    G: Tensor, mode: int, diagonal: bool, old: Tensor | None, beta: float, weight: float
) -> Tensor:
    """``beta * old + weight * G_(i) G_(i)^T``, ``G_(i)`` the mode-``i`` unfolding of ``G``, in one call.

    Only the diagonal (the slices' sums of squares) with ``diagonal``; ``old``
    ``None`` stands for zeros.
    """
    unfolded = G.movedim(mode, 0).reshape(G.shape[mode], -1)
    if diagonal:
        squares = (unfolded * unfolded).sum(dim=1).mul_(weight)
        return squares if old is None else squares.add_(old, alpha=beta)
    if old is None:
        return torch.mm(unfolded, unfolded.mT).mul_(weight)
    return torch.addmm(old, unfolded, unfolded.mT, beta=beta, alpha=weight)


def _precondition(G: Tensor, roots: list[Tensor]) -> Tensor:
    """``G x_1 P_1 ... x_k P_k`` (``P_i`` symmetric matrices, or vectors for diagonal factors).

    A vector or a matrix with full factors takes one or two matrix products
    (``P g``, ``P_1 G P_2``); other orders contract one axis at a time.
    """
    if all(P.ndim == 2 for P in roots):
        if G.ndim == 1:
            return roots[0] @ G
        if G.ndim == 2:
            return roots[0] @ G @ roots[1]
    X = G
    for P in roots:  # each contracts the leading axis and appends the result last: k steps restore the order
        if P.ndim == 1:
            X = (X * P.reshape(-1, *([1] * (X.ndim - 1)))).movedim(0, -1)
        else:
            X = torch.tensordot(X, P, dims=([0], [0]))
    return X


@dataclass
class _Staged:
    """One parameter's step, computed aside: kept (``new``) only if the whole step is finite."""

    p: Tensor
    group: dict[str, Any]
    t: int
    grad: Tensor
    """The gradient (with coupled weight decay) in the working dtype."""
    G: Tensor
    """The gradient shaped as Shampoo's dimensions, in the preconditioner's dtype."""
    new: dict[str, Any]
    momentum: Tensor | None = None
    """The momentum buffer before this step (``None`` before the first)."""
    roots: list[Tensor | None] = field(default_factory=list)


class Shampoo(CurvatureOptimizer):
    """Shampoo with moving-average statistics, grafting and momentum (see the module docstring).

    Gupta, Koren and Singer, "Shampoo: Preconditioned Stochastic Tensor
    Optimization", ICML 2018; Anil et al., "Scalable Second Order Optimization
    for Deep Learning", arXiv 2002.09018, 2020. A minimal training loop::

        optimizer = Shampoo(model.parameters(), lr=1e-3)
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()

    Args:
        params: Parameters or parameter groups (each group may override any of
            the hyper-parameters below).
        lr: Learning rate (``>= 0``).
        betas: ``(beta1, beta2)``: the momentum of the final direction, in
            ``[0, 1)`` (0: none), and the moving average of the statistics and of
            AdaGrad's grafting, in ``[0, 1]`` (1: sums, as in Gupta et al.).
        epsilon: Added to the statistics' eigenvalues before their inverse roots (``> 0``).
        weight_decay: L2 penalty (``>= 0``), added to the gradient (see
            ``decoupled_weight_decay``).
        update_freq: Steps between the refreshes of the inverse roots (``>= 1``).
        start_preconditioning_step: The first step (counted from 1) that uses
            Shampoo's direction; earlier steps take the grafted optimizer's step.
        max_preconditioner_dim: Dimensions larger than this get a diagonal factor
            instead of a full matrix (``>= 1``).
        grafting: ``"adagrad"``, ``"sgd"`` (the step's norm, per parameter tensor,
            is that optimizer's) or ``"none"`` (Shampoo's own norm).
        graft_epsilon: AdaGrad grafting's ``epsilon`` (``> 0``).
        decoupled_weight_decay: Apply the weight decay to the parameters, as
            AdamW, instead of adding it to the gradient.
        preconditioner_dtype: The dtype of the statistics and inverse roots, and
            of their products with the gradient: ``torch.float64`` or ``torch.float32``.

    Attributes:
        steps: Steps taken (skipped ones excluded).
        refreshes: Steps at which some inverse root was recomputed.
        skipped_steps: Steps skipped because they were not finite.

    Raises:
        ValueError: An invalid hyper-parameter, or a parameter that is not a real
            floating-point tensor.
    """

    GROUP_CHECKS = {
        "params": floating_tensors,
        "lr": check_learning_rate,
        "betas": functools.partial(check_betas, second_below_one=False),
        "epsilon": check_positive,
        "weight_decay": functools.partial(check_positive, zero=True),
        "update_freq": check_integer,
        "start_preconditioning_step": check_integer,
        "max_preconditioner_dim": check_integer,
        "grafting": functools.partial(check_choice, choices=GRAFTINGS),
        "graft_epsilon": check_positive,
        "decoupled_weight_decay": check_flag,
        "preconditioner_dtype": functools.partial(check_choice, choices=PRECONDITIONER_DTYPES),
    }

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        epsilon: float = 1e-12,
        weight_decay: float = 0.0,
        update_freq: int = 1,
        start_preconditioning_step: int = 1,
        max_preconditioner_dim: int = 1024,
        grafting: str = "adagrad",
        *,
        graft_epsilon: float = 1e-8,
        decoupled_weight_decay: bool = False,
        preconditioner_dtype: torch.dtype = torch.float64,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "epsilon": epsilon,
            "weight_decay": weight_decay,
            "update_freq": update_freq,
            "start_preconditioning_step": start_preconditioning_step,
            "max_preconditioner_dim": max_preconditioner_dim,
            "grafting": grafting,
            "graft_epsilon": graft_epsilon,
            "decoupled_weight_decay": decoupled_weight_decay,
            "preconditioner_dtype": preconditioner_dtype,
        }
        self.steps = 0
        self.refreshes = 0
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One Shampoo step (see the module docstring); the closure's loss if one is given.

        Three passes over the parameters with a gradient: their statistics (and
        AdaGrad's sums); the inverse roots due, one batched eigendecomposition
        per size (:func:`inverse_root`); the directions, grafting and momentum.
        Everything is computed aside and kept only if the gradients, statistics,
        momentum and updates are all finite (one check). Parameters without a
        gradient are left alone (their state too). A step that is not finite
        changes neither the parameters nor the state, and warns
        (:class:`curvkit.CurvkitWarning`).

        Raises:
            RuntimeError: A sparse gradient.
        """
        loss = self.evaluate(closure)
        staged: list[_Staged] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Shampoo does not support sparse gradients")
                staged.append(self._statistics(p, group))
        self._graft_sums(staged)
        statistics = [v for item in staged for v in item.new.values() if isinstance(v, Tensor)]
        why = first_non_finite([("gradient", [item.p.grad for item in staged]), ("statistics", statistics)])
        if why is not None:  # checked before the eigendecompositions, which a non-finite matrix would fail
            self.skip(f"the {why} is not finite", unchanged="parameters and state unchanged", stacklevel=5)
            return loss
        refreshed = self._refresh_roots(staged)
        updates = list(zip([item.p for item in staged], self._updates(staged)))
        momenta = [item.new["momentum_buffer"] for item in staged if "momentum_buffer" in item.new]
        if self.apply_updates(
            updates,
            checks=[("momentum", momenta)],
            unchanged="parameters and state unchanged",
            stacklevel=5,  # apply_updates, step, torch.no_grad's wrapper, torch.optim's wrapper, the caller
        ):
            for item in staged:
                self.state[item.p].update(item.new)
            self.steps += 1
            self.refreshes += int(refreshed)
        return loss

    def _statistics(self, p: Tensor, group: dict[str, Any]) -> _Staged:
        """Pass 1: the new statistics of ``p``."""
        state = self.state[p]
        beta2, wd = group["betas"][1], group["weight_decay"]
        t = int(state.get("step", 0)) + 1
        weight = 1.0 if beta2 == 1.0 else 1.0 - beta2  # of the new statistic
        work = torch.promote_types(p.dtype, torch.float32)
        grad = p.grad.to(work)
        if wd and not group["decoupled_weight_decay"]:
            grad = grad + wd * p.to(work)
        dims = _dims(p)
        G = grad.reshape(dims).to(group["preconditioner_dtype"])
        item = _Staged(p, group, t, grad, G, {"step": t}, state.get("momentum_buffer"))
        for i, n in enumerate(dims):
            diagonal = n > group["max_preconditioner_dim"]
            item.new[f"statistic_{i}"] = _mode_statistic(
                item.G, i, diagonal, state.get(f"statistic_{i}"), beta2, weight
            )
        return item

    def _graft_sums(self, staged: list[_Staged]) -> None:
        """Pass 1, AdaGrad's grafting: ``S <- beta2 S + (1 - beta2) G**2`` (``S + G**2`` if ``beta2 = 1``).

        Fused over each group's parameters (``torch._foreach_*``).
        """
        for group, items in by_group(staged, lambda item: item.group):
            if group["grafting"] != "adagrad" or not items:
                continue
            beta2 = group["betas"][1]
            squares = torch._foreach_mul([item.grad for item in items], [item.grad for item in items])
            olds = [self.state[item.p].get("graft_sum") for item in items]
            if all(old is None for old in olds):
                sums = squares if beta2 == 1.0 else fused.multiply(squares, 1.0 - beta2)
            else:
                olds = [torch.zeros_like(item.grad) if old is None else old for item, old in zip(items, olds)]
                sums = (
                    torch._foreach_add(olds, squares)
                    if beta2 == 1.0
                    else fused.lerp(olds, squares, 1.0 - beta2)
                )
            for item, total in zip(items, sums):
                item.new["graft_sum"] = total

    def _refresh_roots(self, staged: list[_Staged]) -> bool:
        """Pass 2: every preconditioning parameter's inverse roots, those due recomputed; whether any was.

        The statistics are finite (checked by :meth:`step`). The full factors
        due are decomposed together, one batched eigendecomposition per size,
        dtype and device (each factor with its exponent, epsilon and bias
        correction); a batch whose decomposition fails is done again one
        factor at a time (:meth:`_inverse_root`, with its fallback).
        """
        # (size, dtype, device) -> [(item, dimension, exponent, epsilon, correction)]
        batches: dict[
            tuple[int, torch.dtype, torch.device], list[tuple[_Staged, int, float, float, float]]
        ] = {}
        refreshed = False
        for item in staged:
            group, state = item.group, self.state[item.p]
            start = group["start_preconditioning_step"]
            if item.t < start:
                continue
            beta2, epsilon = group["betas"][1], group["epsilon"]
            correction = 1.0 if beta2 == 1.0 else 1.0 - beta2**item.t  # bias correction of the averages
            exponent = 2.0 * item.G.ndim
            item.roots = [state.get(f"preconditioner_{i}") for i in range(item.G.ndim)]
            for i, root in enumerate(item.roots):
                if root is not None and (item.t - start) % group["update_freq"] != 0:
                    continue
                refreshed = True
                statistic = item.new[f"statistic_{i}"]
                if statistic.ndim == 1:  # a diagonal factor
                    root = _diagonal_inverse_root(statistic / correction, exponent, epsilon)
                    item.roots[i] = item.new[f"preconditioner_{i}"] = root.to(statistic.dtype)
                    continue
                key = (statistic.shape[0], statistic.dtype, statistic.device)
                batches.setdefault(key, []).append((item, i, exponent, epsilon, correction))
        for (_, dtype, device), requests in batches.items():
            statistics = [item.new[f"statistic_{i}"] for item, i, *_ in requests]
            powers = _per_matrix([-1.0 / exponent for _, _, exponent, _, _ in requests], dtype, device)
            epsilons = _per_matrix([epsilon for _, _, _, epsilon, _ in requests], dtype, device)
            corrections = [correction for *_, correction in requests]
            try:  # in the statistics' dtype, preconditioner_dtype
                A = torch.stack(statistics)
                if any(correction != 1.0 for correction in corrections):
                    A.div_(torch.tensor(corrections, dtype=dtype, device=device)[:, None, None])
                roots = _inverse_root_of_finite(A, powers, epsilons).unbind()
            except torch.linalg.LinAlgError:
                roots = [
                    self._inverse_root(
                        statistic / correction, exponent, epsilon, diagonal=False, previous=item.roots[i]
                    ).to(dtype)
                    for (item, i, exponent, epsilon, correction), statistic in zip(requests, statistics)
                ]
            for (item, i, *_), root in zip(requests, roots):
                item.roots[i] = item.new[f"preconditioner_{i}"] = root
        return refreshed

    @staticmethod
    def _updates(staged: list[_Staged]) -> list[Tensor]:
        """Pass 3: the directions (preconditioned or grafted), grafting, momentum; the updates.

        Fused over each group's parameters (``torch._foreach_*``) but for the
        preconditioning itself (one or two matrix products per parameter).
        """
        deltas: dict[int, Tensor] = {}
        for group, items in by_group(staged, lambda item: item.group):
            beta1, beta2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            grads = [item.grad for item in items]
            grafts: list[Tensor] | None = None
            if group["grafting"] == "sgd":
                grafts = grads
            elif group["grafting"] == "adagrad":
                corrections = [1.0 if beta2 == 1.0 else 1.0 - beta2**item.t for item in items]
                denominators = fused.divide([item.new["graft_sum"] for item in items], corrections)
                torch._foreach_sqrt_(denominators)
                fused.add_(denominators, group["graft_epsilon"])
                grafts = torch._foreach_div(grads, denominators)
            directions = list(grads if grafts is None else grafts)
            preconditioned = [k for k, item in enumerate(items) if item.roots]
            for k in preconditioned:
                item = items[k]
                directions[k] = _precondition(item.G, item.roots).reshape(item.p.shape).to(item.grad.dtype)  # type: ignore[arg-type]
            if grafts is not None and preconditioned:  # D <- (||A|| / ||D||) D
                norms = torch.stack(torch._foreach_norm([directions[k] for k in preconditioned]))
                targets = torch.stack(torch._foreach_norm([grafts[k] for k in preconditioned]))
                scales = torch.where(norms > 0, targets / norms, 0.0).to(directions[0].dtype)
                scaled = torch._foreach_mul([directions[k] for k in preconditioned], scales.unbind())
                for k, direction in zip(preconditioned, scaled):
                    directions[k] = direction
            if beta1 > 0:
                olds = [
                    torch.zeros_like(d) if item.momentum is None else item.momentum
                    for item, d in zip(items, directions)
                ]
                momenta = fused.lerp(olds, directions, 1.0 - beta1)
                for item, momentum in zip(items, momenta):
                    item.new["momentum_buffer"] = momentum
                group_deltas = fused.multiply(momenta, [-lr / (1.0 - beta1**item.t) for item in items])
            else:
                group_deltas = fused.multiply(directions, -lr)
            if wd and group["decoupled_weight_decay"]:
                torch._foreach_add_(
                    group_deltas, [item.p.to(d.dtype) for item, d in zip(items, group_deltas)], alpha=-lr * wd
                )
            for item, delta in zip(items, group_deltas):
                deltas[id(item)] = delta.to(item.p.dtype)
        return [deltas[id(item)] for item in staged]

    @staticmethod
    def _inverse_root(
        statistic: Tensor, exponent: float, epsilon: float, diagonal: bool, previous: Tensor | None
    ) -> Tensor:
        """The factor's inverse root; if eigh fails, ``previous`` (else the diagonal one), with a warning."""
        if diagonal:
            return _diagonal_inverse_root(statistic, exponent, epsilon)
        try:
            return inverse_root(statistic, exponent, epsilon)
        except torch.linalg.LinAlgError as error:
            fallback = "the previous one" if previous is not None else "that of its diagonal"
            warnings.warn(
                f"Shampoo: the eigendecomposition of a {statistic.shape[0]}x{statistic.shape[0]} statistic "
                f"failed ({error}); its inverse root is {fallback}",
                CurvkitWarning,
                stacklevel=4,
            )
            if previous is not None and previous.ndim == 2:
                return previous
            return torch.diag(_diagonal_inverse_root(torch.diagonal(statistic), exponent, epsilon))

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Any]:
        """The counters: steps taken and inverse-root refreshes."""
        return {"steps": self.steps, "refreshes": self.refreshes}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restores the counters."""
        self.steps = int(state.get("steps", 0))
        self.refreshes = int(state.get("refreshes", 0))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`, each tensor in the dtype the step keeps it in.

        ``torch.optim`` casts every floating tensor to its parameter's dtype; here
        the statistics and inverse roots are in the group's
        ``preconditioner_dtype`` and the grafting sums and momentum in the working
        dtype (the parameter's, at least float32), as :meth:`step` makes them. A
        state saved for the same dtypes is loaded bit for bit; one saved before
        the model was cast (``model.double()``) follows the parameters, as in
        ``torch.optim``.

        Raises:
            ValueError: A state dict not written by this kind of optimizer.
        """
        super().load_state_dict(state_dict)
        saved = chain.from_iterable(group["params"] for group in state_dict["param_groups"])
        mine = [(p, group) for group in self.param_groups for p in group["params"]]
        for index, (p, group) in zip(saved, mine):
            for key, value in state_dict["state"].get(index, {}).items():
                if isinstance(value, Tensor) and value.is_floating_point():
                    dtype = _state_dtype(key, p, group)
                    if dtype != self.state[p][key].dtype:
                        self.state[p][key] = value.to(device=p.device, dtype=dtype)


def _state_dtype(key: str, p: Tensor, group: dict[str, Any]) -> torch.dtype:
    """The dtype :meth:`Shampoo.step` keeps ``p``'s state ``key`` in (a floating one)."""
    if key.startswith(("statistic_", "preconditioner_")):
        return group["preconditioner_dtype"]
    return torch.promote_types(p.dtype, torch.float32)  # the grafting sums and the momentum
