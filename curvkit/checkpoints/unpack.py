"""What a loaded checkpoint object holds: which entry has the weights, the metadata, plain extras.

A training script saves the model's ``state_dict`` under a key of its choosing
(``model_state`` in Resemblyzer, ``model`` and ``model_ema`` in torchvision's
reference scripts, ``state_dict`` and ``state_dict_ema`` in timm, ``params`` and
``params_ema`` in BasicSR, ``module`` in DeepSpeed). The usual keys are
recognised (:data:`WEIGHTS_KEYS`); when several entries hold weights and none is
clearly the model, the caller names one (``weights_key``, ``--weights-key``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from curvkit.checkpoints._text import listing
from curvkit.checkpoints._types import CheckpointError
from curvkit.checkpoints.metadata import (
    METADATA_KEY,
    STATE_DICT_KEY,
    is_plain,
    metadata_extras,
    read_metadata,
)

__all__ = ["WEIGHTS_KEYS"]

WEIGHTS_KEYS: tuple[str, ...] = (
    STATE_DICT_KEY,
    "state_dict",
    "model_state",
    "model",
    "net",
    "network",
    "module",
    "weights",
    "params",
    "ema",
    "ema_state_dict",
    "ema_model",
    "model_ema",
    "state_dict_ema",
    "params_ema",
)
"""Entries of a checkpoint dict that are taken to hold the model's weights.

They are looked for at the top level, else one level down (``state.model``);
if none holds weights, any other entry that does (``generator``) is taken when
it is the only one.
"""

_LIGHTNING_MARKERS = ("pytorch-lightning_version", "hyper_parameters", "global_step", "loops")
_BULKY_KEYS = {
    "optimizer_state_dict",
    "optimizer_state",
    "optimizer_states",
    "optimizer",
    "lr_schedulers",
    "lr_scheduler",
    "scheduler",
    "callbacks",
}
"""Training state that is neither the model's weights nor worth keeping in ``info``."""


@dataclass
class CheckpointContent:
    """What a checkpoint holds: a ``state_dict`` (``state``) or a whole ``module``, and extras."""

    kind: str
    state: Mapping[str, Any] | None = None
    module: nn.Module | None = None
    weights_key: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    hyper_parameters: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _tensors_by_name(obj: Any, quantifier: Callable[[Iterable[bool]], bool]) -> bool:
    """A non-empty dict with str keys whose values are all (``all``) or some (``any``) tensors."""
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and quantifier(isinstance(v, Tensor) for v in obj.values())
    )


def _is_state_dict(obj: Any) -> bool:
    return _tensors_by_name(obj, all)


def _holds_weights(obj: Any) -> bool:
    """A whole module, or a dict with str keys and some tensors among its values."""
    return isinstance(obj, nn.Module) or _tensors_by_name(obj, any)


def _is_weights_key(key: object) -> bool:
    return isinstance(key, str) and key in WEIGHTS_KEYS


def _may_hold_weights(key: object) -> bool:
    """Whether the entry ``key`` of a checkpoint dict is searched for weights: not training state."""
    return isinstance(key, str) and key not in _BULKY_KEYS and key != METADATA_KEY


def _weights_entries(obj: Mapping[Any, Any]) -> dict[str, Any]:
    """The entries that may hold the model's weights, by (dotted) key.

    The first non-empty of: entries named in :data:`WEIGHTS_KEYS`; such entries
    one level down; any other entry holding weights (training state excluded).
    """
    named = {k: v for k, v in obj.items() if _is_weights_key(k) and _holds_weights(v)}
    if named:
        return named
    outer = {k: v for k, v in obj.items() if _may_hold_weights(k) and isinstance(v, Mapping)}
    nested = {
        f"{k}.{inner}": v
        for k, entries in outer.items()
        for inner, v in entries.items()
        if _is_weights_key(inner) and _holds_weights(v)
    }
    if nested:
        return nested
    return {k: v for k, v in obj.items() if _may_hold_weights(k) and _holds_weights(v)}


def _only_weights_entry(obj: Mapping[Any, Any], path: Path) -> tuple[str, Any]:
    """The one entry holding the weights; an error naming the candidates if there are several."""
    entries = _weights_entries(obj)
    if len(entries) == 1:
        return next(iter(entries.items()))
    if entries:
        raise CheckpointError(
            f"{path} holds several sets of weights ({listing(repr(k) for k in entries)}) and none is "
            "clearly the model; choose one with --weights-key KEY (weights_key='KEY')"
        )
    usual = ", ".join(repr(k) for k in WEIGHTS_KEYS[:4])
    raise CheckpointError(
        f"no model weights found in {path}: a dict with keys {listing(repr(k) for k in obj)} and no dict "
        f"of tensors among them; expected a state_dict or a dict holding one (under {usual}, ...); "
        "name a deeper entry with --weights-key (e.g. 'state.model')"
    )


def _named_entry(obj: Mapping[Any, Any], key: str, path: Path) -> Any:
    """The entry ``key`` names: a top-level key, or a dotted path into nested dicts."""
    if _is_state_dict(obj):
        raise CheckpointError(
            f"{path} is a plain state_dict (tensors by parameter name), not a dict of entries; "
            f"leave out --weights-key {key!r}"
        )
    if key in obj:
        value = obj[key]
    else:
        value, done = obj, []
        for part in key.split("."):
            where = f"entry {'.'.join(done)!r}" if done else "the checkpoint"
            if not isinstance(value, Mapping):
                raise CheckpointError(
                    f"--weights-key {key!r} does not fit {path}: {where} is a {type(value).__name__}, "
                    "not a dict"
                )
            if part not in value:
                raise CheckpointError(
                    f"--weights-key {key!r} not found in {path}: {where} has no entry {part!r}; "
                    f"its entries are {listing((repr(k) for k in value), 10)}"
                )
            value = value[part]
            done.append(part)
    if not _holds_weights(value):
        entries = _weights_entries(obj)
        hint = f"; entries holding weights: {listing(repr(k) for k in entries)}" if entries else ""
        raise CheckpointError(
            f"--weights-key {key!r} of {path} is a {type(value).__name__}, not a dict of tensors{hint}"
        )
    return value


def unpack(obj: Any, path: Path, weights_key: str | None = None) -> CheckpointContent:
    """What a loaded checkpoint object holds: weights or a module, metadata, extras.

    Args:
        obj: What a loader returned (``torch.load``'s result, a safetensors dict, ...).
        path: The file, for messages.
        weights_key: The entry holding the weights (dotted for nested dicts),
            or None to find it.

    Raises:
        CheckpointError: No weights, several candidate entries and no
            ``weights_key``, or a ``weights_key`` that is missing or holds no
            weights. One line naming the entries.
    """
    if isinstance(obj, nn.Module):
        return CheckpointContent("pickled-module", module=obj)
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not model weights; expected a state_dict or a dict "
            f"with {STATE_DICT_KEY!r}"
        )
    if weights_key is None and _is_state_dict(obj):
        return CheckpointContent("state_dict", state=obj)
    info = {
        k: v
        for k, v in obj.items()
        if isinstance(k, str) and k != METADATA_KEY and k not in _BULKY_KEYS and is_plain(v)
    }
    metadata = read_metadata(obj[METADATA_KEY], path) if METADATA_KEY in obj else {}
    info.update(metadata_extras(metadata))  # save_checkpoint's epoch=, step=: the metadata's word wins
    lightning = "state_dict" in obj and any(k in obj for k in _LIGHTNING_MARKERS)
    hparams: dict[str, Any] = {}
    if lightning:
        raw = obj.get("hyper_parameters") or {}
        hparams = {str(k): v for k, v in dict(raw).items()} if isinstance(raw, Mapping) else {}
    notes = []
    if weights_key is not None:
        key, value = weights_key, _named_entry(obj, weights_key, path)
    else:
        key, value = _only_weights_entry(obj, path)
        if key not in WEIGHTS_KEYS:
            notes.append(f"took the weights from the entry {key!r}")
    if isinstance(value, nn.Module):
        return CheckpointContent(
            "pickled-module", module=value, weights_key=key, metadata=metadata, info=info, notes=notes
        )
    if metadata:
        kind = "curvkit"
    elif lightning and key == "state_dict":
        kind = "lightning"
    elif key == STATE_DICT_KEY:
        kind = "tutorial"
    else:
        kind = "checkpoint-dict"
    return CheckpointContent(
        kind,
        state=value,
        weights_key=key,
        metadata=metadata,
        hyper_parameters=hparams,
        info=info,
        notes=notes,
    )
