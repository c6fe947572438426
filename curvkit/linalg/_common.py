"""Shared helpers of the spectral algorithms: operator validation and random probes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from curvkit.errors import ShapeMismatchError

__all__ = ["Progress", "check_square", "probe_generator", "rademacher", "gaussian"]

Progress = Callable[[dict[str, Any]], None]
"""A progress callback: called with a dict of counters (``matvecs``, ``step``, ...)."""


def check_square(A: Any) -> int:
    """Validate the operator contract (``shape``, ``matmat``, ``dtype``, ``device``); return ``P``.

    Raises:
        ShapeMismatchError: ``A`` is not square or lacks the contract's methods.
    """
    shape = getattr(A, "shape", None)
    if shape is None or len(shape) != 2 or not hasattr(A, "matmat"):
        raise ShapeMismatchError(
            f"expected a curvkit.CurvatureOperator (shape, matmat), got {type(A).__name__}"
        )
    if shape[0] != shape[1]:
        raise ShapeMismatchError(f"spectral analysis needs a square operator, got shape {tuple(shape)}")
    return int(shape[0])


def probe_generator(seed: int | None) -> torch.Generator:
    """A CPU generator, so that a seed gives the same probes on every device."""
    gen = torch.Generator()
    gen.manual_seed(0 if seed is None else seed)
    return gen


def rademacher(P: int, K: int, gen: torch.Generator, dtype: torch.dtype, device: Any) -> Tensor:
    """``[P, K]`` independent +-1 entries."""
    return (torch.randint(0, 2, (P, K), generator=gen) * 2 - 1).to(dtype=dtype, device=device)


def gaussian(P: int, K: int, gen: torch.Generator, dtype: torch.dtype, device: Any) -> Tensor:
    """``[P, K]`` independent standard normal entries."""
    return torch.randn(P, K, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
