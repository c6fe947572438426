"""The peak accelerator memory of a piece of work: what ``curvkit analyze`` stores with each result.

On a CUDA device, :func:`peak_memory` resets torch's peak counter of the caching
allocator (:func:`torch.cuda.reset_peak_memory_stats`) when the work begins and
reads :func:`torch.cuda.max_memory_allocated` when it ends: the most memory the
tensors of the process held on that device at once, the model, the data kept
there and the analysis's own vectors included. The allocator's cache beyond
that (``memory_reserved``) is not counted; it is torch's, not the analysis's.

On the CPU no such counter exists per piece of work (the process's peak
resident size only grows), so nothing is measured and the result says so
(``None``), rather than a number that means something else.

:func:`fits` says whether a copy of some size fits on a device (half its free
memory), for data moved there once instead of batch by batch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["PeakMemory", "fits", "peak_memory"]

FREE_SHARE = 0.5
"""The share of a device's free memory that :func:`fits` lets one copy take."""


@dataclass
class PeakMemory:
    """The measurement of :func:`peak_memory`, filled in when its scope ends.

    Attributes:
        device: The device measured.
        bytes: The peak of allocated memory on it, or ``None`` where the device
            has no such counter (the CPU) or the scope has not ended.
    """

    device: torch.device
    bytes: int | None = None


@contextlib.contextmanager
def peak_memory(device: torch.device | str) -> Iterator[PeakMemory]:
    """Measures the peak memory allocated on ``device`` while the scope runs (module docstring).

    The counter is the device's, shared by the whole process: a measurement
    inside another one resets the outer one's peak, so measure one thing at a
    time (:func:`curvkit.analysis.run_plan` measures each analysis in turn).

    >>> with peak_memory("cpu") as measured:
    ...     _ = torch.zeros(10)
    >>> measured.bytes is None  # the CPU has no counter per piece of work
    True
    """
    measured = PeakMemory(torch.device(device))
    if measured.device.type != "cuda":
        yield measured
        return
    torch.cuda.reset_peak_memory_stats(measured.device)
    yield measured
    measured.bytes = int(torch.cuda.max_memory_allocated(measured.device))


def fits(nbytes: int, device: torch.device | str) -> bool:
    """Whether ``nbytes`` take at most :data:`FREE_SHARE` of ``device``'s free memory.

    Free memory: :func:`torch.cuda.mem_get_info` on a CUDA device, the
    available physical memory (``sysconf``) on the CPU; where neither can be
    read, ``True`` (the copy is then attempted, as it would be anyway).

    >>> fits(1024, "cpu")
    True
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            return True
    return nbytes <= FREE_SHARE * free
