"""Block-diagonal Kronecker-factored operators: KFAC's and EKFAC's structure, exact.

A :class:`KroneckerOperator` is block-diagonal over the parameters; a block holds
a layer's weight (and bias, when folded into it) as ``[groups, o, k]`` numbers
(``o`` outputs, ``k`` inputs per group; a convolution's weight
``[out, in / groups, kh, kw]`` is ``[groups, out / groups, in / groups * kh * kw]``)
and is, per group, a Kronecker product

.. math:: (B \\otimes A)\\, \\mathrm{vec}(X) = \\mathrm{vec}(B X A)

for the row-major ``vec`` of ``X`` (``[o, k]``), with ``A`` ``[k, k]`` the input
factor and ``B`` ``[o, o]`` the output-gradient factor (J. Martens and R. Grosse,
"Optimizing neural networks with Kronecker-factored approximate curvature", ICML
2015). Everything else is exact from the factors' eigendecompositions
``A = Q_A diag(a) Q_A^T``, ``B = Q_B diag(b) Q_B^T``: the block's eigenvalues are
``b_i a_j`` with eigenvectors ``q_B,i (x) q_A,j``, so

* ``(B (x) A + d I)^-1 = (Q_B (x) Q_A) diag(1 / (b_i a_j + d)) (Q_B (x) Q_A)^T``,
* ``log det(B (x) A + d I) = sum_ij log(b_i a_j + d)``,
* ``tr(B (x) A) = tr(B) tr(A)``, ``diag(B (x) A) = diag(B) (x) diag(A)``.

A block may instead carry its own eigenvalues in that eigenbasis, ``scalings``
``[groups, o, k]`` replacing ``b_i a_j``: EKFAC's eigenvalue correction (T. George,
C. Laurent, X. Bouthillier, N. Ballas and P. Vincent, "Fast approximate natural
gradient descent in a Kronecker-factored eigenbasis", NeurIPS 2018), and every
inverse (an inverse is the same eigenbasis with ``1 / (s + d)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from curvkit.errors import CurvkitError
from curvkit.layout import ParameterLayout
from curvkit.operator import (
    STRUCTURE_METHODS,
    CurvatureOperator,
    DiagonalOperator,
    RestrictedOperator,
    _resolve_names,
)

__all__ = ["DAMPING_KINDS", "KroneckerBlock", "KroneckerOperator"]

DAMPING_KINDS = ("identity", "factored", "pi")
"""How :meth:`KroneckerOperator.damped` adds damping (see there)."""


@dataclass
class KroneckerBlock:
    """One layer's block: per group, ``B (x) A`` or eigenvalues in its eigenbasis.

    Attributes:
        weight: Index of the weight among the operator's parameters, or ``None``.
        bias: Index of the bias, or ``None``. With a weight, the bias is folded in
            as the last input column (``k`` counts it); alone, ``k = 1``.
        A: ``[groups, k, k]`` input factor.
        B: ``[groups, o, o]`` output-gradient factor.
        scalings: ``[groups, o, k]`` eigenvalues in the Kronecker eigenbasis
            replacing ``b_i a_j`` (EKFAC, inverses), or ``None``.
        name: The layer's name, for messages.
    """

    weight: int | None
    bias: int | None
    A: Tensor
    B: Tensor
    scalings: Tensor | None = None
    name: str = ""
    _eig: tuple[Tensor, Tensor, Tensor, Tensor] | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(groups, o, k)``."""
        return self.B.shape[0], self.B.shape[1], self.A.shape[1]

    def eig(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(a, Q_A, b, Q_B)``: the factors' eigendecompositions (computed once, float64)."""
        if self._eig is None:
            a, QA = torch.linalg.eigh(self.A.to(torch.float64))
            b, QB = torch.linalg.eigh(self.B.to(torch.float64))
            self._eig = (a, QA, b, QB)
        return self._eig

    def eigenvalues(self) -> Tensor:
        """``[groups, o, k]``: the block's eigenvalues, ``b_i a_j`` or the scalings (float64)."""
        if self.scalings is not None:
            return self.scalings.to(torch.float64)
        a, _, b, _ = self.eig()
        return b[:, :, None] * a[:, None, :]

    def trace(self) -> float:
        """``sum_g tr(B_g) tr(A_g)``, or the sum of the scalings (no eigendecomposition)."""
        if self.scalings is not None:
            return self.scalings.to(torch.float64).sum().item()
        traces_A = torch.diagonal(self.A, dim1=1, dim2=2).to(torch.float64).sum(-1)
        traces_B = torch.diagonal(self.B, dim1=1, dim2=2).to(torch.float64).sum(-1)
        return (traces_A * traces_B).sum().item()

    def apply(self, X: Tensor) -> Tensor:
        """The block times ``X`` ``[K, groups, o, k]``."""
        if self.scalings is None:
            return torch.einsum("gop,Kgpk,gkj->Kgoj", self.B, X, self.A)
        _, QA, _, QB = self.eig()
        QA, QB = QA.to(X.dtype), QB.to(X.dtype)
        rotated = torch.einsum("gpo,Kgpk,gkj->Kgoj", QB, X, QA)  # Q_B^T X Q_A
        rotated = rotated * self.scalings.to(X.dtype)
        return torch.einsum("gop,Kgpk,gjk->Kgoj", QB, rotated, QA)

    def diagonal(self) -> Tensor:
        """``[groups, o, k]``: the block's diagonal."""
        if self.scalings is None:
            return (
                torch.diagonal(self.B, dim1=1, dim2=2)[:, :, None]
                * torch.diagonal(self.A, dim1=1, dim2=2)[:, None, :]
            )
        _, QA, _, QB = self.eig()
        return torch.einsum("goi,gij,gkj->gok", QB.square(), self.scalings.to(torch.float64), QA.square()).to(
            self.A.dtype
        )

    def inverse(self, damping: float) -> KroneckerBlock:
        """The block of ``(block + damping I)^-1``: the same eigenbasis, ``1 / (s + damping)``."""
        values = self.eigenvalues() + damping
        small = values.abs().min().item()
        if small <= 10 * torch.finfo(self.A.dtype).eps * max(values.abs().max().item(), 1e-300):
            raise CurvkitError(
                f"the Kronecker block of {self.name or 'a layer'} plus {damping:g} I is singular to working "
                f"precision (smallest eigenvalue {small:.3g}): add damping"
            )
        return replace(self, scalings=(1.0 / values).to(self.A.dtype), _eig=self._eig)


class KroneckerOperator(CurvatureOperator):
    """A block-diagonal operator of Kronecker-factored blocks (KFAC, EKFAC, their inverses).

    Parameters in no block get zero rows and columns.

    Args:
        layout: The parameters.
        blocks: The blocks.
        dtype: Dtype of the products.
        device: Device of the products.
        psd: Whether every block is positive semi-definite.
    """

    CHEAP_DIAGONAL = True
    STRUCTURE = frozenset(STRUCTURE_METHODS)

    def __init__(
        self,
        layout: ParameterLayout,
        blocks: Sequence[KroneckerBlock],
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        psd: bool = True,
        exact: bool = False,
    ):
        super().__init__(layout, dtype=dtype, device=device)
        self.blocks = list(blocks)
        self.PSD, self.EXACT = psd, exact

    # ---------------------------------------------------------------- layout
    def _gather(self, parts: Sequence[Tensor], block: KroneckerBlock) -> Tensor:
        """``[K, groups, o, k]`` for one block from per-parameter ``[K, *shape]`` tensors."""
        groups, o, k = block.shape
        K = parts[0].shape[0]
        pieces = []
        if block.weight is not None:
            pieces.append(parts[block.weight].reshape(K, groups, o, -1))
        if block.bias is not None:
            pieces.append(parts[block.bias].reshape(K, groups, o, 1))
        return torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]

    def _scatter(self, Y: Tensor, block: KroneckerBlock, out: list[Tensor]) -> None:
        K = Y.shape[0]
        if block.weight is not None:
            width = Y.shape[-1] - (block.bias is not None)
            out[block.weight] = Y[..., :width].reshape(K, *self.layout.shapes[block.weight])
        if block.bias is not None:
            out[block.bias] = Y[..., -1].reshape(K, *self.layout.shapes[block.bias])

    def _blockwise(self, M: Tensor, fn) -> Tensor:
        parts = [p.movedim(-1, 0) for p in self.layout.unflatten(M)]  # [K, *shape]
        out = [torch.zeros_like(p) for p in parts]
        for block in self.blocks:
            self._scatter(fn(block, self._gather(parts, block)), block, out)
        return torch.cat([o.reshape(o.shape[0], -1) for o in out], dim=1).T

    # ---------------------------------------------------------------- contract
    def _matmat(self, M: Tensor) -> Tensor:
        return self._blockwise(M, lambda block, X: block.apply(X))

    def _diagonal(self) -> Tensor:
        parts = [torch.zeros(shape, dtype=self.dtype, device=self.device) for shape in self.layout.shapes]
        out = [p.unsqueeze(0) for p in parts]
        for block in self.blocks:
            self._scatter(block.diagonal().to(self.dtype).unsqueeze(0), block, out)
        return torch.cat([o.reshape(-1) for o in out])

    def _trace(self) -> float:
        return sum(block.trace() for block in self.blocks)

    def _covered(self) -> int:
        return sum(math.prod(block.shape) for block in self.blocks)

    def _inverse(self, damping: float) -> CurvatureOperator:
        if damping <= 0 and self._covered() < self.shape[0]:
            raise CurvkitError(
                "the operator is zero on parameters in no block, so its inverse needs damping > 0"
            )
        inverse = KroneckerOperator(
            self.layout,
            [block.inverse(damping) for block in self.blocks],
            dtype=self.dtype,
            device=self.device,
            psd=self.PSD,
        )
        if self._covered() < self.shape[0]:  # zero rows: (0 + d)^-1 on the rest
            return inverse + _identity_outside(self, 1.0 / damping)
        return inverse

    def _logdet(self, damping: float) -> float:
        total = sum(torch.log(block.eigenvalues() + damping).sum().item() for block in self.blocks)
        rest = self.shape[0] - self._covered()
        if rest:
            if damping <= 0:
                raise CurvkitError("log det of an operator that is zero on some parameters needs damping > 0")
            total += rest * math.log(damping)
        if not math.isfinite(total):
            raise CurvkitError(
                f"log det(A + {damping:g} I) is not finite: the factors are singular; add damping"
            )
        return total

    def _eigenpairs(self, k: int, which: str) -> tuple[Tensor, Tensor]:
        values = [block.eigenvalues().reshape(-1).cpu() for block in self.blocks]
        rest = self.shape[0] - self._covered()
        flat = torch.cat(values + [torch.zeros(rest, dtype=torch.float64)])
        if k > flat.numel():
            raise CurvkitError(f"k = {k} exceeds the operator's dimension {flat.numel()}")
        picked = torch.topk(flat, k, largest=which != "smallest").indices
        vectors = torch.zeros(self.shape[0], k, dtype=self.dtype, device=self.device)
        offsets = torch.tensor([0] + [v.numel() for v in values]).cumsum(0)
        covered = _covered_mask(self)
        outside = torch.nonzero(~covered).flatten()
        for column, index in enumerate(picked.tolist()):
            b = int(torch.searchsorted(offsets, torch.tensor(index), right=True)) - 1
            if b >= len(self.blocks):  # an eigenvalue 0 outside the blocks: a basis vector there
                vectors[outside[index - offsets[-1].item()], column] = 1
                continue
            block = self.blocks[b]
            groups, o, kk = block.shape
            g, i, j = _unravel(index - offsets[b].item(), (groups, o, kk))
            _, QA, _, QB = block.eig()
            X = torch.zeros(1, groups, o, kk, dtype=torch.float64, device=QB.device)
            X[0, g] = torch.outer(QB[g][:, i], QA[g][:, j])
            parts = [
                torch.zeros(1, *shape, dtype=self.dtype, device=self.device) for shape in self.layout.shapes
            ]
            self._scatter(X.to(self.dtype), block, parts)
            vectors[:, column] = torch.cat([p.reshape(-1) for p in parts])
        return flat[picked].to(device=self.device, dtype=self.dtype), vectors

    # ---------------------------------------------------------------- algebra
    def damped(self, damping: float, kind: str = "identity") -> CurvatureOperator:
        """A damped version of the operator.

        Args:
            damping: ``gamma >= 0``.
            kind: ``"identity"`` (default): ``A + gamma I``, Tikhonov damping of the
                whole block (its inverse exact in the eigenbasis). ``"factored"``:
                ``(B + sqrt(gamma) I) (x) (A + sqrt(gamma) I)``, damping each factor.
                ``"pi"``: ``(B + sqrt(gamma) / pi I) (x) (A + pi sqrt(gamma) I)`` with
                ``pi = sqrt((tr A / dim A) / (tr B / dim B))`` (Martens and Grosse
                2015, section 6.3). Both factored kinds add ``gamma I`` and the cross
                terms ``sqrt(gamma) (B (x) I / pi + pi I (x) A)``: more damping than
                ``"identity"``, along the factors' scales.

        Raises:
            CurvkitError: An unknown kind, or a factored kind on blocks with
                their own eigenvalues (EKFAC, inverses).
        """
        if kind not in DAMPING_KINDS:
            raise CurvkitError(f"unknown damping kind {kind!r}; use one of {list(DAMPING_KINDS)}")
        if kind == "identity":
            return super().damped(damping)
        if any(block.scalings is not None for block in self.blocks):
            raise CurvkitError(
                f"{kind!r} damping adds to the Kronecker factors, but this operator's blocks carry their own "
                "eigenvalues (EKFAC or an inverse): use kind='identity'"
            )
        root = math.sqrt(damping)
        blocks = []
        for block in self.blocks:
            groups, o, k = block.shape
            if kind == "pi":
                a_mean = torch.diagonal(block.A, dim1=1, dim2=2).sum(-1) / k
                b_mean = torch.diagonal(block.B, dim1=1, dim2=2).sum(-1) / o
                pi = torch.sqrt(a_mean / b_mean.clamp_min(torch.finfo(block.B.dtype).tiny))
            else:
                pi = torch.ones(groups, dtype=block.A.dtype, device=block.A.device)
            eye_k = torch.eye(k, dtype=block.A.dtype, device=block.A.device)
            eye_o = torch.eye(o, dtype=block.B.dtype, device=block.B.device)
            A = block.A + (pi * root)[:, None, None] * eye_k
            B = block.B + (root / pi)[:, None, None] * eye_o
            blocks.append(replace(block, A=A, B=B, _eig=None))
        damped = KroneckerOperator(self.layout, blocks, dtype=self.dtype, device=self.device, psd=self.PSD)
        if self._covered() < self.shape[0]:
            return damped + _identity_outside(self, damping)
        return damped

    def restrict(self, params: str | Sequence[str]) -> CurvatureOperator:
        """The blocks of the parameters named (a block cut in two: the generic restriction)."""
        names = _resolve_names(self.layout, params)
        wanted = {self.layout.names.index(n) for n in names}
        kept = []
        for block in self.blocks:
            members = {i for i in (block.weight, block.bias) if i is not None}
            if members <= wanted:
                kept.append(block)
            elif members & wanted:
                return RestrictedOperator(self, names)
        sub = self.layout.sub_layout(names)
        position = {old: sub.names.index(self.layout.names[old]) for old in wanted}
        blocks = [
            replace(
                block,
                weight=None if block.weight is None else position[block.weight],
                bias=None if block.bias is None else position[block.bias],
            )
            for block in kept
        ]
        return KroneckerOperator(sub, blocks, dtype=self.dtype, device=self.device, psd=self.PSD)


def _unravel(index: int, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    g, rest = divmod(index, shape[1] * shape[2])
    i, j = divmod(rest, shape[2])
    return g, i, j


def _covered_mask(op: KroneckerOperator) -> Tensor:
    mask = torch.zeros(op.shape[0], dtype=torch.bool)
    slices = list(op.layout.slices().values())
    for block in op.blocks:
        for i in (block.weight, block.bias):
            if i is not None:
                mask[slices[i]] = True
    return mask


def _identity_outside(op: KroneckerOperator, scale: float) -> CurvatureOperator:
    """``scale`` on the parameters in no block, zero elsewhere."""
    diagonal = (~_covered_mask(op)).to(op.dtype) * scale
    return DiagonalOperator(diagonal.to(op.device), op.layout)
