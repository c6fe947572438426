"""The checkpoint types a plugin or a caller meets: the loader, the loaded checkpoint, the error.

This module imports neither :mod:`curvkit.registry` nor :mod:`curvkit.hookspecs`,
so both can refer to :class:`CheckpointLoader` without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from curvkit.checkpoints._text import counted, exc_line, listing
from curvkit.errors import CurvkitError

__all__ = ["CheckpointError", "CheckpointLoader", "LoadedCheckpoint"]


class CheckpointError(CurvkitError):
    """A checkpoint is missing, unreadable, refused, or does not fit the model."""


def corrupt_file_error(path: Path, what: str, exc: BaseException) -> CheckpointError:
    """The error for a file of a known format that cannot be read (``what``: "torch.save file")."""
    return CheckpointError(
        f"cannot read {path} as a {what}: the file is truncated or corrupt ({exc_line(exc)}); "
        "re-save or re-copy it"
    )


@dataclass
class CheckpointLoader:
    """A checkpoint format: how to recognise a file and how to read it.

    Plugins return these from the ``curvkit_checkpoint_loaders`` hook (see
    :mod:`curvkit.hookspecs`); the built-in formats are loaders too
    (:data:`curvkit.checkpoints.BUILTIN_LOADERS`).

    Attributes:
        name: Short unique name, used as :attr:`LoadedCheckpoint.format` when the
            loader returns a model (e.g. ``"torchscript"``).
        detect: ``detect(path) -> bool``: whether this loader reads the file (or
            directory) at ``path``. Called for existing paths only; it should be
            cheap (look at the suffix or the first bytes) and must not raise for
            files of other formats. :func:`curvkit.checkpoints.is_checkpoint`
            asks it too, to find the checkpoints in a folder.
        load: ``load(path, *, map_location, trust_pickle, **kwargs)`` returning
            either an ``nn.Module`` (a self-contained model) or a dict (a
            ``state_dict``, or a checkpoint dict such as
            ``{"curvkit": {...}, "model_state_dict": {...}}`` that curvkit unpacks
            like a ``torch.load`` result). ``map_location`` is a
            :class:`torch.device`: tensors saved on another device must be
            loaded onto it. ``trust_pickle`` says whether the user allows
            unpickling arbitrary Python objects. Accept ``**kwargs``: later
            versions may pass more keyword arguments. Raise
            :class:`CheckpointError` with a one-line message for bad files.
        description: One line for listings.
        plugin: Name of the plugin that registered it (filled in by the registry;
            empty for built-ins).
    """

    name: str
    detect: Callable[[Path], bool]
    load: Callable[..., dict[str, Any] | nn.Module]
    description: str = ""
    plugin: str = ""


@dataclass
class LoadedCheckpoint:
    """A checkpoint loaded into a model.

    Attributes:
        model: The model, on ``map_location``, in evaluation mode.
        format: The format: ``"curvkit"``, ``"state_dict"``, ``"tutorial"``,
            ``"lightning"``, ``"checkpoint-dict"``, ``"pickled-module"``,
            ``"safetensors"``, ``"torchscript"``, ``"torch.export"``, or the name
            of a plugin's loader.
        path: The checkpoint's path.
        sha256: Hex sha256 of the file (of a directory: of its sorted relative
            paths and file contents).
        metadata: The curvkit metadata (``model_factory``, ``model_kwargs``,
            ``data``, ``loss``, anything extra), or ``{}``.
        missing: Model keys the checkpoint lacked (only with ``strict=False``).
        unexpected: Checkpoint keys the model lacked (only with ``strict=False``).
        info: Plain values the checkpoint carries besides weights (``epoch``,
            ``global_step``, Lightning ``hyper_parameters``, ...), with the
            extras of its curvkit metadata (``save_checkpoint(..., epoch=3)``).
        notes: One-line remarks on how it was loaded (the entry the weights came
            from, stripped prefixes, ignored LightningModule entries,
            restrictions of exported programs). What ``strict=False`` let
            through is in :attr:`ignored_summary`, not here.
        weights_key: The entry of the checkpoint dict the weights came from
            (dotted when nested, e.g. ``"state.model"``), or ``""`` when the
            file is a plain ``state_dict`` or holds its own model.
    """

    model: nn.Module
    format: str
    path: Path
    sha256: str
    metadata: dict[str, Any] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    weights_key: str = ""

    @property
    def ignored_summary(self) -> str:
        """One line saying what ``strict=False`` let through, or ``""`` if nothing.

        Example:
            >>> from pathlib import Path
            >>> import torch
            >>> loaded = LoadedCheckpoint(torch.nn.Identity(), "checkpoint-dict", Path("a.pt"), "",
            ...                           unexpected=["similarity_weight", "similarity_bias"])
            >>> loaded.ignored_summary
            'ignored 2 checkpoint entries the model does not have: similarity_weight, similarity_bias'
        """
        parts = []
        if self.unexpected:
            parts.append(
                f"ignored {counted(len(self.unexpected), 'checkpoint entry')} the model does not have: "
                f"{listing(self.unexpected)}"
            )
        if self.missing:
            parts.append(
                f"kept the model's initial values for {counted(len(self.missing), 'entry')} the "
                f"checkpoint lacks: {listing(self.missing)}"
            )
        return "; ".join(parts)
