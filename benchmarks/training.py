"""Training runs shared by the benchmark sections that compare optimizers (``newton``, ``optimizers``).

On the bundled digits (:func:`curvkit.datasets.load_dataset`: ``digits-train``,
1,433 samples, to train on; ``digits-test``, 364, for the accuracy), two models of
:mod:`curvkit.models`: ``mlp`` (``digits_mlp``: 64-32-32-10, tanh) and ``cnn``
(``digits_cnn``: two convolutions, ReLU, pooling, a linear head), float32, mean
cross-entropy, mini-batches of :data:`BATCH` (reshuffled every epoch from a seeded
generator: the same batches for every optimizer of one seed).

A :class:`Family` is an optimizer with a grid of one setting (a learning rate, a
damping) and the way its step is taken (:data:`STEPPERS`: the usual ``zero_grad``,
``backward``, ``step``; a ``backward(create_graph=True)`` for Hutchinson
optimizers, at every step as the peers need, or only when curvkit's
``hessian_due`` says the step estimates the diagonal; ``step(batch=(x, y))`` for
those that take the batch's curvature).
:func:`run_families` trains every configuration with every seed: the reference
family (the slowest) for the step budget, whose median time is the time budget;
the others until both budgets are spent. Wall time counts training only: the full
training loss, evaluated every :data:`EVAL_EVERY` steps for the curves, is not
timed. A family's row is its configuration of lowest median loss at the step
budget; a run whose loss passes :data:`DIVERGED` (or is NaN) stops.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.datasets import load_dataset
from curvkit.models import digits_cnn, digits_mlp

__all__ = [
    "BATCH",
    "Curve",
    "Family",
    "OptimizerRow",
    "TrainingData",
    "adam",
    "digits",
    "digits_model",
    "loader",
    "plot_training",
    "run_families",
    "sgd",
    "training_table",
]

TRAINING_PROBLEMS = ("mlp", "cnn")
SEEDS = 3
BATCH = 64
EVAL_EVERY = 20
DIVERGED = 1e3
"""A training loss above which (or NaN) a run has diverged and stops (log 10 = 2.3 at the start)."""

TrainingData = tuple[Tensor, Tensor, Tensor, Tensor]
"""``(X, y, X_test, y_test)``."""


def digits() -> TrainingData:
    """The bundled digits: the training and the test split."""
    X, y = load_dataset("digits-train")
    X_test, y_test = load_dataset("digits-test")
    return X, y, X_test, y_test


def digits_model(name: str) -> nn.Module:
    """The ``mlp`` or the ``cnn``, initialised from torch's global generator."""
    return digits_mlp() if name == "mlp" else digits_cnn()


def digits_description(name: str) -> str:
    """One line for the report."""
    kind = "MLP 64-32-32-10 (tanh)" if name == "mlp" else "CNN (Conv 1->8, Conv 8->16, ReLU, pooling, Linear)"
    return f"{kind} on the bundled digits (1,433 training samples), float32"


def loader(X: Tensor, y: Tensor, batch: int, seed: int) -> torch.utils.data.DataLoader:
    """Shuffled mini-batches from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(X, y)
    return torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, generator=generator)


Step = Callable[[Tensor, Tensor], None]


def sgd(lr: float, model: nn.Module, data: TrainingData, seed: int) -> torch.optim.Optimizer:
    """SGD with momentum 0.9: the first-order baseline."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def adam(lr: float, model: nn.Module, data: TrainingData, seed: int) -> torch.optim.Optimizer:
    """Adam with torch's defaults but the learning rate."""
    return torch.optim.Adam(model.parameters(), lr=lr)


def _usual(optimizer: Any, model: nn.Module, criterion: nn.Module) -> Step:
    def step(x: Tensor, target: Tensor) -> None:
        optimizer.zero_grad()
        criterion(model(x), target).backward()
        optimizer.step()

    return step


def _create_graph(optimizer: Any, model: nn.Module, criterion: nn.Module) -> Step:
    def step(x: Tensor, target: Tensor) -> None:
        optimizer.zero_grad()
        criterion(model(x), target).backward(create_graph=True)
        optimizer.step()

    return step


def _graph_when_due(optimizer: Any, model: nn.Module, criterion: nn.Module) -> Step:
    def step(x: Tensor, target: Tensor) -> None:
        optimizer.zero_grad()
        criterion(model(x), target).backward(create_graph=optimizer.hessian_due)
        optimizer.step()

    return step


def _batch(optimizer: Any, model: nn.Module, criterion: nn.Module) -> Step:
    def step(x: Tensor, target: Tensor) -> None:
        optimizer.zero_grad()
        criterion(model(x), target).backward()
        optimizer.step(batch=(x, target))

    return step


STEPPERS: dict[str, Callable[[Any, nn.Module, nn.Module], Step]] = {
    "usual": _usual,
    "create_graph": _create_graph,
    "graph_when_due": _graph_when_due,
    "batch": _batch,
}
"""How a family's step is taken, by name."""


@dataclass(frozen=True)
class Family:
    """An optimizer, its grid of one setting, and how its step is taken.

    Attributes:
        name: The row's name (``"SGD"``, ``"curvkit AdaHessian"``, ...).
        setting: What the grid varies (``"lr"``, ``"damping"``).
        grid: The values tried.
        make: ``make(value, model, data, seed)`` -> the optimizer.
        stepper: A key of :data:`STEPPERS`.
    """

    name: str
    setting: str
    grid: tuple[float, ...]
    make: Callable[[float, nn.Module, TrainingData, int], Any]
    stepper: str = "usual"


@dataclass
class Curve:
    """One training run: the full training loss every :data:`EVAL_EVERY` steps."""

    family: str
    setting: float
    seed: int
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    test_accuracy: float | None = None
    skipped_steps: int = 0
    diverged: bool = False
    error: str = ""

    def at_step(self, step: int) -> float:
        """The loss at ``step`` (the last evaluation at or before it)."""
        return [v for s, v in zip(self.steps, self.loss) if s <= step][-1]

    def at_time(self, seconds: float) -> tuple[float, int]:
        """The loss and the steps done at the last evaluation within ``seconds`` of training."""
        inside = [(v, s) for s, t, v in zip(self.steps, self.seconds, self.loss) if t <= seconds]
        return inside[-1]


@dataclass
class OptimizerRow:
    """One configuration over the seeds (medians, and the range in brackets)."""

    family: str
    setting: float
    chosen: bool = False
    loss_at_steps: list[float] = field(default_factory=list)
    loss_at_time: list[float] = field(default_factory=list)
    steps_in_time: list[int] = field(default_factory=list)
    ms_per_step: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    diverged: int = 0
    errors: list[str] = field(default_factory=list)


def train(
    name: str, family: Family, value: float, seed: int, steps: int, seconds: float, data: TrainingData
) -> Curve:
    """Train until ``steps`` steps and ``seconds`` of training time are both done."""
    X, y, X_test, y_test = data
    torch.manual_seed(seed)
    model = digits_model(name)
    optimizer = family.make(value, model, data, seed)
    criterion = nn.CrossEntropyLoss()
    step_once = STEPPERS[family.stepper](optimizer, model, criterion)
    curve = Curve(family.name, value, seed)
    batches = loader(X, y, BATCH, seed)

    def evaluate(step: int, elapsed: float) -> bool:
        with torch.no_grad():
            loss = criterion(model(X), y).item()
        curve.steps.append(step)
        curve.seconds.append(elapsed)
        curve.loss.append(loss)
        curve.diverged = not (loss == loss and loss < DIVERGED)
        return not curve.diverged  # a diverged run stops

    step, elapsed = 0, 0.0
    going = evaluate(0, 0.0)
    while going and (step < steps or elapsed < seconds):
        for x, target in batches:
            start = time.perf_counter()
            try:
                step_once(x, target)
            except Exception as exc:  # a peer that raises on a diverging run: recorded, the run stops
                curve.error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"
                curve.diverged, going = True, False
                break
            elapsed += time.perf_counter() - start
            step += 1
            if step % EVAL_EVERY == 0:
                going = evaluate(step, elapsed)
                if not going or (step >= steps and elapsed >= seconds):
                    break
    with torch.no_grad():
        curve.test_accuracy = (model(X_test).argmax(1) == y_test).float().mean().item()
    curve.skipped_steps = getattr(optimizer, "skipped_steps", 0)
    return curve


def _rows(
    curves: Sequence[Curve], families: Sequence[Family], steps: int, seconds: float
) -> list[OptimizerRow]:
    rows: dict[tuple[str, float], OptimizerRow] = {}
    for c in curves:
        row = rows.setdefault((c.family, c.setting), OptimizerRow(c.family, c.setting))
        row.loss_at_steps.append(c.at_step(steps))
        loss, done = c.at_time(seconds)
        row.loss_at_time.append(loss)
        row.steps_in_time.append(done)
        at = c.steps.index(steps) if steps in c.steps else -1
        row.ms_per_step.append(1e3 * c.seconds[at] / max(c.steps[at], 1))
        row.test_accuracy.append(c.test_accuracy or 0.0)
        row.skipped_steps += c.skipped_steps
        row.diverged += c.diverged
        if c.error:
            row.errors.append(c.error)
    for family in families:
        mine = [r for r in rows.values() if r.family == family.name]
        if mine:
            min(mine, key=lambda r: statistics.median(r.loss_at_steps)).chosen = True
    return list(rows.values())


def run_families(
    name: str,
    families: Sequence[Family],
    reference: str | None,
    steps: int,
    seeds: int,
    quick: bool,
    data: TrainingData,
    seconds_budget: float = 0.0,
) -> tuple[list[OptimizerRow], list[Curve], float]:
    """Every configuration of every family, every seed: rows, the chosen curves and the time budget.

    ``reference`` (a family's name) runs first, for the step budget; the median
    time it takes is the time budget the others also run to. Without a
    reference, every family runs to ``steps`` and ``seconds_budget``.
    """
    ordered = sorted(families, key=lambda f: f.name != reference)
    curves: list[Curve] = []
    budget = seconds_budget
    for family in ordered:
        grid = family.grid[:1] if quick else family.grid
        seconds = 0.0 if family.name == reference else budget
        print(
            f"[{name}] {family.name}: {steps} steps, {seconds:.1f} s x {seeds} seeds",
            file=sys.stderr,
            flush=True,
        )
        for value in grid:
            for seed in range(seeds):
                curves.append(train(name, family, value, seed, steps, seconds, data))
        if family.name == reference:
            times = [c.seconds[c.steps.index(steps)] for c in curves if steps in c.steps]
            budget = statistics.median(times) if times else 0.0
    rows = _rows(curves, families, steps, budget)
    chosen = {(r.family, r.setting) for r in rows if r.chosen}
    return rows, [c for c in curves if (c.family, c.setting) in chosen], budget


# ------------------------------------------------------------------ the figure and the tables
def _median_curve(
    curves: Sequence[Curve], axis: str
) -> tuple[list[float], list[float], list[float], list[float]]:
    """Median and range over seeds at the points all runs share (steps), or on a time grid."""
    if axis == "steps":
        common = sorted(set.intersection(*(set(c.steps) for c in curves)))
        values = [[c.at_step(s) for c in curves] for s in common]
        xs = [float(s) for s in common]
    else:
        end = min(c.seconds[-1] for c in curves)
        xs = [end * k / 60 for k in range(1, 61)]
        values = [[c.at_time(t)[0] if c.seconds[0] <= t else c.loss[0] for c in curves] for t in xs]
    return xs, [statistics.median(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def plot_training(results: Sequence[Any], families: Sequence[Family], path: Path) -> None:
    """Loss against steps and against seconds, per problem: the chosen configuration of each family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(10, 3.6 * len(results)), squeeze=False)
    for res, (by_step, by_time) in zip(results, axes):
        for family in families:
            curves = [c for c in res.curves if c.family == family.name]
            if not curves:
                continue
            label = f"{family.name} ({family.setting} {curves[0].setting:g})"
            for ax, axis in ((by_step, "steps"), (by_time, "seconds")):
                xs, mid, low, high = _median_curve(curves, axis)
                (line,) = ax.plot(xs, mid, label=label)
                ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2)
        by_step.axvline(res.step_budget, color="grey", lw=0.8, ls=":")
        by_time.axvline(res.time_budget_s, color="grey", lw=0.8, ls=":")
        for ax, what in ((by_step, "step"), (by_time, "training seconds")):
            ax.set_yscale("log")
            ax.set_xlabel(what)
            ax.set_ylabel("full training loss")
            ax.set_title(
                f"{res.name}: loss against {what}s" if what == "step" else f"{res.name}: against {what}"
            )
            ax.grid(alpha=0.3)
        by_step.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stat(values: Sequence[float], fmt: str) -> str:
    if not values:
        return "-"
    mid = format(statistics.median(values), fmt)
    return mid if len(values) == 1 else f"{mid} [{format(min(values), fmt)}, {format(max(values), fmt)}]"


def training_table(res: Any, families: Sequence[Family]) -> list[str]:
    """The rows of one problem as a Markdown table (chosen configurations first, in bold)."""
    names = [f.name for f in families]
    setting = {f.name: f.setting for f in families}
    out = [
        "| optimizer | setting | loss at the step budget | loss at the time budget | steps in the time "
        "budget | ms per step | test accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    ordered = sorted(
        res.rows, key=lambda r: (names.index(r.family) if r.family in names else 99, not r.chosen, r.setting)
    )
    for r in ordered:
        name = f"**{r.family}**" if r.chosen else r.family
        notes = f" ({r.skipped_steps} steps skipped)" if r.skipped_steps else ""
        notes += f" (diverged: {r.diverged} of {res.seeds} seeds)" if r.diverged else ""
        notes += f" (raised: {r.errors[0]})" if r.errors else ""
        cells = [
            f"{name}{notes}",
            f"{setting.get(r.family, 'lr')} {r.setting:g}",
            stat(r.loss_at_steps, ".3g"),
            stat(r.loss_at_time, ".3g"),
            stat(r.steps_in_time, ".0f"),
            stat(r.ms_per_step, ".2f"),
            stat(r.test_accuracy, ".3f"),
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out
