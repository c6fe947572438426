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
