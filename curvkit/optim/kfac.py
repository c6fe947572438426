"""``KFAC`` and ``EKFAC``: natural-gradient steps preconditioned by Kronecker-factored curvature.

Both optimizers take the model and its loss (``model=``, ``loss_fn=``) and are
given each mini-batch, ``optimizer.step(batch=(x, y))``. A step ``t``:

1. **Gradient** ``g``: the parameters' ``.grad`` when the user's backward set any
   (a parameter whose ``.grad`` is ``None`` then counts as a zero gradient and is
   not moved, as :class:`torch.optim.SGD` does); when *every* ``.grad`` is
   ``None``, the mini-batch's gradient from :meth:`curvkit.Problem.loss_and_gradient`
   (the model in evaluation mode when ``eval_mode``, as the curvature is).
2. **Factors.** The registered estimator (``curvkit.curvature("kfac", problem,
   **estimator_options)``, or ``"ekfac"``) gives each layer's factors ``A_t``
   (inputs) and ``B_t`` (output gradients) on the batch's
   :class:`curvkit.Problem`; their running averages, kept by the core's
   :class:`curvkit.RunningCurvature` (attribute ``running``; ``epsilon =
   factor_decay``; the first step's factors start them)

   .. math:: \\bar A \\leftarrow \\epsilon \\bar A + (1 - \\epsilon) A_t, \\qquad
             \\bar B \\leftarrow \\epsilon \\bar B + (1 - \\epsilon) B_t.

3. **Inverse**, every ``inv_update_freq`` steps (``T``): the averaged factors are
   frozen and eigendecomposed, ``bar A = Q_A diag(a) Q_A^T``, ``bar B = Q_B diag(b)
   Q_B^T`` (also when the set of blocks or parameters changed). Between refreshes
   that eigendecomposition is reused (only the damping may change, which costs no
   new eigendecomposition).
4. **Preconditioning** with the damped inverse of the frozen
   :class:`curvkit.KroneckerOperator` (:meth:`curvkit.KroneckerOperator.inverse`:
   Tikhonov damping of every block, exact in the eigenbasis),

   .. math:: v = (K + \\lambda I)^{-1} g, \\qquad
             (B \\otimes A + \\lambda I)^{-1} = (Q_B \\otimes Q_A)\\,
             \\mathrm{diag}\\Big(\\frac{1}{b_i a_j + \\lambda}\\Big)\\,(Q_B \\otimes Q_A)^T.

   Parameters in no Kronecker block (a module type without a KFAC layer rule, a
   layer run twice per forward pass) have a zero curvature there, so they get the
   plain damped gradient step ``v = g / lambda``. The estimator's option
   ``unsupported`` defaults to ``"skip"`` here (``"error"`` refuses such models).
5. **KL clipping** (J. Ba, R. Grosse and J. Martens, "Distributed second-order
   optimization using Kronecker-factored approximations", ICLR 2017; as in
   kfac-pytorch): ``v <- nu v`` with

   .. math:: \\nu = \\min\\Big(1, \\sqrt{\\frac{\\kappa}
             {\\sum_{\\text{groups}} \\eta^2\\, g^T v}}\\Big),

   ``kappa = kl_clip`` and ``eta`` each group's ``lr``: the step's squared length in
   the preconditioner's metric, ``eta^2 v^T (K + lambda I) v``, is at most ``kappa``.
6. **Momentum and weight decay**, as :class:`torch.optim.SGD` applies them to the
   preconditioned gradient (kfac-pytorch's order): ``d = v + w theta``, ``m <- mu m
   + d`` (``m = d`` at the first step), ``theta <- theta - eta m``; the update goes
   through :meth:`CurvatureOptimizer.apply_updates` (never NaN).
7. **Damping** (``adapt_damping``): every ``adapt_every`` steps the
   Levenberg-Marquardt rule of J. Martens and R. Grosse ("Optimizing neural
   networks with Kronecker-factored approximate curvature", ICML 2015, section
   6.5) with the reduction ratio on the batch,

   .. math:: \\rho = \\frac{h(\\theta + \\delta) - h(\\theta)}
             {g^T \\delta + \\tfrac12 \\delta^T (K + \\lambda I) \\delta},

   ``h`` the batch's loss (evaluated before and after the update: two forward
   passes), ``delta`` the update applied, ``K`` the Kronecker operator the step used:
   ``lambda <- omega lambda`` if ``rho > 3/4``, ``lambda <- lambda / omega`` if
   ``rho < 1/4``, ``omega = (19/20)^adapt_every``, kept in ``[1e-8, 1e8]``. Martens
   and Grosse's quadratic model uses the exact Fisher; this one uses the operator
   the step was preconditioned with, so it costs no product over the data. A
   model that predicts no decrease (``g^T delta + ... >= 0``, possible with
   momentum) leaves ``lambda`` unchanged. Martens and Grosse's separate factored
   Tikhonov damping ``gamma`` is not used: one ``lambda`` damps the whole block
   exactly.

**EKFAC** (T. George, C. Laurent, X. Bouthillier, N. Ballas and P. Vincent, "Fast
approximate natural gradient descent in a Kronecker-factored eigenbasis", NeurIPS
2018) keeps the eigenbasis ``Q = Q_B (x) Q_A`` of the frozen averaged factors and
replaces the eigenvalues ``b_i a_j`` by a running average of the ``ekfac``
estimator's scalings ``s_t``, every step:

.. math:: \\bar s \\leftarrow \\epsilon \\bar s + (1 - \\epsilon)\\,
          \\mathrm{diag}\\big(Q^T Q_t\\, \\mathrm{diag}(s_t)\\, Q_t^T Q\\big),

the batch's EKFAC block ``Q_t diag(s_t) Q_t^T`` seen in the frozen basis (the
estimator computes ``s_t`` in the eigenbasis ``Q_t`` of the batch's own factors;
with ``R_A = Q_A^T Q_{A,t}``, ``R_B = Q_B^T Q_{B,t}`` the projection is ``(R_B o
R_B) S_t (R_A o R_A)^T``, no data). At a refresh, ``bar s`` is carried into the new
eigenbasis the same way. Where the bases agree (``factor_decay=0``,
``inv_update_freq=1``) this is exactly the batch's EKFAC; George et al. instead
project the batch's per-sample gradients onto the frozen basis, which the
estimator does not expose. Between refreshes EKFAC's preconditioner changes with
``bar s``; the eigenbasis does not.

**Cost per step.** One estimator pass over the batch (forward and backward with
the layers' inputs and output gradients captured; EKFAC: a second pass for its
scalings, and an eigendecomposition of the batch's own factors, which the
estimator needs for them, every step whatever ``T``), one Kronecker-factored
product for the preconditioning, the eigendecompositions every ``T`` steps, and
two forward passes every ``adapt_every`` steps for the damping.

**State.** ``state_dict()`` holds the momentum buffers (per parameter), the
running averages (``running.state_dict()``), the frozen factors (their eigendecomposition is recomputed
after ``load_state_dict``, deterministically), the current damping, the step
count and the Monte-Carlo seed (``fisher_type="mc"`` draws with ``seed + step``),
so training resumes bit-identically.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.errors import CurvkitError
from curvkit.kronecker import KroneckerBlock, KroneckerOperator
from curvkit.layout import ParameterLayout
from curvkit.operator import CurvatureOperator
from curvkit.optim.base import (
    CurvatureOptimizer,
    check_entries,
    check_estimator_options,
    check_fraction,
    check_integer,
    check_learning_rate,
    check_model_and_loss,
    check_positive,
    check_seed,
    levenberg_marquardt,
    loss_at,
    unpack_batch,
)
from curvkit.problem import Problem
from curvkit.registry import curvature, get_estimator
from curvkit.registry import estimator_options as estimator_options_of
from curvkit.running import Parts, RunningCurvature, kronecker_key, parts_finite

__all__ = ["DAMPING_RANGE", "EKFAC", "KFAC"]

_UNCHANGED = "parameters, factors and momentum unchanged"

DAMPING_RANGE = (1e-8, 1e8)
"""The range :class:`KFAC`'s Levenberg-Marquardt rule keeps the damping in."""


def _check_damping(value: Any, *, adapted: bool) -> float:
    """``value`` as a float if it is a damping ``> 0``, within :data:`DAMPING_RANGE` if ``adapted``.

    The Levenberg-Marquardt rule keeps the damping in the range, so an adapted
    damping outside it would be moved into it at the first adaptation, whatever
    the step's quality.

    Raises:
        ValueError: Naming the range.
    """
    damping = check_positive("damping", value)
    low, high = DAMPING_RANGE
    if adapted and not low <= damping <= high:
        raise ValueError(
            f"damping must be in [{low:g}, {high:g}] with adapt_damping=True (the range the adaptation keeps "
            f"it in), got {value!r}"
        )
    return damping


def _check_kl_clip(value: Any) -> float | None:
    """``None`` (no clipping) or a finite number ``> 0``."""
    return None if value is None else check_positive("kl_clip", value)


class KFAC(CurvatureOptimizer):
    """K-FAC: the gradient preconditioned by damped, averaged Kronecker factors (see the module docstring).

    J. Martens and R. Grosse, "Optimizing neural networks with Kronecker-factored
    approximate curvature", ICML 2015; KL clipping from J. Ba, R. Grosse and J.
    Martens, "Distributed second-order optimization using Kronecker-factored
    approximations", ICLR 2017.

    Args:
        params: Parameters or parameter groups of ``model`` (groups may set ``lr``,
            ``momentum`` and ``weight_decay``).
        model: The network.
        loss_fn: Its loss, as :class:`curvkit.Problem` takes it (``"cross_entropy"``,
            ``"mse"``, a loss module, ...).
        lr: Learning rate ``eta``.
        damping: Initial Tikhonov damping ``lambda > 0``; with ``adapt_damping``, in
            :data:`DAMPING_RANGE`.
        factor_decay: ``epsilon`` in ``[0, 1)``, the running averages' decay (0: the
            current batch's factors alone).
        inv_update_freq: ``T``: the eigendecompositions are refreshed every ``T`` steps.
        adapt_damping: Adapt ``lambda`` by the Levenberg-Marquardt rule.
        adapt_every: Steps between two adaptations (Martens and Grosse's ``T_1``).
        kl_clip: ``kappa > 0``, or ``None`` for no KL clipping.
        momentum: ``mu`` in ``[0, 1)``.
        weight_decay: ``w >= 0``, added to the preconditioned gradient.
        eval_mode: Whether the curvature (and a gradient this optimizer computes,
            when no ``.grad`` is set) is that of the model in evaluation mode
            (default: dropout off, BatchNorm with its running statistics, which the
            step does not update). A model in training mode with BatchNorm or
            dropout layers whose gradient the step computes is warned about once
            (:class:`curvkit.CurvkitWarning`; ``model.eval()`` silences it); a
            ``.grad`` from your own backward pass is your model's mode's. See
            docs/optimizers.md, "BatchNorm and dropout".
        **estimator_options: Options of the ``kfac`` estimator (``fisher_type``,
            ``mc_samples``, ``seed``, ``approx``, ``fold_bias``, ``unsupported``
            (default here ``"skip"``), ``max_factor_bytes``).

    Raises:
        ValueError: A hyper-parameter out of range (an adapted ``damping`` outside
            :data:`DAMPING_RANGE`), no model or loss, or a keyword neither KFAC nor
            the estimator takes (a misspelt hyper-parameter: the message lists what each takes,
            :func:`curvkit.optim.base.check_estimator_options`).

    Attributes:
        damping: The current ``lambda``.
        steps: Steps taken (skipped ones not counted).
        last_reduction_ratio: ``rho`` of the last adaptation (``None`` before one,
            ``nan`` when the model predicted no decrease).

    Example:
        >>> import torch
        >>> from curvkit.optim.kfac import KFAC
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> X, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> optimizer = KFAC(model.parameters(), model=model, loss_fn="cross_entropy", lr=0.3, kl_clip=1e-2)
        >>> first = torch.nn.functional.cross_entropy(model(X), y).item()
        >>> for _ in range(20):
        ...     optimizer.zero_grad()
        ...     torch.nn.functional.cross_entropy(model(X), y).backward()
        ...     _ = optimizer.step(batch=(X, y))
        >>> torch.nn.functional.cross_entropy(model(X), y).item() < 0.9 * first
        True
    """

    GLOBAL = (
        "damping",
        "factor_decay",
        "inv_update_freq",
        "adapt_damping",
        "adapt_every",
        "kl_clip",
        "eval_mode",
    )
    """The constructor's settings of the whole optimizer; the estimator's options are added per instance."""
    GROUP_CHECKS = {
        "lr": check_learning_rate,
        "momentum": functools.partial(check_fraction, below_one=True),
        "weight_decay": functools.partial(check_positive, zero=True),
    }

    ESTIMATOR = "kfac"
    """The registered estimator whose factors precondition."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        model: nn.Module,
        loss_fn: Any,
        lr: float = 0.1,
        damping: float = 1e-3,
        factor_decay: float = 0.95,
        inv_update_freq: int = 10,
        adapt_damping: bool = True,
        adapt_every: int = 5,
        kl_clip: float | None = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eval_mode: bool = True,
        **estimator_options: Any,
    ) -> None:
        check_model_and_loss(type(self).__name__, model, loss_fn)
        if not isinstance(adapt_damping, bool):
            raise ValueError(f"adapt_damping must be True or False, got {adapt_damping!r}")
        self.adapt_damping = adapt_damping
        self.damping = _check_damping(damping, adapted=adapt_damping)
        self.factor_decay = check_fraction("factor_decay", factor_decay, below_one=True)
        self.inv_update_freq = check_integer("inv_update_freq", inv_update_freq)
        self.adapt_every = check_integer("adapt_every", adapt_every)
        self.kl_clip = _check_kl_clip(kl_clip)
        options = dict(estimator_options)
        seed = options.pop("seed", None)
        if seed is not None:
            seed = check_seed("seed", seed)
        spec = get_estimator(self.ESTIMATOR)
        try:
            check_estimator_options(type(self), spec, {**options, "seed": 0})
        except CurvkitError as exc:
            raise ValueError(str(exc)) from exc
        options.setdefault("unsupported", "skip")
        self.estimator_options = options
        self.GLOBAL = (*type(self).GLOBAL, *(estimator_options_of(spec) or ()))  # for the whole optimizer
        self.steps = 0
        self.last_reduction_ratio: float | None = None
        self._seed = int(torch.Generator().seed()) % 2**62 if seed is None else seed
        self.running = RunningCurvature(self.ESTIMATOR, decay=self.factor_decay)
        self._frozen: Parts = {}
        self._scalings: dict[str, Tensor] = {}
        self._frozen_op: KroneckerOperator | None = None  # a cache of _frozen with its eigenbases
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(params, defaults, model=model, loss_fn=loss_fn, eval_mode=eval_mode)

    # ------------------------------------------------------------------ the step
    def step(
        self, closure: Callable[[], Tensor] | None = None, *, batch: tuple[Any, Any] | None = None
    ) -> Tensor | None:
        """One step on the mini-batch ``batch = (inputs, targets)`` (see the module docstring).

        Args:
            closure: Optional; re-evaluates the loss (and may set ``.grad``) first.
            batch: The mini-batch whose factors (and, without ``.grad``, gradient)
                the step uses.

        Returns:
            The closure's loss; without a closure, the batch's loss when this step
            computed the gradient, else ``None``.

        Raises:
            ValueError: No batch.
        """
        loss = self.evaluate(closure)
        with self.full_precision():
            inputs, targets = unpack_batch(type(self).__name__, batch)
            problem = self.batch_problem(inputs, targets)
            layout = problem.layout
            members = self._members(layout)

            batch_loss: Tensor | None = None
            if any(p.grad is not None for _, p, _ in members):
                parts: list[Tensor] = [
                    torch.zeros(s, dtype=problem.dtype, device=problem.device) for s in layout.shapes
                ]
                for _, p, i in members:
                    if p.grad is not None:
                        parts[i] = p.grad.detach()
                gradient = layout.flatten(parts)
                members = [m for m in members if m[1].grad is not None]
            else:
                self.warn_if_trained_in_eval_mode()
                batch_loss, gradient = problem.loss_and_gradient()
            if not bool(torch.isfinite(gradient).all()):
                self.skip("the gradient is not finite", unchanged=_UNCHANGED)
                return loss if closure is not None else batch_loss

            kron = self._batch_kronecker(problem)
            factors = _factors_only(kron)
            average = self.running.fold(factors)
            if not parts_finite(average):
                self.skip("the Kronecker factors are not finite", unchanged=_UNCHANGED)
                return loss if closure is not None else batch_loss
            refresh = (
                self.steps % self.inv_update_freq == 0
                or not self._frozen
                or set(average) != set(self._frozen)
                or self.running.layout != layout
            )
            # the previous eigenbases: used between refreshes, and to carry EKFAC's scalings over one
            old_frozen_op = self._frozen_operator() if not refresh or self._scalings else None
            if refresh:
                frozen = dict(average)
                frozen_op = self.running.operator(frozen, like=factors)
                assert isinstance(frozen_op, KroneckerOperator)
                for block in frozen_op.blocks:
                    block.eig()
            else:
                assert old_frozen_op is not None
                frozen, frozen_op = self._frozen, old_frozen_op
            scalings = self._fold_scalings(kron, frozen_op, old_frozen_op if refresh else None)
            used = self._with_scalings(frozen_op, scalings)
            try:
                inverse = used.inverse(self.damping)
            except CurvkitError as exc:
                self.skip(f"the damped curvature cannot be inverted ({exc})", unchanged=_UNCHANGED)
                return loss if closure is not None else batch_loss
            v = layout.unflatten(inverse @ gradient)
            g = layout.unflatten(gradient)

            nu = 1.0
            if self.kl_clip is not None:
                vg = sum(
                    group["lr"] ** 2 * torch.dot(v[i].reshape(-1), g[i].reshape(-1))
                    for group, _, i in members
                )
                vg = abs(float(vg)) if members else 0.0
                if vg > 0:
                    nu = min(1.0, math.sqrt(self.kl_clip / vg))

            adapt = self.adapt_damping and (self.steps + 1) % self.adapt_every == 0
            before = None
            if adapt:
                before = batch_loss if batch_loss is not None else loss_at(problem)

            updates, buffers = [], {}
            with torch.no_grad():
                for group, p, i in members:
                    d = v[i] * nu if nu != 1.0 else v[i]
                    if group["weight_decay"]:
                        d = d + group["weight_decay"] * p.detach()
                    mu = group["momentum"]
                    if mu:
                        old = self.state[p].get("momentum_buffer")
                        d = d.clone() if old is None else mu * old + d
                        buffers[p] = d
                    updates.append((p, -group["lr"] * d))
            if not self.apply_updates(updates, what=f"{type(self).__name__} update"):
                return loss if closure is not None else batch_loss

            # the step is taken: commit its state
            for p, buffer in buffers.items():
                self.state[p]["momentum_buffer"] = buffer
            self.running.commit(average, factors)
            self._frozen, self._scalings, self._frozen_op = frozen, scalings, frozen_op
            self.steps += 1
            if before is not None:  # the Levenberg-Marquardt rule is due
                deltas = [torch.zeros(s, dtype=problem.dtype, device=problem.device) for s in layout.shapes]
                for (_, _, i), (_, delta) in zip(members, updates):
                    deltas[i] = delta
                self._adapt(problem, before, gradient, layout.flatten(deltas), used)
            return loss if closure is not None else batch_loss

    def _members(self, layout: ParameterLayout) -> list[tuple[dict[str, Any], Tensor, int]]:
        """``(group, parameter, index in the layout)`` of every optimized parameter in ``layout``.

        ``layout`` is a batch problem's: the optimized parameters that are not frozen.
        """
        index = {name: i for i, name in enumerate(layout.names)}
        mine = [(group, p) for group in self.param_groups for p in group["params"]]
        return [
            (group, p, index[name]) for (group, p), name in zip(mine, self.parameter_names()) if name in index
        ]

    # ------------------------------------------------------------------ factors
    def _batch_kronecker(self, problem: Problem) -> KroneckerOperator:
        """The estimator's Kronecker operator on the batch (seeded ``seed + step`` for Monte-Carlo)."""
        op = curvature(self.ESTIMATOR, problem, **self.estimator_options, seed=self._seed + self.steps)
        structured = op.structured()
        if not isinstance(structured, KroneckerOperator):
            raise CurvkitError(
                f"estimator {self.ESTIMATOR!r} returned {type(op).__name__}, holding no Kronecker factors "
                f"(its structured() form is a {type(structured).__name__})"
            )
        return structured

    def _fold_scalings(
        self, kron: KroneckerOperator, frozen_op: KroneckerOperator, previous: KroneckerOperator | None
    ) -> dict[str, Tensor]:
        """EKFAC's running average of the scalings in the frozen eigenbasis (KFAC: none)."""
        return {}

    def _with_scalings(self, op: KroneckerOperator, scalings: dict[str, Tensor]) -> KroneckerOperator:
        """The operator whose damped inverse preconditions (KFAC: the frozen one itself)."""
        return op

    def _frozen_operator(self) -> KroneckerOperator | None:
        """The frozen factors as an operator, their eigendecompositions cached (rebuilt after loading)."""
        if self._frozen_op is None and self._frozen and self.running.layout is not None:
            frozen = self.running.operator(self._frozen)
            assert isinstance(frozen, KroneckerOperator)
            self._frozen_op = frozen
            for block in self._frozen_op.blocks:
                block.eig()
        return self._frozen_op

    # ------------------------------------------------------------------ damping
    def _adapt(
        self, problem: Problem, before: Tensor, gradient: Tensor, delta: Tensor, used: KroneckerOperator
    ) -> None:
        """Martens and Grosse's (2015, section 6.5) Levenberg-Marquardt rule for ``lambda``."""
        after = float(loss_at(problem))
        predicted = float(
            torch.dot(gradient, delta)
            + 0.5 * torch.dot(delta, used @ delta)
            + 0.5 * self.damping * delta.square().sum()
        )
        if not predicted < 0:
            self.last_reduction_ratio = math.nan
            return
        rho = (after - float(before)) / predicted if math.isfinite(after) else -math.inf
        self.last_reduction_ratio = rho
        omega = (19 / 20) ** self.adapt_every
        self.damping = levenberg_marquardt(
            self.damping, rho, lower=0.25, upper=0.75, factor=omega, bounds=DAMPING_RANGE
        )

    # ------------------------------------------------------------------ inspection
    def averaged_factors(self) -> KroneckerOperator | None:
        """The running averages ``bar B (x) bar A`` as a :class:`curvkit.KroneckerOperator`.

        ``None`` before the first step.
        """
        average = self.running.operator()
        assert average is None or isinstance(average, KroneckerOperator)
        return average

    def kronecker(self) -> KroneckerOperator | None:
        """The curvature the last step preconditioned with (``None`` before a step).

        KFAC: the averaged factors frozen at the last refresh. EKFAC: their
        eigenbasis with the averaged scalings.
        """
        frozen = self._frozen_operator()
        return None if frozen is None else self._with_scalings(frozen, self._scalings)

    def preconditioner(self) -> CurvatureOperator | None:
        """``(K + lambda I)^-1`` for :meth:`kronecker` ``K`` and the current damping.

        ``None`` before the first step.
        """
        K = self.kronecker()
        return None if K is None else K.inverse(self.damping)

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Any]:
        """The step count, damping, seed, the running factors, the frozen ones (and EKFAC's scalings)."""
        return {
            "steps": self.steps,
            "damping": self.damping,
            "seed": self._seed,
            "last_reduction_ratio": self.last_reduction_ratio,
            "running": self.running.state_dict(),
            "frozen": {key: dict(part) for key, part in self._frozen.items()},
            "scalings": dict(self._scalings),
        }

    def check_extra_state(self, state: dict[str, Any]) -> None:
        """Refuses extra state that lacks an entry of :meth:`extra_state` or has an invalid damping.

        Raises:
            ValueError: Naming what is missing or invalid.
        """
        check_entries(
            type(self).__name__, state, ("steps", "damping", "seed", "running", "frozen", "scalings")
        )
        _check_damping(state["damping"], adapted=self.adapt_damping)
        check_seed("seed", state["seed"])
        check_integer("steps", state["steps"], minimum=0)

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restores :meth:`extra_state` (the frozen eigendecompositions are recomputed when needed)."""
        self.steps = int(state["steps"])
        self.damping = float(state["damping"])
        self._seed = int(state["seed"])
        ratio = state.get("last_reduction_ratio")
        self.last_reduction_ratio = None if ratio is None else float(ratio)
        # a state saved on another device, or for the model before a cast (model.double()), comes here:
        # the factors follow the parameters, as torch.optim casts its per-parameter state
        first = self.param_groups[0]["params"][0]
        device, dtype = first.device, first.dtype
        self.running.load_state_dict(state["running"])
        self.running.to(device, dtype)

        def cast(value: Any) -> Any:
            if not isinstance(value, Tensor):
                return value
            return value.to(device, dtype if value.is_floating_point() else None, copy=True)

        self._frozen = {
            key: {name: cast(v) for name, v in part.items()} for key, part in state["frozen"].items()
        }
        self._scalings = {key: cast(s) for key, s in state["scalings"].items()}
        self._frozen_op = None


class EKFAC(KFAC):
    """EKFAC: KFAC's frozen eigenbasis with running averages of the eigenvalue-corrected scalings.

    T. George, C. Laurent, X. Bouthillier, N. Ballas and P. Vincent, "Fast
    approximate natural gradient descent in a Kronecker-factored eigenbasis",
    NeurIPS 2018. Takes :class:`KFAC`'s arguments (the options of the ``ekfac``
    estimator are those of ``kfac``; ``fisher_type="forward-only"`` is refused by
    it); ``factor_decay`` averages both the factors and the scalings. See the
    module docstring for how the batch's scalings enter the frozen eigenbasis.
    """

    ESTIMATOR = "ekfac"

    def _fold_scalings(
        self, kron: KroneckerOperator, frozen_op: KroneckerOperator, previous: KroneckerOperator | None
    ) -> dict[str, Tensor]:
        eps = self.factor_decay
        layout = frozen_op.layout
        target = {kronecker_key(block, layout): block for block in frozen_op.blocks}
        before = {} if previous is None else {kronecker_key(b, previous.layout): b for b in previous.blocks}
        scalings: dict[str, Tensor] = {}
        for block in kron.blocks:
            key = kronecker_key(block, layout)
            new = _project(block.eigenvalues(), block, target[key]).to(block.A.dtype)
            old = self._scalings.get(key)
            if old is not None and key in before:  # a refresh: carried into the new eigenbasis
                old = _project(old.to(torch.float64), before[key], target[key]).to(old.dtype)
            scalings[key] = new if old is None or old.shape != new.shape else eps * old + (1 - eps) * new
        return scalings

    def _with_scalings(self, op: KroneckerOperator, scalings: dict[str, Tensor]) -> KroneckerOperator:
        layout = op.layout
        blocks = [replace(b, scalings=scalings[kronecker_key(b, layout)]) for b in op.blocks]
        return KroneckerOperator(layout, blocks, dtype=op.dtype, device=op.device)


def _factors_only(op: KroneckerOperator) -> KroneckerOperator:
    """``op``'s Kronecker factors, without eigenvalue corrections: what the running average keeps."""
    if all(block.scalings is None for block in op.blocks):
        return op
    blocks = [KroneckerBlock(b.weight, b.bias, b.A, b.B, name=b.name) for b in op.blocks]
    return KroneckerOperator(op.layout, blocks, dtype=op.dtype, device=op.device)


def _project(values: Tensor, source: KroneckerBlock, target: KroneckerBlock) -> Tensor:
    """``diag(Q^T Q_s diag(values) Q_s^T Q)`` for the eigenbases ``Q_s`` of ``source``, ``Q`` of ``target``.

    With ``R_A = Q_A^T Q_{A,s}`` and ``R_B = Q_B^T Q_{B,s}`` (``Q = Q_B (x) Q_A``):
    ``[g, o, k]`` values ``(R_B o R_B) S (R_A o R_A)^T``, float64.
    """
    if source is target:
        return values.to(torch.float64)
    _, QA, _, QB = target.eig()
    _, QA_s, _, QB_s = source.eig()
    RA = torch.einsum("gki,gkj->gij", QA, QA_s).square()
    RB = torch.einsum("goi,goj->gij", QB, QB_s).square()
    return torch.einsum("gip,gpq,gjq->gij", RB, values.to(torch.float64), RA)
