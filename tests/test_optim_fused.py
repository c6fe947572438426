"""curvkit.optim.fused: the fast operands give the results of the Python numbers, bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from curvkit.optim import fused

VALUES = [0.1, 1.0 / 3.0, -0.15 / (1.0 - 0.9**7), 1e-4, 1.0 - 0.999**3, 3.0e38]


def _tensors(dtype: torch.dtype) -> list[Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator, dtype=dtype) for shape in ((7, 5), (3,), (2, 3, 4))]


def _equal(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", VALUES)
def test_fused_operations_equal_the_python_number_ones(dtype, value):
    xs = _tensors(dtype)
    assert isinstance(fused.constant(value, xs), Tensor)  # the fast path is the one tested
    assert _equal(fused.multiply(xs, value), list(torch._foreach_mul(xs, value)))
    assert _equal(fused.divide(xs, value), list(torch._foreach_div(xs, value)))
    scaled, added = [x.clone() for x in xs], [x.clone() for x in xs]
    fused.scale_(scaled, value)
    fused.add_(added, value)
    assert _equal(scaled, [x * value for x in xs])
    assert _equal(added, [x + value for x in xs])


def test_one_number_per_tensor():
    xs = _tensors(torch.float32)
    factors = [2.0, 0.5, -3.0]
    assert _equal(fused.multiply(xs, factors), [x * f for x, f in zip(xs, factors)])
    assert _equal(fused.divide(xs, factors), [x / f for x, f in zip(xs, factors)])
    equal = [0.25, 0.25, 0.25]  # one number after all: the fast operand
    assert _equal(fused.multiply(xs, equal), [x * 0.25 for x in xs])


def test_mixed_or_half_dtypes_keep_the_python_number():
    mixed = [torch.ones(2), torch.ones(2, dtype=torch.float64)]
    assert fused.constant(0.1, mixed) == 0.1  # a float32 0-d tensor would round float64's operand
    scaled = [t.clone() for t in mixed]
    fused.scale_(scaled, 0.1)
    assert scaled[1].tolist() == [0.1, 0.1]  # exact in float64
    half = [torch.ones(2, dtype=torch.bfloat16)]
    assert fused.constant(0.1, half) == 0.1  # bfloat16 computes a number in float32: rounding first differs
    assert fused.constant(0.1, []) == 0.1


def test_lerp_is_a_moving_average():
    averages = _tensors(torch.float64)
    values = [torch.full_like(a, 2.0) for a in averages]
    out = fused.lerp(averages, values, 0.1)
    assert all(
        torch.allclose(o, 0.9 * a + 0.1 * v, rtol=0, atol=1e-15) for o, a, v in zip(out, averages, values)
    )
    assert all(o is not a for o, a in zip(out, averages))  # out of place: the averages are unchanged
