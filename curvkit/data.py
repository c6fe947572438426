"""Turning the user's data into a re-iterable stream of ``(inputs, targets)`` batches.

Accepted forms: an ``(inputs, targets)`` pair of tensors (split into batches of
``batch_size``), a :class:`torch.utils.data.Dataset`, a
:class:`torch.utils.data.DataLoader`, or any re-iterable of ``(inputs, targets)``
batches. Inputs are tensors or dicts of tensors (the model is then called as
``model(**inputs)``). A one-shot iterator (a generator) is refused, since every
curvature product makes a full pass over the data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from curvkit.arguments import integer
from curvkit.errors import DataError

__all__ = [
    "BatchSource",
    "DataSummary",
    "LocalShard",
    "batch_size_of",
    "copies_without_waiting",
    "is_tensor_pair",
    "rebatchable_types",
    "same_device",
    "slice_batch",
    "summarize_data",
    "to_device",
]

Inputs = Tensor | Mapping[str, Tensor]


def batch_size_of(inputs: Inputs, targets: Tensor) -> int:
    """Number of samples in a batch: the first dimension of the targets."""
    if not isinstance(targets, Tensor) or targets.dim() == 0:
        raise DataError("targets must be a tensor with a batch dimension first")
    return targets.shape[0]


def is_tensor_pair(data: Any) -> bool:
    """Whether ``data`` is an in-memory ``(inputs, targets)`` pair (inputs a tensor or a dict of tensors)."""
    return (
        isinstance(data, tuple | list)
        and len(data) == 2
        and isinstance(data[1], Tensor)
        and isinstance(data[0], Tensor | Mapping)
    )


def slice_batch(inputs: Inputs, targets: Tensor, stop: int) -> tuple[Inputs, Tensor]:
    """The first ``stop`` samples of a batch."""
    if isinstance(inputs, Mapping):
        return {k: v[:stop] for k, v in inputs.items()}, targets[:stop]
    return inputs[:stop], targets[:stop]


def same_device(actual: torch.device, wanted: torch.device | str) -> bool:
    """Whether a tensor on ``actual`` is on ``wanted``; ``cuda`` without an index is any CUDA device.

    ``torch.device("cuda") != torch.device("cuda", 0)``, yet tensors moved to
    ``"cuda"`` land on ``cuda:0`` (the current device): compare types, and
    indices only where ``wanted`` names one.

    >>> same_device(torch.device("cuda", 0), "cuda"), same_device(torch.device("cuda", 1), "cuda:0")
    (True, False)
    """
    wanted = torch.device(wanted)
    return actual.type == wanted.type and (wanted.index is None or actual.index == wanted.index)


def copies_without_waiting(source: torch.device, target: torch.device) -> bool:
    """Whether a copy from ``source`` to ``target`` may be ``non_blocking``: host memory to a CUDA device.

    No stream synchronisation waits for the work queued on the device (a
    blocking copy would, once per batch and pass). CUDA copies pageable host
    memory to its staging area before the call returns; pinned memory (a
    ``DataLoader(pin_memory=True)``'s batches) is read by the transfer when the
    stream reaches it, PyTorch's caching host allocator keeping it alive until
    then. So the source may go at once either way, but a pinned buffer must
    keep its values until the copy is done: a loader that refills one pinned
    buffer for every batch would change a batch still queued (a ``DataLoader``
    pins a new buffer per batch). Other moves block as usual: to the host above
    all, whose data must be complete when read, and to MPS, which may read a
    non-blocking copy's source after it is freed (V. Moens, "A guide on good
    usage of non_blocking and pin_memory() in PyTorch", PyTorch tutorials, 2024).
    """
    return source.type == "cpu" and target.type == "cuda"


def to_device(x: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """Move a tensor or dict of tensors; floating tensors are also cast to ``dtype``.

    Without waiting where :func:`copies_without_waiting` allows it.
    """
    if isinstance(x, Mapping):
        return {k: to_device(v, device, dtype) for k, v in x.items()}
    if not isinstance(x, Tensor):
        raise DataError(f"batch entries must be tensors or dicts of tensors, got {type(x).__name__}")
    non_blocking = copies_without_waiting(x.device, device)
    if dtype is not None and x.is_floating_point():
        return x.to(device=device, dtype=dtype, non_blocking=non_blocking)
    return x.to(device=device, non_blocking=non_blocking)


class _TensorPairBatches:
    """Batches of an in-memory ``(inputs, targets)`` pair, in order."""

    def __init__(self, inputs: Inputs, targets: Tensor, batch_size: int):
        n = batch_size_of(inputs, targets)
        sizes = (
            {k: v.shape[0] for k, v in inputs.items()}
            if isinstance(inputs, Mapping)
            else {"inputs": inputs.shape[0]}
        )
        bad = {k: s for k, s in sizes.items() if s != n}
        if bad:
            raise DataError(f"inputs and targets disagree on the number of samples: {bad} vs {n}")
        self.inputs, self.targets, self.batch_size, self.n = inputs, targets, batch_size, n

    def __iter__(self) -> Iterator[tuple[Inputs, Tensor]]:
        for start in range(0, self.n, self.batch_size):
            stop = min(start + self.batch_size, self.n)
            if isinstance(self.inputs, Mapping):
                yield {k: v[start:stop] for k, v in self.inputs.items()}, self.targets[start:stop]
            else:
                yield self.inputs[start:stop], self.targets[start:stop]


def rebatchable_types() -> tuple[type, ...]:
    """Batch sources whose batch size curvkit chooses (and so can change)."""
    return (_TensorPairBatches, _DatasetBatches)


class _DatasetBatches(DataLoader):
    """A Dataset split in order into batches of ``batch_size`` by curvkit."""


class LocalShard:
    """Data that hold only this process's shard of a data-parallel run (see :mod:`curvkit.distributed`).

    ``Problem(model, loss, LocalShard(data))`` iterates ``data`` as given in every
    process (each process passes its own), and still reduces the sums over the
    processes: for data the user has sharded already, such as a DataLoader with
    a sampler of its own, or files read per process. The shards must not overlap
    (a :class:`torch.utils.data.DistributedSampler` with ``drop_last=False`` repeats
    samples to even them out, which would count them twice).

    Args:
        data: This process's data, in any form :class:`BatchSource` accepts.
    """

    def __init__(self, data: Any):
        if isinstance(data, LocalShard):
            data = data.data
        self.data = data


class BatchSource:
    """A re-iterable source of ``(inputs, targets)`` batches.

    Args:
        data: The data, in any accepted form (see the module docstring).
        batch_size: Batch size used when splitting a tensor pair or a Dataset.
        max_samples: Stop after this many samples (the last batch is cut).
    """

    def __init__(self, data: Any, batch_size: int = 1024, max_samples: int | None = None):
        batch_size = integer(batch_size, "batch_size", error=DataError)
        if max_samples is not None:
            max_samples = integer(max_samples, "max_samples", error=DataError)
        self.max_samples = max_samples
        self.local_shard = isinstance(data, LocalShard)
        """Whether the data are this process's shard already (:class:`LocalShard`)."""
        if self.local_shard:
            data = data.data
        if is_tensor_pair(data):
            self._source: Iterable = _TensorPairBatches(data[0], data[1], batch_size)
        elif isinstance(data, DataLoader):
            self._source = data
        elif isinstance(data, Dataset) and hasattr(data, "__len__"):
            self._source = _DatasetBatches(data, batch_size=batch_size, shuffle=False)
        elif isinstance(data, Iterable):
            if isinstance(data, Iterator):
                raise DataError(
                    "data is a one-shot iterator (a generator?); pass a list of batches, "
                    "a Dataset or a DataLoader, which can be iterated more than once"
                )
            self._source = data
        else:
            raise DataError(
                "data must be an (inputs, targets) pair of tensors, a Dataset, a DataLoader "
                f"or a re-iterable of (inputs, targets) batches; got {type(data).__name__}"
            )

    def shard(self, rank: int, size: int) -> Iterator[tuple[Inputs, Tensor]]:
        """Process ``rank``'s batches, of ``size`` processes: the shards cover the data once.

        * A tensor pair or a Dataset (batched by curvkit): the contiguous samples
          ``[floor(rank n / size), floor((rank + 1) n / size))`` of the ``n`` samples
          (within ``max_samples``), in batches of the batch size: shard sizes differ
          by at most one sample, and each process reads only its own samples.
        * Batches fixed by the user (a DataLoader, a list of batches): batches
          ``rank, rank + size, ...`` (the ``max_samples`` cut applied first): shard
          sizes differ by at most one batch; every process iterates all the
          batches to reach its own (a DataLoader loads them all), so pass a
          Dataset, or a :class:`LocalShard`, to read each sample once.
        * A :class:`LocalShard`: the data as given.
        """
        source = self._source
        if self.local_shard or size == 1:
            yield from self
            return
        if isinstance(source, _TensorPairBatches | _DatasetBatches):
            available = source.n if isinstance(source, _TensorPairBatches) else len(source.dataset)
            n = min(available, self.max_samples or available)
            lo, hi = rank * n // size, (rank + 1) * n // size
            if hi <= lo:
                return
            if isinstance(source, _TensorPairBatches):
                inputs = (
                    {k: v[lo:hi] for k, v in source.inputs.items()}
                    if isinstance(source.inputs, Mapping)
                    else source.inputs[lo:hi]
                )
                part: Iterable = _TensorPairBatches(inputs, source.targets[lo:hi], source.batch_size)
            else:
                part = _DatasetBatches(
                    torch.utils.data.Subset(source.dataset, range(lo, hi)),
                    batch_size=source.batch_size,
                    shuffle=False,
                )
            yield from BatchSource(part, batch_size=source.batch_size)
            return
        for i, batch in enumerate(self):
            if i % size == rank:
                yield batch

    def subset(self, indices: Sequence[int] | Tensor) -> Any:
        """The samples at ``indices`` (positions in iteration order, within ``max_samples``), as data.

        A tensor pair is indexed and a Dataset wrapped in a
        :class:`torch.utils.data.Subset`, without reading other samples; data in
        batches fixed by the user (a DataLoader, a list of batches) are read once
        to gather the chosen samples, which are then held in memory as a tensor
        pair. Any order; a repeated index repeats the sample. The subset of a
        :class:`LocalShard` (indices into this process's own samples) is a
        :class:`LocalShard` again: a shard's samples are not sharded a second time.

        Raises:
            DataError: No index, a non-integer one, or one outside the data.
        """
        index = torch.as_tensor(indices).reshape(-1)
        if index.numel() == 0 or index.is_floating_point() or index.dtype == torch.bool:
            raise DataError(
                f"a subset needs one or more integer sample indices, got {index.dtype} {tuple(index.shape)}"
            )
        index = index.to(device="cpu", dtype=torch.long)
        source = self._source
        if isinstance(source, _TensorPairBatches | _DatasetBatches):
            available = source.n if isinstance(source, _TensorPairBatches) else len(source.dataset)
            _check_indices(index, min(available, self.max_samples or available))
            if isinstance(source, _TensorPairBatches):
                chosen: Any = (_take(source.inputs, index), _take(source.targets, index))
            else:
                chosen = torch.utils.data.Subset(source.dataset, index.tolist())
        else:
            chosen = self._gather(index)
        return LocalShard(chosen) if self.local_shard else chosen  # a shard's samples stay its own

    def _gather(self, index: Tensor) -> tuple[Inputs, Tensor]:
        """The samples at ``index`` of data in fixed batches, in one reading pass."""
        wanted = torch.unique(index)  # sorted
        inputs: list[Any] = []
        targets: list[Tensor] = []
        seen = 0
        for batch_inputs, batch_targets in self:
            n = batch_size_of(batch_inputs, batch_targets)
            lo, hi = torch.searchsorted(wanted, torch.tensor([seen, seen + n])).tolist()
            if hi > lo:
                local = wanted[lo:hi] - seen
                inputs.append(_take(batch_inputs, local))
                targets.append(_take(batch_targets, local))
            seen += n
        _check_indices(index, seen)
        rows = torch.searchsorted(wanted, index)
        if isinstance(inputs[0], Mapping):
            joined: Any = {k: torch.cat([part[k] for part in inputs]) for k in inputs[0]}
        else:
            joined = torch.cat(inputs)
        return _take(joined, rows), _take(torch.cat(targets), rows)

    def __iter__(self) -> Iterator[tuple[Inputs, Tensor]]:
        seen = 0
        for batch in self._source:
            if not isinstance(batch, tuple | list) or len(batch) != 2:
                raise DataError(
                    f"each batch must be an (inputs, targets) pair, got {type(batch).__name__}"
                    + (f" of length {len(batch)}" if isinstance(batch, tuple | list) else "")
                )
            inputs, targets = batch
            n = batch_size_of(inputs, targets)
            if self.max_samples is not None and seen + n > self.max_samples:
                inputs, targets = slice_batch(inputs, targets, self.max_samples - seen)
                n = self.max_samples - seen
            if n > 0:
                yield inputs, targets
            seen += n
            if self.max_samples is not None and seen >= self.max_samples:
                return


def _check_indices(index: Tensor, available: int) -> None:
    """Refuse sample indices outside ``0 .. available - 1``."""
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= available:
        raise DataError(
            f"sample index {low if low < 0 else high} is outside the data's {available} samples "
            f"(indices run from 0 to {available - 1})"
        )


def _take(x: Any, index: Tensor) -> Any:
    """The samples ``index`` of a tensor or a dict of tensors (first dimension)."""
    if isinstance(x, Mapping):
        return {k: _take(v, index) for k, v in x.items()}
    return x[index.to(x.device)]


@dataclass(frozen=True)
class DataSummary:
    """What a pass over the data found: the number of samples and a content fingerprint.

    Attributes:
        samples: Number of samples (the targets' first dimension, summed).
        fingerprint: SHA-256 (hex) of the samples' contents, in order: one digest
            per stream (the targets, and the inputs or each entry of a dict of
            inputs) over the raw bytes of every batch, combined with the streams'
            names, dtypes and per-sample shapes. It does not depend on how the
            samples are batched, so the same data split by another batch size has
            the same fingerprint, and any changed value, sample, order or dtype
            gives another.
    """

    samples: int
    fingerprint: str


def _streams(inputs: Inputs, targets: Tensor) -> Iterator[tuple[str, Tensor]]:
    yield "targets", targets
    if isinstance(inputs, Mapping):
        for name in sorted(inputs):
            yield f"inputs.{name}", inputs[name]
    else:
        yield "inputs", inputs


def summarize_data(batches: Iterable[tuple[Inputs, Tensor]]) -> DataSummary:
    """Count the samples of ``batches`` and fingerprint their contents, in one pass.

    Hashing runs at memory speed (about 1 GB/s on one core), so it costs less
    than the forward pass that every curvature product makes over the same data.

    Example:
        >>> X, y = torch.arange(12.0).reshape(6, 2), torch.arange(6)
        >>> a = summarize_data(BatchSource((X, y), batch_size=4))
        >>> b = summarize_data(BatchSource((X, y), batch_size=5))
        >>> a.samples, a.fingerprint == b.fingerprint
        (6, True)
        >>> summarize_data(BatchSource((X + 1, y))).fingerprint == a.fingerprint
        False
    """
    digests: dict[str, Any] = {}
    layouts: dict[str, tuple[str, tuple[int, ...]]] = {}
    samples = 0
    for inputs, targets in batches:
        samples += batch_size_of(inputs, targets)
        for name, t in _streams(inputs, targets):
            if not isinstance(t, Tensor):
                raise DataError(f"batch entries must be tensors or dicts of tensors, got {type(t).__name__}")
            layout = (str(t.dtype), tuple(t.shape[1:]))
            if layouts.setdefault(name, layout) != layout:
                layouts[name] = ("mixed", ())
            raw = t.detach().to("cpu").contiguous().reshape(-1)
            digests.setdefault(name, hashlib.sha256()).update(raw.view(torch.uint8).numpy())
    combined = hashlib.sha256()
    for name in sorted(digests):
        combined.update(f"{name}|{layouts[name]}|{digests[name].hexdigest()};".encode())
    return DataSummary(samples=samples, fingerprint=combined.hexdigest())
