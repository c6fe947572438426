"""Losses known only as callables: their curvature by automatic differentiation.

A callable ``fn(outputs, targets) -> scalar`` is taken to return the *mean over
the batch's samples*: its batch sum is ``S_b = n_b fn(outputs, targets)`` and its
count ``n_b``, the targets' first dimension. Its output Hessian products are
double-backward products of ``S_b``: ``H v = d/do <dS_b/do, v>``. Its block
structure is unknown, so its factor is that of the dense Hessian of the batch
(``BLOCK_DIAGONAL = False``): ``H = U diag(lambda) U^T`` by ``torch.linalg.eigh``,
``F = U diag(sqrt(lambda))``, refused when ``H`` is indefinite beyond rounding
(the generalised Gauss-Newton matrix needs a loss convex in the outputs;
Schraudolph, "Fast curvature matrix-vector products for second-order gradient
descent", Neural Computation 2002) or when the batch has more output entries
than :attr:`CustomLoss.max_dense_outputs`.

Such a loss is a negative log-likelihood only if it says how to sample its
targets: ``CustomLoss(fn, sample_targets=draw)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from curvkit.errors import DenseTooLargeError, NoExactFisherError, UnknownLossError
from curvkit.losses._base import BatchLoss

__all__ = ["CustomLoss"]

TargetSampler = Callable[[Tensor, Tensor, torch.Generator], Tensor]


class CustomLoss(BatchLoss):
    """A loss given as a callable, optionally with a sampler that makes it a negative log-likelihood.

    This is how curvkit takes any callable and any ``torch.nn`` loss module
    without a closed form (e.g. ``nn.SmoothL1Loss``); build one yourself to name
    it or to give it a sampler, so that the Monte-Carlo Fisher can use it.

    Args:
        fn: ``(outputs, targets) -> scalar``, the mean over the batch's samples.
        name: Recorded with results; by default the callable's ``__name__`` or
            its type's name.
        sample_targets: ``(outputs, targets, generator) -> targets`` drawing
            targets from the model's predictive distribution ``p(y | outputs)``
            of which ``fn`` is the mean negative log-likelihood (up to a
            constant), with all randomness from the ``torch.Generator``. Makes
            the loss a negative log-likelihood (:meth:`sample_targets`, the
            ``'fisher'`` estimator with ``mode='mc'``); its exact Fisher has no
            closed form and stays unavailable.
        reduction: ``"mean"`` or ``"sum"``: how the problem combines batches.

    Attributes:
        max_dense_outputs: The most output entries of a batch for which
            :meth:`output_hessian_factor` forms the dense Hessian (4096; set it on
            the instance to change it).

    Example:
        >>> def gaussian(o, t):
        ...     return ((o - t) ** 2).sum(dim=1).mean()
        >>> def draw(o, t, generator):
        ...     return o + 0.5**0.5 * torch.randn(o.shape, generator=generator, dtype=o.dtype)
        >>> loss = CustomLoss(gaussian, sample_targets=draw)
        >>> loss.name, loss.is_negative_log_likelihood
        ('gaussian', True)
        >>> o, t = torch.zeros(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64)
        >>> loss.sum_and_count(o, t)
        (tensor(6., dtype=torch.float64), 2.0)
        >>> factor = loss.output_hessian_factor(o, t).reshape(6, 6)
        >>> torch.allclose(factor @ factor.T, 2 * torch.eye(6, dtype=torch.float64))
        True
    """

    BLOCK_DIAGONAL = False
    max_dense_outputs: int = 4096

    def __init__(
        self,
        fn: Callable[[Any, Tensor], Tensor],
        *,
        name: str | None = None,
        sample_targets: TargetSampler | None = None,
        reduction: str = "mean",
    ):
        if not callable(fn):
            raise UnknownLossError(
                f"CustomLoss needs a callable (outputs, targets) -> scalar, got {type(fn).__name__}"
            )
        if sample_targets is not None and not callable(sample_targets):
            raise UnknownLossError(
                "CustomLoss: sample_targets must be a callable (outputs, targets, generator) -> targets, "
                f"got {type(sample_targets).__name__}"
            )
        super().__init__(name or getattr(fn, "__name__", type(fn).__name__), reduction)
        self.fn = fn
        self.sampler = sample_targets

    @property
    def is_negative_log_likelihood(self) -> bool:
        return self.sampler is not None

    def _validate(self, outputs: Any, targets: Tensor) -> None:
        """Nothing to check: only the callable knows what it accepts."""

    def _sum(self, outputs: Any, targets: Tensor) -> Tensor:
        return self.fn(outputs, targets) * targets.shape[0]

    def _count(self, outputs: Any, targets: Tensor) -> float:
        return float(targets.shape[0])

    def _hessian_product(self, outputs: Tensor, targets: Tensor, V: Tensor) -> Tensor:
        """Double backward: ``H v = d/do <dS_b/do, v>`` for each of the ``K`` vectors."""
        with torch.enable_grad():
            leaf = outputs.requires_grad_(True)
            (gradient,) = torch.autograd.grad(
                self._sum(leaf, targets), leaf, create_graph=True, allow_unused=True
            )
            if gradient is None or not gradient.requires_grad:  # constant or linear in the outputs
                return torch.zeros_like(V)
            products = [
                torch.autograd.grad(gradient, leaf, v, retain_graph=True, allow_unused=True)[0] for v in V
            ]
        if not products:  # K = 0
            return V.clone()
        return torch.stack([torch.zeros_like(leaf) if p is None else p for p in products])

    def _hessian_factor(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``U diag(sqrt(lambda))`` of the dense Hessian, of shape ``[*outputs.shape, outputs.numel()]``."""
        entries = outputs.numel()
        if entries > self.max_dense_outputs:
            raise DenseTooLargeError(
                f"loss {self.name!r} has no closed-form output Hessian, and the dense one of a batch with "
                f"{entries:,} output entries exceeds the limit of {self.max_dense_outputs:,}: use smaller "
                "batches, output_hessian_product, or raise max_dense_outputs"
            )
        basis = torch.eye(entries, dtype=outputs.dtype, device=outputs.device).reshape(
            entries, *outputs.shape
        )
        hessian = self._hessian_product(outputs, targets, basis).reshape(entries, entries)
        eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (hessian + hessian.T))
        rounding = 10 * entries * torch.finfo(outputs.dtype).eps * eigenvalues.abs().max()
        if bool(eigenvalues[0] < -rounding):
            self._refuse_non_convex(eigenvalues[0].item())
        return (eigenvectors * eigenvalues.clamp(min=0).sqrt()).reshape(*outputs.shape, entries)

    def _fisher_factor(self, outputs: Tensor, targets: Tensor) -> Tensor:
        raise NoExactFisherError(
            f"loss {self.name!r} says how to sample its targets but has no closed-form Fisher: use the "
            "'fisher' estimator with mode='mc' (it samples targets), or 'ggn'"
        )

    def _sample_targets(self, outputs: Tensor, targets: Tensor, generator: torch.Generator) -> Tensor:
        return self.sampler(outputs, targets, generator).detach()
