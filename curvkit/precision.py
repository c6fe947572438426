"""How far two computations of one quantity may differ by rounding alone, by dtype.

Used wherever curvkit compares two computations that should agree: the
determinism probe (two passes over the data), the layer rules against autograd,
the symmetry check's default tolerance.
"""

from __future__ import annotations

import torch

__all__ = ["rounding_tolerance"]


def rounding_tolerance(dtype: torch.dtype) -> float:
    """Relative difference that rounding alone explains between two computations in ``dtype``.

    float64: 1e-10. float32: 1e-4, room for sums taken in another order and a
    GPU's non-deterministic reductions (atomics, cuDNN). Coarser floating dtypes:
    ten of their rounding units (bfloat16 0.078, float16 0.0098). Other dtypes: 1e-4.

    >>> [rounding_tolerance(t) for t in (torch.float64, torch.float32, torch.bfloat16)]
    [1e-10, 0.0001, 0.078125]
    """
    if dtype == torch.float64:
        return 1e-10
    if not dtype.is_floating_point:
        return 1e-4
    return max(1e-4, 10 * torch.finfo(dtype).eps)
