"""The generalised Gauss-Newton matrix (``ggn``), matrix-free.

For the full-dataset loss ``L = (1/C) sum_b S_b`` with batch outputs
``o_b = f(theta, x_b)`` and Jacobians ``J_b = do_b / dtheta``,

.. math:: G = \\frac{1}{C} \\sum_b J_b^\\top H_b J_b, \\qquad H_b = \\frac{\\partial^2 S_b}{\\partial o_b^2},

the Hessian of the loss with the second-order term of the model dropped
(N. N. Schraudolph, "Fast curvature matrix-vector products for second-order
gradient descent", Neural Computation 14(7), 2002; J. Martens, "New insights and
perspectives on the natural gradient method", JMLR 21, 2020, sec. 8). It is
positive semi-definite for a loss convex in the outputs (every closed-form loss;
a custom callable's convexity is the user's to ensure).

A product is :func:`curvkit.jacobians.ggn_batch_product` per batch: ``J V`` by
forward mode, ``H_b (J V)`` from the loss's closed form, ``J^T (.)`` by reverse
mode, or all three with plain autograd (the double-vjp trick): ``strategy="auto"``
times both ways on the first products and keeps the faster per number of
directions and batch size, the plain-autograd way also being the fallback where
:mod:`torch.func` cannot transform the model (see :mod:`curvkit.choice`). The diagonal is
``(1/C) sum_b sum_r (J^T F_b[..., r])^2`` for the loss's output Hessian factor
``H_b = F_b F_b^T``, pulled back per sample and position
(:func:`curvkit.jacobians.factor_batch_diagonal`); for a model whose samples
interact (train-mode BatchNorm) the generic diagonal from products is used.
"""

from __future__ import annotations

import curvkit
from curvkit.choice import Choice, strategy_choice
from curvkit.jacobians import OUTPUT_SPACE_WAYS, factor_batch_diagonal, ggn_batch_product, samples_interact
from curvkit.layers import LayerDiagonals


class GGNOperator(curvkit.ProblemOperator):
    """Matrix-free generalised Gauss-Newton matrix ``J^T H_out J`` of the full-dataset loss.

    Args:
        problem: The problem.
        strategy: ``"auto"`` (default), ``"forward"`` (forward-mode ``J V`` and a
            vectorised pullback with :mod:`torch.func`) or ``"reverse"`` (plain
            autograd, the double-vjp trick); see :mod:`curvkit.jacobians`. A pinned
            way gives bit-for-bit repeatable products; ``"auto"`` may keep either.

    Raises:
        CurvkitError: An unknown ``strategy``.

    Example:
        For a linear model and the squared error, the GGN equals the Hessian,
        ``2/N X^T X`` (``N`` entries of the targets):

        >>> import torch
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64); y = torch.zeros(2, 1)
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> G = curvkit.curvature("ggn", curvkit.Problem(model, "mse", (X, y)))
        >>> G @ torch.tensor([1.0, 1.0])
        tensor([1., 4.], dtype=torch.float64)
        >>> torch.allclose(G.diagonal(), torch.tensor([1.0, 4.0], dtype=torch.float64))  # no products
        True
    """

    SYMMETRIC, PSD, EXACT, STOCHASTIC = True, True, True, False

    def __init__(self, problem: curvkit.Problem, strategy: str = "auto"):
        super().__init__(problem)
        self.strategy = strategy
        self.way: Choice = strategy_choice(strategy, OUTPUT_SPACE_WAYS)
        self.vectorize: Choice = Choice((True, False))
        self.layers = LayerDiagonals(problem)
        self.CHEAP_DIAGONAL = not samples_interact(problem)

    def batch_product(self, params, inputs, targets, V, generator):
        return self.way(
            lambda way: ggn_batch_product(self.problem, params, inputs, targets, V, way=way),
            key=(V[0].shape[0], len(targets)),
        )

    def batch_diagonal(self, params, inputs, targets, generator):
        loss = self.problem.loss
        return self.vectorize(
            lambda fast: factor_batch_diagonal(
                self.problem,
                params,
                inputs,
                targets,
                lambda outputs: loss.output_hessian_factor(outputs, targets),
                loss.BLOCK_DIAGONAL,
                vectorize=fast,
                layers=self.layers,
            )
        )


@curvkit.hookimpl
def curvkit_register_estimators() -> list[curvkit.EstimatorSpec]:
    return [
        curvkit.EstimatorSpec(
            name="ggn",
            factory=GGNOperator,
            description="Generalised Gauss-Newton J^T H_out J, by forward and reverse Jacobian products.",
            reference="ggn",
        )
    ]
