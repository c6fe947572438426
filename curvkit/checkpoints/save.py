"""Writing checkpoints that carry the curvkit metadata convention."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvkit.checkpoints._text import exc_line
from curvkit.checkpoints._types import CheckpointError
from curvkit.checkpoints.factories import check_factory_spec
from curvkit.checkpoints.metadata import METADATA_KEY, METADATA_VERSION, STATE_DICT_KEY, check_plain
from curvkit.compiled import original_module

__all__ = ["save_checkpoint"]


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        model = original_module(model)
        if not isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            return model
        model = model.module


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    model_factory: str,
    model_kwargs: dict[str, Any] | None = None,
    data: str | None = None,
    loss: str | None = None,
    **extra: Any,
) -> Path:
    """Write a checkpoint that ``curvkit analyze`` loads without flags.

    The file is ``torch.save({"curvkit": metadata, "model_state_dict": state})``
    with ``metadata = {"version": 1, "model_factory": ..., "model_kwargs": ...,
    "data": ..., "loss": ..., **extra}``; it loads with ``weights_only=True``,
    so the metadata must be plain JSON-able values. The file is written to a
    temporary name and renamed, so an interrupted save leaves no half file.

    Args:
        path: Where to write (e.g. ``"ckpt/epoch_10.pt"``).
        model: The model; DistributedDataParallel, DataParallel and
            ``torch.compile`` wrappers are unwrapped.
        model_factory: ``"module:attr"`` that rebuilds the model as
            ``factory(**model_kwargs)``: an ``nn.Module`` subclass, or a function
            marked with :func:`trusted_factory` (a checkpoint may name only those,
            unless the user confirms with ``--model``). It is not imported here;
            ``__main__`` is refused because a script cannot be imported later.
        model_kwargs: Keyword arguments of the factory.
        data: The data spec ``curvkit analyze --data`` would take (a bundled
            dataset name, a file, or ``"module:function"``).
        loss: The loss name (``"cross_entropy"``, ``"mse"``, ...).
        **extra: More plain metadata (``epoch=3``, ``step=1200``, ...).

    Returns:
        The path written.

    Raises:
        CheckpointError: Bad factory spec, metadata that is not plain, or the file
            cannot be written.
    """
    path = Path(path)
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    module_name, _ = check_factory_spec(model_factory)
    if module_name == "__main__":
        raise CheckpointError(
            f"model_factory {model_factory!r} names the running script, which cannot be imported when "
            "the checkpoint is loaded; define the model in a module (e.g. models.py) and name it 'models:...'"
        )
    for name, value in (("data", data), ("loss", loss)):
        if value is not None and not isinstance(value, str):
            raise CheckpointError(f"{name} must be a str or None, got {type(value).__name__}")
    if "version" in extra:
        raise CheckpointError("'version' is reserved in curvkit metadata; name that entry differently")
    metadata: dict[str, Any] = {
        "version": METADATA_VERSION,
        "model_factory": model_factory,
        "model_kwargs": dict(model_kwargs or {}),
        "data": data,
        "loss": loss,
        **extra,
    }
    for key, value in metadata.items():
        check_plain(value, key)
    checkpoint = {METADATA_KEY: metadata, STATE_DICT_KEY: _unwrap(model).state_dict()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save raises RuntimeError for a missing folder
        reason = getattr(exc, "strerror", None) or exc_line(exc)
        raise CheckpointError(
            f"cannot write checkpoint {path} ({reason}); check that the folder exists and is writable"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path
