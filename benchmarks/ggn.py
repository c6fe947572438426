"""The Gauss-Newton and Fisher rows: products, matmat and diagonals against the peers.

For each problem (``python -m benchmarks --only ggn``):

* ``matvec``: one product with the GGN, the exact Fisher, the Monte-Carlo Fisher
  (one sample) and the empirical Fisher, as a multiple of one gradient, with
  curvkit (the default ``strategy="auto"`` and each pinned way), curvlinops
  (``GGNLinearOperator``, ``FisherMCLinearOperator``, ``EFLinearOperator``) and
  BackPACK (``ggn_vector_product_from_plist``; the empirical Fisher from
  ``BatchGrad``'s per-sample gradients);
* ``matmat``: ``K = 10`` directions at once against 10 separate curvkit products;
* ``diagonal``: curvkit's diagonals (no products: per-sample pullbacks of the
  loss's factor) against BackPACK's ``DiagGGNExact``, ``DiagGGNMC`` and
  ``SumGradSquared``.

All rows are timed interleaved in float32 (see :mod:`benchmarks.timing`). The
agreement of each row with curvkit's row of the same quantity is measured
separately, in float64 on a copy of the problem, where the definitions coincide:
the exact Fisher of the cross-entropy *is* its GGN (so it is compared with the
GGN rows), and Monte-Carlo rows draw independent targets, so they are not
compared. Conventions are aligned per adapter and stated in the notes (BackPACK's
per-sample gradients are those of the *mean* loss, ``g_n / N``).
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

import curvkit
from benchmarks.hvp import Goal, K, ProblemRecord, Row, measure
from benchmarks.methods import Method, Product, flatten, gradient, looped
from benchmarks.peers import _quiet, _require
from benchmarks.problems import BenchProblem
from benchmarks.timing import Timing

__all__ = [
    "DIAGONAL_METHODS",
    "MATMAT_METHODS",
    "MATVEC_METHODS",
    "GGNResult",
    "GGNRow",
    "float64_agreement",
    "CompareRow",
    "evaluate_ggn_goals",
    "table_rows",
    "slowest_row_goal",
    "run_ggn",
]

GGN_GOAL = 2.5  # GGN product at most 2.5x a gradient on CPU
AGREEMENT = 1e-6  # float64 relative agreement where definitions coincide
CHECK_SEED, TIMING_SEED = 1234, 0


@dataclass(frozen=True)
class CurvatureMethod(Method):
    """A :class:`~benchmarks.methods.Method` computing one named quantity.

    Attributes:
        quantity: ``"ggn"`` (the exact Fisher of the cross-entropy included),
            ``"fisher-mc"`` or ``"empirical-fisher"``; rows of one quantity are
            compared with each other.
        sampled: Monte-Carlo: not compared numerically (independent draws).
        headline: A default-settings row, held to the goals (pinned strategies
            and loops of separate products are context).
    """

    quantity: str = "ggn"
    sampled: bool = False
    headline: bool = True


# ------------------------------------------------------------------- curvkit
def curvkit_product(name: str, **options: object) -> Callable[[BenchProblem], Product]:
    """``A @ x`` for ``curvkit.curvature(name, ...)`` (one operator, set up untimed)."""

    def make(problem: BenchProblem) -> Product:
        A = curvkit.curvature(name, problem.curvkit_problem(), **options)
        return lambda x: A @ x

    return make


def curvkit_diagonal(name: str, **options: object) -> Callable[[BenchProblem], Product]:
    """``A.diagonal()`` (the input vector is ignored)."""

    def make(problem: BenchProblem) -> Product:
        A = curvkit.curvature(name, problem.curvkit_problem(), **options)
        return lambda x: A.diagonal()

    return make


# ------------------------------------------------------------------- peers
def _curvlinops(cls_name: str, **options: object) -> Callable[[BenchProblem], Product]:
    def make(problem: BenchProblem) -> Product:
        curvlinops = _require("curvlinops")
        op = getattr(curvlinops, cls_name)(
            problem.model, problem.criterion(), problem.params, [(problem.inputs, problem.targets)], **options
        )
        return lambda x: op @ x

    return make


def backpack_ggn_product(problem: BenchProblem) -> Product:
    """BackPACK ``ggn_vector_product_from_plist``: a fresh forward pass per product, R-op, backward."""
    _require("backpack")
    from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist

    def product(v: Tensor) -> Tensor:
        outputs = problem.model(problem.inputs)
        loss = problem.criterion()(outputs, problem.targets)
        with _quiet():
            return flatten(ggn_vector_product_from_plist(loss, outputs, problem.params, problem.split(v)))

    return product


def _backpack_extended(problem: BenchProblem) -> tuple[torch.nn.Module, torch.nn.Module, list[Tensor]]:
    """An extended deep copy of the model (BackPACK's hooks stay off the shared model) and loss."""
    backpack = _require("backpack")
    model = backpack.extend(copy.deepcopy(problem.model))
    criterion = backpack.extend(problem.criterion())
    return model, criterion, [p for p in model.parameters() if p.requires_grad]


def _backpack_pass(problem: BenchProblem, extension: object) -> Callable[[], list[Tensor]]:
    """One backward pass with a BackPACK extension; returns the model copy's parameters."""
    backpack = _require("backpack")
    model, criterion, params = _backpack_extended(problem)

    def run() -> list[Tensor]:
        for p in params:
            p.grad = None
        with _quiet(), backpack.backpack(extension):
            criterion(model(problem.inputs), problem.targets).backward()
        return params

    return run


def backpack_diagonal(extension: str, attribute: str, scale_by_samples: bool = False) -> Callable:
    """A BackPACK diagonal extension's result, flat (times ``N`` for ``SumGradSquared``: see the notes)."""

    def make(problem: BenchProblem) -> Product:
        extensions = _require("backpack.extensions")
        run = _backpack_pass(problem, getattr(extensions, extension)())
        scale = problem.num_samples if scale_by_samples else 1

        def diagonal(x: Tensor) -> Tensor:
            return scale * flatten([getattr(p, attribute) for p in run()])

        return diagonal

    return make


def backpack_ef_product(problem: BenchProblem) -> Product:
    """The empirical Fisher from BackPACK's per-sample gradients: ``N G^T (G x)`` (``G`` rows ``g_n / N``)."""
    extensions = _require("backpack.extensions")
    run = _backpack_pass(problem, extensions.BatchGrad())
    N = problem.num_samples

    def product(x: Tensor) -> Tensor:
        G = torch.cat([p.grad_batch.reshape(N, -1) for p in run()], dim=1)  # [N, P]
        return N * (G.T @ (G @ x))

    return product


# ------------------------------------------------------------------- the rows
MATVEC_METHODS: tuple[CurvatureMethod, ...] = (
    CurvatureMethod("curvkit ggn", "curvkit", curvkit_product("ggn"), "`ggn` (strategy `auto`)"),
    CurvatureMethod(
        "curvkit ggn, forward",
        "curvkit",
        curvkit_product("ggn", strategy="forward"),
        "`strategy='forward'`: `torch.func` jvp and vjp",
        headline=False,
    ),
    CurvatureMethod(
        "curvkit ggn, reverse",
        "curvkit",
        curvkit_product("ggn", strategy="reverse"),
        "`strategy='reverse'`: plain autograd, double-vjp trick",
        headline=False,
    ),
    CurvatureMethod(
        "curvkit fisher, exact",
        "curvkit",
        curvkit_product("fisher", mode="exact"),
        "`fisher`, `mode='exact'` (for the cross-entropy it is the GGN)",
    ),
    CurvatureMethod(
        "curvlinops GGNLinearOperator",
        "peer",
        _curvlinops("GGNLinearOperator"),
        "`GGNLinearOperator(model, CrossEntropyLoss(), params, [(X, y)]) @ v`",
    ),
    CurvatureMethod(
        "BackPACK ggn_vector_product",
        "peer",
        backpack_ggn_product,
        "`backpack.hessianfree.ggnvp.ggn_vector_product_from_plist(loss, output, params, v)`, fresh "
        "forward per product",
    ),
    CurvatureMethod(
        "curvkit fisher, mc (1 sample)",
        "curvkit",
        curvkit_product("fisher", mc_samples=1, seed=0),
        "`fisher`, `mc_samples=1, seed=0`",
        quantity="fisher-mc",
        sampled=True,
    ),
    CurvatureMethod(
        "curvlinops FisherMCLinearOperator",
        "peer",
        _curvlinops("FisherMCLinearOperator", mc_samples=1, seed=0),
        "`FisherMCLinearOperator(..., mc_samples=1, seed=0) @ v`",
        quantity="fisher-mc",
        sampled=True,
    ),
    CurvatureMethod(
        "curvkit empirical-fisher",
        "curvkit",
        curvkit_product("empirical-fisher"),
        "`empirical-fisher` (strategy `auto`: output space or per-sample gradients, timed)",
        quantity="empirical-fisher",
    ),
    CurvatureMethod(
        "curvkit empirical-fisher, per-sample",
        "curvkit",
        curvkit_product("empirical-fisher", strategy="per-sample"),
        "`strategy='per-sample'`: vmapped per-sample gradients `G`, then `G^T (G v)`",
        quantity="empirical-fisher",
        headline=False,
    ),
    CurvatureMethod(
        "curvlinops EFLinearOperator",
        "peer",
        _curvlinops("EFLinearOperator"),
        "`EFLinearOperator(...) @ v`",
        quantity="empirical-fisher",
    ),
    CurvatureMethod(
        "BackPACK BatchGrad",
        "peer",
        backpack_ef_product,
        "`BatchGrad` per-sample gradients `grad_batch` (of the mean loss: `g_n / N`), then `N G^T (G v)`",
        quantity="empirical-fisher",
    ),
)
"""The one-vector rows; each quantity's first curvkit row is the reference for agreement."""

MATMAT_METHODS: tuple[CurvatureMethod, ...] = (
    CurvatureMethod(
        f"curvkit ggn, {K} x G @ v",
        "curvkit",
        looped(curvkit_product("ggn")),
        "K separate products",
        headline=False,
    ),
    CurvatureMethod(
        f"curvkit ggn @ M (K={K})", "curvkit", curvkit_product("ggn"), "`G @ M`, M of shape [P, K]"
    ),
    CurvatureMethod(
        f"curvlinops GGNLinearOperator @ M (K={K})",
        "peer",
        _curvlinops("GGNLinearOperator"),
        "`GGNLinearOperator @ M`",
    ),
    CurvatureMethod(
        f"curvkit empirical-fisher, {K} x E @ v",
        "curvkit",
        looped(curvkit_product("empirical-fisher")),
        "K separate products",
        quantity="empirical-fisher",
        headline=False,
    ),
    CurvatureMethod(
        f"curvkit empirical-fisher @ M (K={K})",
        "curvkit",
        curvkit_product("empirical-fisher"),
        "`E @ M`",
        quantity="empirical-fisher",
    ),
    CurvatureMethod(
        f"curvlinops EFLinearOperator @ M (K={K})",
        "peer",
        _curvlinops("EFLinearOperator"),
        "`EFLinearOperator @ M`",
        quantity="empirical-fisher",
    ),
)
"""The ``K``-column rows; speed-ups are against the same quantity's K separate curvkit products."""

DIAGONAL_METHODS: tuple[CurvatureMethod, ...] = (
    CurvatureMethod("curvkit ggn.diagonal()", "curvkit", curvkit_diagonal("ggn"), "exact GGN diagonal"),
    CurvatureMethod(
        "BackPACK DiagGGNExact",
        "peer",
        backpack_diagonal("DiagGGNExact", "diag_ggn_exact"),
        "`with backpack(DiagGGNExact()): loss.backward()`, extended copy of the model",
    ),
    CurvatureMethod(
        "curvkit fisher (mc, 1 sample).diagonal()",
        "curvkit",
        curvkit_diagonal("fisher", mc_samples=1, seed=0),
        "Monte-Carlo Fisher diagonal",
        quantity="fisher-mc",
        sampled=True,
    ),
    CurvatureMethod(
        "BackPACK DiagGGNMC",
        "peer",
        backpack_diagonal("DiagGGNMC", "diag_ggn_mc"),
        "`DiagGGNMC(mc_samples=1)`",
        quantity="fisher-mc",
        sampled=True,
    ),
    CurvatureMethod(
        "curvkit empirical-fisher.diagonal()",
        "curvkit",
        curvkit_diagonal("empirical-fisher"),
        "`sum_n g_n^2 / N` from per-sample gradients",
        quantity="empirical-fisher",
    ),
    CurvatureMethod(
        "BackPACK SumGradSquared",
        "peer",
        backpack_diagonal("SumGradSquared", "sum_grad_squared", scale_by_samples=True),
        "`SumGradSquared` (of the mean loss: `sum_n g_n^2 / N^2`), times `N`",
        quantity="empirical-fisher",
    ),
)
"""The diagonal rows (the input vector of a round is ignored)."""


@dataclass
class CompareRow(Row):
    """One method on one problem: time, cost relative to a gradient and to the peers, agreement.

    ``rel_error_vs_curvkit`` is the float32 difference from curvkit's row of the
    same quantity on the check vector; ``float64_agreement`` the same in float64.
    """

    quantity: str = "ggn"
    headline: bool = True
    ratio_to_gradient: float | None = None
    ratio_to_fastest_peer: float | None = None
    float64_agreement: float | None = None


@dataclass
class GGNRow(CompareRow):
    """A row of the GGN tables; matmat rows add their speed-up over separate products."""

    speedup_vs_loop: float | None = None


@dataclass
class GGNResult(ProblemRecord):
    """The Gauss-Newton and Fisher tables of one problem."""

    gradient_ms: float | None = None
    other_load: float | None = None
    matvec: list[GGNRow] = field(default_factory=list)
    matmat: list[GGNRow] = field(default_factory=list)
    diagonal: list[GGNRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-ready dictionary."""
        return asdict(self)


def double_copy(problem: BenchProblem) -> BenchProblem:
    """The problem in float64 (a deep copy of the model; integer inputs stay integers)."""
    inputs = problem.inputs.double() if problem.inputs.is_floating_point() else problem.inputs
    return BenchProblem(
        problem.name, problem.description, copy.deepcopy(problem.model).double(), inputs, problem.targets
    )


def float64_agreement(
    problem64: BenchProblem, methods: Sequence[CurvatureMethod], check: Tensor
) -> dict[str, float]:
    """Each comparable method's relative difference from its quantity's curvkit reference, float64."""
    outputs: dict[str, Tensor] = {}
    for m in methods:
        if m.sampled or not getattr(m, "operator", True):  # no product to compare
            continue
        try:
            outputs[m.name] = m.make(problem64)(check).double()
        except Exception:  # the timed pass records why a method cannot run
            continue
    errors = {}
    for m in methods:
        ref = _reference(methods, m)
        if m.name in outputs and ref is not None and ref.name in outputs:
            r = outputs[ref.name]
            errors[m.name] = ((outputs[m.name] - r).norm() / r.norm().clamp_min(1e-300)).item()
    return errors


def _reference(methods: Sequence[CurvatureMethod], method: CurvatureMethod) -> CurvatureMethod | None:
    """The first curvkit method of the same quantity (``None`` for sampled ones)."""
    if method.sampled:
        return None
    return next((m for m in methods if m.family == "curvkit" and m.quantity == method.quantity), None)


def table_rows(
    methods: Sequence[CurvatureMethod],
    timings: dict[str, Timing],
    outputs: dict[str, Tensor],
    skipped: dict[str, str],
    agreement: dict[str, float],
    gradient_ms: float | None,
    row_type: type[CompareRow] = GGNRow,
) -> list[CompareRow]:
    """One row per method: median and spread, ratios to a gradient and to the fastest peer of its
    quantity, float32 difference from its quantity's curvkit row, float64 agreement."""
    peers: dict[str, float] = {}
    for m in methods:
        if m.family == "peer" and m.name in timings:
            ms = timings[m.name].median_ms
            peers[m.quantity] = min(ms, peers.get(m.quantity, ms))
    rows = []
    for m in methods:
        row = row_type(
            m.name, m.family, m.note, skipped=skipped.get(m.name), quantity=m.quantity, headline=m.headline
        )
        if m.name in timings:
            ref = _reference(methods, m) if getattr(m, "operator", True) else None
            row.fill(timings[m.name], outputs[m.name], outputs.get(ref.name) if ref else None)
            row.ratio_to_gradient = row.median_ms / gradient_ms if gradient_ms else None
            if m.quantity in peers:
                row.ratio_to_fastest_peer = row.median_ms / peers[m.quantity]
        row.float64_agreement = agreement.get(m.name)
        rows.append(row)
    return rows


def run_ggn(problem: BenchProblem, repeats: int, matmat_repeats: int, warmup: int) -> GGNResult:
    """All three tables on one problem (float32 timing, float64 agreement).

    ``warmup`` rounds are untimed; they should exceed the auto strategies' timed
    trials (``3 * AUTO_TRIALS`` products) so that the timed rounds measure the
    way each operator settled on.
    """
    res = GGNResult(problem.name, problem.description, problem.dim, problem.num_samples)
    check = problem.random_vectors(1, CHECK_SEED)[0]
    vectors = problem.random_vectors(repeats + warmup, TIMING_SEED)
    problem64 = double_copy(problem)
    check64 = check.double()
    extra = {"gradient": gradient(problem)}
    timings, outputs, skipped = measure(problem, MATVEC_METHODS, check, vectors, repeats, warmup, extra)
    res.gradient_ms = timings["gradient"].median_ms
    agreement = float64_agreement(problem64, MATVEC_METHODS, check64)
    res.matvec = table_rows(MATVEC_METHODS, timings, outputs, skipped, agreement, res.gradient_ms)

    gen = torch.Generator().manual_seed(CHECK_SEED)
    check_m = torch.randn(problem.dim, K, generator=gen)
    gen.manual_seed(TIMING_SEED)
    matrices = [torch.randn(problem.dim, K, generator=gen) for _ in range(matmat_repeats + warmup)]
    timings, outputs, skipped = measure(problem, MATMAT_METHODS, check_m, matrices, matmat_repeats, warmup)
    agreement = float64_agreement(problem64, MATMAT_METHODS, check_m.double())
    res.matmat = table_rows(MATMAT_METHODS, timings, outputs, skipped, agreement, None)
    for row in res.matmat:
        loop = next(r for r in res.matmat if r.quantity == row.quantity)
        if row.median_ms is not None and loop.median_ms is not None:
            row.speedup_vs_loop = loop.median_ms / row.median_ms

    timings, outputs, skipped = measure(problem, DIAGONAL_METHODS, check, vectors, repeats, warmup, extra)
    agreement = float64_agreement(problem64, DIAGONAL_METHODS, check64)
    res.diagonal = table_rows(
        DIAGONAL_METHODS, timings, outputs, skipped, agreement, timings["gradient"].median_ms
    )
    del problem64
    gc.collect()
    return res


# ------------------------------------------------------------------- goals
def _row(rows: Sequence[GGNRow], name: str) -> GGNRow | None:
    return next((r for r in rows if r.method == name and r.median_ms is not None), None)


def _noise(row: GGNRow) -> float:
    """Relative spread of a row's rounds, (slowest - fastest) / median: the noise a ratio lives in."""
    return (row.max_ms - row.min_ms) / row.median_ms if row.median_ms else 0.0


def slowest_row_goal(rows: Sequence[Row], goal: str, problem: str) -> Goal | None:
    """Whether the slowest curvkit row is at most as slow as the fastest peer of its quantity.

    A ratio above 1 that lies within the row's own spread of rounds, (slowest -
    fastest) / median, is said to be within noise.
    """
    timed = [r for r in rows if r.family == "curvkit" and r.ratio_to_fastest_peer is not None]
    slowest = max(timed, key=lambda r: r.ratio_to_fastest_peer, default=None)
    if slowest is None:
        return None
    ratio = slowest.ratio_to_fastest_peer
    detail = f"slowest curvkit row: {slowest.method}, {ratio:.2f}x the fastest peer"
    if ratio > 1 and ratio - 1 <= _noise(slowest):
        detail += f" (within this row's spread of {100 * _noise(slowest):.0f}%)"
    return Goal(goal, problem, ratio <= 1, detail)


def evaluate_ggn_goals(results: Sequence[GGNResult]) -> list[Goal]:
    """The issue's goals: GGN cost, no curvkit default row slower than the fastest peer, the
    exact diagonal against ``DiagGGNExact``, float64 agreement where definitions coincide."""
    goals = []
    for res in results:
        ggn = _row(res.matvec, "curvkit ggn")
        goals.append(
            Goal(
                f"GGN product at most {GGN_GOAL:g}x a gradient",
                res.name,
                None if ggn is None else ggn.ratio_to_gradient <= GGN_GOAL,
                "no measurement"
                if ggn is None
                else f"{ggn.ratio_to_gradient:.2f}x ({ggn.median_ms:.2f} ms; gradient {res.gradient_ms:.2f})",
            )
        )
        defaults = [r for r in (*res.matvec, *res.matmat, *res.diagonal) if r.headline]
        goal = slowest_row_goal(defaults, "no curvkit row slower than the fastest peer", res.name)
        if goal is not None:
            goals.append(goal)
        diag = _row(res.diagonal, "curvkit ggn.diagonal()")
        backpack = _row(res.diagonal, "BackPACK DiagGGNExact")
        if diag is not None:
            why = next((r.skipped for r in res.diagonal if r.method == "BackPACK DiagGGNExact"), None)
            goals.append(
                Goal(
                    "exact GGN diagonal no slower than BackPACK DiagGGNExact",
                    res.name,
                    None if backpack is None else diag.median_ms <= backpack.median_ms,
                    f"BackPACK: {why}"
                    if backpack is None
                    else f"{diag.median_ms:.1f} ms vs {backpack.median_ms:.1f} ms "
                    f"(BackPACK / curvkit {backpack.median_ms / diag.median_ms:.2f})",
                )
            )
        compared = [r for r in (*res.matvec, *res.matmat, *res.diagonal) if r.float64_agreement is not None]
        worst = max(compared, key=lambda r: r.float64_agreement, default=None)
        if worst is not None:
            goals.append(
                Goal(
                    f"float64 agreement to {AGREEMENT:g} where definitions coincide",
                    res.name,
                    worst.float64_agreement <= AGREEMENT,
                    f"largest relative difference {worst.float64_agreement:.1e} ({worst.method}; "
                    f"{len(compared)} rows compared)",
                )
            )
    return goals
