"""Losses as sums over terms, so that curvature is independent of batching.

A :class:`BatchLoss` returns, for one batch, the *sum* of its loss terms and the
number of terms that PyTorch's ``reduction="mean"`` would divide by. The
full-dataset mean loss is then

.. math:: L(\\theta) = \\frac{\\sum_b S_b(\\theta)}{\\sum_b c_b},

which no choice of batch size changes. Built-in names and the standard
``torch.nn`` loss modules are counted exactly (class-index targets, ignored
indices, sequence outputs). Any other callable ``(outputs, targets) -> scalar``
is taken to return the *mean over the batch's samples*: its sum is
``n_b * loss`` and its count ``n_b``, with ``n_b`` the batch's first dimension.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from curvkit.errors import UnknownLossError

__all__ = ["BatchLoss", "resolve_loss", "LOSS_NAMES"]


@dataclass(frozen=True)
class BatchLoss:
    """A loss split into a per-batch sum and a per-batch count.

    Attributes:
        name: A short description, recorded with results.
        sum_and_count: ``(outputs, targets) -> (sum of terms, number of terms)``.
        reduction: ``"mean"`` or ``"sum"``: how the problem combines batches.
    """

    name: str
    sum_and_count: Callable[[Any, Tensor], tuple[Tensor, int]]
    reduction: str = "mean"


def _ce(outputs: Tensor, targets: Tensor, **kw: Any) -> tuple[Tensor, int]:
    total = F.cross_entropy(outputs, targets, reduction="sum", **kw)
    if targets.is_floating_point():  # class probabilities
        return total, outputs.numel() // outputs.shape[1]
    ignore = kw.get("ignore_index", -100)
    return total, int((targets != ignore).sum())


def _nll(outputs: Tensor, targets: Tensor, **kw: Any) -> tuple[Tensor, int]:
    total = F.nll_loss(outputs, targets, reduction="sum", **kw)
    ignore = kw.get("ignore_index", -100)
    return total, int((targets != ignore).sum())


def _mse(outputs: Tensor, targets: Tensor) -> tuple[Tensor, int]:
    if outputs.shape != targets.shape:
        raise UnknownLossError(  # caught and re-raised as DataError by the problem
            f"mse: outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} differ"
        )
    return F.mse_loss(outputs, targets, reduction="sum"), outputs.numel()


def _bce(outputs: Tensor, targets: Tensor, **kw: Any) -> tuple[Tensor, int]:
    if outputs.shape != targets.shape:
        raise UnknownLossError(
            f"bce_with_logits: outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} differ"
        )
    total = F.binary_cross_entropy_with_logits(outputs, targets, reduction="sum", **kw)
    return total, outputs.numel()


LOSS_NAMES: dict[str, Callable[..., tuple[Tensor, int]]] = {
    "cross_entropy": _ce,
    "nll": _nll,
    "mse": _mse,
    "bce_with_logits": _bce,
}


def _from_module(module: nn.Module) -> tuple[str, Callable[..., tuple[Tensor, int]]] | None:
    """Exact sum/count for the standard loss modules without class weights."""
    if getattr(module, "weight", None) is not None:
        return None
    if type(module) is nn.CrossEntropyLoss:
        kw = {"ignore_index": module.ignore_index, "label_smoothing": module.label_smoothing}
        return "cross_entropy", lambda o, t: _ce(o, t, **kw)
    if type(module) is nn.NLLLoss:
        return "nll", lambda o, t: _nll(o, t, ignore_index=module.ignore_index)
    if type(module) is nn.MSELoss:
        return "mse", _mse
    if type(module) is nn.BCEWithLogitsLoss:
        pw = module.pos_weight
        return "bce_with_logits", lambda o, t: _bce(o, t, pos_weight=pw)
    return None


def _per_sample_mean(fn: Callable[[Any, Tensor], Tensor]) -> Callable[..., tuple[Tensor, int]]:
    def sum_and_count(outputs: Any, targets: Tensor) -> tuple[Tensor, int]:
        n = targets.shape[0]
        return fn(outputs, targets) * n, n

    return sum_and_count


def resolve_loss(loss: str | nn.Module | Callable, reduction: str | None = None) -> BatchLoss:
    """Turn a loss given by the user into a :class:`BatchLoss`.

    Args:
        loss: ``"cross_entropy"``, ``"mse"``, ``"bce_with_logits"``, ``"nll"``, a
            ``torch.nn`` loss module, or a callable ``(outputs, targets) -> scalar``
            returning the mean over the batch's samples.
        reduction: ``"mean"`` (the default; for a loss module, the module's own
            reduction) or ``"sum"``.

    Raises:
        UnknownLossError: The loss is not recognised, or the reduction is invalid.
    """
    if isinstance(loss, str):
        if loss not in LOSS_NAMES:
            raise UnknownLossError(
                f"unknown loss {loss!r}; use one of {sorted(LOSS_NAMES)}, "
                "a torch.nn loss module or a callable (outputs, targets) -> scalar"
            )
        name, fn = loss, LOSS_NAMES[loss]
    elif isinstance(loss, nn.Module):
        module_reduction = getattr(loss, "reduction", "mean")
        if module_reduction not in ("mean", "sum"):
            raise UnknownLossError(
                f"loss module {type(loss).__name__} has reduction={module_reduction!r}; use 'mean' or 'sum'"
            )
        reduction = reduction or module_reduction
        exact = _from_module(loss)
        if exact is not None:
            name, fn = exact
        else:
            mean_module = loss
            if module_reduction == "sum":
                raise UnknownLossError(
                    f"cannot split {type(loss).__name__} with reduction='sum' into "
                    "per-sample terms; give it reduction='mean' and pass reduction='sum' "
                    "to the problem"
                )
            name, fn = type(loss).__name__, _per_sample_mean(mean_module)
    elif callable(loss):
        name, fn = getattr(loss, "__name__", type(loss).__name__), _per_sample_mean(loss)
    else:
        raise UnknownLossError(
            f"loss must be a name in {sorted(LOSS_NAMES)}, a torch.nn loss module or a "
            f"callable, got {type(loss).__name__}"
        )
    reduction = reduction or "mean"
    if reduction not in ("mean", "sum"):
        raise UnknownLossError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return BatchLoss(name=name, sum_and_count=fn, reduction=reduction)
