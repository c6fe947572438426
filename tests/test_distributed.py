"""Data-parallel curvature on torch.distributed: two gloo processes under torchrun equal one process.

One ``torchrun --nproc-per-node 2`` run of ``tests/distributed_worker.py`` computes
every registered estimator's products, loss and gradient on four small float64
problems, each with its data as a tensor pair, a Dataset, a list of batches and
a :class:`~curvkit.data.LocalShard` (shards of 6 and 7 samples, 4 and 5, 5 and
5: uneven ones included), eigenvalues and a trace; the same script run alone is
the reference.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import curvkit
from curvkit.data import BatchSource, LocalShard
from curvkit.testing.conformance import MONTE_CARLO_SIGMAS, monte_carlo_agreement

WORKER = Path(__file__).with_name("distributed_worker.py")
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


def _run(out: Path, processes: int, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    launcher = (
        []
        if processes == 1
        else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    )
    return subprocess.run(
        [sys.executable, *launcher, str(WORKER), str(out), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    for name, processes in (("one", 1), ("two", 2)):
        done = _run(root / name, processes)
        assert done.returncode == 0, done.stderr[-3000:]
    load = lambda name, rank: torch.load(root / name / f"rank{rank}.pt")
    return load("one", 0), load("two", 0), load("two", 1)


def test_every_quantity_equals_one_process_to_rounding(runs):
    one, first, second = runs
    compared = [k for k in one if not k.endswith(("fisher-mc", "fresh-seed"))]
    assert len(compared) > 100  # 4 cases x 2-4 forms x (loss, gradient, 8 estimators) + spectra
    names = {spec.name for spec in curvkit.estimators()}
    assert all(any(k.endswith("/" + name) for k in compared) for name in names)  # every estimator
    for key in compared:
        assert torch.equal(first[key], second[key]), f"{key}: the processes disagree"
        scale = max(one[key].abs().max().item(), 1e-12)
        error = (first[key] - one[key]).abs().max().item() / scale
        assert error < 1e-12, f"{key}: two processes differ from one by {error:.2e} (relative)"


def test_fresh_seeds_are_shared(runs):
    _, first, second = runs
    seeds = [k for k in first if k.endswith("fresh-seed")]
    assert seeds and all(int(first[k]) == int(second[k]) for k in seeds)


def test_monte_carlo_fisher_is_another_draw_of_the_same_estimator(runs):
    one, first, second = runs
    for key in [k for k in one if k.endswith("fisher-mc")]:
        assert torch.equal(first[key], second[key])  # one operator in every process
        assert not torch.equal(first[key], one[key])  # each shard's own stream: another draw
        exact = one[key.replace("fisher-mc", "fisher")]
        assert monte_carlo_agreement(first[key], exact, rtol=1e-10) < MONTE_CARLO_SIGMAS, key


def test_a_failing_process_ends_the_others(tmp_path):
    start = time.monotonic()
    done = _run(tmp_path / "fail", 2, "fail", timeout=120)
    assert done.returncode != 0
    assert "process 1 fails on purpose" in done.stderr + done.stdout
    assert time.monotonic() - start < 90  # ended, not left waiting in a collective
    assert not (tmp_path / "fail" / "rank0.pt").exists()


def test_shards_cover_the_data_once():
    X, y = torch.arange(13.0).reshape(13, 1), torch.arange(13)
    batches = [(X[i : i + 4], y[i : i + 4]) for i in range(0, 13, 4)]
    dataset = torch.utils.data.TensorDataset(X, y)
    for data in ((X, y), dataset, batches):
        for size in (1, 2, 3, 5):
            source = BatchSource(data, batch_size=3)
            shards = [[t for _, t in source.shard(rank, size)] for rank in range(size)]
            seen = torch.cat([t for shard in shards for t in shard]).sort().values
            assert torch.equal(seen, y), (type(data).__name__, size)
            counts = [sum(len(t) for t in shard) for shard in shards]
            assert max(counts) - min(counts) <= (4 if data is batches else 1)
    local = BatchSource(LocalShard((X[:5], y[:5])))
    assert [t.tolist() for _, t in local.shard(1, 2)] == [list(range(5))]  # the user's shard, as given
    chosen = local.subset([4, 0])  # of this process's own samples, and not sharded again
    assert isinstance(chosen, LocalShard)
    assert [t.tolist() for _, t in BatchSource(chosen).shard(1, 2)] == [[4, 0]]


def test_max_samples_is_cut_before_sharding():
    X, y = torch.arange(10.0).reshape(10, 1), torch.arange(10)
    source = BatchSource((X, y), batch_size=2, max_samples=7)
    got = sorted(int(v) for rank in range(2) for _, t in source.shard(rank, 2) for v in t)
    assert got == list(range(7))


def test_one_process_is_not_data_parallel():
    assert curvkit.distributed.process() == (0, 1)
    assert not curvkit.distributed.is_data_parallel()
    total = (torch.ones(2), [3.0, None])
    assert curvkit.distributed.reduce_sums(total, 5.0) == (total, 5.0)
    assert curvkit.distributed.process_seed(7) == 7


def _as_process(monkeypatch, rank: int, size: int) -> None:
    """This process seen as process ``rank`` of ``size`` (for what needs no collective)."""
    monkeypatch.setattr(curvkit.distributed, "process", lambda: (rank, size))


def test_a_process_without_a_batch_says_so(monkeypatch):
    X, y = torch.randn(1, 2), torch.randn(1, 1)
    problem = curvkit.Problem(torch.nn.Linear(2, 1), "mse", (X, y))
    _as_process(monkeypatch, 0, 2)  # the one sample is process 1's
    with pytest.raises(curvkit.ShardError, match="^process 0 of 2 has no batch of the data") as raised:
        next(problem.batches())
    assert raised.value.process == 0 and isinstance(raised.value, curvkit.DataError)


def test_a_training_step_problem_keeps_its_batch(monkeypatch):
    X, y = torch.randn(6, 2), torch.randn(6, 1)
    template = curvkit.Problem(torch.nn.Linear(2, 1), "mse", (X, y), batch_size=2)
    _as_process(monkeypatch, 1, 2)
    assert [len(t) for _, t in template.batches()] == [2, 1]  # samples 3..5 of 6
    step = template.on_batch(X, y)
    assert not step.data_parallel and [len(t) for _, t in step.batches()] == [6]
    assert template.subset([0, 1, 2, 3]).data_parallel  # a subset is sharded like its problem


def test_optimizers_warn_that_their_curvature_is_the_process_s(monkeypatch):
    from curvkit.optim import KFAC, AdaHessian

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    _as_process(monkeypatch, 0, 2)
    kfac = KFAC(model.parameters(), model=model, loss_fn=torch.nn.CrossEntropyLoss())
    with pytest.warns(curvkit.CurvkitWarning, match="KFAC measures curvature on this process's mini-batch"):
        kfac.batch_problem(X, y)
    ada = AdaHessian(model.parameters())
    torch.nn.functional.cross_entropy(model(X), y).backward(create_graph=True)
    with pytest.warns(curvkit.CurvkitWarning, match="AdaHessian measures curvature"):
        ada.step()
    loss_fn = torch.nn.CrossEntropyLoss()
    summary = curvkit.NewtonSummary(model.parameters(), lambda x, t: loss_fn(model(x), t), [(X, y)])
    summary.zero_grad()
    loss_fn(model(X), y).backward()
    with pytest.warns(curvkit.CurvkitWarning, match="NewtonSummary measures curvature"):
        summary.step()


def test_sums_of_different_sizes_are_refused_by_every_process(tmp_path):
    done = _run(tmp_path / "mismatch", 2, "mismatch", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for rank in (0, 1):
        message = (tmp_path / "mismatch" / f"rank{rank}.txt").read_text()
        assert "the processes' data sums differ in size" in message, message


def test_a_bad_shard_ends_every_process_with_its_message(tmp_path):
    """A failure of one process's data (its first batch, or a later one of a pass) reaches the others
    at the reduction they meet next, a check's own included: all end, the others with that message
    (a curvkit error, or for a crash an error that is none), and stay in step."""
    done = _run(tmp_path / "bad", 2, "bad-shard", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = ((tmp_path / "bad" / f"rank{r}.txt").read_text().splitlines() for r in (0, 1))
    for step in (0, 1, 2):  # process 1 fails at check_batch, during the pass, at check_batch again
        assert second[step].startswith("DataError: ") and "class index" in second[step], second[step]
        assert first[step] == f"ProcessFailedError: process 1 of 2: {second[step].split(': ', 1)[1]}"
    assert second[3] == "RuntimeError: process 1 crashes on purpose"
    assert first[3] == "ProcessCrashedError: process 1 of 2: RuntimeError: process 1 crashes on purpose"
    assert not issubclass(curvkit.ProcessCrashedError, curvkit.CurvkitError)
    assert first[4] == second[4] and first[4].startswith("done ")  # good data afterwards: in step
    # no batch for process 1: its message names it, so the others say it once (it said it twice:
    # "process 1 of 2: process 1 of 2 has no batch of the data: ...")
    message = "process 1 of 2 has no batch of the data: give every process at least one"
    assert first[5].startswith(f"ProcessFailedError: {message}"), first[5]
    assert second[5].startswith(f"ShardError: {message}"), second[5]
    assert first[5] == f"ProcessFailedError: {second[5].split(': ', 1)[1]}"


@pytest.mark.parametrize("learnt", [curvkit.ProcessFailedError, curvkit.ProcessCrashedError])
def test_a_failure_learnt_from_another_process_is_not_shared_again(monkeypatch, learnt):
    """Raised by an inner pass's reduction, it passes through an outer pass's block without joining a
    reduction the others are not in; a process's own failure joins once, however deep."""
    joined = []
    monkeypatch.setattr(curvkit.distributed, "process", lambda: (0, 2))
    monkeypatch.setattr(curvkit.distributed, "is_data_parallel", lambda: True)
    monkeypatch.setattr(curvkit.distributed, "collective_device", lambda device=None: device)
    monkeypatch.setattr(curvkit.distributed, "_reduce_header", lambda *args, **kwargs: joined.append(args))
    with pytest.raises(learnt), curvkit.distributed.shared_failures():
        raise learnt("process 1 of 2: a bad batch", 1)
    assert joined == []
    with pytest.raises(curvkit.DataError), curvkit.distributed.shared_failures():
        with curvkit.distributed.shared_failures():
            raise curvkit.DataError("its own")
    assert len(joined) == 1


def test_a_shared_failure_meets_the_reduction_on_the_problems_device(monkeypatch):
    """The failed process's header goes where the others' reduction goes: the problem's device, not
    the first tensor's (a group of gloo and NCCL would otherwise mix the two backends)."""
    used = []

    def header(count, entries, size, device, failure=None):
        used.append(device)
        return count, True

    monkeypatch.setattr(curvkit.distributed, "process", lambda: (1, 2))
    monkeypatch.setattr(curvkit.distributed, "is_data_parallel", lambda: True)
    monkeypatch.setattr(curvkit.distributed, "collective_device", lambda device=None: device)
    monkeypatch.setattr(curvkit.distributed, "_reduce_header", header)
    problems = torch.device("meta")  # stands for a GPU of a group of gloo and NCCL
    with pytest.raises(curvkit.DataError), curvkit.distributed.shared_failures(problems):
        raise curvkit.DataError("a bad batch")
    assert curvkit.distributed.reduce_sums(None, 2.0, problems) == (None, 2.0)  # no tensor to ask
    assert used == [problems, problems]


@pytest.mark.parametrize(
    "config, data, expected",
    [
        ("cuda:nccl", "cuda:1", "cuda:1"),  # init_process_group() without a backend, on a GPU machine
        ("cpu:gloo,cuda:nccl", "cuda:1", "cuda:1"),  # the same in torch before 2.6
        ("cpu:gloo,cuda:nccl", "cpu", "cpu"),
        ("cpu:gloo,cuda:nccl", None, "cpu"),
        ("cuda:nccl", "cuda:0", "cuda:0"),
        ("cpu:gloo", "cuda:0", "cpu"),  # a group of gloo on CPUs only: CUDA data go through the host
        ("cpu:gloo,cuda:gloo", "cpu", "cpu"),
    ],
)
def test_sums_are_reduced_where_the_group_has_a_backend_for_the_datas_device(
    monkeypatch, config, data, expected
):
    monkeypatch.setattr(torch.distributed, "get_backend_config", lambda: config)
    device = None if data is None else torch.device(data)
    assert curvkit.distributed.collective_device(device) == torch.device(expected)
