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

   computed in float64 by :func:`inverse_root` (symmetrised, eigendecomposed,
   eigenvalues clamped at 0 before ``epsilon`` is added; elementwise for a
   diagonal factor). Between refreshes the last ``P_i`` are used: early on,
   while a statistic is rank-deficient, a new gradient's component outside its
   range is amplified by up to ``epsilon^(-1/(2k))``. Grafting (the default)
   bounds the step's norm; without it, use a larger ``epsilon``, a later
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
  :class:`curvkit.CurvkitWarning` (one host-device synchronisation per step, in
  :meth:`~curvkit.optim.CurvatureOptimizer.apply_updates`). An eigendecomposition
  that does not converge keeps the previous inverse root (the diagonal one the
  first time), with a warning.
* **Precision.** The statistics and inverse roots are kept, and applied to the
  gradient, in ``preconditioner_dtype`` (float64 by default, also for float32
  parameters: an inverse root of a rank-deficient statistic amplifies rounding
  by up to ``epsilon^(-1/(2k))``; float32 is faster on GPUs with slow float64);
  ``state_dict()`` / ``load_state_dict`` keep every tensor's dtype, so training
  resumes bit-identically.
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

import math
import warnings
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from curvkit.errors import CurvkitWarning
from curvkit.optim.base import CurvatureOptimizer, check_choice, check_fraction, check_integer, check_positive

__all__ = ["GRAFTINGS", "PRECONDITIONER_DTYPES", "Shampoo", "inverse_root"]

GRAFTINGS = ("adagrad", "sgd", "none")
"""The values of ``grafting``."""

PRECONDITIONER_DTYPES = (torch.float64, torch.float32)
"""The values of ``preconditioner_dtype``."""


def inverse_root(matrix: Tensor, exponent: float, epsilon: float) -> Tensor:
    """``(A + epsilon I)^(-1/exponent)`` of a symmetric positive semi-definite matrix, in float64.

    ``A`` is symmetrised (``(A + A^T) / 2``) and eigendecomposed in float64,
    ``A = Q diag(lambda) Q^T``; rounding's negative eigenvalues are clamped at 0::

        (A + epsilon I)^(-1/exponent) = Q diag((max(lambda, 0) + epsilon)^(-1/exponent)) Q^T

    A matrix with a non-finite entry gives a matrix of NaNs, without an exception
    or a host-device synchronisation.

    Args:
        matrix: ``A``, ``n x n``, of any floating dtype and device.
        exponent: ``p > 0`` (4 for Shampoo's matrix factors, ``2k`` for order ``k``).
        epsilon: ``>= 0``, added to the eigenvalues (``> 0`` for a singular ``A``).

    Returns:
        The float64 ``n x n`` matrix, on ``matrix``'s device.

    Raises:
        torch.linalg.LinAlgError: The eigendecomposition did not converge.

    Example:
        >>> A = torch.tensor([[4.0, 0.0], [0.0, 16.0]])
        >>> inverse_root(A, 2, epsilon=0.0)
        tensor([[0.5000, 0.0000],
                [0.0000, 0.2500]], dtype=torch.float64)
    """
    A = matrix.to(torch.float64)
    finite = torch.isfinite(A).all()
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    A = torch.where(finite, (A + A.mT) / 2, eye)
    values, vectors = torch.linalg.eigh(A)
    roots = (values.clamp(min=0.0) + epsilon).pow(-1.0 / exponent)
    root = (vectors * roots) @ vectors.mT
    return torch.where(finite, root, torch.full_like(root, math.nan))


def _diagonal_inverse_root(diagonal: Tensor, exponent: float, epsilon: float) -> Tensor:
    """``(d + epsilon)^(-1/exponent)`` elementwise, in float64 (the inverse root of ``diag(d)``)."""
    return (diagonal.to(torch.float64).clamp(min=0.0) + epsilon).pow(-1.0 / exponent)


def _dims(p: Tensor) -> tuple[int, ...]:
    """The sizes Shampoo preconditions: ``p``'s, without those equal to 1 (``(1,)`` if none is left)."""
    return tuple(n for n in p.shape if n != 1) or (1,)


def _mode_statistic(G: Tensor, mode: int, diagonal: bool) -> Tensor:
    """``G_(i) G_(i)^T`` for the mode-``i`` unfolding of ``G`` (its diagonal only with ``diagonal``)."""
    unfolded = G.movedim(mode, 0).reshape(G.shape[mode], -1)
    return (unfolded * unfolded).sum(dim=1) if diagonal else unfolded @ unfolded.mT


def _precondition(G: Tensor, roots: list[Tensor]) -> Tensor:
    """``G x_1 P_1 ... x_k P_k`` (``P_i`` symmetric matrices, or vectors for diagonal factors)."""
    X = G
    for P in roots:  # each contracts the leading axis and appends the result last: k steps restore the order
        if P.ndim == 1:
            X = (X * P.reshape(-1, *([1] * (X.ndim - 1)))).movedim(0, -1)
        else:
            X = torch.tensordot(X, P, dims=([0], [0]))
    return X


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

    # ------------------------------------------------------------------ parameter groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group, refusing invalid hyper-parameters and parameters that are not real floats."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group)
        except ValueError:
            self.param_groups.pop()
            raise

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        check_positive("lr", group["lr"], zero=True)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        check_fraction("betas[0]", betas[0], below_one=True)
        check_fraction("betas[1]", betas[1])
        group["betas"] = (float(betas[0]), float(betas[1]))
        check_positive("epsilon", group["epsilon"])
        check_positive("weight_decay", group["weight_decay"], zero=True)
        check_integer("update_freq", group["update_freq"])
        check_integer("start_preconditioning_step", group["start_preconditioning_step"])
        check_integer("max_preconditioner_dim", group["max_preconditioner_dim"])
        check_choice("grafting", group["grafting"], GRAFTINGS)
        check_positive("graft_epsilon", group["graft_epsilon"])
        if not isinstance(group["decoupled_weight_decay"], bool):
            raise ValueError(
                f"decoupled_weight_decay must be True or False, got {group['decoupled_weight_decay']!r}"
            )
        check_choice("preconditioner_dtype", group["preconditioner_dtype"], PRECONDITIONER_DTYPES)
        for p in group["params"]:
            if not p.is_floating_point():
                raise ValueError(f"Shampoo optimizes real floating-point tensors, got one of dtype {p.dtype}")

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One Shampoo step (see the module docstring); the closure's loss if one is given.

        Parameters without a gradient are left alone (their state too). A step whose
        update, gradient or statistics are not finite changes neither the parameters
        nor the state, and warns (:class:`curvkit.CurvkitWarning`).

        Raises:
            RuntimeError: A sparse gradient.
        """
        loss = self.evaluate(closure)
        updates: list[tuple[Tensor, Tensor]] = []
        staged: list[tuple[Tensor, dict[str, Any]]] = []
        refreshed = False
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Shampoo does not support sparse gradients")
                new, delta, refresh = self._parameter_step(p, group)
                updates.append((p, delta))
                staged.append((p, new))
                refreshed = refreshed or refresh
        if self.apply_updates(updates, what="update (gradient, statistics or direction)"):
            for p, new in staged:
                self.state[p].update(new)
            self.steps += 1
            self.refreshes += int(refreshed)
        return loss

    def _parameter_step(self, p: Tensor, group: dict[str, Any]) -> tuple[dict[str, Any], Tensor, bool]:
        """``(new state entries, update, whether an inverse root was recomputed)`` of one parameter."""
        state = self.state[p]
        beta1, beta2 = group["betas"]
        lr, epsilon, wd = group["lr"], group["epsilon"], group["weight_decay"]
        t = int(state.get("step", 0)) + 1
        weight = 1.0 if beta2 == 1.0 else 1.0 - beta2  # of the new statistic
        correction = 1.0 if beta2 == 1.0 else 1.0 - beta2**t  # bias correction of the averages
        work = torch.promote_types(p.dtype, torch.float32)
        precision = group["preconditioner_dtype"]
        grad = p.grad.to(work)
        if wd and not group["decoupled_weight_decay"]:
            grad = grad + wd * p.to(work)
        new: dict[str, Any] = {"step": t}
        finite_check: list[Tensor] = []  # new statistics: 0 * their sum is NaN where one is not finite

        # statistics and inverse roots, one factor per dimension
        dims = _dims(p)
        G = grad.reshape(dims).to(precision)
        exponent = 2.0 * len(dims)
        start, freq = group["start_preconditioning_step"], group["update_freq"]
        preconditioning = t >= start
        refresh = False
        roots: list[Tensor] = []
        for i, n in enumerate(dims):
            diagonal = n > group["max_preconditioner_dim"]
            statistic = _mode_statistic(G, i, diagonal)
            old = state.get(f"statistic_{i}")
            statistic = statistic * weight if old is None else old * beta2 + statistic * weight
            new[f"statistic_{i}"] = statistic
            finite_check.append(statistic.sum())
            if not preconditioning:
                continue
            root = state.get(f"preconditioner_{i}")
            if root is None or (t - start) % freq == 0:
                root = self._inverse_root(statistic / correction, exponent, epsilon, diagonal, root)
                root = root.to(precision)
                new[f"preconditioner_{i}"] = root
                refresh = True
            roots.append(root)

        # the grafted optimizer's step
        graft: Tensor | None = None
        if group["grafting"] == "sgd":
            graft = grad
        elif group["grafting"] == "adagrad":
            old = state.get("graft_sum")
            squares = grad * grad * weight if old is None else old * beta2 + grad * grad * weight
            new["graft_sum"] = squares
            finite_check.append(squares.sum())
            graft = grad / ((squares / correction).sqrt() + group["graft_epsilon"])

        if preconditioning:
            direction = _precondition(G, roots).reshape(p.shape).to(work)
            if graft is not None:
                norm = torch.linalg.vector_norm(direction)
                scale = torch.linalg.vector_norm(graft) / norm
                direction = direction * torch.where(norm > 0, scale, torch.zeros_like(scale))
        else:
            direction = grad if graft is None else graft

        if beta1 > 0:
            old = state.get("momentum_buffer")
            momentum = direction * (1.0 - beta1) if old is None else old * beta1 + direction * (1.0 - beta1)
            new["momentum_buffer"] = momentum
            direction = momentum / (1.0 - beta1**t)

        delta = direction * -lr
        if wd and group["decoupled_weight_decay"]:
            delta = delta - (lr * wd) * p.to(work)
        delta = delta + 0.0 * torch.stack(finite_check).sum().to(work)  # a non-finite statistic skips
        return new, delta.to(p.dtype), refresh

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
        """Restores :meth:`state_dict`, each tensor in its saved dtype (torch.optim would cast it).

        Raises:
            ValueError: A state dict not written by this kind of optimizer.
        """
        super().load_state_dict(state_dict)
        saved = chain.from_iterable(group["params"] for group in state_dict["param_groups"])
        mine = chain.from_iterable(group["params"] for group in self.param_groups)
        for index, p in zip(saved, mine):
            for key, value in state_dict["state"].get(index, {}).items():
                if isinstance(value, Tensor) and value.dtype != self.state[p][key].dtype:
                    self.state[p][key] = value.to(device=p.device)
