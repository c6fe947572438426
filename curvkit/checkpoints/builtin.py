"""The table of built-in checkpoint formats, in the order they are asked.

Its own module so that :mod:`curvkit.registry` can read the built-in names
without importing :mod:`curvkit.checkpoints.formats`, which asks the registry.
"""

from __future__ import annotations

from curvkit.checkpoints import export, safetensors_format, torch_format, torchscript
from curvkit.checkpoints._types import CheckpointLoader

__all__ = ["BUILTIN_LOADERS"]

BUILTIN_LOADERS: tuple[CheckpointLoader, ...] = (
    safetensors_format.LOADER,
    export.LOADER,
    torchscript.LOADER,
    torch_format.LOADER,
)
"""The built-in formats, in the order they are tried after the plugins' loaders."""
