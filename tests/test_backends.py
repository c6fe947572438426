"""Back-end settings changed for one scope are restored exactly, whichever torch API the user set them by."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvkit
from curvkit.backends import without_cudnn, without_tf32


@pytest.fixture
def tf32_by_the_new_api():
    """``torch.backends.fp32_precision = "tf32"``, as a user may set it (the legacy flags then raise)."""
    torch.backends.fp32_precision = "tf32"
    yield
    torch.backends.fp32_precision = "none"
    torch.backends.cuda.matmul.fp32_precision = "none"
    torch.backends.cudnn.conv.fp32_precision = "tf32"


def _settings() -> tuple[str, ...]:
    return (
        torch.backends.fp32_precision,
        torch.backends.cuda.matmul.fp32_precision,
        torch.backends.cudnn.conv.fp32_precision,
    )


def test_without_tf32_sets_ieee_and_restores_the_users_settings(tf32_by_the_new_api):
    before = _settings()
    with without_tf32():
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert _settings() == before


def test_kfac_checks_its_layer_rules_under_the_users_tf32_settings(tf32_by_the_new_api):
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    X, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    before = _settings()
    K = curvkit.curvature("kfac", curvkit.Problem(model, "cross_entropy", (X, y)))
    assert torch.isfinite(K @ torch.randn(K.shape[0])).all() and _settings() == before


def test_without_cudnn_restores_cudnn_and_leaves_the_rest():
    enabled, before = torch.backends.cudnn.enabled, _settings()
    with without_cudnn():
        assert not torch.backends.cudnn.enabled and _settings() == before
    assert torch.backends.cudnn.enabled == enabled


class _Encoder(nn.Module):
    """A transformer encoder layer on embedded tokens: attention by ``F.scaled_dot_product_attention``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.1, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(tokens)).mean(1))


@pytest.mark.parametrize(
    "estimator, strategy", [("hessian", "reverse"), ("hessian", "forward-over-reverse"), ("ggn", "reverse")]
)
def test_curvature_products_through_attention_match_finite_differences(estimator, strategy):
    """PyTorch's fused attention kernels (flash attention on the CPU) have no second derivative."""
    torch.manual_seed(0)
    model = _Encoder().double().eval()
    X, y = torch.randint(0, 7, (6, 5)), torch.randint(0, 3, (6,))
    problem = curvkit.Problem(model, "cross_entropy", (X, y))
    before = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
    v = torch.randn(problem.dim, dtype=torch.float64)
    product = curvkit.curvature(estimator, problem, strategy=strategy) @ v
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()) == before

    params = [p for p in model.parameters() if p.requires_grad]

    def gradient(shift: float) -> torch.Tensor:  # through the default (fused) kernel: first order only
        with torch.no_grad():
            for p, d in zip(params, torch.split(v, [p.numel() for p in params])):
                p.add_(shift * d.view_as(p))
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(X), y), params)
        with torch.no_grad():
            for p, d in zip(params, torch.split(v, [p.numel() for p in params])):
                p.sub_(shift * d.view_as(p))
        return torch.cat([g.reshape(-1) for g in grads])

    if estimator == "hessian":
        expected = (gradient(1e-5) - gradient(-1e-5)) / 2e-5
        torch.testing.assert_close(product, expected, rtol=1e-6, atol=1e-7)
    else:  # PSD and finite; its value is checked against the Hessian elsewhere
        assert torch.isfinite(product).all() and v @ product >= 0


def test_per_sample_gradients_through_attention_take_no_fused_inference_path(monkeypatch):
    """In eval mode under ``torch.func`` the encoder took its fast path, which vmap ran sample by sample."""

    def fused(*args, **kwargs):
        raise AssertionError("the fused inference path of attention was taken")

    monkeypatch.setattr(torch, "_native_multi_head_attention", fused)
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", fused)
    torch.manual_seed(0)
    model = _Encoder().eval()
    X, y = torch.randint(0, 7, (6, 5)), torch.randint(0, 3, (6,))
    fastpath = torch.backends.mha.get_fastpath_enabled()
    E = curvkit.curvature("empirical-fisher", curvkit.Problem(model, "cross_entropy", (X, y)))
    product, diagonal = E @ torch.ones(E.shape[0]), E.diagonal()
    assert torch.isfinite(product).all() and torch.isfinite(diagonal).all()
    assert torch.backends.mha.get_fastpath_enabled() == fastpath
