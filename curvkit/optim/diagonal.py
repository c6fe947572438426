r"""Diagonal second-order optimizers from Hutchinson probes: ``DiagonalNewton``, ``AdaHessian``, ``SophiaH``.

All three precondition the gradient by an estimate of the Hessian's diagonal,
obtained with Hutchinson's estimator (M. F. Hutchinson, "A stochastic
estimator of the trace of the influence matrix for Laplacian smoothing
splines", 1989; C. Bekas, E. Kokiopoulou and Y. Saad, "An estimator for the
diagonal of a matrix", 2007): for Rademacher probes ``z`` (entries ``+-1``
with probability 1/2 each),

.. math::

    \mathbb{E}[z \odot (H z)] = \operatorname{diag}(H), \qquad
    (z \odot H z)_i = H_{ii} + \sum_{j \ne i} H_{ij} z_i z_j ,

so the estimate is exact, whatever the probe, when ``H`` is diagonal.

**Hessian-vector products on the current batch, without another forward pass.**
As in the peers (torch-optimizer's ``Adahessian``, pytorch-optimizer's
``AdaHessian`` and ``SophiaH``), the user differentiates the loss with its
graph, ``loss.backward(create_graph=True)``; :meth:`step` then takes
``H z = d/dtheta <grad, z>`` through that graph with curvkit's core primitive
:func:`curvkit.autodiff.backward_product` (one backward pass per probe), and
afterwards detaches every ``p.grad`` in place (a gradient that is a view:
replaces it by its detached value), which frees the graph (and breaks the
parameter/gradient reference cycle torch warns about); the gradients keep
their values, so gradient clipping or logging may follow.
``step(closure)`` accepts a closure that does it all::

    def closure():
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward(create_graph=True)
        return loss

    optimizer.step(closure)

The diagonal is refreshed every ``update_each`` (``update_period``) steps only,
from the first (and at any step where a parameter with a gradient has not been
estimated yet); :attr:`HutchinsonOptimizer.hessian_due` says whether the next
step refreshes it, so that the other steps may use a plain ``loss.backward()``::

    loss.backward(create_graph=optimizer.hessian_due)

A refresh without any gradient graph raises a one-line :class:`ValueError`. A parameter whose
gradient has no graph while others have one (its loss term is linear in it) has
a zero Hessian row: its estimate is zero. (A loss linear in every parameter has
no gradient graph even with ``create_graph=True``, and so raises as well.)

**Reproducible probes.** The probes come from a :class:`torch.Generator` on the
parameters' device, seeded by ``seed``; its state is in :meth:`state_dict`
(:meth:`~HutchinsonOptimizer.extra_state`), so that a run resumed from a state
dict draws the probes the original run would have drawn and continues
bit-identically.

**Never NaN parameters.** A step whose gradient or Hutchinson estimate is not
finite is skipped with a :class:`curvkit.CurvkitWarning`: parameters, moments,
estimates and step count unchanged. The generator is not: on a step that
estimates the diagonal, the probes are drawn before anything is checked, so
after any skipped step of that kind (a non-finite gradient included) a retried
step draws new ones. Every update goes
through :meth:`~curvkit.optim.base.CurvatureOptimizer.apply_updates`, which
checks the gradients, estimates, new moments and updates at once and skips the
step (with the warning) if any is not finite; the new moments are kept only
with the step. What is finite whenever the rest is does not enter the one fused
check (:meth:`HutchinsonOptimizer._implied`): inputs a moving average carries
into the new moments, and SophiaH's clipped update without weight decay (at
most ``lr`` per entry for finite moments); it is still checked to name the
culprit of a skipped step.

A parameter without a gradient (``.grad`` is ``None``) is left alone, as
``torch.optim`` does: no estimate, no moment update, no step.

Example: the diagonal quadratic ``1/2 sum_i d_i x_i^2 - sum_i x_i`` is solved in
one Newton step, since its Hutchinson estimate is exact:

>>> import torch
>>> from curvkit.optim.diagonal import DiagonalNewton
>>> x = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
>>> d = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
>>> optimizer = DiagonalNewton([x], lr=1.0, damping=1e-12, clip=None)
>>> loss = 0.5 * (d * x**2).sum() - x.sum()
>>> loss.backward(create_graph=True)
>>> optimizer.step()
>>> x.detach()
tensor([1.0000, 0.5000, 0.2500], dtype=torch.float64)
>>> x.grad.requires_grad  # the graph was freed
False
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from curvkit.autodiff import backward_product, backward_products
from curvkit.errors import CurvkitWarning
from curvkit.finite import first_non_finite
from curvkit.optim import fused
from curvkit.optim.base import (
    CurvatureOptimizer,
    check_betas,
    check_entries,
    check_flag,
    check_fraction,
    check_integer,
    check_learning_rate,
    check_positive,
    check_seed,
    optional,
    warn_if_data_parallel,
)

__all__ = [
    "ESTIMATE",
    "GRADIENT",
    "UPDATE",
    "AdaHessian",
    "DiagonalNewton",
    "HutchinsonOptimizer",
    "SophiaH",
    "rademacher",
]


def rademacher(shape: Sequence[int], like: Tensor, generator: torch.Generator) -> Tensor:
    """Rademacher probes (entries ``+-1``, probability 1/2 each) of ``like``'s dtype, drawn by ``generator``.

    They are drawn on the generator's device and moved to ``like``'s.

    >>> generator = torch.Generator().manual_seed(0)
    >>> z = rademacher((2, 3), torch.zeros(3), generator)
    >>> z.shape, sorted(set(z.flatten().tolist())) <= [-1.0, 1.0]
    (torch.Size([2, 3]), True)
    """
    bits = torch.randint(0, 2, tuple(shape), generator=generator, device=generator.device, dtype=like.dtype)
    return torch.add(_MINUS_ONE, bits, alpha=2).to(like.device)  # 2 b - 1 in one operation


_MINUS_ONE = torch.tensor(-1.0, dtype=torch.float32)
"""A 0-d CPU tensor: an operand of any device's and floating dtype's arithmetic (exact in all of them)."""


def _spatial_average(estimate: Tensor) -> Tensor:
    """A convolution kernel's ``|estimate|`` averaged over its positions (dims 2, 3), broadcast back."""
    return estimate.abs().mean(dim=(2, 3), keepdim=True).expand_as(estimate)


def _entries(states: list[dict[str, Any]], params: list[Tensor], key: str) -> list[Tensor]:
    """Each parameter's ``state[key]``, or zeros like it where it has none yet (not stored)."""
    entries = []
    for state, p in zip(states, params):  # no comprehension: HutchinsonOptimizer._step says why
        entries.append(state[key] if key in state else torch.zeros_like(p))
    return entries


_HALF_MAX = torch.finfo(torch.float16).max
"""The largest float16: a number at most this is a number of every dtype parameters are trained in
(float64, float32, bfloat16, float16)."""


def _positive_floor(floor: float, like: list[Tensor]) -> float | list[float]:
    """``floor``, raised to the smallest normal number of each tensor's dtype where it is smaller.

    A floor that rounds to zero in the dtype (SophiaH's default ``eps / rho =
    2.5e-11`` in float16) would let ``0 / 0`` through. One number when every
    tensor's dtype keeps ``floor``, else one per tensor.
    """
    if all(floor >= _SMALLEST_NORMAL.get(t.dtype, 0.0) for t in like):
        return floor
    return [max(floor, _SMALLEST_NORMAL.get(t.dtype, 0.0)) for t in like]


_SMALLEST_NORMAL = {
    dtype: torch.finfo(dtype).tiny for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
}
"""Per floating dtype, its smallest normal number (``torch.finfo`` is slow to ask per step)."""


GRADIENT = "gradient"
ESTIMATE = "Hutchinson estimate of the Hessian's diagonal"
UPDATE = "update"
"""The names of a step's inputs and updates in its finiteness check (and in the warning of a skipped step)."""


class HutchinsonOptimizer(CurvatureOptimizer):
    """The machinery of :class:`DiagonalNewton`, :class:`AdaHessian` and :class:`SophiaH` (module docstring).

    The step: evaluate the closure; skip with a warning if a gradient is not
    finite; on a refresh step (every ``period`` steps, from the first), draw the
    probes, take their Hessian products through the gradients' graph and form the
    Hutchinson estimate ``mean_k z_k * (H z_k)`` per parameter (skip with a warning
    if it is not finite); hand each parameter's gradient and estimate (``None``
    between refreshes) to the subclass's :meth:`_update`, apply the updates; free
    the graph.

    Args:
        params: Parameters or parameter groups.
        defaults: Per-group hyper-parameters (checked by the subclass's :attr:`GROUP_CHECKS`).
        period: Steps between two estimates of the diagonal (``>= 1``).
        probes: Probes per estimate (``>= 1``), averaged.
        seed: Seed of the probes' generator (an integer in ``[0, 2**63)``).

    Attributes:
        steps: Steps taken (skipped ones excluded).
        refreshes: Estimates of the diagonal computed.
        generator: The probes' :class:`torch.Generator`, on the first parameter's device.
        skipped_steps: Steps skipped because the gradient, the estimate or the update was not finite.
    """

    CARRIED_BY_STATE: ClassVar[frozenset[str]] = frozenset()
    """The inputs (:data:`GRADIENT`, :data:`ESTIMATE`) a subclass's new state carries: every entry of
    them enters a tensor of the new state through arithmetic that keeps a non-finite value non-finite
    (a moving average of weight ``> 0``, or the estimate kept as it is), so that the step's one check
    of its new state and updates checks them too (:func:`curvkit.finite.first_non_finite`'s
    ``implied``); they are checked on their own only to name the culprit of a skipped step."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        period: int,
        probes: int,
        seed: int,
    ) -> None:
        self.period = check_integer("update period", period)
        self.probes = check_integer("probes", probes)
        self.seed = check_seed("seed", seed)
        self.steps = 0
        self.refreshes = 0
        super().__init__(params, defaults)
        device = self.param_groups[0]["params"][0].device
        self.generator = torch.Generator(device=device).manual_seed(self.seed)

    # ------------------------------------------------------------------ the step
    @property
    def hessian_due(self) -> bool:
        """Whether the next :meth:`step` estimates the diagonal, and so needs ``backward(create_graph=True)``.

        It does every ``period`` steps from the first, and whenever a parameter
        that requires grad has not been estimated yet (so a parameter that never
        gets a gradient keeps this ``True``: leave it out of the optimizer).
        """
        return self.steps % self.period == 0 or any(
            p.requires_grad and not self.state.get(p, {}).get("hessian_step", 0)
            for group in self.param_groups
            for p in group["params"]
        )

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One step (see the module docstring); the closure's loss if one is given.

        Args:
            closure: Optional: zeroes the gradients, computes the loss, calls
                ``loss.backward(create_graph=True)`` and returns the loss.

        Raises:
            ValueError: The diagonal is due but no gradient has a graph (the loss
                was differentiated without ``create_graph=True``).
        """
        loss = None if closure is None else self.evaluate(closure)
        # plain loops rather than comprehensions, here and in the rest of the step: see _step
        groups: list[tuple[dict[str, Any], list[Tensor]]] = []
        params: list[Tensor] = []
        grads: list[Tensor] = []
        for group in self.param_groups:
            members = []
            for p in group["params"]:
                g = p.grad
                if g is not None:
                    members.append(p)
                    grads.append(g)
            if members:
                groups.append((group, members))
                params += members
        try:
            if params:
                self._step(groups, params, grads)
        finally:
            for p, g in zip(params, grads):  # frees the graph of the gradients
                if g.requires_grad and p.grad is g:
                    if g._is_view():  # which cannot be detached in place
                        p.grad = g.detach()
                    else:  # as torch.optim's zero_grad(set_to_none=False) does, without a new tensor
                        g.detach_()
        return loss

    def _step(
        self,
        groups: list[tuple[dict[str, Any], list[Tensor]]],
        params: list[Tensor],
        grads: list[Tensor],
    ) -> None:
        """The step on the parameters with a gradient: new state and updates computed aside, then kept.

        Everything (gradients, estimates, new state, updates) is checked at once
        by :meth:`~curvkit.optim.base.CurvatureOptimizer.apply_updates`; the new
        state is kept only if the updates were applied.

        On a small model the step's Python costs as much as its arithmetic, and
        it costs more than the same code run in a loop: after the forward and
        backward passes, the step's code is out of the processor's caches. Each
        comprehension (a function of its own in Python 3.11) and generator adds
        to that, so the step and this method use plain loops: measured on the
        MLP of ``benchmarks/``, the comprehensions they replaced cost 1.5% of a
        whole training step (3.5 of 230 microseconds).

        Args:
            groups: Each parameter group with its parameters that have a gradient (none empty).
            params: Those parameters, group after group.
            grads: Their gradients, with their graph where there is one (the update is computed
                without autograd's record, so it records none).
        """
        states = []
        due = self.steps % self.period == 0  # on schedule, or a parameter has no estimate yet
        for p in params:
            state = self.state[p]
            states.append(state)
            if not state.get("hessian_step", 0):
                due = True
        estimates = self._hutchinson(params, grads) if due else None
        recording = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)  # torch.no_grad's switch, without its context (base._apply_checked)
        try:
            kept = []
            deltas: list[Tensor] = []
            scales: list[float] = []
            checks = [(GRADIENT, grads)]
            if estimates is not None:
                checks.append((ESTIMATE, estimates))
            taking_part = []
            start = 0
            for group, members in groups:
                taking_part.append(group)
                stop = start + len(members)
                group_states = states[start:stop]
                new, group_deltas, scale = self._updates(
                    group,
                    members,
                    group_states,
                    grads[start:stop],
                    None if estimates is None else estimates[start:stop],
                )
                kept.append((group_states, new))
                # state the step leaves as it was (the diagonal between refreshes) is not in new: checked
                for values in new.values():
                    if isinstance(values[0], Tensor):
                        checks.append(("new state", values))
                deltas += group_deltas
                scales += [scale] * len(members)
                start = stop
            applied = self._apply_checked(
                params,
                deltas,
                UPDATE,
                checks,
                implied=self._implied(taking_part),
                scales=scales,
                unchanged="parameters and moments unchanged",
                stacklevel=5,  # _apply_checked, _step, step, torch.optim's step wrapper, the caller
            )
        finally:
            torch._C._set_grad_enabled(recording)
        if not applied:
            return
        for group_states, new in kept:
            for key, values in new.items():
                for state, value in zip(group_states, values):
                    state[key] = value
        if due:
            for state in states:
                state["hessian_step"] = state.get("hessian_step", 0) + 1
        self.refreshes += int(due)
        self.steps += 1

    def _implied(self, groups: list[dict[str, Any]]) -> frozenset[str]:
        """The step's checks that are finite whenever the others are (``apply_updates``'s ``implied``).

        Args:
            groups: The parameter groups that take part in the step.

        Returns:
            :attr:`CARRIED_BY_STATE`; a subclass whose updates are bounded adds :data:`UPDATE`.
        """
        return self.CARRIED_BY_STATE

    def _hutchinson(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """Per parameter, ``mean_k z_k * (H z_k)`` over ``probes`` Rademacher probes."""
        if not any(g.requires_grad for g in grads):
            raise ValueError(
                f"{type(self).__name__} needs the gradient's graph for its Hessian-vector products: call "
                "loss.backward(create_graph=True) before step(), or pass step() a closure that does"
            )
        warn_if_data_parallel(self)
        V = self._probes(params)
        if self.probes == 1:  # one direction, without the probes' dim (fewer views per step)
            return torch._foreach_mul(V, backward_product(grads, params, V))
        HV = backward_products(grads, params, V, batched=False)
        return [(z * hz).mean(0) for z, hz in zip(V, HV)]

    def _probes(self, params: list[Tensor]) -> list[Tensor]:
        """Per parameter, its ``[probes, *shape]`` Rademacher probes (one probe: its shape), from one draw.

        Probe ``k`` is the ``k``-th row of one ``[probes, P]`` draw (``P`` entries
        in all), in the order of ``params``: with one probe, the same numbers as
        one draw per parameter in turn.
        """
        sizes = [p.numel() for p in params]
        lead = () if self.probes == 1 else (self.probes,)
        flat = rademacher((*lead, sum(sizes)), params[0], self.generator)
        if lead:
            probes = [z.reshape(*lead, *p.shape) for z, p in zip(flat.split(sizes, dim=-1), params)]
        else:  # the views DDP cuts from its flat buffers, in one call (2 us per view made in Python)
            probes = list(torch._C._nn.unflatten_dense_tensors(flat, params))
        dtype, device = flat.dtype, flat.device
        if all(p.dtype == dtype and p.device == device for p in params):  # the usual case: no copies
            return probes
        return [z.to(device=p.device, dtype=p.dtype) for z, p in zip(probes, params)]

    def _updates(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        states: list[dict[str, Any]],
        grads: list[Tensor],
        estimates: list[Tensor] | None,
    ) -> tuple[dict[str, list[Any]], list[Tensor], float]:
        """One group's new state and steps, computed aside (``self.state`` is not changed).

        Args:
            group: The parameter group.
            params: Its parameters with a gradient.
            states: Their states (read, not changed).
            grads: Their gradients (detached).
            estimates: Their Hutchinson estimates on a refresh step, else ``None``.

        Returns:
            The state entries the step changes, to keep if it is applied: per
            key, one value per parameter (an entry the step leaves as it is, such
            as the diagonal between refreshes, is left out); per parameter, its
            step ``delta``; both fused (``torch._foreach_*``) over the group. Then
            the group's ``scale``: ``p += scale * delta``, applied by the fused
            addition (:meth:`~curvkit.optim.base.CurvatureOptimizer.apply_updates`'s
            ``scales``), which checks ``delta`` before scaling; so a scale other
            than 1 only where ``scale * delta`` is finite whenever ``delta`` is
            (a bounded delta).
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ state
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`, refusing per-parameter state that is not finite.

        A step checks only the state it makes (state it keeps, such as the
        diagonal between refreshes, was checked when made), and SophiaH's
        update relies on its moments being finite (:meth:`SophiaH._implied`); so
        loaded state is checked once here.

        Raises:
            ValueError: A state dict not written by this kind of optimizer, or a
                non-finite entry in its per-parameter state.
        """
        why = first_non_finite(
            [
                (f"{key!r} of parameter {index}", [value])
                for index, entries in state_dict.get("state", {}).items()
                for key, value in entries.items()
                if isinstance(value, Tensor)
            ]
        )
        if why is not None:
            raise ValueError(f"{type(self).__name__}: the state dict's {why} is not finite")
        super().load_state_dict(state_dict)

    def extra_state(self) -> dict[str, Any]:
        """The schedule and the probes' generator (its state and device)."""
        return {
            "steps": self.steps,
            "refreshes": self.refreshes,
            "seed": self.seed,
            "generator_state": self.generator.get_state(),
            "generator_device": str(self.generator.device),
        }

    def check_extra_state(self, state: dict[str, Any]) -> None:
        """Refuses extra state without the schedule, the seed or a generator state this generator takes.

        Raises:
            ValueError: Naming what is missing or invalid.
        """
        name = type(self).__name__
        check_entries(name, state, ("steps", "refreshes", "seed", "generator_state", "generator_device"))
        check_integer("steps", state["steps"], minimum=0)
        check_integer("refreshes", state["refreshes"], minimum=0)
        check_seed("seed", state["seed"])
        try:
            saved = torch.device(state["generator_device"])
        except (RuntimeError, TypeError):
            raise ValueError(
                f"not a {name} state_dict: generator_device {state['generator_device']!r} is not a device"
            ) from None
        generator_state, mine = state["generator_state"], self.generator.get_state()
        restorable = (
            isinstance(generator_state, Tensor)
            and generator_state.dtype == mine.dtype
            and generator_state.shape == mine.shape
        )
        if saved.type == self.generator.device.type and not restorable:
            raise ValueError(
                f"not a {name} state_dict: its generator_state is not a {saved.type} generator's"
            )

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restores the schedule and the probes' generator (checked by :meth:`check_extra_state`).

        A generator saved on another kind of device cannot be restored: the
        generator is then seeded with ``seed + steps`` and a
        :class:`curvkit.CurvkitWarning` says that the probes differ from the saved run's.
        """
        self.steps = int(state["steps"])
        self.refreshes = int(state["refreshes"])
        self.seed = int(state["seed"])
        saved = torch.device(state["generator_device"])
        if saved.type == self.generator.device.type:
            self.generator.set_state(state["generator_state"].cpu())
        else:
            self.generator.manual_seed(self.seed + self.steps)
            warnings.warn(
                f"{type(self).__name__}: the probes' generator was saved on {saved.type} and cannot be "
                f"restored on {self.generator.device.type}: reseeded, the probes differ from the saved run's",
                CurvkitWarning,
                stacklevel=3,
            )


class DiagonalNewton(HutchinsonOptimizer):
    r"""Newton's method with a diagonal Hessian estimated by Hutchinson probes (Becker and LeCun, 1989).

    S. Becker and Y. LeCun ("Improving the convergence of back-propagation
    learning with second order methods", Proceedings of the 1988 Connectionist
    Models Summer School, 1989) step each weight by its gradient over its
    (absolute, damped) diagonal curvature, ``-eps g_i / (|h_ii| + mu)``. Here
    ``h`` is the Hutchinson estimate ``d = mean_k z_k * (H z_k)`` over ``probes``
    Rademacher probes, refreshed every ``update_each`` steps (kept in between),
    and the step of parameter entry ``i`` is

    .. math::

        \Delta\theta_i = -\operatorname{clamp}\Big(
            \frac{\mathrm{lr}\, g_i}{|d_i|^{k} + \mathrm{damping}}, -\mathrm{clip}, \mathrm{clip}\Big),

    with ``k = hessian_power``; equivalently, the denominator is clipped from
    below: ``lr g_i / max(|d_i|^k + damping, lr |g_i| / clip)``. ``clip=None``
    leaves the step unclipped. On a quadratic with diagonal Hessian, ``lr=1``,
    ``k=1`` and a negligible damping, one step reaches the minimiser; the clip is
    the trust region that keeps a single noisy, nearly zero estimate ``d_i`` (one
    probe: ``d_i = H_ii + sum_{j != i} H_ij z_i z_j``) from making a huge step.

    Args:
        params: Parameters or parameter groups (which may override ``lr``,
            ``damping``, ``clip`` and ``hessian_power``).
        lr: Step size (``> 0``).
        damping: ``mu``, added to ``|d|^k`` (``> 0``).
        clip: Largest step per entry (``> 0``), or ``None``.
        hessian_power: ``k``, in ``[0, 1]`` (``0``: gradient descent with step ``lr / (1 + damping)``).
        probes: Rademacher probes per estimate (``>= 1``).
        update_each: Steps between estimates (``>= 1``).
        seed: Seed of the probes' generator.

    State per parameter: ``"diagonal"``, the last estimate ``d``, and ``"hessian_step"``,
    the estimates it received.

    Raises:
        ValueError: An invalid hyper-parameter.
    """

    GLOBAL = ("probes", "update_each", "seed")
    GROUP_CHECKS = {
        "lr": check_learning_rate,
        "damping": check_positive,
        "clip": optional(check_positive),
        "hessian_power": check_fraction,
    }
    CARRIED_BY_STATE = frozenset({ESTIMATE})  # the new diagonal is the estimate; no moment of the gradient

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        damping: float = 1e-4,
        clip: float | None = 0.1,
        hessian_power: float = 1.0,
        probes: int = 1,
        update_each: int = 1,
        seed: int = 0,
    ) -> None:
        check_integer("update_each", update_each)
        defaults = {"lr": lr, "damping": damping, "clip": clip, "hessian_power": hessian_power}
        super().__init__(params, defaults, period=update_each, probes=probes, seed=seed)

    def _updates(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        states: list[dict[str, Any]],
        grads: list[Tensor],
        estimates: list[Tensor] | None,
    ) -> tuple[dict[str, list[Any]], list[Tensor], float]:
        diagonals = estimates if estimates is not None else [state["diagonal"] for state in states]
        denominators = torch._foreach_abs(diagonals)
        if group["hessian_power"] != 1.0:
            torch._foreach_pow_(denominators, group["hessian_power"])
        fused.add_(denominators, group["damping"])
        steps = torch._foreach_div(grads, denominators)
        fused.scale_(steps, -group["lr"])
        if group["clip"] is not None:
            torch._foreach_clamp_min_(steps, -group["clip"])
            torch._foreach_clamp_max_(steps, group["clip"])
        new = {} if estimates is None else {"diagonal": estimates}
        return new, steps, 1.0  # clipped after scaling: scaled here


class AdaHessian(HutchinsonOptimizer):
    r"""AdaHessian (Z. Yao, A. Gholami, S. Shen, M. Mustafa, K. Keutzer and M. W. Mahoney, AAAI 2021).

    "ADAHESSIAN: An adaptive second order optimizer for machine learning": Adam
    with the squared gradient replaced by the squared Hutchinson diagonal. With
    ``g_t`` the gradient and ``D_t = z * (H z)`` (one Rademacher probe),

    * **spatial averaging** (``spatial_averaging``; 4-d parameters, convolution
      kernels ``[out, in, kh, kw]``): ``D_t`` is replaced by the mean of
      ``|D_t|`` over the kernel's positions (dims 2 and 3), broadcast back, as
      the authors' implementation does;
    * ``m_t = beta1 m_{t-1} + (1 - beta1) g_t``, every step;
    * ``v <- beta2 v + (1 - beta2) D^2`` when the diagonal is refreshed (every
      ``update_each`` steps; ``n`` refreshes so far), unchanged in between;
    * ``theta <- theta - lr lambda theta - lr (m_t / (1 - beta1^t)) /
      ((v / (1 - beta2^n))^{k/2} + eps)``, with ``k = hessian_power`` and the
      decoupled (AdamW-style) weight decay ``lambda``.

    ``t`` and ``n`` are counted per parameter (steps in which it had a gradient),
    so the bias corrections stay right for a parameter that sometimes has none.
    With ``update_each=1`` this is the paper's Algorithm 1; with more, the second
    moment is a moving average of the estimates it receives (as Sophia's).

    Args:
        params: Parameters or parameter groups (which may override every
            hyper-parameter but ``update_each`` and ``seed``).
        lr: Step size (``> 0``).
        betas: ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: Added to the denominator (``> 0``).
        weight_decay: Decoupled weight decay ``lambda`` (``>= 0``).
        hessian_power: ``k``, in ``[0, 1]``.
        update_each: Steps between estimates of the diagonal (``>= 1``).
        spatial_averaging: Average over the kernel positions of 4-d parameters.
        seed: Seed of the probes' generator.

    State per parameter: ``"step"`` (``t``), ``"hessian_step"`` (``n``),
    ``"exp_avg"`` (``m``) and ``"exp_hessian_diag_sq"`` (``v``).

    Raises:
        ValueError: An invalid hyper-parameter.
    """

    GLOBAL = ("update_each", "seed")
    GROUP_CHECKS = {
        "lr": check_learning_rate,
        "betas": check_betas,
        "eps": check_positive,
        "weight_decay": functools.partial(check_positive, zero=True),
        "hessian_power": check_fraction,
        "spatial_averaging": check_flag,
    }
    # m and v are moving averages (weights 1 - beta > 0) of g and of the squared (averaged) estimate
    CARRIED_BY_STATE = frozenset({GRADIENT, ESTIMATE})

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        update_each: int = 1,
        spatial_averaging: bool = True,
        seed: int = 0,
    ) -> None:
        check_integer("update_each", update_each)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "hessian_power": hessian_power,
            "spatial_averaging": spatial_averaging,
        }
        super().__init__(params, defaults, period=update_each, probes=1, seed=seed)

    def _updates(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        states: list[dict[str, Any]],
        grads: list[Tensor],
        estimates: list[Tensor] | None,
    ) -> tuple[dict[str, list[Any]], list[Tensor], float]:
        beta1, beta2 = group["betas"]
        t = [state.get("step", 0) + 1 for state in states]
        n = [state.get("hessian_step", 0) + (estimates is not None) for state in states]
        exp_avg = fused.lerp(_entries(states, params, "exp_avg"), grads, 1.0 - beta1)
        exp_hessian_diag_sq = _entries(states, params, "exp_hessian_diag_sq")
        if estimates is not None:
            if group["spatial_averaging"]:
                estimates = [_spatial_average(e) if e.dim() == 4 else e for e in estimates]
            squares = torch._foreach_mul(estimates, estimates)
            exp_hessian_diag_sq = fused.lerp(exp_hessian_diag_sq, squares, 1.0 - beta2)
        # with c = (1 - beta2^n)^(k/2): m / ((v / (1 - beta2^n))^(k/2) + eps) = c m / (v^(k/2) + c eps),
        # which folds the second bias correction into the two scalings (one operation fewer); the
        # momentum is scaled first, as m / (v^(k/2) + c eps) alone can be 1/c times the step (float16)
        power = group["hessian_power"] / 2
        corrections = [(1.0 - beta2**k) ** power for k in n]
        if power == 0.5:
            denominators = torch._foreach_sqrt(exp_hessian_diag_sq)
        else:
            denominators = torch._foreach_pow(exp_hessian_diag_sq, power)
        fused.add_(denominators, [group["eps"] * c for c in corrections])
        steps = fused.multiply(exp_avg, [-group["lr"] * c / (1.0 - beta1**k) for c, k in zip(corrections, t)])
        torch._foreach_div_(steps, denominators)
        if group["weight_decay"]:
            torch._foreach_add_(steps, params, alpha=-group["lr"] * group["weight_decay"])
        new = {"step": t, "exp_avg": exp_avg}
        if estimates is not None:
            new["exp_hessian_diag_sq"] = exp_hessian_diag_sq
        return new, steps, 1.0  # m / (sqrt(v) + eps) is not bounded: checked after scaling


class _Floored(NamedTuple):
    """A parameter group's denominators ``max(h, floor)`` in :class:`SophiaH`, and what made them."""

    hessian: list[Tensor]
    versions: list[int]
    floor: float
    denominators: list[Tensor]


class SophiaH(HutchinsonOptimizer):
    r"""Sophia with the Hutchinson estimator (H. Liu, Z. Li, D. Hall, P. Liang and T. Ma, 2023).

    "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
    Pre-training" (arXiv 2305.14342), Algorithm 3 with the Hutchinson estimator
    ``h_hat = z * (H z)`` (one Rademacher probe). With ``g_t`` the gradient,
    ``k = update_period`` and ``gamma = rho``, at step ``t = 1, 2, ...``:

    * ``m_t = beta1 m_{t-1} + (1 - beta1) g_t``;
    * if ``t mod k = 1``: ``h_t = beta2 h_{t-k} + (1 - beta2) h_hat_t``; else ``h_t = h_{t-1}``
      (``h_0 = 0``);
    * ``theta <- theta - lr lambda theta`` (decoupled weight decay);
    * ``theta <- theta - lr clip(m_t / max(gamma h_t, eps), 1)``, with
      ``clip(x, 1) = max(min(x, 1), -1)`` element-wise.

    No bias correction, as in the paper. Every entry moves by at most ``lr``
    (plus the weight decay); where the curvature estimate is negative, zero or
    small, the step is ``lr`` times the sign of the momentum. The first version
    of the paper (and pytorch-optimizer's ``SophiaH``, with ``p`` for ``rho``)
    wrote ``theta <- theta - lr' clip(m_t / max(h_t, eps'), rho')``; since
    ``clip(x, rho') = rho' clip(x / rho', 1)``, that is this update with
    ``lr = lr' rho'``, ``gamma = rho'`` and ``eps = rho' eps'``.

    Args:
        params: Parameters or parameter groups (which may override every
            hyper-parameter but ``update_period`` and ``seed``).
        lr: Step size, the largest change of an entry per step (``> 0``).
        betas: ``(beta1, beta2)``, each in ``[0, 1)``.
        weight_decay: Decoupled weight decay ``lambda`` (``>= 0``).
        eps: Floor of the denominator ``gamma h`` (``> 0``).
        rho: ``gamma``, the scale of the curvature in the denominator (``> 0``).
        update_period: ``k``, steps between estimates of the diagonal (``>= 1``).
        seed: Seed of the probes' generator.

    State per parameter: ``"exp_avg"`` (``m``), ``"hessian"`` (``h``) and
    ``"hessian_step"``, the estimates it received.

    Raises:
        ValueError: An invalid hyper-parameter.
    """

    GLOBAL = ("update_period", "seed")
    GROUP_CHECKS = {
        "lr": check_learning_rate,
        "betas": check_betas,
        "weight_decay": functools.partial(check_positive, zero=True),
        "eps": check_positive,
        "rho": check_positive,
    }
    CARRIED_BY_STATE = frozenset({GRADIENT, ESTIMATE})  # m and h: moving averages of g and the estimate
    _CARRIED_AND_UPDATE = CARRIED_BY_STATE | {UPDATE}

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 6e-2,
        betas: tuple[float, float] = (0.96, 0.99),
        weight_decay: float = 0.0,
        eps: float = 1e-12,
        rho: float = 0.04,
        update_period: int = 10,
        seed: int = 0,
    ) -> None:
        check_integer("update_period", update_period)
        defaults = {"lr": lr, "betas": betas, "weight_decay": weight_decay, "eps": eps, "rho": rho}
        super().__init__(params, defaults, period=update_period, probes=1, seed=seed)
        self._floored: dict[int, _Floored] = {}
        """Per parameter group (by ``id``), its last denominators (:meth:`_denominators`)."""

    def _updates(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        states: list[dict[str, Any]],
        grads: list[Tensor],
        estimates: list[Tensor] | None,
    ) -> tuple[dict[str, list[Any]], list[Tensor], float]:
        beta1, beta2 = group["betas"]
        exp_avg = torch._foreach_lerp(_entries(states, params, "exp_avg"), grads, 1.0 - beta1)
        hessian = _entries(states, params, "hessian")
        if estimates is not None:
            hessian = torch._foreach_lerp(hessian, estimates, 1.0 - beta2)
        # lr clip(m / max(rho h, eps), 1) = (lr / rho) clip(m / max(h, eps / rho), rho): one product fewer
        rho = group["rho"]
        steps = torch._foreach_div(exp_avg, self._denominators(group, params, hessian, group["eps"] / rho))
        torch._foreach_clamp_min_(steps, -rho)
        torch._foreach_clamp_max_(steps, rho)
        if group["weight_decay"]:  # lr wd theta = (lr / rho) rho wd theta
            torch._foreach_add_(steps, params, alpha=rho * group["weight_decay"])
        new = {"exp_avg": exp_avg} if estimates is None else {"exp_avg": exp_avg, "hessian": hessian}
        # |delta| <= rho (plus rho wd |theta|): scaled by lr / rho, it is finite whenever delta is
        if self._scaled_in_addition(group):
            return new, steps, -group["lr"] / rho
        # lr / rho or lr may be no float16 number (it would overflow): the paper's order, lr clip(x / rho, 1),
        # and the update is checked (_implied)
        torch._foreach_div_(steps, rho)
        fused.scale_(steps, -group["lr"])
        return new, steps, 1.0

    def _denominators(
        self, group: dict[str, Any], params: list[Tensor], hessian: list[Tensor], floor: float
    ) -> list[Tensor]:
        """``max(h, floor)`` per parameter (the floor raised as :func:`_positive_floor` says), kept between
        refreshes.

        ``h`` changes only when the diagonal is refreshed, so the denominators
        of the group's last step are used again, as long as they were computed
        from the same tensors ``h`` (the same objects, not changed in place
        since: their ``_version``) and the same ``floor``; else they are computed
        and kept (:attr:`_floored`). One operation fewer per step between
        refreshes, for one tensor the size of the group's parameters.
        """
        key = id(group)
        kept = self._floored.get(key)
        if kept is not None and kept.floor == floor and len(kept.hessian) == len(hessian):
            for h, then, version in zip(hessian, kept.hessian, kept.versions):
                if h is not then or h._version != version:
                    break
            else:
                return kept.denominators
        denominators = torch._foreach_clamp_min(hessian, _positive_floor(floor, params))
        self._floored[key] = _Floored(hessian, [h._version for h in hessian], floor, denominators)
        return denominators

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """:meth:`HutchinsonOptimizer.load_state_dict`; the denominators kept for the old state dropped."""
        super().load_state_dict(state_dict)
        self._floored.clear()

    def _implied(self, groups: list[dict[str, Any]]) -> frozenset[str]:
        """Without weight decay, also the update: every entry moves by at most ``lr``, finite with ``m, h``.

        The step ``(lr / rho) clip(m / max(h, eps / rho), rho)`` is finite
        whenever ``m`` and ``h`` are (the floor, ``eps / rho`` but at least the
        dtype's smallest normal number, :func:`_positive_floor`, keeps the
        quotient from being NaN; an infinite one is clipped), and ``m`` (new)
        and ``h`` (new, checked when made, or checked when loaded) are checked. Weight decay adds
        ``lr wd theta``, which is checked with the update, since a parameter set
        to an infinite value by hand would make it infinite; so is a step whose
        ``lr / rho`` or ``lr`` exceeds the largest float16 (formed in another
        order by :meth:`_updates`): an entry of the update reaches ``lr``, which
        a half dtype may not hold.
        """
        for group in groups:
            if group["weight_decay"] or not self._scaled_in_addition(group):
                return self.CARRIED_BY_STATE
        return self._CARRIED_AND_UPDATE

    @staticmethod
    def _scaled_in_addition(group: dict[str, Any]) -> bool:
        """Whether the group's ``lr / rho`` and ``lr`` are numbers of every floating dtype (at most the
        largest float16), so that :meth:`_updates` leaves ``lr / rho`` to the fused addition's ``alpha``
        and the update, whose entries reach ``lr``, is finite whenever the moments are."""
        return abs(group["lr"] / group["rho"]) <= _HALF_MAX and abs(group["lr"]) <= _HALF_MAX
