"""The HDF5 results store: the one module that knows the file layout.

A results file holds many *runs*; a run is one checkpoint analysed with one
curvature estimator (and its options). Several checkpoints analysed by one
command form a trajectory in one file, ordered by each run's ``index``. Inside a
run every finished analysis (eigenpairs, a trace, a spectral density, a check, a
per-layer table) is written and flushed to disk as soon as it is done, so a
killed process loses nothing already finished, and running the same command
again resumes the run and skips the analyses it already holds.

The layout is documented, with its version history and an example of reading it
with plain h5py, in ``docs/hdf5-schema.md``. Reading through this module gives
back the result types the library returns (:class:`~curvkit.EigenResult`,
:class:`~curvkit.TraceResult`, :class:`~curvkit.DensityResult`,
:class:`~curvkit.checks.CheckResult`, :class:`~curvkit.LayerTable`,
:class:`~curvkit.comparison.ComparisonResult`). Each analysis kind
writes, reads and exports its results through its row of the one table of
kinds (:mod:`curvkit.kinds`), which plugins extend.

h5py is imported when a store is opened, not when this module is imported, and
``import curvkit`` does not import this module: use
``from curvkit.store import ResultsStore``.

Example:
    >>> import os, tempfile, torch
    >>> from curvkit import TraceResult
    >>> from curvkit.store import ResultsStore
    >>> path = os.path.join(tempfile.mkdtemp(), "results.h5")
    >>> with ResultsStore(path) as store:
    ...     with store.begin_run("demo", {"checkpoint": "model.pt", "estimator": "hessian"}) as run:
    ...         run.write("trace/hutch++", TraceResult(12.5, 0.25, "hutch++", 30, None, 0))
    >>> with ResultsStore(path, "r") as store:
    ...     [(r.run_id, r.status, r.analyses()) for r in store.runs()]
    [('demo', 'complete', ['trace/hutch++'])]
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import math
import numbers
import os
import re
import threading
import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from curvkit._version import __version__
from curvkit.errors import CurvkitError, describe_error, one_line
from curvkit.kinds.hdf5 import attr as _attr
from curvkit.linalg.eigen import EigenResult

__all__ = [
    "CSV_COLUMNS",
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "Run",
    "ResultsStore",
    "StoreError",
    "make_run_id",
]

SCHEMA_NAME = "curvkit-results"
"""Value of the root attribute ``curvkit_schema`` that marks a curvkit results file."""

SCHEMA_VERSION = 1
"""The layout version this module writes and reads (root attribute ``schema_version``)."""


RUNNING, COMPLETE, FAILED, INTERRUPTED = "running", "complete", "failed", "interrupted"

CSV_COLUMNS = (
    "run_id",
    "run_index",
    "checkpoint",
    "estimator",
    "status",
    "analysis",
    "quantity",
    "item",
    "value",
)
"""The columns of :meth:`ResultsStore.csv_rows` (one row per stored number)."""

_PARTIAL = "_partial-"
_JSON = "_json"
# Stores of this process with the file open, by real path: HDF5 shares one open
# file between handles of one process, so its file lock cannot see a second
# writer here; this table does.
_OPEN: dict[str, list[str]] = {}
_OPEN_LOCK = threading.Lock()


class StoreError(CurvkitError):
    """A results file cannot be opened, read or written (message: one line)."""


# --------------------------------------------------------------------------- helpers


def _h5py() -> Any:
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - h5py is a dependency
        raise StoreError("the results store needs h5py: pip install h5py") from exc
    return h5py


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def make_run_id(
    checkpoint: str | os.PathLike[str], estimator: str, options: Mapping[str, Any] | None = None
) -> str:
    """A deterministic run id: readable name plus a short hash of what defines the run.

    The same checkpoint, estimator and options always give the same id, so running
    the same command again reopens (resumes) the same run. The hash covers the
    checkpoint's absolute path, the estimator and ``options`` as canonical JSON;
    put in ``options`` everything that changes every analysis of the run (data,
    sample count, loss, dtype, seed, estimator options), and name the analyses
    after their own options (``"eigen/largest-5"``).

    Args:
        checkpoint: The checkpoint's path.
        estimator: The curvature estimator's registered name.
        options: JSON-able options (keys sorted before hashing).

    Returns:
        ``"<checkpoint file name>-<estimator>-<8 hex digits>"``, with characters
        other than letters, digits and ``._+-`` replaced by ``_``.

    Example:
        >>> a = make_run_id("ckpt/epoch_3.pt", "hessian", {"seed": 0})
        >>> a == make_run_id("ckpt/epoch_3.pt", "hessian", {"seed": 0}), a.startswith("epoch_3.pt-hessian-")
        (True, True)
        >>> a == make_run_id("ckpt/epoch_3.pt", "hessian", {"seed": 1})
        False
    """
    path = os.path.abspath(os.fspath(checkpoint))
    key = json.dumps(
        {"checkpoint": path, "estimator": estimator, "options": dict(options or {})},
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    readable = re.sub(r"[^A-Za-z0-9._+-]", "_", f"{os.path.basename(path)}-{estimator}")
    return f"{readable}-{digest}"


def _not_a_results_file(path: Path, what: str, for_writing: bool) -> StoreError:
    """The error for a file that is not a curvkit results file: ``"{path} {what}"``.

    A writer is told to choose another output path; a reader (``curvkit show``,
    ``plot``, ``export``), who chose the file to read, is not.
    """
    return StoreError(f"{path} {what}" + ("; choose another output path" if for_writing else ""))


def _is_empty_hdf5(path: Path) -> bool:
    """Whether ``path`` is an HDF5 file with no attribute and no member (which a store adopts)."""
    try:
        with _h5py().File(path, "r", locking="best-effort") as f:
            return not len(f.attrs) and not len(f)
    except OSError:
        return False


def _canonical_json(value: Mapping[str, Any]) -> str:
    """``value`` as canonical JSON text (sorted keys, plain values): how keys and requests are stored."""
    return json.dumps(_plain(dict(value)), sort_keys=True)


def _canonical(value: Mapping[str, Any]) -> dict[str, Any]:
    """``value`` as it reads back once stored (:func:`_canonical_json`), to compare with a stored one."""
    return json.loads(_canonical_json(value))


def _check_same_key(stored: Any, key: Mapping[str, Any], run_id: str, path: Path) -> None:
    """Refuse to reopen a run for other settings (a hash collision, or a hand-made id)."""
    new = _canonical(key)
    if stored == new:
        return
    old = stored if isinstance(stored, dict) else {}
    differing = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)) or ["the key"]
    raise StoreError(
        f"run {run_id} in {path} was made with other settings (differing: {', '.join(differing)}): "
        "restart the run or use another output file"
    )


def _check_name(name: str, what: str = "analysis name") -> str:
    if not isinstance(name, str) or not name or "/" in name or name in (".", "..") or name.startswith("_"):
        raise StoreError(
            f"invalid {what} {name!r}: use a non-empty name without '/' that does not start with '_'"
        )
    return name


def _plain(value: Any) -> Any:
    """``value`` as str/int/float/bool/None/list/dict (for attributes and JSON)."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (np.generic, np.ndarray)):
        return _plain(value.tolist())
    if isinstance(value, torch.Tensor):
        return _plain(value.detach().cpu().tolist())
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    return str(value)  # paths, torch.dtype, torch.device, ...


def _finite(value: Any) -> Any:
    """Non-finite floats replaced by ``None``, recursively (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _write_attrs(attrs: Any, values: Mapping[str, Any]) -> None:
    """Scalars as native attributes; anything else as JSON text under ``<key>_json``."""
    for key, value in values.items():
        key = str(key)
        if not key:
            raise StoreError("attribute names must not be empty")
        value = _plain(value)
        if isinstance(value, (str, bool, int, float)) and not key.endswith(_JSON):
            attrs[key] = str(value) if isinstance(value, str) else value  # numpy str_ has no HDF5 type
        else:
            attrs[key + _JSON] = json.dumps(value, sort_keys=True)


def _read_attrs(attrs: Any) -> dict[str, Any]:
    out = {}
    for key, value in attrs.items():
        if key.endswith(_JSON):
            out[key[: -len(_JSON)]] = json.loads(_attr(value))
        else:
            out[key] = _attr(value)
    return out


# --------------------------------------------------------------------------- the store


class ResultsStore:
    """An HDF5 results file, open for reading (``"r"``) or appending (``"a"``).

    Opening for writing takes the HDF5 file lock, so a second writer, in another
    process or in this one, is refused with a :class:`StoreError`, and so is a
    reader in another process while a writer holds the file (and a writer while
    another process reads it). A lock left by a
    killed process is released by the operating system with the process, and the
    file reopens. On file systems without locks the lock is skipped
    (``locking="best-effort"``) and nothing stops a second process.

    Use it as a context manager: leaving the block closes the file; runs begun
    here and not finished are marked ``"failed"`` if an exception left the block.

    Args:
        path: The results file. ``"a"`` creates it (its directory must exist).
        mode: ``"a"`` (create or append; never truncates) or ``"r"`` (read only).
        for_writing: Whether the file is opened on behalf of a writer (default:
            ``mode == "a"``; :meth:`check_path` opens an existing output file
            read-only to check it). A file that is not a curvkit results file is
            refused with the advice to choose another output path only then.

    Raises:
        StoreError: The file does not exist (``"r"``), cannot be created or
            written, is not HDF5, was written by another tool or by a newer
            schema version, or is open for writing elsewhere.
    """

    def __init__(self, path: str | os.PathLike[str], mode: str = "a", *, for_writing: bool | None = None):
        if mode not in ("a", "r"):
            raise StoreError(f"mode must be 'a' (append) or 'r' (read), got {mode!r}")
        self.path = Path(path)
        self.mode = mode
        self._for_writing = mode == "a" if for_writing is None else for_writing
        self._runs: dict[str, Run] = {}
        self._key = os.path.realpath(self.path)
        self._check_path()
        self._register()
        try:
            self._file = self._open()
            self._check_schema()
        except BaseException:
            self._unregister()
            if getattr(self, "_file", None) is not None:
                self._file.close()
            self._file = None
            raise

    # -- opening

    def _check_path(self) -> None:
        self.check_path(self.path, self.mode)

    @staticmethod
    def check_path(path: str | os.PathLike[str], mode: str = "a") -> None:
        """Check, without opening it, that ``path`` can be a results file opened with ``mode``.

        For a command that computes for a long time before it writes, so that a
        bad output path is refused before any work is done.

        Args:
            path: The results file.
            mode: ``"a"`` for a file to write (a file that is not curvkit's is
                refused with the advice to choose another output path) or ``"r"``
                for one to read.

        Raises:
            StoreError: The path is a directory, its directory is missing or not
                writable, or the file exists and is not an HDF5 file (or, for
                ``"a"``, is read-only, written by another tool or a newer schema
                version, or in use).
        """
        p = Path(path)
        if p.is_dir():
            raise StoreError(f"{p} is a directory, not a results file")
        if not p.exists():
            if mode == "r":
                raise StoreError(f"{p}: no such results file")
            parent = p.parent if str(p.parent) else Path(".")
            if not parent.exists():
                raise StoreError(f"cannot create {p}: directory {parent} does not exist")
            if not parent.is_dir():
                raise StoreError(f"cannot create {p}: {parent} is not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise StoreError(f"cannot create {p}: permission denied in {parent}")
            return
        try:
            is_hdf5 = _h5py().is_hdf5(str(p))
        except OSError as exc:
            raise StoreError(f"cannot read {p}: {one_line(exc.strerror or exc)}") from exc
        if not is_hdf5:
            raise _not_a_results_file(p, "is not an HDF5 file (not a curvkit results file)", mode == "a")
        if mode == "a" and not os.access(p, os.W_OK):
            raise StoreError(f"cannot write {p}: permission denied")
        if mode == "a" and not _is_empty_hdf5(p):  # another tool's file, a newer schema, in use
            ResultsStore(p, "r", for_writing=True).close()

    def _register(self) -> None:
        with _OPEN_LOCK:
            modes = _OPEN.get(self._key, [])
            if modes and (self.mode == "a" or "a" in modes):
                held = "for writing" if "a" in modes else "for reading"
                raise StoreError(
                    f"{self.path} is already open {held} in this process: close that store first"
                )
            _OPEN.setdefault(self._key, []).append(self.mode)

    def _unregister(self) -> None:
        with _OPEN_LOCK:
            modes = _OPEN.get(self._key, [])
            if self.mode in modes:
                modes.remove(self.mode)
            if not modes:
                _OPEN.pop(self._key, None)

    def _open(self) -> Any:
        h5py = _h5py()
        try:
            if self.mode == "r":
                return h5py.File(self.path, "r", locking="best-effort")
            # "r+" when it exists, so that a failure never falls back to creating it; libver
            # "earliest" keeps superblock 0, which has no "open for writing" flag that a killed
            # writer would leave set (later formats then need h5clear before reopening)
            how = "r+" if self.path.exists() else "x"
            return h5py.File(self.path, how, locking="best-effort", libver="earliest", track_order=True)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):  # HDF5 sets it on a lock held elsewhere
                other = ", or use another output file" if self._for_writing else ""
                raise StoreError(
                    f"{self.path} is in use by another process (HDF5 file lock): "
                    f"wait for the other curvkit command to finish{other}"
                ) from exc
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise StoreError(f"cannot write {self.path}: permission denied") from exc
            raise StoreError(f"cannot open {self.path}: {one_line(exc)}") from exc

    def _check_schema(self) -> None:
        attrs = self._file.attrs
        if "curvkit_schema" not in attrs:
            if self.mode == "a" and not len(attrs) and not len(self._file):  # an empty HDF5 file: adopt it
                attrs["curvkit_schema"] = SCHEMA_NAME
                attrs["schema_version"] = SCHEMA_VERSION
                attrs["created_by"] = f"curvkit {__version__}"
                attrs["created_at"] = _now()
                self._file.create_group("runs", track_order=True)
                self._flush()
                return
            raise _not_a_results_file(
                self.path,
                "is an HDF5 file written by another tool (no curvkit_schema attribute)",
                self._for_writing,
            )
        if _attr(attrs["curvkit_schema"]) != SCHEMA_NAME:
            raise _not_a_results_file(
                self.path,
                "is an HDF5 file written by another tool "
                f"(curvkit_schema = {_attr(attrs['curvkit_schema'])!r})",
                self._for_writing,
            )
        version = _attr(attrs.get("schema_version"))
        if version != SCHEMA_VERSION:
            advice = (
                "upgrade curvkit" if isinstance(version, int) and version > SCHEMA_VERSION else "convert it"
            )
            raise StoreError(
                f"{self.path} has results schema version {version}, "
                f"this curvkit reads {SCHEMA_VERSION}: {advice}"
            )
        if "runs" not in self._file:
            if self.mode == "r":
                raise StoreError(f"{self.path} is a malformed curvkit results file (no /runs group)")
            self._file.create_group("runs", track_order=True)
            self._flush()

    # -- context and lifetime

    def __del__(self) -> None:  # a store dropped without close() must not keep the file registered
        try:
            if getattr(self, "_file", None) is not None:
                self._file.close()
                self._file = None
                self._unregister()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.close(exc)

    def close(self, exc: BaseException | None = None) -> None:
        """Close the file; runs begun here and left running are marked failed when ``exc`` is given.

        Args:
            exc: The exception that ends the work, if any (its message becomes the
                runs' ``error``). Without one, unfinished runs stay ``"running"``
                and read back as ``"interrupted"``.
        """
        if self._file is None:
            return
        try:
            if exc is not None and self.mode == "a":
                for run in self._runs.values():
                    if run._begun and run._group.attrs.get("status") == RUNNING:
                        run.finish(FAILED, describe_error(exc))
        finally:
            self._file.close()
            self._file = None
            self._unregister()

    @property
    def closed(self) -> bool:
        """Whether the file is closed."""
        return self._file is None

    def _flush(self) -> None:
        """Push everything written to the operating system, and to the disk where possible."""
        self._file.flush()
        try:
            handle = self._file.id.get_vfd_handle()
            if isinstance(handle, int):
                os.fsync(handle)
        except (OSError, ValueError, TypeError):  # pragma: no cover - a driver without a descriptor
            pass

    def _require_open(self) -> Any:
        if self._file is None:
            raise StoreError(f"{self.path} is closed")
        return self._file

    # -- runs

    @property
    def schema_version(self) -> int:
        """The file's schema version."""
        return int(_attr(self._require_open().attrs["schema_version"]))

    @property
    def attrs(self) -> dict[str, Any]:
        """The file's root attributes (schema name and version, creator, creation time)."""
        return _read_attrs(self._require_open().attrs)

    def __contains__(self, run_id: object) -> bool:
        return isinstance(run_id, str) and run_id in self._require_open()["runs"]

    def begin_run(
        self,
        run_id: str,
        provenance: Mapping[str, Any] | None = None,
        *,
        key: Mapping[str, Any] | None = None,
        index: int | None = None,
        restart: bool = False,
    ) -> Run:
        """Create a run, or reopen it to resume; either way its status becomes ``"running"``.

        A new run stores ``provenance`` and ``key``. A reopened run keeps its
        finished analyses (:meth:`Run.has` is true for them, so the caller skips
        them), its timings, creation time and provenance: provenance describes how
        the stored numbers were made and is written once, never by a later
        command. ``attempts`` goes up by one. Analyses half-written by a killed
        process are removed.

        Args:
            run_id: The run's name, e.g. from :func:`make_run_id`.
            provenance: Where the results come from (see ``docs/hdf5-schema.md`` for
                the usual keys): str/int/float/bool values are stored as
                attributes, anything else (lists, dicts, ``None``) as JSON text.
            key: Everything that determines the run's numbers (JSON-able), stored
                as the run's ``key_json`` attribute. Reopening a run with another
                key is refused, so results are never relabelled.
            index: Position of the run in a trajectory (checkpoint order).
            restart: Drop the stored run (analyses, timings, provenance) first.

        Returns:
            The :class:`Run`, ready for writing. Use it as a context manager to
            finish it as ``"complete"``, or ``"failed"`` on an exception.

        Raises:
            StoreError: The store is read-only, the id is invalid, or the stored
                run was made with another ``key`` (pass ``restart=True`` to
                discard its results).
        """
        f = self._require_open()
        if self.mode != "a":
            raise StoreError(f"{self.path} is open read-only: cannot begin run {run_id!r}")
        _check_name(run_id, "run id")
        runs = f["runs"]
        if run_id in runs and restart:
            del runs[run_id]
        if run_id in runs:
            group = runs[run_id]
            if key is not None:
                stored = _attr(group.attrs.get("key_json", "null"))
                _check_same_key(json.loads(stored), key, run_id, self.path)
            for name in [n for n in group if n.startswith(_PARTIAL)]:
                del group[name]
            attempts = int(_attr(group.attrs.get("attempts", 0))) + 1
        else:
            group = runs.create_group(run_id, track_order=True)
            group.attrs["run_id"] = run_id
            group.attrs["created_at"] = _now()
            if key is not None:
                group.attrs["key_json"] = _canonical_json(key)
            _write_attrs(group.create_group("provenance", track_order=True).attrs, dict(provenance or {}))
            attempts = 1
        if "timings" not in group:
            group.create_group("timings", track_order=True)
        group.attrs["status"] = RUNNING
        group.attrs["started_at"] = _now()
        group.attrs["attempts"] = attempts
        for stale in ("error", "finished_at"):
            if stale in group.attrs:
                del group.attrs[stale]
        if index is not None:
            group.attrs["index"] = int(index)
        self._flush()
        run = Run(self, group, begun=True)
        self._runs[run_id] = run
        return run

    def run(self, run_id: str) -> Run:
        """The stored run ``run_id``, for reading.

        Raises:
            StoreError: No such run.
        """
        runs = self._require_open()["runs"]
        if run_id not in runs:
            known = ", ".join(runs) or "none"
            raise StoreError(f"{self.path} has no run {run_id!r} (runs: {known})")
        return self._runs.get(run_id) or Run(self, runs[run_id], begun=False)

    def runs(self) -> list[Run]:
        """Every run, by trajectory ``index`` (runs without one last), then in creation order."""
        runs = [self.run(name) for name in self._require_open()["runs"]]
        order = {run.run_id: i for i, run in enumerate(runs)}
        return sorted(runs, key=lambda r: (r.index is None, r.index or 0, order[r.run_id]))

    def __iter__(self) -> Iterator[Run]:
        return iter(self.runs())

    def __len__(self) -> int:
        return len(self._require_open()["runs"])

    # -- export

    def to_dict(self) -> dict[str, Any]:
        """Everything stored (eigenvectors excepted) as plain, strict-JSON-able data.

        Non-finite floats (``nan`` thresholds, ``inf``) become ``None`` so that
        ``json.dumps(store.to_dict(), allow_nan=False)`` works.

        Returns:
            ``{"schema", "schema_version", "created_by", "created_at", "runs": [...]}``
            with, per run, ``run_id``, ``index``, ``status``, ``error``,
            ``created_at``, ``started_at``, ``finished_at``, ``attempts``,
            ``provenance``, ``timings`` and ``analyses`` (``"kind/name"`` to the
            result's ``to_dict()``).
        """
        attrs = self.attrs
        return _finite(
            {
                "schema": attrs.get("curvkit_schema"),
                "schema_version": attrs.get("schema_version"),
                "created_by": attrs.get("created_by"),
                "created_at": attrs.get("created_at"),
                "runs": [run.to_dict() for run in self.runs()],
            }
        )

    def csv_rows(self) -> list[dict[str, Any]]:
        """One row per stored number, in the long format of :data:`CSV_COLUMNS`.

        Columns: ``run_id``, ``run_index``, ``checkpoint`` and ``estimator`` (from
        the provenance), ``status``, ``analysis`` (``"eigen/largest"``, ...,
        or ``"timings"``), ``quantity`` (``"eigenvalue"``, ``"residual"``,
        ``"estimate"``, ...), ``item`` (the position in a list, the layer name, the
        density's grid point, the figure's name, or empty) and ``value`` (a number;
        booleans as 1/0; ``None`` when unknown). ``docs/hdf5-schema.md`` lists the
        quantities of every kind.
        """
        rows = []
        for run in self.runs():
            prov = run.provenance
            base = {
                "run_id": run.run_id,
                "run_index": run.index,
                "checkpoint": prov.get("checkpoint"),
                "estimator": prov.get("estimator"),
                "status": run.status,
            }
            for analysis, quantity, item, value in run._csv_values():
                rows.append(
                    {**base, "analysis": analysis, "quantity": quantity, "item": item, "value": value}
                )
        return rows

    def write_csv(self, fp: IO[str]) -> int:
        """Write :meth:`csv_rows` with a header to a text file; returns the number of rows."""
        rows = self.csv_rows()
        writer = csv.DictWriter(fp, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
        return len(rows)


# --------------------------------------------------------------------------- one run


class Run:
    """One run of a results file: its provenance, status, timings and analyses.

    Obtained from :meth:`ResultsStore.begin_run` (for writing and reading) or
    :meth:`ResultsStore.runs` / :meth:`ResultsStore.run` (for reading). Analyses
    are addressed as ``"kind/name"``, ``kind`` one of :func:`curvkit.kinds.analysis_kinds`
    (:meth:`write` and :meth:`read`; :meth:`write_eigen` and :meth:`read_eigen`
    also keep eigenvectors). Every write replaces an
    analysis of the same name, completely or not at all, and is flushed to disk
    before it returns.
    """

    def __init__(self, store: ResultsStore, group: Any, *, begun: bool):
        self._store = store
        self._group = group
        self._begun = begun
        self.run_id: str = group.name.rsplit("/", 1)[-1]

    def __repr__(self) -> str:
        return f"Run({self.run_id!r}, status={self.status!r}, analyses={self.analyses()!r})"

    # -- context

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self._begun and self._group.attrs.get("status") == RUNNING:
            self.finish(COMPLETE if exc is None else FAILED, None if exc is None else describe_error(exc))

    # -- what is stored

    @property
    def status(self) -> str:
        """``"complete"``, ``"failed"``, ``"running"`` (begun by this store and not finished) or
        ``"interrupted"`` (stored as running by a process that did not finish it)."""
        status = _attr(self._group.attrs.get("status", RUNNING))
        if status == RUNNING and not self._begun:
            return INTERRUPTED
        return status

    @property
    def complete(self) -> bool:
        """Whether the run finished with status ``"complete"``."""
        return self.status == COMPLETE

    @property
    def error(self) -> str | None:
        """The one-line error of a failed run."""
        value = self._group.attrs.get("error")
        return None if value is None else _attr(value)

    @property
    def index(self) -> int | None:
        """The run's position in a trajectory, if given."""
        value = self._group.attrs.get("index")
        return None if value is None else int(_attr(value))

    @property
    def attempts(self) -> int:
        """How many times the run was begun (1 + resumptions)."""
        return int(_attr(self._group.attrs.get("attempts", 1)))

    @property
    def info(self) -> dict[str, Any]:
        """The run group's own attributes (status, times, attempts, index, error)."""
        out = _read_attrs(self._group.attrs)
        out["status"] = self.status
        return out

    @property
    def provenance(self) -> dict[str, Any]:
        """The provenance given to :meth:`ResultsStore.begin_run`, as plain values."""
        return _read_attrs(self._group["provenance"].attrs) if "provenance" in self._group else {}

    @property
    def key(self) -> dict[str, Any] | None:
        """What determines the run's numbers, as given to :meth:`ResultsStore.begin_run`
        (``None`` for a run begun without one)."""
        value = self._group.attrs.get("key_json")
        return None if value is None else json.loads(_attr(value))

    @property
    def timings(self) -> dict[str, float]:
        """Seconds by key, from :meth:`write_timing`."""
        if "timings" not in self._group:
            return {}
        return {k: float(v) for k, v in _read_attrs(self._group["timings"].attrs).items()}

    @property
    def peak_memory(self) -> dict[str, int]:
        """Peak device memory in bytes by key, from :meth:`write_timing` (empty for a CPU run)."""
        if "peak_memory" not in self._group:
            return {}
        return {k: int(v) for k, v in _read_attrs(self._group["peak_memory"].attrs).items()}

    def analyses(self) -> list[str]:
        """The finished analyses, as ``"kind/name"``, kinds in :func:`curvkit.kinds.analysis_kinds` order."""
        out = []
        for kind in _kinds():
            if kind in self._group:
                out += [f"{kind}/{name}" for name in self._group[kind] if not name.startswith("_")]
        return out

    def has(self, key: str, request: Mapping[str, Any] | None = None) -> bool:
        """Whether the finished analysis ``"kind/name"`` (e.g. ``"eigen/largest"``) is stored.

        Args:
            key: The analysis.
            request: If given, the analysis must also have been written with this
                request (see :meth:`write`); one written without any does not match.
        """
        kind, _, name = key.partition("/")
        found = kind in _kinds() and bool(name) and kind in self._group and name in self._group[kind]
        if not found or request is None:
            return found
        return self.request(key) == _canonical(request)

    def request(self, key: str) -> dict[str, Any] | None:
        """The options the analysis ``key`` was computed with (``None`` if not recorded)."""
        kind, _, name = key.partition("/")
        value = self._analysis(kind, name).attrs.get("request_json")
        return None if value is None else json.loads(_attr(value))

    # -- writing

    def _writable(self) -> None:
        self._store._require_open()
        if not self._begun:
            raise StoreError(f"run {self.run_id} was not begun in this store: call begin_run first")

    def _write(self, kind: str, name: str, fill: Any, request: Mapping[str, Any] | None = None) -> None:
        """Build the analysis, and its request, in a scratch group; move it into place; flush.

        The move is one link operation, so a reader (or a resumed run) sees the
        analysis with its request or not at all, whenever the process is stopped.
        """
        self._writable()
        _check_name(name)
        scratch = f"{_PARTIAL}{uuid.uuid4().hex[:12]}"
        group = self._group.create_group(scratch, track_order=True)
        try:
            fill(group)
            if request is not None:
                group.attrs["request_json"] = _canonical_json(request)
        except BaseException:
            del self._group[scratch]
            raise
        parent = (
            self._group[kind] if kind in self._group else self._group.create_group(kind, track_order=True)
        )
        if name in parent:
            del parent[name]
        self._group.move(scratch, f"{kind}/{name}")
        self._store._flush()

    def write(self, key: str, result: Any, *, request: Mapping[str, Any] | None = None) -> None:
        """Store ``result`` as ``"kind/name"`` with its kind's writer (:mod:`curvkit.kinds`).

        Args:
            key: The analysis, ``"kind/name"``.
            result: What the library returned for it (of the kind's ``result_type``).
            request: The JSON-able options the result was computed with (``k``,
                ``tol``, ``seed``...), stored as the ``request_json`` attribute so that
                a resumed run can tell whether the stored result answers a new request
                (:meth:`has`). It is written with the result, in one step.

        Raises:
            StoreError: An unknown kind or an invalid name.
            TypeError: A result of another type than the kind's.
        """
        kind, name = _split(key)
        spec = _kinds()[kind]
        if not isinstance(result, spec.result_type):
            raise TypeError(f"{key} needs a {spec.result_type.__name__}, got {type(result).__name__}")
        self._write(kind, name, lambda group: spec.write(group, result), request)

    def write_eigen(
        self,
        name: str,
        result: EigenResult,
        *,
        vectors: bool = False,
        request: Mapping[str, Any] | None = None,
    ) -> None:
        """Store eigenpairs as ``eigen/<name>``, with their ``[P, k]`` vectors when ``vectors``.

        :meth:`write` stores them without vectors (what ``curvkit analyze`` keeps).
        """
        from curvkit.kinds import eigen

        if not isinstance(result, EigenResult):
            raise TypeError(f"write_eigen needs an EigenResult, got {type(result).__name__}")
        self._write("eigen", name, lambda group: eigen.write(group, result, vectors), request)

    def write_timing(self, key: str, seconds: float, peak_memory_bytes: int | None = None) -> None:
        """Record ``seconds`` under ``key`` in the run's ``timings`` (flushed at once).

        With ``peak_memory_bytes`` (the peak device memory of the work, see
        :mod:`curvkit.memory`), that too, under ``key`` in ``peak_memory``.
        """
        self._writable()
        if not isinstance(key, str) or not key:
            raise StoreError(f"invalid timing key {key!r}: use a non-empty string")
        self._group.require_group("timings").attrs[key] = float(seconds)
        if peak_memory_bytes is not None:
            if "peak_memory" not in self._group:
                self._group.create_group("peak_memory", track_order=True)
            self._group["peak_memory"].attrs[key] = int(peak_memory_bytes)
        self._store._flush()

    def finish(self, status: str = COMPLETE, error: str | None = None) -> None:
        """Mark the run ``"complete"`` or ``"failed"`` (with a one-line ``error``) and flush.

        Raises:
            StoreError: Another status, or the run was not begun in this store.
        """
        self._writable()
        if status not in (COMPLETE, FAILED):
            raise StoreError(f"a run finishes as 'complete' or 'failed', not {status!r}")
        attrs = self._group.attrs
        attrs["status"] = status
        attrs["finished_at"] = _now()
        if status == FAILED:
            attrs["error"] = one_line(error) if error else "failed"
        elif "error" in attrs:
            del attrs["error"]
        self._store._flush()

    # -- reading

    def _analysis(self, kind: str, name: str) -> Any:
        self._store._require_open()
        if not self.has(f"{kind}/{name}"):
            stored = ", ".join(self.analyses()) or "none"
            raise StoreError(f"run {self.run_id} has no {kind}/{name} (stored: {stored})")
        return self._group[kind][name]

    def read(self, key: str) -> Any:
        """The result stored as ``"kind/name"``, of its kind's ``result_type``."""
        kind, name = _split(key)
        group = self._analysis(kind, name)
        with _Malformed(self, kind, name):
            return _kinds()[kind].read(group)

    def read_eigen(self, name: str, *, vectors: bool = False) -> EigenResult:
        """The eigenpairs stored as ``eigen/<name>``, with their vectors when asked
        (``None`` when they were not stored)."""
        from curvkit.kinds import eigen

        group = self._analysis("eigen", name)
        with _Malformed(self, "eigen", name):
            return eigen.read(group, vectors)

    # -- export

    def to_dict(self) -> dict[str, Any]:
        """The run as plain data (see :meth:`ResultsStore.to_dict`)."""
        info = self.info
        return _finite(
            {
                "run_id": self.run_id,
                "index": self.index,
                "status": self.status,
                "error": self.error,
                "created_at": info.get("created_at"),
                "started_at": info.get("started_at"),
                "finished_at": info.get("finished_at"),
                "attempts": self.attempts,
                "key": self.key,
                "provenance": self.provenance,
                "timings": self.timings,
                "peak_memory": self.peak_memory,
                "analyses": {key: _plain(self.read(key).to_dict()) for key in self.analyses()},
            }
        )

    def _csv_values(self) -> Iterator[tuple[str, str, Any, Any]]:
        """``(analysis, quantity, item, value)`` for every stored number."""
        for key in self.analyses():
            for quantity, item, value in _kinds()[_split(key)[0]].rows(self.read(key)):
                yield key, quantity, item, value
        for key, seconds in self.timings.items():
            yield "timings", key, None, seconds
        for key, size in self.peak_memory.items():
            yield "peak_memory", key, None, size


def _kinds() -> dict[str, Any]:
    from curvkit.kinds import analysis_kinds

    return analysis_kinds()


def _split(key: str) -> tuple[str, str]:
    """``"kind/name"`` as ``(kind, name)``, the kind checked against :func:`curvkit.kinds.analysis_kinds`."""
    kind, _, name = key.partition("/")
    kinds = _kinds()
    if kind not in kinds:
        raise StoreError(f"unknown analysis kind {kind!r} in {key!r}: one of {', '.join(kinds)}")
    return kind, name


class _Malformed:
    """Turns a missing dataset or attribute while reading into a one-line StoreError."""

    def __init__(self, run: Run, kind: str, name: str):
        self.where = f"{run._store.path}: run {run.run_id}, {kind}/{name}"

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is not None and isinstance(exc, (KeyError, ValueError, TypeError, OSError)):
            raise StoreError(f"{self.where} is malformed: {one_line(exc)}") from exc
        return False
