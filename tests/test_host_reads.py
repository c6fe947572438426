"""Passes over device-resident data read nothing back to the host after the first, within an analysis.

On a GPU, every ``bool(t)``, ``float(t)``, ``t.item()`` or ``t.tolist()`` waits
for the device (a host-device synchronisation). Here, on the CPU, such reads are
counted by patching the tensor methods; the tests check that a loss's per-batch
reads (its check of the class indices, their count) happen on the first pass of
an analysis only (:func:`curvkit.snapshot.cached_in_analysis`), for every
registered estimator, and that what is remembered is still checked.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

import curvkit
from curvkit import registry
from curvkit.snapshot import cached_in_analysis, record_in_analysis

HOST_READS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist")


@pytest.fixture
def host_reads(monkeypatch):
    """A counter of host reads of tensor values, by the method used, while ``counting[0]`` is true."""
    reads: collections.Counter = collections.Counter()
    counting = [False]

    def counted(name, method):
        def read(self, *args, **kwargs):
            if counting[0]:
                reads[name] += 1
            return method(self, *args, **kwargs)

        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    return reads, counting


def _parts(weighted: bool) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """A model, a cross-entropy (class weights or not, class 1 ignored) and 16 samples."""
    torch.manual_seed(0)
    X = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    y[::5] = 1  # some ignored
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    weight = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64) if weighted else None
    return model, nn.CrossEntropyLoss(weight=weight, ignore_index=1), X, y


def _problem(batch_size: int = 4, weighted: bool = True) -> tuple[curvkit.Problem, torch.Tensor]:
    model, loss, X, y = _parts(weighted)
    return curvkit.Problem(model, loss, (X, y), batch_size=batch_size), y


def _operators(problem: curvkit.Problem):
    for spec in registry.estimators():
        try:
            yield spec.name, registry.curvature(spec.name, problem)
        except curvkit.CurvkitError:  # an estimator that does not apply to this problem
            continue


@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "likelihood"])
def test_later_passes_of_an_analysis_read_nothing_back(host_reads, weighted):
    reads, counting = host_reads
    problem, _ = _problem(weighted=weighted)
    names = []
    for name, operator in _operators(problem):
        v = torch.randn(operator.shape[1], dtype=torch.float64)
        with curvkit.fixed_model_state():
            first = operator @ v
            counting[0] = True
            second = operator @ v
            counting[0] = False
        assert not reads, f"{name}: {dict(reads)} per product after the first pass"
        if not name.startswith("fisher"):  # the Monte-Carlo Fisher draws new targets per product
            torch.testing.assert_close(second, first, rtol=1e-12, atol=0)
        names.append(name)
    assert {"ggn", "empirical-fisher", "kfac", "d3"} | ({"fisher"} if not weighted else set()) <= set(names)


def test_without_an_analysis_every_pass_reads_its_batches(host_reads):
    """The control: the counter sees the loss's reads, one check and one count per batch and call."""
    reads, counting = host_reads
    problem, _ = _problem(batch_size=4)
    G = curvkit.curvature("ggn", problem)
    v = torch.randn(problem.dim, dtype=torch.float64)
    G @ v
    counting[0] = True
    G @ v
    counting[0] = False
    assert reads["__float__"] == 4 and reads["__bool__"] >= 4  # 4 batches


def test_an_analysis_checks_and_counts_each_batch_once(monkeypatch):
    from curvkit import snapshot
    from curvkit.losses import _categorical

    computed: collections.Counter = collections.Counter()

    def counting(tensor, key, compute):
        return snapshot.cached_in_analysis(
            tensor, key, lambda values: computed.update([key[0]]) or compute(values)
        )

    monkeypatch.setattr(_categorical, "cached_in_analysis", counting)
    problem, _ = _problem(batch_size=4)
    result = curvkit.eigenvalues(curvkit.curvature("ggn", problem), k=1, tol=1e-8)
    assert result.matvecs > 5
    assert computed == {"class indices in range": 4, "count": 4}  # the 4 batches, once in the analysis
    curvkit.curvature("ggn", problem) @ torch.randn(problem.dim, dtype=torch.float64)
    # outside an analysis: every time (the check once per call of the loss, two calls per batch)
    assert computed["count"] == 8 and computed["class indices in range"] == 4 + 2 * 4


def test_out_of_range_targets_still_raise_within_an_analysis():
    problem, targets = _problem()
    G = curvkit.curvature("ggn", problem)
    v = torch.randn(problem.dim, dtype=torch.float64)
    with curvkit.fixed_model_state():
        G @ v
        targets[3] = 7  # in place: the version counter moves, the batch is checked again
        with pytest.raises(curvkit.CurvkitError, match=r"class index out of bounds"):
            G @ v


def test_cached_in_analysis_recomputes_outside_a_scope_and_after_a_change():
    calls = []

    def fact(t):
        return cached_in_analysis(t, "fact", lambda values: calls.append(1) or float(values.sum()))

    base = torch.arange(6.0)
    fact(base[:3])
    fact(base[:3])
    assert len(calls) == 2  # no scope: computed every time
    with curvkit.fixed_model_state():
        assert fact(base[:3]) == 3.0 and fact(base[:3]) == 3.0 and len(calls) == 3  # a new view, same region
        assert fact(base[3:]) == 12.0 and len(calls) == 4  # another region
        assert fact(base[:3].view(3, 1)) == 3.0 and len(calls) == 5  # another shape
        base[0] = 10.0  # version counter
        assert fact(base[:3]) == 13.0 and len(calls) == 6
        assert cached_in_analysis(base[:3], "other key", lambda values: "other") == "other"
        fact(base)
        fact(base)
        assert len(calls) == 8  # not a view: never remembered (a loader may refill one buffer)
        made = torch.zeros(4)
        record_in_analysis(made, "fact", 0.0)  # known by its maker, who hands it on
        assert fact(made) == 0.0 and len(calls) == 8
        made += 1  # version counter
        assert fact(made) == 4.0 and len(calls) == 9
        with torch.inference_mode():
            frozen = torch.ones(3)[:2]
        assert cached_in_analysis(frozen, "fact", lambda values: "a") == "a"
        assert (
            cached_in_analysis(frozen, "fact", lambda values: "b") == "b"
        )  # no version counter: never cached
    fact(base[:3])
    assert len(calls) == 10  # the scope's facts are gone with it


def test_cached_in_analysis_tells_a_view_moved_to_other_memory_from_its_base():
    with curvkit.fixed_model_state():
        y = torch.zeros(6, dtype=torch.long)
        moved = y[0:3]
        with torch.no_grad():
            moved.set_(torch.full((3,), 9))  # other memory, same base and version counter
        assert moved._base is y
        assert cached_in_analysis(moved, "values", lambda values: values.tolist()) == [9, 9, 9]
        assert cached_in_analysis(y[0:3], "values", lambda values: values.tolist()) == [0, 0, 0]


class _Refill:
    """A loader writing each batch's targets into one buffer through NumPy (no version counter moves).

    Two batches of four samples; with ``ignore_index=1``, 1 target counted, then 4.
    """

    def __init__(self):
        torch.manual_seed(0)
        self.inputs = torch.randn(8, 5, dtype=torch.float64)
        self.labels = [torch.tensor([1, 1, 1, 0]), torch.tensor([0, 2, 2, 0])]
        self.buffer = torch.zeros(4, dtype=torch.long)

    def __iter__(self):
        for i, batch_labels in enumerate(self.labels):
            self.buffer.numpy()[:] = batch_labels.numpy()
            yield self.inputs[4 * i : 4 * i + 4], self.buffer


def test_a_loader_refilling_one_buffer_out_of_band_gets_each_batch_counted():
    """Within an analysis too: nothing is remembered for a buffer the loader refills."""
    model = nn.Sequential(nn.Linear(5, 3)).double()
    loss = nn.CrossEntropyLoss(ignore_index=1)
    problem = curvkit.Problem(model, loss, _Refill(), check_deterministic=False)
    G = curvkit.curvature("ggn", problem, strategy="reverse")
    v = torch.randn(problem.dim, dtype=torch.float64)
    outside = G @ v
    with curvkit.fixed_model_state():
        inside = G @ v
    torch.testing.assert_close(inside, outside, rtol=1e-12, atol=0)


def test_cached_in_analysis_forgets_freed_tensors_and_its_keys_with_the_scope():
    import weakref

    from curvkit import snapshot

    class Owner:  # stands for a loss, held in a key
        pass

    owner = Owner()
    with curvkit.fixed_model_state():
        kept = torch.zeros(3)
        cached_in_analysis(kept[:2], ("first", owner), lambda values: 0.0)
        for value in range(20):  # new tensors, often at a freed one's id
            t = torch.full((4,), float(value))
            assert cached_in_analysis(t[:3], ("first", owner), lambda values: float(values[0])) == value
            del t
        assert len(snapshot._DATA_FACTS.get()) == 1  # the freed batches' entries went with them
    gone = weakref.ref(owner)
    del owner
    assert gone() is None  # not kept by the closed scope's entries until the cycle collector runs


# --------------------------------------------------------------- batches copied from host memory
def _loader_problem(weighted: bool = True) -> curvkit.Problem:
    """The problem of :func:`_problem` with its data behind a DataLoader: new tensors for every batch."""
    from torch.utils.data import DataLoader, TensorDataset

    model, loss, X, y = _parts(weighted)
    return curvkit.Problem(model, loss, DataLoader(TensorDataset(X, y), batch_size=4))


@pytest.fixture
def copied_batches(monkeypatch):
    """``Problem.batches`` copies every batch as if to a GPU (a clone, here); the facts the loss computes
    are recorded as ``"host"`` (read from a tensor the loader yielded) or ``"device"`` (from anything
    else: a copy, a view or a tensor computed from one, which a GPU run would read back)."""
    from curvkit import data as data_module
    from curvkit import problem as problem_module
    from curvkit import snapshot
    from curvkit.losses import _categorical

    yielded: dict[int, torch.Tensor] = {}  # kept alive, so that their ids stay theirs

    def to_device(x, device, dtype):
        if isinstance(x, torch.Tensor):
            yielded[id(x)] = x
            return x.clone()
        return data_module.to_device(x, device, dtype)

    read_from: collections.Counter = collections.Counter()

    def recording(tensor, key, compute):
        def recorded(values):
            read_from["host" if yielded.get(id(values)) is values else "device"] += 1
            return compute(values)

        return snapshot.cached_in_analysis(tensor, key, recorded)

    monkeypatch.setattr(problem_module, "to_device", to_device)
    monkeypatch.setattr(_categorical, "cached_in_analysis", recording)
    return read_from


@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "likelihood"])
def test_facts_about_batches_copied_from_the_host_are_read_from_the_host(copied_batches, weighted):
    """On a GPU, reading a copied batch's targets would wait for the device: the loss reads the loader's
    host tensors instead, for every estimator, in and out of an analysis, with the same results."""
    read_from = copied_batches
    problem = _loader_problem(weighted=weighted)
    reference = _loader_problem(weighted=weighted)
    names = []
    for (name, operator), (_, plain) in zip(_operators(problem), _operators(reference)):
        v = torch.randn(operator.shape[1], dtype=torch.float64)
        read_from.clear()
        with curvkit.fixed_model_state():
            inside = operator @ v
        assert read_from["device"] == 0 and read_from["host"] >= 8, f"{name}: {dict(read_from)}"
        names.append(name)
        if name.startswith("fisher"):  # Monte-Carlo: new targets per product, checked outside an analysis
            continue
        outside = operator @ v
        assert read_from["device"] == 0, f"{name}: {dict(read_from)}"
        torch.testing.assert_close(inside, plain @ v, rtol=1e-12, atol=0)
        torch.testing.assert_close(outside, inside, rtol=1e-12, atol=0)
    assert {"ggn", "empirical-fisher", "kfac", "d3"} | ({"fisher"} if not weighted else set()) <= set(names)
    read_from.clear()
    result = curvkit.eigenvalues(curvkit.curvature("ggn", problem), k=1, tol=1e-8)
    assert result.matvecs > 5 and read_from["device"] == 0 and read_from["host"] >= 8 * result.matvecs


def test_without_the_host_original_facts_are_read_from_the_copies(copied_batches, monkeypatch):
    """The control: the recorder tells the two apart (what a GPU run would read back)."""
    import contextlib

    from curvkit import problem as problem_module

    monkeypatch.setattr(problem_module, "read_from_host", lambda copy, source: contextlib.nullcontext())
    problem = _loader_problem()
    G = curvkit.curvature("ggn", problem, strategy="reverse")
    copied_batches.clear()
    G @ torch.randn(problem.dim, dtype=torch.float64)
    assert copied_batches["host"] == 0 and copied_batches["device"] >= 8  # a check and a count per batch


def test_a_loader_refilling_one_host_buffer_gets_each_copied_batch_counted(copied_batches):
    """The host original is read only while its batch is in use: the loader refills it for the next."""
    model = nn.Sequential(nn.Linear(5, 3)).double()
    loss = nn.CrossEntropyLoss(ignore_index=1)
    loader = _Refill()
    problem = curvkit.Problem(model, loss, loader, check_deterministic=False)
    copied_batches.clear()
    batches = problem.batches()
    first = next(batches)[1]
    assert problem.loss.count(torch.zeros(4, 3), first) == 1.0  # read from the buffer, still batch 1
    second = next(batches)[1]  # the buffer now holds batch 2; the first copy is read as itself
    assert problem.loss.count(torch.zeros(4, 3), first) == 1.0
    assert problem.loss.count(torch.zeros(4, 3), second) == 4.0
    assert copied_batches == {"host": 4, "device": 2}  # each a check and a count
    batches.close()
    concatenated = (loader.inputs, torch.cat(loader.labels))
    G = curvkit.curvature("ggn", problem, strategy="reverse")
    reference = curvkit.curvature("ggn", curvkit.Problem(model, loss, concatenated, batch_size=4))
    v = torch.randn(problem.dim, dtype=torch.float64)
    torch.testing.assert_close(G @ v, reference @ v, rtol=1e-12, atol=0)


def test_read_from_host_records_only_an_unchanged_copy_of_a_host_tensor():
    from curvkit.snapshot import _host_copy, read_from_host

    source = torch.tensor([0, 1, 2])
    copy = source.clone()
    with read_from_host(copy, source):
        assert _host_copy(copy) is source
        with read_from_host(source, source):  # not a copy: nothing recorded, the outer scope stays
            assert _host_copy(source) is source and _host_copy(copy) is source
        copy += 0  # in place: the version counter moves, the copy is read as itself
        assert _host_copy(copy) is copy
    with read_from_host(copy, source):
        pass
    assert _host_copy(copy) is copy  # after the scope
    cast = source.double()
    with read_from_host(cast, source):  # other values (another dtype): not recorded
        assert _host_copy(cast) is cast
    with torch.inference_mode():
        frozen = source.clone()
    with read_from_host(frozen, source):  # no version counter: not recorded
        assert _host_copy(frozen) is frozen
    with read_from_host({"x": copy}, source):  # not a tensor
        assert _host_copy(copy) is copy


def test_a_loss_copies_its_weights_once_per_device_and_dtype_and_keeps_them():
    weight = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    loss = curvkit.losses.resolve_loss(nn.CrossEntropyLoss(weight=weight))
    outputs, targets = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])  # float32 outputs
    first = loss._class_weights(outputs)
    assert first.dtype == torch.float32 and loss._class_weights(outputs) is first
    weight[0] = 100.0  # the module's weights changed afterwards: the loss keeps its own
    assert (
        loss._class_weights(outputs.double())[0] == 1.0 and loss.count(outputs, targets) == 5.5
    )  # 1 + 2 + 0.5 + 2
