"""``CurvaturePreconditioner``: any registered estimator as a preconditioner of a first-order optimizer.

Like kfac-pytorch's preconditioner (J. G. Pauloski, Z. Zhang, L. Huang, W. Xu
and I. T. Foster, "Convolutional neural network training with distributed
K-FAC", SC 2020), it is not an optimizer: between ``loss.backward()`` and the
user's ``optimizer.step()``, :meth:`CurvaturePreconditioner.step` rewrites each
parameter's ``.grad`` in place with

.. math:: \\tilde g = (A + \\lambda I)^{-1} g,

with ``A = curvkit.curvature(estimator, problem of the batch)``, so that
``torch.optim.SGD(lr=1)`` then takes the damped step
``theta - (A + lambda I)^-1 g``: with ``A`` the GGN or the Fisher, the natural
gradient (S. Amari, "Natural gradient works efficiently in learning", Neural
Computation 10(2), 1998); with KFAC, K-FAC (J. Martens and R. Grosse,
"Optimizing neural networks with Kronecker-factored approximate curvature",
ICML 2015). Any registered estimator serves, a third party's included
(:func:`curvkit.register_plugin`, the ``curvkit`` entry-point group).

The inverse: with ``solver="auto"``, the operator's structured inverse where it
has one (``"inverse"`` in its ``STRUCTURE``: KFAC's Kronecker factors, a
diagonal, ``scale * I``: exact), otherwise conjugate gradients
(:func:`curvkit.inverse` with ``method="cg"``); any other registered solver by
name (:func:`curvkit.solvers`: ``"exact"``, ``"cg"``, ``"minres"``, ``"kfac"``,
...), with ``solver_options`` (``tol``, ``maxiter``, ...).

Every ``update_freq`` steps the operator (and a structured inverse) is rebuilt
on the step's batch; in between, the latest one is reused, as kfac-pytorch
reuses its factors: a structured inverse is that of the update's batch and
parameters; a matrix-free operator multiplies on the update's batch (at the
current parameters, unless the estimator caches work per model state, as the
Hessian's gradient graphs). An update batch whose curvature is not finite is
refused: that step leaves the gradients as they were (with a
:class:`curvkit.CurvkitWarning`) and the latest operator (or running average)
preconditions the steps until the next update.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.compiled import original_module
from curvkit.errors import CurvkitWarning, NonFiniteError, UnknownEstimatorError, UnknownOptionError
from curvkit.finite import all_finite
from curvkit.layout import select_parameters
from curvkit.linalg.solve import SOLVE_ARGUMENTS, SolveResult, check_solver_options, solve, solvers
from curvkit.losses import resolve_loss
from curvkit.operator import CurvatureOperator
from curvkit.optim.base import (
    check_estimator_options,
    check_integer,
    check_positive,
    full_precision,
    unpack_batch,
    warn_if_data_parallel,
)
from curvkit.problem import Problem
from curvkit.registry import curvature, get_estimator
from curvkit.running import RunningCurvature

__all__ = ["CurvaturePreconditioner"]


class CurvaturePreconditioner:
    """Rewrites ``.grad`` with ``(A + damping I)^-1 grad``, ``A`` a registered estimator (module docstring).

    Usage::

        precond = CurvaturePreconditioner(model, "kfac", loss_fn="cross_entropy", damping=1e-3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, y in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            precond.step(batch=(x, y))
            optimizer.step()

    The gradient is the ``.grad`` the user's backward pass left (of the mean loss,
    for the curvature of the mean loss that ``loss_fn`` defines). Parameters
    whose ``.grad`` is ``None`` count as a zero gradient and keep ``None``.

    Args:
        model: The network.
        estimator: A registered estimator name (``"kfac"``, ``"ggn"``, ``"fisher"``,
            ``"hessian"``, ``"empirical-fisher"``, a third party's).
        loss_fn: Its loss, as :class:`curvkit.Problem` takes it.
        damping: ``lambda >= 0``, added to ``A``.
        solver: ``"auto"`` (the structured inverse, else ``"cg"``) or a registered
            solver's name.
        update_freq: Rebuild ``A`` every this many steps (kfac-pytorch's
            ``factor_update_steps`` and ``inv_update_steps`` in one).
        decay: ``None`` (the default): ``A`` is the update batch's curvature.
            A number in ``[0, 1)``: ``A`` is the running average of the update
            batches' curvatures, ``A <- decay A + (1 - decay) A_batch``
            (:class:`curvkit.RunningCurvature`, kept in the curvature's structure:
            K-FAC's factors averaged separately, as Martens and Grosse and
            kfac-pytorch's ``factor_decay`` do; a diagonal; a dense matrix). An
            estimator whose operator has no such structure (the Hessian's or the
            GGN's products) is refused.
        params: The parameters preconditioned, as :class:`curvkit.Problem` takes them
            (``None``: every trainable one; names, glob patterns, module prefixes).
        eval_mode: The curvature of the model in evaluation mode (dropout off,
            BatchNorm's running statistics), as the analyses use.
        solver_options: Passed to the solver (``tol``, ``maxiter``, ...).
        **estimator_options: Passed to the estimator (``mode="exact"``, ...).

    Attributes:
        steps: Calls of :meth:`step`.
        updates: Times ``A`` was built.
        skipped_steps: Steps whose gradient, preconditioned gradient or update
            batch's curvature was not finite (``.grad`` left unchanged).
        operator: The latest ``A`` (``None`` before the first step).
        running: The :class:`curvkit.RunningCurvature` with ``decay``, else ``None``.
        last_solve: The :class:`curvkit.SolveResult` of the latest solve by a
            solver (``None`` for a structured inverse).

    Raises:
        ValueError: An invalid hyper-parameter, an unknown estimator or solver, or
            a parameter selection that matches nothing.
        UnknownOptionError: A keyword neither the constructor nor the estimator
            takes (listing what each takes: :func:`curvkit.optim.base.check_estimator_options`).
    """

    def __init__(
        self,
        model: nn.Module,
        estimator: str = "kfac",
        *,
        loss_fn: Any,
        damping: float = 1e-3,
        solver: str = "auto",
        update_freq: int = 1,
        decay: float | None = None,
        params: str | Sequence[str] | None = None,
        eval_mode: bool = True,
        solver_options: Mapping[str, Any] | None = None,
        **estimator_options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if loss_fn is None:
            raise ValueError("CurvaturePreconditioner needs loss_fn=")
        resolve_loss(loss_fn)  # a loss every batch's Problem would refuse: refused now, in one line
        self.model, self.loss_fn, self.eval_mode = model, loss_fn, eval_mode
        self.params = params
        self.param_names = tuple(name for name, _ in select_parameters(original_module(model), params))
        self._configure(estimator, damping, solver, update_freq, decay, solver_options, estimator_options)
        self.steps = self.updates = self.skipped_steps = 0
        self.operator: CurvatureOperator | None = None
        self.last_solve: SolveResult | None = None
        self._inverse: CurvatureOperator | None = None  # the operator's structured inverse, if it is used

    def _configure(
        self,
        estimator: str,
        damping: float,
        solver: str,
        update_freq: int,
        decay: float | None,
        solver_options: Mapping[str, Any] | None,
        estimator_options: Mapping[str, Any],
    ) -> None:
        """Check and set the options (shared by the constructor and :meth:`load_state_dict`)."""
        try:
            spec = get_estimator(estimator)
        except UnknownEstimatorError as exc:
            raise ValueError(exc.args[0]) from None
        check_estimator_options(type(self), spec, estimator_options)
        names = [s.name for s in solvers()]
        if solver != "auto" and solver not in names:
            raise ValueError(f"solver must be 'auto' or one of {names}, got {solver!r}")
        if solver_options is not None and not isinstance(solver_options, Mapping):
            raise ValueError(f"solver_options must be a dict, got {type(solver_options).__name__}")
        given = dict(solver_options or {})
        if "damping" in given:
            raise ValueError(
                "solver_options may not set damping: pass damping= (the preconditioner passes it)"
            )
        try:  # the solver's own options (solve's own: tol, maxiter, ...), now rather than at a step
            own = {name: value for name, value in given.items() if name not in SOLVE_ARGUMENTS}
            check_solver_options("cg" if solver == "auto" else solver, own)  # "auto" falls back to cg
        except UnknownOptionError as exc:
            raise ValueError(exc.args[0]) from None
        self.estimator = estimator
        self.damping = check_positive("damping", damping, zero=True)
        self.solver = solver
        self.update_freq = check_integer("update_freq", update_freq)
        self.solver_options = dict(solver_options or {})
        self.estimator_options = dict(estimator_options)
        self.running = None if decay is None else RunningCurvature(estimator, decay, **estimator_options)

    # ------------------------------------------------------------------ the batch's problem
    def batch_problem(self, inputs: Any, targets: Any) -> Problem:
        """The light :class:`curvkit.Problem` of one mini-batch (no copy, no determinism probe)."""
        params = list(self.param_names)
        warn_if_data_parallel(self)
        return Problem.for_batch(
            self.model, self.loss_fn, inputs, targets, params=params, eval_mode=self.eval_mode
        )

    def update(self, inputs: Any, targets: Any) -> CurvatureOperator:
        """Build ``A`` on the batch (folded into the running average with ``decay``) and its damped inverse.

        Without ``decay``, the batch's ``A`` is kept only if its product with a
        vector of ones is finite (one product: a NaN or an infinity anywhere in
        ``A`` reaches it).

        Raises:
            NonFiniteError: The batch's curvature is not finite (the average, ``A``
                and its inverse are left as they were).
        """
        problem = self.batch_problem(inputs, targets)
        if self.running is not None:
            operator = self.running.update(problem)
        else:
            operator = curvature(self.estimator, problem, **self.estimator_options)
            ones = torch.ones(operator.shape[1], dtype=operator.dtype, device=operator.device)
            if not all_finite([operator @ ones]):
                raise NonFiniteError(f"the {self.estimator!r} curvature of this batch is not finite")
        self._use(operator)
        self.updates += 1
        return operator

    def _use(self, operator: CurvatureOperator) -> None:
        """Make ``operator`` the ``A`` that preconditions, with its structured damped inverse where used."""
        self.operator = operator
        structured = self.solver == "auto" and "inverse" in operator.STRUCTURE
        self._inverse = operator.inverse(self.damping) if structured else None

    def _precondition(self, gradient: Tensor) -> tuple[Tensor, SolveResult | None]:
        """``(A + damping I)^-1 gradient``, and the solver's result (``None`` for a structured inverse)."""
        if self._inverse is not None:
            return self._inverse @ gradient, None
        assert self.operator is not None
        method = "cg" if self.solver == "auto" else self.solver
        solved = solve(self.operator, gradient, method, self.damping, **self.solver_options)
        return solved.x, solved

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, batch: Sequence[Any] | None = None) -> bool:
        """Precondition every ``.grad`` in place; ``batch=(inputs, targets)`` is needed at updates.

        Returns:
            Whether the gradients were rewritten (``False``: not finite, left as they were).

        Raises:
            ValueError: No parameter has a gradient, or no batch at an update step.
        """
        named = dict(original_module(self.model).named_parameters())
        params = [named[n] for n in self.param_names]
        if all(p.grad is None for p in params):
            raise ValueError(
                "CurvaturePreconditioner.step: no parameter has a .grad; call loss.backward() first"
            )
        with full_precision(params[0].device):  # the curvature in the parameters' dtype
            due = self.operator is None or self.steps % self.update_freq == 0
            if due:
                inputs, targets = unpack_batch(type(self).__name__, batch, " at an update step")
                try:
                    with torch.enable_grad():
                        self.update(inputs, targets)
                except NonFiniteError as exc:  # the batch's curvature was refused
                    self.steps += 1
                    if self.running is not None:
                        kept = "the running average unchanged"
                    elif self.operator is not None:
                        kept = "the previous curvature kept"
                    else:
                        kept = "no curvature yet: built at the next step"
                    return self._skip(f"{exc} ({kept})")
            self.steps += 1
            assert self.operator is not None
            gradient = torch.cat(
                [(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params]
            ).to(self.operator.dtype)
            finite_in = torch.isfinite(gradient).all()
            with torch.enable_grad():
                preconditioned, self.last_solve = self._precondition(gradient)
            stopped_non_finite = self.last_solve is not None and self.last_solve.status == "non-finite"
            if stopped_non_finite or not bool(finite_in & torch.isfinite(preconditioned).all()):
                what = "gradient" if not bool(finite_in) else "preconditioned gradient"
                return self._skip(f"the {what} is not finite")
            for p, part in zip(params, torch.split(preconditioned, [p.numel() for p in params])):
                if p.grad is not None:
                    p.grad.copy_(part.reshape(p.shape))
            return True

    def _skip(self, why: str) -> bool:
        """Counts a step whose gradients are left unchanged and warns (at the caller of :meth:`step`)."""
        self.skipped_steps += 1
        warnings.warn(
            f"CurvaturePreconditioner: gradients left unchanged: {why}",
            CurvkitWarning,
            stacklevel=4,  # _skip, step, torch.no_grad's wrapper, the caller
        )
        return False

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The counters, the options and, with ``decay``, the running average.

        Without ``decay`` the operator is rebuilt at the next step after loading.
        """
        return {
            "steps": self.steps,
            "updates": self.updates,
            "skipped_steps": self.skipped_steps,
            "estimator": self.estimator,
            "damping": self.damping,
            "solver": self.solver,
            "update_freq": self.update_freq,
            "solver_options": dict(self.solver_options),
            "estimator_options": dict(self.estimator_options),
            "params": self.param_names,
            "decay": None if self.running is None else self.running.decay,
            "running": None if self.running is None else self.running.state_dict(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict`.

        With ``decay``, ``A`` is the restored running average and training
        continues exactly as the original run. Without, the next :meth:`step`
        rebuilds ``A`` on its batch: resuming at an update step (``steps`` a
        multiple of ``update_freq``, always with ``update_freq=1``) continues
        exactly as the original run; in between, ``A`` is rebuilt one update early.

        Raises:
            ValueError: Not a state of a preconditioner of the same parameters, or
                invalid options.
        """
        missing = {"steps", "estimator", "params"} - set(state_dict)
        if missing:
            raise ValueError(f"not a CurvaturePreconditioner state_dict: it lacks {sorted(missing)}")
        if tuple(state_dict["params"]) != self.param_names:
            raise ValueError(
                f"this state_dict preconditions parameters {list(state_dict['params'])}, "
                f"not {list(self.param_names)}"
            )
        self._configure(
            state_dict["estimator"],
            state_dict.get("damping", self.damping),
            state_dict.get("solver", self.solver),
            state_dict.get("update_freq", self.update_freq),
            state_dict.get("decay"),
            state_dict.get("solver_options", self.solver_options),
            state_dict.get("estimator_options", self.estimator_options),
        )
        self.steps = check_integer("steps", state_dict["steps"], minimum=0)
        self.updates = check_integer("updates", state_dict.get("updates", 0), minimum=0)
        self.skipped_steps = check_integer("skipped_steps", state_dict.get("skipped_steps", 0), minimum=0)
        self.operator = self._inverse = self.last_solve = None
        if self.running is not None and state_dict.get("running") is not None:
            self.running.load_state_dict(state_dict["running"])
            average = self.running.operator()
            if average is not None:
                self._use(average)
