"""Snapshots of a model's parameters and buffers, to notice when cached work is stale.

A :class:`~curvkit.Problem` caches work that depends on the model's state
(gradient graphs, the determinism probe); :class:`ModelSnapshot` says whether
that state is still the one the work was done for, and
:func:`fixed_model_state` lets an analysis compare contents once instead of
before every product (one host-device synchronisation per analysis on a GPU).
Within the same scope, :func:`cached_in_analysis` remembers what was read from
a piece of the data (a loss's check of its class indices, their count), so
that the passes after the first read nothing back to the host; and for a batch
copied from host memory to a device (:func:`record_host_copy`), such facts are
read from a copy of its values kept on the host, waiting for no device.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

__all__ = [
    "ModelSnapshot",
    "cached_in_analysis",
    "contents_equal",
    "fixed_model_state",
    "record_fact",
    "record_host_copy",
]

T = TypeVar("T")


class ModelSnapshot:
    """The state of a model's parameters and buffers at one moment.

    :meth:`is_current` is true while no parameter or buffer has been replaced or
    changed. It compares version counters first (cheap, on the host), then
    contents, so that edits through ``.data`` (which bypass version counters) are
    noticed too. The copy costs one parameter-sized buffer; the comparison is
    O(P), negligible next to a pass over the data, and takes one host-device
    synchronisation per device (not one per tensor).

    Within :func:`fixed_model_state` (which every analysis of :mod:`curvkit.linalg`
    enters) the contents are compared once, when the analysis takes its first
    snapshot; its further products compare version counters only, so that a
    GPU run does not synchronise before every product.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.tensors = self._tensors()
        self.keys = [self._key(t) for t in self.tensors]
        self.values = [t.detach().clone() for t in self.tensors]
        verified = _VERIFIED.get()
        if verified is not None:  # taken within the scope: its contents are the model's now
            verified.add(self)

    def _tensors(self) -> list[Tensor]:
        return list(self.model.parameters()) + list(self.model.buffers())

    @staticmethod
    def _key(t: Tensor) -> tuple:
        return (t.data_ptr(), t._version, t.dtype, t.device, t.shape)

    def is_current(self) -> bool:
        """Whether the model still has exactly these parameters and buffers."""
        tensors = self._tensors()
        if len(tensors) != len(self.tensors) or any(
            a is not b or self._key(a) != k for a, b, k in zip(tensors, self.tensors, self.keys)
        ):
            return False
        verified = _VERIFIED.get()
        if verified is not None and self in verified:
            return True
        if not contents_equal(tensors, self.values):
            return False
        if verified is not None:
            verified.add(self)
        return True


_VERIFIED: contextvars.ContextVar[weakref.WeakSet[ModelSnapshot] | None] = contextvars.ContextVar(
    "curvkit_verified_snapshots", default=None
)
"""The snapshots whose contents were compared within the current :func:`fixed_model_state` (else ``None``).

Weak references: a snapshot replaced by a newer one (the model was updated within
the scope, as in a training loop) is freed with its copy of the parameters."""


@contextlib.contextmanager
def fixed_model_state() -> Iterator[None]:
    """A scope in which models change only through their version counters: contents compared once.

    An analysis (an eigenvalue run, a trace, a solve) takes many products while
    the model does not change, since no user code runs in between. Within this
    scope :meth:`ModelSnapshot.is_current` compares a snapshot's contents with
    the model's the first time only; afterwards it checks the host-side keys
    (tensor identity, storage, version counter, dtype, shape), which notice every
    change but an edit through ``.data`` made during the analysis itself (from a
    progress callback or another thread). On a GPU the content comparison is a
    host-device synchronisation, so this takes one per analysis instead of one
    per product. Scopes nest (the outermost one counts) and are per thread.

    Usable as a decorator; the public functions of :mod:`curvkit.linalg` are
    decorated with it.
    """
    if _VERIFIED.get() is not None:
        yield
        return
    token = _VERIFIED.set(weakref.WeakSet())
    facts: dict[tuple, tuple[weakref.ref, int, Any]] = {}
    facts_token = _DATA_FACTS.set(facts)
    try:
        yield
    finally:
        _DATA_FACTS.reset(facts_token)
        _VERIFIED.reset(token)
        facts.clear()  # its entries' callbacks refer to it: freed now, not by the cycle collector


_DATA_FACTS: contextvars.ContextVar[dict[tuple, tuple[weakref.ref, int, Any]] | None] = (
    contextvars.ContextVar("curvkit_data_facts", default=None)
)
"""Within :func:`fixed_model_state`, what :func:`cached_in_analysis` computed, by region and key.

``None`` outside the scope."""


def cached_in_analysis(tensor: Tensor, key: Hashable, compute: Callable[[Tensor], T]) -> T:
    """``compute(values)``, a fact about ``tensor``'s values, computed once per analysis for the same values.

    ``values`` is the tensor to read: ``tensor`` itself, or for a batch copied
    from host memory (:func:`record_host_copy`), the copy of its values kept on
    the host, whose reading waits for no device.

    Within :func:`fixed_model_state` the result for a view (a batch cut from a
    data tensor: :func:`curvkit.data.slice_batch` gives views) is remembered for
    the region of memory it views (its base tensor, address, storage offset,
    shape, strides and dtype) and ``key``, and returned again while the base is
    alive and its version counter unchanged: the same batch cut again on a later
    pass reuses it. ``compute`` must depend on nothing but the values it is
    given and ``key``. The data stay fixed during an analysis on the same terms as the
    model: an edit that bypasses version counters (through ``.data`` or a NumPy
    view) made during the analysis itself goes unnoticed. Results for tensors
    that are not views are not remembered: a data loader may refill one buffer
    for every batch, as loaders writing through NumPy or DLPack do, without
    moving its version counter (what :func:`record_fact` records about a
    tensor its caller made is found, though, in an analysis or not). Outside
    the scope and for inference tensors (which have no version counter)
    ``compute`` runs every time.

    On a GPU this turns a host-device synchronisation per batch and pass (a
    loss's ``bool(...)`` check of its targets, ``float(...)`` of their count)
    into one per batch and analysis, for data that lives on the device, and
    into none for data copied from host memory (a loader's batches).

    Args:
        tensor: The data the fact is about (a batch's targets).
        key: What is computed, and any setting it depends on besides the values.
        compute: Computes the fact from ``tensor``'s values, given as a tensor
            (on the host, or on ``tensor``'s device).
    """
    record = _current(tensor)
    if record is not None and key in record.facts:
        return record.facts[key]
    values = _host_values(tensor, record)
    facts = _DATA_FACTS.get()
    if facts is None or tensor.is_inference():
        return compute(values)
    base, region = _region(tensor, key)
    known = facts.get(region)
    if known is not None and known[0]() is base and known[1] == tensor._version:
        return known[2]
    value = compute(values)
    if tensor._base is not None:
        _remember(facts, base, region, tensor._version, value)
    return value


def record_host_copy(copy: Any, source: Any) -> None:
    """Records the values of ``copy``, just copied from host memory (``source``), on the host too.

    For a batch's targets moved to a device (``copy = source.to(device)``, dtype
    and shape unchanged): :func:`cached_in_analysis` then computes facts about
    ``copy`` from the host copy of its values, whose reading waits for nothing
    queued on the device, where reading ``copy`` would wait for all of it. The
    values are copied on the host now (one copy of the targets, in host memory),
    not read from ``source`` later: a loader may refill ``source`` for its next
    batch without moving a version counter (through NumPy), while ``copy`` is
    still in use. The record holds while ``copy`` lives and its version counter
    stands (an in-place change of ``copy`` ends it; an edit through ``.data``
    goes unnoticed, as within :func:`fixed_model_state`).

    Recorded only for class indices and masks (integer and boolean tensors),
    the targets whose values a loss reads (floating-point targets are counted
    by their shape): nothing is recorded unless ``copy`` and ``source`` are such
    tensors, ``source`` in host memory and ``copy`` a distinct tensor of its
    dtype and shape (not an inference tensor, which has no version counter).
    """
    if not (
        isinstance(copy, Tensor)
        and isinstance(source, Tensor)
        and copy is not source
        and source.is_cpu
        and not source.is_floating_point()
        and not source.is_complex()
        and copy.dtype == source.dtype
        and copy.shape == source.shape
        and not copy.is_inference()
    ):
        return
    _record(copy).host = source.clone()


@dataclasses.dataclass
class _Record:
    """What is known about a tensor its maker hands on, while it lives and its version counter stands."""

    alive: weakref.ref  # the tensor, weakly: its record leaves with it
    version: int
    host: Tensor | None = None  # its values, copied in host memory (record_host_copy)
    facts: dict[Hashable, Any] = dataclasses.field(default_factory=dict)  # record_fact


_RECORDS: dict[int, _Record] = {}
"""The records of :func:`record_host_copy` and :func:`record_fact`, by the tensor's ``id``."""


def _record(tensor: Tensor) -> _Record:
    """``tensor``'s record; a new one if it has none or its version counter moved (no inference tensor)."""
    record = _current(tensor)
    if record is None:
        key = id(tensor)
        record = _RECORDS[key] = _Record(
            weakref.ref(tensor, lambda _: _RECORDS.pop(key, None)), tensor._version
        )
    return record


def _current(tensor: Tensor) -> _Record | None:
    """``tensor``'s record while its version counter stands, else ``None``."""
    # an entry leaves with its tensor, so one found is ``tensor``'s (and it has a version counter)
    record = _RECORDS.get(id(tensor))
    return record if record is not None and record.version == tensor._version else None


def _host_copy(tensor: Tensor) -> Tensor:
    """``tensor``'s values in host memory while :func:`record_host_copy` holds for it; else ``tensor``."""
    return _host_values(tensor, _current(tensor))


def _host_values(tensor: Tensor, record: _Record | None) -> Tensor:
    """The host copy of ``tensor``'s values its current record holds (``record``), else ``tensor``."""
    return tensor if record is None or record.host is None else record.host


def record_fact(tensor: Tensor, key: Hashable, value: Any) -> None:
    """Records a fact known without reading ``tensor`` (``value``), found by :func:`cached_in_analysis`.

    For a tensor its caller has just made and hands on, which nothing refills
    (sampled targets, in range by construction): kept while the tensor lives
    and its version counter stands, within an analysis or not (not for an
    inference tensor, which has no version counter).
    """
    if not tensor.is_inference():
        _record(tensor).facts[key] = value


def _region(tensor: Tensor, key: Hashable) -> tuple[Tensor, tuple]:
    """``tensor``'s base and the key of the memory region it views, with ``key``."""
    base = tensor if tensor._base is None else tensor._base
    # the address too: a view's storage can be replaced (set_) while its base stays
    region = (
        id(base),
        tensor.data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tensor.stride(),
        tensor.dtype,
        key,
    )
    return base, region


def _remember(facts: dict, base: Tensor, region: tuple, version: int, value: Any) -> None:
    """Stores a fact; the entry goes with its base, so a pass over fresh batches leaves nothing behind."""
    facts[region] = (weakref.ref(base, lambda _: facts.pop(region, None)), version, value)


def contents_equal(tensors: Sequence[Tensor], values: Sequence[Tensor]) -> bool:
    """Whether each tensor equals its value entry for entry, NaN equal to NaN, one sync per device.

    As :func:`torch.equal`, but a NaN equals a NaN in the same place: a model
    with a NaN entry it does not use (a buffer) is unchanged, not a new model
    to snapshot and probe at every product. CPU tensors are compared with
    :func:`torch.equal` (no synchronisation to save); on other devices the
    per-tensor flags are reduced on the device and read back once. NaNs are
    looked for only where the plain comparison fails (a second pass).
    """
    on_device: dict[torch.device, list[tuple[Tensor, Tensor]]] = {}
    for t, v in zip(tensors, values):
        t = t.detach()
        if t.device.type == "cpu":
            if not torch.equal(t, v) and not bool(_equal_or_both_nan(t, v).all()):
                return False
        else:
            on_device.setdefault(t.device, []).append((t, v))
    return all(
        bool(torch.stack([torch.eq(t, v).all() for t, v in pairs]).all())
        or bool(torch.stack([_equal_or_both_nan(t, v).all() for t, v in pairs]).all())
        for pairs in on_device.values()
    )


def _equal_or_both_nan(a: Tensor, b: Tensor) -> Tensor:
    """Entry by entry, ``a == b`` or both NaN (for tensors of equal shape and dtype)."""
    same = torch.eq(a, b)
    if a.is_floating_point() or a.is_complex():
        same |= torch.isnan(a) & torch.isnan(b)
    return same
