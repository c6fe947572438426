"""Shared helpers of the spectral algorithms: operator validation and random probes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from curvkit.arguments import integer
from curvkit.distributed import shared_seed
from curvkit.errors import CurvkitError, NonFiniteError, ShapeMismatchError
from curvkit.operator import CurvatureOperator, basis_diagonal

__all__ = [
    "Products",
    "Progress",
    "check_batch_size",
    "check_finite",
    "check_matvecs",
    "check_square",
    "draw_probes",
    "exact_diagonal",
    "gaussian",
    "non_finite_error",
    "probe_generator",
    "product_name",
    "rademacher",
    "require_fixed_map",
    "staged",
]

Progress = Callable[[dict[str, Any]], None]
"""A progress callback: called with a dict of counters (``matvecs``, ``step``, ...)."""


def staged(progress: Progress | None, stage: str) -> Progress | None:
    """``progress`` with ``{"stage": stage}`` first in every report (for work done in stages).

    A report's own stage follows: ``"baseline trace: sketch"``.
    """
    if progress is None:
        return None

    def report(counters: dict[str, Any]) -> None:
        inner = counters.get("stage")
        rest = {k: v for k, v in counters.items() if k != "stage"}
        progress({"stage": stage if inner is None else f"{stage}: {inner}", **rest})

    return report


def check_square(A: Any) -> int:
    """Validate the operator contract (``shape``, ``matmat``, ``dtype``, ``device``); return ``P``.

    Raises:
        ShapeMismatchError: ``A`` is not square or lacks the contract's methods.
    """
    shape = getattr(A, "shape", None)
    if shape is None or len(shape) != 2 or not hasattr(A, "matmat"):
        raise ShapeMismatchError(
            f"expected a curvkit.CurvatureOperator (shape, matmat), got {type(A).__name__}"
        )
    if shape[0] != shape[1]:
        raise ShapeMismatchError(f"spectral analysis needs a square operator, got shape {tuple(shape)}")
    return int(shape[0])


def check_batch_size(batch_size: Any) -> None:
    """Refuse a ``batch_size`` (columns per product) that is not an integer ``>= 1`` or ``None``."""
    integer(batch_size, "batch_size", allow_none=True)


def check_matvecs(matvecs: Any, minimum: int, what: str) -> None:
    """Refuse a budget of products that is not an integer of at least ``minimum`` (``what`` needs it)."""
    integer(matvecs, f"{what}: matvecs", minimum=minimum)


def require_fixed_map(A: Any, analysis: str) -> None:
    """Refuse an operator whose products resample (``RESAMPLES``): it is not one linear map.

    Krylov methods combine products of one operator; with products that draw fresh
    samples each time they return numbers of no operator at all (Lanczos on a
    diag(1..20) with resampled noise returned 57.8 and 35.3).

    Raises:
        CurvkitError: ``A.RESAMPLES`` is set.
    """
    if getattr(A, "RESAMPLES", False):
        name = getattr(A, "name", type(A).__name__)
        raise CurvkitError(
            f"{analysis} needs a fixed linear operator, but {name!r} resamples on every product "
            "(RESAMPLES): build it with a seed so that every product uses the same samples, "
            "or use a trace estimator, which accepts resampling operators"
        )


def probe_generator(seed: int | None) -> torch.Generator:
    """A CPU generator, so that a seed gives the same probes on every device.

    ``seed=None`` means fresh randomness (a seed from the operating system), as in
    NumPy and PyTorch, the same in every process of a data-parallel run
    (:func:`curvkit.distributed.shared_seed`); the seed used is
    ``generator.initial_seed()``.
    """
    return torch.Generator().manual_seed(shared_seed() if seed is None else int(seed))


def rademacher(P: int, K: int, gen: torch.Generator, dtype: torch.dtype, device: Any) -> Tensor:
    """``[P, K]`` independent +-1 entries."""
    return (torch.randint(0, 2, (P, K), generator=gen) * 2 - 1).to(dtype=dtype, device=device)


def gaussian(P: int, K: int, gen: torch.Generator, dtype: torch.dtype, device: Any) -> Tensor:
    """``[P, K]`` independent standard normal entries."""
    return torch.randn(P, K, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


def _ordinal(n: int) -> str:
    """``1st``, ``2nd``, ``3rd``, ``4th``, ..., ``11th``, ``21st``, ..."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n:,}{suffix}"


def product_name(number: int, analysis: str) -> str:
    """``"the 77th product of Lanczos (eigenvalues, largest)"``: how errors name a product."""
    return f"the {_ordinal(number)} product of {analysis}"


def non_finite_error(values: Tensor, what: str) -> NonFiniteError:
    """The error for ``values`` (e.g. one product, named ``what`` by :func:`product_name`)
    when they, or a value computed from them, are not finite."""
    nan = int(torch.isnan(values).sum().item())
    inf = int(torch.isinf(values).sum().item())
    if nan or inf:
        counts = " and ".join(f"{kind} in {count:,}" for kind, count in (("NaN", nan), ("Inf", inf)) if count)
        return NonFiniteError(
            f"{what} is not finite ({counts} of {values.numel():,} entries): the model, loss or data "
            "give a non-finite curvature; check them (a NaN parameter or input, an overflow in low "
            "precision)"
        )
    return NonFiniteError(
        f"a value computed from {what} is not finite, although its entries are (up to "
        f"{values.abs().max().item():.3g}, which overflows {values.dtype} arithmetic): rescale the "
        "loss or run the operator in float64"
    )


def check_finite(products: Tensor, first: int, analysis: str) -> None:
    """Raise :class:`~curvkit.errors.NonFiniteError` if ``products`` (``[P]``, or ``[P, K]``
    with columns numbered ``first``, ``first + 1``, ...) holds a NaN or an Inf.

    One reduction and one host synchronisation per call.
    """
    if bool(torch.isfinite(products).all()):
        return
    columns = products.reshape(products.shape[0], -1)
    bad = (~torch.isfinite(columns)).any(dim=0).nonzero()[0].item()
    raise non_finite_error(columns[:, bad], product_name(first + bad, analysis))


def draw_probes(kind: str, P: int, K: int, gen: torch.Generator, dtype: torch.dtype, device: Any) -> Tensor:
    """``[P, K]`` probes (``"rademacher"`` or ``"gaussian"``), one column at a time.

    So blocks of any size give the same columns. They are drawn where the
    generator is (the CPU) and moved to ``device`` once, as one block.
    """
    draw = rademacher if kind == "rademacher" else gaussian
    if K == 0:
        return torch.zeros(P, 0, dtype=dtype, device=device)
    return torch.cat([draw(P, 1, gen, dtype, gen.device) for _ in range(K)], dim=1).to(device)


class Products:
    """Applies ``A`` to blocks of columns, counting products, checking that they are
    finite (one reduction per block) and reporting progress.

    Args:
        A: The operator.
        batch_size: Columns per ``A.matmat`` call.
        total: The planned number of products (for progress).
        progress: The progress callback, or ``None``.
        analysis: What the products are for, e.g. ``"the trace estimate"``.
        method: The method, named in errors with the stage.
    """

    def __init__(
        self, A: Any, batch_size: int, total: int, progress: Progress | None, analysis: str, method: str
    ):
        self.A = A
        self.batch_size = batch_size
        self.total = total
        self.progress = progress
        self.analysis = analysis
        self.method = method
        self.matvecs = 0

    def __call__(self, M: Tensor, stage: str) -> Tensor:
        out = []
        for start in range(0, M.shape[1], self.batch_size):
            block = M[:, start : start + self.batch_size]
            out.append(self.A.matmat(block).detach())
            check_finite(out[-1], self.matvecs + 1, f"{self.analysis} ({self.method}, {stage})")
            self.matvecs += block.shape[1]
            self.report(stage)
        return torch.cat(out, dim=1) if len(out) > 1 else out[0]

    def report(self, stage: str) -> None:
        """Call the progress callback with the products so far."""
        if self.progress is not None:
            self.progress({"matvecs": self.matvecs, "total": self.total, "stage": stage})


def exact_diagonal(
    A: Any, apply: Products, P: int, dtype: torch.dtype, device: Any, analysis: str, alternatives: str
) -> Tensor:
    """The exact ``[P]`` diagonal: ``A.diagonal()`` if the operator's is cheap, else basis products.

    The operator contract says which (``CHEAP_DIAGONAL``); other operators, and
    objects that only have ``matmat``, are multiplied with blocks of basis
    vectors through ``apply`` (``P`` products, stage ``"basis"``).

    Args:
        analysis: What the diagonal is for (``"trace"``), named in errors.
        alternatives: The methods an error suggests for a resampling operator.

    Raises:
        CurvkitError: The operator resamples on every product (``RESAMPLES``): it
            has no fixed diagonal.
        NonFiniteError: The cheap diagonal holds a NaN or an Inf (products are
            checked by ``apply``).
    """
    if getattr(A, "RESAMPLES", False):
        raise CurvkitError(
            f"method 'exact' needs a fixed linear operator, but {type(A).__name__} resamples on every "
            f"product (RESAMPLES); use {alternatives} for an estimate with a standard error"
        )
    if isinstance(A, CurvatureOperator) and A.CHEAP_DIAGONAL:
        entries = A.diagonal().detach()
        if not bool(torch.isfinite(entries).all()):
            raise non_finite_error(entries, f"the diagonal of the operator ({analysis}, exact)")
        if apply.progress is not None:
            apply.progress({"matvecs": 0, "total": 0, "stage": "diagonal"})
        return entries
    return basis_diagonal(lambda E: apply(E, "basis"), P, apply.batch_size, dtype, device)
