"""Which built-in format a file is in, from its first bytes (and its suffix when they are damaged).

Nothing here needs an optional package: a safetensors file is recognised by its
header even when the ``safetensors`` package is not installed.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["detector", "sniff_format"]

_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_TORCH_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[2:-1]  # torch.save before 1.6
_SUFFIX_FORMATS = {
    ".safetensors": "safetensors",
    ".pt2": "torch.export",
    ".jit": "torchscript",
    ".torchscript": "torchscript",
    **dict.fromkeys((".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl"), "torch"),
}
"""The format a suffix stands for when the content is unreadable or unrecognisable."""


def _zip_records(path: Path) -> list[str] | None:
    """The record names of a zip archive relative to its root folder; None if unreadable."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    return [n.split("/", 1)[1] for n in names if "/" in n]


def sniff_format(path: Path) -> str | None:
    """The built-in format of the file at ``path``, or None if it is none of them.

    One of ``"safetensors"``, ``"torch.export"``, ``"torchscript"`` and
    ``"torch"``. The content decides (the zip records of an archive, the magic
    number of a legacy ``torch.save`` file, the header of a safetensors file);
    the suffix only when the content is damaged or unrecognisable, so that the
    reader of that format reports the damage.
    """
    if not path.is_file():
        return None
    suffix = path.suffix.lower()
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(64)
    except OSError:  # unreadable here: the loader of the suffix's format says why
        return _SUFFIX_FORMATS.get(suffix)
    if head.startswith(_ZIP_MAGIC):
        records = _zip_records(path)
        if records is None:  # a damaged zip
            return _SUFFIX_FORMATS.get(suffix)
        if "archive_format" in records or any(r.startswith("models/") for r in records):
            return "torch.export"
        if "constants.pkl" in records or any(r.startswith("code/") for r in records):
            return "torchscript"
        if "data.pkl" in records:
            return "torch"
        return "torch.export" if suffix == ".pt2" else None  # another zip (.npz, .zip, ...)
    if head[:1] == b"\x80" and _LEGACY_TORCH_MAGIC in head[:24]:
        return "torch"
    if len(head) > 8 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    return _SUFFIX_FORMATS.get(suffix)


def detector(kind: str) -> Callable[[Path], bool]:
    """A loader's ``detect``: whether :func:`sniff_format` says the file is in format ``kind``."""
    return lambda path: sniff_format(path) == kind
