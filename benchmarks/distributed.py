"""Data-parallel speed-up: the CNN problem's Hessian products and top-5 eigenvalues on 2 gloo processes vs 1.

``python -m benchmarks --only distributed`` (the goal: at least 1.6x on this 2-core
machine). Each measurement is a fresh run of this module's worker
(``python -m benchmarks.distributed worker OUT``), of three kinds taking turns, so
that a drift of the machine's speed hits all: one process on all the cores
(``OMP_NUM_THREADS`` = cores: torch's intra-op threads), one process on one
thread, and two processes started by :func:`curvkit.distributed.launch_local`,
cores / 2 threads each.
The worker builds the ``cnn`` problem of :mod:`benchmarks.problems` (256
CIFAR-shaped samples, in batches of 64: four in one process, two in each of
two), times :data:`PRODUCTS` Hessian-vector products (after warm-up ones) and one
top-5 Lanczos run, and process 0 writes the times as JSON.
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


def worker(out: Path) -> None:
    """One run: the products and the eigen-solve, timed; process 0 writes ``out``."""
    with curvkit.distributed.joined() as (rank, size):
        bench = make_cnn(0)
        problem = curvkit.Problem(
            bench.model, "cross_entropy", (bench.inputs, bench.targets), batch_size=BATCH
        )
        H = curvkit.curvature("hessian", problem, strategy="reverse")
        v = torch.randn(problem.dim, generator=torch.Generator().manual_seed(0))
        for _ in range(3):  # the determinism probe, the kept graphs
            H @ v
        products = []
        for _ in range(PRODUCTS):
            start = time.perf_counter()
            H @ v
            products.append(time.perf_counter() - start)
        start = time.perf_counter()
        top = curvkit.eigenvalues(H, k=5, seed=0)
        eigen = time.perf_counter() - start
        if rank == 0:
            record = {
                "processes": size,
                "threads": torch.get_num_threads(),
                "product_s": statistics.median(products),
                "eigen_s": eigen,
                "eigen_matvecs": int(top.matvecs),
                "values": [float(x) for x in top.values],
            }
            out.write_text(json.dumps(record))


KINDS = (("one process, all cores", 1, None), ("one process, one thread", 1, 1), ("two processes", 2, None))
"""(name, processes, threads per process: ``None`` for the cores over the processes)."""


@dataclass
class DistributedRun:
    """One worker run: process 0's figures."""

    kind: str
    processes: int
    threads: int
    product_s: float
    eigen_s: float
    eigen_matvecs: int
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

    def median(self, kind: str, what: str) -> float:
        """The median of ``what`` (``"product_s"``, ``"eigen_s"``) over the runs of ``kind``."""
        return statistics.median(getattr(r, what) for r in self.runs if r.kind == kind)

    def speedup(self, baseline: str, what: str) -> float:
        """How much faster two processes are than ``baseline`` (medians)."""
        return self.median(baseline, what) / self.median("two processes", what)


def _measure(kind: str, processes: int, threads: int) -> DistributedRun:
    """One worker run on ``processes`` processes of ``threads`` threads each."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "record.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        command = [sys.executable, "-m", "benchmarks.distributed", "worker", str(out)]
        if processes > 1:
            command = [sys.executable, "-c", _LAUNCH, str(processes), *command]
        done = subprocess.run(command, env=env, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{kind}: the worker failed ({done.returncode}): {done.stderr[-500:]}")
        record = json.loads(out.read_text())
        return DistributedRun(kind=kind, **record)


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
        product = res.speedup("one process, all cores", "product_s")
        eigen = res.speedup("one process, all cores", "eigen_s")
        per_thread = res.speedup("one process, one thread", "product_s")
        goals.append(
            Goal(
                "2 gloo processes at least 1.6x faster than 1 process (all cores)",
                res.name,
                product >= 1.6,
                f"Hessian-vector product {product:.2f}x, top-5 eigenvalues {eigen:.2f}x (against one "
                f"process on one thread: {per_thread:.2f}x), medians of {len(res.runs) // len(KINDS)} runs "
                f"each on {res.cores} cores",
            )
        )
        reference = [r for r in res.runs if r.processes == 1][0].values
        worst = max(
            abs(a - b) / abs(a) for r in res.runs if r.processes > 1 for a, b in zip(reference, r.values)
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
    "run a fresh process (or two, started as `torchrun --standalone` does), the three kinds taking turns.",
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
            ms = [1e3 * r.product_s for r in runs]
            speedup = (
                ""
                if kind == "two processes"
                else f"{res.speedup(kind, 'product_s'):.2f}x, {res.speedup(kind, 'eigen_s'):.2f}x"
            )
            eigen = statistics.median(r.eigen_s for r in runs)
            out.append(
                f"| {kind} | {runs[0].processes} x {runs[0].threads} | {statistics.median(ms):.1f} "
                f"[{min(ms):.1f}, {max(ms):.1f}] | {eigen:.2f} | {speedup} |"
            )
        out.append("")
    return out


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "worker":
        worker(Path(sys.argv[2]))
        return
    for line in render_distributed(run_distributed(None, quick="--quick" in sys.argv)):
        print(line)


if __name__ == "__main__":
    main()
