"""A NaN or Inf product stops every spectral algorithm at once, with an error naming it.

Each test injects non-finite entries into one product of a symmetric operator and
checks that the analysis raises :class:`curvkit.NonFiniteError` with a one-line
message naming that product (its number, the analysis, what is wrong with it).
"""

from __future__ import annotations

import re

import pytest
import torch

import curvkit
from curvkit.checks import check_residuals, check_symmetry
from curvkit.linalg.trace import trace

DT = torch.float64
P = 200


def spd(n: int = P, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=g, dtype=DT)
    return B @ B.T / n + 0.1 * torch.eye(n, dtype=DT)


class PoisonedProducts(curvkit.DenseOperator):
    """A dense operator whose ``bad``-th product (columns counted from 1 across calls)
    has ``value`` in its first three entries."""

    def __init__(self, matrix: torch.Tensor, bad: int, value: float = float("nan")):
        super().__init__(matrix, symmetric=True)
        self.bad, self.value = bad, value

    def _matmat(self, M: torch.Tensor) -> torch.Tensor:
        out = super()._matmat(M)
        first = self.matvecs - M.shape[1] + 1  # the base class has counted this call
        if first <= self.bad < first + M.shape[1]:
            out[:3, self.bad - first] = self.value
        return out


def raises_naming(what: str, entries: str = "NaN in 3 of 200 entries"):
    """``pytest.raises`` for a one-line NonFiniteError that names ``what`` and ``entries``."""
    return pytest.raises(curvkit.NonFiniteError, match=re.escape(f"{what} is not finite ({entries})"))


def test_is_a_curvkit_error_and_a_floating_point_error():
    assert issubclass(curvkit.NonFiniteError, curvkit.CurvkitError)
    assert issubclass(curvkit.NonFiniteError, FloatingPointError)


# ------------------------------------------------------------------------- density
def test_density_names_the_run_and_the_step():
    A = PoisonedProducts(spd(), 5)  # runs advance together: products 4-6 are step 2
    with raises_naming("the 5th product of Lanczos quadrature (density, run 2, step 2)"):
        curvkit.density(A, steps=10, runs=3)


# --------------------------------------------------------------------------- trace
@pytest.mark.parametrize(
    ("method", "bad", "stage"),
    [
        ("hutchinson", 6, "probes"),
        ("hutch++", 2, "sketch"),
        ("hutch++", 15, "projection"),
        ("hutch++", 25, "probes"),
        ("xtrace", 2, "sketch"),
        ("xtrace", 20, "projection"),
        ("exact", 150, "basis"),
    ],
)
def test_trace_names_the_product_and_the_stage(method, bad, stage):
    A = PoisonedProducts(spd(), bad)
    ordinal = {2: "2nd"}.get(bad, f"{bad}th")
    with raises_naming(f"the {ordinal} product of the trace estimate ({method}, {stage})"):
        trace(A, method=method, matvecs=30, batch_size=4, adaptive=False)


def test_exact_trace_checks_the_operators_diagonal():
    class NaNDiagonal(curvkit.DenseOperator):
        def diagonal(self):
            return torch.diagonal(self.matrix).clone().index_fill_(0, torch.tensor([7]), float("nan"))

    with raises_naming("the diagonal of the operator (trace, exact)", "NaN in 1 of 200 entries"):
        trace(NaNDiagonal(spd()), method="exact")


# -------------------------------------------------------------------------- checks
def test_checks_name_the_product():
    with raises_naming("the 2nd product of check_symmetry"):
        check_symmetry(PoisonedProducts(spd(), 2))
    clean = curvkit.eigenvalues(curvkit.DenseOperator(spd()), k=3, tol=1e-8)
    with raises_naming("the 3rd product of check_residuals"):
        check_residuals(PoisonedProducts(spd(), 3), clean)
