"""RunningCurvature: an estimator's curvature averaged over mini-batches, and its state."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import curvkit
from curvkit.errors import CurvkitError, NonFiniteError
from curvkit.running import RunningCurvature

DT = torch.float64


def problem_and_batches(n_batches: int = 3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(6, 3, dtype=DT, generator=generator), torch.randint(0, 2, (6,), generator=generator))
        for _ in range(n_batches)
    ]
    return curvkit.Problem(model, "cross_entropy", batches[0]), batches


def test_kronecker_factors_are_averaged_separately_as_martens_and_grosse():
    problem, batches = problem_and_batches()
    decay = 0.7
    running = RunningCurvature("kfac", decay=decay)
    expected: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for inputs, targets in batches:
        averaged = running.update(problem.on_batch(inputs, targets))
        for block in curvkit.curvature("kfac", problem.on_batch(inputs, targets)).structured().blocks:
            old = expected.get(block.name)
            expected[block.name] = (
                (block.A, block.B)
                if old is None
                else (decay * old[0] + (1 - decay) * block.A, decay * old[1] + (1 - decay) * block.B)
            )
    assert running.updates == 3 and isinstance(averaged, curvkit.KroneckerOperator)
    for block in averaged.blocks:
        A, B = expected[block.name]
        torch.testing.assert_close(block.A, A, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(block.B, B, rtol=1e-13, atol=1e-15)
    # bar B (x) bar A, not the average of the products: the dense matrix is that of the averaged factors
    blocks = [
        curvkit.KroneckerBlock(b.weight, b.bias, *expected[b.name], name=b.name) for b in averaged.blocks
    ]
    dense = curvkit.KroneckerOperator(averaged.layout, blocks, dtype=DT, device="cpu").to_dense()
    torch.testing.assert_close(averaged.to_dense(), dense, rtol=1e-13, atol=1e-15)


def test_decay_zero_keeps_the_newest_batch_and_the_first_batch_starts_the_average():
    problem, batches = problem_and_batches(2)
    for decay in (0.0, 0.9):
        running = RunningCurvature("kfac", decay=decay)
        first = running.update(problem.on_batch(*batches[0])).to_dense()
        torch.testing.assert_close(first, curvkit.curvature("kfac", problem.on_batch(*batches[0])).to_dense())
    newest = running_of(0.0, problem, batches).to_dense()
    torch.testing.assert_close(newest, curvkit.curvature("kfac", problem.on_batch(*batches[1])).to_dense())


def running_of(decay, problem, batches):
    running = RunningCurvature("kfac", decay=decay)
    for b in batches:
        average = running.update(problem.on_batch(*b))
    return average


def test_diagonal_and_dense_operators_are_averaged_in_their_structure():
    layout = curvkit.ParameterLayout(("w",), (torch.Size([3]),))
    running = RunningCurvature("plugin", decay=0.25)
    for d in (torch.tensor([1.0, 2.0, 3.0], dtype=DT), torch.tensor([5.0, 6.0, 7.0], dtype=DT)):
        op = curvkit.DiagonalOperator(d, layout)
        running.commit(running.fold(op), op)
    average = running.operator()
    assert isinstance(average, curvkit.DiagonalOperator)
    torch.testing.assert_close(average.values, torch.tensor([4.0, 5.0, 6.0], dtype=DT), rtol=0, atol=1e-15)
    dense = RunningCurvature("plugin", decay=0.5)
    for M in (torch.eye(3, dtype=DT), 3 * torch.eye(3, dtype=DT)):
        op = curvkit.DenseOperator(M, layout, symmetric=True, psd=True)
        dense.commit(dense.fold(op), op)
    torch.testing.assert_close(dense.operator().to_dense(), 2 * torch.eye(3, dtype=DT))
    with pytest.raises(CurvkitError, match="a dense curvature cannot be folded into a diagonal average"):
        running.fold(op)


def test_operators_without_an_averaged_structure_are_refused_in_one_line():
    problem, batches = problem_and_batches(1)
    with pytest.raises(CurvkitError, match="estimator 'hessian'.s .* has no structure to average") as error:
        RunningCurvature("hessian").update(problem.on_batch(*batches[0]))
    assert "\n" not in str(error.value)
    ekfac = curvkit.curvature("ekfac", problem.on_batch(*batches[0])).structured()
    with pytest.raises(CurvkitError, match="eigenvalue corrections"):
        RunningCurvature("ekfac").fold(ekfac)
    for decay in (1.0, -0.1, True, "0.5", float("nan"), torch.ones(2)):
        with pytest.raises(ValueError, match=r"decay must be a number in \[0, 1\)"):
            RunningCurvature("kfac", decay=decay)
    # a one-element tensor (refused before) is taken as its value, kept as a float
    running = RunningCurvature("kfac", decay=torch.tensor([0.5]))
    assert running.decay == 0.5 and type(running.decay) is float and running.state_dict()["decay"] == 0.5


def test_a_non_finite_batch_is_refused_and_leaves_the_average():
    problem, batches = problem_and_batches(2)
    running = RunningCurvature("kfac", decay=0.5)
    before = running.update(problem.on_batch(*batches[0])).to_dense()
    inputs = batches[1][0].clone()
    inputs[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="not finite"):  # from the estimator, or the average
        running.update(problem.on_batch(inputs, batches[1][1]))
    assert running.updates == 1 and torch.equal(running.operator().to_dense(), before)


def test_the_state_round_trips_through_weights_only_loading_and_training_continues_identically():
    problem, batches = problem_and_batches(3)
    running = RunningCurvature("kfac", decay=0.8)
    for b in batches[:2]:
        running.update(problem.on_batch(*b))
    buffer = io.BytesIO()
    torch.save(running.state_dict(), buffer)
    buffer.seek(0)
    restored = RunningCurvature("kfac", decay=0.1)  # the saved decay wins
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.decay == 0.8 and restored.updates == 2
    torch.testing.assert_close(restored.operator().to_dense(), running.operator().to_dense(), rtol=0, atol=0)
    a = running.update(problem.on_batch(*batches[2])).to_dense()
    b = restored.update(problem.on_batch(*batches[2])).to_dense()
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="a RunningCurvature state of estimator 'kfac', not 'ggn'"):
        RunningCurvature("ggn").load_state_dict(running.state_dict())


def test_to_moves_the_average_to_another_device():
    problem, batches = problem_and_batches(2)
    running = RunningCurvature("kfac", decay=0.8)
    for b in batches:
        running.update(problem.on_batch(*b))
    moved = running.to("meta")  # a device without data: where a state loaded on the CPU goes to a GPU
    tensors = [v for part in moved._average.values() for v in part.values() if isinstance(v, torch.Tensor)]
    assert moved is running and tensors and all(t.device.type == "meta" for t in tensors)
    assert running.state_dict()["device"] == "meta"
