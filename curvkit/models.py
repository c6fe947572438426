"""Small model factories: the architectures of curvkit's bundled checkpoints.

A checkpoint that follows the curvkit metadata convention names its model as
``"curvkit.models:digits_mlp"`` with keyword arguments, so the model can be
rebuilt without pickling code. Both factories take the bundled 8x8 digits as
flat ``[N, 64]`` inputs (see :func:`curvkit.datasets.load_dataset`) and return
``[N, 10]`` logits.

Example:
    >>> import torch
    >>> from curvkit.models import digits_cnn, digits_mlp
    >>> x = torch.rand(5, 64)
    >>> digits_mlp()(x).shape, digits_cnn()(x).shape
    (torch.Size([5, 10]), torch.Size([5, 10]))
    >>> sum(p.numel() for p in digits_mlp(hidden=32).parameters())
    3466
"""

from __future__ import annotations

from torch import nn

from curvkit.arguments import integer

__all__ = ["DIGITS_CLASSES", "DIGITS_FEATURES", "digits_cnn", "digits_mlp"]

DIGITS_FEATURES = 64
"""Inputs per sample of the bundled digits: an 8x8 image, flattened row-major."""

DIGITS_CLASSES = 10
"""Classes of the bundled digits (the digits 0 to 9)."""

_ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


def digits_mlp(hidden: int = 32, depth: int = 2, activation: str = "tanh") -> nn.Sequential:
    """A multilayer perceptron ``64 -> hidden -> ... -> hidden -> 10``.

    Args:
        hidden: Width of each hidden layer.
        depth: Number of hidden layers (at least 1).
        activation: ``"tanh"`` (default: smooth, so the Hessian is too), ``"relu"``
            or ``"gelu"``.

    Returns:
        An ``nn.Sequential`` of ``Linear`` layers with the activation in between,
        mapping ``[N, 64]`` inputs to ``[N, 10]`` logits.

    Raises:
        ValueError: ``hidden`` or ``depth`` is below 1, or the activation is unknown.
    """
    hidden = integer(hidden, "hidden", error=ValueError)
    depth = integer(depth, "depth", error=ValueError)
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(_ACTIVATIONS)}")
    layers: list[nn.Module] = []
    width = DIGITS_FEATURES
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), _ACTIVATIONS[activation]()]
        width = hidden
    layers.append(nn.Linear(width, DIGITS_CLASSES))
    return nn.Sequential(*layers)


def digits_cnn(channels: int = 8, pooled: int = 2) -> nn.Sequential:
    """A small convolutional network for the 8x8 digits, taking flat ``[N, 64]`` inputs.

    The layers: ``Unflatten`` to ``[N, 1, 8, 8]``, ``Conv2d(1, c, 3, padding=1)``,
    ``ReLU``, ``MaxPool2d(2)`` (to 4x4), ``Conv2d(c, 2c, 3, padding=1)``, ``ReLU``,
    ``AdaptiveAvgPool2d(pooled)``, ``Flatten`` and ``Linear(2c * pooled**2, 10)``.
    The ``Unflatten`` layer lets the CNN and the MLP share one dataset.

    Args:
        channels: Channels ``c`` of the first convolution (the second has ``2c``).
        pooled: Side of the average-pooled feature map (1 pools globally).

    Returns:
        An ``nn.Sequential`` mapping ``[N, 64]`` inputs to ``[N, 10]`` logits.

    Raises:
        ValueError: ``channels`` or ``pooled`` is below 1, or ``pooled`` above 4.
    """
    if channels < 1 or not 1 <= pooled <= 4:
        raise ValueError(f"need channels >= 1 and 1 <= pooled <= 4, got channels={channels}, pooled={pooled}")
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, channels, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(pooled),
        nn.Flatten(),
        nn.Linear(2 * channels * pooled * pooled, DIGITS_CLASSES),
    )
