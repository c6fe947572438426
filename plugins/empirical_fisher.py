"""The empirical Fisher (``empirical-fisher``): outer products of per-sample gradients.

.. math::
    \\tilde F = \\frac{1}{C} \\sum_n g_n g_n^\\top, \\qquad
    g_n = \\nabla_\\theta s_n(\\theta),

where ``s_n`` is the sum of sample ``n``'s loss terms and ``C`` the count that
normalises the full-dataset loss ``L = (1/C) sum_n s_n``.

**Normalisation.** A *sample* is one entry of the batch's first dimension, and
``s_n`` sums all its terms, weighted as the loss weighs them: for sequence
outputs ``[N, C, T]`` its ``T`` positions, with ignored targets
(``ignore_index``) left out; for the mean squared error its output entries; for a
class-weighted cross-entropy its weighted term. ``C`` is the loss's count with
``reduction="mean"`` (the number of samples for plain classification; of
entries for the mean squared error; of targets not ignored, or the sum of their
class weights, for a cross-entropy) and 1 with ``reduction="sum"``. So
``(1/C) sum_n g_n`` is the gradient of ``L``, and with ``N`` samples and ``C = N``
it is the textbook ``(1/N) sum_n g_n g_n^T``. With one position per sample it
is the Monte-Carlo Fisher of the ``fisher`` estimator (the same terms, ``C`` and
normalisation) with the data's targets in place of targets drawn from the
model; with several positions per sample the Fisher's outer products are per
position, the empirical Fisher's per sample, whose cross terms between
positions have mean zero for targets drawn from a negative log-likelihood.

**It is not the Fisher.** The Fisher takes the expectation of ``g g^T`` over
targets from the model's predictive distribution; the empirical Fisher uses the
observed targets. Away from a perfect fit of a well-specified model the two
differ, and the empirical Fisher can be a poor curvature model: F. Kunstner,
L. Balles and P. Hennig, "Limitations of the empirical Fisher approximation for
natural gradient descent", NeurIPS 2019, show preconditioners built on it that
distort the gradient field even on linear regression, and that its similarity
to the Fisher holds under strong assumptions only. (At a minimum, where the
gradients vanish it vanishes.)

**Computation.** Per batch, the per-sample gradients
``G = [g_1; ...; g_N]`` (:func:`curvkit.jacobians.per_sample_gradients`: the
loss's output gradient for the batch, pulled back per sample by
:func:`torch.func.vmap` over the samples of :func:`torch.func.vjp`, or by a loop
over samples where ``vmap`` fails, decided once per operator); the product is
``G^T (G V)`` and the diagonal ``sum_n g_n^2``. Memory: ``N x P`` per batch.
A model that couples its samples (BatchNorm in training mode, with
``eval_mode=False``) has no per-sample gradients: refused.
"""

from __future__ import annotations

import torch

import curvkit
from curvkit.jacobians import TryOnce, check_independent_samples, per_sample_gradients


class EmpiricalFisherOperator(curvkit.ProblemOperator):
    """The empirical Fisher ``(1/C) sum_n g_n g_n^T`` of the full-dataset loss.

    Args:
        problem: The problem (its model must not couple samples).

    Raises:
        CurvkitError: The model couples the samples of a batch.

    Example:
        A linear model with the squared error: ``g_n = 2 (x_n^T w - y_n) x_n``.

        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]]); y = torch.tensor([[1.0], [1.0]])
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> _ = torch.nn.init.zeros_(model.weight)
        >>> E = curvkit.curvature("empirical-fisher", curvkit.Problem(model, "mse", (X, y)))
        >>> E.to_dense()  # g_1 = (-2, 0), g_2 = (0, -4), C = 2
        tensor([[2., 0.],
                [0., 8.]])
    """

    SYMMETRIC, PSD, EXACT, STOCHASTIC = True, True, True, False

    def __init__(self, problem: curvkit.Problem):
        check_independent_samples(problem, "the 'empirical-fisher' estimator")
        super().__init__(problem)
        self.vectorize: TryOnce = TryOnce()

    def gradients(self, params, inputs, targets) -> tuple[list[torch.Tensor], float]:
        """The batch's per-sample gradients (per parameter ``[N, *shape]``) and its count."""
        grads, _, count = self.vectorize(
            lambda fast: per_sample_gradients(self.problem, params, inputs, targets, vectorize=fast)
        )
        return grads, count

    def batch_product(self, params, inputs, targets, V, generator):
        grads, count = self.gradients(params, inputs, targets)
        N, K = grads[0].shape[0], V[0].shape[0]
        coefficients = sum(g.reshape(N, -1) @ v.reshape(K, -1).T for g, v in zip(grads, V))  # G V: [N, K]
        return [torch.tensordot(coefficients.T, g, dims=1) for g in grads], count

    def batch_diagonal(self, params, inputs, targets, generator):
        grads, count = self.gradients(params, inputs, targets)
        return [g.square().sum(dim=0) for g in grads], count


@curvkit.hookimpl
def curvkit_register_estimators() -> list[curvkit.EstimatorSpec]:
    return [
        curvkit.EstimatorSpec(
            name="empirical-fisher",
            factory=EmpiricalFisherOperator,
            description="Empirical Fisher (1/C) sum_n g_n g_n^T of per-sample gradients (not the Fisher).",
            reference="empirical-fisher",
        )
    ]
