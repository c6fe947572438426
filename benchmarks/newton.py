"""Training with ``NewtonSummary`` against SGD and Adam, and the cost of its third-order information.

``python -m benchmarks --only newton`` (``--problems mlp`` or ``cnn`` to run one).
On the bundled digits (:func:`curvkit.datasets.load_dataset`: ``digits-train``,
1,433 samples, to train on; ``digits-test``, 364, for the accuracy), two models
of :mod:`curvkit.models`: ``mlp`` (``digits_mlp``: 64-32-32-10, tanh) and ``cnn``
(``digits_cnn``: two convolutions, ReLU, pooling, a linear head), float32, mean
cross-entropy, mini-batches of 64 (reshuffled every epoch from a seeded
generator; the same batches for every optimizer of one seed).

* **Optimizers.** SGD with momentum 0.9 and Adam, each with a small grid of
  learning rates; ``NewtonSummary`` with the reference package's example
  settings (canonical partition, ``damping_int`` 10, ``period_hg`` 10, ``mom_lrs``
  0.5, ``remove_negative``, momentum 0.9, ``momentum_damp`` 0.9; ``hg_loader``:
  batches of 256 of the training set, seeded) and a grid of ``damping``. Every
  configuration runs with :data:`SEEDS` seeds (initialisation and batch order); a
  family's row is its configuration of lowest median loss at the step budget
  (the others are listed).
* **Budgets.** Every run trains for the step budget, then on until the time
  budget: the median time ``NewtonSummary`` (the slowest) needs for the step
  budget. Wall time counts training only: the full training loss, evaluated
  every :data:`EVAL_EVERY` steps for the curves, is not timed.
* **Costs.** On one batch of 256 at the initial weights: a gradient (loss and
  backward), one summary (``g_bar``, ``H_bar``, ``D3`` over the canonical subsets
  and the cubic solve: what ``NewtonSummary`` does every ``period_hg`` steps), a
  Hessian-vector product and a ``d3`` product (the ``hessian`` and ``d3``
  estimators' ``A @ v``), timed interleaved (median of :data:`COST_ROUNDS`).

The curves are drawn in ``newton_training.png`` (loss against steps and against
seconds, median over seeds, the band their range).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import curvkit
from benchmarks.hvp import ProblemRecord
from benchmarks.timing import OtherLoad, time_interleaved
from curvkit.datasets import load_dataset
from curvkit.models import digits_cnn, digits_mlp

__all__ = ["NEWTON_PROBLEMS", "NewtonResult", "render_newton", "run_newton"]

NEWTON_PROBLEMS = ("mlp", "cnn")
STEPS = {"mlp": 600, "cnn": 300}
QUICK_STEPS = {"mlp": 100, "cnn": 60}
SEEDS = 3
BATCH = 64
HG_BATCH = 256
EVAL_EVERY = 20
DIVERGED = 1e3
"""A training loss above which (or NaN) a run has diverged and stops (log 10 = 2.3 at the start)."""
PERIOD_HG = 10
COST_ROUNDS = 15
GRIDS: dict[str, Sequence[float]] = {
    "SGD": (0.03, 0.1, 0.3, 1.0),
    "Adam": (1e-3, 3e-3, 1e-2, 3e-2, 0.1),
    "NewtonSummary": (0.03, 0.1, 0.3, 1.0, 3.0),
}
"""Per family, the learning rates (SGD, Adam) or ``damping`` values (NewtonSummary) tried."""
FIGURE = "newton_training.png"


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


@dataclass
class NewtonResult(ProblemRecord):
    """The training comparison and the costs on one problem."""

    subsets: int = 0
    step_budget: int = 0
    time_budget_s: float = 0.0
    seeds: int = 0
    costs_ms: dict[str, float] = field(default_factory=dict)
    rows: list[OptimizerRow] = field(default_factory=list)
    curves: list[Curve] = field(default_factory=list)
    other_load: float | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dictionary."""
        return asdict(self)


def _model(name: str) -> nn.Module:
    return digits_mlp() if name == "mlp" else digits_cnn()


def _description(name: str, model: nn.Module) -> str:
    kind = "MLP 64-32-32-10 (tanh)" if name == "mlp" else "CNN (Conv 1->8, Conv 8->16, ReLU, pooling, Linear)"
    return f"{kind} on the bundled digits (1,433 training samples), float32"


def _loader(X: Tensor, y: Tensor, batch: int, seed: int) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(X, y)
    return torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, generator=generator)


def _optimizer(family: str, setting: float, model: nn.Module, X: Tensor, y: Tensor, seed: int) -> Any:
    if family == "SGD":
        return torch.optim.SGD(model.parameters(), lr=setting, momentum=0.9)
    if family == "Adam":
        return torch.optim.Adam(model.parameters(), lr=setting)
    groups, _ = curvkit.partition.canonical(model)
    criterion = nn.CrossEntropyLoss()
    return curvkit.NewtonSummary(
        groups,
        lambda x, target: criterion(model(x), target),
        _loader(X, y, HG_BATCH, seed + 1000),
        damping=setting,
        dct_nesterov={"use": True, "damping_int": 10.0},
        period_hg=PERIOD_HG,
        mom_lrs=0.5,
        remove_negative=True,
        momentum=0.9,
        momentum_damp=0.9,
    )


def _train(
    name: str, family: str, setting: float, seed: int, steps: int, seconds: float, data: tuple[Tensor, ...]
) -> Curve:
    """Train until ``steps`` steps and ``seconds`` of training time are both done."""
    X, y, X_test, y_test = data
    torch.manual_seed(seed)
    model = _model(name)
    optimizer = _optimizer(family, setting, model, X, y, seed)
    criterion = nn.CrossEntropyLoss()
    curve = Curve(family, setting, seed)
    loader = _loader(X, y, BATCH, seed)

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
        for x, target in loader:
            start = time.perf_counter()
            optimizer.zero_grad()
            criterion(model(x), target).backward()
            optimizer.step()
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


def _costs(name: str, X: Tensor, y: Tensor) -> tuple[dict[str, float], int]:
    """Gradient, summary, HVP and d3 product on one batch of :data:`HG_BATCH`, in ms (medians)."""
    torch.manual_seed(0)
    model = _model(name)
    criterion = nn.CrossEntropyLoss()
    xb, yb = X[:HG_BATCH], y[:HG_BATCH]
    params = list(model.parameters())
    optimizer = _optimizer("NewtonSummary", 0.1, model, xb, yb, 0)
    optimizer.hg_loader = [(xb, yb)]
    optimizer.zero_grad()
    criterion(model(xb), yb).backward()
    optimizer._update_momentum()  # the summary's direction: the gradient
    problem = curvkit.Problem(model, "cross_entropy", (xb, yb), batch_size=HG_BATCH)
    H = curvkit.curvature("hessian", problem)
    T = curvkit.curvature("d3", problem)
    v = torch.randn(problem.dim, generator=torch.Generator().manual_seed(1))
    H @ v, T @ v  # warm: graphs, auto strategies' trials

    def gradient(_: int) -> None:
        torch.autograd.grad(criterion(model(xb), yb), params)

    calls: dict[str, Callable[[int], Any]] = {
        "gradient": gradient,
        "summary": lambda _: optimizer._refresh_learning_rates(),
        "hvp": lambda _: H @ v,
        "d3": lambda _: T @ v,
    }
    timings = time_interleaved(calls, COST_ROUNDS, warmup=2)
    return {k: t.median_ms for k, t in timings.items()}, len(optimizer.param_groups)


def _rows(curves: Sequence[Curve], steps: int, seconds: float) -> list[OptimizerRow]:
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
    for family in GRIDS:
        mine = [r for r in rows.values() if r.family == family]
        best = min(mine, key=lambda r: statistics.median(r.loss_at_steps))
        best.chosen = True
    return list(rows.values())


def run_newton_problem(name: str, quick: bool) -> NewtonResult:
    """Every configuration and seed on one problem, and the costs."""
    X, y = load_dataset("digits-train")
    X_test, y_test = load_dataset("digits-test")
    data = (X, y, X_test, y_test)
    model = _model(name)
    res = NewtonResult(name, _description(name, model), sum(p.numel() for p in model.parameters()), len(y))
    load = OtherLoad().start()
    res.costs_ms, res.subsets = _costs(name, X, y)
    steps = (QUICK_STEPS if quick else STEPS)[name]
    seeds = 1 if quick else SEEDS
    grids = {family: grid[:1] if quick else grid for family, grid in GRIDS.items()}
    curves = []
    print(f"[{name}] NewtonSummary, {steps} steps x {seeds} seeds", file=sys.stderr, flush=True)
    for setting in grids["NewtonSummary"]:
        for seed in range(seeds):
            curves.append(_train(name, "NewtonSummary", setting, seed, steps, 0.0, data))
    times = [c.seconds[c.steps.index(steps)] for c in curves if steps in c.steps]
    budget = statistics.median(times) if times else 0.0
    for family in ("SGD", "Adam"):
        print(f"[{name}] {family} to {steps} steps and {budget:.1f} s", file=sys.stderr, flush=True)
        for setting in grids[family]:
            for seed in range(seeds):
                curves.append(_train(name, family, setting, seed, steps, budget, data))
    res.step_budget, res.time_budget_s, res.seeds = steps, budget, seeds
    res.rows = _rows(curves, steps, budget)
    chosen = {(r.family, r.setting) for r in res.rows if r.chosen}
    res.curves = [c for c in curves if (c.family, c.setting) in chosen]
    res.other_load = load.stop()
    return res


def run_newton(problems: Sequence[str] | None, quick: bool, out: Path | None = None) -> list[NewtonResult]:
    """The section on the selected problems (``mlp``, ``cnn``); draws the figure into ``out``."""
    names = [p for p in (problems or NEWTON_PROBLEMS) if p in NEWTON_PROBLEMS]
    results = [run_newton_problem(name, quick) for name in names]
    if out is not None and results:
        plot_newton(results, out / FIGURE)
    return results


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


def plot_newton(results: Sequence[NewtonResult], path: Path) -> None:
    """Loss against steps and against seconds, per problem: the chosen configuration of each family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(10, 3.6 * len(results)), squeeze=False)
    for res, (by_step, by_time) in zip(results, axes):
        for family in GRIDS:
            curves = [c for c in res.curves if c.family == family]
            if not curves:
                continue
            label = f"{family} ({'damping' if family == 'NewtonSummary' else 'lr'} {curves[0].setting:g})"
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


def _stat(values: Sequence[float], fmt: str) -> str:
    if not values:
        return "-"
    mid = format(statistics.median(values), fmt)
    return mid if len(values) == 1 else f"{mid} [{format(min(values), fmt)}, {format(max(values), fmt)}]"


NEWTON_READING = [
    "## Training with NewtonSummary (Wolinski 2023), SGD and Adam",
    "",
    "`python -m benchmarks --only newton` (see `benchmarks/newton.py`): the bundled digits, mini-batches of "
    "64, float32, the same batches for every optimizer of a seed. Each family is shown with its "
    "configuration of lowest median loss at the step budget (the others below it); figures are medians "
    "over seeds with the range in brackets. The time budget is the median time NewtonSummary needs for the "
    "step budget; SGD and Adam run on until it. Training time only (the loss evaluations for the curves "
    f"are not timed). Curves: `{FIGURE}`.",
    "",
]


def render_newton(results: Sequence[NewtonResult]) -> list[str]:
    """The section as Markdown lines."""
    out = list(NEWTON_READING)
    for res in results:
        c = res.costs_ms
        load = "unknown" if res.other_load is None else f"{100 * res.other_load:.0f}%"
        per_step = c["summary"] / c["gradient"] / PERIOD_HG
        out += [
            f"### {res.name}: {res.description}",
            "",
            f"P = {res.params:,} parameters, S = {res.subsets} subsets (canonical), {res.seeds} seed(s); "
            f"step budget {res.step_budget}, time budget {res.time_budget_s:.2f} s. "
            f"CPU used by other processes meanwhile: {load}.",
            "",
            f"Costs on one batch of {HG_BATCH} (median of {COST_ROUNDS}): gradient {c['gradient']:.2f} ms; "
            f"one summary (g_bar, H_bar, D3 and the cubic solve) {c['summary']:.2f} ms = "
            f"**{c['summary'] / c['gradient']:.1f} x a gradient** (every {PERIOD_HG} steps: "
            f"{per_step:.2f} gradients per step on average); HVP {c['hvp']:.2f} ms "
            f"({c['hvp'] / c['gradient']:.1f} x a gradient); `d3` product {c['d3']:.2f} ms = "
            f"**{c['d3'] / c['hvp']:.1f} x an HVP**.",
            "",
            "| optimizer | setting | loss at the step budget | loss at the time budget | steps in the time "
            "budget | ms per step | test accuracy |",
            "|---|---|---|---|---|---|---|",
        ]
        ordered = sorted(res.rows, key=lambda r: (list(GRIDS).index(r.family), not r.chosen, r.setting))
        for r in ordered:
            name = f"**{r.family}**" if r.chosen else r.family
            setting = f"{'damping' if r.family == 'NewtonSummary' else 'lr'} {r.setting:g}"
            skipped = f" ({r.skipped_steps} steps skipped)" if r.skipped_steps else ""
            skipped += f" (diverged: {r.diverged} of {res.seeds} seeds)" if r.diverged else ""
            cells = [
                f"{name}{skipped}",
                setting,
                _stat(r.loss_at_steps, ".3g"),
                _stat(r.loss_at_time, ".3g"),
                _stat(r.steps_in_time, ".0f"),
                _stat(r.ms_per_step, ".2f"),
                _stat(r.test_accuracy, ".3f"),
            ]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return out
