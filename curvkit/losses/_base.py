"""The loss contract: :class:`BatchLoss`, and what its implementations share.

A subclass implements the private per-batch pieces (``_validate``, ``_sum``,
``_count``, ``_hessian_product``, ``_hessian_factor`` and, for a negative
log-likelihood, ``_fisher_factor`` and ``_sample_targets``); the base class owns
the public methods, which validate their arguments once, detach the outputs, and
refuse the Fisher of a loss that is not a negative log-likelihood. A user may
subclass :class:`BatchLoss` for a loss of their own and pass an instance
wherever a loss is taken.
"""

from __future__ import annotations

import abc
import copy
import hashlib
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from curvkit.data import copies_without_waiting
from curvkit.errors import (
    NonConvexLossError,
    NotNegativeLogLikelihoodError,
    ShapeMismatchError,
    UnknownLossError,
)

__all__ = ["BatchLoss", "ClosedFormLoss"]

REDUCTIONS = ("mean", "sum")


class BatchLoss(abc.ABC):
    """A loss as a sum of terms per batch, with its curvature w.r.t. the model outputs.

    **Sums and counts.** For a batch with outputs ``o`` and targets ``y``,
    :meth:`sum_and_count` returns the sum ``S_b`` of the batch's loss terms and
    the count ``c_b`` that PyTorch's ``reduction="mean"`` divides by, so that the
    full-dataset loss is ``L = sum_b S_b / sum_b c_b`` whatever the batching. The
    count is a Python ``float``: the number of terms, or for a class-weighted
    cross-entropy or NLL the sum of the weights of the targets not ignored.

    **Output Hessian.** :meth:`output_hessian_product` multiplies
    ``H_b = d^2 S_b / do^2`` (of the unnormalised batch sum) with ``K`` vectors of
    the outputs' shape. :meth:`output_hessian_factor` returns a symmetric factor
    ``F`` of shape ``[*o.shape, R]`` with ``H_b = F F^T`` in the sense of
    :attr:`BLOCK_DIAGONAL`:

    * ``BLOCK_DIAGONAL = True`` (the closed forms): ``H_b`` is block-diagonal,
      with one block over dim 1 (classes, features) per sample ``n`` and position
      ``pos`` (the trailing dims of ``[N, C, d1, ...]`` outputs), and
      ``H_b[n, :, pos; n, :, pos] = F[n, :, pos, :] @ F[n, :, pos, :]^T`` with
      ``R = C``; outputs of fewer than two dims have one ``1 x 1`` block per entry
      and ``R = 1``. A column ``F[..., r]`` used as the cotangent of a single
      vector-Jacobian product through the model therefore mixes samples and
      positions: to form ``J^T H_b J`` from it, contract ``F^T (J v)`` over dim 1
      only, per sample and position (or take one vector-Jacobian product per
      sample, position and column).
    * ``BLOCK_DIAGONAL = False`` (losses known only as callables): the block
      structure is unknown; ``R`` is the number of output entries of the batch,
      each column ``F[..., r]`` is a cotangent of the whole batch, and
      ``H_b = F.reshape(M, R) @ F.reshape(M, R)^T`` with ``M = o.numel()``.

    Curvature results are detached from the outputs' graph: they are the
    curvature at fixed outputs, to be chained with the model's Jacobian.

    **Fisher.** For a negative log-likelihood ``l(y) = -log p(y | o)``
    (:attr:`is_negative_log_likelihood`), :meth:`fisher_factor` factors
    ``E_{y ~ p(y|o)}[g g^T]`` with ``g = d l(y) / do``, in the same layout as the
    output Hessian factor, and :meth:`sample_targets` draws ``y ~ p(y | o)``. For
    the canonical-link losses (mean squared error, cross-entropy, binary
    cross-entropy on logits) the Fisher equals the output Hessian, so the Fisher
    and the generalised Gauss-Newton matrix coincide (Martens, "New insights and
    perspectives on the natural gradient method", JMLR 2020, sec. 9.2); the
    empirical Fisher, which uses the data's targets instead, does not (Kunstner,
    Balles & Hennig, "Limitations of the empirical Fisher approximation for
    natural gradient descent", NeurIPS 2019). Terms the loss ignores are ignored
    for sampled targets too (positions whose target is ``ignore_index`` keep it;
    a sampled class equal to ``ignore_index`` adds nothing), so the exact and
    the Monte-Carlo Fisher are those of the loss as it counts terms.

    Attributes:
        name: A short description recorded with results; a loss module with
            non-default options says so, e.g. ``"cross_entropy(ignore_index=1)"``.
        reduction: ``"mean"`` or ``"sum"``: how the problem combines batches.
        options: The module options that apply (``ignore_index``, ``weight``,
            ``label_smoothing``, ``pos_weight``), read-only.
        BLOCK_DIAGONAL: The layout of the factors (see above).
    """

    BLOCK_DIAGONAL: ClassVar[bool] = True

    def __init__(self, name: str, reduction: str = "mean", options: Mapping[str, Any] | None = None):
        self.name = name
        self.reduction = check_reduction(reduction)
        self.options: Mapping[str, Any] = MappingProxyType(dict(options or {}))

    @property
    @abc.abstractmethod
    def is_negative_log_likelihood(self) -> bool:
        """Whether the loss is ``-log p(y | outputs)`` of a distribution it can sample."""

    # ------------------------------------------------------------- public API
    def sum_and_count(self, outputs: Any, targets: Tensor) -> tuple[Tensor, float]:
        """``(S_b, c_b)``: the sum of the batch's loss terms and their count.

        Raises:
            UnknownLossError: The outputs and targets do not fit the loss.
        """
        self._validate(outputs, targets)
        return self._sum(outputs, targets), self._count(outputs, targets)

    def sum_of_terms(self, outputs: Any, targets: Tensor) -> Tensor:
        """``S_b`` alone: :meth:`sum_and_count` without the count (which may be read back from a GPU).

        Raises:
            UnknownLossError: The outputs and targets do not fit the loss.
        """
        self._validate(outputs, targets)
        return self._sum(outputs, targets)

    def __call__(self, outputs: Any, targets: Tensor) -> Tensor:
        """The batch's loss reduced as PyTorch would: ``S_b / c_b`` (``"mean"``) or ``S_b`` (``"sum"``)."""
        total, count = self.sum_and_count(outputs, targets)
        return total / count if self.reduction == "mean" else total

    def count(self, outputs: Any, targets: Tensor) -> float:
        """``c_b``: what PyTorch's ``reduction="mean"`` divides the batch's sum by."""
        self._validate(outputs, targets)
        return self._count(outputs, targets)

    def output_hessian_product(self, outputs: Tensor, targets: Tensor, V: Tensor) -> Tensor:
        """``(d^2 S_b / do^2) V`` for ``V`` of shape ``[K, *outputs.shape]``; the same shape back.

        Raises:
            ShapeMismatchError: ``V`` is not of shape ``[K, *outputs.shape]``.
        """
        self._validate(outputs, targets)
        outputs = self._detached(outputs)
        if V.shape[1:] != outputs.shape:
            raise ShapeMismatchError(
                f"loss {self.name!r}: vectors of shape {tuple(V.shape)} do not fit outputs of shape "
                f"{tuple(outputs.shape)}; expected [K, *outputs.shape]"
            )
        return self._hessian_product(outputs, targets, V.detach())

    def output_hessian_factor(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """A symmetric factor ``F`` of ``d^2 S_b / do^2``, of shape ``[*outputs.shape, R]``.

        See the class docstring for the layout (:attr:`BLOCK_DIAGONAL`).

        Raises:
            NonConvexLossError: The loss is not convex in the outputs on this batch.
        """
        self._validate(outputs, targets)
        return self._hessian_factor(self._detached(outputs), targets)

    def fisher_factor(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """A factor of the Fisher ``E_{y ~ p(y|o)}[g g^T]``, ``g = dl(y)/do``, in the Hessian factor's layout.

        ``targets`` only say which terms count (positions with ``ignore_index``
        contribute nothing); their values are not used.

        Raises:
            NotNegativeLogLikelihoodError: The loss is not a negative log-likelihood.
        """
        self._require_negative_log_likelihood()
        self._validate(outputs, targets)
        return self._fisher_factor(self._detached(outputs), targets)

    def sample_targets(self, outputs: Tensor, targets: Tensor, generator: torch.Generator) -> Tensor:
        """Targets drawn from the model's predictive distribution ``p(y | outputs)``.

        They have the shape and dtype the loss accepts as targets, on the outputs'
        device, detached. All randomness comes from ``generator``, drawn on the
        generator's device (e.g. a CPU generator for CUDA outputs) and moved, so a
        seed gives the same targets on every device.

        Raises:
            NotNegativeLogLikelihoodError: The loss is not a negative log-likelihood.
        """
        self._require_negative_log_likelihood()
        self._validate(outputs, targets)
        return self._sample_targets(self._detached(outputs), targets, generator)

    def with_reduction(self, reduction: str) -> BatchLoss:
        """The same loss, its batches combined by ``reduction`` (``"mean"`` or ``"sum"``)."""
        other = copy.copy(self)
        other.reduction = check_reduction(reduction)
        return other

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, reduction={self.reduction!r})"

    # ------------------------------------------------- what subclasses supply
    @abc.abstractmethod
    def _validate(self, outputs: Any, targets: Tensor) -> None:
        """Raise :class:`UnknownLossError` if outputs and targets do not fit the loss."""

    @abc.abstractmethod
    def _sum(self, outputs: Any, targets: Tensor) -> Tensor:
        """``S_b``, differentiable w.r.t. the outputs."""

    @abc.abstractmethod
    def _count(self, outputs: Any, targets: Tensor) -> float:
        """``c_b``."""

    @abc.abstractmethod
    def _hessian_product(self, outputs: Tensor, targets: Tensor, V: Tensor) -> Tensor:
        """``H_b V`` for detached outputs and validated ``V``."""

    @abc.abstractmethod
    def _hessian_factor(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The factor of ``H_b`` for detached outputs."""

    def _fisher_factor(self, outputs: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError  # only reached by a negative log-likelihood that lacks it

    def _sample_targets(self, outputs: Tensor, targets: Tensor, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    # --------------------------------------------------------------- helpers
    def _require_negative_log_likelihood(self) -> None:
        if not self.is_negative_log_likelihood:
            raise NotNegativeLogLikelihoodError(
                "the 'fisher' estimator (mode='exact' or mode='mc') needs a loss that is a negative "
                f"log-likelihood; loss {self.name!r} is not one: use 'ggn' or 'empirical-fisher', or pass a "
                "loss object that provides sample_targets (curvkit.losses.CustomLoss(fn, sample_targets=...))"
            )

    def _curvature_root(self, curvature: Tensor, targets: Tensor) -> Tensor:
        """``sqrt(curvature)``, refusing negative entries (a loss not convex in the outputs).

        The check reads the curvature back (on a GPU, a host-device
        synchronisation per batch), so it is left out where the loss is convex
        for these targets by construction (:meth:`_convex_for`).
        """
        if not self._convex_for(targets) and bool((curvature < 0).any()):
            self._refuse_non_convex(curvature.min().item())
        return curvature.sqrt()

    def _convex_for(self, targets: Tensor) -> bool:
        """Whether the loss is convex in the outputs for these targets, whatever the outputs, by construction.

        Known without reading a value (from the loss's options and the targets'
        dtype); ``False`` where it is not known, and the curvature is checked.
        """
        return False

    def _refuse_non_convex(self, curvature: float) -> None:
        raise NonConvexLossError(
            f"loss {self.name!r} is not convex in the model outputs on this batch (a curvature of "
            f"{curvature:.3g}; targets out of range?): the GGN and its factor need a convex loss; use the "
            "'hessian' estimator"
        )

    def _detached(self, outputs: Any) -> Tensor:
        """The outputs as a detached tensor: curvature is taken at fixed outputs."""
        if not isinstance(outputs, Tensor):
            raise UnknownLossError(
                f"loss {self.name!r}: curvature needs tensor outputs, got {shape_of(outputs)}"
            )
        return outputs.detach()


class ClosedFormLoss(BatchLoss):
    """A loss with closed forms, standing for a ``torch.nn`` loss module and its options.

    Attributes:
        BASE_NAME: The loss's name without options (a key of ``LOSS_NAMES``).
        MODULE: The ``torch.nn`` module type it stands for.
        DEFAULTS: Its options and their defaults, named as the module's attributes.
    """

    BASE_NAME: ClassVar[str]
    MODULE: ClassVar[type[nn.Module]]
    DEFAULTS: ClassVar[dict[str, Any]] = {}

    def __init__(self, options: Mapping[str, Any], reduction: str):
        super().__init__(describe_options(self.BASE_NAME, options, self.DEFAULTS), reduction, options)
        self._copies: dict[tuple[int, torch.device, torch.dtype], tuple[int, Tensor]] = {}
        # the weights' version counters when non_negative_weights checked them
        self._checked = {
            id(value): value._version
            for value in options.values()
            if isinstance(value, Tensor) and not value.is_inference()
        }

    def _on(self, fixed: Tensor | None, device: torch.device, dtype: torch.dtype) -> Tensor | None:
        """``fixed`` (one of the loss's weights, shared with its module) on ``device`` in ``dtype``.

        The functional losses need their weights where the outputs are. A cast
        on the weights' device, or a copy from host memory to a CUDA device
        (``non_blocking``: :func:`curvkit.data.copies_without_waiting`; pinned
        weights are first copied on the host, since a non-blocking transfer
        reads pinned memory later, when an edit may have changed it), does not
        wait for the device, so it is made per call and follows every edit of
        the module's weights. A copy that would wait (to the host from a
        device, where the count of a batch copied from host memory is read;
        between devices; to MPS) is made once and kept until the weights'
        version counter moves (an edit that bypasses it, through ``.data`` or
        a DLPack or NumPy view, goes unnoticed there), outside inference mode so
        that autograd can use it later. ``None`` stays ``None``.
        """
        if fixed is None:
            return None
        if fixed.device == device:
            return fixed.to(dtype=dtype)
        if copies_without_waiting(fixed.device, device):
            source = fixed.clone() if fixed.is_pinned() else fixed  # pageable: staged before the call returns
            return source.to(device=device, dtype=dtype, non_blocking=True)
        key = (id(fixed), device, dtype)
        version = 0 if fixed.is_inference() else fixed._version  # an inference tensor has no counter
        kept = self._copies.get(key)
        if kept is None or kept[0] != version:
            with torch.inference_mode(False):
                kept = self._copies[key] = (version, fixed.to(device=device, dtype=dtype))
        return kept[1]

    def _non_negative(self, fixed: Tensor | None) -> bool:
        """Whether ``fixed`` (a weight) is still non-negative, as checked when the loss was made.

        The loss shares its module's weights, which may be edited afterwards. In
        host memory they are checked again (a few numbers: nothing waits for a
        device), through ``.data`` edits too. On a device they are checked again
        once per edit, when their version counter has moved (one read, which
        waits for the device); an edit that bypasses the counter (``.data``, a
        DLPack view) goes unnoticed there.
        """
        if fixed is None:
            return True
        if fixed.is_cpu:
            return not bool((fixed < 0).any())
        if fixed.is_inference():
            return False
        if self._checked.get(id(fixed)) != fixed._version:
            if bool((fixed < 0).any()):
                return False
            self._checked[id(fixed)] = fixed._version
        return True

    @classmethod
    def from_module(cls, module: nn.Module, reduction: str) -> ClosedFormLoss:
        """The loss of a ``torch.nn`` module of type :attr:`MODULE`, with its options."""
        return cls(reduction=reduction, **{key: getattr(module, key) for key in cls.DEFAULTS})


def check_reduction(reduction: str) -> str:
    """``reduction`` if it is ``"mean"`` or ``"sum"``; otherwise :class:`UnknownLossError`."""
    if reduction not in REDUCTIONS:
        raise UnknownLossError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return reduction


def describe_options(base: str, options: Mapping[str, Any], defaults: Mapping[str, Any]) -> str:
    """``"cross_entropy(ignore_index=1, weight=[1, 2, 0.5])"``: a name that shows non-default options.

    >>> defaults = {"ignore_index": -100, "weight": None}
    >>> describe_options("cross_entropy", {"ignore_index": 1, "weight": None}, defaults)
    'cross_entropy(ignore_index=1)'
    """
    shown = [
        f"{key}={_describe_value(value)}"
        for key, value in options.items()
        if not _is_default(value, defaults[key])
    ]
    return f"{base}({', '.join(shown)})" if shown else base


def _is_default(value: Any, default: Any) -> bool:
    if value is None or default is None:
        return value is default
    return value == default


def _describe_value(value: Any, limit: int = 8) -> str:
    """A compact, faithful rendering: ``[1, 2, 0.5]``, or a length and a digest for a long tensor."""
    if isinstance(value, Tensor):
        flat = value.detach().to("cpu", torch.float64).flatten()
        if flat.numel() <= limit:
            return "[" + ", ".join(f"{v:g}" for v in flat.tolist()) + "]"
        digest = hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:8]
        return f"[{flat.numel()} values, sha256 {digest}]"
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value)


def non_negative_weights(weight: Tensor | Sequence[float] | None, option: str) -> Tensor | None:
    """``weight`` as a detached floating-point tensor (``None`` stays ``None``), refusing negative entries.

    Negative weights would make the loss concave in some outputs: no symmetric factor.
    """
    if weight is None:
        return None
    weight = torch.as_tensor(weight).detach()
    if not weight.is_floating_point() or bool((weight < 0).any()):
        raise UnknownLossError(f"{option} must be a floating-point tensor of non-negative weights")
    return weight


def random_like(draw: Callable[..., Tensor], like: Tensor, generator: torch.Generator) -> Tensor:
    """``draw`` (``torch.rand`` or ``torch.randn``) of ``like``'s shape, on ``like``'s device.

    The numbers are drawn on the generator's device, then moved; the dtype is
    ``like``'s, promoted to at least float32. The move does not wait where
    :func:`curvkit.data.copies_without_waiting` allows it (host to CUDA: no
    stream synchronisation per batch).
    """
    dtype = torch.promote_types(like.dtype, torch.float32)
    drawn = draw(like.shape, generator=generator, device=generator.device, dtype=dtype)
    return drawn.to(like.device, non_blocking=copies_without_waiting(drawn.device, like.device))


def shape_of(x: Any) -> Any:
    """A tensor's shape as a tuple, or the type name of anything else (for messages)."""
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


def diagonal_factor(root: Tensor) -> Tensor:
    """The factor ``diag(root)`` over dim 1, in the :class:`BatchLoss` block layout: ``[*root.shape, R]``.

    ``F[n, i, pos, r] = delta_ir root[n, i, pos]`` with ``R = C``; for fewer than
    two dims, every entry is its own block and ``R = 1``.

    >>> diagonal_factor(torch.tensor([[1.0, 2.0]]))
    tensor([[[1., 0.],
             [0., 2.]]])
    """
    if root.ndim < 2:
        return root.unsqueeze(-1)
    return torch.diag_embed(root.movedim(1, -1)).movedim(-2, 1)
