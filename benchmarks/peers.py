"""Adapters: the same Hessian-vector product through each peer library.

Each adapter imports its library lazily and raises
:class:`~benchmarks.methods.MethodUnavailableError` when it is missing, so a row is
skipped with a note rather than failing the run. Every peer gets the whole data
set as **one batch** and ``nn.CrossEntropyLoss()`` (mean over the batch), so
that every library's normalisation (PyHessian's and hessian-eigenthings'
average of per-batch means, curvlinops' batch-size weighting, BackPACK's single
loss tensor) gives the same full-data mean loss as curvkit.

Peers without a Hessian-vector product are listed in :data:`NO_HVP` and only
appear in the report's notes.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import warnings
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from torch import Tensor

from benchmarks.methods import Method, MethodUnavailableError, Product, flatten
from benchmarks.problems import BenchProblem

__all__ = [
    "BACKENDS",
    "DISTRIBUTIONS",
    "NO_HVP",
    "PEER_METHODS",
    "backend_versions",
    "curvlinops_hessian",
    "peer_versions",
    "pyhessian_computer",
]

DISTRIBUTIONS = {
    "curvlinops": "curvlinops-for-pytorch",
    "pyhessian": "pyhessian",
    "backpack": "backpack-for-pytorch",
    "hessian_eigenthings": "hessian-eigenthings",
    "nngeometry": "nngeometry",
    "torch_optimizer": "torch-optimizer",
}
"""Import name -> distribution name of every peer."""

BACKENDS = {"scipy": "scipy", "linear_operator": "linear-operator"}
"""Import name -> distribution name of the libraries the peers' solvers run on: SciPy (``eigsh``,
curvlinops' LSMR inverse) and GPyTorch's ``linear_operator`` (curvlinops' CG inverse)."""

NO_HVP = {
    "nngeometry": "no Hessian-vector product: `Hessian(...)` only builds a dense `PMatDense` "
    "(with `torch.func.hessian`); `PMatImplicit` is for the Fisher/GGN",
    "torch_optimizer": "no public Hessian-vector product (`Adahessian` draws Hutchinson "
    "products inside its `step`)",
}


def _require(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken dependency failing at import
        raise MethodUnavailableError(f"{DISTRIBUTIONS[module]} not importable: {exc}") from exc


def peer_versions() -> dict[str, str]:
    """Installed version of each peer, or why it cannot be used."""
    versions = {}
    for module, dist in DISTRIBUTIONS.items():
        try:
            _require(module)
            versions[dist] = importlib.metadata.version(dist)
        except MethodUnavailableError as exc:
            versions[dist] = f"unavailable ({exc})"
    return versions


def backend_versions() -> dict[str, str]:
    """Installed version of each of :data:`BACKENDS`, or why it cannot be imported."""
    versions = {}
    for module, dist in BACKENDS.items():
        try:
            importlib.import_module(module)
            versions[dist] = importlib.metadata.version(dist)
        except Exception as exc:  # ImportError, or a broken dependency failing at import
            versions[dist] = f"unavailable ({type(exc).__name__}: {exc})"
    return versions


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the reference-cycle warning of ``backward(create_graph=True)``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _clear_grads(problem: BenchProblem) -> None:
    for p in problem.params:
        p.grad = None


def pyhessian_dataloader(problem: BenchProblem) -> Product:
    """PyHessian's ``dataloader_hv_product``: forward, double backward per vector, one batch."""
    pyhessian = _require("pyhessian")
    _clear_grads(problem)
    comp = pyhessian.hessian(
        problem.model,
        problem.criterion(),
        dataloader=[(problem.inputs, problem.targets)],
        cuda=problem.inputs.is_cuda,
    )

    def product(v: Tensor) -> Tensor:
        with _quiet():
            hv = comp.dataloader_hv_product(problem.split(v))[1]
        _clear_grads(problem)
        return flatten(hv)

    return product


def pyhessian_computer(problem: BenchProblem) -> Any:
    """PyHessian's ``hessian(..., data=(X, y))``: its gradient graph is built here, once, and kept
    in ``.gradsH``; the model's ``.grad`` fields are cleared before and after."""
    pyhessian = _require("pyhessian")
    _clear_grads(problem)
    with _quiet():
        comp = pyhessian.hessian(
            problem.model,
            problem.criterion(),
            data=(problem.inputs, problem.targets),
            cuda=problem.inputs.is_cuda,
        )
    _clear_grads(problem)
    return comp


def pyhessian_single_batch(problem: BenchProblem) -> Product:
    """PyHessian with ``data=(X, y)``: gradient graph built once at construction, reused."""
    pyhessian = _require("pyhessian")
    comp = pyhessian_computer(problem)
    return lambda v: flatten(pyhessian.hessian_vector_product(comp.gradsH, comp.params, problem.split(v)))


def curvlinops_hessian(problem: BenchProblem) -> Product:
    """curvlinops ``HessianLinearOperator @ x`` (``x`` of shape ``[P]`` or ``[P, K]``)."""
    curvlinops = _require("curvlinops")
    op = curvlinops.HessianLinearOperator(
        problem.model, problem.criterion(), problem.params, [(problem.inputs, problem.targets)]
    )
    return lambda x: op @ x


def backpack_hvp(problem: BenchProblem) -> Product:
    """BackPACK ``hessianfree.hvp.hessian_vector_product`` on a fresh loss per vector.

    It needs no ``extend()``: it is plain autograd (a gradient with
    ``create_graph=True``, then an R-operator by two more backward passes).
    """
    _require("backpack")
    from backpack.hessianfree.hvp import hessian_vector_product

    return lambda v: flatten(hessian_vector_product(problem.loss(), problem.params, problem.split(v)))


def eigenthings_hessian(problem: BenchProblem) -> Product:
    """hessian-eigenthings ``HessianOperator.matvec`` (autograd method, full data)."""
    he = _require("hessian_eigenthings")
    op = he.HessianOperator(
        problem.model, [(problem.inputs, problem.targets)], he.supervised_loss(problem.criterion())
    )
    return op.matvec


PEER_METHODS = (
    Method(
        "PyHessian dataloader_hv_product",
        "peer",
        pyhessian_dataloader,
        "`hessian(..., dataloader=[(X, y)])`: from scratch per vector, one batch",
    ),
    Method(
        "PyHessian single batch",
        "peer",
        pyhessian_single_batch,
        "`hessian(..., data=(X, y))` builds the gradient graph once; "
        "`pyhessian.hessian_vector_product(gradsH, params, v)`",
    ),
    Method(
        "curvlinops HessianLinearOperator",
        "peer",
        curvlinops_hessian,
        "`HessianLinearOperator(model, CrossEntropyLoss(), params, [(X, y)]) @ v`",
    ),
    Method(
        "BackPACK hessian_vector_product",
        "peer",
        backpack_hvp,
        "`backpack.hessianfree.hvp.hessian_vector_product(loss, params, v)`, fresh loss per vector",
    ),
    Method(
        "hessian-eigenthings HessianOperator",
        "peer",
        eigenthings_hessian,
        "`HessianOperator(model, [(X, y)], supervised_loss(CrossEntropyLoss())).matvec(v)`",
    ),
)
