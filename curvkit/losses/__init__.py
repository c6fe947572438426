"""Losses as sums over terms, with their curvature w.r.t. the model outputs.

A :class:`BatchLoss` returns, for one batch, the *sum* of its loss terms and the
count that PyTorch's ``reduction="mean"`` would divide by. The full-dataset mean
loss is then

.. math:: L(\\theta) = \\frac{\\sum_b S_b(\\theta)}{\\sum_b c_b},

which no choice of batch size changes. The count is a Python ``float``: the
number of terms, or for a class-weighted cross-entropy or NLL the sum of the
weights of the targets not ignored.

A loss also gives what the Gauss-Newton and Fisher estimators need: the Hessian
of ``S_b`` w.r.t. the outputs as a product and as a symmetric factor, and, for a
negative log-likelihood, a factor of the Fisher and targets drawn from the
model's predictive distribution (see :class:`BatchLoss`).

:func:`resolve_loss` turns what the user gives into a :class:`BatchLoss`:

* ``"cross_entropy"``, ``"nll"``, ``"mse"``, ``"bce_with_logits"``
  (:data:`LOSS_NAMES`), and the modules ``nn.CrossEntropyLoss``,
  ``nn.NLLLoss``, ``nn.MSELoss`` and ``nn.BCEWithLogitsLoss`` with their options
  (``ignore_index``, ``weight``, ``label_smoothing``, ``pos_weight``): exact
  counts and closed forms (:class:`CrossEntropy`,
  :class:`NegativeLogLikelihood`, :class:`MeanSquaredError`,
  :class:`BinaryCrossEntropyWithLogits`). A module with non-default options is
  named after them, e.g. ``"cross_entropy(ignore_index=1)"``.
* Any other ``torch.nn`` loss module or callable ``(outputs, targets) -> scalar``
  is taken to return the *mean over the batch's samples*: its sum is
  ``n_b * loss``, its count ``n_b`` (the batch's first dimension), its curvature
  by autograd (:class:`CustomLoss`). It is no negative log-likelihood unless it
  is a :class:`CustomLoss` given a ``sample_targets``.
* A :class:`BatchLoss` (e.g. a :class:`CustomLoss`) is used as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from curvkit.errors import UnknownLossError
from curvkit.losses._base import BatchLoss, ClosedFormLoss
from curvkit.losses._categorical import CrossEntropy, NegativeLogLikelihood
from curvkit.losses._custom import CustomLoss
from curvkit.losses._elementwise import BinaryCrossEntropyWithLogits, MeanSquaredError

__all__ = [
    "BatchLoss",
    "BinaryCrossEntropyWithLogits",
    "ClosedFormLoss",
    "CrossEntropy",
    "CustomLoss",
    "LOSS_NAMES",
    "MeanSquaredError",
    "NegativeLogLikelihood",
    "resolve_loss",
]

_CLOSED_FORMS = (CrossEntropy, NegativeLogLikelihood, MeanSquaredError, BinaryCrossEntropyWithLogits)

#: The loss names :func:`resolve_loss` accepts, and the closed form each stands for.
LOSS_NAMES: dict[str, type[ClosedFormLoss]] = {cls.BASE_NAME: cls for cls in _CLOSED_FORMS}

_MODULE_LOSSES = {cls.MODULE: cls for cls in _CLOSED_FORMS}


def resolve_loss(
    loss: str | nn.Module | BatchLoss | Callable[[Any, Tensor], Tensor], reduction: str | None = None
) -> BatchLoss:
    """Turn a loss given by the user into a :class:`BatchLoss`.

    Args:
        loss: ``"cross_entropy"``, ``"mse"``, ``"bce_with_logits"``, ``"nll"``, a
            ``torch.nn`` loss module, a :class:`BatchLoss`, or a callable
            ``(outputs, targets) -> scalar`` returning the mean over the batch's
            samples.
        reduction: ``"mean"`` (the default; for a loss module, the module's own
            reduction; for a :class:`BatchLoss`, its own) or ``"sum"``.

    Raises:
        UnknownLossError: The loss is not recognised, its options or the
            reduction are invalid.

    Example:
        >>> import torch
        >>> loss = resolve_loss(torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0])))
        >>> loss.name, loss.is_negative_log_likelihood
        ('cross_entropy(weight=[1, 3])', False)
        >>> loss.count(torch.zeros(3, 2), torch.tensor([0, 1, 1]))  # 1 + 3 + 3, what the mean divides by
        7.0
    """
    if isinstance(loss, BatchLoss):
        return loss if reduction is None else loss.with_reduction(reduction)
    if isinstance(loss, str):
        if loss not in LOSS_NAMES:
            raise UnknownLossError(
                f"unknown loss {loss!r}; use one of {sorted(LOSS_NAMES)}, "
                "a torch.nn loss module or a callable (outputs, targets) -> scalar"
            )
        return LOSS_NAMES[loss](reduction=reduction or "mean")
    if isinstance(loss, nn.Module):
        module_reduction = getattr(loss, "reduction", "mean")
        if module_reduction not in ("mean", "sum"):
            raise UnknownLossError(
                f"loss module {type(loss).__name__} has reduction={module_reduction!r}; use 'mean' or 'sum'"
            )
        closed_form = _MODULE_LOSSES.get(type(loss))
        if closed_form is not None:
            return closed_form.from_module(loss, reduction or module_reduction)
        if module_reduction == "sum":
            raise UnknownLossError(
                f"cannot split {type(loss).__name__} with reduction='sum' into "
                "per-sample terms; give it reduction='mean' and pass reduction='sum' "
                "to the problem"
            )
        return CustomLoss(loss, name=type(loss).__name__, reduction=reduction or "mean")
    if callable(loss):
        return CustomLoss(loss, reduction=reduction or "mean")
    raise UnknownLossError(
        f"loss must be a name in {sorted(LOSS_NAMES)}, a torch.nn loss module or a "
        f"callable, got {type(loss).__name__}"
    )
