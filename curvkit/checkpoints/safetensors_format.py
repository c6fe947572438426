"""safetensors files, read with the ``safetensors`` package (the ``curvkit[safetensors]`` extra).

The package memory-maps the file, so a tensor's bytes are read when they are
used; it knows every safetensors dtype and the byte order. It is imported only
when a safetensors file is read: recognising one (:mod:`curvkit.checkpoints.detect`)
does not need it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from curvkit.checkpoints._types import CheckpointError, CheckpointLoader, corrupt_file_error
from curvkit.checkpoints.detect import detector
from curvkit.checkpoints.metadata import METADATA_KEY, STATE_DICT_KEY

__all__ = ["LOADER", "read_safetensors"]

EXTRA_HINT = 'pip install "curvkit[safetensors]"'
"""How to install what reading safetensors files needs."""


def read_safetensors(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a ``.safetensors`` file with the ``safetensors`` package, memory-mapped.

    Args:
        path: The file.
        device: Where the tensors go (``"cpu"``, ``"cuda:0"``, ...).

    Returns:
        ``(tensors, metadata)``: the tensors by name (in the package's order,
        sorted by name) and the file's ``__metadata__`` map (``{}`` if absent).

    Raises:
        CheckpointError: The ``safetensors`` package is not installed (the
            message names the ``curvkit[safetensors]`` extra), the file cannot
            be read, or it is truncated or corrupt.
    """
    path = Path(path)
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError as exc:
        raise CheckpointError(
            f"{path} is a safetensors file and reading it needs the safetensors package: {EXTRA_HINT}"
        ) from exc
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except OSError as exc:
        raise CheckpointError(
            f"cannot read {path} ({exc.strerror or exc}); check the path and permissions"
        ) from exc
    except SafetensorError as exc:  # a bad header, or byte ranges outside the file
        raise corrupt_file_error(path, "safetensors file", exc) from exc
    return tensors, dict(metadata)


def load_safetensors(path: Path, *, map_location: torch.device, **_: Any) -> dict[str, Any]:
    """The tensors of a safetensors file, with the curvkit metadata of its ``__metadata__`` if any."""
    tensors, meta = read_safetensors(path, device=map_location)
    if METADATA_KEY in meta:
        try:
            curvkit_meta = json.loads(meta[METADATA_KEY])
        except ValueError as exc:
            raise corrupt_file_error(path, "safetensors file with curvkit metadata", exc) from exc
        return {METADATA_KEY: curvkit_meta, STATE_DICT_KEY: tensors}
    return tensors


LOADER = CheckpointLoader(
    name="safetensors",
    detect=detector("safetensors"),
    load=load_safetensors,
    description=f"safetensors files, memory-mapped (needs the safetensors package: {EXTRA_HINT})",
)
"""The built-in loader of safetensors files."""
