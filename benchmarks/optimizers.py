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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.hvp import Goal, ProblemRecord
from benchmarks.timing import OtherLoad
from benchmarks.training import (
    Curve,
    Family,
    OptimizerRow,
    TrainingData,
    adam,
    digits,
    digits_description,
    digits_model,
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
        "curvkit Shampoo, float32",
        "lr",
        (0.03, 0.1, 0.3),
        _curvkit("Shampoo", preconditioner_dtype=torch.float32, epsilon=1e-6),
    ),
    Family("torch-optimizer Shampoo", "lr", (0.03, 0.1, 0.3), _peer("torch_optimizer", "Shampoo")),
    Family("pytorch-optimizer Shampoo", "lr", (0.03, 0.1, 0.3), _peer("pytorch_optimizer", "Shampoo")),
)
"""The optimizers compared, with their grids."""

PAIRS = (
    ("curvkit AdaHessian", "torch-optimizer Adahessian"),
    ("curvkit AdaHessian", "pytorch-optimizer AdaHessian"),
    ("curvkit SophiaH", "pytorch-optimizer SophiaH"),
    ("curvkit SophiaH, graph when due", "pytorch-optimizer SophiaH"),
    ("curvkit Shampoo", "torch-optimizer Shampoo"),
    ("curvkit Shampoo", "pytorch-optimizer Shampoo"),
    ("curvkit Shampoo, float32", "torch-optimizer Shampoo"),
    ("curvkit Shampoo, float32", "pytorch-optimizer Shampoo"),
)
"""(curvkit, peer) rows of the same method, compared by the goals.

Each method's first curvkit row takes its step as the peer does (a gradient
graph at every step; Shampoo's default float64 preconditioners); the others show
what curvkit adds: SophiaH's graph built only on the steps that estimate the
diagonal (``hessian_due``), Shampoo in float32 with the peers' precision (and an
``epsilon`` of 1e-6, as pytorch-optimizer's).
"""


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
            ms_a, ms_b = statistics.median(a.ms_per_step), statistics.median(b.ms_per_step)
            slack = max(b.ms_per_step) - min(b.ms_per_step)
            goals.append(
                Goal(
                    f"{ours} step no slower than {theirs}",
                    res.name,
                    ms_a <= ms_b + slack,
                    f"{ms_a:.2f} ms against {ms_b:.2f} ms per step ({ms_a / ms_b:.2f}x; "
                    f"the peer's spread {slack:.2f} ms)",
                )
            )
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
]


def render_optimizers(results: Sequence[OptimizersResult]) -> list[str]:
    """The section as Markdown lines."""
    out = list(OPTIMIZERS_READING)
    for res in results:
        load = "unknown" if res.other_load is None else f"{100 * res.other_load:.0f}%"
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
        for family, why in res.unavailable.items():
            out += [f"- {family}: not run ({why}).", ""]
    return out
