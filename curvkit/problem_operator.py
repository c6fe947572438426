"""The template for data-backed operators: curvature of a :class:`~curvkit.Problem`.

Every data-backed curvature in curvkit is a sum over the data, normalised to the
full-dataset loss ``L = (1/C) sum_b S_b``:

.. math:: A V = \\frac{1}{C} \\sum_b A_b V,

where ``A_b V`` is one batch's contribution (the Hessian of ``S_b``, its
Gauss-Newton matrix, ...). A :class:`ProblemOperator` owns everything but
``A_b V``:

* the loop over batches, in evaluation mode, with the sums and counts and their
  normalisation (:meth:`~curvkit.Problem.batch_sums` and
  :meth:`~curvkit.Problem.full_data`: the one loop of curvkit, and the one point
  where a data-parallel run reduces);
* the determinism probe before the first product of a model state, and the
  snapshot of that state, passed to the product as an argument;
* the data-pass counter;
* for Monte-Carlo estimators (``STOCHASTIC``), a generator seeded for each
  product (see below);
* the estimator's options, captured once at construction, which rebuild it on
  another problem (:meth:`with_problem`): a block of parameters (:meth:`restrict`),
  a mini-batch of the data (:meth:`~curvkit.Problem.subset`);
* a check that a product comes back as ``[P, K]`` (a diagonal as ``[P]``) in the
  operator's dtype and on its device (a :class:`~curvkit.PluginError` naming the
  estimator otherwise).

A subclass implements **one** of:

* :meth:`batch_product` ``(params, inputs, targets, V, generator) -> (sum, count)``:
  one batch's contribution, a pure function of its arguments that can be tested
  on its own (the usual case); or
* :meth:`_product` ``(M, snapshot) -> A M``: the whole product, for estimators
  built from other operators, or that reuse work between products (the Hessian
  keeps gradient graphs); data-backed sums must still go through
  :meth:`~curvkit.Problem.full_data`.

and may implement, when one batch's contribution to the diagonal is cheap (far
cheaper than ``P`` products):

* :meth:`batch_diagonal` ``(params, inputs, targets, generator) -> (sum, count)``:
  one batch's contribution to ``diag(A)``, per parameter, not yet normalised.
  A subclass that defines it gets ``CHEAP_DIAGONAL = True`` and a
  :meth:`~curvkit.CurvatureOperator.diagonal` made by the same loop, reduction
  and normalisation as its products, with the same samples (a Monte-Carlo
  estimator's generator is seeded as for a product), so it is the diagonal of
  the very map the products apply. Without it, ``diagonal()`` is the generic one
  from products with basis vectors.

**Monte-Carlo estimators.** ``STOCHASTIC`` means the products come from random
samples (of targets, of probes). With a seed such an estimator is a *fixed*
linear map: every product draws the same samples from a generator seeded with
:attr:`seed`, so the operator is symmetric, repeatable, and one ``matmat`` equals
its stacked ``matvec`` s, and every analysis applies to it. ``seed=None`` draws a
seed once, at construction (fresh randomness, still a fixed map). An operator
whose products draw fresh samples every time sets ``RESAMPLES``: it is not a
fixed linear map, so eigenvalues, densities and the checks refuse it; trace
estimators accept it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from curvkit.distributed import process_seed, shared_seed
from curvkit.operator import ConvertedOperator, CurvatureOperator, _resolve_names
from curvkit.problem import ModelSnapshot, Problem
from curvkit.registry import keyword_options

__all__ = ["ProblemOperator", "data_backed", "sample_count"]


class ProblemOperator(CurvatureOperator):
    """Base class of curvature operators defined by a problem's loss and data.

    Args:
        problem: The problem whose curvature this is.
        seed: Seed of a Monte-Carlo estimator's samples (``STOCHASTIC``); ``None``
            draws one. Ignored by deterministic estimators.

    Attributes:
        problem: The problem.
        options: The estimator's constructor arguments other than the problem, as
            given (captured by the base, whatever the subclass's signature).
        seed: The seed in use (``None`` for deterministic estimators).
        name: The registered name (set by :func:`curvkit.curvature`; the class
            name otherwise), used in error messages.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "batch_diagonal" in vars(cls) and "CHEAP_DIAGONAL" not in vars(cls):
            cls.CHEAP_DIAGONAL = True

    def __new__(cls, *args: Any, **kwargs: Any) -> ProblemOperator:
        self = super().__new__(cls)
        self.options = _constructor_options(cls, self, args, kwargs)
        return self

    def __init__(self, problem: Problem, *, seed: int | None = None):
        super().__init__(problem.layout, dtype=problem.dtype, device=problem.device)
        self.problem = problem
        self.name = type(self).__name__
        self.seed: int | None = None
        if self.STOCHASTIC:
            self.seed = shared_seed() if seed is None else int(seed)  # not the global RNG; one per run
        self.products = 0

    # ---------------------------------------------------------------- subclasses
    def batch_product(
        self,
        params: Sequence[Tensor],
        inputs: Any,
        targets: Tensor,
        V: Sequence[Tensor],
        generator: torch.Generator | None,
    ) -> tuple[Sequence[Tensor], float]:
        """One batch's contribution ``A_b V`` and its count of loss terms ``c_b``.

        Args:
            params: The selected parameters (detached), in the layout's order.
            inputs: The batch's inputs, on the problem's device and dtype.
            targets: The batch's targets.
            V: Per parameter, the ``K`` directions as a ``[K, *shape]`` tensor.
            generator: For ``STOCHASTIC`` estimators, the product's generator
                (a CPU :class:`torch.Generator`: draw there and move); ``None``
                otherwise.

        Returns:
            Per parameter, the batch's ``[K, *shape]`` sum of terms (not yet
            normalised), and the batch's count (from the problem's loss).
        """
        raise NotImplementedError(f"{type(self).__name__} implements neither batch_product nor _product")

    def batch_diagonal(
        self,
        params: Sequence[Tensor],
        inputs: Any,
        targets: Tensor,
        generator: torch.Generator | None,
    ) -> tuple[Sequence[Tensor], float]:
        """One batch's contribution to ``diag(A)`` and its count ``c_b`` (optional).

        Arguments as for :meth:`batch_product`, without ``V``.

        Returns:
            Per parameter, the batch's sum of diagonal terms (of the parameter's
            shape, not yet normalised), and the batch's count.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement batch_diagonal")

    def _product(self, M: Tensor, snapshot: ModelSnapshot) -> Tensor:
        """``A @ M`` for ``M`` of shape ``[P, K]`` and the model state ``snapshot``.

        The default makes one pass over the data with :meth:`batch_product`.
        """
        V = [v.movedim(-1, 0) for v in self.problem.layout.unflatten(M)]  # [K, *shape] each

        def per_batch(
            params: Sequence[Tensor], inputs: Any, targets: Tensor, generator: torch.Generator | None
        ) -> tuple[Sequence[Tensor], float]:
            return self.batch_product(params, inputs, targets, V, generator)

        parts = self._data_pass(per_batch)
        return torch.cat([part.reshape(part.shape[0], -1) for part in parts], dim=1).T

    def _diagonal(self) -> Tensor:
        """``diag(A)`` in one pass over the data with :meth:`batch_diagonal`."""
        self.problem.ensure_deterministic(self.problem.current_snapshot())
        parts = self._data_pass(self.batch_diagonal)
        return torch.cat([part.reshape(-1) for part in parts])

    def _data_pass(self, per_batch: Callable[..., tuple[Sequence[Tensor], float]]) -> Any:
        """``per_batch(params, inputs, targets, generator)`` summed over the data and normalised.

        One pass, counted, with the detached parameters and the product's generator.
        """
        params = [p.detach() for p in self.problem.params]
        generator = self.product_generator()
        self.data_passes += 1
        return self.problem.data_mean(lambda inputs, targets: per_batch(params, inputs, targets, generator))

    # ------------------------------------------------------------------ template
    def product_generator(self) -> torch.Generator | None:
        """The generator of the next product's samples (``None`` unless ``STOCHASTIC``).

        Seeded with :attr:`seed` for every product, so that the estimator is a
        fixed linear map; with ``RESAMPLES``, seeded with ``seed`` plus the number
        of products so far, a new (reproducible) draw each time. In a data-parallel
        run each process draws its shard's samples from its own stream
        (:func:`curvkit.distributed.process_seed`).
        """
        if not self.STOCHASTIC:
            return None
        seed = self.seed + (self.products if self.RESAMPLES else 0)
        return torch.Generator().manual_seed(process_seed(seed, self.problem.data_parallel))

    def _matmat(self, M: Tensor) -> Tensor:
        snapshot = self.problem.current_snapshot()
        self.problem.ensure_deterministic(snapshot)
        out = self._product(M, snapshot)
        self.products += 1
        return self._check_result(out, tuple(M.shape), f"a product with {tuple(M.shape)}")

    def restrict(self, params: str | Sequence[str]) -> CurvatureOperator:
        """The same estimator on a block of parameters, differentiating only those.

        Built from the captured :attr:`options` on the restricted problem; a
        Monte-Carlo estimator keeps its seed, so the block is that of the same map.
        """
        return self.with_problem(self.problem.with_params(_resolve_names(self.layout, params)))

    def with_problem(self, problem: Problem) -> ProblemOperator:
        """The same estimator on another problem, built from the captured :attr:`options`.

        For instance on a mini-batch of the data (:meth:`~curvkit.Problem.subset`:
        the ``lissa`` solver's stochastic products) or on a block of parameters
        (:meth:`restrict`). A Monte-Carlo estimator keeps its seed; the name is
        kept too.
        """
        options = dict(self.options)
        takes = keyword_options(type(self).__init__, positional=2)  # self, problem; None: **kwargs
        if self.STOCHASTIC and (takes is None or "seed" in takes):
            options["seed"] = self.seed
        other = type(self)(problem, **options)
        other.name = self.name
        return other


def _constructor_options(cls: type, self: Any, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of ``cls(*args, **kwargs)`` other than the problem, by name, as given."""
    signature = inspect.signature(cls.__init__)
    try:
        bound = signature.bind(self, *args, **kwargs)
    except TypeError:  # __init__ will say what is wrong (or a copy is being made)
        return dict(kwargs)
    given = dict(bound.arguments)
    given.pop(next(iter(signature.parameters)))  # self
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in given:
            given.update(given.pop(name))
    given.pop("problem", None)
    return given


def data_backed(A: Any) -> bool:
    """Whether ``A`` is computed from a problem's data and can be rebuilt on another problem.

    A :class:`ProblemOperator`, or one converted to another dtype
    (:meth:`~curvkit.CurvatureOperator.astype`); both have ``problem`` and
    ``with_problem``. Mini-batch solvers (``lissa``) and approximations built on
    the operator's problem (the ``kfac`` solver) need one.
    """
    if isinstance(A, ConvertedOperator):
        return data_backed(A.op)
    return isinstance(A, ProblemOperator)


def sample_count(A: Any) -> int | None:
    """The number of samples ``N`` of a data-backed operator's problem (:func:`data_backed`), else ``None``.

    :meth:`curvkit.Problem.num_samples`: one pass over the data, nothing
    computed; what the bounds of :attr:`curvkit.SolverSpec.sample_checks` and
    :attr:`curvkit.kinds.AnalysisKind.check_dimension` are checked against.
    """
    return A.problem.num_samples() if data_backed(A) else None
