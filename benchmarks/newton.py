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

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import curvkit
from benchmarks.hvp import ProblemRecord
from benchmarks.timing import OtherLoad, percent, time_interleaved
from benchmarks.training import (
    SEEDS,
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

__all__ = ["NEWTON_PROBLEMS", "NewtonResult", "render_newton", "run_newton"]

NEWTON_PROBLEMS = ("mlp", "cnn")
STEPS = {"mlp": 600, "cnn": 300}
QUICK_STEPS = {"mlp": 100, "cnn": 60}
HG_BATCH = 256
PERIOD_HG = 10
COST_ROUNDS = 15
FIGURE = "newton_training.png"


def _newton_summary(damping: float, model: nn.Module, data: TrainingData, seed: int) -> curvkit.NewtonSummary:
    X, y = data[0], data[1]
    groups, _ = curvkit.partition.canonical(model)
    criterion = nn.CrossEntropyLoss()
    return curvkit.NewtonSummary(
        groups,
        lambda x, target: criterion(model(x), target),
        loader(X, y, HG_BATCH, seed + 1000),
        damping=damping,
        dct_nesterov={"use": True, "damping_int": 10.0},
        period_hg=PERIOD_HG,
        mom_lrs=0.5,
        remove_negative=True,
        momentum=0.9,
        momentum_damp=0.9,
    )


FAMILIES = (
    Family("SGD", "lr", (0.03, 0.1, 0.3, 1.0), sgd),
    Family("Adam", "lr", (1e-3, 3e-3, 1e-2, 3e-2, 0.1), adam),
    Family("NewtonSummary", "damping", (0.03, 0.1, 0.3, 1.0, 3.0), _newton_summary),
)
"""The optimizers compared, with their grids (each brackets its best value on both problems)."""


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


def _costs(name: str, X: Tensor, y: Tensor) -> tuple[dict[str, float], int]:
    """Gradient, summary, HVP and d3 product on one batch of :data:`HG_BATCH`, in ms (medians)."""
    torch.manual_seed(0)
    model = digits_model(name)
    criterion = nn.CrossEntropyLoss()
    xb, yb = X[:HG_BATCH], y[:HG_BATCH]
    params = list(model.parameters())
    optimizer = _newton_summary(0.1, model, (xb, yb, xb, yb), 0)
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


def run_newton_problem(name: str, quick: bool) -> NewtonResult:
    """Every configuration and seed on one problem, and the costs."""
    data = digits()
    X, y = data[0], data[1]
    model = digits_model(name)
    res = NewtonResult(name, digits_description(name), sum(p.numel() for p in model.parameters()), len(y))
    load = OtherLoad().start()
    res.costs_ms, res.subsets = _costs(name, X, y)
    steps = (QUICK_STEPS if quick else STEPS)[name]
    res.seeds = 1 if quick else SEEDS
    res.rows, res.curves, res.time_budget_s = run_families(
        name, FAMILIES, "NewtonSummary", steps, res.seeds, quick, data
    )
    res.step_budget = steps
    res.other_load = load.stop()
    return res


def run_newton(problems: Sequence[str] | None, quick: bool, out: Path | None = None) -> list[NewtonResult]:
    """The section on the selected problems (``mlp``, ``cnn``); draws the figure into ``out``."""
    names = [p for p in (problems or NEWTON_PROBLEMS) if p in NEWTON_PROBLEMS]
    results = [run_newton_problem(name, quick) for name in names]
    if out is not None and results:
        plot_training(results, FAMILIES, out / FIGURE)
    return results


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
        load = percent(res.other_load)
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
            *training_table(res, FAMILIES),
            "",
        ]
    return out
