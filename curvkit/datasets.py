"""Bundled datasets, and the data specifications ``curvkit analyze --data`` accepts.

curvkit ships one small real dataset with the package (in the ``curvkit.bundled``
package, which is the repository's ``data/`` folder): the 8x8 handwritten digits
of the UCI "Optical Recognition of Handwritten Digits" data (E. Alpaydin and
C. Kaynak, 1998, CC BY 4.0). ``data/README.md`` gives its provenance, checksums
and how ``data/make_data.py`` regenerates it.

Bundled names (see :func:`available_datasets`):

- ``"digits"``: all 1797 samples; float32 inputs ``[N, 64]`` (the 8x8 image,
  row-major) scaled from 0..16 to [0, 1], int64 class targets ``[N]`` in 0..9.
- ``"digits-train"`` / ``"digits-test"``: a fixed stratified split of the same
  samples: within each class, every fifth sample (the 1st, 6th, 11th, ...) is a
  test sample (364 test, 1433 train; see :func:`stratified_holdout`).

:func:`load_data_spec` resolves a data specification: a bundled name; a ``.pt``
/ ``.pth`` file (loaded with ``weights_only=True``) holding a dict with
``inputs``/``targets`` (or ``X``/``y``) or an ``(inputs, targets)`` pair; an
``.npz`` file with arrays ``X``/``y`` or ``inputs``/``targets``; an ``.h5`` /
``.hdf5`` file with datasets of those names; or ``module:function`` (an
importable module; the function is called without arguments) returning a
Dataset, a DataLoader or ``(X, y)``.

Example:
    >>> from curvkit.datasets import available_datasets, load_dataset
    >>> available_datasets()
    ['digits', 'digits-test', 'digits-train']
    >>> X, y = load_dataset("digits")
    >>> X.shape, X.dtype, y.shape, y.dtype
    (torch.Size([1797, 64]), torch.float32, torch.Size([1797]), torch.int64)
    >>> float(X.min()), float(X.max()), int(y.max())
    (0.0, 1.0, 9)
"""

from __future__ import annotations

import functools
import importlib
import io
import os
import pickle
import re
from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from curvkit.arguments import integer
from curvkit.errors import DataError, describe_error, first_line

__all__ = [
    "BUNDLED_PACKAGE",
    "DatasetError",
    "available_datasets",
    "bundled_file",
    "load_data_spec",
    "load_dataset",
    "stratified_holdout",
]

BUNDLED_PACKAGE = "curvkit.bundled"
"""The package holding the bundled files (the repository's ``data/`` folder)."""

_DIGITS_FILE = "digits.npz"
_DIGITS_MAX = 16  # pixel counts are 0..16 (on pixels in a 4x4 block)
_SPLITS = {"digits": None, "digits-test": True, "digits-train": False}  # name -> test mask value

_PT_SUFFIXES = (".pt", ".pth")
_NPZ_SUFFIXES = (".npz",)
_H5_SUFFIXES = (".h5", ".hdf5")
_KEY_PAIRS = (("inputs", "targets"), ("X", "y"))
_MODULE_ATTR = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class DatasetError(DataError):
    """A dataset or data specification cannot be loaded or is unusable.

    The message is one line: what is wrong and, where it helps, what is accepted.
    """


def available_datasets() -> list[str]:
    """The names :func:`load_dataset` accepts, sorted.

    Example:
        >>> "digits" in available_datasets()
        True
    """
    return sorted(_SPLITS)


def bundled_file(filename: str) -> Path:
    """The path of a file shipped in :data:`BUNDLED_PACKAGE` (``data/`` in the repository).

    Useful to find the bundled checkpoints of an installed curvkit, for example
    ``bundled_file("digits_mlp.pt")``. curvkit must be installed as files (a
    wheel or an editable install), not imported from a zip archive.

    Raises:
        DatasetError: No such bundled file.
    """
    resource = files(BUNDLED_PACKAGE).joinpath(filename)
    if not resource.is_file():
        names = sorted(r.name for r in files(BUNDLED_PACKAGE).iterdir() if r.name.endswith((".npz", ".pt")))
        raise DatasetError(f"no bundled file {filename!r}; bundled: {', '.join(names)}")
    return Path(str(resource))


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The raw bundled digits: uint8 pixels ``[1797, 64]`` (0..16), uint8 labels ``[1797]``."""
    data = files(BUNDLED_PACKAGE).joinpath(_DIGITS_FILE).read_bytes()
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        inputs, targets = npz["inputs"], npz["targets"]
    inputs.setflags(write=False)
    targets.setflags(write=False)
    return inputs, targets


def stratified_holdout(targets: Tensor, every: int = 5) -> Tensor:
    """A deterministic stratified test mask: every ``every``-th sample of each class.

    Within each class, in dataset order, the samples numbered 0, ``every``,
    ``2 * every``, ... are test samples. No random numbers are involved, so the
    split is the same on every platform and version.

    Args:
        targets: Integer class labels ``[N]``.
        every: One test sample per this many samples of a class.

    Returns:
        A boolean mask ``[N]``, true for test samples.

    Example:
        >>> stratified_holdout(torch.tensor([0, 1, 0, 0, 1, 1, 1]), every=2)
        tensor([ True,  True, False,  True, False,  True, False])
    """
    every = integer(every, "every", minimum=2, error=ValueError)
    labels = targets.detach().cpu().to(torch.int64)
    mask = torch.zeros(labels.shape[0], dtype=torch.bool)
    for label in labels.unique():
        where = (labels == label).nonzero().flatten()
        mask[where[::every]] = True
    return mask


def load_dataset(name: str) -> tuple[Tensor, Tensor]:
    """A bundled dataset as ``(inputs, targets)`` tensors (fresh copies).

    Args:
        name: One of :func:`available_datasets`: ``"digits"``, ``"digits-train"``
            or ``"digits-test"`` (see the module docstring).

    Returns:
        float32 inputs ``[N, 64]`` in [0, 1] and int64 targets ``[N]`` in 0..9.

    Raises:
        DatasetError: The name is not a bundled dataset.

    Example:
        >>> X, y = load_dataset("digits-test")
        >>> X.shape, int(y.bincount().min()), int(y.bincount().max())
        (torch.Size([364, 64]), 35, 37)
    """
    if name not in _SPLITS:
        raise DatasetError(f"unknown dataset {name!r}; bundled datasets: {', '.join(available_datasets())}")
    pixels, labels = _digits_arrays()
    inputs = torch.from_numpy(pixels.astype(np.float32)) / _DIGITS_MAX
    targets = torch.from_numpy(labels.astype(np.int64))
    test = _SPLITS[name]
    if test is None:
        return inputs, targets
    keep = stratified_holdout(targets) == test
    return inputs[keep], targets[keep]


# ---------------------------------------------------------------- data specs
def _as_tensor(value: Any, what: str, source: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise DatasetError(f"{source}: {what} has unsupported dtype {value.dtype}")
        return torch.from_numpy(np.ascontiguousarray(value))
    raise DatasetError(f"{source}: {what} must be a tensor or array, got {type(value).__name__}")


def _check_tensor(t: Tensor, what: str, source: str) -> None:
    if t.dim() == 0:
        raise DatasetError(f"{source}: {what} is a scalar; it needs the sample dimension first")
    if t.dtype == torch.bool or t.is_complex():
        raise DatasetError(f"{source}: {what} has unsupported dtype {t.dtype}; use a real or integer dtype")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise DatasetError(f"{source}: {what} contains {bad} NaN or Inf value(s)")


def _validated_pair(inputs: Any, targets: Any, source: str) -> tuple[Any, Tensor]:
    """Check an ``(inputs, targets)`` pair and convert arrays to tensors.

    Inputs may be a tensor/array or a dict of them (the model is then called as
    ``model(**inputs)``); integer targets become int64 (what class-index losses
    need), other dtypes are kept.
    """
    y = _as_tensor(targets, "targets", source)
    _check_tensor(y, "targets", source)
    n = y.shape[0]
    if n == 0:
        raise DatasetError(f"{source}: the data hold no samples")
    if isinstance(inputs, Mapping):
        if not inputs:
            raise DatasetError(f"{source}: the inputs dict is empty")
        X: Any = {str(k): _as_tensor(v, f"inputs[{k!r}]", source) for k, v in inputs.items()}
        items = list(X.items())
    else:
        X = _as_tensor(inputs, "inputs", source)
        items = [("inputs", X)]
    for key, t in items:
        what = key if key == "inputs" else f"inputs[{key!r}]"
        _check_tensor(t, what, source)
        if t.shape[0] != n:
            raise DatasetError(f"{source}: {what} has {t.shape[0]} samples but targets have {n}")
    if not y.is_floating_point():
        y = y.to(torch.int64)
    return X, y


def _pair_from_mapping(data: Mapping[str, Any], source: str) -> tuple[Any, Tensor]:
    for x_key, y_key in _KEY_PAIRS:
        if x_key in data and y_key in data:
            return _validated_pair(data[x_key], data[y_key], source)
    keys = ", ".join(sorted(map(str, data))) or "none"
    raise DatasetError(f"{source}: needs entries 'inputs' and 'targets' (or 'X' and 'y'); found keys: {keys}")


def _pair_from_object(obj: Any, source: str) -> tuple[Any, Tensor]:
    if isinstance(obj, Mapping):
        return _pair_from_mapping(obj, source)
    if isinstance(obj, tuple | list) and len(obj) == 2:
        return _validated_pair(obj[0], obj[1], source)
    what = f"a {type(obj).__name__}" + (f" of length {len(obj)}" if isinstance(obj, tuple | list) else "")
    raise DatasetError(f"{source}: holds {what}; expected a dict with inputs/targets (or X/y) or a pair")


def _load_pt(path: Path, source: str) -> tuple[Any, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:  # a pickled object such as a whole module or a Dataset
            raise DatasetError(
                f"cannot read {source} with weights_only=True: it holds a pickled {found.group(1)}; "
                "save a dict of tensors {'inputs': X, 'targets': y} instead"
            ) from exc
        raise DatasetError(f"cannot read {source}: not a torch.save file, or corrupt") from exc
    except Exception as exc:  # truncated or corrupt
        raise DatasetError(
            f"cannot read {source} (truncated or corrupt?): {describe_error(exc, first_line(exc))}"
        ) from exc
    return _pair_from_object(obj, source)


def _load_npz(path: Path, source: str) -> tuple[Any, Tensor]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except Exception as exc:  # not a zip archive, truncated, object arrays
        raise DatasetError(f"cannot read {source}: {describe_error(exc, first_line(exc))}") from exc
    return _pair_from_mapping(arrays, source)


def _load_h5(path: Path, source: str) -> tuple[Any, Tensor]:
    try:
        import h5py  # optional heavy import, kept out of `import curvkit`
    except ImportError as exc:  # pragma: no cover - h5py is a dependency
        raise DatasetError(f"reading {source} needs h5py (pip install h5py)") from exc
    try:
        with h5py.File(path, "r") as f:
            for x_key, y_key in _KEY_PAIRS:
                if x_key in f and y_key in f:
                    entries = {}
                    for key in (x_key, y_key):
                        if not isinstance(f[key], h5py.Dataset):
                            raise DatasetError(f"{source}: {key!r} is a group, not a dataset")
                        entries[key] = np.asarray(f[key][()])
                    break
            else:
                keys = ", ".join(sorted(f.keys())) or "none"
                raise DatasetError(
                    f"{source}: needs datasets 'inputs' and 'targets' (or 'X' and 'y'); found: {keys}"
                )
    except DatasetError:
        raise
    except Exception as exc:  # not an HDF5 file, truncated
        raise DatasetError(f"cannot read {source}: {describe_error(exc, first_line(exc))}") from exc
    return _pair_from_mapping(entries, source)


def _load_callable(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    source = f"data {spec!r}"
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise DatasetError(
            f"{source}: cannot import module {module_name!r}: {describe_error(exc, first_line(exc))}"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise DatasetError(f"{source}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if callable(obj) and not isinstance(obj, Dataset | DataLoader):
        try:
            obj = obj()
        except Exception as exc:
            raise DatasetError(f"{source}: {attr}() raised {describe_error(exc, first_line(exc))}") from exc
    if isinstance(obj, DataLoader):
        return obj
    if isinstance(obj, Dataset):
        if not hasattr(obj, "__len__"):
            raise DatasetError(f"{source}: returned an IterableDataset; wrap it in a DataLoader")
        if len(obj) == 0:  # type: ignore[arg-type]
            raise DatasetError(f"{source}: returned an empty Dataset")
        return obj
    if isinstance(obj, Mapping | tuple | list):
        return _pair_from_object(obj, f"{source} result")
    raise DatasetError(
        f"{source}: returned a {type(obj).__name__}; expected a Dataset, a DataLoader or (X, y)"
    )


def load_data_spec(spec: str | os.PathLike[str]) -> Any:
    """Resolve a data specification (what ``curvkit analyze --data`` accepts).

    Args:
        spec: In this order of precedence: a bundled dataset name (see
            :func:`available_datasets`); a path to a ``.pt``/``.pth``, ``.npz`` or
            ``.h5``/``.hdf5`` file holding inputs and targets; or
            ``module:function`` (``function`` may be dotted, as in
            ``pkg.mod:Class.method``), called without arguments. See the module
            docstring for the accepted file contents.

    Returns:
        Data that :class:`curvkit.Problem` accepts: an ``(inputs, targets)``
        pair of tensors (inputs possibly a dict of tensors; integer targets as
        int64; other dtypes as stored), or the Dataset or DataLoader that
        ``module:function`` returned (not iterated here).

    Raises:
        DatasetError: With a one-line message: the file is missing, unreadable or
            of an unknown type; keys are missing; inputs and targets disagree on
            the number of samples; a dtype is unsupported (bool, complex, object);
            floating-point values are NaN or Inf; there are no samples; the
            module cannot be imported or the function fails or returns something
            else.

    Example:
        >>> X, y = load_data_spec("digits")
        >>> X.shape
        torch.Size([1797, 64])
    """
    text = os.fspath(spec)
    if text in _SPLITS:
        return load_dataset(text)
    path = Path(text).expanduser()
    suffix = path.suffix.lower()
    known = (*_PT_SUFFIXES, *_NPZ_SUFFIXES, *_H5_SUFFIXES)
    if suffix in known or path.exists():
        if not path.exists():
            raise DatasetError(f"data file not found: {text}")
        if not path.is_file():
            raise DatasetError(f"data path is not a file: {text}")
        source = f"data file {text}"
        if suffix in _PT_SUFFIXES:
            return _load_pt(path, source)
        if suffix in _NPZ_SUFFIXES:
            return _load_npz(path, source)
        if suffix in _H5_SUFFIXES:
            return _load_h5(path, source)
        raise DatasetError(f"{source}: unknown file type {suffix or '(none)'}; use one of {', '.join(known)}")
    if _MODULE_ATTR.match(text):
        return _load_callable(text)
    raise DatasetError(
        f"unknown data {text!r}: expected a bundled dataset ({', '.join(available_datasets())}), "
        f"a {'/'.join(known)} file, or module:function"
    )
