"""Training scripts for each family of curvkit's optimizers, on the bundled digits.

Run ``python docs/train_optimizers.py [--steps 200] [--only kfac,shampoo]``: each
function below is a complete training loop for one family (the model, the
optimizer, the loop), printing the full training loss before and after.
``tests/test_docs_optimizers.py`` runs every one of them for a few steps. The
settings are each family's best learning rate on this problem in
``python -m benchmarks --only optimizers`` (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator

import torch
from torch import nn

import curvkit
from curvkit.datasets import load_dataset
from curvkit.models import digits_mlp

X, y = load_dataset("digits-train")
criterion = nn.CrossEntropyLoss()


def batches(batch_size: int = 64, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled mini-batches of the training set, epoch after epoch."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            index = order[start : start + batch_size]
            yield X[index], y[index]


def full_loss(model: nn.Module) -> float:
    """The mean cross-entropy over the whole training set."""
    with torch.no_grad():
        return criterion(model(X), y).item()


def kfac(steps: int) -> tuple[float, float]:
    """K-FAC (and EKFAC): the step takes the batch, for its Kronecker factors."""
    torch.manual_seed(0)
    model = digits_mlp()
    optimizer = curvkit.optim.KFAC(model.parameters(), model=model, loss_fn="cross_entropy", lr=0.03)
    before = full_loss(model)
    for _, (x, target) in zip(range(steps), batches()):
        optimizer.zero_grad()
        criterion(model(x), target).backward()
        optimizer.step(batch=(x, target))
    return before, full_loss(model)


def hessian_free(steps: int) -> tuple[float, float]:
    """Hessian-free (and Newton, NaturalGradient): the batch gives loss, gradient and curvature."""
    torch.manual_seed(0)
    model = digits_mlp()
    optimizer = curvkit.optim.HessianFree(
        model.parameters(), model=model, loss_fn="cross_entropy", cg_maxiter=20
    )
    before = full_loss(model)
    for _, (x, target) in zip(range(steps), batches()):
        optimizer.step(batch=(x, target))  # no zero_grad or backward needed
    return before, full_loss(model)


def natural_gradient(steps: int) -> tuple[float, float]:
    """The natural gradient with the batch's low-rank GGN, solved in the batch x outputs space."""
    torch.manual_seed(0)
    model = digits_mlp()
    optimizer = curvkit.optim.NaturalGradient(
        model.parameters(), model=model, loss_fn="cross_entropy", lr=0.3
    )
    before = full_loss(model)
    for _, (x, target) in zip(range(steps), batches(batch_size=32)):
        optimizer.step(batch=(x, target))
    return before, full_loss(model)


def adahessian(steps: int) -> tuple[float, float]:
    """AdaHessian (and DiagonalNewton, SophiaH): Hutchinson probes through the gradient's graph."""
    torch.manual_seed(0)
    model = digits_mlp()
    optimizer = curvkit.optim.AdaHessian(model.parameters(), lr=0.1)
    before = full_loss(model)
    for _, (x, target) in zip(range(steps), batches()):
        optimizer.zero_grad()
        criterion(model(x), target).backward(create_graph=True)  # the graph the probes go through
        optimizer.step()
    return before, full_loss(model)


def shampoo(steps: int) -> tuple[float, float]:
    """Shampoo with AdaGrad grafting: the usual loop."""
    torch.manual_seed(0)
    model = digits_mlp()
    optimizer = curvkit.optim.Shampoo(model.parameters(), lr=0.03)
    before = full_loss(model)
    for _, (x, target) in zip(range(steps), batches()):
        optimizer.zero_grad()
        criterion(model(x), target).backward()
        optimizer.step()
    return before, full_loss(model)


def preconditioned_sgd(steps: int) -> tuple[float, float]:
    """Any registered estimator in front of a first-order optimizer: KFAC-preconditioned SGD."""
    torch.manual_seed(0)
    model = digits_mlp()
    preconditioner = curvkit.optim.CurvaturePreconditioner(
        model, "kfac", loss_fn="cross_entropy", damping=1e-2
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    before = full_loss(model)
    for _, (x, target) in zip(range(steps), batches()):
        optimizer.zero_grad()
        criterion(model(x), target).backward()
        preconditioner.step(batch=(x, target))  # rewrites .grad
        optimizer.step()
    return before, full_loss(model)


def newton_summary(steps: int) -> tuple[float, float]:
    """NewtonSummary (Wolinski 2023): per-subset learning rates from the Newton summary."""
    torch.manual_seed(0)
    model = digits_mlp()
    param_groups, _ = curvkit.partition.canonical(model)
    optimizer = curvkit.NewtonSummary(
        param_groups,
        lambda x, target: criterion(model(x), target),
        batches(batch_size=256, seed=1000),
        damping=1.0,
        dct_nesterov={"use": True, "damping_int": 10.0},
        period_hg=10,
        mom_lrs=0.5,
        remove_negative=True,
        momentum=0.9,
        momentum_damp=0.9,
    )
    before = full_loss(model)
    for _, (x, target) in zip(range(steps), batches()):
        optimizer.zero_grad()
        criterion(model(x), target).backward()
        optimizer.step()
    return before, full_loss(model)


SCRIPTS: dict[str, Callable[[int], tuple[float, float]]] = {
    "kfac": kfac,
    "hessian-free": hessian_free,
    "natural-gradient": natural_gradient,
    "adahessian": adahessian,
    "shampoo": shampoo,
    "preconditioned-sgd": preconditioned_sgd,
    "newton-summary": newton_summary,
}
"""The training scripts, by family."""


def main(argv: list[str] | None = None) -> None:
    """Run the selected scripts and print the loss before and after."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--only", default=",".join(SCRIPTS), help=f"some of {', '.join(SCRIPTS)}")
    args = parser.parse_args(argv)
    for name in args.only.split(","):
        before, after = SCRIPTS[name](args.steps)
        print(f"{name:20s} training loss {before:.3f} -> {after:.4f} after {args.steps} steps")


if __name__ == "__main__":
    main()
