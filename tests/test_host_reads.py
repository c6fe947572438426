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
import gc

import pytest
import torch
from torch import nn

import curvkit
from curvkit import registry
from curvkit.snapshot import cached_in_analysis

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
        base[0] = 10.0  # version counter
        assert fact(base[:3]) == 13.0 and len(calls) == 5
        assert cached_in_analysis(base[:3], "other key", lambda: "other") == "other"
        with torch.inference_mode():
            frozen = torch.ones(2)
        assert cached_in_analysis(frozen, "fact", lambda: "a") == "a"
        assert cached_in_analysis(frozen, "fact", lambda: "b") == "b"  # no version counter: never cached
    fact(base[:3])
    assert len(calls) == 6  # the scope's facts are gone with it


def test_cached_in_analysis_forgets_freed_tensors():
    from curvkit import snapshot

    with curvkit.fixed_model_state():
        kept = torch.zeros(2)
        cached_in_analysis(kept, "first", lambda: 0.0)
        for value in range(20):  # new tensors, often at a freed one's id
            t = torch.full((3,), float(value))
            assert cached_in_analysis(t, "first", lambda t=t: float(t[0])) == value
            del t
            gc.collect()
        assert len(snapshot._DATA_FACTS.get()) == 1  # the freed batches' entries went with them
