"""Losses over classes in dim 1: cross-entropy on logits and NLL on log-probabilities.

Closed forms, for one sample and position with outputs ``o in R^C``:

**Cross-entropy.** Every variant PyTorch offers is ``l(o) = -sum_c a_c log p_c``
with ``p = softmax(o)`` and target weights ``a_c >= 0``:

.. math::

    a_c = \\kappa\\, w_c \\left((1 - \\varepsilon)\\, q_c + \\varepsilon / C\\right),

where ``q`` is the one-hot vector of a class-index target or the given class
probabilities, ``w`` the class ``weight`` (ones by default), ``epsilon`` the
``label_smoothing`` (Szegedy et al., "Rethinking the Inception architecture for
computer vision", CVPR 2016), and ``kappa`` is 0 where the target is
``ignore_index`` and 1 elsewhere. With ``A = sum_c a_c`` and
``log p = o - logsumexp(o)``,

.. math::

    l = -a^\\top o + A\\, \\mathrm{logsumexp}(o), \\qquad
    \\nabla l = A p - a, \\qquad
    \\nabla^2 l = A\\,(\\mathrm{diag}(p) - p p^\\top),

since ``dp_i/do_j = p_i (delta_ij - p_j)``. With ``s = sqrt(p)`` and
``B = diag(s) - p s^T``,
``B B^T = diag(p) - 2 p p^T + p (s^T s) p^T = diag(p) - p p^T`` because
``s^T s = sum_c p_c = 1``, so ``F = sqrt(A) B`` is a symmetric factor with ``C``
columns (the factorisation BackPACK uses; Dangel, Kunstner & Hennig, "BackPACK:
packing more into backprop", ICLR 2020).

The predictive distribution is ``y ~ Categorical(p)``; for ``l(y) = -log p_y``,
``g = p - e_y`` and ``E[g g^T] = diag(p) - p p^T``: the Fisher is the Hessian
with ``A = 1``, i.e. the Hessian itself for class-index targets without weights
or smoothing (the canonical link; Martens, JMLR 2020, sec. 9.2). With weights or
smoothing the loss is no negative log-likelihood.

**NLL.** ``l(o) = -sum_c a_c o_c`` (``epsilon = 0``) is linear in its inputs: its
Hessian is zero. Its inputs are log-probabilities of ``p = softmax(o)`` (which is
``exp(o)`` when they are normalised); ``g = -e_y`` for ``y ~ Categorical(p)``, so
the Fisher is ``diag(p)``, with factor ``diag(sqrt(p))``.

**An ignore_index that names a class** (e.g. a padding token,
``ignore_index=pad_id``) is ignored in sampled targets as in data targets: a
sampled ``y = ignore_index`` adds nothing. The Fisher of the loss,
``E_y[g g^T]`` over the outcomes it counts, then lacks that outcome's term
``p_y g_y g_y^T``. Since column ``y`` of ``B`` above is ``-sqrt(p_y) g_y`` (and
``g_y = -e_y`` for the NLL), its factor is the categorical one with column
``ignore_index`` set to zero, so that the exact and the Monte-Carlo Fisher agree;
it differs from the output Hessian (and the GGN) by that term.

**Counts.** PyTorch's mean divides by ``sum_{kept} w_{t}`` for class-index
targets (the number of targets not ignored when unweighted), and by the number
of positions ``N d1 ...`` for probability targets, whatever the weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvkit.errors import UnknownLossError
from curvkit.losses._base import (
    ClosedFormLoss,
    diagonal_factor,
    non_negative_weights,
    random_like,
    shape_of,
)
from curvkit.snapshot import cached_in_analysis, record_fact

__all__ = ["CrossEntropy", "NegativeLogLikelihood"]


class _ClassTargetLoss(ClosedFormLoss):
    """What cross-entropy and NLL share: class targets over dim 1, ``ignore_index``, class weights."""

    ACCEPTS_PROBABILITIES: ClassVar[bool] = False
    DEFAULTS: ClassVar[dict[str, Any]] = {"ignore_index": -100, "weight": None}

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        weight: Tensor | Sequence[float] | None = None,
        reduction: str = "mean",
        **extra: Any,
    ):
        weight = non_negative_weights(weight, f"{self.BASE_NAME}: weight")
        if weight is not None and weight.ndim != 1:
            raise UnknownLossError(
                f"{self.BASE_NAME}: weight must hold one weight per class, got {tuple(weight.shape)}"
            )
        options = {"ignore_index": int(ignore_index), "weight": weight, **extra}
        super().__init__(options, reduction)
        self.ignore_index: int = options["ignore_index"]
        self.weight: Tensor | None = weight

    @property
    def is_negative_log_likelihood(self) -> bool:
        return self.weight is None and self.options.get("label_smoothing", 0.0) == 0.0

    # ------------------------------------------------------------- targets
    def _validate(self, outputs: Any, targets: Tensor) -> None:
        if not isinstance(outputs, Tensor) or outputs.ndim < 2:
            raise UnknownLossError(
                f"{self.name}: outputs must be a batch of scores [N, C, d1, ...], got {shape_of(outputs)}"
            )
        classes = outputs.shape[1]
        if self.weight is not None and self.weight.numel() != classes:
            raise UnknownLossError(f"{self.name}: {self.weight.numel()} class weights for {classes} classes")
        if isinstance(targets, Tensor) and targets.is_floating_point() and self.ACCEPTS_PROBABILITIES:
            if targets.shape != outputs.shape:
                raise UnknownLossError(
                    f"{self.name}: class-probability targets {tuple(targets.shape)} differ from outputs "
                    f"{tuple(outputs.shape)}"
                )
            return
        expected = outputs.shape[:1] + outputs.shape[2:]
        if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.shape != expected:
            kind = "class indices or class probabilities" if self.ACCEPTS_PROBABILITIES else "class indices"
            raise UnknownLossError(
                f"{self.name}: targets must be {kind} of shape {tuple(expected)} for outputs "
                f"{tuple(outputs.shape)}, got {shape_of(targets)}"
                + (f" ({targets.dtype})" if isinstance(targets, Tensor) else "")
            )
        if not cached_in_analysis(
            targets, self._range_key(classes), lambda values: self._indices_in_range(values, classes)
        ):
            raise UnknownLossError(
                f"{self.name}: class index out of bounds: targets must lie in [0, {classes}) or equal "
                f"ignore_index={self.ignore_index}"
            )

    def _range_key(self, classes: int) -> tuple:
        """The :func:`~curvkit.snapshot.cached_in_analysis` key of :meth:`_indices_in_range`."""
        return ("class indices in range", classes, self.ignore_index)

    def _indices_in_range(self, targets: Tensor, classes: int) -> bool:
        """Whether every class index that counts lies in ``[0, classes)`` (read back to the host)."""
        kept = self._kept(targets)
        return not bool((kept & ((targets < 0) | (targets >= classes))).any())

    def _kept(self, targets: Tensor) -> Tensor:
        """Which positions count: ``[N, d1, ...]`` booleans (all, for probability targets)."""
        if targets.is_floating_point():
            return torch.ones(targets.shape[:1] + targets.shape[2:], dtype=torch.bool, device=targets.device)
        return targets != self.ignore_index

    def _class_weights(self, outputs: Tensor) -> Tensor | None:
        return self._on(self.weight, outputs.device, outputs.dtype)

    def _count(self, outputs: Tensor, targets: Tensor) -> float:
        if targets.is_floating_point():
            return float(outputs.numel() // outputs.shape[1])

        def count(values: Tensor) -> float:  # read back: remembered for an analysis (weights fixed in it)
            kept = self._kept(values)
            if self.weight is None:
                return float(kept.sum())
            # in the outputs' dtype, as PyTorch's mean divides; where the values are (the host's, if copied)
            weight = self._on(self.weight, values.device, outputs.dtype)
            return float(weight[values[kept]].sum())

        return cached_in_analysis(targets, ("count", self, outputs.dtype), count)

    # ----------------------------------------------------------- predictive
    def _counted_outcomes(self, outputs: Tensor) -> Tensor:
        """``[C]`` ones, with a zero at ``ignore_index`` if it names a class (module docstring)."""
        counted = outputs.new_ones(outputs.shape[1])
        if 0 <= self.ignore_index < outputs.shape[1]:
            counted[self.ignore_index] = 0.0
        return counted

    def _sample_targets(self, outputs: Tensor, targets: Tensor, generator: torch.Generator) -> Tensor:
        """Class indices ``y ~ Categorical(softmax(outputs))`` over dim 1, by inversion of the CDF.

        Positions whose target is ``ignore_index`` keep it, so they still add
        nothing; probability targets are replaced by sampled class indices.
        """
        uniform = random_like(torch.rand, outputs[:, :1], generator)  # [N, 1, d1, ...]
        cumulative = torch.softmax(outputs.to(uniform.dtype), dim=1).cumsum(dim=1)
        classes = outputs.shape[1]
        sampled = (cumulative <= uniform).sum(dim=1).clamp_(max=classes - 1)
        sampled.masked_fill_(~self._kept(targets), self.ignore_index)
        # in range by construction: recorded, so that the loss's check of them reads nothing back
        record_fact(sampled, self._range_key(classes), True)
        return sampled


class CrossEntropy(_ClassTargetLoss):
    """Cross-entropy on logits over dim 1 (``torch.nn.functional.cross_entropy``).

    Targets are class indices ``[N, d1, ...]`` (``ignore_index`` honoured) or
    class probabilities of the outputs' shape ``[N, C, d1, ...]``. The closed
    forms (see the module docstring) honour ``weight``, ``ignore_index`` and
    ``label_smoothing``; it is a negative log-likelihood (categorical) only
    without ``weight`` and ``label_smoothing``. An ``ignore_index`` that names a
    class is ignored in sampled targets too, and its outcome left out of the
    Fisher (module docstring).

    Example:
        >>> loss = CrossEntropy(ignore_index=1)
        >>> loss.name, loss.is_negative_log_likelihood
        ('cross_entropy(ignore_index=1)', True)
        >>> outputs, targets = torch.zeros(3, 2, dtype=torch.float64), torch.tensor([0, 1, 1])
        >>> loss.count(outputs, targets)
        1.0
        >>> first_class = torch.tensor([1.0, 0.0], dtype=torch.float64).expand(1, 3, 2)
        >>> product = loss.output_hessian_product(outputs, targets, first_class)[0]
        >>> product[0], product[1:].abs().max()
        (tensor([ 0.2500, -0.2500], dtype=torch.float64), tensor(0., dtype=torch.float64))

    (``p = (1/2, 1/2)``, so ``diag(p) - p p^T`` has entries ``+-1/4``; the two ignored samples add nothing.)
    """

    BASE_NAME = "cross_entropy"
    MODULE = nn.CrossEntropyLoss
    ACCEPTS_PROBABILITIES = True
    DEFAULTS = {**_ClassTargetLoss.DEFAULTS, "label_smoothing": 0.0}

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        weight: Tensor | Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
    ):
        if not 0.0 <= label_smoothing <= 1.0:
            raise UnknownLossError(
                f"cross_entropy: label_smoothing must lie in [0, 1], got {label_smoothing}"
            )
        super().__init__(
            ignore_index=ignore_index,
            weight=weight,
            reduction=reduction,
            label_smoothing=float(label_smoothing),
        )
        self.label_smoothing: float = float(label_smoothing)

    def _sum(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(
            outputs,
            targets,
            weight=self._class_weights(outputs),
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction="sum",
        )

    def _target_weights(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``a`` of the outputs' shape: ``l = -sum_c a_c log softmax(o)_c`` at every position."""
        classes = outputs.shape[1]
        kept = self._kept(targets).unsqueeze(1)
        if targets.is_floating_point():
            q = targets.to(outputs.dtype)
        else:
            q = F.one_hot(targets.masked_fill(~kept.squeeze(1), 0), classes).movedim(-1, 1).to(outputs.dtype)
        a = (1.0 - self.label_smoothing) * q + self.label_smoothing / classes
        weight = self._class_weights(outputs)
        if weight is not None:
            a = a * weight.view(1, classes, *([1] * (outputs.ndim - 2)))
        return a * kept

    def _hessian_product(self, outputs: Tensor, targets: Tensor, V: Tensor) -> Tensor:
        p = torch.softmax(outputs, dim=1)
        total_weight = self._target_weights(outputs, targets).sum(dim=1, keepdim=True)
        pV = p * V
        return total_weight * (pV - p * pV.sum(dim=2, keepdim=True))

    def _hessian_factor(self, outputs: Tensor, targets: Tensor) -> Tensor:
        total_weight = self._target_weights(outputs, targets).sum(dim=1, keepdim=True)
        return self._categorical_factor(
            torch.softmax(outputs, dim=1), self._curvature_root(total_weight, targets)
        )

    def _fisher_factor(self, outputs: Tensor, targets: Tensor) -> Tensor:
        kept = self._kept(targets).unsqueeze(1).to(outputs.dtype)  # 0 or 1: its own square root
        # column y of the factor is -sqrt(p_y) g_y: drop the outcome the loss ignores
        return self._categorical_factor(torch.softmax(outputs, dim=1), kept) * self._counted_outcomes(outputs)

    def _convex_for(self, targets: Tensor) -> bool:
        # class indices: the total weight of a position is a sum of weights >= 0 (refused if negative);
        # class probabilities may hold negative entries
        return not targets.is_floating_point() and self._non_negative(self.weight)

    def _categorical_factor(self, p: Tensor, root_weight: Tensor) -> Tensor:
        """``sqrt(A) (diag(sqrt p) - p sqrt(p)^T)`` per position, given ``sqrt(A)``, ``[N, 1, d1, ...]``."""
        p_last = p.movedim(1, -1)  # [N, d1, ..., C]
        root = p_last.sqrt()
        blocks = torch.diag_embed(root) - p_last.unsqueeze(-1) * root.unsqueeze(-2)
        scale = root_weight.movedim(1, -1).unsqueeze(-1)  # [N, d1, ..., 1, 1]
        return (scale * blocks).movedim(-2, 1)


class NegativeLogLikelihood(_ClassTargetLoss):
    """Negative log-likelihood of log-probabilities over dim 1 (``torch.nn.functional.nll_loss``).

    Linear in its inputs, so its output Hessian and that factor are zero; its
    Fisher is ``diag(softmax(outputs))`` (see the module docstring). A negative
    log-likelihood without ``weight``.

    Example:
        >>> loss = NegativeLogLikelihood()
        >>> log_p = torch.log(torch.tensor([[0.25, 0.75]]))
        >>> loss.fisher_factor(log_p, torch.tensor([1]))[0] ** 2
        tensor([[0.2500, 0.0000],
                [0.0000, 0.7500]])
    """

    BASE_NAME = "nll"
    MODULE = nn.NLLLoss

    def _sum(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.nll_loss(
            outputs,
            targets,
            weight=self._class_weights(outputs),
            ignore_index=self.ignore_index,
            reduction="sum",
        )

    def _hessian_product(self, outputs: Tensor, targets: Tensor, V: Tensor) -> Tensor:
        return torch.zeros_like(V)

    def _hessian_factor(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return outputs.new_zeros(*outputs.shape, outputs.shape[1])

    def _fisher_factor(self, outputs: Tensor, targets: Tensor) -> Tensor:
        kept = self._kept(targets).unsqueeze(1)
        counted = self._counted_outcomes(outputs).view(1, -1, *([1] * (outputs.ndim - 2)))
        return diagonal_factor(torch.softmax(outputs, dim=1).sqrt() * kept * counted)
