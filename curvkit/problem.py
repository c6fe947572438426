"""The :class:`Problem`: a model, a loss and data, evaluated functionally.

Every curvature in curvkit is that of the full-dataset loss

.. math:: L(\\theta) = \\frac{1}{C} \\sum_{b} S_b(\\theta), \\qquad C = \\sum_b c_b,

where batch ``b`` contributes the sum ``S_b`` of its loss terms and their count
``c_b`` (see :mod:`curvkit.losses`); with ``reduction="sum"``, ``C = 1``. So the
same problem split into batches of 7 or of 64 has the same curvature, up to
rounding.

The model is run with :func:`torch.func.functional_call`, with the selected
parameters substituted by the tensors being differentiated, and in evaluation
mode by default (BatchNorm uses its running statistics, dropout is off).

A model wrapped by ``torch.compile`` is computed on as its original module
(:mod:`curvkit.compiled`): the same function, hence the same curvature, with
the original parameter names; compiled submodules run eagerly.

Attention (``F.scaled_dot_product_attention``, which ``nn.MultiheadAttention``
calls) is computed by its math kernel, the one whose second and forward-mode
derivatives exist (:func:`curvkit.backends.math_attention`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from curvkit import distributed
from curvkit.backends import math_attention, without_cudnn
from curvkit.compiled import EAGER_AVAILABLE, compiled_submodules, eager_compiled, original_module
from curvkit.data import BatchSource, batch_size_of, rebatchable_types, to_device
from curvkit.errors import DataError, NonDeterministicError, ShardError, UnknownLossError, first_line
from curvkit.layout import ParameterLayout, select_parameters
from curvkit.losses import BatchLoss, resolve_loss
from curvkit.precision import rounding_tolerance
from curvkit.snapshot import ModelSnapshot, record_host_copy

__all__ = ["ModelSnapshot", "Problem"]

_REBATCHABLE = rebatchable_types()
_RECURRENT = {"RNN", "LSTM", "GRU"}
"""Class names of torch's recurrent modules, as TorchScript keeps them (``original_name``)."""


def _outputs_tensor(out: Any) -> Any:
    """Model outputs as given, or their ``logits`` entry for dict-like outputs."""
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    return getattr(out, "logits", out) if not isinstance(out, Tensor) else out


class _UntrackedState(ModelSnapshot):
    """The model state of a problem that does not track it: always current, nothing copied.

    For :meth:`Problem.on_batch`: a problem used within one training step, while
    the model does not change, so the caches keyed on it (gradient graphs) stay
    valid without a copy of the parameters or a comparison per product.
    """

    def __init__(self, model: nn.Module):  # noqa: D107 - no copy, on purpose
        self.model = model

    def is_current(self) -> bool:
        """Always: the problem's user promises the model does not change while it is used."""
        return True


class Problem:
    """A model, a loss and data: the function whose curvature curvkit computes.

    Args:
        model: The network. Its parameters' device and dtype are the problem's.
            A ``torch.compile``'d model is taken as its original module
            (:attr:`model` is ``model._orig_mod``; the parameter names have no
            ``_orig_mod.`` prefix), whose function, hence curvature, it is; the
            generated code cannot be differentiated twice. Compiled submodules
            run eagerly while the problem evaluates the model.
        loss: ``"cross_entropy"``, ``"mse"``, ``"bce_with_logits"``, ``"nll"``, a
            ``torch.nn`` loss module, or a callable ``(outputs, targets) -> scalar``
            that returns the mean over the batch's samples.
        data: An ``(inputs, targets)`` pair of tensors, a Dataset, a DataLoader, or
            any re-iterable of ``(inputs, targets)`` batches. Inputs may be tensors
            or dicts of tensors (the model is then called as ``model(**inputs)``).
        params: Parameters to differentiate: ``None`` for all that require grad,
            or names / glob patterns / module prefixes (see
            :func:`curvkit.layout.select_parameters`). The flat order is that of
            ``model.named_parameters()``, each tensor flattened row-major.
        batch_size: Batch size used to split a tensor pair or a Dataset.
        max_samples: Use only the first ``max_samples`` samples.
        reduction: ``"mean"`` (default) or ``"sum"`` over the dataset's loss terms.
        eval_mode: Run the model in evaluation mode (default). With ``False`` the
            model's own mode is kept (train-mode BatchNorm then normalises with
            batch statistics, so the curvature depends on the batching; its
            running statistics are not updated).
        check_deterministic: Before the first product, evaluate loss and
            gradient twice and raise :class:`~curvkit.errors.NonDeterministicError`
            if they differ (train-mode dropout, random augmentation, a model that
            keeps state between calls).
        forward_kwargs: Extra keyword arguments of every call of the model, e.g.
            ``{"sr": 16000}`` for a model called as ``model(x, sr)``.
        track_state: Notice changes of the model's parameters and buffers
            (default): a copy of them per model state, compared before every
            product, so that cached work (gradient graphs, the determinism probe)
            is redone when the model changes. ``False`` is for a problem used while
            the model does not change (one training step, :meth:`on_batch`): no
            copy, no comparison, no host-device synchronisation per product.
        data_parallel: In a :mod:`torch.distributed` run of several processes
            (``torchrun``), each process iterates its shard of the data and the
            sums are reduced over the processes (default; see
            :mod:`curvkit.distributed`), so that every process gets the
            full-data curvature. ``False``: this process's data are the whole
            data (a training step's own mini-batch): no shard, no reduction.
            Without several processes both mean the same.

    Example:
        >>> import torch, curvkit
        >>> model = torch.nn.Linear(3, 1, bias=False)
        >>> X, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> problem = curvkit.Problem(model, "mse", (X, y))
        >>> problem.dim
        3

    To check accuracy in double precision, use ``problem.to(torch.float64)``,
    which runs a copy of the model in float64 and casts floating-point data.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str | nn.Module | Callable[[Any, Tensor], Tensor],
        data: Any,
        *,
        params: str | Sequence[str] | None = None,
        batch_size: int = 1024,
        max_samples: int | None = None,
        reduction: str | None = None,
        eval_mode: bool = True,
        check_deterministic: bool = True,
        forward_kwargs: Mapping[str, Any] | None = None,
        track_state: bool = True,
        data_parallel: bool = True,
    ):
        if not isinstance(model, nn.Module):
            raise DataError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        model = original_module(model)
        compiled = compiled_submodules(model)
        if compiled and not EAGER_AVAILABLE:
            raise DataError(
                f"the model holds torch.compile'd submodules ({_listing(compiled)}), which cannot be "
                f"differentiated twice and which torch {torch.__version__} cannot run eagerly (torch 2.6 "
                "and later can); build the model without compiling them"
            )
        self._eager_compiled = bool(compiled)
        self.model = model
        self.loss: BatchLoss = resolve_loss(loss, reduction)
        self._loss_arg, self._data_arg = loss, data
        self._selection = params
        self.batch_size, self.max_samples = batch_size, max_samples
        self.eval_mode = eval_mode
        self.check_deterministic = check_deterministic
        self.forward_kwargs: dict[str, Any] = dict(forward_kwargs or {})
        self.data = BatchSource(data, batch_size=batch_size, max_samples=max_samples)
        selected = select_parameters(model, params)
        self.param_names: tuple[str, ...] = tuple(n for n, _ in selected)
        self.layout = ParameterLayout(self.param_names, tuple(p.shape for _, p in selected))
        first = selected[0][1]
        self.device: torch.device = first.device
        self.dtype: torch.dtype = first.dtype
        self.track_state = track_state
        self.data_parallel = data_parallel
        # cuDNN's recurrent kernels refuse a backward pass in evaluation mode and have no second
        # backward: recurrent models run on the GPU without cuDNN (PyTorch's own fused cells, whose
        # double backward is differentiable; they have no forward mode, so "forward-over-reverse"
        # is not available for them there). TorchScript modules keep the class name in original_name.
        self._without_cudnn = self.device.type == "cuda" and any(
            isinstance(m, nn.RNNBase) or getattr(m, "original_name", None) in _RECURRENT
            for m in model.modules()
        )
        self._snapshot: ModelSnapshot | None = None if track_state else _UntrackedState(model)
        self._determinism_snapshot: ModelSnapshot | None = None

    # ------------------------------------------------------------------ basics
    @property
    def dim(self) -> int:
        """``P``, the number of selected scalar parameters."""
        return self.layout.dim

    @property
    def total_parameters(self) -> int:
        """Scalar parameters of the whole model (selected or not, frozen included)."""
        return sum(p.numel() for p in self.model.parameters())

    @property
    def frozen_parameters(self) -> int:
        """Scalar parameters of the model that do not require grad."""
        return sum(p.numel() for p in self.model.parameters() if not p.requires_grad)

    def describe_parameters(self) -> str:
        """``"P=264,450 of 462,594: 198,144 frozen"``: what is differentiated, of what.

        Just ``"P=3,466"`` when every parameter of the model is selected.
        """
        total, frozen = self.total_parameters, self.frozen_parameters
        if self.dim == total:
            return f"P={self.dim:,}"
        parts = [f"{frozen:,} frozen"] if frozen else []
        others = total - frozen - self.dim
        if others > 0:
            parts.append(f"{others:,} not selected")
        return f"P={self.dim:,} of {total:,}" + (f": {', '.join(parts)}" if parts else "")

    @property
    def params(self) -> tuple[Tensor, ...]:
        """The selected parameters (live tensors of the model), in flat order."""
        named = dict(self.model.named_parameters())
        return tuple(named[n] for n in self.param_names)

    def flat_params(self) -> Tensor:
        """The selected parameters as one detached flat vector."""
        return self.layout.flatten([p.detach() for p in self.params])

    def current_snapshot(self) -> ModelSnapshot:
        """A record of the model's parameters and buffers, to detect later changes.

        Returns the last snapshot taken if it is still current, otherwise a new
        one. Operators that cache work (gradient graphs, dense matrices, the
        determinism probe) keep the snapshot they computed under; the work stays
        valid while this returns the very same object (compare with ``is``), so
        one check per product serves every cache. Within an analysis
        (:func:`curvkit.snapshot.fixed_model_state`) the contents are compared
        once, the version counters at every product.
        """
        if self._snapshot is None or not self._snapshot.is_current():
            self._snapshot = ModelSnapshot(self.model)
        return self._snapshot

    def on_batch(self, inputs: Any, targets: Any) -> Problem:
        """The same model and loss on one mini-batch, light enough for every training step.

        The optimizers' path (:mod:`curvkit.optim`): the curvature of the loss of
        ``(inputs, targets)`` alone (normalised like this problem's: the mean over
        its loss terms, or their sum), for the estimators' same per-batch products
        as the analyses use. Unlike a problem built for analysis it copies nothing
        (the batch is used as given, the model's state is not tracked:
        ``track_state=False``) and runs no determinism probe, so it is valid while
        the model does not change: build a new one after each step.

        Example:
            >>> import torch, curvkit
            >>> model = torch.nn.Linear(2, 1)
            >>> template = curvkit.Problem(model, "mse", (torch.zeros(4, 2), torch.zeros(4, 1)))
            >>> step = template.on_batch(torch.ones(3, 2), torch.ones(3, 1))
            >>> step.num_samples(), step.check_deterministic, step.track_state
            (3, False, False)
        """
        return Problem.for_batch(
            self.model,
            self._loss_arg,
            inputs,
            targets,
            params=self._selection,
            reduction=self.loss.reduction,
            eval_mode=self.eval_mode,
            forward_kwargs=self.forward_kwargs,
        )

    @classmethod
    def for_batch(
        cls,
        model: nn.Module,
        loss: str | nn.Module | Callable[[Any, Tensor], Tensor],
        inputs: Any,
        targets: Tensor,
        *,
        params: str | Sequence[str] | None = None,
        reduction: str | None = None,
        eval_mode: bool = True,
        forward_kwargs: Mapping[str, Any] | None = None,
    ) -> Problem:
        """The light problem of one mini-batch (see :meth:`on_batch`), without a template problem.

        One batch of all of ``(inputs, targets)``, no determinism probe, the model's
        state not tracked, the batch this process's alone (``data_parallel=False``:
        in a data-parallel run each process has its own); the other arguments as
        :class:`Problem` takes them. What
        :meth:`on_batch` builds, and :meth:`curvkit.optim.CurvatureOptimizer.batch_problem`.
        """
        return cls(
            model,
            loss,
            (inputs, targets),
            params=params,
            batch_size=max(batch_size_of(inputs, targets), 1),
            reduction=reduction,
            eval_mode=eval_mode,
            check_deterministic=False,
            forward_kwargs=forward_kwargs,
            track_state=False,
            data_parallel=False,
        )

    def with_params(self, params: str | Sequence[str] | None) -> Problem:
        """The same model, loss and data, differentiated w.r.t. other parameters."""
        other = self._replace(model=self.model, params=params)
        other._snapshot, other._determinism_snapshot = self._snapshot, self._determinism_snapshot
        return other

    def rebatched(self, batch_size: int) -> Problem:
        """The same problem with the data split into batches of ``batch_size``.

        Its curvature is the same, up to rounding. Only for data given as a tensor
        pair or a Dataset (a DataLoader or a list of batches fixes its own batches).

        Raises:
            DataError: The data's batching is fixed by the user.
        """
        if not isinstance(self.data._source, _REBATCHABLE):
            raise DataError(
                "this problem's data come in batches fixed by the user (a DataLoader or a "
                "list of batches); pass a tensor pair or a Dataset to change the batch size"
            )
        other = self._replace(model=self.model, params=self._selection, batch_size=batch_size)
        other._snapshot, other._determinism_snapshot = self._snapshot, self._determinism_snapshot
        return other

    def subset(self, indices: Sequence[int] | Tensor) -> Problem:
        """The same model and loss on some of the samples: a mini-batch of the data.

        The new problem's loss is that of the chosen samples, normalised like this
        problem's (the mean over their loss terms, or their sum with
        ``reduction="sum"``), split into batches of :attr:`batch_size`. It shares
        this problem's record of the model state, so a determinism probe already
        passed on the full data is not repeated. With
        :meth:`curvkit.ProblemOperator.with_problem` it gives the same estimator on
        a mini-batch (as the ``lissa`` solver draws them).

        The samples are taken by :meth:`curvkit.data.BatchSource.subset`.

        Args:
            indices: Positions of samples in the data, in the order the problem
                iterates them (``0 .. num_samples() - 1``, after ``max_samples``);
                any order, repeats allowed (a repeated sample counts again).

        Raises:
            DataError: No index, or one outside the data.

        Example:
            >>> import torch, curvkit
            >>> X, y = torch.arange(12.0).reshape(6, 2), torch.arange(6.0).reshape(6, 1)
            >>> problem = curvkit.Problem(torch.nn.Linear(2, 1), "mse", (X, y))
            >>> [t.tolist() for t in next(iter(problem.subset([4, 1]).batches()))[1]]
            [[4.0], [1.0]]
        """
        data = self.data.subset(indices)
        other = self._replace(model=self.model, params=self._selection, data=data)
        other._snapshot, other._determinism_snapshot = self._snapshot, self._determinism_snapshot
        return other

    def to(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> Problem:
        """A problem on a copy of the model cast to ``dtype`` and/or moved to ``device``.

        Floating-point data are cast to the new dtype as batches are drawn.
        """
        model = copy.deepcopy(self.model).to(device=device, dtype=dtype)
        return self._replace(model=model, params=self._selection)

    def _replace(
        self, model: nn.Module, params: Any, batch_size: int | None = None, data: Any = None
    ) -> Problem:
        """A problem like this one; ``data`` (a subset, all of it used) replaces the data if given."""
        return Problem(
            model,
            self._loss_arg,
            self._data_arg if data is None else data,
            params=params,
            batch_size=batch_size or self.batch_size,
            max_samples=self.max_samples if data is None else None,
            reduction=self.loss.reduction,
            eval_mode=self.eval_mode,
            check_deterministic=self.check_deterministic,
            forward_kwargs=self.forward_kwargs,
            track_state=self.track_state,
            data_parallel=self.data_parallel,
        )

    def __repr__(self) -> str:
        return (
            f"Problem(model={type(self.model).__name__}, loss={self.loss.name!r}, "
            f"reduction={self.loss.reduction!r}, P={self.dim}, dtype={self.dtype}, "
            f"device={self.device})"
        )

    # -------------------------------------------------------------- evaluation
    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        """Put the model in evaluation mode (if ``eval_mode``) and restore it after."""
        if not self.eval_mode:
            yield
            return
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            yield
        finally:
            for m, mode in modes:
                m.training = mode

    def batches(self) -> Iterator[tuple[Any, Tensor]]:
        """The data's batches (in a data-parallel run this process's shard), on the problem's device, dtype.

        For targets copied from host memory, what the loss reads of them (its
        check of the class indices, their count) is read from a copy of their
        values kept on the host (:func:`curvkit.snapshot.record_host_copy`): on
        a GPU, no synchronisation for it.

        Raises:
            DataError: No batch.
            ShardError: In a data-parallel run, no batch for this process (each
                process needs one).
        """
        rank, size = distributed.process() if self.data_parallel else (0, 1)
        empty = True
        for inputs, targets in self.data.shard(rank, size):
            empty = False
            inputs = to_device(inputs, self.device, self.dtype)
            moved = to_device(targets, self.device, self.dtype)
            record_host_copy(moved, targets)  # the loss's checks of a copied batch wait for no device
            yield inputs, moved
        if empty and size > 1:
            raise ShardError(
                f"process {rank} of {size} has no batch of the data: give every process at least one "
                "(fewer processes, or smaller batches)",
                rank,
            )
        if empty:
            raise DataError("the data yielded no batch")

    def forward(self, params: Sequence[Tensor], inputs: Any) -> Any:
        """Model outputs with the selected parameters replaced by ``params``."""
        values: dict[str, Tensor] = dict(zip(self.param_names, params))
        for name, p in self.model.named_parameters():
            if name not in values and p.requires_grad:
                values[name] = p.detach()
        if not self.eval_mode:  # train-mode BatchNorm must not update the model's statistics
            for name, b in self.model.named_buffers():
                values[name] = b.clone()
        # Attention by its math kernel: the fused ones have no second derivative and no forward mode.
        with (
            math_attention(),
            without_cudnn() if self._without_cudnn else contextlib.nullcontext(),
            eager_compiled() if self._eager_compiled else contextlib.nullcontext(),
        ):
            if isinstance(inputs, Mapping):
                out = functional_call(self.model, values, args=(), kwargs={**inputs, **self.forward_kwargs})
            else:
                out = functional_call(self.model, values, (inputs,), kwargs=self.forward_kwargs)
        return _outputs_tensor(out)

    def loss_terms(self, params: Sequence[Tensor], inputs: Any, targets: Tensor) -> tuple[Tensor, float]:
        """``(S_b, c_b)``: the sum of a batch's loss terms and their count.

        Raises:
            DataError: The model cannot be applied to the inputs, or its outputs do
                not fit the targets and the loss.
        """
        try:
            outputs = self.forward(params, inputs)
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            raise DataError(
                f"the model cannot be applied to a batch of inputs {_describe(inputs)}: "
                f"{first_line(exc) or type(exc).__name__}"
            ) from exc
        try:
            return self.loss.sum_and_count(outputs, targets)
        except UnknownLossError as exc:
            raise DataError(str(exc)) from exc
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            raise DataError(
                f"loss {self.loss.name!r} cannot compare outputs {_describe(outputs)} with "
                f"targets {_describe(targets)}: {first_line(exc) or type(exc).__name__}"
            ) from exc

    def normalizer(self, total_count: float) -> float:
        """``1 / C``: the factor turning summed terms into the problem's loss."""
        if self.loss.reduction == "sum":
            return 1.0
        if total_count == 0:
            raise DataError("the data hold no loss term (all targets ignored?)")
        return 1.0 / total_count

    # ------------------------------------------------------- the loop over data
    def batch_sums(self, per_batch: Callable[[Any, Tensor], tuple[Any, float]]) -> tuple[Any, float]:
        """The one loop over the data: ``sum_b per_batch(inputs_b, targets_b)`` and ``sum_b c_b``.

        The model is in evaluation mode (unless the problem says otherwise), each
        batch on the problem's device and dtype. ``per_batch`` returns a batch's
        contribution (a tensor, ``None``, or a tuple or list of them, summed
        entry by entry) and its count of loss terms. Every data-backed quantity of
        curvkit (gradients, curvature products, dense references) is a sum formed
        here; :meth:`full_data` then turns it into the full-dataset quantity.

        Returns:
            The summed contributions of this process's data, and their count.
        """
        total: Any = None
        count: float = 0
        with self.evaluation(), self._shared_failures():
            for inputs, targets in self.batches():
                part, c = per_batch(inputs, targets)
                total = _add(total, part)
                count += c
        return total, count

    def full_data(self, local_sum: Any, local_count: float) -> Any:
        """The full-dataset quantity from the sums of :meth:`batch_sums`: reduced, then normalised.

        The reduction is the one place where sums over the data meet: the sum of
        every process's ``local_sum`` and ``local_count``
        (:func:`curvkit.distributed.reduce_sums`: the identity in one process, or
        with ``data_parallel=False``; a data-parallel run all-reduces here and
        nowhere else). The result is multiplied by :meth:`normalizer` of the
        total count, so that it belongs to the full-dataset loss
        ``L = (1/C) sum_b S_b``.
        """
        total, count = local_sum, local_count
        if self.data_parallel:
            total, count = distributed.reduce_sums(total, count, self.device)
        return _scale(total, self.normalizer(count))

    def data_mean(self, per_batch: Callable[[Any, Tensor], tuple[Any, float]]) -> Any:
        """:meth:`batch_sums` then :meth:`full_data`: a full-dataset quantity in one pass."""
        return self.full_data(*self.batch_sums(per_batch))

    def loss_and_gradient(self) -> tuple[Tensor, Tensor]:
        """Full-dataset loss and its flat gradient, in one pass over the data."""
        leaves = [p.detach().requires_grad_(True) for p in self.params]

        def per_batch(inputs: Any, targets: Tensor) -> tuple[tuple[Tensor, Tensor], float]:
            s, c = self.loss_terms(leaves, inputs, targets)
            grads = torch.autograd.grad(s, leaves, allow_unused=True)
            flat = self.layout.flatten(
                [torch.zeros_like(p) if g is None else g for g, p in zip(grads, leaves)]
            )
            return (s.detach(), flat), c

        with torch.enable_grad():
            loss, gradient = self.data_mean(per_batch)
        return loss, gradient

    def num_samples(self) -> int:
        """Number of samples in the data (one pass over the data, nothing computed)."""
        return sum(batch_size_of(i, t) for i, t in self.data)

    def ensure_deterministic(self, snapshot: ModelSnapshot | None = None) -> None:
        """Raise if two passes over the data disagree (once per model state).

        Does nothing when the problem was built with ``check_deterministic=False``.

        Args:
            snapshot: The current model state, if the caller already has it (see
                :meth:`current_snapshot`).

        Raises:
            NonDeterministicError: Loss or gradient differ between two passes.
        """
        if not self.check_deterministic:
            return
        snapshot = snapshot if snapshot is not None else self.current_snapshot()
        if self._determinism_snapshot is snapshot:
            return
        buffers = {name: b.detach().clone() for name, b in self.model.named_buffers()}
        loss1, grad1 = self.loss_and_gradient()
        loss2, grad2 = self.loss_and_gradient()
        rtol = rounding_tolerance(self.dtype)
        scale = max(grad1.abs().max().item(), 1e-30)
        if not torch.isfinite(loss1) or not torch.isfinite(grad1).all():
            raise DataError("the loss or its gradient is not finite (NaN/Inf in weights or data?)")
        same_loss = torch.allclose(loss1, loss2, rtol=rtol, atol=rtol * 1e-3)
        same_grad = torch.allclose(grad1, grad2, rtol=rtol, atol=rtol * scale)
        if not (same_loss and same_grad):
            named = dict(self.model.named_buffers())
            changed = [n for n, b in buffers.items() if n in named and not torch.equal(named[n].detach(), b)]
            cause = (
                f"the model changed its buffers {_listing(changed)} while running: a stateful model "
                "(a recurrent or streaming state kept between calls)"
                if changed
                else "train-mode dropout, random augmentation, shuffled or randomly transformed data, "
                "or a stateful model that keeps a (recurrent, streaming) state between calls"
            )
            raise NonDeterministicError(
                f"two passes over the data gave different losses or gradients ({cause}); make the data "
                "and model deterministic (reset a stateful model's state per call), or pass "
                "check_deterministic=False (--no-check-deterministic) to analyse it anyway"
            )
        self._determinism_snapshot = snapshot

    def check_batch(self) -> None:
        """Apply the model and the loss to the first batch: a cheap check before long work.

        Raises:
            DataError: The data yield no batch, the model cannot be applied to
                the inputs, its outputs do not fit the targets and the loss, or
                the loss is not finite.
            ProcessFailedError: In a data-parallel run, another process's check
                failed (every process checks its own shard's first batch).
        """
        with torch.no_grad(), self.evaluation(), self._shared_failures():
            inputs, targets = next(iter(self.batches()))
            total, _ = self.loss_terms([p.detach() for p in self.params], inputs, targets)
            if not bool(torch.isfinite(total)):
                raise DataError(
                    "the loss or its gradient is not finite on the first batch (NaN/Inf in weights or data?)"
                )
        if self.data_parallel:  # where a process whose check failed joins the others (and they learn it)
            distributed.reduce_sums(None, 0.0, self.device)

    def _shared_failures(self) -> contextlib.AbstractContextManager:
        """Around this process's share of a pass: in a data-parallel run, a failure there ends every
        process at the reduction they meet next (:func:`curvkit.distributed.shared_failures`)."""
        return distributed.shared_failures(self.device) if self.data_parallel else contextlib.nullcontext()


def _listing(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _add(total: Any, part: Any) -> Any:
    """``total + part`` entry by entry for tensors, ``None`` and tuples or lists of them."""
    if total is None:
        return part
    if part is None:
        return total
    if isinstance(total, tuple | list):
        return type(total)(_add(a, b) for a, b in zip(total, part))
    return total + part


def _scale(value: Any, factor: float) -> Any:
    """``value * factor`` entry by entry (tensors, ``None``, tuples and lists of them)."""
    if value is None:
        return None
    if isinstance(value, tuple | list):
        return type(value)(_scale(v, factor) for v in value)
    return value * factor


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"of shape {tuple(x.shape)} ({x.dtype})"
    if isinstance(x, Mapping):
        return "{" + ", ".join(f"{k}: {tuple(v.shape)}" for k, v in x.items()) + "}"
    return type(x).__name__
