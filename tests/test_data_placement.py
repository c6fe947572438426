"""``curvkit analyze`` moves a tensor pair to the run's device and dtype once, not per batch and product."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

import curvkit
import curvkit.runs
from curvkit.runs import place_tensor_pair


def _pair(n: int = 10):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=gen), torch.randint(0, 2, (n,), generator=gen)


def test_a_tensor_pair_is_cut_and_converted_once():
    X, y = _pair()
    inputs, targets = place_tensor_pair((X, y), torch.device("cpu"), torch.float64, max_samples=7)
    assert inputs.dtype == torch.float64 and torch.equal(inputs, X[:7].double())
    assert targets.dtype == torch.int64 and torch.equal(targets, y[:7])  # class indices keep their dtype
    dict_inputs, _ = place_tensor_pair(({"a": X, "b": y}, y), torch.device("cpu"), torch.float64, None)
    assert dict_inputs["a"].dtype == torch.float64 and dict_inputs["b"].dtype == torch.int64
    _, regression = place_tensor_pair((X, X[:, 0]), torch.device("cpu"), torch.float64, None)
    assert regression.dtype == torch.float64  # floating targets (mse) follow the run's dtype


def test_data_already_in_place_or_not_a_pair_are_left_as_given(monkeypatch):
    X, y = _pair()
    data = (X, y)
    assert place_tensor_pair(data, torch.device("cpu"), torch.float32, None) is data
    dataset = TensorDataset(X, y)
    assert place_tensor_pair(dataset, torch.device("cpu"), torch.float64, None) is dataset
    monkeypatch.setattr(curvkit.distributed, "process", lambda: (0, 2))  # each process reads its shard
    assert place_tensor_pair(data, torch.device("cpu"), torch.float64, None) is data
    monkeypatch.undo()
    monkeypatch.setattr(curvkit.runs, "fits", lambda nbytes, device: False)  # too large for the device
    assert place_tensor_pair(data, torch.device("cpu"), torch.float64, None) is data


def test_the_passes_of_a_problem_on_placed_data_copy_nothing():
    X, y = _pair(12)
    data = place_tensor_pair((X, y), torch.device("cpu"), torch.float64, None)
    model = torch.nn.Linear(3, 2).double()
    problem = curvkit.Problem(model, "cross_entropy", data, batch_size=5)
    first = [inputs.data_ptr() for inputs, _ in problem.batches()]
    second = [inputs.data_ptr() for inputs, _ in problem.batches()]
    assert first == second and first[0] == data[0].data_ptr()  # views of the one converted copy
    unplaced = curvkit.Problem(model, "cross_entropy", (X, y), batch_size=5)
    assert [i.data_ptr() for i, _ in unplaced.batches()][0] != X.data_ptr()  # converted per pass


def test_cuda_without_an_index_is_the_current_cuda_device():
    from curvkit.data import same_device

    assert same_device(torch.device("cuda", 0), torch.device("cuda"))
    assert not same_device(torch.device("cuda", 1), torch.device("cuda", 0))
    assert not same_device(torch.device("cpu"), torch.device("cuda"))
