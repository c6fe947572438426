"""Checkpoints: every format curvkit reads, and the one it writes.

This is the only package of curvkit that knows checkpoint formats. It loads a
checkpoint file into a ready model (:func:`load_checkpoint`) and writes
checkpoints that carry the curvkit metadata convention (:func:`save_checkpoint`),
so that ``curvkit analyze ckpt.pt`` needs no other flag.

Formats read, one module each (see ``docs/checkpoints.md`` for details):

* ``torch.save`` files (:mod:`~curvkit.checkpoints.torch_format`), zip and
  legacy: a plain ``state_dict``; the tutorial dict (``model_state_dict``,
  ``optimizer_state_dict``, ``epoch``, ...); a curvkit checkpoint (the tutorial
  dict plus a ``"curvkit"`` metadata entry); a PyTorch Lightning ``.ckpt``
  (``state_dict`` with the LightningModule's attribute prefix,
  ``hyper_parameters``); any training dict whose weights sit under a usual key
  (:data:`WEIGHTS_KEYS`) or the key the caller names (``weights_key``);
  wrapper prefixes ``module.`` (DistributedDataParallel, DataParallel) and
  ``_orig_mod.`` (``torch.compile``) are stripped, also nested. Every
  ``torch.load`` uses ``weights_only=True``; a pickled whole module loads only
  with ``trust_pickle=True``.
* safetensors files (:mod:`~curvkit.checkpoints.safetensors_format`), read
  memory-mapped by the ``safetensors`` package: the ``curvkit[safetensors]``
  extra.
* TorchScript archives (:mod:`~curvkit.checkpoints.torchscript`), run through
  :class:`ScriptModuleAdapter` so that :func:`torch.func.functional_call` works.
* ``torch.export`` archives (``.pt2``, :mod:`~curvkit.checkpoints.export`),
  device-normalised before :func:`torch.export.load` (which has no
  ``map_location``).

Checkpoints saved on a GPU load on a CPU-only machine in every format.
Plugins add formats with the ``curvkit_checkpoint_loaders`` hook; their loaders
are asked before the built-in ones. :func:`is_checkpoint` and
:func:`find_checkpoints` ask every loader whether a file is a checkpoint, to
find the checkpoints in a folder.

Example:
    >>> import tempfile, torch, curvkit.checkpoints as ck
    >>> net = torch.nn.Linear(3, 2)
    >>> path = tempfile.mkdtemp() + "/net.pt"
    >>> _ = ck.save_checkpoint(path, net, model_factory="torch.nn:Linear",
    ...                        model_kwargs={"in_features": 3, "out_features": 2})
    >>> loaded = ck.load_checkpoint(path)
    >>> loaded.format, type(loaded.model).__name__, loaded.metadata["model_factory"]
    ('curvkit', 'Linear', 'torch.nn:Linear')
    >>> torch.equal(loaded.model.weight, net.weight)
    True
"""

from curvkit.checkpoints._types import CheckpointError, CheckpointLoader, LoadedCheckpoint
from curvkit.checkpoints.builtin import BUILTIN_LOADERS
from curvkit.checkpoints.factories import resolve_factory, trusted_factory
from curvkit.checkpoints.formats import checkpoint_formats, find_checkpoints, is_checkpoint
from curvkit.checkpoints.load import load_checkpoint
from curvkit.checkpoints.metadata import METADATA_KEY, METADATA_VERSION, STATE_DICT_KEY
from curvkit.checkpoints.safetensors_format import read_safetensors
from curvkit.checkpoints.save import save_checkpoint
from curvkit.checkpoints.torchscript import ScriptModuleAdapter
from curvkit.checkpoints.unpack import WEIGHTS_KEYS

__all__ = [
    "BUILTIN_LOADERS",
    "CheckpointError",
    "CheckpointLoader",
    "LoadedCheckpoint",
    "METADATA_KEY",
    "METADATA_VERSION",
    "STATE_DICT_KEY",
    "ScriptModuleAdapter",
    "WEIGHTS_KEYS",
    "checkpoint_formats",
    "find_checkpoints",
    "is_checkpoint",
    "load_checkpoint",
    "read_safetensors",
    "resolve_factory",
    "save_checkpoint",
    "trusted_factory",
]
