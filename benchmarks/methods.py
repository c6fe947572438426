"""Hessian-vector products with curvkit and with raw PyTorch, as comparable methods.

A method turns a :class:`~benchmarks.problems.BenchProblem` into a function
``x -> H @ x`` of a flat ``[P]`` vector (or a ``[P, K]`` matrix where the method
supports it), ``H`` being the Hessian of the problem's full-data mean loss.
Setting up (building operators, a kept gradient graph) happens in ``make`` and
is not timed; the returned function is.

The raw PyTorch baselines:

* double backward: forward, gradient with ``create_graph=True``, and a second
  backward pass, all from scratch for every vector;
* double backward with graph reuse: the gradient graph built once, then one
  backward pass through it per vector (what curvkit does by default);
* forward-over-reverse: :func:`torch.func.jvp` of :func:`torch.func.grad`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor
from torch.func import functional_call, jvp
from torch.func import grad as func_grad

import curvkit
from benchmarks.problems import BenchProblem

__all__ = [
    "CURVKIT_HESSIAN",
    "CURVKIT_VARIANTS",
    "RAW_METHODS",
    "Method",
    "MethodUnavailableError",
    "Product",
    "curvkit_hessian",
    "flatten",
    "gradient",
    "looped",
]

Product = Callable[[Tensor], Tensor]
"""``x -> H @ x`` for a flat ``[P]`` vector (or ``[P, K]`` matrix, where supported)."""


class MethodUnavailableError(Exception):
    """A method cannot run here: its library is missing or does not support the model."""


@dataclass(frozen=True)
class Method:
    """A way of computing Hessian products, as a row of the results.

    Attributes:
        name: Row label.
        family: ``"curvkit"``, ``"raw torch"`` or ``"peer"``.
        make: ``problem -> product function`` (set-up, untimed); raises
            :class:`MethodUnavailableError` when the method cannot run.
        note: How the method is called, for the report.
    """

    name: str
    family: str
    make: Callable[[BenchProblem], Product]
    note: str = ""


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Per-parameter tensors as one flat, detached vector."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def looped(make: Callable[[BenchProblem], Product]) -> Callable[[BenchProblem], Product]:
    """A maker whose ``[P, K]`` product is K separate products of contiguous ``[P]`` columns."""

    def make_looped(problem: BenchProblem) -> Product:
        product = make(problem)
        return lambda M: torch.stack([product(column) for column in M.T.contiguous()], dim=1)

    return make_looped


def gradient(problem: BenchProblem) -> Callable[[], Tensor]:
    """One full-data loss and gradient (forward and backward), the unit of cost."""
    return lambda: flatten(torch.autograd.grad(problem.loss(), problem.params))


def curvkit_hessian(problem: BenchProblem, **options: object) -> Product:
    """``H @ x`` through ``curvkit.curvature("hessian", ...)`` with the given options."""
    H = curvkit.curvature("hessian", problem.curvkit_problem(), **options)
    return lambda x: H @ x


def raw_double_backward(problem: BenchProblem) -> Product:
    """Reverse-over-reverse from scratch: forward, ``create_graph`` gradient, backward."""
    params = problem.params

    def product(v: Tensor) -> Tensor:
        grads = torch.autograd.grad(problem.loss(), params, create_graph=True)
        return flatten(torch.autograd.grad(grads, params, problem.split(v)))

    return product


def raw_graph_reuse(problem: BenchProblem) -> Product:
    """Reverse-over-reverse through one gradient graph, built here and kept."""
    params = problem.params
    grads = torch.autograd.grad(problem.loss(), params, create_graph=True)
    return lambda v: flatten(torch.autograd.grad(grads, params, problem.split(v), retain_graph=True))


def raw_forward_over_reverse(problem: BenchProblem) -> Product:
    """Forward-over-reverse: ``torch.func.jvp`` of ``torch.func.grad`` of the functional loss."""
    names = [n for n, p in problem.model.named_parameters() if p.requires_grad]
    values = {n: p.detach() for n, p in problem.model.named_parameters() if p.requires_grad}
    criterion = problem.criterion()

    def loss(params: dict[str, Tensor]) -> Tensor:
        return criterion(functional_call(problem.model, params, (problem.inputs,)), problem.targets)

    def product(v: Tensor) -> Tensor:
        tangents = dict(zip(names, problem.split(v)))
        return flatten(list(jvp(func_grad(loss), (values,), (tangents,))[1].values()))

    return product


CURVKIT_HESSIAN = Method(
    "curvkit hessian",
    "curvkit",
    curvkit_hessian,
    "`H @ v`, default options (gradient graph kept between products; timed after a warm-up product)",
)

RAW_METHODS = (
    Method(
        "raw double backward",
        "raw torch",
        raw_double_backward,
        "forward + `grad(create_graph=True)` + backward, from scratch per vector",
    ),
    Method(
        "raw double backward, graph reused",
        "raw torch",
        raw_graph_reuse,
        "gradient graph built once (untimed), one backward pass per vector",
    ),
    Method(
        "raw forward-over-reverse",
        "raw torch",
        raw_forward_over_reverse,
        "`torch.func.jvp(torch.func.grad(loss))`, per vector",
    ),
)

CURVKIT_VARIANTS = (
    Method(
        "curvkit hessian, cache_graph=False",
        "curvkit",
        partial(curvkit_hessian, cache_graph=False),
        "no kept graph: the cost of a product after the parameters change",
    ),
)
