"""``NewtonSummary``: per-subset learning rates from the Newton summary (Wolinski 2023).

P. Wolinski ("Adapting Newton's Method to Neural Networks through a Summary of
Higher-Order Derivatives", arXiv 2312.03885, 2023, Appendix F) trains with SGD's
momentum direction and one learning rate per subset ``T_s`` of a partition of
the parameters (one ``torch.optim`` parameter group per subset,
:mod:`curvkit.partition`). At step ``t``:

1. **Direction.** ``u`` is SGD's momentum buffer: the gradient at the first step,
   then ``u <- momentum * u + (1 - momentum_damp) * grad``.
2. **Summary**, every ``period_hg`` steps, on the next batch ``(x, y)`` of
   ``hg_loader``: with ``v_s`` the restriction of ``u`` to ``T_s``, the loss
   ``full_loss(x, y)`` gives ``g_bar_s = g . v_s``, ``H_bar_st = v_s^T H v_t`` and
   ``D3_s``, its third derivative along ``v_s``
   (:func:`curvkit.third_order.directional_summary`: one gradient graph, two more
   backward passes per subset).
3. **Learning rates.** ``eta`` minimises the anisotropic Nesterov cubic model,
   ``eta = (H_bar + (lambda_int / 2) ||D eta|| D^2)^-1 g_bar`` with
   ``D = diag(|D3_s|^(1/3))`` (``dct_nesterov={"use": True, "damping_int":
   lambda_int}``), or ``eta = H_bar^-1 g_bar`` without it
   (:func:`curvkit.cubic.cubic_step`, in float64). Negative rates are set to zero
   if ``remove_negative``; then each group's ``lr <- mom_lrs * lr + (1 - mom_lrs)
   * damping * eta_s`` (``mom_lrs`` is not applied to the first rates).
4. **Step**, every step: ``theta_s <- theta_s - lr_s u_s``. As in
   :class:`torch.optim.SGD`, a parameter without a gradient (``.grad`` is
   ``None``) is left alone: its momentum is neither updated nor applied, and it
   is not part of that step's direction.

These are the reference package's semantics (``grnewt``): its README's minimal
example runs with ``grnewt`` replaced by ``curvkit`` (``docs/newton.md``). What
curvkit adds:

* **Right third derivatives** through normalisation layers: the summary's loss is
  built under :class:`curvkit.CompositeNorms` (torch 2.13's third derivatives
  through the fused ``LayerNorm`` are wrong), which also leaves training-mode
  BatchNorm's running statistics untouched by the summary.
* **Never NaN parameters.** A step whose gradient, or whose update ``lr_s u_s``,
  is not finite (a rate from a nearly flat direction can overflow the parameters'
  dtype) is skipped with a :class:`curvkit.CurvkitWarning`: parameters, momentum
  buffers and learning rates unchanged (the new ones are computed aside), and a
  summary due at that step is taken again at the next. A summary that is not
  finite, or whose cubic model has no minimiser nor stationary point, keeps the
  previous learning rates with a warning that says why.
* **Checked input.** An empty subset, a parameter in two subsets, a loss that
  depends on parameters outside the partition (found by walking its autograd
  graph at the first summary), a loader that yields nothing, bad hyper-parameters:
  one clear :class:`ValueError`.
* **A whole state.** ``state_dict()`` holds the momentum buffers, the learning
  rates, the step count and how far ``hg_loader`` has been read; after
  ``load_state_dict`` the next summary reads the batch the original run would
  have read (the loader is re-iterated and fast-forwarded: the same batch when
  its order is deterministic).

The direction is not normalised and ``full_loss`` is used as given: with a
mean over the batch the rates do not depend on ``hg_loader``'s batch size.
Without ``remove_negative`` a negative rate steps against ``u``: the model's
minimiser along that subset lies behind. Where the cubic model is unbounded
below (``H_bar`` indefinite without regularisation) the rates are its
stationary point of largest ``||D eta||``, the reference package's
``H_bar^-1 g_bar``; :attr:`NewtonSummary.last_summary` records which case each
summary was.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvkit.composite_norms import CompositeNorms
from curvkit.cubic import CubicStep
from curvkit.errors import CurvkitWarning, DataError, UnboundedModelError
from curvkit.newton import SummaryResult
from curvkit.optim.base import (
    CurvatureOptimizer,
    all_finite,
    check_flag,
    check_fraction,
    check_integer,
    check_positive,
    warn_if_data_parallel,
)
from curvkit.third_order import directional_summary

__all__ = ["NESTEROV_KEYS", "NewtonSummary", "SummaryStep"]

NESTEROV_KEYS = ("use", "damping_int")
"""The keys of ``dct_nesterov``."""


@dataclass(frozen=True)
class SummaryStep:
    """One summary of :class:`NewtonSummary` and what it did to the learning rates.

    Attributes:
        step: The optimizer step (0-based) at which it was computed.
        summary: ``g_bar``, ``H_bar``, ``D3`` on the ``hg_loader`` batch.
        cubic: The solve of the learning rates (``.eta``, ``.case``), ``None`` when
            it could not be done.
        learning_rates: Each group's ``lr`` after this summary.
        kept: Empty, or why the learning rates were kept unchanged.
    """

    step: int
    summary: SummaryResult
    cubic: CubicStep | None
    learning_rates: tuple[float, ...]
    kept: str = ""


def _nesterov(dct: Any) -> tuple[bool, float]:
    """``(use, damping_int)`` from ``dct_nesterov`` (``None``: not used)."""
    if dct is None:
        return False, 0.0
    if not isinstance(dct, dict):
        raise ValueError(f"dct_nesterov must be a dict with keys {list(NESTEROV_KEYS)}, got {dct!r}")
    unknown = sorted(set(dct) - set(NESTEROV_KEYS))
    if unknown:
        raise ValueError(f"dct_nesterov has unknown key(s) {unknown}; its keys are {list(NESTEROV_KEYS)}")
    use = dct.get("use", False)
    if not isinstance(use, bool):
        raise ValueError(f"dct_nesterov['use'] must be True or False, got {use!r}")
    if not use:
        return False, 0.0
    if "damping_int" not in dct:
        raise ValueError("dct_nesterov['damping_int'] is needed when dct_nesterov['use'] is True")
    return True, check_positive("dct_nesterov['damping_int']", dct["damping_int"], zero=True)


def _loss_leaves(loss: Tensor) -> list[Tensor]:
    """The leaf tensors requiring grad that ``loss``'s autograd graph accumulates into."""
    found: list[Tensor] = []
    seen: set[int] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if isinstance(variable, Tensor):
            found.append(variable)
        stack.extend(child for child, _ in node.next_functions)
    return found


def _stepped(params: list[Tensor], directions: list[Tensor], rate: float) -> list[Tensor]:
    """``p - rate u`` per pair, rounded once as ``p.add_(u, alpha=-rate)`` rounds it.

    Where ``rate`` is beyond a parameter's dtype (float16's 65504), which ``alpha``
    cannot be, the difference is formed in float64 and rounded to the dtype (to
    infinity where it overflows, which the step's check then refuses).
    """
    if not params:
        return []
    if all(abs(rate) <= torch.finfo(p.dtype).max for p in params):
        return list(torch._foreach_add(params, directions, alpha=-rate))
    return [(p.double() - rate * u.double()).to(p.dtype) for p, u in zip(params, directions)]


class NewtonSummary(CurvatureOptimizer):
    """SGD with momentum and per-subset learning rates from the Newton summary (see the module docstring).

    Example (``docs/newton.md`` has the whole training script)::

        param_groups, name_groups = curvkit.partition.canonical(model)
        full_loss = lambda x, target: loss_fn(model(x), target)
        optimizer = curvkit.NewtonSummary(
            param_groups, full_loss, hg_loader, damping=0.1,
            dct_nesterov={"use": True, "damping_int": 10.0},
            period_hg=10, mom_lrs=0.5, remove_negative=True, momentum=0.9, momentum_damp=0.9,
        )

    Args:
        params: The partition: parameter groups, one per subset (each group may
            override ``damping``, ``momentum``, ``momentum_damp`` and ``mom_lrs``), or
            an iterable of tensors (one subset).
        full_loss: ``full_loss(x, target)``: the scalar loss of a batch, computed
            with the parameters (typically ``loss_fn(model(x), target)``).
        hg_loader: Re-iterable ``(x, target)`` batches for the summaries (e.g. a
            ``DataLoader``), read in order and restarted when exhausted; floating
            inputs are cast to the parameters' dtype and both moved to their device.
        damping: ``lambda_1``: the factor of every learning rate (``> 0``).
        dct_nesterov: ``{"use": bool, "damping_int": lambda_int}``: the cubic
            regularisation by third-order information (``None``: not used).
        period_hg: Steps between summaries (``>= 1``).
        mom_lrs: Exponential-average factor of the learning rates, in ``[0, 1)``.
        remove_negative: Set negative learning rates to zero.
        momentum: SGD's momentum, in ``[0, 1]``.
        momentum_damp: SGD's dampening of the momentum, in ``[0, 1]``.

    Attributes:
        last_summary: The last :class:`SummaryStep` (``None`` before the first).
        summaries: Summaries computed so far.
        skipped_steps: Steps skipped because the gradient or the update was not finite.

    Raises:
        ValueError: An empty subset, a parameter in two subsets, invalid
            hyper-parameters, a ``hg_loader`` that is not iterable.
    """

    GROUP_CHECKS = {
        "damping": check_positive,
        "momentum": check_fraction,
        "momentum_damp": check_fraction,
        "mom_lrs": functools.partial(check_fraction, below_one=True),
    }
    GLOBAL = ("full_loss", "hg_loader", "dct_nesterov", "period_hg", "remove_negative")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        full_loss: Callable[[Any, Any], Tensor],
        hg_loader: Iterable[Any],
        *,
        damping: float = 1.0,
        dct_nesterov: dict[str, Any] | None = None,
        period_hg: int = 1,
        mom_lrs: float = 0.0,
        remove_negative: bool = False,
        momentum: float = 0.0,
        momentum_damp: float = 0.0,
    ) -> None:
        if not callable(full_loss):
            raise ValueError(
                f"full_loss must be a callable full_loss(x, target), got {type(full_loss).__name__}"
            )
        if not isinstance(hg_loader, Iterable):
            raise ValueError(
                f"hg_loader must be an iterable of (x, target) batches, got {type(hg_loader).__name__}"
            )
        check_integer("period_hg", period_hg)
        check_flag("remove_negative", remove_negative)
        self.use_nesterov, self.damping_int = _nesterov(dct_nesterov)
        self.full_loss = full_loss
        self.hg_loader = hg_loader
        self.period_hg = period_hg
        self.remove_negative = remove_negative
        defaults = {
            "lr": 0.0,
            "damping": damping,
            "momentum": momentum,
            "momentum_damp": momentum_damp,
            "mom_lrs": mom_lrs,
        }
        self.last_summary: SummaryStep | None = None
        self.summaries = 0
        self._steps = 0  # steps taken (the summary is due when steps % period_hg == 0)
        self._has_lrs = False  # a summary has set the learning rates
        self._iterator: Iterator[Any] | None = None
        self._position = 0  # batches read from the current pass over hg_loader
        self._passes = 0  # passes over hg_loader started
        self._checked_partition = False
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ parameter groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a subset, refusing an empty one, a repeated parameter and bad hyper-parameters."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        index = len(self.param_groups)
        if not params:
            raise ValueError(f"subset {index} of the partition is empty")
        for i, p in enumerate(params):
            if any(p is q for q in params[:i]):
                raise ValueError(f"a parameter of shape {tuple(p.shape)} appears twice in subset {index}")
            for other, group in enumerate(self.param_groups):
                if any(p is q for q in group["params"]):
                    raise ValueError(
                        f"a parameter of shape {tuple(p.shape)} is in subsets {other} and {index} of the "
                        "partition: each parameter belongs to exactly one"
                    )
        super().add_param_group({**param_group, "params": params})

    # ------------------------------------------------------------------ the step
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One training step (see the module docstring); the closure's loss if one is given.

        The new momentum buffers, learning rates and parameters are computed aside
        and kept only if all are finite: a step whose gradient, or whose new
        parameters ``theta_s - lr_s u_s`` (a learning rate so large that it
        overflows, or NaN), are not finite is skipped with a
        :class:`curvkit.CurvkitWarning`, leaving the parameters, the momentum
        buffers and the learning rates as they were.

        Raises:
            DataError: ``hg_loader`` yields nothing, or not ``(x, target)`` pairs.
            ValueError: ``full_loss`` depends on parameters outside the partition,
                or does not return a scalar tensor with a graph to the parameters.
        """
        loss = self.evaluate(closure)
        members = [[p for p in group["params"] if p.grad is not None] for group in self.param_groups]
        grads = [p.grad for params in members for p in params]  # as SGD: a parameter without one stays
        if not all_finite(grads):
            self.skip("the gradient is not finite", unchanged="parameters and momentum unchanged")
            return loss
        buffers = self._momentum(members)
        rates = [float(group["lr"]) for group in self.param_groups]
        refresh = None
        if self._steps % self.period_hg == 0:
            refresh = self._new_learning_rates(buffers, rates)
        new_rates = rates if refresh is None else list(refresh.learning_rates)
        values: list[tuple[Tensor, Tensor]] = []
        with torch.no_grad():
            for params, rate in zip(members, new_rates):
                values += zip(params, _stepped(params, [buffers[p] for p in params], rate))
            applied = self.apply_values(  # checked as they are: a rate may overflow the parameters' dtype
                values,
                checks=[("momentum", list(buffers.values()))],
                unchanged="parameters, momentum and learning rates unchanged",
            )
        if refresh is not None:
            self.summaries += 1
            if not applied:
                why = "the step with these learning rates is not finite"
                refresh = dataclasses.replace(refresh, learning_rates=tuple(rates), kept=why)
            self.last_summary = refresh
        if not applied:
            return loss
        for p, buffer in buffers.items():
            self.state[p]["momentum_buffer"] = buffer
        for group, rate in zip(self.param_groups, new_rates):
            group["lr"] = rate
        self._has_lrs = self._has_lrs or (refresh is not None and not refresh.kept)
        self._steps += 1
        return loss

    @torch.no_grad()
    def _momentum(self, members: list[list[Tensor]]) -> dict[Tensor, Tensor]:
        """Each parameter's new momentum buffer, computed aside: the gradient at its first step, then
        ``momentum * u + (1 - momentum_damp) * grad`` (per group)."""
        buffers: dict[Tensor, Tensor] = {}
        for group, params in zip(self.param_groups, members):
            for p in params:
                buffer = self.state[p].get("momentum_buffer")
                grad = p.grad.detach()
                buffers[p] = (
                    grad.clone()
                    if buffer is None
                    else torch.add(buffer * group["momentum"], grad, alpha=1.0 - group["momentum_damp"])
                )
        return buffers

    # ------------------------------------------------------------------ the summary
    def _next_batch(self) -> tuple[Any, Any]:
        """The next ``(x, target)`` of ``hg_loader``, restarting it when exhausted."""
        for _ in range(2):
            if self._iterator is None:
                self._iterator = iter(self.hg_loader)
                self._passes += 1
                skip, self._position = self._position, 0
                for _ in range(skip):  # resuming: the batches the saved run had read
                    if next(self._iterator, None) is None:
                        break
                    self._position += 1
            batch = next(self._iterator, None)
            if batch is not None:
                self._position += 1
                break
            if self._position == 0:
                hint = (
                    " (a generator can be read once: pass a DataLoader or a list)" if self._passes > 1 else ""
                )
                raise DataError(f"hg_loader yielded no batch on its pass {self._passes}{hint}")
            self._iterator, self._position = None, 0
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise DataError(f"hg_loader must yield (x, target) pairs, got {type(batch).__name__}")
        reference = self.param_groups[0]["params"][0]
        x, target = batch
        if isinstance(x, Tensor):
            dtype = reference.dtype if x.is_floating_point() else x.dtype
            x = x.to(device=reference.device, dtype=dtype)
        if isinstance(target, Tensor):
            target = target.to(device=reference.device)
        return x, target

    def _summary(self, buffers: dict[Tensor, Tensor]) -> SummaryResult:
        """``g_bar``, ``H_bar`` and ``D3`` of ``full_loss`` on the next batch, along the new momentum."""
        x, target = self._next_batch()
        leaves = [p for group in self.param_groups for p in group["params"]]
        directions: list[list[Tensor | None]] = []
        for group in self.param_groups:
            members = {id(p) for p in group["params"]}
            directions.append([buffers.get(p) if id(p) in members else None for p in leaves])
        with torch.enable_grad():
            with CompositeNorms():  # the forward pass only: the graph holds elementary operations
                loss = self.full_loss(x, target)
            if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise ValueError(
                    "full_loss(x, target) must return a scalar tensor computed from the parameters, got "
                    + (f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__)
                    + ("" if not isinstance(loss, Tensor) or loss.requires_grad else " without a graph")
                )
            if not self._checked_partition:
                self._check_partition(loss, leaves)
            warn_if_data_parallel(self)
            g_bar, H_bar, D3 = directional_summary(loss.reshape(()), leaves, directions)
        return SummaryResult(
            "custom",
            [[f"group {s}"] for s in range(len(self.param_groups))],
            "momentum",
            "hessian",
            g_bar.cpu(),
            ((H_bar + H_bar.T) / 2).cpu(),
            D3.cpu(),
            matvecs=len(directions),
            damping_int=self.damping_int,
        )

    def _check_partition(self, loss: Tensor, leaves: list[Tensor]) -> None:
        known = {id(p) for p in leaves}
        outside = [t for t in _loss_leaves(loss) if id(t) not in known]
        if outside:
            shapes = ", ".join(str(tuple(t.shape)) for t in outside[:4]) + (
                ", ..." if len(outside) > 4 else ""
            )
            raise ValueError(
                f"full_loss depends on {len(outside)} parameter tensor(s) outside the partition (shapes "
                f"{shapes}): each parameter the loss is differentiated for must be in exactly one subset"
            )
        self._checked_partition = True

    def _new_learning_rates(self, buffers: dict[Tensor, Tensor], rates: list[float]) -> SummaryStep:
        """The summary along ``buffers`` and the learning rates it gives (``rates``, the groups' current
        ones, where it cannot give any: a warning says why); nothing is changed."""
        summary = self._summary(buffers)
        cubic, kept = None, ""
        bad = [
            name
            for name, value in (("g_bar", summary.g_bar), ("H_bar", summary.H_bar), ("D3", summary.D3))
            if not bool(torch.isfinite(value).all())
        ]
        if bad:
            kept = f"the summary's {' and '.join(bad)} not finite"
        else:
            try:
                cubic = summary.learning_rates(on_unbounded="stationary")
            except UnboundedModelError as error:
                kept = str(error)
        if kept:
            warnings.warn(
                f"NewtonSummary: learning rates kept at step {self._steps}: {kept}",
                CurvkitWarning,
                stacklevel=4,  # _new_learning_rates, step, torch.optim's step wrapper, the caller
            )
            new = tuple(rates)
        else:
            assert cubic is not None
            averaged = []
            for group, rate, eta in zip(self.param_groups, rates, cubic.eta.tolist()):
                eta = max(0.0, eta) if self.remove_negative else eta
                r = group["mom_lrs"] if self._has_lrs else 0.0  # not applied to the first rates
                averaged.append(r * rate + (1.0 - r) * group["damping"] * eta)
            new = tuple(averaged)
        return SummaryStep(self._steps, summary, cubic, new, kept)

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Any]:
        """The schedule: steps, whether rates were set, how far ``hg_loader`` was read."""
        return {
            "steps": self._steps,
            "has_lrs": self._has_lrs,
            "hg_position": self._position,
            "hg_passes": self._passes,
            "summaries": self.summaries,
            "checked_partition": self._checked_partition,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restores the schedule; the next summary reads the batch the saved run would have."""
        self._steps = int(state["steps"])
        self._has_lrs = bool(state["has_lrs"])
        self._position = int(state["hg_position"])
        self._passes = max(0, int(state["hg_passes"]) - 1)  # the current pass is started again
        self.summaries = int(state["summaries"])
        self._checked_partition = bool(state["checked_partition"])
        self._iterator = None
