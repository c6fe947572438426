"""Losses with one term per output entry: mean squared error and binary cross-entropy on logits.

Each term depends on one output entry ``o`` only, so the output Hessian is
diagonal, ``h = d^2 l / do^2`` per entry, with factor ``diag(sqrt(h))``.

**Mean squared error.** ``l = (o - t)^2``, ``h = 2``. It is the negative
log-likelihood of the Gaussian ``y ~ N(o, sigma^2)`` with ``sigma^2 = 1/2``, up to
a constant:

.. math::

    -\\log \\mathcal N(y; o, \\sigma^2) = \\frac{(y - o)^2}{2\\sigma^2} + \\tfrac12 \\log(2\\pi\\sigma^2)
    = (y - o)^2 + \\tfrac12 \\log \\pi .

That is the one variance for which the loss *is* the NLL with scale 1 (another
``sigma^2`` would multiply the NLL by ``1/(2 sigma^2)``). Drawing
``y = o + sigma eps``, ``g = dl/do = 2 (o - y) = -2 sigma eps`` and
``E[g g^T] = 4 sigma^2 I = 2 I``: the Fisher equals the output Hessian, so the
Monte-Carlo Fisher estimates the GGN of the very loss analysed, with PyTorch's
``reduction="mean"`` (division by the number of entries) applied to both alike.

**Binary cross-entropy on logits.** With ``s = sigmoid(o)``, element weight
``w`` (``weight``) and positive-class weight ``pw`` (``pos_weight``), both
broadcast as PyTorch does,

.. math::

    l = -w \\left(p_w t \\log s + (1 - t) \\log(1 - s)\\right), \\qquad
    \\frac{dl}{do} = w \\left((p_w t + 1 - t)\\, s - p_w t\\right), \\qquad
    h = w\\, (p_w t + 1 - t)\\, s (1 - s),

using ``d log s / do = 1 - s`` and ``d log(1 - s) / do = -s``. For
``y ~ Bernoulli(s)`` and ``l(y) = -log p(y)``, ``g = s - y`` and
``E[g^2] = s (1 - s)``, with independent entries: the Fisher equals the output
Hessian when ``w = pw = 1`` (canonical link; Martens, JMLR 2020, sec. 9.2), and
the loss is no negative log-likelihood otherwise.

Both are negative log-likelihoods only where the Fisher equals the output
Hessian, so their Fisher factor is their output Hessian factor. PyTorch's mean
divides by the number of entries, whatever the weights.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvkit.errors import UnknownLossError
from curvkit.losses._base import (
    ClosedFormLoss,
    diagonal_factor,
    non_negative_weights,
    random_like,
    shape_of,
)

__all__ = ["BinaryCrossEntropyWithLogits", "MeanSquaredError"]


class _ElementwiseLoss(ClosedFormLoss):
    """What MSE and BCE share: targets of the outputs' shape, one term per entry, a diagonal Hessian."""

    def _validate(self, outputs: Any, targets: Tensor) -> None:
        if (
            not isinstance(outputs, Tensor)
            or not isinstance(targets, Tensor)
            or outputs.shape != targets.shape
        ):
            raise UnknownLossError(  # the problem re-raises it as a DataError
                f"{self.BASE_NAME}: outputs {shape_of(outputs)} and targets {shape_of(targets)} differ"
            )

    def _count(self, outputs: Tensor, targets: Tensor) -> float:
        return float(outputs.numel())

    @abc.abstractmethod
    def _curvature(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``h = d^2 l / do^2`` per entry, of the outputs' shape."""

    def _hessian_product(self, outputs: Tensor, targets: Tensor, V: Tensor) -> Tensor:
        return self._curvature(outputs, targets) * V

    def _hessian_factor(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return diagonal_factor(self._curvature_root(self._curvature(outputs, targets), targets))

    def _fisher_factor(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return self._hessian_factor(outputs, targets)  # equal whenever the loss is an NLL (module docstring)


class MeanSquaredError(_ElementwiseLoss):
    """Squared error ``(o - t)^2`` per entry (``torch.nn.functional.mse_loss``).

    A negative log-likelihood: Gaussian with variance ``1/2`` (module docstring).

    Example:
        >>> loss = MeanSquaredError()
        >>> o, t = torch.zeros(2, 3), torch.ones(2, 3)
        >>> loss.sum_and_count(o, t)
        (tensor(6.), 6.0)
        >>> loss.output_hessian_factor(o, t)[0]  # sqrt(2) I for the first sample
        tensor([[1.4142, 0.0000, 0.0000],
                [0.0000, 1.4142, 0.0000],
                [0.0000, 0.0000, 1.4142]])
    """

    BASE_NAME = "mse"
    MODULE = nn.MSELoss

    def __init__(self, *, reduction: str = "mean"):
        super().__init__({}, reduction)

    @property
    def is_negative_log_likelihood(self) -> bool:
        return True

    def _sum(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.mse_loss(outputs, targets, reduction="sum")

    def _curvature(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return torch.full_like(outputs, 2.0)

    def _convex_for(self, targets: Tensor) -> bool:
        return True  # a curvature of 2

    def _sample_targets(self, outputs: Tensor, targets: Tensor, generator: torch.Generator) -> Tensor:
        """``y = o + eps / sqrt(2)``, ``eps ~ N(0, I)``: the Gaussian of variance 1/2."""
        return outputs + random_like(torch.randn, outputs, generator).to(outputs.dtype) * 0.5**0.5


class BinaryCrossEntropyWithLogits(_ElementwiseLoss):
    """Binary cross-entropy on logits (``torch.nn.functional.binary_cross_entropy_with_logits``).

    ``weight`` (per element, broadcast to the outputs) and ``pos_weight`` (per
    class, broadcast against the targets' trailing dims) are honoured by every
    closed form; the loss is a negative log-likelihood (Bernoulli) only without
    them.

    Example:
        >>> loss = BinaryCrossEntropyWithLogits(pos_weight=torch.tensor([3.0]))
        >>> loss.name, loss.is_negative_log_likelihood
        ('bce_with_logits(pos_weight=[3])', False)
        >>> loss.output_hessian_product(torch.zeros(2, 1), torch.tensor([[1.0], [0.0]]), torch.ones(1, 2, 1))
        tensor([[[0.7500],
                 [0.2500]]])

    (``s(1 - s) = 1/4`` at ``o = 0``, times ``pw = 3`` for the positive target.)
    """

    BASE_NAME = "bce_with_logits"
    MODULE = nn.BCEWithLogitsLoss
    DEFAULTS = {"weight": None, "pos_weight": None}

    def __init__(
        self,
        *,
        weight: Tensor | Sequence[float] | None = None,
        pos_weight: Tensor | Sequence[float] | None = None,
        reduction: str = "mean",
    ):
        options = {
            "weight": non_negative_weights(weight, "bce_with_logits: weight"),
            "pos_weight": non_negative_weights(pos_weight, "bce_with_logits: pos_weight"),
        }
        super().__init__(options, reduction)
        self.weight: Tensor | None = options["weight"]
        self.pos_weight: Tensor | None = options["pos_weight"]

    @property
    def is_negative_log_likelihood(self) -> bool:
        return self.weight is None and self.pos_weight is None

    def _options_like(self, outputs: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """``weight`` and ``pos_weight`` on the outputs' device and dtype."""
        return (
            self._on(self.weight, outputs.device, outputs.dtype),
            self._on(self.pos_weight, outputs.device, outputs.dtype),
        )

    def _sum(self, outputs: Tensor, targets: Tensor) -> Tensor:
        weight, pos_weight = self._options_like(outputs)
        return F.binary_cross_entropy_with_logits(
            outputs, targets, weight=weight, pos_weight=pos_weight, reduction="sum"
        )

    def _convex_for(self, targets: Tensor) -> bool:
        # s (1 - s) w >= 0 (weights refused if negative); pos_weight p adds p t + 1 - t, negative for
        # some targets outside [0, 1]
        return self.pos_weight is None and self._non_negative(self.weight)

    def _curvature(self, outputs: Tensor, targets: Tensor) -> Tensor:
        weight, pos_weight = self._options_like(outputs)
        s = torch.sigmoid(outputs)
        h = s * (1.0 - s)
        if pos_weight is not None:
            t = targets.to(outputs.dtype)
            h = h * (pos_weight * t + 1.0 - t)
        return torch.broadcast_to(h if weight is None else h * weight, outputs.shape)

    def _sample_targets(self, outputs: Tensor, targets: Tensor, generator: torch.Generator) -> Tensor:
        """``y ~ Bernoulli(sigmoid(o))`` per entry, as 0./1. in the outputs' dtype."""
        uniform = random_like(torch.rand, outputs, generator)
        return (uniform < torch.sigmoid(outputs.to(uniform.dtype))).to(outputs.dtype)
