"""PyTorch back-end settings changed for one scope, the others kept.

``torch.backends.cudnn.flags(...)`` resets every flag it is not given to its own
default (``enabled=False`` among them), so a scope that changes one flag must
pass the others as they are; :func:`cudnn_settings` does, and :func:`without_tf32`
also switches TF32 off for CUDA matrix products. Both are harmless on the CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["cudnn_settings", "without_tf32"]


@contextlib.contextmanager
def cudnn_settings(*, enabled: bool | None = None, allow_tf32: bool | None = None) -> Iterator[None]:
    """cuDNN ``enabled`` and ``allow_tf32`` as given (``None``: as they are) while the scope runs."""
    cudnn = torch.backends.cudnn
    with cudnn.flags(
        enabled=cudnn.enabled if enabled is None else enabled,
        benchmark=cudnn.benchmark,
        deterministic=cudnn.deterministic,
        allow_tf32=cudnn.allow_tf32 if allow_tf32 is None else allow_tf32,
    ):
        yield


@contextlib.contextmanager
def without_tf32() -> Iterator[None]:
    """TF32 off for cuDNN and for CUDA matrix products while the scope runs.

    TF32 (the default of cuDNN's convolutions on Ampere and later GPUs) keeps 10
    bits of mantissa: about 3e-4 relative error in a convolution's gradient,
    beyond float32 comparisons at 1e-4.
    """
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        with cudnn_settings(allow_tf32=False):
            yield
    finally:
        matmul.allow_tf32 = saved
