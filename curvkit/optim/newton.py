"""``Newton``: Newton's method on the mini-batch, with the dense Hessian (exact, damped or saddle-free).

Each step takes the mini-batch ``(x, y)`` given to :meth:`Newton.step`, its loss
``f`` (the mean over the batch's loss terms, as :class:`curvkit.Problem`
normalises it), the gradient ``g`` and the dense ``P x P`` Hessian ``H`` of
``f`` (``curvkit.curvature("hessian", problem).to_dense()``, the registered
estimator's products with basis vectors), its eigendecomposition
``H = Q diag(lambda) Q^T``, and steps

.. math::

    \\theta \\leftarrow \\theta + \\eta\\, d, \\qquad
    d = -Q \\operatorname{diag}(\\mu)^{-1} Q^\\top g
      = -M^{-1} g, \\qquad M = Q \\operatorname{diag}(\\mu) Q^\\top,

with the learning rate ``eta`` (``lr``, per parameter group) and ``mu`` by ``mode``:

* ``"exact"``: ``mu = lambda``, Newton's step ``-H^{-1} g`` (``damping`` must be
  0). A Hessian that is not positive definite (a smallest eigenvalue ``<= 0``,
  where the step is no descent direction) or singular to working precision
  (``lambda_min <= P eps lambda_max``) skips the step with a
  :class:`curvkit.CurvkitWarning` naming its eigenvalue range;
* ``"damped"``: ``mu = lambda + damping``, the Levenberg-Marquardt step
  ``-(H + damping I)^{-1} g`` (K. Levenberg 1944, D. W. Marquardt 1963) with a
  fixed ``damping``; skipped, as above, when ``H + damping I`` is not positive
  definite;
* ``"saddle-free"``: ``mu = max(|lambda|, damping)``, the saddle-free Newton
  step ``-|H|^{-1} g`` of Y. Dauphin, R. Pascanu, C. Gulcehre, K. Cho, S. Ganguli
  and Y. Bengio, "Identifying and attacking the saddle point problem in
  high-dimensional non-convex optimization", NeurIPS 2014: along a direction of
  negative curvature it moves downhill (away from a saddle) instead of towards
  the stationary point. Skipped when ``|H|`` is singular (``damping = 0``).

**Trust region.** With ``trust_radius = r``, ``d`` is the exact solution of the
trust-region subproblem of the (positive definite) model ``M``:

.. math::

    d = \\arg\\min_{\\|d\\| \\le r} \\; g^\\top d + \\tfrac12 d^\\top M d
      = -(M + \\sigma I)^{-1} g,

with ``sigma = 0`` when ``||M^{-1} g|| <= r`` and otherwise the ``sigma > 0``
with ``||d|| = r``, found by Newton's iteration on the secular equation
``1/||d(sigma)|| = 1/r`` (J. J. More and D. C. Sorensen, "Computing a trust
region step", SIAM J. Sci. Stat. Comput. 4(3), 1983; J. Nocedal and S. J.
Wright, *Numerical Optimization*, 2nd ed., 2006, Algorithm 4.3), in the
eigenbasis (no factorisation per iteration). It is not a clipping of the step's
norm: the direction bends towards the gradient. The learning rate scales ``d``
afterwards, so the update's norm is at most ``lr * trust_radius`` (with one
``lr`` for every group).

The gradient is that of the batch's problem
(:meth:`curvkit.Problem.loss_and_gradient`), so a training loop needs neither
``zero_grad()`` nor ``backward()``; ``p.grad`` is neither read nor written.
The cost of a step is ``P`` Hessian-vector products (one pass over the batch
with blocks of basis vectors) and an ``O(P^3)`` eigendecomposition, hence
``max_dim``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.errors import CurvkitError
from curvkit.optim.base import (
    CurvatureOptimizer,
    check_choice,
    check_integer,
    check_learning_rate,
    check_positive,
    unpack_batch,
)
from curvkit.optim.base import all_finite as finite
from curvkit.problem import Problem
from curvkit.registry import check_options, curvature, get_estimator

__all__ = ["Newton"]

NEWTON_MODES = ("exact", "damped", "saddle-free")
"""The ``mode`` values of :class:`Newton`."""

DENSE_CURVATURE_OPTIONS: dict[str, dict[str, Any]] = {
    "hessian": {"strategy": "batched-reverse"},
    "ggn": {"strategy": "forward"},
}
""":class:`Newton`'s estimator options when ``curvature_options`` is ``None``: a pinned
way of computing products, the fast one for the ``P`` columns of the dense matrix.
Pinned because ``"auto"`` times its ways and may keep either, so the last bits of a
product, hence of a training run, could change from run to run (and a resumed run
would not be bit-identical)."""


# ---------------------------------------------------------------------- shared helpers
def check_curvature_options(
    name: str, options: Mapping[str, Any] | None, default: Mapping[str, Any]
) -> dict[str, Any]:
    """The options of estimator ``name`` (``default`` for ``None``), checked against its signature.

    Raises:
        ValueError: Not a mapping, an unknown estimator or an option it does not take.
    """
    if options is None:
        options = default
    if not isinstance(options, Mapping):
        raise ValueError(
            f"curvature_options must be a dict of estimator options, got {type(options).__name__}"
        )
    try:
        check_options(get_estimator(name), options)
    except CurvkitError as exc:
        raise ValueError(str(exc)) from None
    return dict(options)


def learning_rates(optimizer: CurvatureOptimizer, problem: Problem) -> Tensor:
    """The flat ``[P]`` vector of each entry's group learning rate, in ``problem.layout`` order."""
    rates = {id(p): float(g["lr"]) for g in optimizer.param_groups for p in g["params"]}
    return problem.layout.flatten(
        [
            torch.full(p.shape, rates[id(p)], dtype=problem.dtype, device=problem.device)
            for p in problem.params
        ]
    )


def updates_of(problem: Problem, delta: Tensor) -> list[tuple[Tensor, Tensor]]:
    """``(parameter, its slice of the flat delta)`` pairs for :meth:`CurvatureOptimizer.apply_updates`."""
    return list(zip(problem.params, problem.layout.unflatten(delta)))


def all_finite(*tensors: Tensor) -> bool:
    """Whether every entry of every tensor is finite (:func:`curvkit.optim.base.all_finite`)."""
    return finite(tensors)


def trust_region_multiplier(c: Tensor, mu: Tensor, radius: float, *, maxiter: int = 100) -> float:
    """``sigma >= 0`` with ``||c / (mu + sigma)|| = radius`` (``0`` if already inside), for ``mu > 0``.

    Newton's iteration on ``1/||s(sigma)|| = 1/radius`` (More and Sorensen 1983),
    which increases monotonically to the root from ``sigma = 0``, in float64.

    Example:
        >>> c, mu = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 1.0])   # ||c / mu|| = 5
        >>> round(trust_region_multiplier(c, mu, 1.0), 12), trust_region_multiplier(c, mu, 6.0)
        (4.0, 0.0)
    """
    c, mu = c.to(torch.float64), mu.to(torch.float64)
    sigma = 0.0
    for _ in range(maxiter):
        shifted = mu + sigma
        s2 = float(((c / shifted) ** 2).sum())
        norm = math.sqrt(s2)
        if norm <= radius * (1 + 1e-13):
            return sigma
        w2 = float((c**2 / shifted**3).sum())
        sigma += (norm / radius - 1.0) * s2 / w2
    return sigma


# ---------------------------------------------------------------------- the optimizer
class Newton(CurvatureOptimizer):
    """Newton's method on each mini-batch with its dense Hessian (see the module docstring).

    Example::

        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        opt = curvkit.optim.Newton(model.parameters(), model=model, loss_fn="cross_entropy",
                                   mode="saddle-free", damping=1e-2, trust_radius=1.0)
        for x, y in loader:
            loss = opt.step(batch=(x, y))   # no zero_grad(), no backward()

    Args:
        params: The parameters (tensors or groups; a group may set only its ``lr``),
            all of them parameters of ``model``.
        model: The network.
        loss_fn: Its loss, as :class:`curvkit.Problem` takes it (``"cross_entropy"``,
            ``"mse"``, a loss module, or ``(outputs, targets) -> mean loss``).
        lr: Learning rate ``eta`` (``> 0``), per group.
        damping: ``>= 0``; must be 0 with ``mode="exact"``; ``H + damping I`` with
            ``"damped"``; the floor of ``|lambda|`` with ``"saddle-free"``.
        mode: ``"exact"``, ``"damped"`` or ``"saddle-free"``.
        max_dim: The largest ``P`` accepted (the dense Hessian has ``P^2`` entries):
            ``P`` counts the optimized parameters that require grad, at
            construction and again at each step (a frozen one is not stepped).
        trust_radius: ``None`` (no trust region) or ``r > 0``: ``d`` solves the
            trust-region subproblem ``||d|| <= r``.
        curvature: The estimator of ``H``: ``"hessian"`` (Newton's method) or
            ``"ggn"`` (Gauss-Newton; with ``"damped"``, Levenberg-Marquardt).
        curvature_options: Its options (default: :data:`DENSE_CURVATURE_OPTIONS`,
            a pinned ``strategy`` for bit-for-bit repeatable products; pass
            ``{"strategy": "reverse"}`` for a model :mod:`torch.func` cannot
            vectorise).
        eval_mode: The step's loss, gradient and Hessian are the model's in
            evaluation mode (default: dropout off, BatchNorm with its running
            statistics, which the step does not update); ``False``: in the model's
            own mode. A model in training mode with BatchNorm or dropout layers is
            warned about once (:class:`curvkit.CurvkitWarning`; ``model.eval()``
            silences it). See docs/optimizers.md, "BatchNorm and dropout".

    Attributes:
        last_info: Of the latest step: ``loss`` (the batch's, before the step),
            ``eigenvalues`` (smallest and largest of the curvature),
            ``step_norm`` (``||d||``), ``multiplier`` (``sigma``, 0 without an
            active trust region), ``skipped``.
        skipped_steps: Steps skipped (non-finite gradient or Hessian, a matrix
            that is not positive definite, a non-finite update).

    Raises:
        ValueError: Invalid hyper-parameters, a missing ``model=``/``loss_fn=``,
            a tensor that is not the model's, or ``P > max_dim`` (naming both).
    """

    GLOBAL = ("damping", "mode", "max_dim", "trust_radius", "curvature", "curvature_options", "eval_mode")
    GROUP_CHECKS = {"lr": check_learning_rate}

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        model: nn.Module,
        loss_fn: Any,
        lr: float = 1.0,
        damping: float = 0.0,
        mode: str = "exact",
        max_dim: int = 5000,
        trust_radius: float | None = None,
        curvature: str = "hessian",
        curvature_options: Mapping[str, Any] | None = None,
        eval_mode: bool = True,
    ) -> None:
        self.mode = check_choice("mode", mode, NEWTON_MODES)
        self.damping = check_positive("damping", damping, zero=True)
        if mode == "exact" and self.damping != 0:
            raise ValueError(
                f"damping must be 0 with mode='exact' (got {damping!r}); use mode='damped' for H + damping I"
            )
        self.max_dim = check_integer("max_dim", max_dim)
        self.trust_radius = None if trust_radius is None else check_positive("trust_radius", trust_radius)
        self.curvature = check_choice("curvature", curvature, ("hessian", "ggn"))
        self.curvature_options = check_curvature_options(
            curvature, curvature_options, DENSE_CURVATURE_OPTIONS[curvature]
        )
        check_learning_rate("lr", lr)
        self.steps = 0
        self.last_info: dict[str, Any] = {}
        super().__init__(params, {"lr": lr}, model=model, loss_fn=loss_fn, eval_mode=eval_mode)
        self.parameter_names()  # refuses a missing model or loss, or a tensor not the model's
        self._check_dim(sum(p.numel() for g in self.param_groups for p in g["params"] if p.requires_grad))

    def _check_dim(self, P: int) -> None:
        """A ValueError if ``P`` trained parameters exceed :attr:`max_dim` (frozen ones are not stepped)."""
        if P > self.max_dim:
            raise ValueError(
                f"Newton needs the dense P x P Hessian: P={P:,} parameters exceeds "
                f"max_dim={self.max_dim:,} (raise max_dim, optimize fewer parameters, or use HessianFree)"
            )

    def step(  # type: ignore[override]
        self, closure: Callable[[], Tensor] | None = None, *, batch: tuple[Any, Tensor] | None = None
    ) -> Tensor | None:
        """One Newton step on the mini-batch ``batch = (inputs, targets)``.

        Args:
            closure: Optional, as in ``torch.optim``: evaluated first (with
                gradients enabled) only for the loss it returns; the step does not
                use it (nor ``p.grad``).
            batch: The mini-batch whose loss, gradient and Hessian make the step.

        Returns:
            The closure's loss if one is given, otherwise the batch's loss before the step.

        Raises:
            ValueError: No ``batch``, or not an ``(inputs, targets)`` pair; more trained
                parameters than ``max_dim`` (some unfrozen since construction).
        """
        closure_loss = self.evaluate(closure)
        with self.full_precision():
            inputs, targets = unpack_batch(type(self).__name__, batch)
            problem = self.batch_problem(inputs, targets)
            self._check_dim(problem.dim)  # parameters unfrozen since construction count now
            self.warn_if_trained_in_eval_mode()
            self.steps += 1
            loss, g = problem.loss_and_gradient()
            self.last_info = {"loss": float(loss), "skipped": True}
            result = closure_loss if closure is not None else loss
            if not all_finite(loss, g):
                self.skip("the batch's loss or gradient is not finite")
                return result
            with torch.enable_grad():
                op = curvature(self.curvature, problem, **self.curvature_options)
                H = op.to_dense(max_dim=self.max_dim)
            if not all_finite(H):
                self.skip(f"the {self.curvature} matrix is not finite")
                return result
            lam, Q = torch.linalg.eigh((H + H.T) / 2)
            self.last_info["eigenvalues"] = (float(lam[0]), float(lam[-1]))
            mu, why = self._inverted_eigenvalues(lam)
            if why:
                self.skip(why)
                return result
            c = Q.T @ g
            sigma = 0.0
            if self.trust_radius is not None:
                sigma = trust_region_multiplier(c, mu, self.trust_radius)
            d = -(Q @ (c / (mu + sigma)))
            self.last_info.update(step_norm=float(d.norm()), multiplier=sigma)
            applied = self.apply_updates(
                updates_of(problem, learning_rates(self, problem) * d), what="Newton step"
            )
            self.last_info["skipped"] = not applied
            return result

    def _inverted_eigenvalues(self, lam: Tensor) -> tuple[Tensor, str]:
        """``mu`` of the mode (the eigenvalues of ``M``), or a reason to skip the step."""
        P = lam.shape[0]
        eps = torch.finfo(lam.dtype).eps
        name = "H" if self.curvature == "hessian" else "G"
        span = f"its eigenvalues span [{float(lam[0]):.3g}, {float(lam[-1]):.3g}]"
        if self.mode == "saddle-free":
            mu = lam.abs().clamp_min(self.damping)
            if float(mu.min()) <= P * eps * float(mu.max()):
                return mu, f"|{name}| is singular to working precision ({span}): set damping > 0"
            return mu, ""
        mu = lam + self.damping
        matrix = name if self.mode == "exact" else f"{name} + {self.damping:g} I"
        if float(mu[0]) <= 0:
            return mu, (
                f"{matrix} is not positive definite ({span}), so the step would not descend: use "
                f"mode='damped' with damping > {-float(lam[0]):.3g} or mode='saddle-free'"
            )
        if float(mu[0]) <= P * eps * float(mu[-1]):
            return (
                mu,
                f"{matrix} is singular to working precision ({span}): use mode='damped' with damping > 0",
            )
        return mu, ""

    def extra_state(self) -> dict[str, Any]:
        """The number of steps taken."""
        return {"steps": self.steps}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restores :meth:`extra_state`."""
        self.steps = int(state.get("steps", 0))
