"""``HessianFree``: Martens' Hessian-free optimisation, CG on the damped Gauss-Newton system of each batch.

J. Martens, "Deep learning via Hessian-free optimization", ICML 2010 (and J.
Martens and I. Sutskever, "Training deep and recurrent networks with
Hessian-free optimization", in *Neural Networks: Tricks of the Trade*, 2012,
for the line search). Each step takes the mini-batch given to
:meth:`HessianFree.step`, its loss ``f``, gradient ``g`` and curvature ``G``
(``curvature="ggn"``: the generalised Gauss-Newton matrix, positive
semi-definite; or ``"hessian"``), matrix-free: only products ``G v`` of the
registered estimator on the batch's :class:`curvkit.Problem`. Then:

1. **CG** (:func:`curvkit.solve`, ``method="cg"``) on the damped system

   .. math:: (G + \\lambda I)\\, d = -g,

   at most ``cg_maxiter`` iterations or a relative residual of ``cg_tol``
   (Martens stops on the relative progress of the quadratic instead; curvkit's
   CG stops on the residual), preconditioned by ``preconditioner="diagonal"``:
   ``(diag(G) + lambda)^alpha`` with ``alpha = preconditioner_exponent`` (Martens
   uses the empirical Fisher's diagonal with ``alpha = 3/4``; here the GGN's
   exact diagonal, which the ``ggn`` estimator computes without products).
   A non-positive curvature ``p^T (H + lambda I) p <= 0`` (the Hessian is
   indefinite) stops CG at its last iterate (truncated CG, still a descent
   direction) and counts as a bad step for the damping (``lambda <- 3/2 lambda``).
2. **Warm start**: CG starts from ``zeta d_prev``, the final CG solution (not
   the backtracked one) of the previous step taken, decayed by ``zeta =
   warm_start_decay`` (0.95, as Martens), kept per parameter in
   ``state[p]["warm_start"]``.
3. **CG backtracking**: the iterates at iterations ``ceil(1.3^j)`` and the last
   are kept (through :func:`curvkit.solve`'s ``callback``); starting from the
   last, the batch loss ``f(theta + eta d_i)`` is evaluated going back while it
   decreases, and the step takes the iterate where it stopped: the lowest loss
   of those evaluated (Martens sec. 4.6).
4. **Levenberg-Marquardt damping**: with the reduction ratio

   .. math::

       \\rho = \\frac{f(\\theta + \\delta) - f(\\theta)}{q(\\delta)}, \\qquad
       q(\\delta) = g^\\top \\delta + \\tfrac12 \\delta^\\top G \\delta

   of the chosen step ``delta = eta d`` (the *undamped* quadratic model, one
   more product), ``lambda <- 3/2 lambda`` if ``rho < 1/4`` (also when ``q >= 0``
   or ``f(theta + delta)`` is not finite) and ``lambda <- 2/3 lambda`` if
   ``rho > 3/4`` (Martens sec. 4.1). ``lambda`` is in the state dict.
5. **Line search** (``line_search=True``, Martens and Sutskever 2012 sec. 8.8):
   the step is scaled by ``alpha = 1, 0.8, 0.8^2, ...`` (at most 20 tries) until
   ``f(theta + alpha delta) <= f(theta) + 10^-2 alpha g^T delta``; if none
   passes, no step is taken (counted in :attr:`~HessianFree.skipped_steps`).

A step whose batch loss after the update would not be finite is skipped (with a
:class:`curvkit.CurvkitWarning`, ``lambda`` increased), as is one whose
gradient is not finite (``lambda`` kept). A skipped step (for these reasons, a
failed line search or a non-finite update) keeps the warm start it would have
replaced: its CG solution is kept only with the step taken. The gradient is
that of the batch's problem, so a training loop needs neither ``zero_grad()``
nor ``backward()``; ``p.grad`` is neither read nor written.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.errors import CurvkitWarning
from curvkit.linalg.solve import SolveResult, solve
from curvkit.operator import CurvatureOperator, DiagonalOperator
from curvkit.optim.base import (
    CurvatureOptimizer,
    check_choice,
    check_entries,
    check_flag,
    check_fraction,
    check_integer,
    check_learning_rate,
    check_positive,
    levenberg_marquardt,
    loss_at,
    unpack_batch,
)
from curvkit.optim.newton import all_finite, check_curvature_options, learning_rates, updates_of
from curvkit.problem import Problem
from curvkit.registry import curvature as curvature_of

__all__ = ["HessianFree", "backtracking_schedule"]

LINE_SEARCH_SLOPE = 1e-2
"""Armijo constant ``c`` of the line search (Martens and Sutskever 2012)."""
LINE_SEARCH_SHRINK = 0.8
"""Factor of the step at each try of the line search."""
LINE_SEARCH_TRIES = 20
"""Tries of the line search before the step is abandoned."""


def backtracking_schedule(maxiter: int, gamma: float = 1.3) -> list[int]:
    """The CG iterations whose iterates CG backtracking keeps: ``ceil(gamma^j) <= maxiter`` (Martens 2010).

    Example:
        >>> backtracking_schedule(30)
        [1, 2, 3, 4, 5, 7, 9, 11, 14, 18, 24]
    """
    kept, j = set(), 0
    while (i := math.ceil(gamma**j)) <= maxiter:
        kept.add(i)
        j += 1
    return sorted(kept)


class HessianFree(CurvatureOptimizer):
    """Hessian-free optimisation (Martens 2010) on each mini-batch (see the module docstring).

    Example::

        model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10))
        opt = curvkit.optim.HessianFree(model.parameters(), model=model, loss_fn="cross_entropy")
        for x, y in loader:
            loss = opt.step(batch=(x, y))   # no zero_grad(), no backward()

    Args:
        params: The parameters (tensors or groups; a group may set only its ``lr``),
            all of them parameters of ``model``.
        model: The network.
        loss_fn: Its loss, as :class:`curvkit.Problem` takes it.
        curvature: ``"ggn"`` (default, positive semi-definite) or ``"hessian"``.
        lr: Learning rate ``eta`` (``> 0``), per group: the step is ``eta d``.
        damping: The initial ``lambda`` (``> 0``; ``>= 0`` without ``adapt_damping``).
        cg_maxiter: CG iterations per step (``>= 1``).
        cg_tol: CG's relative residual target (``> 0``).
        adapt_damping: Adapt ``lambda`` by the reduction ratio.
        backtracking: Choose among the CG iterates by the batch loss.
        warm_start: Start CG from the decayed previous solution.
        warm_start_decay: ``zeta`` in ``[0, 1]``.
        preconditioner: ``None`` or ``"diagonal"`` (needs ``curvature="ggn"``).
        preconditioner_exponent: ``alpha`` in ``[0, 1]`` of the diagonal preconditioner.
        line_search: Armijo backtracking on the chosen step (default: on; without it,
            mini-batches of 64 of the bundled digits MLP diverge at ``lr = 1``, as
            ``tests/test_docs_optimizers.py`` would show).
        curvature_options: Options of the estimator (default ``{"strategy": "reverse"}``:
            plain autograd, pinned, so that products, hence runs and resumed runs,
            are bit-for-bit repeatable; ``"auto"`` times its ways and may keep either).
        eval_mode: The step's loss, gradient and curvature are the model's in
            evaluation mode (default: dropout off, BatchNorm with its running
            statistics, which the step does not update); ``False``: in the model's
            own mode. A model in training mode with BatchNorm or dropout layers is
            warned about once (:class:`curvkit.CurvkitWarning`; ``model.eval()``
            silences it). See docs/optimizers.md, "BatchNorm and dropout".

    Attributes:
        damping: The current ``lambda``.
        last_solve: The :class:`curvkit.SolveResult` of the latest step's CG.
        last_info: Of the latest step: ``loss`` (before), ``loss_after`` (at the
            chosen iterate, before any line search), ``cg_iteration`` (chosen),
            ``cg_iterations``, ``cg_reason`` (why CG stopped, in words),
            ``cg_status`` (the same as a :data:`curvkit.linalg.solve.SOLVE_STATUSES`
            token), ``rho``, ``damping`` (used), ``alpha`` (line search), ``skipped``.
        skipped_steps: Steps skipped.

    Raises:
        ValueError: Invalid hyper-parameters, a missing ``model=``/``loss_fn=``, or a
            tensor that is not the model's.
    """

    GLOBAL = (
        "curvature",
        "damping",
        "cg_maxiter",
        "cg_tol",
        "adapt_damping",
        "backtracking",
        "warm_start",
        "warm_start_decay",
        "preconditioner",
        "preconditioner_exponent",
        "line_search",
        "curvature_options",
        "eval_mode",
    )
    GROUP_CHECKS = {"lr": check_learning_rate}

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        model: nn.Module,
        loss_fn: Any,
        curvature: str = "ggn",
        lr: float = 1.0,
        damping: float = 1.0,
        cg_maxiter: int = 50,
        cg_tol: float = 5e-4,
        adapt_damping: bool = True,
        backtracking: bool = True,
        warm_start: bool = True,
        warm_start_decay: float = 0.95,
        preconditioner: str | None = None,
        preconditioner_exponent: float = 0.75,
        line_search: bool = True,
        curvature_options: Mapping[str, Any] | None = None,
        eval_mode: bool = True,
    ) -> None:
        self.curvature = check_choice("curvature", curvature, ("ggn", "hessian"))
        self.adapt_damping = check_flag("adapt_damping", adapt_damping)
        self.damping = check_positive("damping", damping, zero=not adapt_damping)
        self.cg_maxiter = check_integer("cg_maxiter", cg_maxiter)
        self.cg_tol = check_positive("cg_tol", cg_tol)
        self.backtracking = check_flag("backtracking", backtracking)
        self.warm_start = check_flag("warm_start", warm_start)
        self.warm_start_decay = check_fraction("warm_start_decay", warm_start_decay)
        self.preconditioner = check_choice("preconditioner", preconditioner, (None, "diagonal"))
        if preconditioner == "diagonal" and curvature != "ggn":
            raise ValueError(
                "preconditioner='diagonal' needs curvature='ggn' (the Hessian's diagonal costs P products "
                "and may be negative)"
            )
        self.preconditioner_exponent = check_fraction("preconditioner_exponent", preconditioner_exponent)
        self.line_search = check_flag("line_search", line_search)
        self.curvature_options = check_curvature_options(
            curvature, curvature_options, {"strategy": "reverse"}
        )
        check_learning_rate("lr", lr)
        self.schedule = set(backtracking_schedule(self.cg_maxiter))
        self.steps = 0
        self.last_solve: SolveResult | None = None
        self.last_info: dict[str, Any] = {}
        super().__init__(params, {"lr": lr}, model=model, loss_fn=loss_fn, eval_mode=eval_mode)
        self.parameter_names()  # refuses a missing model or loss, or a tensor not the model's

    # ------------------------------------------------------------------ the step
    def step(  # type: ignore[override]
        self, closure: Callable[[], Tensor] | None = None, *, batch: tuple[Any, Tensor] | None = None
    ) -> Tensor | None:
        """One Hessian-free step on the mini-batch ``batch = (inputs, targets)``.

        Args:
            closure: Optional, as in ``torch.optim``: evaluated first (with
                gradients enabled) only for the loss it returns; the step does not
                use it (nor ``p.grad``).
            batch: The mini-batch whose loss, gradient and curvature make the step.

        Returns:
            The closure's loss if one is given, otherwise the batch's loss before the step.

        Raises:
            ValueError: No ``batch``, or not an ``(inputs, targets)`` pair.
        """
        closure_loss = self.evaluate(closure)
        with self.full_precision():
            inputs, targets = unpack_batch(type(self).__name__, batch)
            problem = self.batch_problem(inputs, targets)
            self.warn_if_trained_in_eval_mode()
            self.steps += 1
            loss, g = problem.loss_and_gradient()
            result = closure_loss if closure is not None else loss
            lam = self.damping
            self.last_info = {"loss": float(loss), "damping": lam, "skipped": True}
            if not all_finite(loss, g):
                self.skip("the batch's loss or gradient is not finite")
                return result
            with torch.enable_grad():
                G = curvature_of(self.curvature, problem, **self.curvature_options)
                solved, kept = self._conjugate_gradient(problem, G, g, lam)
                self.last_solve = solved
                final = solved.iterations
                rate = learning_rates(self, problem)
                chosen, loss_after = self._backtrack(problem, final, kept, rate)
                delta = rate * kept[chosen]
                slope = float(g @ delta)
                model_change = slope + 0.5 * float(delta @ (G @ delta)) if self.adapt_damping else math.nan
            rho = math.nan
            if self.adapt_damping:  # a model predicting no decrease, or a non-finite loss: a bad step
                good = model_change < 0 and math.isfinite(float(loss_after))
                rho = (float(loss_after) - float(loss)) / model_change if good else -math.inf
            status = solved.status
            self.last_info.update(
                loss_after=float(loss_after), cg_iteration=chosen, cg_iterations=final,
                cg_reason=solved.reason, cg_status=status, rho=rho, alpha=1.0,
            )  # fmt: skip
            indefinite = status == "non-positive-curvature"
            if self.adapt_damping and (bool(delta.any()) or indefinite):  # indefinite: a bad step
                ratio = -math.inf if indefinite else rho
                self.damping = levenberg_marquardt(
                    lam, ratio, lower=0.25, upper=0.75, factor=(1.5, 2.0 / 3.0)
                )
            if not math.isfinite(float(loss_after)):
                self.skip("the batch's loss after the step would not be finite")
                return result
            alpha = self._line_search(problem, loss, slope, delta, loss_after) if self.line_search else 1.0
            self.last_info["alpha"] = alpha
            if alpha == 0.0:
                self.skip("the line search found no sufficient decrease of the batch's loss")
                return result
            applied = self.apply_updates(
                updates_of(problem, alpha * delta if alpha != 1.0 else delta), what="step"
            )
            self.last_info["skipped"] = not applied
            if applied and all_finite(solved.x):  # the warm start is kept only with the step taken
                for p, part in zip(problem.params, problem.layout.unflatten(solved.x)):
                    self.state[p]["warm_start"] = part.detach().clone()
            return result

    def _conjugate_gradient(
        self, problem: Problem, G: CurvatureOperator, g: Tensor, lam: float
    ) -> tuple[SolveResult, dict[int, Tensor]]:
        """CG on ``(G + lam I) d = -g``: its result and the kept iterates by iteration (the last included).

        Nothing is kept in the optimizer: the caller keeps the solution as the next
        warm start only if the step is taken.
        """
        params = problem.params
        x0 = None
        if self.warm_start and all("warm_start" in self.state[p] for p in params):
            x0 = self.warm_start_decay * problem.layout.flatten([self.state[p]["warm_start"] for p in params])
        M = None
        if self.preconditioner == "diagonal":
            scale = (G.diagonal() + lam).clamp_min(torch.finfo(g.dtype).tiny) ** self.preconditioner_exponent
            M = DiagonalOperator(scale - lam, problem.layout)  # CG applies (M + lam I)^-1 = scale^-1
        kept: dict[int, Tensor] = {}
        previous: list[Tensor] = []  # the latest iterate seen
        count = [0]  # iterates seen: the next one's iteration

        def record(X: Tensor) -> dict[str, float]:
            # solve() calls back with every recorded iterate, iteration 0 first; the row
            # confirming the last iterate of a run of the recurrence passes it again
            if previous and (X is previous[0] or torch.equal(X, previous[0])):
                return {}
            previous[:] = [X]
            if count[0] in self.schedule:
                kept[count[0]] = X[:, 0]
            count[0] += 1
            return {}

        with warnings.catch_warnings():  # the Hessian is not known to be PSD: documented, not repeated
            warnings.filterwarnings("ignore", message="solver 'cg' needs", category=CurvkitWarning)
            solved = solve(
                G, -g, method="cg", damping=lam, tol=self.cg_tol, maxiter=self.cg_maxiter,
                preconditioner=M, x0=x0, callback=record,
            )  # fmt: skip
        kept[solved.iterations] = solved.x
        return solved, kept

    def _backtrack(
        self, problem: Problem, final: int, kept: dict[int, Tensor], rate: Tensor
    ) -> tuple[int, Tensor]:
        """The iterate to take and its batch loss: Martens' walk back from the last while it decreases."""
        best, best_loss = final, loss_at(problem, rate * kept[final])
        if not self.backtracking:
            return best, best_loss
        for iteration in sorted((i for i in kept if i < final), reverse=True):
            value = loss_at(problem, rate * kept[iteration])
            if bool(torch.isfinite(best_loss)) and not bool(value < best_loss):
                break
            best, best_loss = iteration, value
        return best, best_loss

    def _line_search(
        self, problem: Problem, loss: Tensor, slope: float, delta: Tensor, loss_full: Tensor
    ) -> float:
        """Armijo backtracking on ``alpha``: the first of ``1, 0.8, ...`` with sufficient decrease, else 0."""
        alpha, value = 1.0, float(loss_full)
        for _ in range(LINE_SEARCH_TRIES):
            if value <= float(loss) + LINE_SEARCH_SLOPE * alpha * slope:
                return alpha
            alpha *= LINE_SEARCH_SHRINK
            value = float(loss_at(problem, alpha * delta))
        return 0.0

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Any]:
        """The damping ``lambda`` and the number of steps (the warm start is per parameter)."""
        return {"damping": self.damping, "steps": self.steps}

    def check_extra_state(self, state: dict[str, Any]) -> None:
        """Refuses extra state without a valid damping ``lambda``.

        Raises:
            ValueError: Naming what is missing or invalid.
        """
        check_entries(type(self).__name__, state, ("damping",))
        check_positive("damping", state["damping"], zero=not self.adapt_damping)

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restores :meth:`extra_state` (checked by :meth:`check_extra_state`)."""
        self.damping = float(state["damping"])
        self.steps = int(state.get("steps", 0))
