"""Autodiff primitives: Hessian-vector products of a :class:`~curvkit.Problem`.

The Hessian of the full-dataset loss ``L = (1/C) sum_b S_b`` applied to ``K``
vectors is ``H V = (1/C) sum_b d/dtheta <grad S_b(theta), V>`` (Pearlmutter,
"Fast exact multiplication by the Hessian", Neural Computation 1994). Three
ways of computing it are offered, because which is fastest depends on the model
and the device (see ``benchmarks/RESULTS.md``):

* ``"reverse"``: reverse-over-reverse. Build the gradient graph of each batch
  once (``create_graph=True``), then one backward pass per vector through it.
* ``"batched-reverse"``: the same graph, all ``K`` vectors in one vectorised
  backward pass (``torch.autograd.grad(..., is_grads_batched=True)``, i.e.
  :func:`torch.vmap` over the backward).
* ``"forward-over-reverse"``: :func:`torch.func.jvp` of :func:`torch.func.grad`,
  vectorised over the ``K`` vectors with :func:`torch.func.vmap`.

``"auto"`` (the default) uses the reverse graph; for ``K > 1`` its first six
products with K columns alternate between the looped and the batched backward
pass, timed, and then it keeps the faster (choosing costs no extra products).
The two passes compute the same product but round differently (in float32 the
columns differ by about one unit in the last place), so which one "auto" keeps,
and hence the last bits of a multi-vector product, can change from run to run;
``"reverse"`` or ``"batched-reverse"`` give the same bits on every run on one
machine.

One batch's product is the pure function :func:`hessian_batch_product`, which
the ``hessian`` estimator plugs into the template of
:class:`~curvkit.ProblemOperator` (one loop over the data, one reduction).

**Gradient-graph reuse.** Building the gradient graph (forward plus
``create_graph`` backward) is most of an HVP's cost. When the graphs of all
batches fit in ``graph_cache_bytes`` (measured with saved-tensor hooks while they
are built), :class:`HessianVectorProduct` keeps them and later products only run
the second backward pass. The cache is dropped as soon as a parameter or buffer
of the model changes (see :meth:`~curvkit.Problem.current_snapshot`). Its sums
go through the same loop and reduction (:meth:`~curvkit.Problem.batch_sums`,
:meth:`~curvkit.Problem.full_data`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import grad as func_grad
from torch.func import jvp, vmap

from curvkit.choice import AUTO_TRIALS, Choice
from curvkit.errors import CurvkitError
from curvkit.problem import ModelSnapshot, Problem

__all__ = [
    "AUTO_TRIALS",
    "HVP_STRATEGIES",
    "HessianVectorProduct",
    "backward_product",
    "backward_products",
    "default_graph_cache_bytes",
    "hessian_batch_product",
    "make_batch_hvp",
]

HVP_STRATEGIES = ("auto", "reverse", "batched-reverse", "forward-over-reverse")


def default_graph_cache_bytes() -> int:
    """Memory allowed for kept gradient graphs: 1 GiB, or ``CURVKIT_GRAPH_CACHE_BYTES``."""
    return int(os.environ.get("CURVKIT_GRAPH_CACHE_BYTES", str(2**30)))


def make_batch_hvp(
    loss_fn: Callable[..., Tensor], strategy: str = "forward-over-reverse"
) -> Callable[[Sequence[Tensor], Sequence[Tensor]], tuple[Tensor, ...]]:
    """A pure function ``(params, vectors) -> H(params) @ vectors`` for one loss.

    Args:
        loss_fn: ``loss_fn(*params) -> scalar``.
        strategy: ``"forward-over-reverse"`` (``jvp`` of ``grad``, vmapped) or
            ``"reverse"`` (``vjp`` of ``grad``, vmapped).

    Returns:
        A function taking the parameter tensors and, per parameter, a ``[K, *shape]``
        tensor of K directions, returning the K products per parameter.

    Example:
        >>> import torch
        >>> hvp = make_batch_hvp(lambda x: (x ** 3).sum())
        >>> x = torch.tensor([1.0, 2.0])
        >>> hvp([x], [torch.eye(2)])[0]  # H = diag(6 x)
        tensor([[ 6.,  0.],
                [ 0., 12.]])
    """
    argnums = None

    def gradient(*params: Tensor) -> tuple[Tensor, ...]:
        return func_grad(loss_fn, argnums=argnums)(*params)

    def batch_hvp(params: Sequence[Tensor], vectors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        nonlocal argnums
        argnums = tuple(range(len(params)))
        params = tuple(params)
        if strategy == "forward-over-reverse":
            one = lambda *v: jvp(gradient, params, tuple(v))[1]  # noqa: E731
        elif strategy == "reverse":
            _, vjp_fn = torch.func.vjp(gradient, *params)
            one = lambda *v: vjp_fn(tuple(v))  # noqa: E731
        else:
            raise CurvkitError(
                f"make_batch_hvp strategy must be 'forward-over-reverse' or 'reverse', got {strategy!r}"
            )
        return tuple(vmap(one)(*vectors))

    return batch_hvp


def backward_product(
    grads: Sequence[Tensor | None], leaves: Sequence[Tensor], v: Sequence[Tensor]
) -> list[Tensor]:
    """``d/dtheta <g, v>`` for one direction: :func:`backward_products` without the directions' dim.

    Args:
        grads: The gradient (with its graph, ``create_graph=True``) per leaf, or
            ``None`` for a leaf the loss does not depend on.
        leaves: The leaves it was taken with respect to.
        v: Per leaf, the direction, of the leaf's shape.

    Returns:
        Per leaf, the product, of the leaf's shape (zeros where nothing depends on it).
    """
    out = _through_graph(grads, leaves, v, batched=False)
    return [h if h is not None else torch.zeros_like(leaf) for h, leaf in zip(out, leaves)]


def backward_products(
    grads: Sequence[Tensor | None], leaves: Sequence[Tensor], V: Sequence[Tensor], batched: bool = False
) -> list[Tensor]:
    """``d/dtheta <g, v>`` for each of ``K`` directions: the second backward pass of an HVP.

    Args:
        grads: The gradient (with its graph, ``create_graph=True``) per leaf, or
            ``None`` for a leaf the loss does not depend on.
        leaves: The leaves it was taken with respect to.
        V: Per leaf, the directions as ``[K, *shape]``.
        batched: One vectorised backward pass (``is_grads_batched``) instead of
            one pass per direction (:func:`backward_product`).

    Returns:
        Per leaf, the ``[K, *shape]`` products (zeros where nothing depends on it).
    """
    K = V[0].shape[0]
    if not batched:
        products = [backward_product(grads, leaves, [v[k] for v in V]) for k in range(K)]
        if K == 1:
            return [h.unsqueeze(0) for h in products[0]]  # views, no copy
        return [torch.stack(per_direction) for per_direction in zip(*products)]
    out = _through_graph(grads, leaves, V, batched=True)
    return [h if h is not None else leaf.new_zeros(K, *leaf.shape) for h, leaf in zip(out, leaves)]


def _through_graph(
    grads: Sequence[Tensor | None], leaves: Sequence[Tensor], directions: Sequence[Tensor], batched: bool
) -> list[Tensor | None]:
    """Per leaf, ``d/dtheta <g, v>`` through the gradients that have a graph (``None`` elsewhere)."""
    out: list[Tensor | None] = [None] * len(leaves)
    used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if used:
        hv = torch.autograd.grad(
            [grads[i] for i in used], [leaves[i] for i in used], [directions[i] for i in used],
            retain_graph=True, allow_unused=True, is_grads_batched=batched,
        )  # fmt: skip
        for i, h in zip(used, hv):
            out[i] = h
    return out


def hessian_batch_product(
    problem: Problem,
    params: Sequence[Tensor],
    inputs: Any,
    targets: Tensor,
    V: Sequence[Tensor],
    strategy: str = "reverse",
) -> tuple[list[Tensor], float]:
    """One batch's Hessian products ``(d^2 S_b / dtheta^2) V`` and its count ``c_b``.

    A pure function of the parameters, the batch and the directions (``S_b`` is the
    sum of the batch's loss terms, see :meth:`~curvkit.Problem.loss_terms`).

    Args:
        problem: Provides the model call and the loss.
        params: The selected parameters (detached).
        inputs: The batch's inputs.
        targets: The batch's targets.
        V: Per parameter, ``[K, *shape]`` directions.
        strategy: ``"reverse"`` (a backward pass per direction), ``"batched-reverse"``
            (one vectorised backward pass) or ``"forward-over-reverse"``.

    Returns:
        Per parameter, the ``[K, *shape]`` products, and the batch's count.
    """
    if strategy == "forward-over-reverse":
        counts: list[float] = []

        def loss_fn(*ps: Tensor) -> Tensor:
            total, count = problem.loss_terms(ps, inputs, targets)
            counts.append(count)
            return total

        return list(make_batch_hvp(loss_fn, "forward-over-reverse")(params, V)), counts[0]
    leaves = [p.detach().requires_grad_(True) for p in params]
    with torch.enable_grad():
        total, count = problem.loss_terms(leaves, inputs, targets)
        grads = torch.autograd.grad(total, leaves, create_graph=True, allow_unused=True)
        return backward_products(grads, leaves, V, batched=strategy == "batched-reverse"), count


class _Graph:
    """Gradient graph of the full loss w.r.t. leaf copies of the parameters."""

    def __init__(
        self, leaves: list[Tensor], grads: list[Tensor | None], count: float, snapshot: ModelSnapshot
    ):
        self.leaves, self.grads, self.count, self.snapshot = leaves, grads, count, snapshot


class _SavedBytes:
    """Counts the bytes autograd saves for backward (distinct storages)."""

    def __init__(self) -> None:
        self.storages: set[int] = set()
        self.total = 0

    def pack(self, t: Tensor) -> Tensor:
        try:
            key, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage
            return t
        if key not in self.storages:
            self.storages.add(key)
            self.total += size
        return t

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


class _GraphSum:
    """The running sum of the batches' gradient graphs, while their memory fits ``budget``.

    A negative budget keeps nothing.
    """

    def __init__(self, budget: float):
        self.budget, self.saved = budget, _SavedBytes()
        self.grads: list[Tensor | None] | None = None
        self.open = budget >= 0

    def add(self, grads: list[Tensor | None]) -> list[Tensor | None] | None:
        """Add one batch's graphs; returns the graphs to apply now (``None`` while they are kept).

        The batch that exceeds the budget returns the whole sum so far, and every
        later batch its own graphs.
        """
        if not self.open:
            return grads
        self.grads = grads if self.grads is None else _add(self.grads, grads)
        if self.saved.total <= self.budget:
            return None
        self.open = False
        ready, self.grads = self.grads, None
        return ready


class HessianVectorProduct:
    """``H @ M`` for the full-dataset loss of a problem, reusing gradient graphs.

    The products equal those of :func:`hessian_batch_product` summed over the data;
    this class keeps the gradient graphs of all batches between products when they
    fit in ``graph_cache_bytes``, so that a product costs only the second backward
    pass, and (``strategy="auto"``) times the looped against the batched backward
    pass.

    Args:
        problem: The problem.
        strategy: ``"auto"``, ``"reverse"`` or ``"batched-reverse"`` (see the module
            docstring; ``"forward-over-reverse"`` keeps no graph and is a plain
            per-batch product).
        graph_cache_bytes: Memory budget for kept graphs (default
            :func:`default_graph_cache_bytes`).
    """

    def __init__(self, problem: Problem, strategy: str = "auto", graph_cache_bytes: int | None = None):
        if strategy not in ("auto", "reverse", "batched-reverse"):
            raise CurvkitError(f"graph reuse needs a reverse HVP strategy, got {strategy!r}")
        self.problem = problem
        self.strategy = strategy
        self.graph_cache_bytes = (
            default_graph_cache_bytes() if graph_cache_bytes is None else graph_cache_bytes
        )
        self._graph: _Graph | None = None
        # batched backward pass or not, per K: "auto" times them (see curvkit.choice)
        self.batched: Choice[bool, list[Tensor]] = Choice((False, True), trials=AUTO_TRIALS)
        if strategy != "auto":
            self.batched.pin(strategy == "batched-reverse")
        self.data_passes = 0

    def clear_cache(self) -> None:
        """Drop the kept gradient graphs (frees their memory)."""
        self._graph = None

    @property
    def graph_cached(self) -> bool:
        """Whether gradient graphs are currently kept."""
        return self._graph is not None

    def __call__(self, M: Tensor, snapshot: ModelSnapshot, keep: bool = True) -> Tensor:
        """``H @ M`` for ``M`` of shape ``[P, K]`` and the model state ``snapshot``.

        Args:
            M: The K directions, flat.
            snapshot: The model state verified for this product (from
                :meth:`~curvkit.Problem.current_snapshot`): kept graphs are reused
                only for the very same snapshot.
            keep: Keep the gradient graphs when they fit the budget (``False``:
                build them, use them once, drop them).
        """
        problem = self.problem
        V = [v.movedim(-1, 0) for v in problem.layout.unflatten(M)]  # [K, *shape] each
        with torch.enable_grad():
            graph = self._graph
            if graph is not None and graph.snapshot is snapshot:
                return problem.full_data(self._apply(graph.grads, graph.leaves, V), graph.count)
            self._graph = None
            return self._build_and_apply(V, snapshot, keep)

    def _build_and_apply(self, V: list[Tensor], snapshot: ModelSnapshot, keep: bool) -> Tensor:
        """One pass over the data building every batch's gradient graph, applied to ``V``."""
        problem = self.problem
        leaves = [p.detach().requires_grad_(True) for p in problem.params]
        graphs = _GraphSum(self.graph_cache_bytes if keep else -1.0)

        def per_batch(inputs: Any, targets: Tensor) -> tuple[Tensor | None, float]:
            with graphs.saved.hooks():
                total, count = problem.loss_terms(leaves, inputs, targets)
                grads = list(torch.autograd.grad(total, leaves, create_graph=True, allow_unused=True))
            ready = graphs.add(grads)
            return (None if ready is None else self._apply(ready, leaves, V)), count

        self.data_passes += 1
        local, count = problem.batch_sums(per_batch)
        if graphs.grads is not None:  # every batch's graph fitted: apply their sum, keep it
            local = _acc(local, self._apply(graphs.grads, leaves, V))
            self._graph = _Graph(leaves, graphs.grads, count, snapshot)
        return problem.full_data(local, count)

    def _apply(self, grads: list[Tensor | None], leaves: list[Tensor], V: list[Tensor]) -> Tensor:
        """Second backward pass for each of the K vectors, as a flat ``[P, K]``.

        One vector always takes the plain pass; for ``K > 1`` the looped or the
        batched pass, as :attr:`batched` decides (``"auto"``: the first
        ``2 * AUTO_TRIALS`` products with K columns alternate, timed, and the faster
        is kept; a batched pass that fails loses at once).
        """
        K = V[0].shape[0]
        if K == 1:
            return _flat(backward_products(grads, leaves, V, False))
        return _flat(self.batched(lambda batched: backward_products(grads, leaves, V, batched), key=K))


def _flat(parts: Sequence[Tensor]) -> Tensor:
    """Per-parameter ``[K, *shape]`` blocks as one flat ``[P, K]`` tensor."""
    return torch.cat([part.reshape(part.shape[0], -1) for part in parts], dim=1).T


def _add(a: list[Tensor | None], b: list[Tensor | None]) -> list[Tensor | None]:
    return [x if y is None else y if x is None else x + y for x, y in zip(a, b)]


def _acc(total: Tensor | None, part: Tensor) -> Tensor:
    return part if total is None else total + part
