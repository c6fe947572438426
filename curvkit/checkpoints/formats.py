"""Which loader reads a file: the plugins' loaders, then the built-in formats.

Also answers whether a file is a checkpoint at all (:func:`is_checkpoint`), for
finding the checkpoints in a folder (:func:`find_checkpoints`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from curvkit.checkpoints._text import exc_line
from curvkit.checkpoints._types import CheckpointError, CheckpointLoader
from curvkit.checkpoints.builtin import BUILTIN_LOADERS
from curvkit.errors import CurvkitError, PluginError

__all__ = ["checkpoint_formats", "find_checkpoints", "is_checkpoint"]


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


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a checkpoint that some loader, a plugin's or built-in, recognises.

    Asks every loader's ``detect`` (see :func:`checkpoint_formats`), which looks
    at the suffix and the first bytes only; nothing is loaded. A file of a known
    format that is damaged still counts (loading it then says what is wrong), so
    does a ``.pt``, ``.pth``, ``.bin``, ``.ckpt``, ``.tar`` or ``.pkl`` file
    whose content is unrecognisable. A directory counts only if a plugin's
    loader reads such directories.

    Args:
        path: A file or directory; a path that does not exist is no checkpoint.

    Returns:
        True if :func:`load_checkpoint` would pick a loader for it.

    Raises:
        PluginError: A plugin's ``detect`` raised.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from curvkit.checkpoints import is_checkpoint
        >>> folder = Path(tempfile.mkdtemp())
        >>> torch.save({"w": torch.zeros(2)}, folder / "weights.bin")
        >>> _ = (folder / "notes.txt").write_text("lr 0.1")
        >>> is_checkpoint(folder / "weights.bin"), is_checkpoint(folder / "notes.txt")
        (True, False)
    """
    path = Path(path)
    return path.exists() and _detecting_loader(path) is not None


def find_checkpoints(folder: str | os.PathLike[str]) -> list[Path]:
    """The checkpoints directly inside ``folder``, sorted by name.

    Every entry for which :func:`is_checkpoint` is true: files in any format a
    loader reads (``.pt``, ``.pth``, ``.bin``, ``.ckpt``, ``.tar``,
    ``.safetensors``, ``.jit``, ``.pt2``, plugins' formats, whatever their
    suffix when the content is recognised), and directories a plugin reads.
    Hidden entries (a name starting with ``.``, such as the temporary file of
    a :func:`save_checkpoint` in progress) are left out; sub-folders are not
    searched.

    Args:
        folder: The folder.

    Returns:
        The paths, sorted by name (callers wanting ``step-9`` before
        ``step-10`` sort them naturally).

    Raises:
        CheckpointError: ``folder`` is not a folder.
        PluginError: A plugin's ``detect`` raised.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; pass a folder of checkpoints")
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and is_checkpoint(p))
