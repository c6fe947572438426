"""``NaturalGradient``: the damped Gauss-Newton / natural-gradient step of a mini-batch, by a low-rank solve.

For a mini-batch of ``N`` samples with outputs ``o = f(theta, x)`` (``M`` entries
in all), Jacobian ``J = do / dtheta`` (``M x P``) and the batch loss
``L = (1/C) S(o)`` (``C`` its count of loss terms, ``1`` with
``reduction="sum"``), the generalised Gauss-Newton matrix (GGN) and the Fisher
information of the batch are

.. math:: G = \\frac{1}{C} J^\\top \\Lambda J, \\qquad \\Lambda = S S^\\top,

with ``Lambda`` the Hessian of ``S`` w.r.t. the outputs (GGN: N. N. Schraudolph,
"Fast curvature matrix-vector products for second-order gradient descent",
Neural Computation 14(7), 2002) or the Fisher of the predictive distribution
(S. Amari, "Natural gradient works efficiently in learning", Neural Computation
10(2), 1998; J. Martens, "New insights and perspectives on the natural gradient
method", JMLR 21, 2020), and ``S`` its symmetric factor
(:meth:`curvkit.losses.BatchLoss.output_hessian_factor`,
:meth:`~curvkit.losses.BatchLoss.fisher_factor`). ``G = U U^T`` with

.. math:: U = J^\\top S / \\sqrt{C} \\in \\mathbb{R}^{P \\times K},

so ``G`` has rank at most ``K`` (``K = M`` for the closed-form losses: batch x
outputs), usually far below ``P``. The damped step ``(G + lambda I) d = g``
is then solved in the ``K``-dimensional space by the Woodbury identity
(M. A. Woodbury, "Inverting modified matrices", 1950):

.. math::

    (U U^\\top + \\lambda I)^{-1} g
    = \\frac{1}{\\lambda}\\left(g - U (\\lambda I + U^\\top U)^{-1} U^\\top g\\right),

one ``K x K`` Cholesky solve (in float64) instead of a ``P x P`` one: the
"subsampled Gauss-Newton / natural gradient with a low-rank solve" of Y. Ren and
D. Goldfarb ("Efficient subsampled Gauss-Newton and natural gradient methods for
training neural networks", arXiv 1906.02353, 2019). The columns of ``U`` are
per-sample vector-Jacobian products: :func:`curvkit.jacobians.per_sample_vjp` of
the factor's columns split per sample and position
(:func:`curvkit.jacobians.factor_cotangents`), the very machinery of the ``ggn``
and ``fisher`` estimators' diagonals; where the samples interact (train-mode
BatchNorm with ``eval_mode=False``) or the loss's factor has no per-sample
layout (a custom callable), whole-batch vector-Jacobian products
(:func:`curvkit.jacobians.output_vjp`) of the same columns. Memory is ``K x P``:
:attr:`NaturalGradient.max_rank` refuses a batch whose ``K`` is too large.

The update, with SGD's heavy-ball momentum (``torch.optim.SGD`` without
dampening), per parameter group's ``lr`` and ``momentum``:

.. math:: b \\leftarrow \\mu b + d, \\qquad \\theta \\leftarrow \\theta - \\eta\\, b .

``curvature="fisher"`` uses the loss's closed-form Fisher: for the
canonical-link losses (cross-entropy, MSE, BCE with logits) it equals the GGN
(Martens 2020, sec. 9.2); for ``"nll"`` it differs (the GGN of an NLL of
log-probabilities is zero).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.errors import CurvkitError
from curvkit.jacobians import factor_cotangents, output_vjp, per_sample_vjp, samples_interact
from curvkit.losses import CustomLoss, resolve_loss
from curvkit.optim.base import (
    CurvatureOptimizer,
    check_choice,
    check_fraction,
    check_integer,
    check_learning_rate,
    check_model_and_loss,
    check_positive,
    levenberg_marquardt,
    loss_at,
    unpack_batch,
)
from curvkit.problem import Problem

__all__ = ["CURVATURES", "NaturalGradient", "low_rank_factor", "woodbury_solve"]

_TRIES = 8  # solves per step with adaptive damping: the damping grows up to 10^7-fold
_REJECT = 10.0  # damping factor after a step that increased the batch loss (undone)
_INCREASE = 1.5  # Levenberg-Marquardt factor (Martens 2010): ratio < 1/4 up, > 3/4 down

CURVATURES = ("ggn", "fisher")
"""The curvatures :class:`NaturalGradient` solves with."""


def woodbury_solve(U: Tensor, g: Tensor, damping: float) -> Tensor:
    """``(U U^T + damping I)^-1 g`` by the Woodbury identity, for a tall ``U`` of shape ``[P, K]``.

    ``(g - U (damping I + U^T U)^-1 U^T g) / damping``: a ``K x K`` Cholesky solve,
    in float64 (the result in ``g``'s dtype). Non-finite input gives a non-finite
    result (never an exception), for the caller to skip.

    Args:
        U: The ``[P, K]`` factor.
        g: The ``[P]`` right-hand side.
        damping: ``lambda > 0``.

    Example:
        >>> U = torch.tensor([[1.0], [0.0]], dtype=torch.float64)  # U U^T = diag(1, 0)
        >>> woodbury_solve(U, torch.tensor([2.0, 2.0], dtype=torch.float64), 1.0)
        tensor([1., 2.], dtype=torch.float64)
    """
    K = U.shape[1]
    small = (U.T @ U).to(torch.float64)
    small.diagonal().add_(damping)
    rhs = (U.T @ g).to(torch.float64).unsqueeze(1)
    if K == 0:
        return g / damping
    factor, info = torch.linalg.cholesky_ex(small)
    if int(info) == 0:
        coefficients = torch.cholesky_solve(rhs, factor)
    elif bool(torch.isfinite(small).all() & torch.isfinite(rhs).all()):  # not PD in floating point
        coefficients = torch.linalg.solve(small, rhs)
    else:  # NaN or Inf: a non-finite direction, for the caller to skip
        return torch.full_like(g, float("nan"))
    return (g - U @ coefficients[:, 0].to(g.dtype)) / damping


def low_rank_factor(
    problem: Problem,
    inputs: Any,
    targets: Tensor,
    curvature: str = "ggn",
    max_rank: int | None = None,
    vectorize: bool = True,
) -> tuple[Tensor, float]:
    """``U^T`` with ``G = U U^T`` for the GGN or the Fisher of one batch, and the batch's count.

    ``U = J^T S`` (not yet divided by ``sqrt(C)``): the pullbacks of the loss's
    output factor ``S`` (module docstring).

    Args:
        problem: Provides the model call, the loss and the parameters.
        inputs: The batch's inputs (on the problem's device and dtype).
        targets: The batch's targets.
        curvature: ``"ggn"`` (the loss's output Hessian factor) or ``"fisher"`` (its
            closed-form Fisher factor).
        max_rank: Refuse when the factor has more than this many columns.
        vectorize: Per-sample products with :func:`torch.func.vmap` (a loop with
            plain autograd where it fails, or with ``False``).

    Returns:
        ``[K, P]`` (the rows are the columns of ``U``) and the batch's count ``C_b``.

    Raises:
        CurvkitError: ``K > max_rank``.
    """
    params = [p.detach() for p in problem.params]
    loss = problem.loss
    with torch.no_grad():
        outputs = problem.forward(params, inputs)
    if curvature == "ggn":
        factor = loss.output_hessian_factor(outputs, targets)
    else:
        factor = loss.fisher_factor(outputs, targets)
    count = loss.count(outputs, targets)
    if loss.BLOCK_DIAGONAL:
        cotangents = factor_cotangents(factor)  # [N, Q, *o.shape[1:]]
        N, Q = cotangents.shape[:2]
        K = N * Q
    else:
        K = factor.shape[-1]
    if max_rank is not None and K > max_rank:
        raise CurvkitError(
            f"NaturalGradient: the batch's low-rank system is {K} x {K} ({outputs.shape[0]} samples x "
            f"{K // max(outputs.shape[0], 1)} output directions), above max_rank={max_rank}: use a smaller "
            "batch or raise max_rank"
        )
    if loss.BLOCK_DIAGONAL and not samples_interact(problem):
        parts = None
        if vectorize:
            try:
                parts = per_sample_vjp(problem, params, inputs, cotangents, vectorize=True)
            except (RuntimeError, NotImplementedError):  # a model vmap cannot batch
                parts = None
        if parts is None:
            parts = per_sample_vjp(problem, params, inputs, cotangents, vectorize=False)
        return torch.cat([part.reshape(K, -1) for part in parts], dim=1), count
    if loss.BLOCK_DIAGONAL:  # each (sample, column) cotangent embedded in a whole-batch cotangent
        eye = torch.eye(N, dtype=cotangents.dtype, device=cotangents.device)
        spread = eye.reshape(N, 1, N, *[1] * (cotangents.dim() - 2))
        columns = (spread * cotangents.unsqueeze(2)).reshape(K, *outputs.shape)
    else:
        columns = factor.movedim(-1, 0)
    leaves = [p.requires_grad_(True) for p in params]
    with torch.enable_grad():
        parts = output_vjp(problem.forward(leaves, inputs), leaves, columns)
    return torch.cat([part.reshape(K, -1) for part in parts], dim=1), count


class NaturalGradient(CurvatureOptimizer):
    """Damped Gauss-Newton or natural-gradient steps of mini-batches, by a low-rank solve.

    Each :meth:`step` on a batch ``(x, y)`` computes the batch's gradient ``g``
    and its GGN or Fisher ``G = U U^T`` (rank ``K`` <= batch x outputs), solves
    ``(G + damping I) d = g`` by the Woodbury identity in the ``K x K`` space (Ren
    & Goldfarb 2019; see the module docstring), and steps
    ``theta <- theta - lr b`` with the momentum buffer ``b <- momentum b + d``.
    The solve is joint over all parameters of all groups; ``lr`` and ``momentum``
    may differ per group.

    **Adaptive damping** (default). A full Gauss-Newton step with a small damping
    overshoots where the model is far from linear (cross-entropy on a tanh MLP
    increases its loss several-fold at the first step), so the damping follows
    the Levenberg-Marquardt rule (J. J. Moré, "The Levenberg-Marquardt algorithm:
    implementation and theory", 1978; J. Martens, "Deep learning via Hessian-free
    optimization", ICML 2010, sec. 4.1): after the step ``s``, the batch's loss
    is evaluated again (one forward pass) and compared with the reduction its
    quadratic model predicts, ``rho = (L(theta + s) - L(theta)) / (g^T s + s^T G s / 2)``;
    ``rho < 1/4`` multiplies the damping by 3/2, ``rho > 3/4`` divides it by 3/2
    (never below the ``damping`` given); a step that increases the batch loss
    although its model predicts a decrease (always, without momentum) is
    undone and solved again with ten times the damping (the same ``U`` and
    ``g``: one more ``K x K`` solve), up to 8 solves, after which the step is
    skipped with a :class:`curvkit.CurvkitWarning`. The first solve of the first
    step uses the ``damping`` given; with ``adaptive_damping=False`` every step
    does, and costs no extra forward pass.

    Args:
        params: Parameters or parameter groups (each a parameter of ``model``).
        model: The network.
        loss_fn: Its loss, as :class:`curvkit.Problem` takes it (``"cross_entropy"``,
            ``"mse"``, a loss module, ``(outputs, targets) -> mean loss``).
        curvature: ``"ggn"`` (default) or ``"fisher"`` (the loss's closed-form
            Fisher; the loss must be a negative log-likelihood).
        lr: Learning rate ``eta > 0`` (1 is the full Gauss-Newton step).
        damping: ``lambda > 0``, added to the curvature: the first and (with
            ``adaptive_damping``) the smallest.
        momentum: Heavy-ball momentum ``mu`` in ``[0, 1)``.
        adaptive_damping: Adapt the damping by the Levenberg-Marquardt rule (above).
        max_rank: The largest ``K`` (samples x output directions) accepted; a batch
            above it is refused with a :class:`curvkit.CurvkitError`.
        eval_mode: The step's loss, gradient and curvature are the model's in
            evaluation mode (default: dropout off, BatchNorm with its running
            statistics, which the step does not update), as the analyses use;
            ``False``: in the model's own mode. A model in training mode with
            BatchNorm or dropout layers is warned about once
            (:class:`curvkit.CurvkitWarning`; ``model.eval()`` silences it). See
            docs/optimizers.md, "BatchNorm and dropout".

    Attributes:
        damping: The damping of the next step.
        steps: Steps taken (skipped ones included).
        skipped_steps: Steps not applied: not finite, or no decrease of the batch loss.
        rejected_trials: Solves undone by the adaptive damping (the loss increased).
        last_loss: The batch loss before the latest step (a detached tensor).
        last_reduction_ratio: ``rho`` of the latest trial: the kept step's, or after a skipped step its last
            rejected trial's (NaN when not measured).

    Raises:
        ValueError: An invalid hyper-parameter, or ``curvature="fisher"`` for a
            loss without a closed-form Fisher.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Linear(3, 2).double()
        >>> X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
        >>> opt = NaturalGradient(model.parameters(), model=model, loss_fn="cross_entropy", damping=1e-2)
        >>> first = opt.step(batch=(X, y))
        >>> bool(opt.step(batch=(X, y)) < first)
        True
    """

    GLOBAL = ("curvature", "damping", "adaptive_damping", "max_rank", "eval_mode")
    GROUP_CHECKS = {"lr": check_learning_rate, "momentum": functools.partial(check_fraction, below_one=True)}

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        model: nn.Module,
        loss_fn: Any,
        curvature: str = "ggn",
        lr: float = 1.0,
        damping: float = 1e-3,
        momentum: float = 0.0,
        adaptive_damping: bool = True,
        max_rank: int = 4096,
        eval_mode: bool = True,
    ) -> None:
        self.curvature = check_choice("curvature", curvature, CURVATURES)
        self.damping = self.min_damping = check_positive("damping", damping)
        if not isinstance(adaptive_damping, bool):
            raise ValueError(f"adaptive_damping must be True or False, got {adaptive_damping!r}")
        self.adaptive_damping = adaptive_damping
        self.max_rank = check_integer("max_rank", max_rank)
        check_model_and_loss(type(self).__name__, model, loss_fn)
        defaults = {"lr": lr, "momentum": momentum}
        super().__init__(params, defaults, model=model, loss_fn=loss_fn, eval_mode=eval_mode)
        if curvature == "fisher":
            loss = resolve_loss(loss_fn)
            if not loss.is_negative_log_likelihood:
                raise ValueError(
                    f"curvature='fisher' needs a loss that is a negative log-likelihood; {loss.name!r} is "
                    "not one: use curvature='ggn'"
                )
            if isinstance(loss, CustomLoss):
                raise ValueError(
                    f"curvature='fisher' needs a closed-form Fisher, and loss {loss.name!r} has only a "
                    "sampler: use curvature='ggn'"
                )
        self.parameter_names()  # refuses a tensor not the model's
        self.steps = self.rejected_trials = 0
        self.last_loss: Tensor | None = None
        self.last_reduction_ratio = float("nan")
        self._vectorize = True

    # ------------------------------------------------------------------ the step
    def low_rank_system(self, inputs: Any, targets: Any) -> tuple[Problem, Any, Tensor, Tensor, Tensor]:
        """The batch's problem, its batch (on the problem's device and dtype), loss, gradient and ``U^T``.

        ``G = U U^T`` is the batch's GGN or Fisher, ``U^T`` of shape ``[K, P]``,
        normalised like the loss (module docstring).

        Raises:
            CurvkitError: The batch's ``K`` is above :attr:`max_rank`.
        """
        problem = self.batch_problem(inputs, targets)
        with torch.enable_grad(), problem.evaluation():
            batch = next(iter(problem.batches()))
            Ut, count = low_rank_factor(problem, *batch, self.curvature, self.max_rank, self._vectorize)
            loss, gradient = problem.loss_and_gradient()
        return problem, batch, loss, gradient, Ut * math.sqrt(problem.normalizer(count))

    def direction(self, inputs: Any, targets: Any) -> Tensor:
        """The damped natural direction ``d = (G + damping I)^-1 g`` of a batch, flat (no step taken)."""
        _, _, _, gradient, Ut = self.low_rank_system(inputs, targets)
        return woodbury_solve(Ut.T, gradient, self.damping)

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], Tensor] | None = None, *, batch: Sequence[Any] | None = None
    ) -> Tensor | None:
        """One natural-gradient step on ``batch = (inputs, targets)``.

        With ``adaptive_damping``, after the step the batch's loss is evaluated
        again (one forward pass) and the damping adapted (class docstring); a step
        that increases it is undone and solved again with ten times the damping
        (the same ``U`` and ``g``: one more ``K x K`` solve and forward pass).

        Args:
            closure: Optional; evaluated first (with gradients enabled) and its loss
                returned, as ``torch.optim`` does. The step does not use ``.grad``.
            batch: The mini-batch ``(inputs, targets)`` (keyword, required).

        Returns:
            The closure's loss, or the batch's loss before the step.

        Raises:
            ValueError: No batch.
            CurvkitError: The batch's low-rank system is above ``max_rank``.
        """
        inputs, targets = unpack_batch(type(self).__name__, batch)
        closure_loss = self.evaluate(closure)
        with self.full_precision():
            self.warn_if_trained_in_eval_mode(stacklevel=5)  # step's torch.no_grad wrapper: one frame more
            problem, _, loss, gradient, Ut = self.low_rank_system(inputs, targets)
            self.steps += 1
            self.last_loss = loss.detach()
            result = closure_loss if closure is not None else loss
            params = problem.params
            group_of = {id(p): group for group in self.param_groups for p in group["params"]}
            saved = [p.detach().clone() for p in params] if self.adaptive_damping else []
            damping = self.damping
            for _ in range(_TRIES):
                direction = woodbury_solve(Ut.T, gradient, damping)
                updates, buffers = [], []
                for p, d in zip(params, problem.layout.unflatten(direction)):
                    group = group_of[id(p)]
                    if group["momentum"] == 0:
                        buffer = d
                    else:
                        previous = self.state[p].get("momentum_buffer")
                        buffer = d.clone() if previous is None else group["momentum"] * previous + d
                        buffers.append((p, buffer))
                    updates.append((p, -group["lr"] * buffer))
                if not self.apply_updates(updates, what="natural-gradient step", stacklevel=5):
                    return result
                if self.adaptive_damping:
                    accepted, damping, self.last_reduction_ratio = self._adapt(
                        problem, loss, gradient, Ut, updates, damping
                    )
                    if not accepted:
                        for p, value in zip(params, saved):
                            p.copy_(value)
                        self.rejected_trials += 1
                        continue
                for p, buffer in buffers:
                    self.state[p]["momentum_buffer"] = buffer
                self.damping = damping
                return result
            self.skip(f"the batch loss did not decrease with a damping up to {damping:.3g}", stacklevel=5)
            return result

    def _adapt(
        self,
        problem: Problem,
        loss: Tensor,
        gradient: Tensor,
        Ut: Tensor,
        updates: Sequence[tuple[Tensor, Tensor]],
        damping: float,
    ) -> tuple[bool, float, float]:
        """Whether the step taken is kept, the damping of the next (Levenberg-Marquardt), the step's ``rho``.

        ``rho`` is NaN where the quadratic model predicts no decrease beyond
        rounding (a kept step then keeps the damping).
        """
        step = problem.layout.flatten([delta for _, delta in updates])
        predicted = float(gradient @ step + 0.5 * (Ut @ step).square().sum())
        actual = float(loss_at(problem) - loss)
        noise = 16 * torch.finfo(gradient.dtype).eps * max(abs(float(loss)), 1e-30)
        ratio = actual / predicted if predicted < -noise else math.nan
        if not math.isfinite(actual) or (actual > noise and predicted < -noise):
            return False, damping * _REJECT, ratio
        damping = levenberg_marquardt(
            damping, ratio, lower=0.25, upper=0.75, factor=_INCREASE, bounds=(self.min_damping, None)
        )
        return True, damping, ratio

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Any]:
        """The step count and the solve's settings (``damping`` may have been changed)."""
        return {
            "steps": self.steps,
            "rejected_trials": self.rejected_trials,
            "curvature": self.curvature,
            "damping": self.damping,
            "min_damping": self.min_damping,
            "adaptive_damping": self.adaptive_damping,
            "max_rank": self.max_rank,
        }

    def check_extra_state(self, state: dict[str, Any]) -> None:
        """Refuses the state of the other curvature, or invalid damping or ``max_rank``.

        Raises:
            ValueError: Naming the setting.
        """
        curvature = state.get("curvature", self.curvature)
        if curvature != self.curvature:
            raise ValueError(
                f"this state_dict is of a NaturalGradient with curvature={curvature!r}, "
                f"not {self.curvature!r}"
            )
        check_positive("damping", state.get("damping", self.damping))
        check_positive("min_damping", state.get("min_damping", self.min_damping))
        check_integer("max_rank", state.get("max_rank", self.max_rank))

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restores :meth:`extra_state` (checked by :meth:`check_extra_state`)."""
        self.steps = int(state.get("steps", 0))
        self.rejected_trials = int(state.get("rejected_trials", 0))
        self.damping = float(state.get("damping", self.damping))
        self.min_damping = float(state.get("min_damping", self.min_damping))
        self.adaptive_damping = bool(state.get("adaptive_damping", self.adaptive_damping))
        self.max_rank = int(state.get("max_rank", self.max_rank))
