"""The data-parallel battery's worker: run by ``torchrun`` (several processes) or alone (the reference).

``python tests/distributed_worker.py OUT [MODE]``: computes, on small float64
problems, every registered estimator's products, a loss and gradient, eigenvalues
and a trace, for each form of data, and saves them to ``OUT/rank<r>.pt`` (every
process saves its own, so that the test can check that the processes agree with
each other and with a run of one process). ``MODE`` ``fail`` makes process 1
raise after the first product, to check that the others end too; ``mismatch``
reduces sums of different sizes, which every process must refuse; ``bad-shard``
puts a bad sample in process 1's shard, which must end every process with its message.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import curvkit
from curvkit.data import LocalShard
from curvkit.testing.cases import get_case

CASES = ("tanh-mlp-ce", "cnn-pool-ce", "dict-inputs-nll", "batchnorm-eval-bce")
"""Conformance cases run (13, 9, 10 and 10 samples: uneven shards for 2 and 3 processes)."""

OPTIONS = {"fisher": {"mode": "exact"}}
"""Estimator options for a comparison to rounding (the Monte-Carlo Fisher is run apart)."""


MC_SEEDS = 24
"""Seeds of the Monte-Carlo Fisher, whose data-parallel products are another draw (equal in expectation)."""


def _forms(case_name: str) -> dict[str, object]:
    """The case's data in each form a problem accepts: keyed by the form's name."""
    case = get_case(case_name)
    _, inputs, targets = case.build(torch.float64)
    rank, size = curvkit.distributed.process()
    n = targets.shape[0]
    pair = (inputs, targets)
    forms: dict[str, object] = {"pair": pair}
    if isinstance(inputs, torch.Tensor):
        forms["dataset"] = torch.utils.data.TensorDataset(inputs, targets)
        forms["batches"] = [(inputs[i : i + 4], targets[i : i + 4]) for i in range(0, n, 4)]
        lo, hi = rank * n // size, (rank + 1) * n // size  # the user's own shard of the samples
        forms["local-shard"] = LocalShard((inputs[lo:hi], targets[lo:hi]))
    return forms


def battery(fail: bool = False) -> dict[str, object]:
    """Every figure of the battery, keyed by case, form and what was computed."""
    results: dict[str, object] = {}
    rank = curvkit.distributed.process()[0]
    for case_name in CASES:
        case = get_case(case_name)
        for form, data in _forms(case_name).items():
            torch.manual_seed(0)
            model, _, _ = case.build(torch.float64)
            problem = curvkit.Problem(model, case.loss, data, batch_size=3)
            key = f"{case_name}/{form}"
            loss, gradient = problem.loss_and_gradient()
            results[f"{key}/loss"], results[f"{key}/gradient"] = loss, gradient
            V = torch.randn(problem.dim, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            for spec in curvkit.estimators():
                operator = curvkit.curvature(spec.name, problem, **OPTIONS.get(spec.name, {}))
                results[f"{key}/{spec.name}"] = operator @ V
                if fail and rank == 1:
                    raise RuntimeError("process 1 fails on purpose")
            if form != "pair":
                continue
            H = curvkit.curvature("hessian", problem)
            eigen = curvkit.eigenvalues(H, k=2, seed=0)
            results[f"{key}/eigenvalues"] = torch.as_tensor(eigen.values)
            results[f"{key}/trace"] = torch.as_tensor(
                curvkit.trace(H, method="hutchinson", matvecs=8, seed=0).estimate
            )
            results[f"{key}/fisher-mc"] = torch.stack(
                [curvkit.curvature("fisher", problem, mode="mc", seed=seed) @ V for seed in range(MC_SEEDS)]
            )
            results[f"{key}/fresh-seed"] = torch.tensor(curvkit.curvature("fisher", problem).seed)
    return results


def _bad_shards() -> list[str]:
    """What each step of a run with a bad sample in process 1's shard raised, one line each.

    The case's 13 samples are split 6 and 7; a class index out of range at sample
    6 fails process 1's first batch (``check_batch``), at sample 12 its last batch
    of the pass. A step checks the batch and then takes a pass, as ``curvkit
    analyze`` does, or checks it and then broadcasts (a fresh seed: no pass to
    meet in); one pass crashes in process 1 with an error that is no curvkit
    error; the fifth step, on good data, shows that the processes are still in
    step after the failures. In the last, the data are one batch fixed by the
    user, so process 1 has none (a :class:`curvkit.ShardError`, whose message
    names the process already).
    """
    case = get_case("tanh-mlp-ce")
    rank = curvkit.distributed.process()[0]

    def crash_in_process_1(inputs, targets):  # a bug, not a curvkit error, in one process
        if rank == 1:
            raise RuntimeError("process 1 crashes on purpose")
        return problem.loss_terms(problem.params, inputs, targets)

    steps = {
        "check and pass": lambda: problem.check_batch() or problem.loss_and_gradient()[0].item(),
        "check, then a broadcast": lambda: problem.check_batch() or curvkit.distributed.shared_seed(),
        "a crash": lambda: problem.data_mean(crash_in_process_1),
    }
    lines = []
    for bad, step in (
        (6, "check and pass"),
        (12, "check and pass"),
        (6, "check, then a broadcast"),
        (None, "a crash"),
        (None, "check and pass"),
        ("one batch", "check and pass"),
    ):
        torch.manual_seed(0)
        model, inputs, targets = case.build(torch.float64)
        if isinstance(bad, int):
            targets = targets.clone()
            targets[bad] = 99
        data = [(inputs, targets)] if bad == "one batch" else (inputs, targets)
        problem = curvkit.Problem(model, case.loss, data, batch_size=3)
        try:
            lines.append(f"done {steps[step]()}")
        except Exception as exc:  # what each process ends with
            lines.append(f"{type(exc).__name__}: {exc}")
    return lines


def main() -> None:
    out = Path(sys.argv[1])
    fail = len(sys.argv) > 2 and sys.argv[2] == "fail"
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    if len(sys.argv) > 2 and sys.argv[2] == "bad-shard":  # one process's data fails: all end together
        rank = curvkit.distributed.process()[0]
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{rank}.txt").write_text("\n".join(_bad_shards()))
        dist.destroy_process_group()
        return
    if len(sys.argv) > 2 and sys.argv[2] == "mismatch":  # sums of different sizes: every process raises
        rank = curvkit.distributed.process()[0]
        try:
            curvkit.distributed.reduce_sums((torch.zeros(3 + rank), 1.0), 2.0)
            message = "no error"
        except curvkit.CurvkitError as exc:
            message = str(exc)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{rank}.txt").write_text(message)
        dist.destroy_process_group()
        return
    try:
        results = battery(fail)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(results, out / f"rank{curvkit.distributed.process()[0]}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
