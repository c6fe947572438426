r"""Data-parallel curvature on :mod:`torch.distributed`: each process a shard of the data, one reduction.

Every data-backed quantity of curvkit (loss and gradient, Hessian, GGN and Fisher
products, KFAC factors, the D3 summary, diagonals) is a sum over the data,
normalised by the count of loss terms,

.. math:: A V = \frac{1}{C} \sum_b A_b V, \qquad C = \sum_b c_b ,

formed by :meth:`curvkit.Problem.batch_sums` (the one loop over the data) and
finished by :meth:`curvkit.Problem.full_data` (the one reduction). When
:mod:`torch.distributed` is initialised with more than one process (the processes
``torchrun --nproc-per-node N`` starts, each calling
``torch.distributed.init_process_group()``), a problem built with
``data_parallel=True`` (the default)

* iterates only its process's **shard** of the data
  (:meth:`curvkit.data.BatchSource.shard`): a contiguous range of the samples
  when curvkit batches the data itself (a tensor pair, a Dataset), every
  ``W``-th batch when the batches are the user's (a DataLoader, a list of
  batches), or, for data wrapped in :class:`~curvkit.data.LocalShard`, the data
  as given, which the user has sharded already;
* **reduces** at :meth:`~curvkit.Problem.full_data`: the sums of every process and
  their counts are added (:func:`reduce_sums`: two all-reduces, the counts and the
  tensors), and the total is normalised by the total count.

The result is the one-process result on the whole data, up to the rounding of a
different summation order, for shards of any sizes (uneven shards included; each
process needs at least one batch). Every process then holds the same reduced
values, so every analysis built on the products (Lanczos, traces, solvers, checks)
takes the same steps and decisions in every process. A Monte-Carlo estimator
(a Fisher with sampled targets) draws the samples of each shard from a stream of
its own (:func:`process_seed`): it is another draw of the same estimator, equal
to the one-process operator in expectation rather than to rounding. What is not
computed from the data is agreed on explicitly: a fresh seed (``seed=None``) is drawn by
process 0 and broadcast (:func:`shared_seed`), so that random probes are the same
in every process (a probe that differed would mix in the reduction). A way of
computing chosen by timing (``strategy="auto"``) may differ between processes,
which changes only how each process's contribution is rounded (see
:mod:`curvkit.choice`). Every process must make the same curvkit calls, in the
same order, as with any collective code.

A problem with ``data_parallel=False`` (the light problem of a training step's own
mini-batch, :meth:`curvkit.Problem.on_batch`) neither shards nor reduces.

The collectives run on the process group's device: the current CUDA device for
NCCL, the CPU for gloo. A script initialises the group itself (under
``torchrun``); ``curvkit analyze`` joins ``torchrun``'s processes with
:func:`joined`, and its ``--nproc`` starts them with :func:`launch_local`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from curvkit.errors import (
    CurvkitError,
    ProcessCrashedError,
    ProcessFailedError,
    ShardError,
    describe_error,
    first_line,
)

__all__ = [
    "broadcast_object",
    "collective_device",
    "from_first_process",
    "is_data_parallel",
    "joined",
    "launch_local",
    "launched_processes",
    "process",
    "process_seed",
    "reduce_sums",
    "shared_failures",
    "shared_seed",
]


def process() -> tuple[int, int]:
    """``(rank, world size)`` of this process: ``(0, 1)`` unless :mod:`torch.distributed` is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_data_parallel() -> bool:
    """Whether this process is one of several of an initialised :mod:`torch.distributed` group."""
    return process()[1] > 1


def collective_device(data: torch.device | None = None) -> torch.device:
    """Where the group's collectives take tensors: the data's device where the group can reduce there.

    The group's backends by device type come from
    :func:`torch.distributed.get_backend_config`: ``"cuda:nccl"`` for a group
    initialised without naming a backend on a machine with CUDA (torch 2.13;
    ``"cpu:gloo,cuda:nccl"`` in older versions), whose
    :func:`~torch.distributed.get_backend` says only ``"undefined"``;
    ``"cpu:gloo,cuda:gloo"`` for ``"gloo"``. Data are reduced on their own device
    where the group has a backend for its type (CUDA data on their GPU, by NCCL
    or gloo, without a copy through the host); otherwise on the CPU where it has
    a CPU backend, else on the current CUDA device (a group of NCCL alone).
    """
    types = {part.split(":")[0] for part in dist.get_backend_config().split(",")}
    if data is not None and data.type in types:
        return (
            data
            if data.type != "cuda" or data.index is not None
            else torch.device("cuda", torch.cuda.current_device())
        )
    if "cpu" in types:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def reduce_sums(local_sum: Any, local_count: float, device: torch.device | None = None) -> tuple[Any, float]:
    """The sums and counts of every process, added: the data-parallel reduction point.

    ``local_sum`` is what :meth:`curvkit.Problem.batch_sums` returns: a tensor, a
    number, ``None``, or a tuple or list of them (nested). In one process it is
    returned as is. In several, two all-reduces (sums) give every process the
    same totals: one of the counts in float64 (with the number of entries, and
    its square, to check that the processes agree on it), one per dtype of the
    tensors' concatenation (numbers as float64 tensors).

    Args:
        local_sum: This process's sums.
        local_count: This process's count.
        device: The data's device (the problem's), which decides the collectives'
            (:func:`collective_device`); ``None``: the first tensor's. Every
            process, and a failed one joining (:func:`shared_failures`), must
            reduce on the same, so the problem's is passed where there is one.

    Raises:
        CurvkitError: The processes' sums differ in shape (their number of
            entries), which a bug in an estimator would cause; every process raises.
        ProcessFailedError: Another process's share of the pass failed.
    """
    rank, size = process()
    if size == 1:
        return local_sum, local_count
    leaves: list[Any] = []
    rebuild = _flatten(local_sum, leaves)
    if device is None:
        device = next((leaf.device for leaf in leaves if isinstance(leaf, Tensor)), None)
    device = collective_device(device)
    tensors = [
        torch.tensor(float(leaf), dtype=torch.float64, device=device) if _is_number(leaf) else leaf
        for leaf in leaves
        if leaf is not None
    ]
    entries = sum(t.numel() for t in tensors)
    count, agree = _reduce_header(float(local_count), entries, size, device)
    if not agree:
        raise CurvkitError(
            f"the processes' data sums differ in size (process {rank}: {entries} entries): each process "
            "must compute the same quantity on its shard"
        )
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    reduced: dict[int, Tensor] = {}
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1).to(device) for t in group])
        dist.all_reduce(flat)
        for t, part in zip(group, flat.split([t.numel() for t in group])):
            reduced[id(t)] = part.reshape(t.shape).to(t.device)
    totals = iter(reduced[id(t)] for t in tensors)
    summed = [None if leaf is None else next(totals) for leaf in leaves]
    summed = [float(new) if _is_number(old) else new for old, new in zip(leaves, summed)]
    return rebuild(iter(summed)), count


def _reduce_header(
    count: float, entries: int, size: int, device: torch.device, failure: Exception | None = None
) -> tuple[float, bool]:
    """The total count, and whether every process has ``entries`` entries, in one float64 all-reduce.

    The entries (fewer than ``2^40``) are split as ``e = a 2^20 + b`` with ``a``
    and ``b`` below ``2^20``, and ``a``, ``a^2``, ``b``, ``b^2`` are summed with
    the count: the processes agree iff ``W sum(a^2) = (sum a)^2`` and the same
    for ``b`` (equality in the Cauchy-Schwarz inequality). The sums are integers
    below ``2^53`` for fewer than 8,192 processes, so float64 holds them exactly
    and the comparison is made in Python integers. Every process decides from
    the same sums, so all raise or none does. The last entry counts the
    processes whose share failed (``failure``, :func:`shared_failures`): where one
    did, every process learns it here and all end (:func:`_end_together`).
    """
    high, low = divmod(entries, 2**20)
    header = torch.tensor(
        [count, high, high**2, low, low**2, float(failure is not None)], dtype=torch.float64, device=device
    )
    dist.all_reduce(header)
    total, a, a2, b, b2, failures = header.tolist()
    if failures:
        _end_together(failure)
    return total, size * int(a2) == int(a) ** 2 and size * int(b2) == int(b) ** 2


@contextlib.contextmanager
def shared_failures(device: torch.device | None = None) -> Iterator[None]:
    """Around a process's own share of a data pass: a failure there ends every process, with its message.

    In a data-parallel run the processes meet next at the reduction of the pass
    (:func:`reduce_sums`), where a process whose share raised (a bad batch, an
    empty shard: what its data alone causes) would never arrive, leaving the
    others waiting in the collective. Here it arrives with its failure instead:
    it joins the reduction's first all-reduce saying so, every process learns
    it there, and all end together: the failed ones with their own exception,
    the others with a :class:`~curvkit.errors.ProcessFailedError` carrying the
    first failed process's message (which process 0, the one that reports,
    prints), or a :class:`~curvkit.errors.ProcessCrashedError` where that was no
    curvkit error. In one process, or outside a data-parallel run, it does nothing.
    ``device`` is the one the pass's reduction is given (:func:`reduce_sums`).
    Every process must meet a reduction after the block: a pass over the data
    has one; code without one (a check) ends with ``reduce_sums(None, 0, device)``.
    A failure already shared (by a pass inside this one, or another process's, learnt
    there) is not shared again.
    """
    try:
        yield
    except Exception as exc:
        # shared already: another process's failure learnt here, or this one's by an inner pass
        learnt = isinstance(exc, ProcessFailedError | ProcessCrashedError)
        shared = learnt or getattr(exc, "_curvkit_shared", False)
        if is_data_parallel() and not shared:
            exc._curvkit_shared = True  # type: ignore[attr-defined]
            _reduce_header(0.0, 0, process()[1], collective_device(device), failure=exc)  # joins the others
        raise


def _end_together(failure: Exception | None) -> None:
    """Every process's failure (``None`` where there is none), gathered; a process with a ``failure``
    returns (to re-raise it), one without raises the first process's.

    A curvkit error (said on purpose: bad data, an empty shard) becomes a
    :class:`ProcessFailedError` with its message; anything else (a bug, memory
    exhausted) a :class:`ProcessCrashedError`, which is no curvkit error, so that
    no process takes it for one it may go on after. The message names the failed
    process once: ``"process r of W: "`` is put before it, unless it names the
    process already (a :class:`~curvkit.errors.ShardError`).
    """
    rank, size = process()
    own = None
    if failure is not None:
        said = isinstance(failure, CurvkitError)
        message = first_line(failure) if said else describe_error(failure, first_line(failure))
        if not isinstance(failure, ShardError):
            message = f"process {rank} of {size}: {message}"
        own = (said, message)
    failures: list[tuple[bool, str] | None] = [None] * size
    dist.all_gather_object(failures, own)
    if failure is not None:
        return
    first = next(r for r, failed in enumerate(failures) if failed is not None)
    said, message = failures[first]  # type: ignore[misc]
    kind = ProcessFailedError if said else ProcessCrashedError
    raise kind(message, first)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _flatten(value: Any, leaves: list[Any]) -> Callable[[Any], Any]:
    """Appends ``value``'s leaves (tensors, numbers, ``None``) to ``leaves``; returns the inverse.

    The inverse takes an iterator over new leaves, in the same order, and
    rebuilds the nesting of tuples and lists.
    """
    if isinstance(value, tuple | list):
        parts = [_flatten(v, leaves) for v in value]
        kind = type(value)
        return lambda it: kind(part(it) for part in parts)
    if value is None or isinstance(value, Tensor) or _is_number(value):
        leaves.append(value)
        return lambda it: next(it)
    raise CurvkitError(f"a data sum must hold tensors, numbers or None, not {type(value).__name__}")


def shared_seed() -> int:
    """A fresh seed (from the operating system), the same in every process: drawn by process 0, broadcast.

    What ``seed=None`` means for a Monte-Carlo estimator, a probe generator or a
    random direction; in one process simply a fresh seed.
    """
    return from_first_process(torch.Generator().seed() % 2**62)


def process_seed(seed: int, data_parallel: bool = True) -> int:
    """The seed of this process's share of a Monte-Carlo draw over the data: ``seed`` in process 0.

    Each process draws the samples of its own shard (a Fisher's sampled targets),
    so the processes need independent streams: process ``r`` seeds its generator
    with ``seed + r * 0x9E3779B97F4A7C15`` (mod ``2**63``; the golden-ratio
    increment keeps the streams of nearby seeds apart). Process 0, and one
    process, or ``data_parallel=False``, use ``seed`` itself, so that a run on one
    process is unchanged. The estimator is then another draw of the same
    distribution: equal to the one-process operator in expectation, not to rounding.
    """
    rank = process()[0] if data_parallel else 0
    return (int(seed) + rank * 0x9E3779B97F4A7C15) % 2**63


def from_first_process(value: int) -> int:
    """Process 0's ``value`` in every process (an integer, e.g. an index); ``value`` in one process.

    For what processes would otherwise draw apart and could draw differently: a
    seed from the operating system (:func:`shared_seed`).
    """
    if not is_data_parallel():
        return value
    carrier = torch.tensor([value], dtype=torch.int64, device=collective_device())
    dist.broadcast(carrier, src=0)
    return int(carrier.item())


def broadcast_object(value: Any) -> Any:
    """Process 0's ``value`` (any picklable object) in every process; ``value`` in one process.

    For what process 0 alone knows: the results a resumed run already holds in
    the file only process 0 opens.
    """
    if not is_data_parallel():
        return value
    carrier = [value]
    dist.broadcast_object_list(carrier, src=0)
    return carrier[0]


def launched_processes() -> int:
    """The number of processes ``torchrun`` started for this job (its ``WORLD_SIZE``), 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def joined(device: str | torch.device = "cpu") -> Iterator[tuple[int, int]]:
    """Joins, for the duration, the process group ``torchrun`` describes; yields ``(rank, world size)``.

    Under ``torchrun`` (its environment variables: ``WORLD_SIZE`` above 1,
    ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and with no group
    initialised yet, initialises one, NCCL for a CUDA ``device`` (each process
    on the GPU of its ``LOCAL_RANK``) and gloo otherwise, and destroys it on
    exit. Otherwise (one process, or a group the caller initialised) it does
    nothing. What ``curvkit analyze`` runs in.

    Raises:
        CurvkitError: A CUDA device, and fewer GPUs than processes on this machine.
    """
    if launched_processes() <= 1 or dist.is_initialized():
        yield process()
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise CurvkitError(
                f"process {local} of this machine needs a GPU of its own, but there are "
                f"{torch.cuda.device_count()}: start at most that many processes per machine"
            )
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield process()
    finally:
        dist.destroy_process_group()


def launch_local(processes: int, command: list[str]) -> int:
    """Runs ``command`` in ``processes`` processes on this machine, as ``torchrun --standalone`` would.

    The processes are started by torch's elastic launcher (what ``torchrun``
    runs), with a rendezvous on a free local port and no restarts, each with
    the environment ``torchrun`` gives (``RANK``, ``WORLD_SIZE``, ...), and
    ``OMP_NUM_THREADS`` set to the CPU cores over the processes unless it is set
    already (``torchrun`` sets 1). Their output goes where this process's goes.
    A process that fails, or Ctrl-C, ends them all; the launcher's own report
    of it is silenced, since the processes report their errors themselves
    (``curvkit analyze``: process 0, in one line).

    Args:
        processes: How many (``>= 2``).
        command: The program and its arguments, e.g. ``[sys.executable, "-m", "curvkit.cli.main", ...]``.

    Returns:
        The exit status: 0, or the first failed process's (130 when interrupted).
    """
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    for name in list(logging.root.manager.loggerDict):  # the launcher's and its agent's, made at import
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
    )
    try:
        elastic_launch(config, command[0])(*command[1:])
    except ChildFailedError as exc:
        failure = exc.get_first_failure()[1]
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -N: killed by signal N
    except SignalException as exc:  # Ctrl-C or SIGTERM: the launcher ended the processes
        return 128 + int(exc.sigval)
    except KeyboardInterrupt:
        return 130
    return 0
