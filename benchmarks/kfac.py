"""The KFAC rows: factor computation and inverse application against the peers.

For the ``mlp`` and the ``cnn`` (``python -m benchmarks --only kfac``):

* ``factors``: computing the Kronecker factors over the data (curvkit ``kfac``
  and ``ekfac`` with ``fisher_type="type-2"``, and ``"mc"`` with one sample;
  curvlinops ``KFACLinearOperator`` / ``EKFACLinearOperator`` with the same
  types; BackPACK's ``KFLR`` (exact type-2 factors) and ``KFAC`` (one
  Monte-Carlo sample)), as a multiple of one gradient;
* ``inverse``: one product ``(K + d I)^-1 v`` with the inverse set up beforehand
  (curvkit ``K.inverse(d)``, curvlinops ``KFACInverseLinearOperator``).

Agreement, in float64 on a copy of the problem, is that of the products ``K v``
(and inverse products), which do not depend on how a library splits a scale
between the two factors; Monte-Carlo rows draw independent targets and are not
compared. BackPACK stores factors, not an operator, so its rows are timed only.
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from torch import Tensor

import curvkit
from benchmarks.ggn import CompareRow, CurvatureMethod, double_copy, slowest_row_goal, table_rows
from benchmarks.ggn import float64_agreement as compare
from benchmarks.hvp import Goal, ProblemRecord, measure
from benchmarks.methods import Product, gradient
from benchmarks.peers import _quiet, _require
from benchmarks.problems import BenchProblem

__all__ = ["FACTOR_METHODS", "INVERSE_METHODS", "KFACResult", "evaluate_kfac_goals", "run_kfac"]

KFAC_PROBLEMS = ("mlp", "cnn")
DAMPING = 1e-2
CHECK_SEED, TIMING_SEED = 1234, 0


@dataclass(frozen=True)
class KFACMethod(CurvatureMethod):
    """A method of one quantity (``"type-2"`` or ``"mc"``), comparable within it.

    ``make(problem)`` returns a function of a vector that (re)computes the
    factors and returns ``K v`` (factor rows) or applies the inverse (inverse
    rows); ``sampled`` rows are not compared numerically; ``operator`` is
    ``False`` for rows that give factors but no product (BackPACK).
    """

    quantity: str = "type-2"
    operator: bool = True


def _curvkit_factors(name: str, **options: object) -> Callable[[BenchProblem], Product]:
    def make(problem: BenchProblem) -> Product:
        p = problem.curvkit_problem()

        def run(v: Tensor) -> Tensor:
            K = curvkit.curvature(name, p, **options)
            return K @ v

        return run

    return make


def _curvlinops_factors(cls_name: str, **options: object) -> Callable[[BenchProblem], Product]:
    def make(problem: BenchProblem) -> Product:
        curvlinops = _require("curvlinops")

        def run(v: Tensor) -> Tensor:
            op = getattr(curvlinops, cls_name)(
                problem.model,
                problem.criterion(),
                problem.params,
                [(problem.inputs, problem.targets)],
                check_deterministic=False,
                separate_weight_and_bias=False,
                **options,
            )
            return op @ v

        return run

    return make


def _backpack_factors(extension: str, **options: object) -> Callable[[BenchProblem], Product]:
    def make(problem: BenchProblem) -> Product:
        backpack = _require("backpack")
        extensions = _require("backpack.extensions")
        model = backpack.extend(copy.deepcopy(problem.model))
        criterion = backpack.extend(problem.criterion())
        params = [p for p in model.parameters() if p.requires_grad]

        def run(v: Tensor) -> Tensor:
            for p in params:
                p.grad = None
            with _quiet(), backpack.backpack(getattr(extensions, extension)(**options)):
                criterion(model(problem.inputs), problem.targets).backward()
            return v  # factors only: no product to compare

        return run

    return make


def _curvkit_inverse(problem: BenchProblem) -> Product:
    Kinv = curvkit.curvature("kfac", problem.curvkit_problem()).inverse(DAMPING)
    return lambda v: Kinv @ v


def _curvlinops_inverse(problem: BenchProblem) -> Product:
    curvlinops = _require("curvlinops")
    K = curvlinops.KFACLinearOperator(
        problem.model,
        problem.criterion(),
        problem.params,
        [(problem.inputs, problem.targets)],
        check_deterministic=False,
        separate_weight_and_bias=False,
        fisher_type="type-2",
    )
    inverse = curvlinops.KFACInverseLinearOperator(K, damping=DAMPING, use_exact_damping=True)
    return lambda v: inverse @ v


FACTOR_METHODS: tuple[KFACMethod, ...] = (
    KFACMethod("curvkit kfac", "curvkit", _curvkit_factors("kfac"), "`kfac`, `fisher_type='type-2'`"),
    KFACMethod(
        "curvkit ekfac", "curvkit", _curvkit_factors("ekfac"), "`ekfac` (two passes)", quantity="ekfac"
    ),
    KFACMethod(
        "curvlinops KFACLinearOperator",
        "peer",
        _curvlinops_factors("KFACLinearOperator", fisher_type="type-2"),
        "`KFACLinearOperator(..., fisher_type='type-2', separate_weight_and_bias=False)`",
    ),
    KFACMethod(
        "curvlinops EKFACLinearOperator",
        "peer",
        _curvlinops_factors("EKFACLinearOperator", fisher_type="type-2"),
        "`EKFACLinearOperator(..., fisher_type='type-2', separate_weight_and_bias=False)`",
        quantity="ekfac",
    ),
    KFACMethod(
        "BackPACK KFLR", "peer", _backpack_factors("KFLR"), "`KFLR()`: exact type-2 factors", operator=False
    ),
    KFACMethod(
        "curvkit kfac, mc (1 sample)",
        "curvkit",
        _curvkit_factors("kfac", fisher_type="mc", seed=0),
        "`kfac`, `fisher_type='mc'`",
        quantity="mc",
        sampled=True,
    ),
    KFACMethod(
        "curvlinops KFAC, mc (1 sample)",
        "peer",
        _curvlinops_factors("KFACLinearOperator", fisher_type="mc", seed=0),
        "`KFACLinearOperator(..., fisher_type='mc', mc_samples=1)`",
        quantity="mc",
        sampled=True,
    ),
    KFACMethod(
        "BackPACK KFAC (1 sample)",
        "peer",
        _backpack_factors("KFAC", mc_samples=1),
        "`KFAC(mc_samples=1)`",
        quantity="mc",
        sampled=True,
        operator=False,
    ),
)
"""Factor computation, timed whole (construction, one pass over the data, and one product)."""

INVERSE_METHODS: tuple[KFACMethod, ...] = (
    KFACMethod(
        "curvkit (K + dI)^-1 v",
        "curvkit",
        _curvkit_inverse,
        f"`kfac.inverse({DAMPING:g}) @ v` (eigenbases of the factors, set up untimed)",
        quantity="inverse",
    ),
    KFACMethod(
        "curvlinops KFACInverseLinearOperator",
        "peer",
        _curvlinops_inverse,
        f"`KFACInverseLinearOperator(K, damping={DAMPING:g}, use_exact_damping=True) @ v`",
        quantity="inverse",
    ),
)


@dataclass
class KFACResult(ProblemRecord):
    """The KFAC tables of one problem."""

    gradient_ms: float | None = None
    other_load: float | None = None
    factors: list[CompareRow] = field(default_factory=list)
    inverse: list[CompareRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-ready dictionary."""
        return asdict(self)


def run_kfac(problem: BenchProblem, repeats: int, warmup: int) -> KFACResult:
    """Factor and inverse rows on one problem (float32 timing, float64 agreement)."""
    res = KFACResult(problem.name, problem.description, problem.dim, problem.num_samples)
    check = problem.random_vectors(1, CHECK_SEED)[0]
    vectors = problem.random_vectors(repeats + warmup, TIMING_SEED)
    problem64 = double_copy(problem)
    extra = {"gradient": gradient(problem)}
    timings, outputs, skipped = measure(problem, FACTOR_METHODS, check, vectors, repeats, warmup, extra)
    res.gradient_ms = timings["gradient"].median_ms
    agreement = compare(problem64, FACTOR_METHODS, check.double())
    res.factors = table_rows(
        FACTOR_METHODS, timings, outputs, skipped, agreement, res.gradient_ms, CompareRow
    )
    timings, outputs, skipped = measure(problem, INVERSE_METHODS, check, vectors, repeats, warmup, extra)
    agreement = compare(problem64, INVERSE_METHODS, check.double())
    gradient_ms = timings["gradient"].median_ms
    res.inverse = table_rows(INVERSE_METHODS, timings, outputs, skipped, agreement, gradient_ms, CompareRow)
    del problem64
    gc.collect()
    return res


def evaluate_kfac_goals(results: Sequence[KFACResult]) -> list[Goal]:
    """The issue's goal: no curvkit row slower than the fastest peer; float64 agreement of the products."""
    goals = []
    for res in results:
        for table, what in ((res.factors, "factors"), (res.inverse, "inverse")):
            goal = slowest_row_goal(
                table, f"KFAC {what}: no curvkit row slower than the fastest peer", res.name
            )
            if goal is not None:
                goals.append(goal)
        compared = [r for r in (*res.factors, *res.inverse) if r.float64_agreement is not None]
        worst = max(compared, key=lambda r: r.float64_agreement, default=None)
        if worst is not None:
            goals.append(
                Goal(
                    "KFAC products agree in float64 to 1e-6 where conventions coincide",
                    res.name,
                    worst.float64_agreement <= 1e-6,
                    f"largest relative difference {worst.float64_agreement:.1e} ({worst.method}; "
                    f"{len(compared)} rows compared)",
                )
            )
    return goals
