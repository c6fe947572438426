"""The curvkit metadata convention: the ``"curvkit"`` entry of a checkpoint dict."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from curvkit.checkpoints._types import CheckpointError

__all__ = ["METADATA_FIELDS", "METADATA_KEY", "METADATA_VERSION", "STATE_DICT_KEY"]

METADATA_KEY = "curvkit"
"""The entry of a checkpoint dict that holds curvkit's metadata."""

METADATA_VERSION = 1
"""Version of the metadata convention written by :func:`curvkit.checkpoints.save_checkpoint`."""

STATE_DICT_KEY = "model_state_dict"
"""The entry of a curvkit (and tutorial) checkpoint dict that holds the weights."""

METADATA_FIELDS = ("version", "model_factory", "model_kwargs", "data", "loss")
"""The entries of the convention itself; any other metadata entry is an extra (``epoch``, ``step``)."""

_PLAIN_SCALARS = (str, int, float, bool, type(None))


def check_plain(value: Any, where: str) -> None:
    """Raise unless ``value`` is made of JSON-able plain types only."""
    if type(value) in _PLAIN_SCALARS:
        return
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")
        return
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise CheckpointError(
                    f"metadata entry {where} has a key {key!r} that is not a str; use str keys"
                )
            check_plain(item, f"{where}[{key!r}]")
        return
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    raise CheckpointError(
        f"metadata entry {where} is a {kind}; use plain str/int/float/bool/None, lists and dicts "
        "with str keys (JSON-able), so that the checkpoint loads with weights_only=True"
    )


def is_plain(value: Any) -> bool:
    """Whether ``value`` is made of JSON-able plain types only."""
    try:
        check_plain(value, "value")
    except CheckpointError:
        return False
    return True


def read_metadata(raw: Any, path: Path) -> dict[str, Any]:
    """The curvkit metadata of a checkpoint dict, validated."""
    if not isinstance(raw, Mapping):
        raise CheckpointError(
            f"{path}: the {METADATA_KEY!r} entry is a {type(raw).__name__}, not a dict; "
            "re-save the checkpoint with curvkit.save_checkpoint"
        )
    meta = dict(raw)
    version = meta.get("version", METADATA_VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: curvkit metadata version {version!r} is not an integer")
    if version > METADATA_VERSION:
        raise CheckpointError(
            f"{path} carries curvkit metadata version {version}, newer than this curvkit's "
            f"{METADATA_VERSION}; upgrade curvkit"
        )
    factory = meta.get("model_factory")
    if factory is not None and not isinstance(factory, str):
        raise CheckpointError(f"{path}: metadata model_factory is a {type(factory).__name__}, not a str")
    kwargs = meta.get("model_kwargs")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise CheckpointError(f"{path}: metadata model_kwargs is a {type(kwargs).__name__}, not a dict")
    return meta


def metadata_extras(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The plain extras of curvkit metadata (``epoch=3``, ``step=1200``, ...): what goes to ``info``.

    :func:`curvkit.checkpoints.save_checkpoint` writes its ``**extra`` inside the
    metadata rather than at the top level of the checkpoint dict, so they are
    taken from there into :attr:`LoadedCheckpoint.info`, as a tutorial dict's
    top-level ``epoch`` is.
    """
    return {k: v for k, v in meta.items() if isinstance(k, str) and k not in METADATA_FIELDS and is_plain(v)}
