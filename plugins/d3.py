"""The third-derivative contraction ``d3``: how the Hessian changes along a direction.

For a direction ``u`` fixed at construction, ``d3`` is the ``P x P`` operator

.. math:: T(u) = \\frac{d}{dt} H(\\theta + t u) \\Big|_{t=0},
   \\qquad T(u)_{ij} = \\sum_k \\frac{\\partial^3 L}{\\partial\\theta_i
   \\partial\\theta_j \\partial\\theta_k} u_k,

the third-derivative tensor of the full-dataset loss contracted with ``u`` (by default
the full-data gradient at construction). It is symmetric and, in general, indefinite;
its spectrum along the gradient says how fast the curvature changes in the direction
gradient descent moves (P. Wolinski, "Adapting Newton's method to neural networks
through a summary of higher-order derivatives", arXiv:2312.03885, 2023).

One batch's product ``T_b(u) V = d/dt [H_b(theta + t u) V]`` is forward-mode
differentiation of its Hessian-vector products: :func:`torch.func.jvp` along ``u``
of ``theta -> H_b(theta) V`` (pullbacks of :func:`torch.func.grad`, vectorised over
the ``K`` columns with :func:`torch.func.vmap`), or, the same numbers by plain
autograd, ``d/dtheta <H_b(theta) u, v>`` per column through the graph of ``H_b u``;
``strategy="auto"`` times both and keeps the faster (:mod:`curvkit.choice`; on the
bundled MLP on CPU the autograd way, about twice a Hessian-vector product, the
forward way about four times at ``K = 1``). The template of
:class:`curvkit.ProblemOperator` sums the batches, so the product belongs to the
full-dataset loss and does not depend on the batch size.

**Normalisation layers.** torch 2.13's third derivatives through the fused
normalisation kernels are wrong, so every product runs under
:class:`curvkit.CompositeNorms` (see :mod:`curvkit.composite_norms`).

The spec's reference, :class:`D3Reference`, is exact and computed without the
estimator's code (plain autograd on each batch, summed by the problem).
``curvkit analyze --check`` solves it by Lanczos in float64 (``O(k)`` products, any
``P``); :func:`dense_d3_reference` is its dense matrix, which ``tests/test_d3.py`` checks
against central differences of dense Hessians.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import grad as func_grad
from torch.func import jvp, vjp, vmap

import curvkit
from curvkit import CompositeNorms
from curvkit.autodiff import backward_products
from curvkit.choice import Choice, strategy_choice

__all__ = [
    "D3_WAYS",
    "DIRECTIONS",
    "D3Operator",
    "D3Reference",
    "d3_batch_product",
    "dense_d3_reference",
    "resolve_direction",
]

DIRECTIONS = curvkit.DIRECTIONS
"""The named directions (:data:`curvkit.DIRECTIONS`); a ``[P]`` tensor is the third way."""


# ----------------------------------------------------------------------------- the product
D3_WAYS = ("forward", "reverse")
"""The ways of a product: ``jvp`` over the Hessian-vector products, or reverse mode thrice."""


def d3_batch_product(
    problem: curvkit.Problem,
    params: Sequence[Tensor],
    inputs: Any,
    targets: Tensor,
    U: Sequence[Tensor],
    V: Sequence[Tensor],
    way: str = "forward",
) -> tuple[list[Tensor], float]:
    """One batch's ``T_b(u) V = d/dt [H_b(theta + t u) V]`` at ``t = 0``, and its count ``c_b``.

    ``H_b`` is the Hessian of the sum ``S_b`` of the batch's loss terms. A pure
    function, computed under :class:`CompositeNorms` in one of two ways:

    * ``"forward"``: :func:`torch.func.jvp` along ``U`` of the batch's
      Hessian-vector products with the ``K`` columns of ``V`` (pullbacks of
      :func:`torch.func.grad`, vectorised with :func:`torch.func.vmap`);
    * ``"reverse"``: plain autograd thrice: the gradient, ``H_b u = d/dtheta <g, u>``
      with its graph, then one backward pass per column,
      ``T_b(u) v = d/dtheta <H_b u, v>`` (the third-derivative tensor is symmetric).

    Args:
        problem: Provides the model call and the loss.
        params: The selected parameters (detached).
        inputs: The batch's inputs.
        targets: The batch's targets.
        U: The direction, per parameter (each of the parameter's shape).
        V: Per parameter, ``[K, *shape]`` columns.
        way: ``"forward"`` or ``"reverse"``.

    Returns:
        Per parameter, the ``[K, *shape]`` products (not normalised), and the count.

    Example:
        >>> model = torch.nn.Linear(1, 1, bias=False).double()
        >>> problem = curvkit.Problem(model, lambda o, y: (o**4).mean(), (torch.ones(1, 1), torch.zeros(1)))
        >>> w = torch.tensor([[2.0]], dtype=torch.float64)  # S = w^4: S''' = 24 w = 48
        >>> one = torch.ones(1, 1, dtype=torch.float64)
        >>> inputs, targets = next(problem.batches())
        >>> [d3_batch_product(problem, [w], inputs, targets, [one], [one[None]], way)[0][0].item()
        ...  for way in D3_WAYS]
        [48.0, 48.0]
    """
    if way == "reverse":
        return _reverse_product(problem, params, inputs, targets, U, V)
    if way != "forward":
        raise curvkit.CurvkitError(f"unknown d3 way {way!r}; use one of {list(D3_WAYS)}")
    counts: list[float] = []
    argnums = tuple(range(len(params)))

    def loss(*ps: Tensor) -> Tensor:
        total, count = problem.loss_terms(ps, inputs, targets)
        counts.append(count)
        return total

    def hessian_products(*ps: Tensor) -> tuple[Tensor, ...]:
        _, pullback = vjp(func_grad(loss, argnums=argnums), *ps)
        return vmap(pullback)(tuple(V))

    with CompositeNorms():
        _, out = jvp(hessian_products, tuple(params), tuple(U))
    return list(out), counts[0]


def _reverse_product(problem, params, inputs, targets, U, V):
    """``d3_batch_product(way="reverse")``: reverse over reverse over reverse, plain autograd."""
    leaves = [p.detach().requires_grad_(True) for p in params]
    with torch.enable_grad(), CompositeNorms():
        total, count = problem.loss_terms(leaves, inputs, targets)
        grads = torch.autograd.grad(total, leaves, create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        hu: list[Tensor | None] = [None] * len(leaves)
        if used:
            products = torch.autograd.grad(
                [grads[i] for i in used],
                [leaves[i] for i in used],
                [U[i] for i in used],
                create_graph=True,
                allow_unused=True,
            )
            for i, h in zip(used, products):
                hu[i] = h
        return backward_products(hu, leaves, V), count


def resolve_direction(problem: curvkit.Problem, direction: str | Tensor, seed: int | None = 0) -> Tensor:
    """The flat ``[P]`` direction ``u`` of :class:`D3Operator`, in the problem's dtype and device.

    :func:`curvkit.resolve_direction`, its errors calling it the d3 direction.

    Args:
        problem: The problem.
        direction: ``"gradient"`` (the full-data gradient, one pass over the data),
            ``"random"`` (standard normal, from ``seed``) or a ``[P]`` floating-point tensor.
        seed: Seed of ``"random"`` (``None``: a fresh one).

    Raises:
        ShapeMismatchError: A tensor that is not ``[P]`` or not floating-point.
        CurvkitError: Another name or type, a tensor not finite.
    """
    return curvkit.resolve_direction(problem, direction, seed, what="d3 direction")


class D3Operator(curvkit.ProblemOperator):
    """``T(u) = d/dt H(theta + t u)`` at ``t = 0``: the third derivative of the loss along ``u``.

    ``T(u)_ij = sum_k d^3 L / (dtheta_i dtheta_j dtheta_k) u_k`` for the full-dataset
    loss ``L``. Symmetric, indefinite, exact. Each product is one pass over the
    data with :func:`d3_batch_product`; ``matmat`` computes its ``K`` columns in
    that pass.

    The direction is **fixed at construction**: ``"gradient"`` is the gradient at
    the parameters the operator was built at, and stays that vector if the model
    changes afterwards (the products use the new parameters, the old direction).

    Args:
        problem: The problem.
        direction: ``"gradient"`` (default: the full-data gradient), ``"random"``
            (a standard normal vector drawn from ``seed``) or a flat ``[P]`` tensor.
            Not normalised: ``T(u)`` is linear in ``u``.
        seed: Seed of the ``"random"`` direction.
        strategy: ``"auto"`` (default: times both ways on the first products, per
            number of columns and batch size, and keeps the faster), ``"forward"``
            (``jvp`` over the Hessian-vector products) or ``"reverse"`` (plain
            autograd thrice); see :func:`d3_batch_product`. A pinned way gives
            bit-for-bit repeatable products.

    Attributes:
        direction: The flat ``[P]`` direction ``u`` in use.

    Raises:
        CurvkitError: An unknown direction or strategy, a tensor that is not finite.
        ShapeMismatchError: A direction tensor that is not ``[P]`` or not floating-point.

    Example:
        >>> model = torch.nn.Linear(1, 1, bias=False).double()
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(2.0)
        >>> problem = curvkit.Problem(model, lambda o, y: (o**4).mean(), (torch.ones(3, 1), torch.zeros(3)))
        >>> T = curvkit.curvature("d3", problem, direction=torch.ones(1, dtype=torch.float64))
        >>> T.to_dense()  # L = w^4: T(1) = L''' = 24 w
        tensor([[48.]], dtype=torch.float64)
    """

    SYMMETRIC, PSD, EXACT, STOCHASTIC = True, False, True, False

    def __init__(
        self,
        problem: curvkit.Problem,
        direction: str | Tensor = "gradient",
        seed: int = 0,
        strategy: str = "auto",
    ):
        super().__init__(problem)
        self.strategy = strategy
        self.way: Choice = strategy_choice(strategy, D3_WAYS)
        self.direction = resolve_direction(problem, direction, seed)
        self._direction_parts = list(problem.layout.unflatten(self.direction))

    def batch_product(self, params, inputs, targets, V, generator):
        U = self._direction_parts
        return self.way(
            lambda way: d3_batch_product(self.problem, params, inputs, targets, U, V, way=way),
            key=(V[0].shape[0], len(targets)),
        )

    def restrict(self, params: str | Sequence[str]) -> curvkit.CurvatureOperator:
        """The block ``T(u)[S, S]``, by embedding in the full space (one full product per product).

        The direction moves every parameter, so a block is not the same estimator on
        fewer parameters (that would move those alone).
        """
        return curvkit.CurvatureOperator.restrict(self, params)

    def with_problem(self, problem: curvkit.Problem) -> D3Operator:
        """The same estimator, with the same direction, on another problem over the same parameters.

        For instance on a mini-batch of the data or a float64 copy: the direction is
        not recomputed there (it is cast to the new dtype and device).

        Raises:
            ShapeMismatchError: The problem differentiates other parameters (use
                :meth:`restrict` for a block).
        """
        if problem.param_names != self.problem.param_names or problem.dim != self.problem.dim:
            raise curvkit.ShapeMismatchError(
                "a d3 operator's direction is fixed over its parameters; with_problem needs a problem "
                "over the same parameters (use restrict() for a block)"
            )
        options = {**self.options, "direction": self.direction}
        other = type(self)(problem, **options)
        other.name = self.name
        return other


@curvkit.hookimpl
def curvkit_register_estimators() -> list[curvkit.EstimatorSpec]:
    return [
        curvkit.EstimatorSpec(
            name="d3",
            factory=D3Operator,
            description="Third derivative of the loss along a direction (the gradient): d/dt H(theta + t u).",
            reference=D3Reference,
        ),
    ]


# ----------------------------------------------------------------------------- the reference
class D3Reference(curvkit.CurvatureOperator):
    """``T(u)`` by plain autograd on each batch's loss, summed by the problem: the spec's reference.

    ``T(u)`` is the Hessian of ``phi(theta) = <grad L(theta), u>`` (the
    third-derivative tensor is symmetric), so ``T(u) v`` is the gradient of
    ``<H u, v>``. For each batch, :func:`torch.autograd.grad` differentiates the sum
    of its loss terms three times (``g``, then ``H u = grad <g, u>`` with their
    graphs, then one backward pass per column ``v``), under :class:`CompositeNorms`;
    :meth:`curvkit.Problem.data_mean` sums the batches and normalises. The same
    mathematics as the estimator's ``"reverse"`` way, computed without its code
    (neither :func:`d3_batch_product` nor the template of
    :class:`curvkit.ProblemOperator`), and without the ``"forward"`` way's
    :func:`torch.func` transforms. One product is one pass over the data, holding
    one batch's graph at a time.

    ``curvkit analyze --check`` solves it by Lanczos in float64 to a relative
    residual of ``1e-10`` (``O(k)`` products, any ``P``), as it solves another
    estimator's named reference; :func:`dense_d3_reference` is its dense matrix
    (``P`` columns), which ``tests/test_d3.py`` checks against central differences
    of dense Hessians.

    Args:
        problem: The problem.
        direction: As for :class:`D3Operator` (default: the gradient).
        seed: As for :class:`D3Operator`.
    """

    SYMMETRIC, PSD, EXACT, STOCHASTIC = True, False, True, False

    def __init__(self, problem: curvkit.Problem, direction: str | Tensor = "gradient", seed: int = 0):
        super().__init__(problem.layout, dtype=problem.dtype, device=problem.device)
        self._problem = problem
        self._direction = problem.layout.unflatten(resolve_direction(problem, direction, seed))

    def _matmat(self, M: Tensor) -> Tensor:
        problem, U = self._problem, self._direction
        leaves = [p.detach().requires_grad_(True) for p in problem.params]

        def flat(parts: Sequence[Tensor | None]) -> Tensor:
            return torch.cat(
                [(torch.zeros_like(p) if d is None else d).reshape(-1) for d, p in zip(parts, leaves)]
            )

        def per_batch(inputs: Any, targets: Tensor) -> tuple[Tensor, float]:
            total, count = problem.loss_terms(leaves, inputs, targets)
            grads = torch.autograd.grad(total, leaves, create_graph=True, allow_unused=True)
            phi = sum((g * u).sum() for g, u in zip(grads, U) if g is not None and g.requires_grad)
            if not isinstance(phi, Tensor) or not phi.requires_grad:
                return torch.zeros_like(M), count
            hu = flat(torch.autograd.grad(phi, leaves, create_graph=True, allow_unused=True))
            if not hu.requires_grad:
                return torch.zeros_like(M), count
            columns = [
                flat(torch.autograd.grad(hu, leaves, M[:, j], retain_graph=True, allow_unused=True))
                for j in range(M.shape[1])
            ]
            return torch.stack(columns, dim=1), count

        with torch.enable_grad(), CompositeNorms():
            return problem.data_mean(per_batch)


def dense_d3_reference(
    problem: curvkit.Problem, direction: str | Tensor = "gradient", seed: int = 0
) -> Tensor:
    """The dense ``[P, P]`` ``T(u)`` of :class:`D3Reference`, 256 columns per pass over the data (small
    problems).

    ``tests/test_d3.py`` checks it against central differences of dense Hessians
    and against ``torch.func.jacfwd`` of a Hessian; the conformance battery
    compares the estimator with it.

    Args:
        problem: The problem.
        direction: As for :class:`D3Operator` (default: the gradient).
        seed: As for :class:`D3Operator`.
    """
    return D3Reference(problem, direction, seed).to_dense(max_dim=problem.dim)
