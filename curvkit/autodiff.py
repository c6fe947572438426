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

**Gradient-graph reuse.** Building the gradient graph (forward plus
``create_graph`` backward) is most of an HVP's cost. When the graphs of all
batches fit in ``graph_cache_bytes`` (measured with saved-tensor hooks while they
are built), :class:`HessianVectorProduct` keeps them and later products only run
the second backward pass. The cache is dropped as soon as a parameter or buffer
of the model changes (see :meth:`~curvkit.Problem.current_snapshot`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.func import grad as func_grad
from torch.func import jvp, vmap

from curvkit.errors import CurvkitError
from curvkit.problem import ModelSnapshot, Problem

__all__ = ["HVP_STRATEGIES", "HessianVectorProduct", "default_graph_cache_bytes", "make_batch_hvp"]

HVP_STRATEGIES = ("auto", "reverse", "batched-reverse", "forward-over-reverse")
AUTO_TRIALS = 3  # timed products per way before "auto" chooses (see HessianVectorProduct._trial)


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


class _Graph:
    """Gradient graph of the full loss w.r.t. leaf copies of the parameters."""

    def __init__(self, leaves: list[Tensor], grads: list[Tensor | None], count: int, snapshot: ModelSnapshot):
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


class HessianVectorProduct:
    """``H @ M`` for the full-dataset loss of a problem, ``M`` of shape ``[P, K]``.

    Args:
        problem: The problem.
        strategy: One of :data:`HVP_STRATEGIES` (see the module docstring).
        cache_graph: Keep the gradient graphs between products: ``"auto"`` (when
            they fit in ``graph_cache_bytes``), ``True`` or ``False``.
        graph_cache_bytes: Memory budget for kept graphs (default
            :func:`default_graph_cache_bytes`).
    """

    def __init__(
        self,
        problem: Problem,
        strategy: str = "auto",
        cache_graph: bool | str = "auto",
        graph_cache_bytes: int | None = None,
    ):
        if strategy not in HVP_STRATEGIES:
            raise CurvkitError(f"unknown HVP strategy {strategy!r}; use one of {list(HVP_STRATEGIES)}")
        if cache_graph not in (True, False, "auto"):
            raise CurvkitError(f"cache_graph must be True, False or 'auto', got {cache_graph!r}")
        self.problem = problem
        self.strategy = strategy
        self.cache_graph = cache_graph
        self.graph_cache_bytes = (
            default_graph_cache_bytes() if graph_cache_bytes is None else graph_cache_bytes
        )
        self._graph: _Graph | None = None
        self._batched_wins: dict[int, bool] = {}
        self._trial_times: dict[int, dict[bool, list[float]]] = {}
        self.data_passes = 0

    def clear_cache(self) -> None:
        """Drop the kept gradient graphs (frees their memory)."""
        self._graph = None

    @property
    def graph_cached(self) -> bool:
        """Whether gradient graphs are currently kept."""
        return self._graph is not None

    def __call__(self, M: Tensor, snapshot: ModelSnapshot | None = None) -> Tensor:
        """``H @ M`` for ``M`` of shape ``[P, K]``.

        Args:
            M: The K directions, flat.
            snapshot: The model state verified for this product (from
                :meth:`~curvkit.Problem.current_snapshot`); looked up when omitted.
        """
        problem = self.problem
        snapshot = snapshot if snapshot is not None else problem.current_snapshot()
        V = [v.movedim(-1, 0) for v in problem.layout.unflatten(M)]  # [K, *shape] each
        with torch.enable_grad():
            if self.strategy == "forward-over-reverse":
                return self._forward_over_reverse(V)
            graph = self._graph
            if graph is not None and graph.snapshot is snapshot:
                return self._apply(graph.grads, graph.leaves, V).mul_(problem.normalizer(graph.count))
            self._graph = None
            return self._build_and_apply(V, snapshot)

    # --------------------------------------------------------------- reverse
    def _build_and_apply(self, V: list[Tensor], snapshot: ModelSnapshot) -> Tensor:
        problem = self.problem
        leaves = [p.detach().requires_grad_(True) for p in problem.params]
        keep = self.cache_graph is not False
        budget = float("inf") if self.cache_graph is True else self.graph_cache_bytes
        saved = _SavedBytes()
        pending: list[Tensor | None] | None = None
        out = None
        count = 0
        self.data_passes += 1
        with problem.evaluation():
            for inputs, targets in problem.batches():
                with saved.hooks() if keep else contextlib.nullcontext():
                    s, c = problem.loss_terms(leaves, inputs, targets)
                    g = list(torch.autograd.grad(s, leaves, create_graph=True, allow_unused=True))
                count += c
                if keep:
                    pending = g if pending is None else _add(pending, g)
                    if saved.total > budget:
                        keep = False
                        out = _acc(out, self._apply(pending, leaves, V))
                        pending = None
                else:
                    out = _acc(out, self._apply(g, leaves, V))
        if pending is not None:
            out = _acc(out, self._apply(pending, leaves, V))
            if keep:
                self._graph = _Graph(leaves, pending, count, snapshot)
        return out.mul_(problem.normalizer(count))

    def _apply(self, grads: list[Tensor | None], leaves: list[Tensor], V: list[Tensor]) -> Tensor:
        """Second backward pass: ``d/dtheta <g, v>`` for each of the K vectors, as ``[P, K]``."""
        used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        K = V[0].shape[0]
        if not used:
            return torch.zeros(self.problem.layout.dim, K, dtype=V[0].dtype, device=V[0].device)
        args = ([grads[i] for i in used], [leaves[i] for i in used], [V[i] for i in used], used)
        if K == 1 or self.strategy == "reverse":
            return self._looped(*args)
        if self.strategy == "batched-reverse":
            return self._batched(*args)
        if K in self._batched_wins:
            return self._batched(*args) if self._batched_wins[K] else self._looped(*args)
        return self._trial(K, *args)

    def _trial(self, K: int, *args: object) -> Tensor:
        """``"auto"``: alternate looped and batched backward passes while timing them.

        The first ``2 * AUTO_TRIALS`` products with K columns alternate between the
        two ways (looped first); then the one with the smaller best time is kept
        for K. The trials are real products, so choosing costs no extra work. A
        batched pass that fails (an operator without a batching rule) loses at once.
        """
        times = self._trial_times.setdefault(K, {False: [], True: []})
        batched = len(times[True]) < len(times[False])
        start = time.perf_counter()
        try:
            out = (self._batched if batched else self._looped)(*args)
        except RuntimeError:
            if not batched:
                raise
            self._batched_wins[K] = False
            return self._looped(*args)
        times[batched].append(time.perf_counter() - start)
        if len(times[True]) >= AUTO_TRIALS:
            self._batched_wins[K] = min(times[True]) < min(times[False])
        return out

    def _looped(
        self, outputs: list[Tensor], leaves: list[Tensor], V: list[Tensor], used: list[int]
    ) -> Tensor:
        """One backward pass per vector through the kept graph."""
        columns = []
        for k in range(V[0].shape[0]):
            hv = torch.autograd.grad(outputs, leaves, [v[k] for v in V], retain_graph=True, allow_unused=True)
            columns.append([_flat_or_zeros(h, p, 1) for h, p in zip(hv, leaves)])
        if len(columns) == 1:
            return self._assemble(columns[0], used)
        return self._assemble([torch.cat(parts, dim=1) for parts in zip(*columns)], used)

    def _batched(
        self, outputs: list[Tensor], leaves: list[Tensor], V: list[Tensor], used: list[int]
    ) -> Tensor:
        """All vectors in one vectorised backward pass (``is_grads_batched``)."""
        hv = torch.autograd.grad(
            outputs, leaves, V, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
        K = V[0].shape[0]
        return self._assemble([_flat_or_zeros(h, p, K) for h, p in zip(hv, leaves)], used)

    def _assemble(self, parts: list[Tensor], used: list[int]) -> Tensor:
        """Stack per-parameter ``[numel, K]`` blocks of the ``used`` parameters into ``[P, K]``."""
        layout = self.problem.layout
        if len(used) == len(layout.numels):
            return torch.cat(parts, dim=0)
        out = parts[0].new_zeros(layout.dim, parts[0].shape[1])
        for part, i in zip(parts, used):
            out[layout.offsets[i] : layout.offsets[i] + layout.numels[i]] = part
        return out

    # ---------------------------------------------------- forward-over-reverse
    def _forward_over_reverse(self, V: list[Tensor]) -> Tensor:
        problem = self.problem
        params = [p.detach() for p in problem.params]
        out, count = None, 0
        self.data_passes += 1
        with problem.evaluation():
            for inputs, targets in problem.batches():
                counts: list[int] = []

                def loss_fn(*ps: Tensor, inputs=inputs, targets=targets, counts=counts) -> Tensor:
                    s, c = problem.loss_terms(ps, inputs, targets)
                    counts.append(c)
                    return s

                hv = make_batch_hvp(loss_fn, "forward-over-reverse")(params, V)
                count += counts[0]
                flat = torch.cat([h.reshape(h.shape[0], -1) for h in hv], dim=1).T
                out = _acc(out, flat)
        return out * problem.normalizer(count)


def _flat_or_zeros(h: Tensor | None, like: Tensor, K: int) -> Tensor:
    """A parameter's products as ``[numel, K]``: from ``[*shape]`` (K = 1) or ``[K, *shape]``."""
    if h is None:
        return like.new_zeros(like.numel(), K)
    return h.reshape(-1, 1) if K == 1 and h.shape == like.shape else h.reshape(K, -1).T


def _add(a: list[Tensor | None], b: list[Tensor | None]) -> list[Tensor | None]:
    return [x if y is None else y if x is None else x + y for x, y in zip(a, b)]


def _acc(total: Tensor | None, part: Tensor) -> Tensor:
    return part if total is None else total + part
