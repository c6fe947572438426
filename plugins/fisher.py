"""The true Fisher information (``fisher``): Monte-Carlo or in closed form.

For a loss that is a negative log-likelihood, ``l(y) = -log p(y | o)`` with
``o = f(theta, x)``, the Fisher of the full-dataset loss ``L = (1/C) sum_b S_b``
is

.. math::
    F = \\frac{1}{C} \\sum_n J_n^\\top\\,
        \\mathbb{E}_{y \\sim p(y \\mid o_n)}\\big[g_n(y)\\, g_n(y)^\\top\\big]\\, J_n,
    \\qquad g_n(y) = \\frac{\\partial s_n(o_n, y)}{\\partial o_n},

with ``s_n`` the sum of sample ``n``'s loss terms, ``J_n = do_n / dtheta`` and the
count ``C`` of the loss (S. Amari, "Natural gradient works efficiently in
learning", Neural Computation 10(2), 1998; J. Martens, "New insights and
perspectives on the natural gradient method", JMLR 21, 2020). The targets come
from the model's predictive distribution, not from the data.

``mode="exact"`` takes the expectation in closed form,
``F_out = E[g g^T] = Phi Phi^T`` with the loss's
:meth:`~curvkit.losses.BatchLoss.fisher_factor` ``Phi``, and multiplies
``J^T F_out J`` like the GGN. For the canonical-link losses (cross-entropy on
logits, mean squared error as a Gaussian of variance 1/2, binary cross-entropy on
logits) ``F_out`` is the output Hessian, so the exact Fisher *equals* the GGN
(Martens 2020, sec. 9.2). It differs for ``nll`` (NLL of log-probabilities is
linear in its inputs: zero GGN, Fisher ``diag(softmax(o))``) and for an
``ignore_index`` that names a real class (sampled targets equal to it count
nothing, so its outcome leaves the Fisher; see :mod:`curvkit.losses`).

``mode="mc"`` (the default) estimates the expectation with ``mc_samples`` draws
``y_s ~ p(y | o)`` per batch (:meth:`~curvkit.losses.BatchLoss.sample_targets`):
the output gradients ``g_s = dS_b(o, y_s) / do`` form a factor
``Phi = [g_1, ..., g_S] / sqrt(S)`` in the loss's layout, and the estimate is
``J^T Phi Phi^T J`` exactly as in exact mode:

.. math::
    \\hat F = \\frac{1}{C} \\sum_b \\frac{1}{S} \\sum_{s=1}^{S} \\sum_{(n, t) \\in b}
        J_{nt}^\\top g_{nt}(y_s)\\, g_{nt}(y_s)^\\top J_{nt},

with one outer product per sample ``n`` and position ``t`` (the blocks of
``BLOCK_DIAGONAL``; for a loss known only as a callable, one per batch). Per
block, ``E[g g^T]`` is the exact ``F_out``, so the estimate is unbiased. (The
outer product of a whole sample's gradient would add cross terms between its
positions, whose expectation vanishes only when the score has mean zero: not
when a sampled ``ignore_index`` counts nothing.) Products cost one forward-mode
``J V`` and one pullback per batch whatever ``S``, with no per-sample parameter
gradient. The draws come from the generator that the template seeds for every
product (:class:`curvkit.ProblemOperator`), so with a seed the estimator is one
fixed symmetric PSD matrix, the same for every product and for its diagonal;
another seed is another matrix. The draws depend on the batching (the generator
is consumed batch by batch), so different batch sizes give different, equally
valid, estimates.

Diagonals, in both modes: ``sum_r (J^T Phi[..., r])^2`` pulled back per sample and
position (:func:`curvkit.jacobians.factor_batch_diagonal`).
"""

from __future__ import annotations

import torch
from torch import Tensor

import curvkit
from curvkit.choice import Choice, strategy_choice
from curvkit.jacobians import (
    OUTPUT_SPACE_WAYS,
    factor_batch_diagonal,
    factor_product,
    monte_carlo_factor,
    output_curvature_batch_product,
    samples_interact,
)
from curvkit.layers import LayerDiagonals
from curvkit.losses import LOSS_NAMES, CustomLoss

MODES = ("mc", "exact")


class FisherOperator(curvkit.ProblemOperator):
    """The Fisher information of a negative log-likelihood: Monte-Carlo or exact.

    Args:
        problem: The problem; its loss must be a negative log-likelihood
            (``is_negative_log_likelihood``).
        mode: ``"mc"`` (default): targets drawn from the model's predictive
            distribution; ``"exact"``: the expectation in closed form (equal to
            the GGN for the canonical-link losses).
        mc_samples: Draws of targets per batch in ``"mc"`` mode.
        seed: Seed of the draws in ``"mc"`` mode (``None``: one drawn at
            construction); every product uses the same draws.
        strategy: How ``J^T Phi Phi^T J V`` is computed: ``"auto"`` (default),
            ``"forward"`` or ``"reverse"``, as for the ``ggn`` estimator (the draws
            are the same whichever way computes).

    Raises:
        NotNegativeLogLikelihoodError: The loss is not a negative log-likelihood.
        NoExactFisherError: ``mode="exact"`` for a loss known only by its sampler.
        CurvkitError: An unknown ``mode`` or ``strategy``, or a ``mc_samples``
            that is not an integer ``>= 1``.

    Example:
        >>> import torch
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64); y = torch.zeros(2, 1)
        >>> problem = curvkit.Problem(torch.nn.Linear(2, 1, bias=False).double(), "mse", (X, y))
        >>> F = curvkit.curvature("fisher", problem, mode="exact")
        >>> F @ torch.tensor([1.0, 1.0])  # the GGN of the squared error, X^T X here
        tensor([1.0000, 4.0000], dtype=torch.float64)
        >>> mc = curvkit.curvature("fisher", problem, mc_samples=2, seed=0)
        >>> torch.equal(mc @ torch.tensor([1.0, 1.0]), mc @ torch.tensor([1.0, 1.0]))
        True
    """

    SYMMETRIC, PSD, EXACT, STOCHASTIC = True, True, False, True  # the default mode, "mc"

    def __init__(
        self,
        problem: curvkit.Problem,
        mode: str = "mc",
        mc_samples: int = 1,
        seed: int | None = None,
        strategy: str = "auto",
    ):
        if mode not in MODES:
            raise curvkit.CurvkitError(f"unknown Fisher mode {mode!r}; use one of {', '.join(MODES)}")
        mc_samples = curvkit.arguments.integer(mc_samples, "mc_samples")
        loss = problem.loss
        if not loss.is_negative_log_likelihood:
            raise curvkit.NotNegativeLogLikelihoodError(
                f"the 'fisher' estimator (mode={mode!r}) needs a loss that is a negative log-likelihood; "
                f"loss {loss.name!r} is not one: use 'ggn' or 'empirical-fisher', or pass a loss object "
                "that provides a sampler (curvkit.losses.CustomLoss(fn, sample_targets=...))"
            )
        if mode == "exact" and isinstance(loss, CustomLoss):
            raise curvkit.NoExactFisherError(
                f"loss {loss.name!r} says how to sample its targets but has no closed-form Fisher: use "
                "the 'fisher' estimator with mode='mc' (it samples targets), or 'ggn'"
            )
        self.STOCHASTIC, self.EXACT = mode == "mc", mode == "exact"
        super().__init__(problem, seed=seed)
        self.mode, self.mc_samples, self.strategy = mode, mc_samples, strategy
        self.way: Choice = strategy_choice(strategy, OUTPUT_SPACE_WAYS)
        self.vectorize: Choice = Choice((True, False))
        self.layers = LayerDiagonals(problem)
        self.CHEAP_DIAGONAL = not samples_interact(problem)

    def output_factor(self, outputs: Tensor, targets: Tensor, generator: torch.Generator | None) -> Tensor:
        """``Phi`` with ``F_out = Phi Phi^T`` in the loss's layout: exact, or this batch's draws.

        In ``"mc"`` mode, the columns are ``dS_b(o, y_s)/do / sqrt(S)`` for
        ``mc_samples`` draws ``y_s ~ p(y | o)``, in the generator's order.
        """
        loss = self.problem.loss
        if self.mode == "exact":
            return loss.fisher_factor(outputs, targets)
        return monte_carlo_factor(loss, outputs, targets, generator, self.mc_samples)

    def batch_product(self, params, inputs, targets, V, generator):
        block_diagonal = self.problem.loss.BLOCK_DIAGONAL

        def curvature(outputs: Tensor, U: Tensor) -> Tensor:
            return factor_product(self.output_factor(outputs, targets, generator), U, block_diagonal)

        return self.way(
            lambda way: output_curvature_batch_product(
                self.problem, params, inputs, targets, V, curvature, way=way
            ),
            generator,
            key=(V[0].shape[0], len(targets)),
        )

    def batch_diagonal(self, params, inputs, targets, generator):
        return self.vectorize(
            lambda fast: factor_batch_diagonal(
                self.problem,
                params,
                inputs,
                targets,
                lambda outputs: self.output_factor(outputs, targets, generator),
                self.problem.loss.BLOCK_DIAGONAL,
                vectorize=fast,
                layers=self.layers,
            ),
            generator,
        )


@curvkit.hookimpl
def curvkit_register_estimators() -> list[curvkit.EstimatorSpec]:
    return [
        curvkit.EstimatorSpec(
            name="fisher",
            factory=FisherOperator,
            description="True Fisher: targets drawn from the model (mode='mc') or exact (mode='exact').",
            reference="fisher",
            reference_options={"mode": "exact"},
            losses=tuple(LOSS_NAMES),
        )
    ]
