"""Checkpoints: every format curvkit reads, and the one it writes.

This is the only module of curvkit that knows checkpoint formats. It loads a
checkpoint file into a ready model (:func:`load_checkpoint`) and writes
checkpoints that carry the curvkit metadata convention (:func:`save_checkpoint`),
so that ``curvkit analyze ckpt.pt`` needs no other flag.

Formats read (see ``docs/checkpoints.md`` for details):

* ``torch.save`` files: a plain ``state_dict``; the tutorial dict
  (``model_state_dict``, ``optimizer_state_dict``, ``epoch``, ...); a curvkit
  checkpoint (the tutorial dict plus a ``"curvkit"`` metadata entry); a PyTorch
  Lightning ``.ckpt`` (``state_dict`` with the LightningModule's attribute prefix,
  ``hyper_parameters``); wrapper prefixes ``module.`` (DistributedDataParallel,
  DataParallel) and ``_orig_mod.`` (``torch.compile``) are stripped, also nested.
  Every ``torch.load`` uses ``weights_only=True``; a pickled whole module loads
  only with ``trust_pickle=True``.
* safetensors files, with a small reader of the documented format
  (:func:`read_safetensors`); the ``safetensors`` package is not needed.
* TorchScript archives (``torch.jit.save``), run through
  :class:`ScriptModuleAdapter` so that :func:`torch.func.functional_call` works.
* ``torch.export`` archives (``.pt2``), device-normalised before
  :func:`torch.export.load` (which has no ``map_location``).

Checkpoints saved on a GPU load on a CPU-only machine in every format.
Plugins add formats with the ``curvkit_checkpoint_loaders`` hook; their loaders
are asked before the built-in ones.

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

from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import io
import json
import os
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from curvkit.errors import CurvkitError, DataError, PluginError

__all__ = [
    "BUILTIN_LOADERS",
    "CheckpointError",
    "CheckpointLoader",
    "LoadedCheckpoint",
    "METADATA_KEY",
    "METADATA_VERSION",
    "STATE_DICT_KEY",
    "ScriptModuleAdapter",
    "checkpoint_formats",
    "load_checkpoint",
    "read_safetensors",
    "resolve_factory",
    "save_checkpoint",
    "trusted_factory",
]

METADATA_KEY = "curvkit"
"""The entry of a checkpoint dict that holds curvkit's metadata."""

METADATA_VERSION = 1
"""Version of the metadata convention written by :func:`save_checkpoint`."""

STATE_DICT_KEY = "model_state_dict"
"""The entry of a curvkit (and tutorial) checkpoint dict that holds the weights."""

_LIST_LIMIT = 5  # names listed in one-line messages before "+N more"
_TRUSTED_FACTORY_MODULES = ("curvkit.models",)
_FACTORY_MARK = "__curvkit_model_factory__"
_F = TypeVar("_F", bound=Callable[..., Any])


class CheckpointError(CurvkitError):
    """A checkpoint is missing, unreadable, refused, or does not fit the model."""


# ----------------------------------------------------------------------------- public types
@dataclass
class CheckpointLoader:
    """A checkpoint format: how to recognise a file and how to read it.

    Plugins return these from the ``curvkit_checkpoint_loaders`` hook (see
    :mod:`curvkit.hookspecs`); the built-in formats are loaders too
    (:data:`BUILTIN_LOADERS`).

    Attributes:
        name: Short unique name, used as :attr:`LoadedCheckpoint.format` when the
            loader returns a model (e.g. ``"torchscript"``).
        detect: ``detect(path) -> bool``: whether this loader reads the file (or
            directory) at ``path``. Called for existing paths only; it should be
            cheap (look at the suffix or the first bytes) and must not raise for
            files of other formats.
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
            ``global_step``, Lightning ``hyper_parameters``, ...).
        notes: One-line remarks on how it was loaded (stripped prefixes, ignored
            entries, restrictions of exported programs).
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


# ----------------------------------------------------------------------------- small helpers
def _one_line(text: object, limit: int = 300) -> str:
    """``text`` on one line, cut to about ``limit`` characters."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _exc_line(exc: BaseException) -> str:
    """``Type: message`` of an exception, on one line (its first sentence if long)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if len(first) > 120 and ". " in first:
        first = first[: first.index(". ") + 1]
    return _one_line(f"{type(exc).__name__}: {first}" if first else type(exc).__name__, 200)


def _count(n: int, noun: str) -> str:
    """``1 missing key``, ``3 missing keys``."""
    plural = noun + ("es" if noun.endswith("ch") else "s")
    return f"{n} {noun if n == 1 else plural}"


def _listing(names: Iterable[str], limit: int = _LIST_LIMIT) -> str:
    """``a, b, c (+4 more)``."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


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


# ----------------------------------------------------------------------------- factories
def trusted_factory(fn: _F) -> _F:
    """Mark a function as a model factory that checkpoint metadata may name.

    :func:`load_checkpoint` calls a factory named by a checkpoint's metadata only
    if it is an ``nn.Module`` subclass or a function marked with this decorator
    (or one of curvkit's own, in ``curvkit.models``): calling an arbitrary
    function named by a file would let the file run code (``torch.hub:load``).
    A factory the user names (``--model``) is always called.

    Example:
        >>> from curvkit.checkpoints import trusted_factory
        >>> @trusted_factory
        ... def mlp(hidden: int = 8):
        ...     import torch
        ...     return torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh())
        >>> mlp.__curvkit_model_factory__
        True
    """
    setattr(fn, _FACTORY_MARK, True)
    return fn


def _is_trusted_factory(obj: object) -> bool:
    if isinstance(obj, type):
        return issubclass(obj, nn.Module)
    if not inspect.isfunction(obj):
        return False
    return obj.__dict__.get(_FACTORY_MARK) is True or obj.__module__ in _TRUSTED_FACTORY_MODULES


def _check_factory_spec(spec: object) -> tuple[str, str]:
    """``(module, attribute)`` of a ``"module:attr"`` spec, or a CheckpointError."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise CheckpointError(
            f"a model factory is given as 'module:attribute' (e.g. 'mypackage.models:MLP'), got {spec!r}"
        )
    module_name, attr = spec.split(":")
    parts = module_name.split(".") + attr.split(".")
    if not all(p.isidentifier() for p in parts):
        raise CheckpointError(
            f"model factory {spec!r} is not 'module:attribute' with dotted Python names "
            "(e.g. 'mypackage.models:MLP' or 'mypackage.models:Nets.small')"
        )
    return module_name, attr


def resolve_factory(spec: str) -> Callable[..., Any]:
    """The callable named by ``"module:attr"`` (``attr`` may be dotted).

    Args:
        spec: e.g. ``"torch.nn:Linear"`` or ``"mypackage.models:Zoo.small"``.

    Returns:
        The object, which is callable.

    Raises:
        CheckpointError: The spec is malformed, the module cannot be imported, it
            has no such attribute, or the attribute is not callable.

    Example:
        >>> from curvkit.checkpoints import resolve_factory
        >>> resolve_factory("torch.nn:Linear")
        <class 'torch.nn.modules.linear.Linear'>
    """
    module_name, attr = _check_factory_spec(spec)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise CheckpointError(
            f"cannot import module {module_name!r} of model factory {spec!r} ({_exc_line(exc)}); "
            "install its package or add its folder to PYTHONPATH"
        ) from exc
    except Exception as exc:  # the module itself fails while importing
        raise CheckpointError(
            f"importing module {module_name!r} of model factory {spec!r} failed ({_exc_line(exc)}); "
            "fix that module"
        ) from exc
    owner = module_name
    for part in attr.split("."):
        if not hasattr(obj, part):
            close = difflib.get_close_matches(part, [n for n in dir(obj) if not n.startswith("_")], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; check the name"
            raise CheckpointError(f"{owner!r} has no attribute {part!r} (model factory {spec!r}){hint}")
        obj = getattr(obj, part)
        owner = f"{owner}.{part}" if owner != module_name else f"{module_name}:{part}"
    if not callable(obj):
        raise CheckpointError(f"model factory {spec!r} is a {type(obj).__name__}, not a class or function")
    return obj


def _kwargs_accepted(factory: Callable[..., Any], candidates: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``candidates`` that ``factory``'s signature accepts by name."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return dict(candidates)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(candidates)
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in candidates.items() if k in names}


def _call_factory(factory: Callable[..., Any], kwargs: Mapping[str, Any], spec: str) -> nn.Module:
    try:
        net = factory(**kwargs)
    except Exception as exc:
        raise CheckpointError(
            f"model factory {spec}(**{_one_line(dict(kwargs), 120)}) failed ({_exc_line(exc)}); "
            "check --model and --model-kwargs"
        ) from exc
    if not isinstance(net, nn.Module):
        raise CheckpointError(
            f"model factory {spec} returned a {type(net).__name__}, not a torch.nn.Module; "
            "pass a factory that builds the model"
        )
    return net


# ----------------------------------------------------------------------------- metadata
_PLAIN_SCALARS = (str, int, float, bool, type(None))


def _check_plain(value: Any, where: str) -> None:
    """Raise unless ``value`` is made of JSON-able plain types only."""
    if type(value) in _PLAIN_SCALARS:
        return
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise CheckpointError(
                    f"metadata entry {where} has a key {key!r} that is not a str; use str keys"
                )
            _check_plain(item, f"{where}[{key!r}]")
        return
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    raise CheckpointError(
        f"metadata entry {where} is a {kind}; use plain str/int/float/bool/None, lists and dicts "
        "with str keys (JSON-able), so that the checkpoint loads with weights_only=True"
    )


def _is_plain(value: Any) -> bool:
    try:
        _check_plain(value, "value")
    except CheckpointError:
        return False
    return True


def _read_metadata(raw: Any, path: Path) -> dict[str, Any]:
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


# ----------------------------------------------------------------------------- saving
def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(
            getattr(model, "_orig_mod", None), nn.Module
        ):
            model = model._orig_mod
        else:
            return model


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
    module_name, _ = _check_factory_spec(model_factory)
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
        _check_plain(value, key)
    checkpoint = {METADATA_KEY: metadata, STATE_DICT_KEY: _unwrap(model).state_dict()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save raises RuntimeError for a missing folder
        reason = getattr(exc, "strerror", None) or _exc_line(exc)
        raise CheckpointError(
            f"cannot write checkpoint {path} ({reason}); check that the folder exists and is writable"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------- format detection
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_TORCH_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[2:-1]  # torch.save before 1.6
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl")


def _zip_records(path: Path) -> list[str] | None:
    """The record names of a zip archive relative to its root folder; None if unreadable."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    return [n.split("/", 1)[1] for n in names if "/" in n]


def _sniff(path: Path) -> str | None:
    """Which built-in format ``path`` is in, from its first bytes (and suffix when damaged)."""
    if not path.is_file():
        return None
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(64)
    suffix = path.suffix.lower()
    if head.startswith(_ZIP_MAGIC):
        records = _zip_records(path)
        if records is None:  # a damaged zip: let the reader of the suffix's format report it
            return "torch.export" if suffix == ".pt2" else "torch"
        if "archive_format" in records or any(r.startswith("models/") for r in records):
            return "torch.export"
        if "constants.pkl" in records or any(r.startswith("code/") for r in records):
            return "torchscript"
        if "data.pkl" in records:
            return "torch"
        return "torch.export" if suffix == ".pt2" else None
    if head[:1] == b"\x80" and _LEGACY_TORCH_MAGIC in head[:24]:
        return "torch"
    if len(head) > 8 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if suffix == ".safetensors":
        return "safetensors"
    if suffix == ".pt2":
        return "torch.export"
    if suffix in _TORCH_SUFFIXES:
        return "torch"  # not recognisable: torch.load reports it as truncated or corrupt
    return None


def _corrupt(path: Path, what: str, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"cannot read {path} as a {what}: the file is truncated or corrupt ({_exc_line(exc)}); "
        "re-save or re-copy it"
    )


def _pickle_refusal(path: Path, exc: BaseException) -> CheckpointError:
    match = re.search(r"GLOBAL ([\w.]+)", str(exc))
    found = f" (such as {match.group(1)})" if match else ""
    return CheckpointError(
        f"{path} holds pickled Python objects{found}, e.g. a whole model saved with torch.save(model): "
        "loading it would execute arbitrary code from the file; pass --trust-pickle (trust_pickle=True) "
        "only for files you trust, or save model.state_dict() or use curvkit.save_checkpoint"
    )


def _is_weights_only_refusal(exc: BaseException) -> bool:
    """Whether ``torch.load(weights_only=True)`` refused a valid pickle that imports Python objects."""
    msg = str(exc)
    return isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in msg and "GLOBAL " in msg


# ----------------------------------------------------------------------------- torch.save files
def _load_torch(path: Path, *, map_location: torch.device, trust_pickle: bool, **_: Any) -> Any:
    """``torch.load`` with ``weights_only=True`` unless the user trusts pickles."""
    try:
        return torch.load(path, map_location=map_location, weights_only=not trust_pickle)
    except CurvkitError:
        raise
    except Exception as exc:
        if _is_weights_only_refusal(exc):
            raise _pickle_refusal(path, exc) from exc
        if trust_pickle and isinstance(exc, (AttributeError, ImportError)):
            raise CheckpointError(
                f"{path} is a pickle whose classes cannot be imported here ({_exc_line(exc)}); run where "
                "the model's code is importable, or save model.state_dict() instead"
            ) from exc
        raise _corrupt(path, "torch.save file", exc) from exc


# ----------------------------------------------------------------------------- safetensors
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_SAFETENSORS_MAX_HEADER = 100_000_000  # the format's own limit


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a ``.safetensors`` file without the safetensors package.

    The format: an 8-byte little-endian header size ``N``; ``N`` bytes of JSON
    mapping each tensor name to ``{"dtype", "shape", "data_offsets": [begin,
    end]}`` (offsets into the buffer that follows), plus an optional
    ``"__metadata__"`` str-to-str map; then the raw little-endian buffer.
    Supported dtypes: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL.

    Args:
        path: The file.

    Returns:
        ``(tensors, metadata)``: CPU tensors by name (in header order) and the
        ``__metadata__`` map (``{}`` if absent).

    Raises:
        CheckpointError: The file is truncated or corrupt, or uses a dtype listed
            above as unsupported.
    """
    path = Path(path)
    if sys.byteorder != "little":
        raise CheckpointError("reading safetensors needs a little-endian machine")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path} ({exc.strerror}); check the path and permissions") from exc
    what = "safetensors file"
    try:
        if len(raw) < 8:
            raise ValueError(f"{len(raw)} bytes, shorter than the 8-byte header size")
        n = int.from_bytes(raw[:8], "little")
        if n > min(len(raw) - 8, _SAFETENSORS_MAX_HEADER):
            raise ValueError(f"header of {n} bytes does not fit in the file of {len(raw)} bytes")
        header = json.loads(raw[8 : 8 + n].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise _corrupt(path, what, exc) from exc
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _corrupt(path, what, ValueError("__metadata__ is not a JSON object"))
    buffer = torch.frombuffer(bytearray(raw[8 + n :]), dtype=torch.uint8) if len(raw) > 8 + n else None
    size = len(raw) - 8 - n
    tensors: dict[str, Tensor] = {}
    for name, entry in header.items():
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not all(isinstance(s, int) and s >= 0 for s in shape):
                raise ValueError(f"bad shape {shape}")
        except (TypeError, KeyError, ValueError) as exc:
            raise _corrupt(path, what, ValueError(f"entry {name!r} is malformed: {_exc_line(exc)}")) from exc
        if dtype_name not in _SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {dtype_name}, which curvkit does not read "
                f"(supported: {', '.join(_SAFETENSORS_DTYPES)}); convert it to one of these"
            )
        dtype = _SAFETENSORS_DTYPES[dtype_name]
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= size):
            raise _corrupt(path, what, ValueError(f"tensor {name!r} lies outside the data ({begin}..{end})"))
        if end - begin != nbytes:
            raise _corrupt(
                path, what, ValueError(f"tensor {name!r} has {end - begin} bytes, expected {nbytes}")
            )
        if numel == 0 or buffer is None:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:  # clone: the slice may be unaligned for the dtype
            tensors[name] = buffer[begin:end].clone().view(dtype).reshape(shape)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _load_safetensors(path: Path, **_: Any) -> dict[str, Any]:
    tensors, meta = read_safetensors(path)
    if METADATA_KEY in meta:
        try:
            curvkit_meta = json.loads(meta[METADATA_KEY])
        except ValueError as exc:
            raise _corrupt(path, "safetensors file with curvkit metadata", exc) from exc
        return {METADATA_KEY: curvkit_meta, STATE_DICT_KEY: tensors}
    return tensors


# ----------------------------------------------------------------------------- TorchScript
class ScriptModuleAdapter(nn.Module):
    """A TorchScript module as an ordinary module that ``torch.func`` can run.

    :func:`torch.func.functional_call` refuses ScriptModules ("The stateless API
    can't be used with Jitted modules"). Moreover, in torch 2.13 ``torch.func``
    transforms through TorchScript's optimising executor are silently wrong:
    once the executor has run a scripted function with gradients a few times,
    ``jvp(grad(f))`` through it is off by O(1), and stays wrong even with
    optimisation switched off afterwards (the optimised plan is cached).

    This adapter holds the scripted module's parameters and buffers, under the
    same names (tied weights stay tied), in a mirror of its module tree. Each
    call writes the adapter's current tensors (which ``functional_call`` may
    have replaced) into the scripted module, runs it with optimisation off
    (``torch.jit.optimized_execution(False)``, which is thread-local) and puts
    the previous tensors back. Gradients flow to the adapter's tensors; reverse
    and forward-over-reverse Hessian-vector products match the eager model.
    Run the scripted module only through the adapter: calling
    :attr:`scripted` directly with gradients builds the optimised plan above.

    The training flags of the mirror are copied to the scripted module before
    each call, so ``eval()`` and ``train()`` work for scripted modules; a traced
    module keeps the mode it was traced in.
    """

    def __init__(self, scripted: torch.jit.ScriptModule):
        super().__init__()
        object.__setattr__(self, "_scripted", scripted)  # not a submodule: its tensors live here
        for name, _ in scripted.named_modules():
            if name:
                self._mirror(name, create=True)
        param_names = {n for n, _ in scripted.named_parameters(remove_duplicate=False)}
        tied: dict[int, nn.Parameter] = {}
        slots = []
        entries = [*scripted.named_parameters(remove_duplicate=False), *scripted.named_buffers()]
        for name, tensor in entries:
            owner_name, _, leaf = name.rpartition(".")
            owner = self._mirror(owner_name, create=True)
            if name in param_names:
                if id(tensor) not in tied:
                    tied[id(tensor)] = nn.Parameter(tensor.detach(), requires_grad=tensor.requires_grad)
                owner.register_parameter(leaf, tied[id(tensor)])
            else:
                owner.register_buffer(leaf, tensor.detach())
            slots.append(name)
        self._slots = tuple(slots)
        self._module_names = tuple(n for n, _ in scripted.named_modules())
        for name in self._module_names:
            self._mirror(name).training = self._script_module(name).training

    @property
    def scripted(self) -> torch.jit.ScriptModule:
        """The TorchScript module."""
        return self._scripted

    def _mirror(self, name: str, create: bool = False) -> nn.Module:
        module: nn.Module = self
        for part in name.split(".") if name else ():
            if part not in module._modules:
                if not create:
                    raise KeyError(name)
                module.add_module(part, nn.Module())
            module = module._modules[part]  # type: ignore[assignment]
        return module

    def _script_module(self, name: str) -> Any:
        module = self._scripted
        for part in name.split(".") if name else ():
            module = getattr(module, part)
        return module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the scripted module with this adapter's parameters and buffers."""
        current = dict(self.named_parameters(remove_duplicate=False))
        current.update(self.named_buffers(remove_duplicate=False))
        saved = []
        with torch.jit.optimized_execution(False):
            try:
                for name in self._module_names:
                    mode = self._mirror(name).training
                    target = self._script_module(name)
                    if target.training != mode:
                        target.training = mode
                for name in self._slots:
                    owner_name, _, leaf = name.rpartition(".")
                    owner = self._script_module(owner_name)
                    saved.append((owner, leaf, getattr(owner, leaf)))
                    owner._c.setattr(leaf, current[name])
                return self._scripted(*args, **kwargs)
            finally:
                for owner, leaf, old in reversed(saved):
                    owner._c.setattr(leaf, old)


def _load_torchscript(path: Path, *, map_location: torch.device, **_: Any) -> nn.Module:
    try:
        with warnings.catch_warnings():  # "torch.jit.load is deprecated": the file is what it is
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            scripted = torch.jit.load(str(path), map_location=map_location)
    except Exception as exc:
        raise _corrupt(path, "TorchScript archive", exc) from exc
    return ScriptModuleAdapter(scripted)


# ----------------------------------------------------------------------------- torch.export (.pt2)
def _cpu_devices(obj: Any) -> Any:
    """The JSON of an export archive with every serialised ``Device`` set to the CPU."""
    if isinstance(obj, dict):
        if set(obj) == {"type", "index"} and isinstance(obj["type"], str):
            return {"type": "cpu", "index": None}
        return {k: _cpu_devices(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu_devices(v) for v in obj]
    return obj


def _repickle(data: bytes, path: Path, record: str, trust_pickle: bool) -> bytes:
    """A pickled record of an export archive, loaded onto the CPU and saved again."""
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:
        if _is_weights_only_refusal(exc):
            raise _pickle_refusal(path, exc) from exc
        raise _corrupt(path, f"torch.export archive (record {record})", exc) from exc
    out = io.BytesIO()
    torch.save(obj, out)
    return out.getvalue()


def _cpu_export_archive(path: Path, trust_pickle: bool) -> io.BytesIO:
    """A copy of a ``.pt2`` archive in which nothing refers to a GPU.

    ``torch.export.load`` has no ``map_location``: it rebuilds each weight on the
    device recorded in the archive's JSON (and ``torch.load``s pickled records
    without a map location). So the JSON records' ``Device`` entries are set to
    the CPU, and pickled records (sample inputs, tensor-subclass weights) are
    loaded onto the CPU with ``weights_only=True`` and saved again. Raw weight
    bytes are device-independent and copied as they are.
    """
    what = "torch.export archive"
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise _corrupt(path, what, exc) from exc
    out = io.BytesIO()
    with zf, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zo:
        records = {n: n.split("/", 1)[1] for n in zf.namelist() if "/" in n}
        rel = set(records.values())
        if "archive_format" not in rel:
            raise CheckpointError(
                f"{path} is a torch.export archive from torch 2.7 or older (no archive_format record); "
                "re-export it with this torch's torch.export.save"
            )
        if not any(r.startswith("models/") and r.endswith(".json") for r in rel):
            if any(r.startswith("data/aotinductor/") for r in rel):
                raise CheckpointError(
                    f"{path} holds only AOTInductor-compiled code, which cannot be differentiated; "
                    "save the ExportedProgram with torch.export.save instead"
                )
            raise _corrupt(path, what, ValueError("no models/*.json record"))
        pickled: set[str] = set()
        for name, r in records.items():
            if re.fullmatch(r"data/(weights|constants)/[^/]+_config\.json", r):
                try:
                    config = json.loads(zf.read(name)).get("config", {})
                except (ValueError, zipfile.BadZipFile, OSError) as exc:
                    raise _corrupt(path, what, exc) from exc
                folder = r.rsplit("/", 1)[0]
                pickled |= {f"{folder}/{m['path_name']}" for m in config.values() if m.get("use_pickle")}
        try:
            for info in zf.infolist():
                r = records.get(info.filename, info.filename)
                data = zf.read(info)
                if r.endswith(".json"):
                    data = json.dumps(_cpu_devices(json.loads(data))).encode()
                elif r.startswith("data/constants/opaque_obj"):
                    if not trust_pickle:
                        raise _pickle_refusal(path, ValueError(f"record {r} is a Python pickle"))
                elif r.startswith("data/constants/custom_obj"):
                    pass  # a TorchScript-pickled torchbind object
                elif (
                    r in pickled
                    or r.startswith("data/sample_inputs/")
                    or re.fullmatch(r"data/\w+/\w+\.pt", r)
                ):
                    data = _repickle(data, path, r, trust_pickle)
                zo.writestr(info.filename, data)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise _corrupt(path, what, exc) from exc
    out.seek(0)
    return out


class _ExportInputCheck(nn.Module):
    """Runs before an exported program's own guards: turns a wrong input shape into a clear error.

    torch.export fixes every dimension not declared dynamic; its guards then fail
    with ``AssertionError: Guard failed: x.size()[0] == 4``, which says nothing
    about the fix. This replaces the program's ``_guards_fn`` submodule (which
    receives the flattened user inputs) and raises a :class:`DataError` instead.
    """

    def __init__(self, guards: nn.Module, shapes: list[tuple[int | None, ...] | None]):
        super().__init__()
        self.guards = guards
        self.shapes = shapes

    @staticmethod
    def _show(shape: tuple[int | None, ...]) -> str:
        return "(" + ", ".join("*" if d is None else str(d) for d in shape) + ")"

    def forward(self, *inputs: Any) -> Any:
        """Check the inputs' static dimensions, then run the program's guards."""
        for x, want in zip(inputs, self.shapes):
            if want is None or not isinstance(x, Tensor):
                continue
            got = tuple(x.shape)
            if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got)):
                hint = ""
                if len(got) == len(want) and want and want[0] is not None and got[1:] == want[1:]:
                    hint = (
                        f"; re-export with dynamic_shapes marking the batch dimension "
                        f"(torch.export.Dim('batch')), or use batch size {want[0]} and a sample count "
                        f"divisible by it"
                    )
                raise DataError(
                    f"the torch.export program takes inputs of shape {self._show(want)} "
                    f"(* = dynamic), got {got}{hint}"
                )
        try:
            return self.guards(*inputs)
        except AssertionError as exc:
            raise DataError(
                f"the inputs do not fit the torch.export program ({_one_line(exc, 150)})"
            ) from exc


def _export_to_eval(gm: torch.fx.GraphModule) -> list[str]:
    """Rewrite an exported graph into evaluation mode; return notes.

    ``torch.export`` bakes the module's training mode into the graph
    (``aten.batch_norm(..., training=True)``, ``aten.dropout(..., train=True)``,
    an in-place increment of ``num_batches_tracked``), and ``ExportedProgram
    .module()`` refuses ``train()`` and ``eval()``. Every ``train``/``training``
    flag of an aten op is set to False, the increments are dropped, and the
    module's ordinary ``train``/``eval`` are restored (they then only set flags).
    """
    notes: list[str] = []
    flipped = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        for i, arg in enumerate(schema.arguments):
            if arg.name not in ("train", "training") or str(arg.type) != "bool":
                continue
            if i < len(node.args) and node.args[i] is True:
                node.args = (*node.args[:i], False, *node.args[i + 1 :])
                flipped += 1
            elif node.kwargs.get(arg.name) is True:
                node.kwargs = {**node.kwargs, arg.name: False}
                flipped += 1
        if schema.is_mutable and node.args and getattr(node.args[0], "op", None) == "get_attr":
            target = str(node.args[0].target)
            if target.endswith("num_batches_tracked") and not node.users:
                gm.graph.erase_node(node)
            else:
                notes.append(f"the exported program changes its buffer {target} in forward ({node.target})")
    if flipped:
        notes.append(f"the program was exported in training mode: set {flipped} train flags to evaluation")
        gm.graph.lint()
        gm.recompile()
    for name in ("train", "eval"):  # ExportedProgram.module() replaces them with methods that raise
        gm.__dict__.pop(name, None)
    return notes


def _guard_inputs(gm: torch.fx.GraphModule) -> list[str]:
    """Install :class:`_ExportInputCheck`; return a note if some input dims are static."""
    guards = getattr(gm, "_guards_fn", None)
    node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"), None)
    if not isinstance(guards, nn.Module) or node is None:
        return []
    shapes: list[tuple[int | None, ...] | None] = []
    for arg in node.args:
        val = getattr(arg, "meta", {}).get("val")
        shape = getattr(val, "shape", None) if isinstance(val, Tensor) else None
        shapes.append(None if shape is None else tuple(d if isinstance(d, int) else None for d in shape))
    gm._guards_fn = _ExportInputCheck(guards, shapes)
    static = [s for s in shapes if s and s[0] is not None]
    if static:
        shown = ", ".join(_ExportInputCheck._show(s) for s in static)
        return [f"exported with a static batch dimension: inputs must have shape {shown} exactly"]
    return []


def _load_export(path: Path, *, map_location: torch.device, trust_pickle: bool, **_: Any) -> nn.Module:
    buffer = _cpu_export_archive(path, trust_pickle)
    try:
        program = torch.export.load(buffer)
    except CurvkitError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"cannot load the torch.export program in {path} ({_exc_line(exc)}); it may come from "
            f"another torch version (this is {torch.__version__}): re-export it"
        ) from exc
    if map_location.type != "cpu":
        program = torch.export.passes.move_to_device_pass(program, map_location)
    gm = program.module()
    notes = _export_to_eval(gm) + _guard_inputs(gm)
    gm.__dict__["_curvkit_notes"] = notes
    return gm


# ----------------------------------------------------------------------------- the built-in loaders
def _builtin(kind: str, load: Callable[..., Any], description: str) -> CheckpointLoader:
    return CheckpointLoader(
        name=kind, detect=lambda path: _sniff(path) == kind, load=load, description=description
    )


BUILTIN_LOADERS: tuple[CheckpointLoader, ...] = (
    _builtin("safetensors", _load_safetensors, "safetensors files (a reader of the documented format)"),
    _builtin("torch.export", _load_export, "torch.export archives (.pt2), loaded on any device"),
    _builtin("torchscript", _load_torchscript, "TorchScript archives (torch.jit.save)"),
    _builtin("torch", _load_torch, "torch.save files: state_dicts, checkpoint dicts, Lightning .ckpt"),
)
"""The built-in formats, in the order they are tried after the plugins' loaders."""


def checkpoint_formats() -> list[CheckpointLoader]:
    """Every checkpoint loader in the order :func:`load_checkpoint` asks them.

    Plugins' loaders come first (the plugin registered last is asked first), so
    a plugin can take over files a built-in loader would also accept; the
    built-in loaders follow (:data:`BUILTIN_LOADERS`).
    """
    from curvkit.registry import checkpoint_loaders

    return [*checkpoint_loaders(), *BUILTIN_LOADERS]


def _find_loader(path: Path) -> CheckpointLoader:
    for loader in checkpoint_formats():
        try:
            found = loader.detect(path)
        except Exception as exc:
            raise PluginError(
                f"checkpoint loader {loader.name!r} of plugin {loader.plugin or 'curvkit'!r} failed "
                f"while inspecting {path} ({_exc_line(exc)}); fix or uninstall the plugin"
            ) from exc
        if found:
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


def _run_loader(loader: CheckpointLoader, path: Path, device: torch.device, trust_pickle: bool) -> Any:
    try:
        return loader.load(path, map_location=device, trust_pickle=trust_pickle)
    except CurvkitError:
        raise
    except Exception as exc:
        if not loader.plugin:
            raise
        raise CheckpointError(
            f"checkpoint loader {loader.name!r} of plugin {loader.plugin!r} cannot read {path} "
            f"({_exc_line(exc)})"
        ) from exc


# ----------------------------------------------------------------------------- unpacking dicts
_LIGHTNING_MARKERS = ("pytorch-lightning_version", "hyper_parameters", "global_step", "loops")
_MODEL_KEYS = (STATE_DICT_KEY, "state_dict", "model")
_BULKY_KEYS = {
    "optimizer_state_dict",
    "optimizer_states",
    "optimizer",
    "lr_schedulers",
    "scheduler",
    "callbacks",
}


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, Tensor) for v in obj.values())
    )


def _holds_weights(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and any(isinstance(v, Tensor) for v in obj.values())
    )


@dataclass
class _Content:
    kind: str
    state: Mapping[str, Any] | None = None
    module: nn.Module | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    hyper_parameters: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def _unpack(obj: Any, path: Path) -> _Content:
    """What a loaded checkpoint object holds: weights or a module, metadata, extras."""
    if isinstance(obj, nn.Module):
        return _Content("pickled-module", module=obj)
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not model weights; expected a state_dict or a dict "
            f"with {STATE_DICT_KEY!r}"
        )
    if _is_state_dict(obj):
        return _Content("state_dict", state=obj)
    info = {
        k: v
        for k, v in obj.items()
        if isinstance(k, str) and k not in (*_MODEL_KEYS, METADATA_KEY) and _is_plain(v)
    }
    info = {k: v for k, v in info.items() if k not in _BULKY_KEYS}
    metadata = _read_metadata(obj[METADATA_KEY], path) if METADATA_KEY in obj else {}
    lightning = "state_dict" in obj and any(k in obj for k in _LIGHTNING_MARKERS)
    hparams: dict[str, Any] = {}
    if lightning:
        raw = obj.get("hyper_parameters") or {}
        hparams = {str(k): v for k, v in dict(raw).items()} if isinstance(raw, Mapping) else {}
    for key in _MODEL_KEYS:
        value = obj.get(key)
        if isinstance(value, nn.Module):
            return _Content("pickled-module", module=value, metadata=metadata, info=info)
        if _holds_weights(value):
            if metadata:
                kind = "curvkit"
            elif lightning:
                kind = "lightning"
            elif key == STATE_DICT_KEY:
                kind = "tutorial"
            else:
                kind = "checkpoint-dict"
            return _Content(kind, state=value, metadata=metadata, hyper_parameters=hparams, info=info)
    keys = _listing(repr(k) for k in obj)
    raise CheckpointError(
        f"no model weights found in {path}: a dict with keys {keys}; expected a state_dict or a dict "
        f"with {STATE_DICT_KEY!r}, 'state_dict' or 'model'"
    )


# ----------------------------------------------------------------------------- fitting weights
def _components(key: str) -> list[str]:
    return key.split(".")


def _strip_wrappers(state: Mapping[str, Any], expected: set[str]) -> tuple[dict[str, Any], list[str]]:
    """Remove ``_orig_mod.`` (torch.compile, anywhere) and leading ``module.`` (DDP) from keys."""
    notes = []
    state = dict(state)
    has_orig = any("_orig_mod" in _components(k) for k in state)
    if has_orig and not any("_orig_mod" in _components(k) for k in expected):
        state = {".".join(p for p in _components(k) if p != "_orig_mod"): v for k, v in state.items()}
        notes.append("stripped torch.compile's '_orig_mod.' from the keys")
    depth = 0
    while (
        state
        and all(k.startswith("module.") for k in state)
        and not all(k.startswith("module.") for k in expected)
    ):
        state = {k[len("module.") :]: v for k, v in state.items()}
        depth += 1
    if depth:
        notes.append(f"stripped the wrapper prefix 'module.' (DistributedDataParallel/DataParallel) x{depth}")
    return state, notes


def _select_submodule(state: Mapping[str, Any], expected: set[str]) -> tuple[dict[str, Any], list[str]]:
    """For a LightningModule's state_dict: the entries of the attribute holding the model."""
    state = dict(state)
    best, best_score = "", len(set(state) & expected)
    for prefix in sorted({k.split(".", 1)[0] for k in state if "." in k}, key=lambda p: (p != "model", p)):
        sub = {k[len(prefix) + 1 :] for k in state if k.startswith(prefix + ".")}
        score = len(sub & expected)
        if score > best_score:
            best, best_score = prefix, score
    if not best:
        return state, []
    kept = {k[len(best) + 1 :]: v for k, v in state.items() if k.startswith(best + ".")}
    dropped = [k for k in state if not k.startswith(best + ".")]
    notes = [f"took the LightningModule's {best!r} attribute (prefix '{best}.')"]
    if dropped:
        notes.append(f"ignored {len(dropped)} other LightningModule entries: {_listing(dropped)}")
    return kept, notes


def _fit(
    net: nn.Module, state: Mapping[str, Any], path: Path, source: str, strict: bool
) -> tuple[list[str], list[str]]:
    """Load ``state`` into ``net``; raise one line listing what does not fit."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {list(v.shape)} vs model {list(expected[k].shape)}"
        for k, v in state.items()
        if k in expected
        and isinstance(v, Tensor)
        and isinstance(expected[k], Tensor)
        and v.shape != expected[k].shape
    ]
    if shapes or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"{_count(len(missing), 'missing key')} ({_listing(missing)})")
        if unexpected:
            parts.append(f"{_count(len(unexpected), 'unexpected key')} ({_listing(unexpected)})")
        if shapes:
            parts.append(f"{_count(len(shapes), 'shape mismatch')} (checkpoint {_listing(shapes, 3)})")
        raise CheckpointError(
            f"the weights in {path} do not fit the model {source}: {'; '.join(parts)}; "
            "pass the --model and --model-kwargs the checkpoint was trained with"
        )
    try:
        net.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(
            f"the weights in {path} do not fit the model {source} ({_exc_line(exc)}); "
            "pass the --model and --model-kwargs the checkpoint was trained with"
        ) from exc
    return missing, unexpected


def _check_finite(net: nn.Module, path: Path) -> None:
    bad = []
    for name, t in [*net.named_parameters(), *net.named_buffers()]:
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            counts = ", ".join(c for c in (f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else "") if c)
            bad.append(f"{name} ({counts})")
    if bad:
        raise CheckpointError(
            f"{path} has non-finite weights in {_listing(bad)}; the run that saved it diverged: "
            "analyse an earlier checkpoint"
        )


def _build_model(
    content: _Content,
    path: Path,
    model: nn.Module | None,
    model_factory: str | Callable[..., Any] | None,
    model_kwargs: Mapping[str, Any] | None,
    trust_pickle: bool,
) -> tuple[nn.Module, str, list[str]]:
    """The model to load weights into, a description of it, and notes."""
    meta = content.metadata
    if model is not None:
        if not isinstance(model, nn.Module):
            raise CheckpointError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        return model, f"(the given {type(model).__name__})", []
    if model_factory is not None:
        if isinstance(model_factory, str):
            spec, factory = model_factory, resolve_factory(model_factory)
        elif callable(model_factory):
            spec, factory = getattr(model_factory, "__qualname__", repr(model_factory)), model_factory
        else:
            raise CheckpointError(
                f"model_factory must be 'module:attr' or a callable, got {type(model_factory)}"
            )
        notes = []
        if model_kwargs is not None:
            kwargs = dict(model_kwargs)
        elif meta.get("model_factory") == spec:
            kwargs = dict(meta.get("model_kwargs") or {})
        elif content.hyper_parameters:
            kwargs = _kwargs_accepted(factory, content.hyper_parameters)
            notes.append(f"model kwargs from the Lightning hyper_parameters: {_listing(kwargs) or 'none'}")
        else:
            kwargs = {}
        return _call_factory(factory, kwargs, spec), f"{spec}(**{_one_line(kwargs, 120)})", notes
    spec = meta.get("model_factory")
    if spec:
        factory = resolve_factory(spec)
        if not trust_pickle and not _is_trusted_factory(factory):
            raise CheckpointError(
                f"{path} names the model factory {spec!r}, a {type(factory).__name__} that is neither an "
                "nn.Module subclass nor marked @curvkit.trusted_factory: calling a function named by a file "
                f"could run arbitrary code; pass --model {spec} to confirm it (or --trust-pickle for files "
                "you trust)"
            )
        kwargs = dict(model_kwargs if model_kwargs is not None else meta.get("model_kwargs") or {})
        return _call_factory(factory, kwargs, spec), f"{spec}(**{_one_line(kwargs, 120)})", []
    raise CheckpointError(
        f"{path} holds only weights and no curvkit metadata naming the model; pass --model module:factory "
        "(and --model-kwargs JSON), or save checkpoints with curvkit.save_checkpoint"
    )


# ----------------------------------------------------------------------------- loading
def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    model_factory: str | Callable[..., nn.Module] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
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
    pickled modules carry their own model; ``model`` and ``model_factory`` are
    then not used.

    Args:
        path: The checkpoint file (or a directory, if a plugin loads those).
        model: A module to load the weights into.
        model_factory: ``"module:attr"`` or a callable returning the module.
        model_kwargs: Keyword arguments for the factory.
        trust_pickle: Allow unpickling arbitrary Python objects (a whole
            pickled model). Only for files you trust: it executes code from
            the file. Also allows factories named by the metadata that are not
            marked as trusted.
        map_location: Where the model goes; tensors saved on any device
            (``cuda:0`` included) are loaded there.
        strict: Refuse weights with missing or unexpected keys (shape
            mismatches are always refused). With ``False`` they are listed in
            :attr:`LoadedCheckpoint.missing` and ``unexpected``.
        check_finite: Refuse weights with NaN or Inf.

    Returns:
        The :class:`LoadedCheckpoint`, with the model on ``map_location`` in
        evaluation mode.

    Raises:
        CheckpointError: Missing, truncated, corrupt or unknown file; a pickle
            without ``trust_pickle``; no model to load into; weights that do not
            fit the model; NaN or Inf in the weights. One line saying what to do.
    """
    path = Path(path)
    device = _device(map_location)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}; check the path")
    loader = _find_loader(path)
    raw = _run_loader(loader, path, device, trust_pickle)
    notes: list[str] = []
    missing: list[str] = []
    unexpected: list[str] = []
    if isinstance(raw, nn.Module):
        content = _Content("pickled-module" if loader.name == "torch" else loader.name, module=raw)
    elif isinstance(raw, Mapping) or not loader.plugin:  # _unpack explains what a file holds instead
        content = _unpack(raw, path)
        if loader.name != "torch":  # safetensors, a plugin's format
            content.kind = loader.name
    else:
        raise PluginError(
            f"checkpoint loader {loader.name!r} of plugin {loader.plugin or 'curvkit'!r} returned a "
            f"{type(raw).__name__}; a loader returns a dict or an nn.Module"
        )
    if content.module is not None:
        net = content.module
        notes += list(net.__dict__.pop("_curvkit_notes", []))
        if model is not None or model_factory is not None:
            notes.append("the checkpoint holds its own model; the given model or factory was not used")
    else:
        assert content.state is not None
        net, source, built_notes = _build_model(
            content, path, model, model_factory, model_kwargs, trust_pickle
        )
        notes += built_notes
        expected = set(net.state_dict())
        state, stripped = _strip_wrappers(content.state, expected)
        if content.kind == "lightning" and not set(state) <= expected:
            state, chosen = _select_submodule(state, expected)
            more, stripped2 = _strip_wrappers(state, expected)
            state, stripped = more, stripped + chosen + stripped2
        notes += stripped
        missing, unexpected = _fit(net, state, path, source, strict)
    try:
        net = net.to(device)
    except RuntimeError as exc:
        raise CheckpointError(f"cannot move the model to {device} ({_exc_line(exc)})") from exc
    net.eval()
    if check_finite:
        _check_finite(net, path)
    if content.hyper_parameters and _is_plain(content.hyper_parameters):
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
    )
