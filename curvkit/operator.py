"""The operator contract every curvature estimator implements.

A :class:`CurvatureOperator` is a linear map on the flat parameter space of a
:class:`~curvkit.Problem` (length ``P``, laid out by a
:class:`~curvkit.layout.ParameterLayout`). A subclass implements one method,
``_matmat(M) -> A @ M`` for a ``[P, K]`` tensor ``M``, and sets the class flags;
everything else is derived here:

* ``A @ v`` for a flat ``[P]`` vector, a ``[P, K]`` matrix, or a list of
  per-parameter tensors (each of the parameter's shape, optionally with one
  trailing ``K`` dimension), returning the same form;
* ``matvec`` / ``matmat``, ``to_dense`` (refused above a size limit), ``to_scipy``;
* ``diagonal()``: the exact diagonal, from products with blocks of basis vectors
  (refused above the same limit), unless the operator knows a cheap way
  (``CHEAP_DIAGONAL``, see below);
* algebra: ``2.0 * A``, ``A + B``, ``A - B``, ``-A``, ``A.damped(lam)`` (``A + lam I``;
  overridable where an operator damps otherwise, e.g. KFAC's factored damping);
* ``restrict(params)``: the diagonal block of a subset of parameters;
* linear algebra: ``trace()``, ``inverse(damping)`` (an operator for
  ``(A + damping I)^-1``), ``solve(v, damping)``, ``logdet(damping)`` and
  ``eigenvalues(k, which)`` (exact pairs), exact where the operator has
  structure (see below), otherwise generic: the trace from the diagonal, the
  inverse, log-determinant and eigenpairs from the dense matrix (refused above
  the size limit of ``to_dense``; :func:`curvkit.eigenvalues` runs Lanczos).

Flags (class attributes, overridable per instance):

* ``SYMMETRIC``: ``v.A w == w.A v``;
* ``PSD``: positive semi-definite;
* ``EXACT``: the product is the exact quantity, not an approximation;
* ``STOCHASTIC``: products come from random samples (Monte-Carlo). With a seed such
  an operator is still a fixed linear map (the same samples for every product), so
  every analysis applies; see :mod:`curvkit.problem_operator`;
* ``RESAMPLES``: products draw fresh samples every time, so the operator is not a
  fixed linear map: eigenvalues, densities and the checks refuse it (trace
  estimators accept it).

The diagonal is part of the contract. ``CHEAP_DIAGONAL`` (a class attribute,
overridable per instance, not one of :data:`FLAGS`) says that :meth:`diagonal`
costs far less than ``P`` products: a dense matrix, ``scale * I``, the Gauss-Newton
and Fisher diagonals from per-sample Jacobians, the empirical Fisher's squared
per-sample gradients. Such an operator implements ``_diagonal()``; scaled, summed,
restricted and transposed operators pass the diagonal through. Generic code
(``curvkit.trace(method="exact")``, ``curvkit.diagonal``) asks ``CHEAP_DIAGONAL``
before choosing between ``diagonal()`` and its own products.

**Structure.** An operator that holds more than a product (a Kronecker-factored
approximation, ``scale * I``) lists in ``STRUCTURE`` (a class attribute,
overridable per instance) the methods it computes exactly and cheaply, and
implements their private forms: ``"trace"`` -> ``_trace()``, ``"inverse"`` ->
``_inverse(damping)``, ``"logdet"`` -> ``_logdet(damping)``, ``"eigenvalues"`` ->
``_eigenpairs(k, which)`` (values and unit vectors). :func:`curvkit.eigenvalues` and
:func:`curvkit.trace` use them instead of Lanczos or Hutchinson and say so in their
results (``method="exact"``, ``structured=True``). Composition keeps structure:
``alpha * A`` has ``A``'s, ``A + c I`` (``A.damped(c)``) has ``A``'s inverse,
log-determinant and eigenpairs with the damping shifted, a sum has the trace if
every term has it.

Counters ``matvecs`` (columns multiplied) and ``data_passes`` record the work done.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from curvkit.arguments import non_negative_number
from curvkit.data import same_device
from curvkit.errors import CurvkitError, DenseTooLargeError, PluginError, ShapeMismatchError
from curvkit.layout import ParameterLayout
from curvkit.snapshot import fixed_model_state

__all__ = [
    "CurvatureOperator",
    "DenseOperator",
    "DiagonalOperator",
    "IdentityOperator",
    "STRUCTURE_METHODS",
    "ConvertedOperator",
    "RestrictedOperator",
    "ScaledOperator",
    "SumOperator",
    "basis_blocks",
    "basis_diagonal",
    "default_max_dense_dim",
]

FLAGS = ("SYMMETRIC", "PSD", "EXACT", "STOCHASTIC", "RESAMPLES")

STRUCTURE_METHODS = ("trace", "inverse", "logdet", "eigenvalues")
"""Methods an operator may compute exactly from its structure (its ``STRUCTURE``)."""


def default_max_dense_dim() -> int:
    """The largest ``P`` for which :meth:`CurvatureOperator.to_dense` runs by default.

    10,000 unless the environment variable ``CURVKIT_MAX_DENSE_DIM`` says otherwise.
    """
    return int(os.environ.get("CURVKIT_MAX_DENSE_DIM", "10000"))


def basis_blocks(
    P: int, block_size: int, dtype: torch.dtype, device: torch.device | str
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(rows, E)`` for consecutive blocks of the ``P x P`` identity: ``E = I[:, rows]``.

    >>> [(rows.tolist(), E.shape) for rows, E in basis_blocks(3, 2, torch.float64, "cpu")]
    [([0, 1], torch.Size([3, 2])), ([2], torch.Size([3, 1]))]
    """
    for start in range(0, P, block_size):
        rows = torch.arange(start, min(start + block_size, P), device=device)
        E = torch.zeros(P, len(rows), dtype=dtype, device=device)
        E[rows, torch.arange(len(rows), device=device)] = 1
        yield rows, E


@fixed_model_state()
def basis_diagonal(
    matmat: Callable[[Tensor], Tensor],
    P: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> Tensor:
    """``[A_11, ..., A_PP]`` from ``matmat`` applied to blocks of ``block_size`` basis vectors.

    ``P`` products in ``ceil(P / block_size)`` calls; memory ``P * block_size``.
    """
    parts = [
        matmat(E)[rows, torch.arange(len(rows), device=device)]
        for rows, E in basis_blocks(P, block_size, dtype, device)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=device)


class CurvatureOperator:
    """A ``P x P`` linear operator on flattened parameters.

    Args:
        layout: The parameters behind the flat vectors.
        dtype: Dtype of the products.
        device: Device of the products.
        product_dtype: The precision the products are computed in, when lower
            than ``dtype`` (an operator converted by :meth:`astype`); default ``dtype``.
            Analyses judge what the products can resolve by it (the accuracy of
            :func:`curvkit.checks.check_agreement`, the precision warnings).
    """

    SYMMETRIC: bool = True
    PSD: bool = False
    EXACT: bool = True
    STOCHASTIC: bool = False
    RESAMPLES: bool = False
    CHEAP_DIAGONAL: bool = False
    STRUCTURE: frozenset[str] = frozenset()

    def __init__(
        self,
        layout: ParameterLayout,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        product_dtype: torch.dtype | None = None,
    ):
        self.layout = layout
        self.dtype = dtype
        self.product_dtype = dtype if product_dtype is None else product_dtype
        self.device = torch.device(device)
        self.matvecs = 0
        self.data_passes = 0

    # ---------------------------------------------------------------- contract
    def _matmat(self, M: Tensor) -> Tensor:
        """``A @ M`` for ``M`` of shape ``[P, K]`` (dtype and device already matched)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _matmat")

    def _rmatmat(self, M: Tensor) -> Tensor:
        """``A^T @ M``; only non-symmetric operators need to implement it."""
        if self.SYMMETRIC:
            return self._matmat(M)
        raise NotImplementedError(f"{type(self).__name__} does not implement _rmatmat")

    def _diagonal(self) -> Tensor:
        """The exact ``[P]`` diagonal, computed cheaply; implemented where ``CHEAP_DIAGONAL`` is set."""
        raise NotImplementedError(
            f"{type(self).__name__} sets CHEAP_DIAGONAL but does not implement _diagonal"
        )

    def _trace(self) -> float:
        """The exact trace from the operator's structure (``"trace"`` in ``STRUCTURE``)."""
        raise NotImplementedError(f"{type(self).__name__} lists 'trace' in STRUCTURE but has no _trace")

    def _inverse(self, damping: float) -> CurvatureOperator:
        """``(A + damping I)^-1`` from the operator's structure (``"inverse"`` in ``STRUCTURE``)."""
        raise NotImplementedError(f"{type(self).__name__} lists 'inverse' in STRUCTURE but has no _inverse")

    def _logdet(self, damping: float) -> float:
        """``log det(A + damping I)`` from the operator's structure (``"logdet"`` in ``STRUCTURE``)."""
        raise NotImplementedError(f"{type(self).__name__} lists 'logdet' in STRUCTURE but has no _logdet")

    def _eigenpairs(self, k: int, which: str) -> tuple[Tensor, Tensor]:
        """``k`` exact eigenvalues and unit eigenvectors ``[P, k]`` at one end (``"eigenvalues"``)."""
        raise NotImplementedError(
            f"{type(self).__name__} lists 'eigenvalues' in STRUCTURE but has no _eigenpairs"
        )

    # ----------------------------------------------------------------- derived
    @property
    def shape(self) -> tuple[int, int]:
        """``(P, P)``."""
        return (self.layout.dim, self.layout.dim)

    @property
    def flags(self) -> dict[str, bool]:
        """The flags of this operator (:data:`FLAGS`), by lower-case name."""
        return {f.lower(): bool(getattr(self, f)) for f in FLAGS}

    def matmat(self, M: Tensor) -> Tensor:
        """``A @ M`` for a ``[P, K]`` tensor: all K columns in one pass over the data."""
        M = self._check_flat(M, ndim=2)
        self.matvecs += M.shape[1]
        return self._matmat(M)

    def matvec(self, v: Tensor) -> Tensor:
        """``A @ v`` for a flat ``[P]`` vector."""
        v = self._check_flat(v, ndim=1)
        return self.matmat(v.unsqueeze(1)).squeeze(1)

    def rmatmat(self, M: Tensor) -> Tensor:
        """``A^T @ M`` for a ``[P, K]`` tensor."""
        M = self._check_flat(M, ndim=2)
        self.matvecs += M.shape[1]
        return self._rmatmat(M)

    def __matmul__(self, x: Tensor | Sequence[Tensor]) -> Any:
        if isinstance(x, Tensor):
            if x.dim() == 1:
                return self.matvec(x)
            if x.dim() == 2:
                return self.matmat(x)
            raise ShapeMismatchError(f"operator @ tensor needs 1 or 2 dimensions, got {x.dim()}")
        if isinstance(x, list | tuple):
            if len(x) and all(t.shape == s for t, s in zip(x, self.layout.shapes)):
                flat = self.layout.flatten(list(x), batch_dims=0)
                return self.layout.unflatten(self.matvec(flat))
            flat = self.layout.flatten(list(x), batch_dims=1)
            return self.layout.unflatten(self.matmat(flat))
        return NotImplemented

    def _check_flat(self, x: Tensor, ndim: int) -> Tensor:
        if not isinstance(x, Tensor):
            raise ShapeMismatchError(f"expected a tensor, got {type(x).__name__}")
        if x.dim() != ndim or x.shape[0] != self.shape[1]:
            want = "[P]" if ndim == 1 else "[P, K]"
            raise ShapeMismatchError(
                f"operator of shape {self.shape} cannot multiply a tensor of shape "
                f"{tuple(x.shape)}; expected {want} with P = {self.shape[1]}"
            )
        return x.to(device=self.device, dtype=self.dtype)

    def structured(self) -> CurvatureOperator:
        """The operator that holds this one's structure: itself by default.

        An operator that builds its structure when first used (the ``kfac``
        estimator's, whose Kronecker factors take a pass over the data) returns
        what it builds, a :class:`curvkit.KroneckerOperator`. Code that works on
        the structure itself (:class:`curvkit.RunningCurvature` averages it) asks
        for it here.
        """
        return self

    @fixed_model_state()
    def to_dense(self, max_dim: int | None = None, block_size: int = 256) -> Tensor:
        """The dense ``[P, P]`` matrix, built from products with blocks of basis vectors.

        Args:
            max_dim: Refuse when ``P`` exceeds this (default
                :func:`default_max_dense_dim`).
            block_size: Number of basis vectors per product (bounds peak memory).

        Raises:
            DenseTooLargeError: ``P`` is above the limit.
        """
        self._check_dense_size(max_dim)
        cols = [self.matmat(E) for _, E in basis_blocks(self.shape[0], block_size, self.dtype, self.device)]
        return torch.cat(cols, dim=1)

    def diagonal(self, max_dim: int | None = None, block_size: int = 256) -> Tensor:
        """The exact diagonal ``[A_11, ..., A_PP]`` as a flat ``[P]`` tensor.

        With ``CHEAP_DIAGONAL`` the operator's own way (``_diagonal()``: a closed
        form, per-sample Jacobians, no products); otherwise ``P`` products with
        blocks of basis vectors, refused above the size limit of :meth:`to_dense`.

        Args:
            max_dim: For the products with basis vectors: refuse when ``P``
                exceeds this (default :func:`default_max_dense_dim`).
            block_size: Basis vectors per product (bounds peak memory).

        Raises:
            DenseTooLargeError: No cheap diagonal, and ``P`` is above the limit.
            CurvkitError: No cheap diagonal, and the operator resamples on every
                product (``RESAMPLES``): its products have no fixed diagonal.
            PluginError: A cheap diagonal of the wrong shape, dtype or device.

        Example:
            >>> A = DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 3.0]]))
            >>> A.diagonal(), (A + 2 * A).diagonal()
            (tensor([2., 3.]), tensor([6., 9.]))
        """
        if self.CHEAP_DIAGONAL:
            return self._check_result(self._diagonal(), (self.shape[0],), "the diagonal")
        if self.RESAMPLES:
            raise CurvkitError(
                f"the diagonal of {getattr(self, 'name', type(self).__name__)!r} from products with basis "
                "vectors needs a fixed linear operator, but it resamples on every product (RESAMPLES); "
                "use curvkit.diagonal(A, method='hutchinson') for an estimate with a standard error"
            )
        self._check_dense_size(max_dim)
        return basis_diagonal(self.matmat, self.shape[0], block_size, self.dtype, self.device)

    def _check_result(self, out: Any, shape: tuple[int, ...], what: str) -> Tensor:
        """``out`` if it is a tensor of ``shape`` in the operator's dtype and on its device.

        Raises:
            PluginError: It is not, naming the estimator (a plugin's product or
                diagonal is malformed).
        """
        name = getattr(self, "name", type(self).__name__)
        form = "[P, K]" if len(shape) == 2 else "[P]"
        if not isinstance(out, Tensor) or out.shape != shape or out.dtype != self.dtype:
            got = (
                f"a {type(out).__name__}"
                if not isinstance(out, Tensor)
                else f"shape {tuple(out.shape)}, {out.dtype}"
            )
            raise PluginError(
                f"estimator {name!r} returned {got} for {what}: it must be {form} = {shape} in "
                f"{self.dtype} on {self.device}"
            )
        if not same_device(out.device, self.device):
            raise PluginError(
                f"estimator {name!r} returned {what} on {out.device}; it must be on {self.device}"
            )
        return out

    def _check_dense_size(self, max_dim: int | None) -> None:
        limit = default_max_dense_dim() if max_dim is None else max_dim
        P = self.shape[0]
        if P > limit:
            size_gb = P * P * torch.finfo(self.dtype).bits / 8 / 1e9
            raise DenseTooLargeError(
                f"a dense {P} x {P} matrix ({size_gb:.1f} GB) exceeds the limit of dimension "
                f"{limit}; restrict to fewer parameters with .restrict([...]) or raise the "
                "limit with to_dense(max_dim=...) or CURVKIT_MAX_DENSE_DIM"
            )

    def to_scipy(self, dtype: Any = None) -> Any:
        """A :class:`scipy.sparse.linalg.LinearOperator` over NumPy arrays.

        Args:
            dtype: NumPy dtype of the SciPy operator (default float64).
        """
        import numpy as np

        try:
            from scipy.sparse.linalg import LinearOperator
        except ImportError as exc:  # pragma: no cover - depends on the environment
            from curvkit.errors import CurvkitError

            raise CurvkitError("to_scipy() needs SciPy: pip install scipy") from exc
        np_dtype = np.dtype(dtype or np.float64)

        def apply(fn: Any, x: Any) -> Any:
            x = np.asarray(x)
            M = torch.as_tensor(x.reshape(self.shape[1], -1).astype(np_dtype, copy=False))
            out = fn(M.to(device=self.device, dtype=self.dtype))
            out = out.detach().cpu().numpy().astype(np_dtype, copy=False)
            return out.reshape(x.shape) if x.ndim == 1 else out

        return LinearOperator(
            shape=self.shape,
            dtype=np_dtype,
            matvec=lambda x: apply(self.matmat, x),
            matmat=lambda x: apply(self.matmat, x),
            rmatvec=lambda x: apply(self.rmatmat, x),
            rmatmat=lambda x: apply(self.rmatmat, x),
        )

    # ------------------------------------------------------- linear algebra
    def trace(self) -> float:
        """The exact trace: from the structure, else the sum of :meth:`diagonal`.

        For estimates with a budget of products, see :func:`curvkit.trace`.
        """
        if "trace" in self.STRUCTURE:
            return float(self._trace())
        return float(self.diagonal().to(torch.float64).sum())

    def inverse(self, damping: float = 0.0) -> CurvatureOperator:
        """An operator for ``(A + damping I)^-1``.

        From the structure where the operator has one (``"inverse"`` in
        ``STRUCTURE``); otherwise the inverse of the dense matrix (symmetric
        operators by eigendecomposition), refused above the size limit of
        :meth:`to_dense`.

        Raises:
            DenseTooLargeError: No structure and ``P`` above the dense limit.
            CurvkitError: ``A + damping I`` is singular to working precision (the
                message gives its smallest and largest eigenvalue magnitudes).
        """
        damping = check_damping(damping)
        if "inverse" in self.STRUCTURE:
            return self._inverse(damping)
        return _dense_inverse(self, damping)

    def solve(self, v: Tensor, damping: float = 0.0) -> Tensor:
        """``(A + damping I)^-1 v`` for ``v`` of shape ``[P]`` or ``[P, K]`` (see :meth:`inverse`)."""
        return self.inverse(damping) @ v

    def logdet(self, damping: float = 0.0) -> float:
        """``log det(A + damping I)`` of a positive definite ``A + damping I``.

        From the structure where the operator has one (``"logdet"`` in
        ``STRUCTURE``); otherwise from the dense matrix (refused above the size
        limit of :meth:`to_dense`).

        Raises:
            CurvkitError: ``A + damping I`` is not positive definite (its
                determinant is not positive).
        """
        damping = check_damping(damping)
        if "logdet" in self.STRUCTURE:
            return float(self._logdet(damping))
        dense = self.to_dense().to(torch.float64)
        dense = dense + damping * torch.eye(dense.shape[0], dtype=dense.dtype, device=dense.device)
        sign, value = torch.linalg.slogdet(dense)
        if sign.item() <= 0:
            raise CurvkitError(
                f"log det(A + {damping:g} I) needs a positive definite matrix; its determinant is "
                f"{'zero' if sign.item() == 0 else 'negative'}: add damping"
            )
        return float(value)

    def eigenvalues(self, k: int = 5, which: str = "largest") -> tuple[Tensor, Tensor]:
        """``k`` exact eigenpairs: values ``[k]`` (most extreme first) and unit vectors ``[P, k]``.

        From the structure where the operator has one (``"eigenvalues"`` in
        ``STRUCTURE``); otherwise from the eigendecomposition of the dense matrix
        (symmetric operators, refused above the size limit of :meth:`to_dense`).
        For large operators without structure use :func:`curvkit.eigenvalues`
        (Lanczos, with residual certificates), which itself uses the structure
        when there is one.

        Args:
            k: Number of pairs.
            which: ``"largest"``, ``"smallest"``, ``"both_ends"`` (``ceil(k/2)``
                largest, ``floor(k/2)`` smallest) or ``"largest_magnitude"``.

        Raises:
            CurvkitError: ``k`` not in ``1..P``, an unknown ``which``, or a
                non-symmetric operator without structure.
        """
        if which not in ("largest", "smallest", "both_ends", "largest_magnitude"):
            raise CurvkitError(f"unknown which {which!r}")
        if not 1 <= k <= self.shape[0]:
            raise CurvkitError(f"k must be between 1 and the operator's dimension {self.shape[0]}, got {k}")
        pairs = self._eigenpairs if "eigenvalues" in self.STRUCTURE else self._dense_eigenpairs
        if which == "both_ends":
            top, bottom = pairs(math.ceil(k / 2), "largest"), pairs(k // 2, "smallest")
            return torch.cat([top[0], bottom[0]]), torch.cat([top[1], bottom[1]], dim=1)
        if which == "largest_magnitude":
            top, bottom = pairs(k, "largest"), pairs(k, "smallest")
            values, vectors = torch.cat([top[0], bottom[0]]), torch.cat([top[1], bottom[1]], dim=1)
            keep = torch.argsort(values.abs(), descending=True)[:k]
            return values[keep], vectors[:, keep]
        return pairs(k, which)

    def _dense_eigenpairs(self, k: int, which: str) -> tuple[Tensor, Tensor]:
        if not self.SYMMETRIC:
            raise CurvkitError("exact eigenpairs need a symmetric operator (or one with structure)")
        values, vectors = torch.linalg.eigh(self.to_dense())
        picked = (
            torch.arange(k) if which == "smallest" else torch.arange(len(values) - 1, len(values) - 1 - k, -1)
        )
        return values[picked], vectors[:, picked]

    def restrict(self, params: str | Sequence[str]) -> CurvatureOperator:
        """The diagonal block ``A[S, S]`` for a subset ``S`` of the parameters.

        Args:
            params: Parameter names (exact names of this operator's layout, or
                module prefixes such as ``"0"`` for ``"0.weight"``, ``"0.bias"``).

        The generic version embeds the block's vectors in the full space and keeps
        the block's rows of the full product; data-backed operators override it to
        differentiate only the block's parameters.
        """
        return RestrictedOperator(self, _resolve_names(self.layout, params))

    @property
    def T(self) -> CurvatureOperator:  # noqa: N802 - mirrors torch/numpy
        """The transpose (the operator itself when symmetric)."""
        return self if self.SYMMETRIC else _TransposedOperator(self)

    # ----------------------------------------------------------------- algebra
    def __mul__(self, alpha: float) -> CurvatureOperator:
        if isinstance(alpha, Tensor) and alpha.numel() == 1:
            alpha = alpha.item()
        if not isinstance(alpha, int | float):
            return NotImplemented
        return ScaledOperator(self, float(alpha))

    __rmul__ = __mul__

    def __truediv__(self, alpha: float) -> CurvatureOperator:
        return self * (1.0 / alpha)

    def __neg__(self) -> CurvatureOperator:
        return self * -1.0

    def __add__(self, other: CurvatureOperator) -> CurvatureOperator:
        if not isinstance(other, CurvatureOperator):
            return NotImplemented
        return SumOperator([self, other])

    def __sub__(self, other: CurvatureOperator) -> CurvatureOperator:
        if not isinstance(other, CurvatureOperator):
            return NotImplemented
        return SumOperator([self, -other])

    def astype(self, dtype: torch.dtype) -> CurvatureOperator:
        """The same operator on ``dtype`` vectors, its products still computed in its own precision.

        For mixed precision: the products of a ``bfloat16`` problem (forward and
        backward passes in bfloat16, where a GPU's tensor cores gain) inside
        analyses whose own arithmetic (Krylov bases, orthogonalisation,
        tridiagonal eigenproblems, probe sums) runs in ``float32``. Each product
        converts its input to the operator's dtype and its result back;
        :attr:`product_dtype` keeps the products' precision, by which the
        analyses judge what they can certify. Flags, the layout, the structure
        (an exact trace, inverse, eigenpairs: computed by this operator, in its
        own precision) and a data-backed operator's problem are kept.

        Example:
            >>> A = DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.bfloat16))
            >>> B = A.astype(torch.float32)
            >>> (B @ torch.ones(2)).dtype, B.product_dtype
            (torch.float32, torch.bfloat16)
        """
        if dtype == self.dtype:
            return self
        return ConvertedOperator(self, dtype)

    def damped(self, damping: float) -> CurvatureOperator:
        """``A + damping * I``."""
        return self + IdentityOperator(self.layout, scale=damping, dtype=self.dtype, device=self.device)

    def __repr__(self) -> str:
        on = [k for k, v in self.flags.items() if v]
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, flags={on})"


def check_damping(damping: Any, name: str = "damping", *, plain: bool = False) -> float:
    """``damping`` as a float if it is a finite number ``>= 0``, else a one-line error naming ``name``.

    A Python or NumPy number, or a real tensor of one element (a damping
    computed with torch, e.g. ``2 * abs(lambda_min)``); not a bool
    (:func:`curvkit.arguments.non_negative_number`); with ``plain``, a Python
    number only (an analysis's option, kept as given). An infinite damping is
    refused: ``A + inf I`` has no inverse to approximate (its
    eigendecomposition fails, a solver returns zeros).

    Raises:
        CurvkitError: Anything else, ``"damping must be a finite number >= 0, got inf"``.
    """
    return non_negative_number(damping, name, plain=plain)


def _dense_inverse(A: CurvatureOperator, damping: float) -> DenseOperator:
    """``(A + damping I)^-1`` as a dense operator: the generic :meth:`CurvatureOperator.inverse`."""
    dense = A.to_dense()
    P = dense.shape[0]
    shifted = dense + damping * torch.eye(P, dtype=dense.dtype, device=dense.device)
    if A.SYMMETRIC:
        values, vectors = torch.linalg.eigh(shifted)
        magnitudes = values.abs()
    else:
        magnitudes = torch.linalg.svdvals(shifted)
    largest, smallest = magnitudes.max().item(), magnitudes.min().item()
    if smallest <= P * torch.finfo(dense.dtype).eps * max(largest, torch.finfo(dense.dtype).tiny):
        raise CurvkitError(
            f"A + {damping:g} I is singular to working precision (smallest eigenvalue magnitude "
            f"{smallest:.3g}, largest {largest:.3g}): add damping"
        )
    if A.SYMMETRIC:
        inverse = (vectors / values) @ vectors.T
        inverse = (inverse + inverse.T) / 2
    else:
        inverse = torch.linalg.inv(shifted)
    return DenseOperator(inverse, A.layout, symmetric=A.SYMMETRIC, psd=A.PSD, exact=A.EXACT)


def _resolve_names(layout: ParameterLayout, params: str | Sequence[str]) -> list[str]:
    wanted = [params] if isinstance(params, str) else list(params)
    names = []
    for w in wanted:
        hits = [n for n in layout.names if n == w or n.startswith(w + ".")]
        if not hits:
            from curvkit.errors import ParameterSelectionError

            raise ParameterSelectionError(
                f"{w!r} names no parameter of this operator; available: {list(layout.names)}"
            )
        names += hits
    return names


class _TransposedOperator(CurvatureOperator):
    def __init__(self, op: CurvatureOperator):
        super().__init__(op.layout, dtype=op.dtype, device=op.device, product_dtype=op.product_dtype)
        self.op = op
        for f in (*FLAGS, "CHEAP_DIAGONAL"):
            setattr(self, f, getattr(op, f))

    def _matmat(self, M: Tensor) -> Tensor:
        return self.op._rmatmat(M)

    def _rmatmat(self, M: Tensor) -> Tensor:
        return self.op._matmat(M)

    def diagonal(self, max_dim: int | None = None, block_size: int = 256) -> Tensor:
        return self.op.diagonal(max_dim, block_size)


class ScaledOperator(CurvatureOperator):
    """``alpha * A``, with ``A``'s structure: ``(alpha A + d I)^-1 = (A + (d / alpha) I)^-1 / alpha``,
    ``log det(alpha A + d I) = P log alpha + log det(A + (d / alpha) I)`` (``alpha > 0``),
    the eigenpairs of ``A`` scaled (the other end of ``A``'s spectrum for ``alpha < 0``)."""

    def __init__(self, op: CurvatureOperator, alpha: float):
        super().__init__(op.layout, dtype=op.dtype, device=op.device, product_dtype=op.product_dtype)
        self.op, self.alpha = op, alpha
        self.SYMMETRIC, self.EXACT, self.STOCHASTIC = op.SYMMETRIC, op.EXACT, op.STOCHASTIC
        self.RESAMPLES, self.CHEAP_DIAGONAL = op.RESAMPLES, op.CHEAP_DIAGONAL
        self.PSD = op.PSD and alpha >= 0
        structure = set(op.STRUCTURE) if alpha != 0 else set()
        if alpha < 0:  # alpha A + d I = alpha (A - (d / |alpha|) I): a negative shift, not a damping
            structure -= {"inverse", "logdet"}
        self.STRUCTURE = frozenset(structure)

    def _matmat(self, M: Tensor) -> Tensor:
        return self.alpha * self.op.matmat(M)

    def _rmatmat(self, M: Tensor) -> Tensor:
        return self.alpha * self.op.rmatmat(M)

    def diagonal(self, max_dim: int | None = None, block_size: int = 256) -> Tensor:
        return self.alpha * self.op.diagonal(max_dim, block_size)

    def _trace(self) -> float:
        return self.alpha * self.op.trace()

    def _inverse(self, damping: float) -> CurvatureOperator:
        return ScaledOperator(self.op.inverse(damping / self.alpha), 1.0 / self.alpha)

    def _logdet(self, damping: float) -> float:
        return self.shape[0] * math.log(self.alpha) + self.op.logdet(damping / self.alpha)

    def _eigenpairs(self, k: int, which: str) -> tuple[Tensor, Tensor]:
        flipped = {"largest": "smallest", "smallest": "largest"}
        values, vectors = self.op._eigenpairs(k, which if self.alpha > 0 else flipped.get(which, which))
        return self.alpha * values, vectors

    def restrict(self, params: str | Sequence[str]) -> CurvatureOperator:
        """``alpha * A[S, S]``: the block of ``A``, by ``A``'s own ``restrict``."""
        return ScaledOperator(self.op.restrict(params), self.alpha)


class SumOperator(CurvatureOperator):
    """``A_1 + ... + A_n`` over the same parameter layout."""

    def __init__(self, ops: Sequence[CurvatureOperator]):
        first = ops[0]
        for op in ops[1:]:
            if op.layout != first.layout:
                raise ShapeMismatchError(
                    f"cannot add operators over different parameters: {first.shape} "
                    f"{list(first.layout.names)[:4]}... vs {op.shape} {list(op.layout.names)[:4]}..."
                )
        dtype = first.dtype
        for op in ops[1:]:
            dtype = torch.promote_types(dtype, op.dtype)
        precisions = [op.product_dtype for op in ops if op.product_dtype.is_floating_point]
        coarsest = max(precisions, key=lambda t: torch.finfo(t).eps) if precisions else dtype
        super().__init__(first.layout, dtype=dtype, device=first.device, product_dtype=coarsest)
        flat: list[CurvatureOperator] = []
        for op in ops:
            flat += op.ops if isinstance(op, SumOperator) else [op]
        self.ops = flat
        self.SYMMETRIC = all(o.SYMMETRIC for o in flat)
        self.PSD = all(o.PSD for o in flat)
        self.EXACT = all(o.EXACT for o in flat)
        self.STOCHASTIC = any(o.STOCHASTIC for o in flat)
        self.RESAMPLES = any(o.RESAMPLES for o in flat)
        self.CHEAP_DIAGONAL = all(o.CHEAP_DIAGONAL for o in flat)
        # A + c I (a damped operator): A's structure with the damping shifted by c
        shifts = [o for o in flat if isinstance(o, IdentityOperator)]
        rest = [o for o in flat if not isinstance(o, IdentityOperator)]
        self.shift = sum(o.scale for o in shifts)
        self.base = rest[0] if len(rest) == 1 and self.shift >= 0 else None
        structure = set(self.base.STRUCTURE) if self.base is not None else set()
        if all("trace" in o.STRUCTURE for o in flat):
            structure.add("trace")
        self.STRUCTURE = frozenset(structure)

    def _trace(self) -> float:
        return sum(op.trace() for op in self.ops)

    def _inverse(self, damping: float) -> CurvatureOperator:
        return self.base.inverse(damping + self.shift)

    def _logdet(self, damping: float) -> float:
        return self.base.logdet(damping + self.shift)

    def _eigenpairs(self, k: int, which: str) -> tuple[Tensor, Tensor]:
        values, vectors = self.base._eigenpairs(k, which)
        return values + self.shift, vectors

    def _matmat(self, M: Tensor) -> Tensor:
        return sum(op.matmat(M.to(op.dtype)).to(self.dtype) for op in self.ops)

    def _rmatmat(self, M: Tensor) -> Tensor:
        return sum(op.rmatmat(M.to(op.dtype)).to(self.dtype) for op in self.ops)

    def diagonal(self, max_dim: int | None = None, block_size: int = 256) -> Tensor:
        """The sum of the terms' diagonals (each cheap or from its own products)."""
        return sum(op.diagonal(max_dim, block_size).to(self.dtype) for op in self.ops)

    def restrict(self, params: str | Sequence[str]) -> CurvatureOperator:
        return SumOperator([op.restrict(params) for op in self.ops])


class IdentityOperator(CurvatureOperator):
    """``scale * I``."""

    CHEAP_DIAGONAL = True
    STRUCTURE = frozenset(STRUCTURE_METHODS)

    def __init__(self, layout: ParameterLayout, scale: float = 1.0, *, dtype: torch.dtype, device: Any):
        super().__init__(layout, dtype=dtype, device=device)
        self.scale = float(scale)
        self.PSD = self.scale >= 0

    def _matmat(self, M: Tensor) -> Tensor:
        return self.scale * M

    def _diagonal(self) -> Tensor:
        return torch.full((self.shape[0],), self.scale, dtype=self.dtype, device=self.device)

    def _trace(self) -> float:
        return self.scale * self.shape[0]

    def _inverse(self, damping: float) -> CurvatureOperator:
        total = self.scale + damping
        if total == 0:
            raise CurvkitError("the inverse of the zero operator does not exist: add damping")
        return IdentityOperator(self.layout, 1.0 / total, dtype=self.dtype, device=self.device)

    def _logdet(self, damping: float) -> float:
        total = self.scale + damping
        if total <= 0:
            raise CurvkitError(f"log det of {total:g} I needs a positive scale: add damping")
        return self.shape[0] * math.log(total)

    def _eigenpairs(self, k: int, which: str) -> tuple[Tensor, Tensor]:
        vectors = torch.eye(self.shape[0], k, dtype=self.dtype, device=self.device)
        return torch.full((k,), self.scale, dtype=self.dtype, device=self.device), vectors

    def restrict(self, params: str | Sequence[str]) -> CurvatureOperator:
        sub = self.layout.sub_layout(_resolve_names(self.layout, params))
        return IdentityOperator(sub, self.scale, dtype=self.dtype, device=self.device)


class DiagonalOperator(CurvatureOperator):
    """``diag(d)``: a diagonal matrix, with its exact structure (trace, inverse, log-determinant, eigenpairs).

    Args:
        diagonal: The ``[P]`` diagonal.
        layout: Its parameter layout (default: one parameter named ``"x"``).
    """

    CHEAP_DIAGONAL = True
    STRUCTURE = frozenset(STRUCTURE_METHODS)

    def __init__(self, diagonal: Tensor, layout: ParameterLayout | None = None):
        if diagonal.dim() != 1:
            raise ShapeMismatchError(f"a diagonal must be one-dimensional, got {tuple(diagonal.shape)}")
        layout = layout or ParameterLayout(("x",), (torch.Size([diagonal.shape[0]]),))
        if layout.dim != diagonal.shape[0]:
            raise ShapeMismatchError(
                f"layout of dimension {layout.dim} for a diagonal of {diagonal.shape[0]}"
            )
        super().__init__(layout, dtype=diagonal.dtype, device=diagonal.device)
        self.values = diagonal
        self.PSD = bool((diagonal >= 0).all())

    def _matmat(self, M: Tensor) -> Tensor:
        return self.values[:, None] * M

    def _diagonal(self) -> Tensor:
        return self.values.clone()

    def _trace(self) -> float:
        return self.values.to(torch.float64).sum().item()

    def _inverse(self, damping: float) -> CurvatureOperator:
        shifted = self.values.to(torch.float64) + damping
        if (shifted == 0).any():
            raise CurvkitError(f"diag(d) + {damping:g} I has a zero on its diagonal: add damping")
        return DiagonalOperator((1.0 / shifted).to(self.dtype), self.layout)

    def _logdet(self, damping: float) -> float:
        shifted = self.values.to(torch.float64) + damping
        if (shifted <= 0).any():
            raise CurvkitError(f"log det(diag(d) + {damping:g} I) needs a positive diagonal: add damping")
        return torch.log(shifted).sum().item()

    def _eigenpairs(self, k: int, which: str) -> tuple[Tensor, Tensor]:
        picked = torch.topk(self.values, k, largest=which != "smallest").indices
        vectors = torch.zeros(self.shape[0], k, dtype=self.dtype, device=self.device)
        vectors[picked, torch.arange(k, device=self.device)] = 1
        return self.values[picked], vectors

    def restrict(self, params: str | Sequence[str]) -> CurvatureOperator:
        names = _resolve_names(self.layout, params)
        idx = self.layout.indices(names).to(self.device)
        return DiagonalOperator(self.values[idx], self.layout.sub_layout(names))


class DenseOperator(CurvatureOperator):
    """An operator backed by an explicit ``[P, P]`` matrix.

    Args:
        matrix: The matrix.
        layout: Its parameter layout (default: one parameter named ``"x"``).
        symmetric, psd, exact: Flags of the matrix (``symmetric`` is checked
            against the matrix when ``None``).
    """

    CHEAP_DIAGONAL = True

    def __init__(
        self,
        matrix: Tensor,
        layout: ParameterLayout | None = None,
        *,
        symmetric: bool | None = None,
        psd: bool = False,
        exact: bool = True,
    ):
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ShapeMismatchError(f"a curvature matrix must be square, got {tuple(matrix.shape)}")
        layout = layout or ParameterLayout(("x",), (torch.Size([matrix.shape[0]]),))
        if layout.dim != matrix.shape[0]:
            raise ShapeMismatchError(f"layout of dimension {layout.dim} for a {tuple(matrix.shape)} matrix")
        super().__init__(layout, dtype=matrix.dtype, device=matrix.device)
        self.matrix = matrix
        if symmetric is None:
            tol = 100 * torch.finfo(matrix.dtype).eps * max(matrix.abs().max().item(), 1e-30)
            symmetric = bool((matrix - matrix.T).abs().max() <= tol)
        self.SYMMETRIC, self.PSD, self.EXACT = symmetric, psd, exact

    def _matmat(self, M: Tensor) -> Tensor:
        return self.matrix @ M

    def _rmatmat(self, M: Tensor) -> Tensor:
        return self.matrix.T @ M

    def _diagonal(self) -> Tensor:
        return torch.diagonal(self.matrix).clone()

    def to_dense(self, max_dim: int | None = None, block_size: int = 256) -> Tensor:
        self._check_dense_size(max_dim)
        return self.matrix.clone()

    def restrict(self, params: str | Sequence[str]) -> CurvatureOperator:
        names = _resolve_names(self.layout, params)
        idx = self.layout.indices(names).to(self.matrix.device)
        block = DenseOperator(
            self.matrix[idx][:, idx],
            self.layout.sub_layout(names),
            symmetric=self.SYMMETRIC,
            psd=self.PSD,
            exact=self.EXACT,
        )
        block.STOCHASTIC, block.RESAMPLES = self.STOCHASTIC, self.RESAMPLES
        return block


class ConvertedOperator(CurvatureOperator):
    """``A`` on vectors of another dtype: each product converts its input to ``A``'s dtype and back.

    Built by :meth:`CurvatureOperator.astype`; :attr:`product_dtype` is ``A``'s.
    Everything else is ``A``'s, converted: flags, structure (an exact trace,
    inverse, log-determinant or eigenpairs, computed by ``A`` in its precision),
    the data passes, and for a data-backed ``A`` (a
    :class:`~curvkit.ProblemOperator`) its ``problem`` and ``with_problem``, so
    that mini-batch solvers (``lissa``) and approximations built on the
    operator's problem (the ``kfac`` solver) work on the converted operator too.
    """

    def __init__(self, op: CurvatureOperator, dtype: torch.dtype):
        super().__init__(op.layout, dtype=dtype, device=op.device, product_dtype=op.product_dtype)
        self.op = op
        for f in (*FLAGS, "CHEAP_DIAGONAL", "STRUCTURE"):
            setattr(self, f, getattr(op, f))
        if hasattr(op, "name"):  # the estimator's, set by curvkit.curvature
            self.name = op.name
        if hasattr(op, "problem"):
            self.problem = op.problem

    @property
    def data_passes(self) -> int:  # type: ignore[override] - A's passes over the data
        return self.op.data_passes

    @data_passes.setter
    def data_passes(self, value: int) -> None:  # the base class's initial 0: A counts its own
        pass

    def with_problem(self, problem: Any) -> CurvatureOperator:
        """``A`` on another problem (a mini-batch of the data), converted alike."""
        return ConvertedOperator(self.op.with_problem(problem), self.dtype)

    def _trace(self) -> float:
        return self.op.trace()

    def _inverse(self, damping: float) -> CurvatureOperator:
        return self.op.inverse(damping).astype(self.dtype)

    def _logdet(self, damping: float) -> float:
        return self.op.logdet(damping)

    def _eigenpairs(self, k: int, which: str) -> tuple[Tensor, Tensor]:
        values, vectors = self.op.eigenvalues(k, which)
        return values.to(self.dtype), vectors.to(self.dtype)

    def _matmat(self, M: Tensor) -> Tensor:
        return self.op.matmat(M.to(self.op.dtype)).to(self.dtype)

    def _rmatmat(self, M: Tensor) -> Tensor:
        return self.op.rmatmat(M.to(self.op.dtype)).to(self.dtype)

    def diagonal(self, max_dim: int | None = None, block_size: int = 256) -> Tensor:
        return self.op.diagonal(max_dim, block_size).to(self.dtype)

    def restrict(self, params: str | Sequence[str]) -> CurvatureOperator:
        """``A[S, S]`` converted: the block by ``A``'s own ``restrict``."""
        return ConvertedOperator(self.op.restrict(params), self.dtype)


class RestrictedOperator(CurvatureOperator):
    """The diagonal block ``A[S, S]`` of an operator, by embedding (generic fallback)."""

    def __init__(self, op: CurvatureOperator, names: Sequence[str]):
        sub = op.layout.sub_layout(names)
        super().__init__(sub, dtype=op.dtype, device=op.device, product_dtype=op.product_dtype)
        self.op = op
        self.index = op.layout.indices(sub.names).to(op.device)
        for f in (*FLAGS, "CHEAP_DIAGONAL"):
            setattr(self, f, getattr(op, f))

    def _embed(self, M: Tensor) -> Tensor:
        full = torch.zeros(self.op.shape[1], M.shape[1], dtype=M.dtype, device=M.device)
        full[self.index] = M
        return full

    def _matmat(self, M: Tensor) -> Tensor:
        return self.op.matmat(self._embed(M))[self.index]

    def _rmatmat(self, M: Tensor) -> Tensor:
        return self.op.rmatmat(self._embed(M))[self.index]

    def _diagonal(self) -> Tensor:
        return self.op.diagonal()[self.index]  # only with the operator's cheap diagonal
