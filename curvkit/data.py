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
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from curvkit.errors import DataError

__all__ = [
    "BatchSource",
    "DataSummary",
    "batch_size_of",
    "rebatchable_types",
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


def slice_batch(inputs: Inputs, targets: Tensor, stop: int) -> tuple[Inputs, Tensor]:
    """The first ``stop`` samples of a batch."""
    if isinstance(inputs, Mapping):
        return {k: v[:stop] for k, v in inputs.items()}, targets[:stop]
    return inputs[:stop], targets[:stop]


def to_device(x: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """Move a tensor or dict of tensors; floating tensors are also cast to ``dtype``."""
    if isinstance(x, Mapping):
        return {k: to_device(v, device, dtype) for k, v in x.items()}
    if not isinstance(x, Tensor):
        raise DataError(f"batch entries must be tensors or dicts of tensors, got {type(x).__name__}")
    if dtype is not None and x.is_floating_point():
        return x.to(device=device, dtype=dtype)
    return x.to(device=device)


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


class BatchSource:
    """A re-iterable source of ``(inputs, targets)`` batches.

    Args:
        data: The data, in any accepted form (see the module docstring).
        batch_size: Batch size used when splitting a tensor pair or a Dataset.
        max_samples: Stop after this many samples (the last batch is cut).
    """

    def __init__(self, data: Any, batch_size: int = 1024, max_samples: int | None = None):
        if batch_size < 1:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if max_samples is not None and max_samples < 1:
            raise DataError(f"max_samples must be positive, got {max_samples}")
        self.max_samples = max_samples
        if (
            isinstance(data, tuple | list)
            and len(data) == 2
            and isinstance(data[1], Tensor)
            and (isinstance(data[0], Tensor | Mapping))
        ):
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
