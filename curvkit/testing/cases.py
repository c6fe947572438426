"""Small models and data for testing curvature estimators against dense truth.

Each :class:`Case` builds a model and data from a seed, in float64 by default,
small enough that dense ``P x P`` matrices are cheap (``P`` below ~250). They
cover what breaks estimators: nonlinear activations, convolutions with pooling,
BatchNorm in evaluation mode (with non-trivial running statistics) and dropout
(models saved in training mode, with cross-entropy and with MSE), self-attention
with LayerNorm, tied weights, dict inputs, each built-in loss, and the cases on
which approximations are exact (one datum; a deep linear network), tagged so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.problem import Problem

__all__ = ["CASES", "Case", "LayerCalledTwice", "get_case"]


@dataclass(frozen=True)
class Case:
    """A named test problem.

    Attributes:
        name: Identifier used in test ids.
        make_model: ``() -> nn.Module`` (called under a fixed seed).
        make_data: ``() -> (inputs, targets)`` (called under a fixed seed).
        loss: The loss argument of :class:`~curvkit.Problem`.
        seed: Seed for both.
        tags: What is special about the case, for references that hold on some
            cases only: ``"single-datum"`` (one sample), ``"deep-linear"`` (no
            nonlinearity), ``"dropout"``, ``"batchnorm"``...
    """

    name: str
    make_model: Callable[[], nn.Module]
    make_data: Callable[[], tuple[Any, Tensor]]
    loss: Any
    seed: int = 0
    tags: frozenset[str] = frozenset()

    def build(self, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, Any, Tensor]:
        """Model and data, cast to ``dtype``."""
        torch.manual_seed(self.seed)
        model = self.make_model().to(dtype)
        inputs, targets = self.make_data()
        cast = lambda t: t.to(dtype) if t.is_floating_point() else t
        inputs = {k: cast(v) for k, v in inputs.items()} if isinstance(inputs, dict) else cast(inputs)
        return model, inputs, cast(targets)

    def problem(self, batch_size: int = 5, dtype: torch.dtype = torch.float64, **kwargs: Any) -> Problem:
        """The case as a :class:`~curvkit.Problem` (batches of ``batch_size``)."""
        model, inputs, targets = self.build(dtype)
        return Problem(model, self.loss, (inputs, targets), batch_size=batch_size, **kwargs)


class TinyAttention(nn.Module):
    """One self-attention head with LayerNorm and a classifier on mean-pooled tokens."""

    def __init__(self, d: int = 4, classes: int = 3):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        self.d = d

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / self.d**0.5, dim=-1)
        h = self.norm(x + att @ v)
        return self.head(h.mean(dim=1))


class TiedAutoencoder(nn.Module):
    """A decoder that reuses the encoder's weight (one parameter used twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 4)
        self.dec.weight = self.enc.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.dec(torch.tanh(self.enc(x)))


class LayerCalledTwice(nn.Module):
    """One ``Linear`` applied twice per forward pass (weight sharing in depth).

    Per-layer shortcuts (layer rules, KFAC blocks) must notice that the layer
    ran twice and leave its parameters to a generic path.
    """

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


class MaskedMLP(nn.Module):
    """Takes dict inputs ``{"x": features, "mask": 0/1 weights}``; outputs log-probabilities."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return torch.log_softmax(self.net(x * mask), dim=-1)


def _batchnorm_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    bn = model[1]
    bn.running_mean.copy_(torch.randn(4) * 0.3)
    bn.running_var.copy_(torch.rand(4) + 0.5)
    return model


def _dropout_batchnorm_model(outputs: int) -> nn.Module:
    """An MLP with BatchNorm (non-trivial running statistics) and dropout: both off in eval mode."""
    model = nn.Sequential(
        nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Dropout(0.5), nn.Linear(5, outputs)
    )
    bn = model[1]
    bn.running_mean.copy_(torch.randn(5) * 0.3)
    bn.running_var.copy_(torch.rand(5) + 0.5)
    return model.train()  # saved in training mode, as a checkpoint often is


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2, 2, 2),
        nn.Sigmoid(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2, 3),
    )


CASES: tuple[Case, ...] = (
    Case(
        "tanh-mlp-ce",
        lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)),
        lambda: (torch.randn(13, 4), torch.randint(0, 3, (13,))),
        "cross_entropy",
    ),
    Case(
        "mlp-mse",
        lambda: nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2)),
        lambda: (torch.randn(11, 3), torch.randn(11, 2)),
        "mse",
    ),
    Case(
        "cnn-pool-ce",
        _cnn,
        lambda: (torch.randn(9, 1, 6, 6), torch.randint(0, 3, (9,))),
        "cross_entropy",
    ),
    Case(
        "batchnorm-eval-bce",
        _batchnorm_model,
        lambda: (torch.randn(10, 3), torch.randint(0, 2, (10, 2)).float()),
        "bce_with_logits",
    ),
    Case(
        "attention-layernorm-ce",
        TinyAttention,
        lambda: (torch.randn(8, 3, 4), torch.randint(0, 3, (8,))),
        "cross_entropy",
    ),
    Case(
        "tied-weights-mse",
        TiedAutoencoder,
        lambda: (torch.randn(9, 4), torch.randn(9, 4)),
        "mse",
    ),
    Case(
        "dropout-batchnorm-ce",
        lambda: _dropout_batchnorm_model(3),
        lambda: (torch.randn(12, 4), torch.randint(0, 3, (12,))),
        "cross_entropy",
        tags=frozenset({"dropout", "batchnorm"}),
    ),
    Case(
        "dropout-batchnorm-mse",
        lambda: _dropout_batchnorm_model(2),
        lambda: (torch.randn(12, 4), torch.randn(12, 2)),
        "mse",
        tags=frozenset({"dropout", "batchnorm"}),
    ),
    Case(
        "deep-linear-mse",
        lambda: nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)),
        lambda: (torch.randn(10, 3), torch.randn(10, 2)),
        "mse",
        tags=frozenset({"deep-linear"}),
    ),
    Case(
        "single-datum-ce",
        lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)),
        lambda: (torch.randn(1, 4), torch.randint(0, 3, (1,))),
        "cross_entropy",
        tags=frozenset({"single-datum"}),
    ),
    Case(
        "dict-inputs-nll",
        MaskedMLP,
        lambda: (
            {"x": torch.randn(10, 3), "mask": (torch.rand(10, 3) > 0.3).float()},
            torch.randint(0, 2, (10,)),
        ),
        "nll",
    ),
)


def get_case(name: str) -> Case:
    """The case called ``name``."""
    for case in CASES:
        if case.name == name:
            return case
    raise KeyError(f"no case {name!r}; available: {[c.name for c in CASES]}")
