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
