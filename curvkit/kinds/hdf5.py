"""Small helpers for an analysis kind's HDF5 writer and reader (h5py groups).

A kind's ``write(group, result)`` fills an h5py group and its ``read(group)``
rebuilds the result; these helpers keep the conventions of every kind the same:
tensors as NumPy datasets, ``None`` as an absent attribute, attributes read back
as plain Python values. They take h5py objects but never import h5py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["array", "attr", "get_float", "get_int", "set_attr", "tensor"]


def array(t: torch.Tensor) -> np.ndarray:
    """A tensor as a NumPy array for a dataset (half precisions widened to float32)."""
    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.contiguous().numpy()


def tensor(dataset: Any) -> torch.Tensor:
    """A dataset as a tensor."""
    return torch.from_numpy(np.array(dataset[()]))


def attr(value: Any) -> Any:
    """An attribute as a plain Python value (``bytes`` decoded, NumPy scalars and arrays unwrapped)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def set_attr(attrs: Any, key: str, value: Any) -> None:
    """An attribute, or none at all for ``None``."""
    if value is None:
        if key in attrs:
            del attrs[key]
    else:
        attrs[key] = value


def get_int(attrs: Any, key: str) -> int | None:
    """An integer attribute, ``None`` when absent."""
    value = attrs.get(key)
    return None if value is None else int(attr(value))


def get_float(attrs: Any, key: str) -> float | None:
    """A float attribute, ``None`` when absent."""
    value = attrs.get(key)
    return None if value is None else float(attr(value))
