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

**Computation.** Two ways, chosen by ``strategy``:

* output space (``"forward"`` or ``"reverse"``, as for the ``ggn`` estimator):
  with the loss's output gradient ``r_n = ds_n / do_n`` per sample,
  ``g_n g_n^T = J_n^T r_n r_n^T J_n``, so a product is
  ``J^T (r_n <r_n, (J V)_n>)_n``: one Jacobian product and one pullback per batch
  (:func:`curvkit.jacobians.output_curvature_batch_product`), no per-sample
  parameter gradient, about the cost of a GGN product;
* ``"per-sample"``: the per-sample gradients ``G = [g_1; ...; g_N]``
  (:func:`curvkit.jacobians.per_sample_gradients`: :func:`torch.func.vmap` over
  the samples of :func:`torch.func.vjp`, or a loop over samples where ``vmap``
  fails), then ``G^T (G V)``: one costly pass whatever ``K``, so it wins for many
  directions on small models; memory ``N x P`` per batch, refused beyond
  :data:`PER_SAMPLE_BYTES`.

``"auto"`` (the default) times the ways on the first products and keeps the
fastest per number of directions and batch size (:mod:`curvkit.choice`). The
diagonal ``sum_n g_n^2`` comes from layer rules (``Linear``, ``Conv2d``: inputs and
output gradients, no per-sample gradients; :mod:`curvkit.layers`) and per-sample
pullbacks of the residuals for the other parameters
(:func:`curvkit.jacobians.sum_of_squared_pullbacks`). A model that couples
its samples (BatchNorm in training mode, with ``eval_mode=False``) has no
per-sample gradients: refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

import curvkit
from curvkit.choice import Choice, strategy_choice
from curvkit.jacobians import (
    OUTPUT_SPACE_WAYS,
    check_independent_samples,
    output_curvature_batch_product,
    output_gradient,
    per_sample_gradients,
    sum_of_squared_pullbacks,
)
from curvkit.layers import LayerDiagonals

WAYS = (*OUTPUT_SPACE_WAYS, "per-sample")
PER_SAMPLE_BYTES = 2**30
"""Largest per-batch ``N x P`` block of per-sample gradients a product may hold (1 GiB)."""


class PerSampleGradientsTooLargeError(curvkit.CurvkitError, MemoryError):
    """A batch's per-sample gradients would exceed :data:`PER_SAMPLE_BYTES`."""


def sample_outer_product(residuals: Tensor, U: Tensor) -> Tensor:
    """``r_n <r_n, U_n>`` for every sample ``n``: the empirical Fisher in output space.

    Args:
        residuals: ``[N, *o.shape[1:]]``, the output gradient of each sample.
        U: ``[K, N, *o.shape[1:]]``, directions in output space.
    """
    dots = (residuals.unsqueeze(0) * U).reshape(*U.shape[:2], -1).sum(-1)  # [K, N]
    return dots.reshape(*dots.shape, *(1,) * (residuals.ndim - 1)) * residuals


class EmpiricalFisherOperator(curvkit.ProblemOperator):
    """The empirical Fisher ``(1/C) sum_n g_n g_n^T`` of the full-dataset loss.

    Args:
        problem: The problem (its model must not couple samples).
        strategy: ``"auto"`` (default), ``"forward"``, ``"reverse"`` or
            ``"per-sample"`` (see the module docstring). A pinned way gives
            bit-for-bit repeatable products.

    Raises:
        CurvkitError: The model couples the samples of a batch, or an unknown
            ``strategy``.
        PerSampleGradientsTooLargeError: ``strategy="per-sample"`` and a batch's
            per-sample gradients exceed :data:`PER_SAMPLE_BYTES`.

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

    def __init__(self, problem: curvkit.Problem, strategy: str = "auto"):
        check_independent_samples(problem, "the 'empirical-fisher' estimator")
        super().__init__(problem)
        self.strategy = strategy
        self.way: Choice = strategy_choice(strategy, WAYS, errors=(RuntimeError, MemoryError))
        self.vectorize: Choice = Choice((True, False))
        self.layers = LayerDiagonals(problem)

    def gradients(self, params, inputs, targets) -> tuple[list[torch.Tensor], float]:
        """The batch's per-sample gradients (per parameter ``[N, *shape]``) and its count."""
        grads, _, count = self.vectorize(
            lambda fast: per_sample_gradients(self.problem, params, inputs, targets, vectorize=fast)
        )
        return grads, count

    def batch_product(self, params, inputs, targets, V, generator):
        return self.way(
            lambda way: self._batch_product(way, params, inputs, targets, V),
            key=(V[0].shape[0], len(targets)),
        )

    def _batch_product(self, way, params, inputs, targets, V):
        loss = self.problem.loss
        if way != "per-sample":

            def curvature(outputs: Tensor, U: Tensor) -> Tensor:
                return sample_outer_product(output_gradient(loss, outputs, targets), U)

            return output_curvature_batch_product(self.problem, params, inputs, targets, V, curvature, way)
        size = len(targets) * sum(p.numel() for p in params) * params[0].element_size()
        if size > PER_SAMPLE_BYTES:
            raise PerSampleGradientsTooLargeError(
                f"the per-sample gradients of a batch of {len(targets)} would take {size / 2**30:.1f} GiB "
                f"(limit {PER_SAMPLE_BYTES / 2**30:g} GiB): use strategy 'forward' or 'reverse', "
                "or smaller batches"
            )
        grads, count = self.gradients(params, inputs, targets)
        N, K = grads[0].shape[0], V[0].shape[0]
        coefficients = sum(g.reshape(N, -1) @ v.reshape(K, -1).T for g, v in zip(grads, V))  # G V: [N, K]
        return [torch.tensordot(coefficients.T, g, dims=1) for g in grads], count

    def batch_diagonal(self, params, inputs, targets, generator):
        loss = self.problem.loss

        def residuals(outputs: Tensor) -> Tensor:  # one cotangent per sample: [N, 1, ...]
            return output_gradient(loss, outputs, targets).unsqueeze(1)

        diagonal, outputs = self.vectorize(
            lambda fast: sum_of_squared_pullbacks(
                self.problem, params, inputs, residuals, self.layers, vectorize=fast
            )
        )
        return diagonal, loss.count(outputs, targets)


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
