"""PyTorch back-end settings changed for one scope and restored exactly afterwards.

``torch.backends.cudnn.flags(...)`` resets every flag it is not given (and the
newer ``fp32_precision`` settings with them) for its scope, and reading the
legacy ``allow_tf32`` flags raises once a user has set the newer
``fp32_precision`` ones. So each function here changes only the settings it names,
through the API the installed torch uses, and restores them as they were. The
settings are the process's: scopes entered from several threads at once may
restore each other's values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["math_attention", "without_cudnn", "without_tf32"]


@contextlib.contextmanager
def _set(settings: list[tuple[Any, str]], value: Any) -> Iterator[None]:
    """Each ``(object, attribute)`` set to ``value`` while the scope runs, then restored."""
    saved = [getattr(owner, name) for owner, name in settings]
    try:
        for owner, name in settings:
            setattr(owner, name, value)
        yield
    finally:
        for (owner, name), old in zip(settings, saved):
            setattr(owner, name, old)


def without_cudnn() -> contextlib.AbstractContextManager[None]:
    """cuDNN off while the scope runs (PyTorch's own kernels instead), the other settings untouched."""
    return _set([(torch.backends.cudnn, "enabled")], False)


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Attention by PyTorch's differentiable composite code while the scope runs.

    Two choices of PyTorch's are undone, and restored afterwards:

    * ``scaled_dot_product_attention`` (which ``nn.MultiheadAttention`` calls) by
      its math kernel: the fused kernels that PyTorch prefers (flash attention on
      the CPU and on GPUs, memory-efficient and cuDNN attention on GPUs) have a
      first backward pass only, so a Hessian-vector product through them fails
      ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward
      is not implemented"), and so does a forward-mode product. The math kernel
      is made of ordinary differentiable operations;
    * the inference fast path of ``nn.MultiheadAttention`` and
      ``nn.TransformerEncoderLayer`` off (``torch.backends.mha``): in evaluation
      mode under :mod:`torch.func` transforms the modules cannot see that their
      weights are being differentiated and take the fused
      ``_native_multi_head_attention``, which has no batching rule: :func:`torch.vmap`
      over per-sample gradients (``empirical-fisher``, EKFAC, the diagonals) falls
      back to a loop over the samples, and torch prints a multi-line
      ``UserWarning`` ("There is a performance drop because we have not yet
      implemented the batching rule ...") amid curvkit's output. Off, every
      estimator evaluates attention by the same code.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def without_tf32() -> contextlib.AbstractContextManager[None]:
    """TF32 off for CUDA matrix products and cuDNN convolutions while the scope runs.

    TF32 (the default of cuDNN's convolutions on Ampere and later GPUs) keeps 10
    bits of mantissa: about 3e-4 relative error in a convolution's gradient,
    beyond float32 comparisons at 1e-4. torch 2.9 and later: ``fp32_precision =
    "ieee"``; earlier: ``allow_tf32 = False``.
    """
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision") and hasattr(cudnn, "conv"):
        return _set([(matmul, "fp32_precision"), (cudnn.conv, "fp32_precision")], "ieee")
    return _set([(matmul, "allow_tf32"), (cudnn, "allow_tf32")], False)
