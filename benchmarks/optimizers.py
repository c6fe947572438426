"""curvkit's optimizers against SGD, Adam and the peers' implementations of the same methods.

``python -m benchmarks --only optimizers`` (``--problems mlp`` or ``cnn``). The
training runs of :mod:`benchmarks.training` (bundled digits, mini-batches of 64,
float32, the same batches for every optimizer of a seed), with :data:`SEEDS`
seeds and a grid of the learning rate (or damping) per optimizer; every run
trains for the step budget and on until the time budget (:data:`SECONDS`).

Peers, same model, data, seeds and protocol: torch-optimizer's ``Adahessian`` and
``Shampoo``, pytorch-optimizer's ``AdaHessian``, ``SophiaH`` and ``Shampoo``
(installed with the torch pin of ``PEERS.md``; a missing peer's rows say so).

Goals (per problem and method with a peer): curvkit's step no slower than the
peer's (median ms per step, within the spread over seeds), and the same loss at
the step budget within noise (the ranges over seeds overlap), each at its own
best setting of the grid.
"""

from __future__ import annotations

import importlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.hvp import Goal, ProblemRecord
from benchmarks.timing import OtherLoad, percent
from benchmarks.training import (
    BATCH,
    STEPPERS,
    Curve,
    Family,
    OptimizerRow,
    TrainingData,
    adam,
    digits,
    digits_description,
    digits_model,
    loader,
    plot_training,
    run_families,
    sgd,
    training_table,
)

__all__ = [
    "OPTIMIZER_PROBLEMS",
    "OptimizersResult",
    "evaluate_optimizer_goals",
    "render_optimizers",
    "run_optimizers",
]

OPTIMIZER_PROBLEMS = ("mlp", "cnn")
STEPS = {"mlp": 300, "cnn": 150}
QUICK_STEPS = {"mlp": 60, "cnn": 40}
SECONDS = {"mlp": 1.5, "cnn": 3.0}
QUICK_SECONDS = {"mlp": 0.3, "cnn": 0.5}
SEEDS = 2
FIGURE = "optimizers_training.png"


def _curvkit(
    cls: str, setting: str = "lr", **options: Any
) -> Callable[[float, nn.Module, TrainingData, int], Any]:
    """A maker of ``curvkit.optim.<cls>`` with ``setting=value`` and ``options``."""

    def make(value: float, model: nn.Module, data: TrainingData, seed: int) -> Any:
        import curvkit.optim

        keywords = dict(options)
        if keywords.pop("with_model", False):
            keywords.update(model=model, loss_fn="cross_entropy")
        return getattr(curvkit.optim, cls)(model.parameters(), **{setting: value}, **keywords)

    return make


def _peer(module: str, cls: str, **options: Any) -> Callable[[float, nn.Module, TrainingData, int], Any]:
    """A maker of a peer's optimizer ``module.cls(params, lr=value, **options)``."""

    def make(value: float, model: nn.Module, data: TrainingData, seed: int) -> Any:
        return getattr(importlib.import_module(module), cls)(model.parameters(), lr=value, **options)

    return make


SOPHIA_GRID = (1e-4, 3e-4, 1e-3)
"""curvkit SophiaH's learning rates: pytorch-optimizer's grid (0.01, 0.03, 0.1) times its ``p = 0.01``.

pytorch-optimizer's ``SophiaH`` steps ``lr' clip(m / max(h, eps'), p')``; curvkit's
with ``rho = p'``, ``eps = p' eps'`` and ``lr = p' lr'`` is the same update (see
:class:`curvkit.optim.SophiaH`), so both rows run the same settings. One difference
stays: the peer draws Gaussian probes, curvkit Rademacher ones.
"""

FAMILIES: tuple[Family, ...] = (
    Family("SGD", "lr", (0.1, 0.3, 1.0), sgd),
    Family("Adam", "lr", (3e-3, 1e-2, 3e-2), adam),
    Family("curvkit KFAC", "lr", (0.03, 0.1, 0.3), _curvkit("KFAC", with_model=True), "batch"),
    Family("curvkit EKFAC", "lr", (0.03, 0.1, 0.3), _curvkit("EKFAC", with_model=True), "batch"),
    Family(
        "curvkit NaturalGradient",
        "lr",
        (0.03, 0.1, 0.3),
        _curvkit("NaturalGradient", with_model=True),
        "batch",
    ),
    Family("curvkit HessianFree", "lr", (0.3, 1.0), _curvkit("HessianFree", with_model=True), "batch"),
    Family("curvkit DiagonalNewton", "lr", (0.03, 0.1, 0.3), _curvkit("DiagonalNewton"), "create_graph"),
    Family("curvkit AdaHessian", "lr", (0.03, 0.1, 0.3), _curvkit("AdaHessian"), "create_graph"),
    Family(
        "torch-optimizer Adahessian",
        "lr",
        (0.03, 0.1, 0.3),
        _peer("torch_optimizer", "Adahessian"),
        "create_graph",
    ),
    Family(
        "pytorch-optimizer AdaHessian",
        "lr",
        (0.03, 0.1, 0.3),
        _peer("pytorch_optimizer", "AdaHessian"),
        "create_graph",
    ),
    *(
        Family(
            "curvkit SophiaH" + suffix, "lr", SOPHIA_GRID, _curvkit("SophiaH", rho=0.01, eps=1e-14), stepper
        )
        for suffix, stepper in (("", "create_graph"), (", graph when due", "graph_when_due"))
    ),
    Family(
        "pytorch-optimizer SophiaH",
        "lr",
        (0.01, 0.03, 0.1),
        _peer("pytorch_optimizer", "SophiaH"),
        "create_graph",
    ),
    Family("curvkit Shampoo", "lr", (0.03, 0.1, 0.3), _curvkit("Shampoo")),
    Family(
        "curvkit Shampoo, the peers' settings",
        "lr",
        (0.03, 0.1, 0.3),
        _curvkit(
            "Shampoo",
            betas=(0.0, 1.0),
            grafting="none",
            preconditioner_dtype=torch.float32,
            epsilon=1e-6,
        ),
    ),
    Family("torch-optimizer Shampoo", "lr", (0.03, 0.1, 0.3), _peer("torch_optimizer", "Shampoo")),
    Family("pytorch-optimizer Shampoo", "lr", (0.03, 0.1, 0.3), _peer("pytorch_optimizer", "Shampoo")),
)
"""The optimizers compared, with their grids."""

PAIRS = (
    ("curvkit AdaHessian", "torch-optimizer Adahessian"),
    ("curvkit AdaHessian", "pytorch-optimizer AdaHessian"),
    ("curvkit SophiaH", "pytorch-optimizer SophiaH"),
    ("curvkit Shampoo, the peers' settings", "torch-optimizer Shampoo"),
    ("curvkit Shampoo, the peers' settings", "pytorch-optimizer Shampoo"),
)
"""(curvkit, peer) rows of the same method with the same settings and step protocol, compared by the goals.

AdaHessian's defaults are the peers' method; SophiaH runs pytorch-optimizer's
settings (:data:`SOPHIA_GRID`) with a gradient graph at every step, as the peer
needs; Shampoo runs the peers' method: summed statistics (``beta2 = 1``), no
grafting, no momentum, float32 inverse roots refreshed every step.
"""

OPTION_PAIRS = (
    ("curvkit SophiaH, graph when due", "pytorch-optimizer SophiaH"),
    ("curvkit Shampoo", "torch-optimizer Shampoo"),
    ("curvkit Shampoo", "pytorch-optimizer Shampoo"),
)
"""(curvkit, peer) rows timed the same way but without a goal: what curvkit's options cost or save.

SophiaH's graph built only on the steps that estimate the diagonal
(``hessian_due``, which the peer cannot do); Shampoo's defaults, which do more
work than the peers' method (AdaGrad grafting, momentum, moving averages with bias
correction, float64 inverse roots).
"""

TIMING_ROUNDS = 15
"""Rounds of the interleaved step timing of each (curvkit, peer) pair."""

TIMING_STEPS = 20
"""Steps of each optimizer timed per round."""


@dataclass
class PairTiming:
    """Step times of a (curvkit, peer) pair measured in alternation (:func:`time_pair`).

    Attributes:
        ours: The curvkit row's name.
        theirs: The peer row's name.
        ms_ours: Per round, curvkit's median milliseconds per step.
        ms_theirs: Per round, the peer's.
        error: Why the timing stopped (a step that raised), else empty.
    """

    ours: str
    theirs: str
    ms_ours: list[float] = field(default_factory=list)
    ms_theirs: list[float] = field(default_factory=list)
    error: str = ""

    def ratios(self) -> list[float]:
        """Per round, curvkit's time per step over the peer's."""
        return [a / b for a, b in zip(self.ms_ours, self.ms_theirs)]


def time_pair(name: str, ours: Family, theirs: Family, data: TrainingData, rounds: int) -> PairTiming:
    """Both optimizers' steps timed in alternation, so that a drift of the machine's speed hits both.

    Each optimizer trains its own copy of the same model (seed 0) on the same
    batches, at the smallest value of its grid (the step's cost does not depend on
    it, and a small learning rate does not diverge). After :data:`TIMING_STEPS`
    untimed steps each, every round times :data:`TIMING_STEPS` steps of one, then
    of the other, the order alternating between rounds; the per-step times of a
    round are the median over its steps.
    """
    X, y, _, _ = data
    criterion = nn.CrossEntropyLoss()
    steppers = []
    for family in (ours, theirs):
        torch.manual_seed(0)
        model = digits_model(name)
        optimizer = family.make(family.grid[0], model, data, 0)
        steppers.append(STEPPERS[family.stepper](optimizer, model, criterion))
    batches = [(x, t) for x, t in loader(X, y, BATCH, 0)]
    timing = PairTiming(ours.name, theirs.name)
    times: list[list[float]] = [timing.ms_ours, timing.ms_theirs]
    position = 0

    def run(which: int, timed: bool) -> float:
        nonlocal position
        per_step = []
        for _ in range(TIMING_STEPS):
            x, target = batches[position % len(batches)]
            position += 1
            start = time.perf_counter()
            steppers[which](x, target)
            per_step.append(time.perf_counter() - start)
        return 1e3 * statistics.median(per_step) if timed else 0.0

    try:
        for which in (0, 1):
            run(which, timed=False)
        for r in range(rounds):
            for which in (0, 1) if r % 2 == 0 else (1, 0):
                times[which].append(run(which, timed=True))
    except Exception as exc:  # a peer that raises on a diverging run: recorded, the timing stops
        timing.error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"
        n = min(len(timing.ms_ours), len(timing.ms_theirs))
        del timing.ms_ours[n:], timing.ms_theirs[n:]
    return timing


@dataclass
class OptimizersResult(ProblemRecord):
    """The training comparison on one problem."""

    step_budget: int = 0
    time_budget_s: float = 0.0
    seeds: int = 0
    sgd_ms_per_step: float | None = None
    unavailable: dict[str, str] = field(default_factory=dict)
    rows: list[OptimizerRow] = field(default_factory=list)
    curves: list[Curve] = field(default_factory=list)
    other_load: float | None = None
    timings: list[PairTiming] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-ready dictionary."""
        return asdict(self)


def _available(family: Family, name: str, data: TrainingData) -> str:
    """Why ``family`` cannot run (empty when it can): a missing peer or class, tried on a fresh model."""
    try:
        family.make(family.grid[0], digits_model(name), data, 0)
    except (ImportError, AttributeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def run_optimizers_problem(name: str, quick: bool) -> OptimizersResult:
    """Every family, configuration and seed on one problem."""
    data = digits()
    model = digits_model(name)
    res = OptimizersResult(
        name, digits_description(name), sum(p.numel() for p in model.parameters()), len(data[1])
    )
    load = OtherLoad().start()
    families = []
    for family in FAMILIES:
        why = _available(family, name, data)
        if why:
            res.unavailable[family.name] = why
        else:
            families.append(family)
    res.step_budget = (QUICK_STEPS if quick else STEPS)[name]
    res.seeds = 1 if quick else SEEDS
    seconds = (QUICK_SECONDS if quick else SECONDS)[name]
    res.rows, res.curves, res.time_budget_s = run_families(
        name, families, None, res.step_budget, res.seeds, quick, data, seconds_budget=seconds
    )
    sgd_rows = [r for r in res.rows if r.family == "SGD" and r.chosen]
    res.sgd_ms_per_step = statistics.median(sgd_rows[0].ms_per_step) if sgd_rows else None
    by_name = {f.name: f for f in families}
    for ours, theirs in PAIRS + OPTION_PAIRS:
        if ours in by_name and theirs in by_name:
            print(f"[{name}] timing {ours} against {theirs}", file=sys.stderr)
            rounds = 3 if quick else TIMING_ROUNDS
            res.timings.append(time_pair(name, by_name[ours], by_name[theirs], data, rounds))
    res.other_load = load.stop()
    return res


def run_optimizers(
    problems: Sequence[str] | None, quick: bool, out: Path | None = None
) -> list[OptimizersResult]:
    """The section on the selected problems; draws the figure into ``out``."""
    names = [p for p in (problems or OPTIMIZER_PROBLEMS) if p in OPTIMIZER_PROBLEMS]
    results = [run_optimizers_problem(name, quick) for name in names]
    if out is not None and results:
        plot_training(results, FAMILIES, out / FIGURE)
    return results


def _chosen(res: OptimizersResult, family: str) -> OptimizerRow | None:
    return next((r for r in res.rows if r.family == family and r.chosen), None)


def _spread(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.3g} [{min(values):.3g}, {max(values):.3g}]"


def _step_time_goal(res: OptimizersResult, ours: str, theirs: str) -> Goal:
    """ "No slower than the peer" from the interleaved timing: the median ratio, and its noise.

    Met when the median over rounds of curvkit's time over the peer's is at most
    1; met within noise when it is above 1 by less than the ratios' interquartile
    range (the goal then holds only within the noise of this machine), and said so.
    """
    goal = f"{ours} step no slower than {theirs}"
    timing = next((t for t in res.timings if t.ours == ours and t.theirs == theirs), None)
    if timing is None or len(timing.ratios()) < 3:
        why = "not timed" if timing is None else f"timing stopped: {timing.error or 'too few rounds'}"
        return Goal(goal, res.name, None, why)
    ratios = sorted(timing.ratios())
    q1, median, q3 = (
        statistics.quantiles(ratios, n=4)[0],
        statistics.median(ratios),
        statistics.quantiles(ratios, n=4)[2],
    )
    noise = q3 - q1
    verdict = "" if median <= 1.0 else " (within noise)" if median <= 1.0 + noise else ""
    detail = (
        f"{median:.2f}x{verdict} (quartiles {q1:.2f}-{q3:.2f}) over {len(ratios)} interleaved rounds of "
        f"{TIMING_STEPS} steps: {statistics.median(timing.ms_ours):.2f} ms against "
        f"{statistics.median(timing.ms_theirs):.2f} ms per step"
    )
    return Goal(goal, res.name, median <= 1.0 + noise, detail)


def evaluate_optimizer_goals(results: Sequence[OptimizersResult]) -> list[Goal]:
    """Per problem and (curvkit, peer) pair: the step time and the loss at the step budget."""
    goals = []
    for res in results:
        for ours, theirs in PAIRS:
            a, b = _chosen(res, ours), _chosen(res, theirs)
            if a is None or b is None:
                missing = res.unavailable.get(theirs) or res.unavailable.get(ours) or "not run"
                goals.append(Goal(f"{ours} step no slower than {theirs}", res.name, None, missing))
                continue
            goals.append(_step_time_goal(res, ours, theirs))
            spread_a, spread_b = _spread(a.loss_at_steps), _spread(b.loss_at_steps)
            overlap = min(a.loss_at_steps) <= max(b.loss_at_steps) and min(b.loss_at_steps) <= max(
                a.loss_at_steps
            )
            goals.append(
                Goal(
                    f"{ours} reaches {theirs}'s loss within noise",
                    res.name,
                    overlap or statistics.median(a.loss_at_steps) <= statistics.median(b.loss_at_steps),
                    f"loss at {res.step_budget} steps {spread_a} against {spread_b}",
                )
            )
    return goals


OPTIMIZERS_READING = [
    "## Optimizers: curvkit's against SGD, Adam and the peers",
    "",
    "`python -m benchmarks --only optimizers` (see `benchmarks/optimizers.py`): the bundled digits, "
    "mini-batches of 64, float32, the same batches for every optimizer of a seed; each optimizer with a "
    "small grid of its learning rate, its row the configuration of lowest median loss at the step budget "
    "(the others below it). Every run trains for the step budget and on until the time budget; training time "
    f"only (the loss evaluations for the curves are not timed). Curves: `{FIGURE}`.",
    "",
    "The goals' step times are measured apart, each curvkit optimizer against the peer implementation of "
    f"its method in alternation ({TIMING_ROUNDS} rounds of {TIMING_STEPS} steps each, the order alternating, "
    "the same model, batches and step protocol; see `time_pair`), so that a drift of the machine's speed "
    "during the run hits both; the tables' ms per step come from the training runs, one family after "
    "another, and drift with the machine by 10-20% between families.",
    "",
]


def render_optimizers(results: Sequence[OptimizersResult]) -> list[str]:
    """The section as Markdown lines."""
    out = list(OPTIMIZERS_READING)
    for res in results:
        load = percent(res.other_load)
        out += [
            f"### {res.name}: {res.description}",
            "",
            f"P = {res.params:,} parameters, {res.seeds} seed(s); step budget {res.step_budget}, time budget "
            f"{res.time_budget_s:.2f} s. CPU used by other processes meanwhile: {load}.",
            "",
            *training_table(res, FAMILIES),
            "",
        ]
        if res.sgd_ms_per_step:
            costs = []
            for row in res.rows:
                if row.chosen:
                    costs.append(
                        f"{row.family} {statistics.median(row.ms_per_step) / res.sgd_ms_per_step:.1f}x"
                    )
            out += ["Cost per step relative to SGD: " + ", ".join(costs) + ".", ""]
        if res.timings:
            out += [
                "Step time, curvkit against the peer, interleaved (goal: the same method with the same "
                "settings; option: one of curvkit's options, without a goal):",
                "",
                "| curvkit | peer | | curvkit ms per step | peer ms per step | ratio, median [quartiles] |",
                "|---|---|---|---|---|---|",
            ]
            for t in res.timings:
                kind = "goal" if (t.ours, t.theirs) in PAIRS else "option"
                if len(t.ratios()) < 3:
                    out.append(
                        f"| {t.ours} | {t.theirs} | {kind} | | | not timed: {t.error or 'too few rounds'} |"
                    )
                    continue
                q1, _, q3 = statistics.quantiles(t.ratios(), n=4)
                out.append(
                    f"| {t.ours} | {t.theirs} | {kind} | {statistics.median(t.ms_ours):.2f} | "
                    f"{statistics.median(t.ms_theirs):.2f} | {statistics.median(t.ratios()):.2f} "
                    f"[{q1:.2f}, {q3:.2f}] |"
                )
            out.append("")
        for family, why in res.unavailable.items():
            out += [f"- {family}: not run ({why}).", ""]
    return out
