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
from curvkit.snapshot import cached_in_analysis, record_fact

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
    assert reads["__float__"] >= 4 and reads["__bool__"] >= 4  # at least a check and a count per batch (4)


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
        record_fact(made, "fact", 0.0)  # known by its maker, who hands it on
        assert fact(made) == 0.0 and len(calls) == 8
        made += 1  # version counter
        assert fact(made) == 4.0 and len(calls) == 9
        with torch.inference_mode():
            frozen = torch.ones(3)[:2]
        assert cached_in_analysis(frozen, "fact", lambda values: "a") == "a"
        assert cached_in_analysis(frozen, "fact", lambda values: "b") == "b"  # no counter: not kept
        record_fact(frozen, "fact", "c")  # nor recorded
        assert cached_in_analysis(frozen, "fact", lambda values: "d") == "d"
    fact(base[:3])
    assert len(calls) == 10  # the scope's facts are gone with it
    sampled = torch.zeros(4)
    record_fact(sampled, "fact", 0.0)  # what its maker records holds outside an analysis too
    assert fact(sampled) == 0.0 and len(calls) == 10
    sampled += 1
    assert fact(sampled) == 4.0 and len(calls) == 11


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
class _OnDevice(torch.Tensor):
    """Stands for a batch copied to a GPU: what is computed from it is one too (``__torch_function__``),
    so that reading any such value back (which a GPU run would wait for) is told from a read on the host."""


def _loader_problem(weighted: bool = True) -> curvkit.Problem:
    """The problem of :func:`_problem` with its data behind a DataLoader: new tensors for every batch."""
    from torch.utils.data import DataLoader, TensorDataset

    model, loss, X, y = _parts(weighted)
    return curvkit.Problem(model, loss, DataLoader(TensorDataset(X, y), batch_size=4))


@pytest.fixture
def device_reads(monkeypatch):
    """``Problem.batches`` copies every batch as a GPU run would (a clone, as :class:`_OnDevice`); the
    counter counts reads of values computed from such copies while ``counting[0]`` is true."""
    from curvkit import data as data_module
    from curvkit import problem as problem_module

    reads: collections.Counter = collections.Counter()
    counting = [False]

    def counted(name, method):
        def read(self, *args, **kwargs):
            if counting[0] and isinstance(self, _OnDevice):
                reads[name] += 1
            return method(self, *args, **kwargs)

        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))

    def to_device(x, device, dtype):
        if isinstance(x, torch.Tensor):
            return x.clone().as_subclass(_OnDevice)
        return data_module.to_device(x, device, dtype)

    monkeypatch.setattr(problem_module, "to_device", to_device)
    return reads, counting


@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "likelihood"])
def test_batches_copied_from_the_host_are_not_read_back(device_reads, weighted):
    """A loader's batches, copied as to a GPU: no later product of any estimator within an analysis,
    nor a product outside one, reads back a value computed from a copy (a new copy every pass); the
    loss's check and count come from the values kept on the host. Same results as without copies."""
    reads, counting = device_reads
    problem = _loader_problem(weighted=weighted)
    reference = _loader_problem(weighted=weighted)
    names = []
    for (name, operator), (_, plain) in zip(_operators(problem), _operators(reference)):
        v = torch.randn(operator.shape[1], dtype=torch.float64)
        with curvkit.fixed_model_state():
            first = (
                operator @ v
            )  # reads once: the determinism probe's checks, KFAC's check of its layer rules
            counting[0] = True
            second = operator @ v
        counting[0] = True  # and outside an analysis (the Fisher's sampled targets are known in range)
        outside = operator @ v
        counting[0] = False
        assert not reads, f"{name}: {dict(reads)}"
        names.append(name)
        if not name.startswith("fisher"):  # Monte-Carlo: new targets per product
            expected = plain @ v
            for product in (first, second, outside):
                torch.testing.assert_close(product.as_subclass(torch.Tensor), expected, rtol=1e-12, atol=0)
    assert {"ggn", "empirical-fisher", "kfac", "d3"} | ({"fisher"} if not weighted else set()) <= set(names)


def test_without_the_host_values_copied_batches_are_read_back(device_reads, monkeypatch):
    """The control: the counter sees the loss's reads of the copies, a check and a count per batch."""
    from curvkit import problem as problem_module

    reads, counting = device_reads
    monkeypatch.setattr(problem_module, "record_host_copy", lambda copy, source: None)
    problem = _loader_problem()
    G = curvkit.curvature("ggn", problem, strategy="reverse")
    v = torch.randn(problem.dim, dtype=torch.float64)
    with curvkit.fixed_model_state():
        G @ v  # and the determinism probe's two passes
        counting[0] = True
        G @ v
    assert reads["__float__"] >= 4 and reads["__bool__"] >= 4  # at least a check and a count per batch (4)


def test_copied_batches_are_counted_from_their_values_when_copied(device_reads):
    """The host values are copied with the batch: a loader refilling one buffer for the next batch, a
    pass over the loader while a batch is held, an in-place change of the data after the copy, or a
    batch taken by ``next(iter(problem.batches()))`` (its generator closed at once) change nothing."""
    reads, counting = device_reads
    model = nn.Sequential(nn.Linear(5, 3)).double()
    loss = nn.CrossEntropyLoss(ignore_index=1)
    loader = _Refill()
    problem = curvkit.Problem(model, loss, loader, check_deterministic=False)
    outputs = torch.zeros(4, 3, dtype=torch.float64)
    counting[0] = True
    batches = problem.batches()
    first = next(batches)[1]
    second = next(batches)[1]  # the buffer now holds batch 2
    assert problem.loss.count(outputs, first) == 1.0 and problem.loss.count(outputs, second) == 4.0
    loader.labels[0] = torch.tensor([7, 7, 7, 7])  # out of range, refilled by another pass
    held = next(iter(problem.batches()))[1]  # the buffer holds [7, 7, 7, 7]; the generator is closed
    with pytest.raises(curvkit.CurvkitError, match="class index out of bounds"):
        problem.loss.count(outputs, held)
    assert problem.loss.count(outputs, first) == 1.0 and problem.loss.count(outputs, second) == 4.0
    batches.close()
    X, y = _Refill().inputs, torch.tensor([0, 2, 2, 0])
    pair = curvkit.Problem(model, loss, (X[:4], y), check_deterministic=False)
    targets = next(iter(pair.batches()))[1]
    y[:] = 1  # the data changed after the copy (all ignored now): the copy has the old values
    assert pair.loss.count(outputs, targets) == 4.0
    counting[0] = False
    assert not reads


def test_record_host_copy_records_class_indices_copied_from_the_host_while_the_copy_is_unchanged():
    from curvkit.snapshot import _RECORDS, _host_copy, record_host_copy

    source = torch.tensor([0, 1, 2])
    copy = source.clone()
    record_host_copy(copy, source)
    kept = _host_copy(copy)
    assert kept is not copy and kept is not source and torch.equal(kept, source)
    source[0] = 5  # the source may change (a loader refills it): the values kept are the copy's
    assert _host_copy(copy) is kept and kept[0] == 0
    copy += 0  # in place: the version counter moves, the copy is read as itself
    assert _host_copy(copy) is copy
    record_host_copy(source, source)  # not a copy
    assert _host_copy(source) is source
    cast = source.double()
    record_host_copy(cast, cast.long())  # another dtype: other values
    record_host_copy(cast, cast.clone())  # floating point: counted by its shape, never read
    part = source[:2].clone()
    record_host_copy(part, source)  # another shape
    record_host_copy(copy.clone(), {"x": source})  # not a tensor
    with torch.inference_mode():
        frozen = source.clone()
    record_host_copy(frozen, source)  # no version counter
    on_meta = torch.zeros(3, dtype=torch.long, device="meta")
    meta_copy = on_meta.clone()
    record_host_copy(meta_copy, on_meta)  # the source is not in host memory
    assert _host_copy(cast) is cast and _host_copy(part) is part and _host_copy(frozen) is frozen
    assert _host_copy(meta_copy) is meta_copy
    entries = len(_RECORDS)
    fresh = source.clone()
    record_host_copy(fresh, source)
    assert len(_RECORDS) == entries + 1
    del fresh
    assert len(_RECORDS) == entries  # the record leaves with its copy


def test_a_loss_follows_its_modules_weights_and_keeps_only_copies_that_wait():
    weight = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    module = nn.CrossEntropyLoss(weight=weight)
    loss = curvkit.losses.resolve_loss(module)
    outputs, targets = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])  # float32 outputs
    assert loss._class_weights(outputs).dtype == torch.float32
    assert loss._class_weights(outputs.double()) is loss.weight  # on its device, in its dtype: itself
    weight[0] = 100.0  # the module's weights edited in place: followed, as torch's loss would
    assert loss._class_weights(outputs)[0] == 100.0 and loss.count(outputs, targets) == 104.5
    module.weight.data[0] = 3.0  # through .data (no version counter moves): a cast per call follows it
    assert loss.count(outputs, targets) == 7.5  # 3 + 2 + 0.5 + 2
    # a copy that waits (from a GPU to the host, here to the meta device) is kept while the version stands
    meta = torch.device("meta")
    with torch.inference_mode():  # made outside inference mode, so that autograd can use it later
        kept = loss._on(loss.weight, meta, torch.float32)
    assert not kept.is_inference() and loss._on(loss.weight, meta, torch.float32) is kept
    assert loss._on(loss.weight, meta, torch.float64) is not kept  # another dtype
    weight[1] = 1.0  # the version counter moves: copied again
    assert loss._on(loss.weight, meta, torch.float32) is not kept


def test_a_weighted_count_is_summed_in_the_outputs_dtype():
    """As PyTorch's mean divides by the weights summed in the outputs' dtype (here float32)."""
    weight = torch.full((3,), 0.1, dtype=torch.float64)
    loss = curvkit.losses.resolve_loss(nn.CrossEntropyLoss(weight=weight))
    targets = torch.zeros(1000, dtype=torch.long)
    in_float32 = float(weight.float()[targets].sum())
    assert in_float32 != float(weight[targets].sum())  # the two differ
    assert loss.count(torch.zeros(1000, 3), targets) == in_float32


def test_factors_of_losses_convex_by_construction_read_nothing_back(device_reads):
    """Class indices (weights >= 0), MSE and BCE without ``pos_weight``: the curvature is not checked
    (on a GPU a read per batch of every factor: KFAC's, EKFAC's, the diagonals'); the weights, in host
    memory, are checked again on the host instead (after an edit, through ``.data`` too)."""
    from curvkit.losses import BinaryCrossEntropyWithLogits, CrossEntropy, MeanSquaredError

    reads, counting = device_reads
    outputs = torch.randn(4, 3, dtype=torch.float64).as_subclass(_OnDevice)
    cross_entropy = CrossEntropy(weight=[1.0, 2.0, 0.5], label_smoothing=0.1)
    cases = [
        (cross_entropy, torch.tensor([0, 1, 2, 1])),
        (MeanSquaredError(), torch.randn(4, 3, dtype=torch.float64)),
        (BinaryCrossEntropyWithLogits(weight=torch.ones(3)), torch.rand(4, 3, dtype=torch.float64)),
    ]
    for loss, targets in cases:
        counting[0] = True
        factor = loss._hessian_factor(outputs, targets.as_subclass(_OnDevice))
        counting[0] = False
        assert not reads, f"{loss.name}: {dict(reads)}"
        assert torch.isfinite(factor).all()
    for module in (nn.CrossEntropyLoss(weight=torch.ones(3)), nn.BCEWithLogitsLoss(weight=torch.ones(3))):
        loss = curvkit.losses.resolve_loss(module)
        targets = torch.tensor([0, 1, 2, 1]) if isinstance(module, nn.CrossEntropyLoss) else torch.ones(4, 3)
        module.weight.data[1] = -1.0  # after the loss was made, bypassing the version counter
        with pytest.raises(curvkit.NonConvexLossError):
            loss.output_hessian_factor(torch.zeros(4, 3), targets)
