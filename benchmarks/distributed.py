"""Data-parallel speed-up: the CNN problem's Hessian products and top-5 eigenvalues on 2 gloo processes vs 1.

``python -m benchmarks --only distributed`` (the goal: at least 1.6x on this 2-core
machine). Each measurement is a fresh run of this module's worker
(``python -m benchmarks.distributed worker OUT``), of three kinds taking turns, so
that a drift of the machine's speed hits all: one process on all the cores
(``OMP_NUM_THREADS`` = cores: torch's intra-op threads), one process on one
thread, two processes started by :func:`curvkit.distributed.launch_local`,
cores / 2 threads each, and the ceiling of those: two processes at once, each
alone on its half of the data (no process group, nothing reduced), whose
slower one sets the pace a data-parallel run could at best keep on this
machine (the cores it shares, its memory bandwidth), communication aside.
The worker builds the ``cnn`` problem of :mod:`benchmarks.problems` (256
CIFAR-shaped samples, in batches of 64: four in one process, two in each of
two), times :data:`PRODUCTS` Hessian-vector products (after warm-up ones) and one
top-5 Lanczos run (not in the ceiling's runs: each process would find its
half's eigenvalues), and process 0 writes the times as JSON.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import curvkit
from benchmarks.hvp import Goal, ProblemRecord
from benchmarks.problems import make_cnn
from benchmarks.timing import OtherLoad, percent

PRODUCTS = 20
"""Timed Hessian-vector products per run."""

BATCH = 64
"""Batch size of the problem's passes over the data."""


def worker(out: Path, half: int | None = None) -> None:
    """One run: the products and the eigen-solve, timed; process 0 writes ``out``.

    With ``half`` (0 or 1), a process alone on that half of the samples, timing
    the products only: one of the ceiling's pair (:func:`_measure_alone`).
    """
    with curvkit.distributed.joined() as (rank, size):
        bench = make_cnn(0)
        data = (bench.inputs, bench.targets)
        if half is not None:
            share = bench.num_samples // 2
            data = tuple(x[half * share : (half + 1) * share] for x in data)
        problem = curvkit.Problem(bench.model, "cross_entropy", data, batch_size=BATCH)
        H = curvkit.curvature("hessian", problem, strategy="reverse")
        v = torch.randn(problem.dim, generator=torch.Generator().manual_seed(0))
        for _ in range(3):  # the determinism probe, the kept graphs
            H @ v
        products = []
        for _ in range(PRODUCTS):
            start = time.perf_counter()
            H @ v
            products.append(time.perf_counter() - start)
        record = {
            "processes": size,
            "threads": torch.get_num_threads(),
            "product_s": statistics.median(products),
            "eigen_s": None,
            "eigen_matvecs": None,
            "values": [],
        }
        if half is None:
            start = time.perf_counter()
            top = curvkit.eigenvalues(H, k=5, seed=0)
            record["eigen_s"] = time.perf_counter() - start
            record["eigen_matvecs"] = int(top.matvecs)
            record["values"] = [float(x) for x in top.values]
        if rank == 0:
            out.write_text(json.dumps(record))


ALL_CORES = "one process, all cores"
ONE_THREAD = "one process, one thread"
TWO = "two processes"
CEILING = "two processes alone on their halves"
KINDS = ((ALL_CORES, 1, None), (ONE_THREAD, 1, 1), (TWO, 2, None), (CEILING, 2, None))
"""(name, processes, threads per process: ``None`` for the cores over the processes)."""


@dataclass
class DistributedRun:
    """One worker run: process 0's figures."""

    kind: str
    processes: int
    threads: int
    product_s: float
    eigen_s: float | None
    eigen_matvecs: int | None
    values: list[float] = field(default_factory=list)


@dataclass
class DistributedResult(ProblemRecord):
    """The runs of every kind on one problem, in the order they ran."""

    cores: int = 1
    runs: list[DistributedRun] = field(default_factory=list)
    other_load: float | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dictionary."""
        return asdict(self)

    def median(self, kind: str, what: str) -> float | None:
        """The median of ``what`` (``"product_s"``, ``"eigen_s"``) over the runs of ``kind``, if measured."""
        values = [getattr(r, what) for r in self.runs if r.kind == kind]
        return statistics.median(values) if values and None not in values else None

    def speedup(self, baseline: str, what: str, faster: str = TWO) -> float | None:
        """How much faster ``faster`` is than ``baseline`` (medians), if both were measured."""
        slow, fast = self.median(baseline, what), self.median(faster, what)
        return None if slow is None or fast is None else slow / fast


def _measure(kind: str, processes: int, threads: int) -> DistributedRun:
    """One worker run on ``processes`` processes of ``threads`` threads each."""
    if kind == CEILING:
        return _measure_alone(threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "record.json"
        command = [sys.executable, "-m", "benchmarks.distributed", "worker", str(out)]
        if processes > 1:
            command = [sys.executable, "-c", _LAUNCH, str(processes), *command]
        _wait(kind, _start(command, threads))
        return DistributedRun(kind=kind, **json.loads(out.read_text()))


def _measure_alone(threads: int) -> DistributedRun:
    """The ceiling: two workers at once, each alone on its half; the slower one's median product.

    A data-parallel run goes at its slower process's pace, and this pair does
    what its processes compute without the reduction: their times bound what
    the reduction could win back.
    """
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"record{half}.json" for half in (0, 1)]
        workers = [
            _start([sys.executable, "-m", "benchmarks.distributed", "worker", str(out), str(half)], threads)
            for half, out in enumerate(outs)
        ]
        for w in workers:
            _wait(CEILING, w)
        records = [json.loads(out.read_text()) for out in outs]
    slower = max(records, key=lambda r: r["product_s"])
    return DistributedRun(kind=CEILING, **{**slower, "processes": 2})


def _start(command: list[str], threads: int) -> subprocess.Popen:
    """Starts ``command``, ``OMP_NUM_THREADS`` = ``threads`` (torch's intra-op threads per process)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(kind: str, process: subprocess.Popen) -> None:
    """Waits for a worker (or the launcher); its error output's end if it failed."""
    _, err = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{kind}: the worker failed ({process.returncode}): {err[-500:]}")


_LAUNCH = "import sys, curvkit; sys.exit(curvkit.distributed.launch_local(int(sys.argv[1]), sys.argv[2:]))"
"""Launches the worker on several processes (OMP_NUM_THREADS, already set, is kept)."""


def run_distributed(problems: Sequence[str] | None, quick: bool) -> list[DistributedResult]:
    """:data:`ROUNDS` rounds (1 with ``quick``), each a run of every kind, on the ``cnn`` problem."""
    if problems is not None and "cnn" not in problems:
        return []
    bench = make_cnn(0)
    cores = os.cpu_count() or 1
    res = DistributedResult("cnn", bench.description, bench.dim, bench.num_samples, cores=cores)
    load = OtherLoad().start()
    for _ in range(1 if quick else ROUNDS):
        for kind, processes, threads in KINDS:
            print(f"[cnn] distributed: {kind}", file=sys.stderr)
            res.runs.append(_measure(kind, processes, threads or max(1, cores // processes)))
    res.other_load = load.stop()
    return [res]


ROUNDS = 5
"""Rounds of the three kinds of run."""


def evaluate_distributed_goals(results: Sequence[DistributedResult]) -> list[Goal]:
    """Two processes at least 1.6x faster than one process on all the cores; the eigenvalues the same."""
    goals = []
    for res in results:
        product = res.speedup(ALL_CORES, "product_s")
        eigen = res.speedup(ALL_CORES, "eigen_s")
        per_thread = res.speedup(ONE_THREAD, "product_s")
        ceiling = res.speedup(ALL_CORES, "product_s", faster=CEILING)
        bound = "" if ceiling is None else f"; two processes without the reduction: {ceiling:.2f}x"
        goals.append(
            Goal(
                "2 gloo processes at least 1.6x faster than 1 process (all cores)",
                res.name,
                product >= 1.6,
                f"Hessian-vector product {product:.2f}x, top-5 eigenvalues {eigen:.2f}x (against one "
                f"process on one thread: {per_thread:.2f}x){bound}, medians of "
                f"{sum(r.kind == TWO for r in res.runs)} runs each on {res.cores} cores",
            )
        )
        reference = [r for r in res.runs if r.processes == 1][0].values
        worst = max(
            abs(a - b) / abs(a) for r in res.runs if r.kind == TWO for a, b in zip(reference, r.values)
        )
        goals.append(
            Goal(
                "2 processes find the eigenvalues of 1 (float32)",
                res.name,
                worst < 1e-4,
                f"largest relative difference of the top 5: {worst:.1e}",
            )
        )
    return goals


DISTRIBUTED_READING = [
    "## Data-parallel: two gloo processes against one",
    "",
    "`python -m benchmarks --only distributed` (see `benchmarks/distributed.py`): the `cnn` problem "
    f"(float32, batches of {BATCH}: four in one process, two in each of two), {PRODUCTS} Hessian-vector "
    "products (`strategy='reverse'`, after warm-up ones) and one top-5 Lanczos run per worker run; each "
    "run a fresh process (or two, started as `torchrun --standalone` does), the kinds taking turns. "
    f"*{CEILING}*: two processes at once, each with its half of the samples and no process group (the "
    "slower one's median product): what two processes compute on this machine without the reduction, "
    "the most a data-parallel run could reach; its speed-up column is its own over the other runs.",
    "",
]


def render_distributed(results: Sequence[DistributedResult]) -> list[str]:
    """The section as Markdown lines."""
    out = list(DISTRIBUTED_READING)
    for res in results:
        load = percent(res.other_load)
        out += [
            f"### {res.name}: {res.description}",
            "",
            f"P = {res.params:,} parameters, {res.cores} cores. CPU used by other processes meanwhile: "
            f"{load}.",
            "",
            "| run | processes x threads | ms per product, median [min, max] | top-5 eigenvalues, s | "
            "speed-up of two processes (product, eigenvalues) |",
            "|---|---|---|---|---|",
        ]
        for kind, _, _ in KINDS:
            runs = [r for r in res.runs if r.kind == kind]
            if not runs:  # recorded before the kind was measured
                continue
            ms = [1e3 * r.product_s for r in runs]
            eigen = res.median(kind, "eigen_s")
            out.append(
                f"| {kind} | {runs[0].processes} x {runs[0].threads} | {statistics.median(ms):.1f} "
                f"[{min(ms):.1f}, {max(ms):.1f}] | {'-' if eigen is None else f'{eigen:.2f}'} | "
                f"{_speedup_cell(res, kind)} |"
            )
        out.append("")
    return out


def _speedup_cell(res: DistributedResult, kind: str) -> str:
    """Two processes against ``kind``; for the ceiling, its own speed-up over the one-process runs."""
    if kind == TWO:
        return ""
    if kind == CEILING:
        over = [(name, res.speedup(name, "product_s", faster=CEILING)) for name in (ALL_CORES, ONE_THREAD)]
        return "its own: " + ", ".join(f"{x:.2f}x over {name}" for name, x in over if x is not None)
    eigen = res.speedup(kind, "eigen_s")
    return f"{res.speedup(kind, 'product_s'):.2f}x, " + ("-" if eigen is None else f"{eigen:.2f}x")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "worker":  # worker OUT [HALF]
        worker(Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
        return
    for line in render_distributed(run_distributed(None, quick="--quick" in sys.argv)):
        print(line)


if __name__ == "__main__":
    main()
