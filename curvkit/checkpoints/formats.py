"""Which loader reads a file: the plugins' loaders, then the built-in formats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from curvkit.checkpoints._text import exc_line
from curvkit.checkpoints._types import CheckpointError, CheckpointLoader
from curvkit.checkpoints.builtin import BUILTIN_LOADERS
from curvkit.errors import CurvkitError, PluginError

__all__ = ["checkpoint_formats"]


def checkpoint_formats() -> list[CheckpointLoader]:
    """Every checkpoint loader in the order :func:`load_checkpoint` asks them.

    Plugins' loaders come first (the plugin registered last is asked first), so
    a plugin can take over files a built-in loader would also accept; the
    built-in loaders follow (:data:`BUILTIN_LOADERS`).
    """
    # imported here: the registry imports this package (its loader type and built-in names)
    from curvkit.registry import checkpoint_loaders

    return [*checkpoint_loaders(), *BUILTIN_LOADERS]


def _detecting_loader(path: Path) -> CheckpointLoader | None:
    """The first loader whose ``detect`` accepts the existing ``path``, or None."""
    for loader in checkpoint_formats():
        try:
            found = loader.detect(path)
        except Exception as exc:
            raise PluginError(
                f"checkpoint loader {loader.name!r} of plugin {loader.plugin or 'curvkit'!r} failed "
                f"while inspecting {path} ({exc_line(exc)}); fix or uninstall the plugin"
            ) from exc
        if found:
            return loader
    return None


def find_loader(path: Path) -> CheckpointLoader:
    """The loader that reads the existing ``path``; a one-line error if none does."""
    loader = _detecting_loader(path)
    if loader is not None:
        return loader
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a directory, not a checkpoint file; pass the checkpoint file inside it "
            "(or install a plugin that loads such directories)"
        )
    raise CheckpointError(
        f"unknown checkpoint format: {path} is not a torch.save file, safetensors, TorchScript or "
        "torch.export archive; convert it to one of these or add a loader plugin (curvkit_checkpoint_loaders)"
    )


def run_loader(loader: CheckpointLoader, path: Path, device: torch.device, trust_pickle: bool) -> Any:
    """``loader.load(path, ...)``; a plugin's unexpected exception becomes a one-line error."""
    try:
        return loader.load(path, map_location=device, trust_pickle=trust_pickle)
    except CurvkitError:
        raise
    except Exception as exc:
        if not loader.plugin:
            raise
        raise CheckpointError(
            f"checkpoint loader {loader.name!r} of plugin {loader.plugin!r} cannot read {path} "
            f"({exc_line(exc)})"
        ) from exc
