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
from curvkit.checks import check_psd, check_residuals, check_symmetry
from curvkit.linalg import lanczos
from curvkit.linalg.trace import trace

DT = torch.float64
P = 200


def spd(n: int = P, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=g, dtype=DT)
    return B @ B.T / n + 0.1 * torch.eye(n, dtype=DT)


class PoisonedProducts(curvkit.DenseOperator):
    """A dense operator whose ``bad``-th product (columns counted from 1 across calls)
    has ``value`` in its first three entries. Known only by its products: no cheap diagonal."""

    CHEAP_DIAGONAL = False

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


# --------------------------------------------------------------------- eigenvalues
@pytest.mark.parametrize("reorthogonalisation", ["auto", "full"])
@pytest.mark.parametrize("bad", [1, 7, 30])
def test_lanczos_stops_at_the_product_that_is_not_finite(reorthogonalisation, bad):
    A = PoisonedProducts(spd(), bad)
    with raises_naming(f"the {bad}{'st' if bad == 1 else 'th'} product of Lanczos (eigenvalues, largest)"):
        curvkit.eigenvalues(A, k=3, tol=1e-14, max_basis=12, reorthogonalisation=reorthogonalisation)
    assert A.matvecs == bad  # not one product more


def test_an_infinite_product_is_named_as_such():
    A = PoisonedProducts(spd(), 4, value=float("inf"))
    with raises_naming("the 4th product of Lanczos (eigenvalues, smallest)", "Inf in 3 of 200 entries"):
        curvkit.eigenvalues(A, k=2, which="smallest")


def test_the_certificate_products_are_checked_too(monkeypatch):
    monkeypatch.setattr(lanczos, "PRODUCT_STORE_BYTES", 0)  # certificates need k more products
    used = curvkit.eigenvalues(curvkit.DenseOperator(spd()), k=3, tol=1e-8).matvecs
    A = PoisonedProducts(spd(), used - 1)  # the second of the three certificate products
    with pytest.raises(curvkit.NonFiniteError, match=rf"^the {used - 1}(st|nd|rd|th) product of Lanczos"):
        curvkit.eigenvalues(A, k=3, tol=1e-8)
    assert A.matvecs == used  # the three certificates are one batched product


def test_power_iteration():
    A = PoisonedProducts(spd(), 5)
    with raises_naming("the 5th product of power iteration (eigenvalues, largest_magnitude)"):
        curvkit.eigenvalues(A, k=2, which="largest_magnitude", method="power")


def test_a_value_that_overflows_from_a_finite_product_is_named():
    """Finite float32 products whose norm overflows: the error says so, not that the
    product holds a NaN."""
    A = curvkit.DenseOperator((spd() * 1e34).float(), symmetric=True)
    with pytest.raises(curvkit.NonFiniteError, match="a value computed from the 1st product of Lanczos"):
        curvkit.eigenvalues(A, k=1)


def test_check_psd_goes_through_lanczos():
    with raises_naming("the 9th product of Lanczos (eigenvalues, both_ends)"):
        check_psd(PoisonedProducts(spd(), 9))


def test_the_message_is_one_line():
    with pytest.raises(curvkit.NonFiniteError) as caught:
        curvkit.eigenvalues(PoisonedProducts(spd(), 3), k=2)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("the 3rd product of Lanczos (eigenvalues, largest) is not finite")
