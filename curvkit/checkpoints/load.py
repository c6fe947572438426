"""Loading a checkpoint, in any format, into a ready model."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvkit.checkpoints._text import exc_line
from curvkit.checkpoints._types import CheckpointError, LoadedCheckpoint
from curvkit.checkpoints.factories import build_model
from curvkit.checkpoints.fit import check_finite_weights, fit_weights, select_submodule, strip_wrappers
from curvkit.checkpoints.formats import find_loader, run_loader
from curvkit.checkpoints.metadata import is_plain
from curvkit.checkpoints.unpack import CheckpointContent, unpack
from curvkit.compiled import original_module
from curvkit.errors import PluginError

__all__ = ["load_checkpoint"]


def _device(map_location: str | torch.device) -> torch.device:
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError) as exc:
        raise CheckpointError(f"map_location {map_location!r} is not a device; use 'cpu' or 'cuda'") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"map_location {str(device)!r} but CUDA is not available here; use 'cpu'")
    return device


def _sha256(path: Path) -> str:
    """Hex sha256 of a file; of a directory, of its relative paths and file contents."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file is not path:
            h.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    model_factory: str | Callable[..., nn.Module] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    weights_key: str | None = None,
    trust_pickle: bool = False,
    map_location: str | torch.device = "cpu",
    strict: bool = True,
    check_finite: bool = True,
) -> LoadedCheckpoint:
    """Load a checkpoint, in any supported format, into a ready model.

    The format is recognised from the file's content (its suffix only when the
    content is damaged); plugins' loaders are asked first. For formats that
    hold only weights, the model is, in this order: ``model`` (loaded in
    place), ``model_factory(**model_kwargs)``, or the factory and kwargs named
    by the checkpoint's curvkit metadata. With a ``model_factory`` but no
    ``model_kwargs``, the kwargs are the metadata's (if it names the same
    factory) or, for a Lightning checkpoint, those ``hyper_parameters`` the
    factory's signature accepts. TorchScript and ``torch.export`` archives and
    pickled modules carry their own model; ``model``, ``model_factory`` and
    ``weights_key`` are then not used.
    A ``torch.compile``'d ``model`` (or factory's model) gets the weights of
    its original module (:func:`curvkit.compiled.original_module`), so that a
    checkpoint of the uncompiled model fits it, and one saved with the
    ``_orig_mod.`` keys of a compiled model too.

    In a checkpoint dict, the weights are the entry ``weights_key`` names, or
    else the one entry holding weights under a usual key (``model_state_dict``,
    ``state_dict``, ``model_state``, ``model``, ``ema``, ...: see
    :data:`~curvkit.checkpoints.WEIGHTS_KEYS`), looked for at the top level,
    then one level down, then under any key.

    Args:
        path: The checkpoint file (or a directory, if a plugin loads those).
        model: A module to load the weights into.
        model_factory: ``"module:attr"`` or a callable returning the module.
        model_kwargs: Keyword arguments for the factory.
        weights_key: The entry of a checkpoint dict that holds the weights
            (``"ema"``; dotted for nested dicts, ``"state.model"``), for
            checkpoints with several (``model`` and ``ema``). The command
            line's ``--weights-key``.
        trust_pickle: Allow unpickling arbitrary Python objects (a whole
            pickled model). Only for files you trust: it executes code from
            the file. Also allows factories named by the metadata that are not
            marked as trusted.
        map_location: Where the model goes; tensors saved on any device
            (``cuda:0`` included) are loaded there.
        strict: Refuse weights with missing or unexpected keys (shape
            mismatches are always refused). With ``False`` they are listed in
            :attr:`LoadedCheckpoint.missing` and ``unexpected``, and in one
            line in :attr:`LoadedCheckpoint.ignored_summary`. The command
            line's ``--strict/--no-strict``.
        check_finite: Refuse weights with NaN or Inf.

    Returns:
        The :class:`LoadedCheckpoint`, with the model on ``map_location`` in
        evaluation mode.

    Raises:
        CheckpointError: Missing, truncated, corrupt or unknown file; a pickle
            without ``trust_pickle``; no weights, or several candidate entries
            and no ``weights_key``; a ``weights_key`` that is missing; no model
            to load into; weights that do not fit the model; NaN or Inf in the
            weights. One line saying what to do.
    """
    path = Path(path)
    device = _device(map_location)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}; check the path")
    loader = find_loader(path)
    raw = run_loader(loader, path, device, trust_pickle)
    notes: list[str] = []
    missing: list[str] = []
    unexpected: list[str] = []
    if isinstance(raw, nn.Module):
        content = CheckpointContent("pickled-module" if loader.name == "torch" else loader.name, module=raw)
    elif isinstance(raw, Mapping) or not loader.plugin:  # unpack explains what a file holds instead
        content = unpack(raw, path, weights_key)
        if loader.name != "torch":  # safetensors, a plugin's format
            content.kind = loader.name
    else:
        raise PluginError(
            f"checkpoint loader {loader.name!r} of plugin {loader.plugin or 'curvkit'!r} returned a "
            f"{type(raw).__name__}; a loader returns a dict or an nn.Module"
        )
    notes += content.notes
    if content.module is not None:
        net = content.module
        notes += list(net.__dict__.pop("_curvkit_notes", []))
        if model is not None or model_factory is not None:
            notes.append("the checkpoint holds its own model; the given model or factory was not used")
        if weights_key is not None and not content.weights_key:
            notes.append(f"the checkpoint holds its own model; weights_key {weights_key!r} was not used")
    else:
        assert content.state is not None
        net, source, built_notes = build_model(
            content, path, model, model_factory, model_kwargs, trust_pickle
        )
        notes += built_notes
        target = original_module(net)  # a torch.compile'd model's weights are its original module's
        expected = set(target.state_dict())
        state, stripped = strip_wrappers(content.state, expected)
        if content.kind == "lightning" and not set(state) <= expected:
            state, chosen = select_submodule(state, expected)
            more, stripped2 = strip_wrappers(state, expected)
            state, stripped = more, stripped + chosen + stripped2
        notes += stripped
        missing, unexpected = fit_weights(target, state, path, source, strict)
    try:
        net = net.to(device)
    except RuntimeError as exc:
        raise CheckpointError(f"cannot move the model to {device} ({exc_line(exc)})") from exc
    net.eval()
    if check_finite:
        check_finite_weights(net, path)
    if content.hyper_parameters and is_plain(content.hyper_parameters):
        content.info = {**content.info, "hyper_parameters": content.hyper_parameters}
    return LoadedCheckpoint(
        model=net,
        format=content.kind,
        path=path,
        sha256=_sha256(path),
        metadata=dict(content.metadata),
        missing=missing,
        unexpected=unexpected,
        info=content.info,
        notes=notes,
        weights_key=content.weights_key,
    )
