"""The Hessian-vector-product rows: gradient, HVP per method, matmat, and the goals.

For each problem:

* ``gradient``: one full-data loss and gradient, the unit of cost;
* ``hvp``: one product ``H @ v`` per method (curvkit, raw PyTorch, peers), a
  fresh random ``v`` in every round, timed interleaved with the gradient; and
  the relative error of each method's product against curvkit's on a fixed
  check vector;
* ``matmat``: ``K = 10`` products at once against 10 separate products.

Every method differentiates the same full-data mean cross-entropy (see
:mod:`benchmarks.problems` and :mod:`benchmarks.peers`).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from torch import Tensor

from benchmarks.methods import (
    CURVKIT_HESSIAN,
    CURVKIT_VARIANTS,
    RAW_METHODS,
    Method,
    MethodUnavailableError,
    curvkit_hessian,
    gradient,
    looped,
)
from benchmarks.peers import PEER_METHODS, curvlinops_hessian
from benchmarks.problems import BenchProblem
from benchmarks.timing import Timing, time_interleaved

__all__ = [
    "HVP_METHODS",
    "MATMAT_METHODS",
    "Goal",
    "HVPRow",
    "MatmatRow",
    "ProblemResult",
    "Row",
    "evaluate_goals",
    "measure",
    "run_hvp",
    "run_matmat",
]

HVP_METHODS: tuple[Method, ...] = (CURVKIT_HESSIAN, *CURVKIT_VARIANTS, *RAW_METHODS, *PEER_METHODS)
"""The HVP rows, curvkit's default (the reference for agreement) first."""

K = 10
CHECK_SEED, TIMING_SEED = 1234, 0
CURVKIT_WITHIN = 1.10  # goal: curvkit's HVP within 10% of the fastest raw PyTorch HVP
MATMAT_SPEEDUP_MLP = 2.0  # goal: matmat(K=10) at least 2x faster than 10 matvecs on the MLP


MATMAT_LOOP = Method(
    f"curvkit {K} x H @ v",
    "curvkit",
    looped(curvkit_hessian),
    "K separate `H @ v`, graph kept (the baseline)",
)
MATMAT_METHODS: tuple[Method, ...] = (
    MATMAT_LOOP,
    Method(
        f"curvkit H.matmat (K={K})", "curvkit", curvkit_hessian, "`H.matmat(M)`, default options (`auto`)"
    ),
    Method(
        "curvkit H.matmat, batched-reverse",
        "curvkit",
        partial(curvkit_hessian, strategy="batched-reverse"),
        "`strategy='batched-reverse'`: one vmapped backward pass through the kept graph",
    ),
    Method(
        "curvkit H.matmat, reverse",
        "curvkit",
        partial(curvkit_hessian, strategy="reverse"),
        "`strategy='reverse'`: K backward passes through the kept graph",
    ),
    Method(
        "curvkit H.matmat, forward-over-reverse",
        "curvkit",
        partial(curvkit_hessian, strategy="forward-over-reverse"),
        "`strategy='forward-over-reverse'`: vmapped jvp of grad, no kept graph",
    ),
    Method(
        f"curvlinops op @ M (K={K})",
        "peer",
        curvlinops_hessian,
        "`HessianLinearOperator @ M`, M of shape [P, K]",
    ),
)
"""The matmat rows; each is compared with the first, K separate curvkit products."""


@dataclass
class Row:
    """One method on one problem: its timing and agreement (``None`` fields when skipped)."""

    method: str
    family: str
    note: str
    median_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    rel_error_vs_curvkit: float | None = None
    skipped: str | None = None

    def fill(self, timing: Timing, output: Tensor, reference: Tensor | None) -> None:
        """Record a method's timing and its product's relative error against ``reference``."""
        self.median_ms = timing.median_ms
        self.min_ms, self.max_ms = timing.spread_ms
        if reference is not None:
            error = (output - reference).norm() / reference.norm().clamp_min(1e-30)
            self.rel_error_vs_curvkit = error.item()


@dataclass
class HVPRow(Row):
    """A one-vector product, relative to the gradient and to the fastest raw PyTorch product."""

    ratio_to_gradient: float | None = None
    ratio_to_fastest_raw: float | None = None


@dataclass
class MatmatRow(Row):
    """A ``K``-column product, and its speed-up over ``K`` separate curvkit products."""

    per_vector_ms: float | None = None
    speedup_vs_loop: float | None = None


@dataclass
class Goal:
    """A stated performance goal and whether this run met it."""

    goal: str
    problem: str
    met: bool | None
    detail: str


@dataclass
class ProblemRecord:
    """What every per-problem record of the benchmarks starts with: which problem, and its size."""

    name: str
    description: str
    params: int
    samples: int


@dataclass
class ProblemResult(ProblemRecord):
    """Everything measured on one problem."""

    gradient_ms: float | None = None
    other_load: float | None = None
    hvp: list[HVPRow] = field(default_factory=list)
    matmat: list[MatmatRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-ready dictionary."""
        return asdict(self)


def measure(
    problem: BenchProblem,
    methods: Sequence[Method],
    check: Tensor,
    inputs: Sequence[Tensor],
    repeats: int,
    warmup: int,
    extra: dict[str, Callable[[], object]] | None = None,
) -> tuple[dict[str, Timing], dict[str, Tensor], dict[str, str]]:
    """Set up each method, apply it to ``check`` (untimed), then time all interleaved.

    Args:
        problem: The problem.
        methods: The methods.
        check: Input of the untimed first product, whose results are compared.
        inputs: ``repeats + warmup`` inputs, a fresh one each round.
        repeats: Timed rounds.
        warmup: Untimed rounds.
        extra: More calls timed in the same rounds (the gradient), by name.

    Returns:
        Timings by name; each method's product of ``check``; the reason for each
        method that could not run.
    """
    products, outputs, skipped = {}, {}, {}
    for method in methods:
        try:
            product = method.make(problem)
            outputs[method.name] = product(check)
            products[method.name] = product
        except MethodUnavailableError as exc:
            skipped[method.name] = str(exc)
        except Exception as exc:  # a library failing on a model is a result, not a crash
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            skipped[method.name] = f"failed on this model: {type(exc).__name__}: {first}"
    calls: dict[str, Callable[[int], object]] = {n: (lambda r, f=f: f()) for n, f in (extra or {}).items()}
    calls |= {name: (lambda r, p=p: p(inputs[r + warmup])) for name, p in products.items()}
    timings = time_interleaved(calls, repeats, warmup)
    products.clear()  # free kept gradient graphs before the next problem
    gc.collect()
    return timings, outputs, skipped


def run_hvp(
    problem: BenchProblem, repeats: int, warmup: int = 1, methods: Sequence[Method] = HVP_METHODS
) -> tuple[float, list[HVPRow]]:
    """Gradient time and one HVP row per method, all timed interleaved.

    Args:
        problem: The problem.
        repeats: Timed rounds.
        warmup: Untimed rounds (after each method's first, checking product).
        methods: The methods; the first is the reference for the relative error.

    Returns:
        The gradient's median time in ms, and the rows.
    """
    check = problem.random_vectors(1, CHECK_SEED)[0]
    vectors = problem.random_vectors(repeats + warmup, TIMING_SEED)
    extra = {"gradient": gradient(problem)}
    timings, outputs, skipped = measure(problem, methods, check, vectors, repeats, warmup, extra)
    grad_ms = timings["gradient"].median_ms
    raw = [timings[m.name].median_ms for m in methods if m.family == "raw torch" and m.name in timings]
    fastest_raw = min(raw, default=None)
    reference = outputs.get(methods[0].name)
    rows = []
    for m in methods:
        row = HVPRow(m.name, m.family, m.note, skipped=skipped.get(m.name))
        if m.name in timings:
            row.fill(timings[m.name], outputs[m.name], reference)
            row.ratio_to_gradient = row.median_ms / grad_ms
            row.ratio_to_fastest_raw = row.median_ms / fastest_raw if fastest_raw else None
        rows.append(row)
    return grad_ms, rows


def run_matmat(
    problem: BenchProblem, repeats: int, warmup: int = 1, methods: Sequence[Method] = MATMAT_METHODS
) -> list[MatmatRow]:
    """``K``-column products against ``K`` separate curvkit products (the first method).

    The relative error of each row is against the first method's product on a
    fixed check matrix.
    """
    gen = torch.Generator().manual_seed(CHECK_SEED)
    check = torch.randn(problem.dim, K, generator=gen)
    gen.manual_seed(TIMING_SEED)
    matrices = [torch.randn(problem.dim, K, generator=gen) for _ in range(repeats + warmup)]
    timings, outputs, skipped = measure(problem, methods, check, matrices, repeats, warmup)
    loop = timings.get(methods[0].name)
    reference = outputs.get(methods[0].name)
    rows = []
    for m in methods:
        row = MatmatRow(m.name, m.family, m.note, skipped=skipped.get(m.name))
        if m.name in timings:
            row.fill(timings[m.name], outputs[m.name], reference)
            row.per_vector_ms = row.median_ms / K
            row.speedup_vs_loop = loop.median_ms / row.median_ms if loop else None
        rows.append(row)
    return rows


def _row(rows: Sequence[Row], name: str) -> Row | None:
    return next((r for r in rows if r.method == name and r.median_ms is not None), None)


def evaluate_goals(results: Sequence[ProblemResult]) -> list[Goal]:
    """The issue's goals, met or not, per problem."""
    goals = []
    for res in results:
        curvkit_row = _row(res.hvp, CURVKIT_HESSIAN.name)
        if res.hvp:
            ratio = curvkit_row.ratio_to_fastest_raw if curvkit_row else None
            goals.append(
                Goal(
                    "curvkit HVP within 10% of the fastest raw torch HVP",
                    res.name,
                    None if ratio is None else ratio <= CURVKIT_WITHIN,
                    "no measurement"
                    if ratio is None
                    else f"ratio {ratio:.3f} (goal <= {CURVKIT_WITHIN:.2f})",
                )
            )
        matmat_row = _row(res.matmat, MATMAT_METHODS[1].name)
        if res.matmat:
            speedup = matmat_row.speedup_vs_loop if matmat_row else None
            need = MATMAT_SPEEDUP_MLP if res.name == "mlp" else 1.0
            what = (
                f"matmat(K={K}) >= {need:g}x faster than {K} matvecs"
                if need > 1
                else f"matmat(K={K}) never slower than {K} matvecs"
            )
            goals.append(
                Goal(
                    what,
                    res.name,
                    None if speedup is None else speedup >= need,
                    "no measurement" if speedup is None else f"speed-up {speedup:.3f}x (goal >= {need:g}x)",
                )
            )
    return goals
