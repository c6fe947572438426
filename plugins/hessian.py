"""The Hessian of the full-dataset loss: matrix-free (``hessian``) and dense (``exact-hessian``).

Products use Pearlmutter's trick (B. A. Pearlmutter, "Fast exact multiplication
by the Hessian", Neural Computation 6(1), 1994) through
:class:`curvkit.autodiff.HessianVectorProduct`, which picks reverse-over-reverse
with gradient-graph reuse by default (see ``benchmarks/RESULTS.md``).

The dense matrix is assembled from products with blocks of basis vectors,
never with ``torch.func.hessian``, which is wrong in torch 2.13 when LayerNorm
parameters are differentiated.
"""

from __future__ import annotations

from torch import Tensor

import curvkit
from curvkit.autodiff import HVP_STRATEGIES, HessianVectorProduct, hessian_batch_product


class HessianOperator(curvkit.ProblemOperator):
    """Matrix-free Hessian ``H = nabla^2 L(theta)`` of the full-dataset loss.

    One batch's product is :func:`curvkit.autodiff.hessian_batch_product`. With the
    reverse strategies the gradient graphs are kept between products when they fit
    in memory (:class:`curvkit.autodiff.HessianVectorProduct`), which gives the same
    products for the cost of the second backward pass only.

    Args:
        problem: The problem.
        strategy: ``"auto"``, ``"reverse"``, ``"batched-reverse"`` or
            ``"forward-over-reverse"`` (see :mod:`curvkit.autodiff`).
        cache_graph: Keep gradient graphs between products (``"auto"``: when they
            fit in ``graph_cache_bytes``).
        graph_cache_bytes: Memory budget for kept graphs.

    ``matmat`` computes all K products in one pass over the data.
    """

    SYMMETRIC, PSD, EXACT, STOCHASTIC = True, False, True, False

    def __init__(
        self,
        problem: curvkit.Problem,
        strategy: str = "auto",
        cache_graph: bool | str = "auto",
        graph_cache_bytes: int | None = None,
    ):
        super().__init__(problem)
        if strategy not in HVP_STRATEGIES:
            raise curvkit.CurvkitError(
                f"unknown HVP strategy {strategy!r}; use one of {list(HVP_STRATEGIES)}"
            )
        if cache_graph not in (True, False, "auto"):
            raise curvkit.CurvkitError(f"cache_graph must be True, False or 'auto', got {cache_graph!r}")
        self.strategy, self.cache_graph = strategy, cache_graph
        self.engine = None
        if strategy != "forward-over-reverse":  # graphs to reuse, and auto's timing
            budget = float("inf") if cache_graph is True else graph_cache_bytes
            self.engine = HessianVectorProduct(problem, strategy, budget)

    def batch_product(self, params, inputs, targets, V, generator):
        strategy = "reverse" if self.strategy == "auto" else self.strategy
        return hessian_batch_product(self.problem, params, inputs, targets, V, strategy)

    def _product(self, M: Tensor, snapshot: curvkit.ModelSnapshot) -> Tensor:
        if self.engine is None:
            return super()._product(M, snapshot)
        before = self.engine.data_passes
        out = self.engine(M, snapshot, keep=self.cache_graph is not False)
        self.data_passes += self.engine.data_passes - before
        return out

    def clear_cache(self) -> None:
        """Free the kept gradient graphs."""
        if self.engine is not None:
            self.engine.clear_cache()


class ExactHessianOperator(curvkit.ProblemOperator):
    """The dense Hessian, assembled from Hessian-vector products with basis vectors.

    Columns are computed ``block_size`` at a time (one pass over the data per
    block), so peak memory is the ``P x P`` result plus one block. The matrix is
    built on first use and rebuilt when the model's parameters change; it is
    symmetrised as ``(H + H^T) / 2`` to remove rounding asymmetry.

    Args:
        problem: The problem.
        block_size: Basis vectors per pass over the data.
        max_dim: Refuse problems with more parameters than this (default
            :func:`curvkit.operator.default_max_dense_dim`).
    """

    SYMMETRIC, PSD, EXACT, STOCHASTIC = True, False, True, False

    def __init__(self, problem: curvkit.Problem, block_size: int = 64, max_dim: int | None = None):
        super().__init__(problem)
        self._check_dense_size(max_dim)
        self.block_size = block_size
        self._hessian = HessianOperator(problem, cache_graph=False)
        self._matrix: Tensor | None = None
        self._snapshot: curvkit.ModelSnapshot | None = None

    @property
    def matrix(self) -> Tensor:
        """The dense ``[P, P]`` Hessian (built or rebuilt on demand)."""
        snapshot = self.problem.current_snapshot()
        if self._matrix is None or self._snapshot is not snapshot:
            H = self._hessian.to_dense(max_dim=self.shape[0], block_size=self.block_size)
            self.data_passes += self._hessian.data_passes
            self._hessian.data_passes = 0
            self._matrix, self._snapshot = (H + H.T) / 2, snapshot
        return self._matrix

    def _product(self, M: Tensor, snapshot: curvkit.ModelSnapshot) -> Tensor:
        return self.matrix @ M

    def to_dense(self, max_dim: int | None = None, block_size: int = 256) -> Tensor:
        self._check_dense_size(max_dim)
        return self.matrix.clone()


@curvkit.hookimpl
def curvkit_register_estimators() -> list[curvkit.EstimatorSpec]:
    return [
        curvkit.EstimatorSpec(
            name="hessian",
            factory=HessianOperator,
            description="Matrix-free Hessian of the full-dataset loss (Hessian-vector products).",
            reference="hessian",
        ),
        curvkit.EstimatorSpec(
            name="exact-hessian",
            factory=ExactHessianOperator,
            description="Dense Hessian built block by block from HVPs with basis vectors (small models).",
            reference="hessian",
        ),
    ]
