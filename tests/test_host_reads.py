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


def _problem(batch_size: int = 4, weighted: bool = True) -> tuple[curvkit.Problem, torch.Tensor]:
    torch.manual_seed(0)
    X = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    y[::5] = 1  # some ignored
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    weight = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64) if weighted else None
    loss = nn.CrossEntropyLoss(weight=weight, ignore_index=1)
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
        return snapshot.cached_in_analysis(tensor, key, lambda: computed.update([key[0]]) or compute())

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
        return cached_in_analysis(t, "fact", lambda: calls.append(1) or float(t.sum()))

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
        assert cached_in_analysis(base[:3], "other key", lambda: "other") == "other"
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
        assert cached_in_analysis(frozen, "fact", lambda: "a") == "a"
        assert cached_in_analysis(frozen, "fact", lambda: "b") == "b"  # no version counter: never cached
    fact(base[:3])
    assert len(calls) == 10  # the scope's facts are gone with it


def test_cached_in_analysis_tells_a_view_moved_to_other_memory_from_its_base():
    with curvkit.fixed_model_state():
        y = torch.zeros(6, dtype=torch.long)
        moved = y[0:3]
        with torch.no_grad():
            moved.set_(torch.full((3,), 9))  # other memory, same base and version counter
        assert moved._base is y
        assert cached_in_analysis(moved, "values", lambda: moved.tolist()) == [9, 9, 9]
        assert cached_in_analysis(y[0:3], "values", lambda: y[0:3].tolist()) == [0, 0, 0]


def test_a_loader_refilling_one_buffer_out_of_band_gets_each_batch_counted():
    """A loader writing each batch's targets into one buffer through NumPy (no version counter moves)."""
    torch.manual_seed(0)
    X = torch.randn(8, 5, dtype=torch.float64)
    labels = [torch.tensor([1, 1, 1, 0]), torch.tensor([0, 2, 2, 0])]  # ignore_index=1: 1 counted, then 4

    class Refill:
        def __init__(self):
            self.buffer = torch.zeros(4, dtype=torch.long)

        def __iter__(self):
            for i, batch_labels in enumerate(labels):
                self.buffer.numpy()[:] = batch_labels.numpy()
                yield X[4 * i : 4 * i + 4], self.buffer

    model = nn.Sequential(nn.Linear(5, 3)).double()
    problem = curvkit.Problem(model, nn.CrossEntropyLoss(ignore_index=1), Refill(), check_deterministic=False)
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
        cached_in_analysis(kept[:2], ("first", owner), lambda: 0.0)
        for value in range(20):  # new tensors, often at a freed one's id
            t = torch.full((4,), float(value))
            assert cached_in_analysis(t[:3], ("first", owner), lambda t=t: float(t[0])) == value
            del t
        assert len(snapshot._DATA_FACTS.get()) == 1  # the freed batches' entries went with them
    gone = weakref.ref(owner)
    del owner
    assert gone() is None  # not kept by the closed scope's entries until the cycle collector runs
