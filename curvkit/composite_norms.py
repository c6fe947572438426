"""Normalisation layers from elementary operations, for derivatives of every order.

In torch 2.13 every automatic third derivative through the fused normalisation
kernels is wrong: ``layer_norm``, ``instance_norm`` and ``batch_norm`` with batch
statistics, in forward mode, reverse mode and their mixtures (from 5% to over
100% off central differences on small models). Measured on a
Linear-Tanh-LayerNorm-Linear network along its first layer's weights: forward
over forward over forward gives +0.0013, the mixed modes -0.0045 and reverse
over reverse over reverse -0.0063, where finite differences of the loss itself
(two step sizes agreeing to 1e-7) give -0.0043453
(``tests/test_newton_summary.py`` records it, so that a torch that fixes it is
noticed). ``torch.func`` cannot always transform ``group_norm``. Their first and
second derivatives are right.

:class:`CompositeNorms` is a :class:`~torch.overrides.TorchFunctionMode` under
which those four operations are computed from elementary ones (mean, variance,
``rsqrt``), whose derivatives of every order are right: the same values to
rounding. Every third-order computation of curvkit runs under it (the Newton
summary, the ``d3`` estimator, the ``NewtonSummary`` optimizer). ``batch_norm``
and ``instance_norm`` with running statistics are affine in the input and keep
the fused kernel. A model that calls ``torch.native_layer_norm`` or another
fused kernel directly is not covered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["CompositeNorms"]


def _normalize(x: Tensor, dims: tuple[int, ...], eps: float) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over ``dims`` (biased variance), from elementary operations.

    Statistics of half-precision inputs are taken in float32, as the fused kernels do.
    """
    y = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    centred = y - y.mean(dims, keepdim=True)
    variance = (centred * centred).mean(dims, keepdim=True)
    return (centred * torch.rsqrt(variance + eps)).to(x.dtype)


def _affine(out: Tensor, weight: Tensor | None, bias: Tensor | None, channels: bool) -> Tensor:
    """``out * weight + bias``, per channel (dimension 1) or over the trailing dimensions."""
    shape = (1, -1, *([1] * (out.ndim - 2))) if channels else None
    if weight is not None:
        out = out * (weight.reshape(shape) if shape else weight)
    if bias is not None:
        out = out + (bias.reshape(shape) if shape else bias)
    return out


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    n = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    return _affine(_normalize(input, tuple(range(-n, 0)), eps), weight, bias, channels=False)


def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    grouped = input.reshape(input.shape[0], num_groups, -1)
    return _affine(_normalize(grouped, (-1,), eps).reshape(input.shape), weight, bias, channels=True)


def _instance_norm(input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn):
    if not use_input_stats:  # running statistics: affine in the input, the fused kernel is right
        return torch.instance_norm(
            input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn
        )
    return _affine(_normalize(input, tuple(range(2, input.ndim)), eps), weight, bias, channels=True)


def _batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn):
    if not training:  # running statistics: affine in the input, the fused kernel is right
        return torch.batch_norm(
            input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn
        )
    dims = (0, *range(2, input.ndim))
    return _affine(_normalize(input, dims, eps), weight, bias, channels=True)


def _functional_instance_norm(
    input,
    running_mean=None,
    running_var=None,
    weight=None,
    bias=None,
    use_input_stats=True,
    momentum=0.1,
    eps=1e-5,
):
    cudnn = torch.backends.cudnn.enabled
    return _instance_norm(
        input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn
    )


def _functional_batch_norm(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
):
    cudnn = torch.backends.cudnn.enabled
    return _batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)


_COMPOSITES = {  # torch.nn.functional's and torch's names of each (those call these)
    F.layer_norm: _layer_norm,
    torch.layer_norm: _layer_norm,
    F.group_norm: _group_norm,
    torch.group_norm: _group_norm,
    F.instance_norm: _functional_instance_norm,
    torch.instance_norm: _instance_norm,
    F.batch_norm: _functional_batch_norm,
    torch.batch_norm: _batch_norm,
}


class CompositeNorms(TorchFunctionMode):
    """A context in which layer, group, instance and batch normalisation use elementary operations.

    The same values (to rounding) as the fused kernels, with derivatives of every
    order right: in torch 2.13 the third derivatives of the fused ``layer_norm``,
    ``instance_norm`` and training-mode ``batch_norm`` are wrong, and ``torch.func``
    cannot always transform ``group_norm``. ``batch_norm`` and ``instance_norm`` with
    running statistics keep the fused kernel (affine in the input). Statistics
    are not updated inside it (curvkit never updates them: a
    :class:`~curvkit.Problem` in training mode works on copies of the buffers).

    Example:
        >>> x = torch.randn(4, 6, dtype=torch.float64)
        >>> with CompositeNorms():
        ...     y = torch.nn.LayerNorm(6).double()(x)
        >>> torch.allclose(y, F.layer_norm(x, (6,)))
        True
    """

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        composite = _COMPOSITES.get(func)
        if composite is not None:
            return composite(*args, **kwargs)
        return func(*args, **kwargs)
