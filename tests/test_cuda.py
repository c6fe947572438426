"""GPU paths: run where CUDA is available, skipped otherwise."""

from __future__ import annotations

import pytest
import torch

import curvkit
from curvkit.testing import CASES, dense_hessian_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("strategy", ["auto", "forward-over-reverse"])
def test_hessian_on_cuda_matches_cpu(case, strategy):
    cpu = case.problem()
    gpu = cpu.to(device="cuda")
    H = curvkit.curvature("hessian", gpu, strategy=strategy)
    assert H.device.type == "cuda"
    M = torch.randn(cpu.dim, 4, dtype=torch.float64)
    out = H @ M.cuda()
    assert out.device.type == "cuda"
    truth = dense_hessian_reference(cpu) @ M
    assert ((out.cpu() - truth).norm() / truth.norm()).item() < 1e-10


def test_exact_hessian_on_cuda():
    cpu = CASES[0].problem()
    dense = curvkit.curvature("exact-hessian", cpu.to(device="cuda")).to_dense()
    assert dense.device.type == "cuda"
    assert torch.allclose(dense.cpu(), dense_hessian_reference(cpu), atol=1e-10)


def test_spectral_analyses_on_cuda():
    cpu = CASES[0].problem()
    H = curvkit.curvature("hessian", cpu.to(device="cuda"))
    truth = torch.linalg.eigvalsh(dense_hessian_reference(cpu))
    res = curvkit.eigenvalues(H, k=2, tol=1e-10)
    assert res.values.device.type == "cuda" and res.converged
    assert torch.allclose(res.values.cpu(), truth[-2:].flip(0), rtol=1e-8)
    tr = curvkit.trace(H, method="exact")
    assert abs(tr.estimate - truth.sum().item()) < 1e-9 * truth.abs().sum().item()
    dens = curvkit.density(H, steps=10, runs=2)
    assert dens.density.device.type == "cuda"


def test_peak_memory_is_measured_per_analysis_on_cuda():
    from curvkit.analysis import AnalysisPlan, run_plan

    cpu = CASES[0].problem()
    H = curvkit.curvature("hessian", cpu.to(device="cuda"))
    peaks = {}
    run_plan(H, AnalysisPlan(top_k=1, trace="hutchinson"), on_result=lambda k, r, s, m: peaks.update({k: m}))
    assert peaks and all(isinstance(m, int) and m > 0 for m in peaks.values())


def test_products_within_an_analysis_do_not_compare_contents_on_cuda():
    """The snapshot check inside an analysis reads version counters only: no sync for it per product."""
    cpu = CASES[0].problem()
    gpu = cpu.to(device="cuda")
    H = curvkit.curvature("hessian", gpu)
    v = torch.randn(cpu.dim, dtype=torch.float64, device="cuda")
    with curvkit.fixed_model_state():
        H @ v
        snapshot = gpu.current_snapshot()
        torch.cuda.set_sync_debug_mode("error")
        try:
            assert gpu.current_snapshot() is snapshot
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("placement", ["device", "host loader"])
@pytest.mark.parametrize("estimator", ["hessian", "ggn", "fisher", "empirical-fisher", "kfac", "d3"])
def test_later_products_of_an_analysis_do_not_synchronise_on_cuda(estimator, placement):
    """Once the ``auto`` strategies have finished their timed trials (which synchronise), a product
    waits for nothing: with the data on the GPU (as ``curvkit analyze`` places a tensor pair) the first
    pass has read the class-index checks and counts; with a DataLoader in host memory (new tensors every
    batch) they are read from the host tensors, and the class weights (on the host) were copied once."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from curvkit.choice import AUTO_TRIALS

    torch.manual_seed(0)
    X, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 3, (32,))
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double().cuda()
    if placement == "device":
        data, loss = (X.cuda(), y.cuda()), nn.CrossEntropyLoss(ignore_index=1)
    else:
        data = DataLoader(TensorDataset(X, y), batch_size=8)
        weight = None if estimator == "fisher" else torch.tensor([1.0, 2.0, 0.5])  # the Fisher: a likelihood
        loss = nn.CrossEntropyLoss(weight=weight, ignore_index=1)
    gpu = curvkit.Problem(model, loss, data, batch_size=8)
    A = curvkit.curvature(estimator, gpu)
    v = torch.randn(gpu.dim, dtype=torch.float64, device="cuda")
    with curvkit.fixed_model_state():
        for _ in range(4 * 3 * AUTO_TRIALS):  # past every timed trial (up to 4 ways of 3 choices)
            first = A @ v
        torch.cuda.set_sync_debug_mode("error")
        try:
            second = A @ v
        finally:
            torch.cuda.set_sync_debug_mode(0)
    if estimator != "fisher":  # Monte-Carlo: new targets per product
        torch.testing.assert_close(second, first, rtol=1e-10, atol=0)


def test_batches_move_from_the_host_without_synchronising_on_cuda():
    """A problem on the GPU with its data in host memory: each batch's copy waits for nothing queued."""
    cpu = CASES[0].problem()
    gpu = cpu.to(device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = list(gpu.batches())
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for (inputs, targets), (x, y) in zip(batches, cpu.batches()):
        assert inputs.device.type == "cuda" and torch.equal(inputs.cpu(), x) and torch.equal(targets.cpu(), y)


def test_kfac_resumes_on_the_gpu_from_a_state_loaded_on_the_cpu():
    import io

    from curvkit.optim import KFAC

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).cuda()
    X, y = torch.randn(32, 4, device="cuda"), torch.randint(0, 3, (32,), device="cuda")
    optimizer = KFAC(model.parameters(), model=model, loss_fn="cross_entropy", inv_update_freq=2)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        optimizer.step(batch=(X, y))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed = KFAC(model.parameters(), model=model, loss_fn="cross_entropy", inv_update_freq=2)
    resumed.load_state_dict(torch.load(buffer, map_location="cpu", weights_only=True))
    resumed.zero_grad()
    torch.nn.functional.cross_entropy(model(X), y).backward()
    resumed.step(batch=(X, y))  # the running factors were moved back to the parameters' GPU
    assert resumed.steps == 4 and resumed.skipped_steps == 0


def test_conv_layer_rules_are_accepted_under_cudnn_tf32():
    torch.backends.cudnn.allow_tf32 = True  # cuDNN's default on Ampere and later
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 3)
    ).cuda()
    X, y = torch.randn(16, 3, 8, 8, device="cuda"), torch.randint(0, 3, (16,), device="cuda")
    K = curvkit.curvature("kfac", curvkit.Problem(model, "cross_entropy", (X, y)))  # unsupported="error"
    assert torch.isfinite(K @ torch.randn(K.shape[0], device="cuda")).all()


def test_recurrent_models_on_cuda_run_without_cudnn_and_match_the_cpu():
    class Recurrent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(3, 5, batch_first=True)
            self.head = torch.nn.Linear(5, 2)

        def forward(self, x):
            return self.head(self.lstm(x)[0][:, -1])

    torch.manual_seed(0)
    model = Recurrent().double()
    X, y = torch.randn(6, 4, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    cpu = curvkit.Problem(model, "cross_entropy", (X, y))
    gpu = curvkit.Problem(Recurrent().double().cuda(), "cross_entropy", (X.cuda(), y.cuda()))
    gpu.model.load_state_dict(model.state_dict())
    v = torch.randn(cpu.dim, dtype=torch.float64)
    truth = curvkit.curvature("hessian", cpu) @ v
    out = curvkit.curvature("hessian", gpu) @ v.cuda()  # cuDNN's LSTM has no double backward
    assert ((out.cpu() - truth).norm() / truth.norm()).item() < 1e-10


def test_a_loss_with_its_weights_on_the_gpu_counts_on_the_host_and_sees_in_place_edits():
    """The count of a batch copied from the host reads the weights' host copy, kept while their version
    counter stands; the weights are checked again once per in-place edit, and an edit to a negative
    weight is refused by the factor again."""
    from torch import nn

    from curvkit.losses import resolve_loss
    from curvkit.snapshot import record_host_copy

    module = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5])).cuda()
    loss = resolve_loss(module)
    host = torch.tensor([0, 1, 2, 1])
    targets = host.cuda()
    record_host_copy(targets, host)
    outputs = torch.zeros(4, 3, device="cuda")
    assert loss.count(outputs, targets) == 5.5
    kept = loss._on(loss.weight, torch.device("cpu"), torch.float32)
    assert loss._on(loss.weight, torch.device("cpu"), torch.float32) is kept
    with torch.no_grad():
        module.weight[1] = 4.0
    assert loss.count(outputs, targets) == 9.5
    loss.output_hessian_factor(outputs, targets)  # the weights checked again, once for this edit
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss.output_hessian_factor(outputs, targets)  # convex by construction: nothing read back
    finally:
        torch.cuda.set_sync_debug_mode(0)
    with torch.no_grad():
        module.weight[1] = -1.0
    with pytest.raises(curvkit.NonConvexLossError):
        loss.output_hessian_factor(outputs, targets)


def test_snapshot_contents_on_cuda_count_a_nan_equal_to_itself():
    from curvkit.snapshot import contents_equal

    t = torch.tensor([1.0, float("nan"), 3.0], device="cuda")
    n = torch.arange(3, device="cuda")
    assert contents_equal([t, n], [t.clone(), n.clone()])
    other = t.clone()
    other[0] = 2.0
    assert not contents_equal([t, n], [other, n.clone()])
    assert not contents_equal([t, n], [t.clone(), n + 1])
