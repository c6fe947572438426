"""Timing: medians of repeated calls in one process, and the facts of the machine.

Calls that are compared are timed *interleaved*: every round calls each of them
once (the order rotating between rounds), so that load from other processes on
a shared machine falls on all of them alike and their ratios stay meaningful.
The reported figure is the median over rounds, after warm-up rounds.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch

from curvkit.choice import synchronize

__all__ = [
    "OtherLoad",
    "Timing",
    "configure_threads",
    "machine_info",
    "percent",
    "synchronize",
    "time_interleaved",
]


@dataclass
class Timing:
    """Wall-clock seconds of the timed calls of one method.

    Attributes:
        samples: Seconds per call, one per round.
    """

    samples: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        """Median over rounds, in milliseconds."""
        return 1e3 * statistics.median(self.samples)

    @property
    def spread_ms(self) -> tuple[float, float]:
        """Fastest and slowest call, in milliseconds."""
        return 1e3 * min(self.samples), 1e3 * max(self.samples)


def time_interleaved(
    calls: Mapping[str, Callable[[int], Any]], repeats: int, warmup: int = 1
) -> dict[str, Timing]:
    """Time several calls round by round; each is called with the round's index.

    Args:
        calls: Functions to time, by name. A function receives the round index
            ``0 .. repeats - 1`` (``-1 - w`` during warm-up round ``w``), so that
            it can use fresh inputs each round.
        repeats: Timed rounds.
        warmup: Untimed rounds first.

    Returns:
        The timings, by name.
    """
    names = list(calls)
    for w in range(warmup):
        for name in names:
            calls[name](-1 - w)
    timings = {name: Timing() for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize()
            start = time.perf_counter()
            calls[name](r)
            synchronize()
            timings[name].samples.append(time.perf_counter() - start)
    return timings


def _busy_cpu_seconds() -> float | None:
    """CPU seconds spent busy by the whole machine since boot (Linux ``/proc/stat``)."""
    try:
        with open("/proc/stat", encoding="utf-8") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Share of the machine's CPU used by *other* processes between ``start()`` and ``stop()``.

    0 means this process had the machine to itself; 0.5 on 2 cores means another
    process kept one core busy. Timings taken under load are slower and noisier
    (torch's thread pool waits for threads the scheduler has preempted).
    """

    def __init__(self) -> None:
        self._t0 = self._busy0 = self._self0 = None

    def start(self) -> OtherLoad:
        """Begin measuring."""
        self._t0, self._busy0, self._self0 = time.perf_counter(), _busy_cpu_seconds(), _own_cpu_seconds()
        return self

    def stop(self) -> float | None:
        """The other processes' share of all cores since ``start()`` (``None`` if unknown)."""
        busy = _busy_cpu_seconds()
        if busy is None or self._busy0 is None:
            return None
        wall = time.perf_counter() - self._t0
        others = (busy - self._busy0) - (_own_cpu_seconds() - self._self0)
        return round(max(0.0, others) / (wall * (os.cpu_count() or 1)), 3)


def percent(share: float | None) -> str:
    """A share of the machine (:meth:`OtherLoad.stop`) as ``"12%"``; ``"unknown"`` when not measured."""
    return "unknown" if share is None else f"{100 * share:.0f}%"


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and of the children it has waited for (a section's worker runs)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def configure_threads(threads: int | None) -> int:
    """Fix torch's intra-op threads (default: the number of CPU cores).

    Returns:
        The number of torch threads in use.
    """
    torch.set_num_threads(threads or os.cpu_count() or 1)
    return torch.get_num_threads()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """Date, machine, library versions and thread settings, for the report."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "load_average_1min": round(load[0], 2),
    }
