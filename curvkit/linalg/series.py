"""Series solvers of ``(A + damping I) X = B``: the Neumann series and LiSSA.

* :func:`neumann`: the truncated Neumann series (Richardson iteration) with the
  scale from a largest-eigenvalue estimate, stopping when it diverges;
* :func:`lissa`: LiSSA, the stochastic Neumann series on a fresh mini-batch per
  step (N. Agarwal, B. Bullins and E. Hazan, "Second-order stochastic
  optimization for machine learning in linear time", JMLR 18, 2017; P. W. Koh
  and P. Liang, "Understanding black-box predictions via influence functions",
  ICML 2017), with averaged repeats.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from curvkit.arguments import integer, positive_number
from curvkit.errors import CurvkitError
from curvkit.linalg.solve import SolveHistory, SolveResult
from curvkit.operator import CurvatureOperator
from curvkit.problem_operator import data_backed
from curvkit.snapshot import fixed_model_state

__all__ = ["DIVERGENCE", "lissa", "neumann"]


DIVERGENCE = 1e3
"""A residual this many times the right-hand side's norm means the series diverges (for
:func:`lissa`: an iterate this many times the norm bound of a contracting series)."""


def _series_scale(A: CurvatureOperator, damping: float, history: SolveHistory) -> tuple[float | None, str]:
    """``eta = 1 / (lambda_max + damping)`` of a Neumann series, ``lambda_max`` by Lanczos to 1%.

    Its products are counted in ``history``. Returns ``(None, why)`` when
    ``lambda_max + damping <= 0`` (no positive scale makes the series converge:
    the status ``"non-positive-curvature"``).
    """
    from curvkit.linalg.eigen import eigenvalues

    top = eigenvalues(A, k=1, which="largest", tol=1e-2, return_vectors=False)
    history.matvecs += top.matvecs
    largest = top.values[0].item() + damping
    if not largest > 0:
        return None, f"the largest eigenvalue of A + damping I is {largest:.3g} <= 0"
    return 1.0 / largest, ""


@fixed_model_state()
def neumann(
    A: CurvatureOperator,
    B: Tensor,
    *,
    damping: float,
    tol: float,
    maxiter: int,
    x0: Tensor | None = None,
    preconditioner: CurvatureOperator | None = None,
    callback: Callable[[Tensor], Mapping[str, float]] | None = None,
    scale: float | None = None,
) -> SolveResult:
    """The truncated Neumann series ``eta sum_j (I - eta (A + damping I))^j B`` (Richardson iteration).

    ``x <- x + eta r``, ``r <- r - eta (A + damping I) r``: one product per term.
    It converges when the spectrum of ``eta (A + damping I)`` lies in ``(0, 2)``; by
    default ``eta = 1 / (lambda_max + damping)`` with ``lambda_max`` estimated by
    :func:`curvkit.eigenvalues` (to 1%, its products counted). A residual above
    :data:`DIVERGENCE` times ``||B||`` (an eigenvalue of ``A + damping I`` at or
    below zero, or a ``scale`` too large) stops the series as diverging.
    Convergence is confirmed by the true residual
    (:meth:`~curvkit.linalg.solve.SolveHistory.confirmed`).

    Args:
        scale: ``eta``; ``None`` estimates it.
    """
    if preconditioner is not None:
        raise CurvkitError("neumann takes no preconditioner; use cg")
    if scale is not None:
        scale = positive_number(scale, "scale")
    history = SolveHistory(A, damping, B, callback)
    if scale is None:
        scale, why = _series_scale(A, damping, history)
        if scale is None:
            return history.result(torch.zeros_like(B), "non-positive-curvature", why, 0, float("nan"))
    X, R = history.initial(B, x0)
    history.record(0, R.norm(dim=0), X)

    def cycle(X: Tensor, R: Tensor, done: int, budget: int) -> tuple[Tensor, int, str | SolveResult]:
        residual = (R.norm(dim=0) / history.norms).max().item()
        for step in range(1, budget + 1):
            if residual <= tol:
                return X, step - 1, "claimed"
            iteration = done + step
            AR = history.apply(R)
            if not bool(torch.isfinite(AR).all()):
                return X, step, history.non_finite(X, iteration, history.last_residual)
            X = X + scale * R
            R = R - scale * AR
            residual = history.record(iteration, R.norm(dim=0), X)
            if not residual <= DIVERGENCE:
                why = (
                    f"diverging at iteration {iteration} (relative residual {residual:.3g}): the spectrum of "
                    f"{scale:.3g} (A + damping I) is not inside (0, 2); add damping, lower the scale, or use "
                    "minres"
                )
                return X, step, history.result(X, "diverging", why, iteration, residual)
        return X, budget, "claimed" if residual <= tol else "maxiter"

    return history.confirmed(B, X, R, tol=tol, maxiter=maxiter, cycle=cycle)


@fixed_model_state()
def lissa(
    A: CurvatureOperator,
    B: Tensor,
    *,
    damping: float,
    tol: float,
    maxiter: int,
    x0: Tensor | None = None,
    preconditioner: CurvatureOperator | None = None,
    callback: Callable[[Tensor], Mapping[str, float]] | None = None,
    scale: float | None = None,
    batch_size: int | None = None,
    repeats: int = 1,
    seed: int = 0,
    check_every: int | None = None,
) -> SolveResult:
    """LiSSA: the Neumann series with a fresh mini-batch per step, repeats averaged.

    The recursion of N. Agarwal, B. Bullins and E. Hazan ("Second-order
    stochastic optimization for machine learning in linear time", JMLR 18, 2017),
    as P. W. Koh and P. Liang use it for influence functions ("Understanding
    black-box predictions via influence functions", ICML 2017):

    .. math:: x_0 = v, \\qquad x_j = v + (I - \\eta (A_{S_j} + \\text{damping}\\, I)) x_{j-1},
              \\qquad \\text{answer } \\eta x_{\\text{depth}},

    where ``A_{S_j}`` is the *same estimator* on a fresh random mini-batch
    ``S_j`` of ``batch_size`` distinct samples of the operator's problem
    (:meth:`curvkit.Problem.subset` and :meth:`curvkit.ProblemOperator.with_problem`:
    any :class:`~curvkit.ProblemOperator`, a plugin's too), drawn by a CPU
    generator seeded with ``seed``. Each ``A_{S_j}`` is an unbiased estimate of
    ``A`` (for ``reduction="sum"`` it is scaled by ``N / batch_size``) drawn
    independently of ``x_{j-1}``, so ``E[eta x_j]`` follows the deterministic
    series: ``eta sum_{i<=j} (I - eta (A + damping I))^i v``, which tends to
    ``(A + damping I)^-1 v``. ``repeats`` independent recursions are averaged
    to lower the variance. With ``batch_size = N`` it is the Neumann series
    (:func:`neumann` with ``maxiter = depth + 1`` and the same ``scale``), up to
    rounding. A warm start ``x0`` starts each recursion at ``x0 / eta``.

    An operator without data (no ``problem``: a :class:`~curvkit.DenseOperator`,
    a sum or a multiple of operators) is used whole at every step, which makes
    this the Neumann series (``batch_size`` is not used); ``reason`` says so.

    **What is measured.** A stochastic iterate's residual is unknown without a
    product with the full operator. With ``check_every=None`` (default) none is
    made: the history's residuals are NaN, ``residual`` is NaN and ``converged``
    is ``False`` (``status``: ``"unmeasured"``; ``reason``: ``"depth reached: ...
    (stochastic: residual not measured; ...)"``). With ``check_every=c`` the
    relative residual of the current repeat's iterate ``eta x_j`` is computed with
    the full operator every ``c`` steps, and that of the returned average after the
    last step, so ``converged`` is then that measurement against ``tol`` (above it:
    the status ``"maxiter"``); the run does not stop early. Its products are counted.

    A step stops the run on a non-finite value (returning the average of the
    finished repeats and the current one's last finite iterate) or when the
    iterate's norm exceeds :data:`DIVERGENCE` times ``||x_0|| + j ||v||``, a bound
    that every contracting step respects: the spectrum of
    ``eta (A_S + damping I)`` leaves ``[0, 2]``, as a mini-batch's curvature
    larger than the full data's can make it with the default scale.

    Counts: ``matvecs`` counts every column multiplied, on mini-batches and
    with the full operator (the scale estimate, the checks); the history's
    ``samples`` (data-backed operators) counts the samples those products
    passed through the model. The operator's own counters see only its
    full-data products.

    Args:
        maxiter: ``depth``: the steps (one mini-batch product each) of every repeat.
        scale: ``eta``; ``None`` estimates ``1 / (lambda_max + damping)`` of the
            full operator like :func:`neumann` (to 1%, its products counted).
        batch_size: Samples per mini-batch, at most ``N``; default
            ``min(N, problem.batch_size)``: one of the problem's batches, the most
            its batching lets one product hold.
        repeats: Independent recursions averaged.
        seed: Seed of the mini-batches (a CPU generator; the same draws on every
            device).
        check_every: Measure the residual every this many steps (see above);
            ``None``: never.

    Raises:
        CurvkitError: A preconditioner, or a ``scale``,
            ``batch_size``, ``repeats`` or ``check_every`` out of range.
    """
    if preconditioner is not None:
        raise CurvkitError("lissa takes no preconditioner; use cg")
    repeats = integer(repeats, "repeats")
    check_every = integer(check_every, "check_every", allow_none=True)
    if scale is not None:
        scale = positive_number(scale, "scale")
    sample = _MiniBatches(A, batch_size, seed)
    history = SolveHistory(A, damping, B, callback, extra=sample.counts)
    if scale is None:
        scale, why = _series_scale(A, damping, history)
        if scale is None:
            return history.result(torch.zeros_like(B), "non-positive-curvature", why, 0, float("nan"))
    depth, K = maxiter, B.shape[1]
    start = B.clone() if x0 is None else x0 / scale
    bounds = start.norm(dim=0), B.norm(dim=0)  # ||x_j|| <= ||x_0|| + j ||v|| while every step contracts
    tiny = torch.finfo(B.dtype).tiny
    total = torch.zeros_like(B)
    residual = history.record(0, None, scale * start)
    iteration = 0
    for repeat in range(repeats):
        X = start.clone()
        for j in range(1, depth + 1):
            iteration += 1
            history.matvecs += K
            AX = sample().matmat(X)
            X_next = B + X - scale * (AX + damping * X if damping else AX)
            if not bool(torch.isfinite(X_next).all()):
                return history.non_finite((total + scale * X) / (repeat + 1), iteration, residual)
            X = X_next
            growth = (X.norm(dim=0) / (bounds[0] + j * bounds[1]).clamp_min(tiny)).max().item()
            if not growth <= DIVERGENCE:
                history.record(iteration, None)
                return history.result(
                    (total + scale * X) / (repeat + 1),
                    "diverging",
                    f"diverging at iteration {iteration} (repeat {repeat + 1}, step {j}): the iterate's "
                    f"norm is {growth:.3g} times the bound ||x_0|| + j ||v|| of a contracting series, so the "
                    f"spectrum of {scale:.3g} (A_S + damping I) left [0, 2] ({sample.source}); lower the "
                    "scale, raise batch_size or damping",
                    iteration,
                    float("nan"),
                )
            if repeat == repeats - 1 and j == depth:
                break  # the answer's residual is measured below, if asked
            estimate = (total + scale * X) / (repeat + 1)  # the answer so far, for a callback
            if check_every is not None and j % check_every == 0:
                residual = history.record(iteration, (B - history.apply(scale * X)).norm(dim=0), estimate)
            else:
                history.record(iteration, None, estimate)
        total = total + scale * X
    X = total / repeats
    done = f"depth reached: {repeats} repeat(s) of {depth} steps on {sample.source}"
    if check_every is None:
        history.record(iteration, None, X)
        why = f"{done} (stochastic: residual not measured; pass check_every to measure it)"
        return history.result(X, "unmeasured", why, iteration, float("nan"))
    return history.measured(
        B, X, iteration, tol, "maxiter", f"{done}: relative residual {{residual}} measured"
    )


class _MiniBatches:
    """LiSSA's operators: the estimator on a fresh random mini-batch per call (see :func:`lissa`).

    Attributes:
        source: What the steps multiply with, in words (for ``reason``).
    """

    def __init__(self, A: CurvatureOperator, batch_size: int | None, seed: int):
        self.A = A
        self.generator = torch.Generator().manual_seed(int(seed))
        self.samples, self.passes = 0, 0
        if not data_backed(A):
            self.source = (
                f"the whole operator at every step: {type(A).__name__} has no data to sample, so this is "
                "the Neumann series"
            )
            return
        problem = A.problem
        self.N = N = problem.num_samples()
        if batch_size is None:
            self.batch_size = min(N, problem.batch_size)
        else:
            self.batch_size = integer(batch_size, "batch_size")
        if self.batch_size > N:
            raise CurvkitError(f"batch_size must be an integer in 1..{N} (the samples), got {batch_size!r}")
        # an unbiased estimate of A: a mean over the samples is one already, a sum is scaled up
        self.weight = N / self.batch_size if problem.loss.reduction == "sum" else 1.0
        problem.ensure_deterministic()  # once, on the full data; the mini-batches share the record
        self.source = f"mini-batches of {self.batch_size} of {N} samples"
        self.passes = A.data_passes

    def counts(self) -> dict[str, float]:
        """The history's ``samples``: those of the mini-batch products and of the full-data ones since."""
        if not data_backed(self.A):
            return {}
        return {"samples": self.samples + (self.A.data_passes - self.passes) * self.N}

    def __call__(self) -> CurvatureOperator:
        if not data_backed(self.A):
            return self.A
        chosen = torch.randperm(self.N, generator=self.generator)[: self.batch_size]
        self.samples += self.batch_size
        batch = self.A.with_problem(self.A.problem.subset(chosen))
        return batch if self.weight == 1.0 else self.weight * batch
