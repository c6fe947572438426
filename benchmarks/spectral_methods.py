"""Spectral computations as comparable calls: top-k eigenvalues, trace estimates, spectral densities.

A :class:`SpectralMethod` turns a :class:`~benchmarks.problems.BenchProblem` into a
function of a seed that runs one whole computation (a top-5 eigensolve, one trace
estimate, one density) and returns its outcome with the number of Hessian-vector
products it used. Set-up happens in ``make`` and is not timed: operators are
built, gradient graphs are kept where the library keeps them (curvkit after its
first product, PyHessian's ``data=`` mode at construction) and one product is
done to warm caches, so every library is timed on its solver, not on its set-up.

Products are counted where they are applied (columns multiplied), not taken from
the libraries' own reports:

* curvkit: the operator's ``matvecs`` counter;
* PyHessian: calls of ``pyhessian.hessian``'s module-level ``hessian_vector_product``,
  wrapped for the duration of the call;
* curvlinops: columns passed to the operator's ``_matmat`` (which both ``op @ x``
  and ``op.to_scipy()`` reach);
* hessian-eigenthings: calls of the operator's ``matvec``.

Every peer gets the whole data set as one batch and ``nn.CrossEntropyLoss()``
(see :mod:`benchmarks.peers`), so all differentiate the same full-data mean loss.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import curvkit
from benchmarks.peers import _clear_grads, _quiet, _require, pyhessian_computer
from benchmarks.problems import BenchProblem

__all__ = [
    "DENSITY_METHODS",
    "EIGEN_METHODS",
    "K",
    "PYHESSIAN_TOLS",
    "RESIDUAL_TOLS",
    "TRACE_BUDGET",
    "TRACE_METHODS",
    "DensityOutcome",
    "EigenOutcome",
    "SpectralMethod",
    "TraceOutcome",
]

K = 5
"""Number of top eigenvalues."""

RESIDUAL_TOLS = (1e-4, 1e-3, 1e-2)
"""Tolerances of the curvkit and ARPACK rows: both stop on the relative residual
``||A v - lambda v|| <= tol * |lambda|_max`` (ARPACK: ``tol * |lambda|``). The goals compare each
library's fastest row that reached the 1e-4 accuracy target, so every solver is judged at the
loosest setting of the same ladder that does the job."""

EIGSH_TOL = 1e-4
"""ARPACK's tolerance for the row on curvkit's own operator."""

PYHESSIAN_DEFAULT = (100, 1e-3)
"""PyHessian's ``eigenvalues(maxIter, tol)`` defaults."""

PYHESSIAN_TOLS = (1e-4, 1e-5, 1e-6)
"""PyHessian's ladder (with ``maxIter=1000``): it stops when the Rayleigh quotient changes by
less than ``tol`` relative, which needs a tighter setting than a residual test for the same
accuracy. Timed over as many rounds as curvkit (1-15 s a solve): a single round of these
long solves varied by 30% between runs."""

PYHESSIAN_MAX_ITER = 1000

TRACE_BUDGET = 99
"""Products per trace estimate: divisible by 3 for curvlinops' Hutch++ (its XTrace needs an
even count and gets 98); curvkit's XTrace uses 98 of the 99."""

DENSITY_STEPS = 100
"""PyHessian's ``density(iter=100, n_v=1)`` default: Lanczos steps per run."""


@dataclass
class EigenOutcome:
    """One top-k solve.

    Attributes:
        values: Eigenvalues in the order the library returned them.
        matvecs: Products counted at the operator.
        converged: The library's own convergence flag (``None`` if it has none).
        residuals: curvkit's certificates ``||A v - lambda v||`` (else ``None``).
        reported_matvecs: The library's own count, where it reports one.
    """

    values: list[float]
    matvecs: int
    converged: bool | None = None
    residuals: list[float] | None = None
    reported_matvecs: int | None = None


@dataclass
class TraceOutcome:
    """One trace estimate and the products it used."""

    estimate: float
    matvecs: int


@dataclass
class DensityOutcome:
    """One spectral density: its quadrature nodes (where exposed) and the products used.

    Attributes:
        matvecs: Products counted at the operator (also when the call failed).
        nodes: All quadrature nodes with positive weight, flattened (``None`` if the
            library does not return them or failed).
        error: ``"ExceptionType: message"`` when the call raised.
    """

    matvecs: int
    nodes: list[float] | None = None
    error: str | None = None


@dataclass(frozen=True)
class SpectralMethod:
    """A spectral computation as a row of the results.

    Attributes:
        name: Row label.
        family: ``"curvkit"`` or ``"peer"``.
        make: ``problem -> (seed -> outcome)``; set-up (untimed) happens here.
        note: How the library is called, for the report.
        settings: Short description of the settings (tolerance, budget, ...).
        max_rounds: Run in at most this many rounds (slow methods whose first call
            is not slower than later ones), ``None`` for all.
    """

    name: str
    family: str
    make: Callable[[BenchProblem], Callable[[int], Any]]
    note: str = ""
    settings: str = ""
    max_rounds: int | None = None


@dataclass
class _Count:
    n: int = 0


# ------------------------------------------------------------------ operators
def _curvkit_hessian(problem: BenchProblem) -> curvkit.CurvatureOperator:
    """curvkit's Hessian with its gradient graph built by one warm product."""
    H = curvkit.curvature("hessian", problem.curvkit_problem())
    H @ problem.random_vectors(1, seed=99)[0]
    return H


@contextlib.contextmanager
def _count_pyhessian() -> Iterator[_Count]:
    """Count PyHessian's Hessian-vector products (its ``data=`` mode) during the block."""
    module = sys.modules["pyhessian.hessian"]
    original = module.hessian_vector_product
    count = _Count()

    def counted(gradsH: Any, params: Any, v: Any) -> Any:
        count.n += 1
        return original(gradsH, params, v)

    module.hessian_vector_product = counted
    try:
        yield count
    finally:
        module.hessian_vector_product = original


def _curvlinops(problem: BenchProblem) -> tuple[Any, _Count]:
    """curvlinops' ``HessianLinearOperator`` with a column counter on its ``_matmat``."""
    curvlinops = _require("curvlinops")
    op = curvlinops.HessianLinearOperator(
        problem.model, problem.criterion(), problem.params, [(problem.inputs, problem.targets)]
    )
    count = _Count()
    original = op._matmat

    def counted(M: list[torch.Tensor]) -> list[torch.Tensor]:
        count.n += M[0].shape[-1]
        return original(M)

    op._matmat = counted
    op @ problem.random_vectors(1, seed=99)[0]
    return op, count


# ------------------------------------------------------------------ eigenvalues
def curvkit_eigen(tol: float) -> Callable[[BenchProblem], Callable[[int], EigenOutcome]]:
    """``curvkit.eigenvalues(H, k=5, which="largest", tol=tol)``."""

    def make(problem: BenchProblem) -> Callable[[int], EigenOutcome]:
        H = _curvkit_hessian(problem)

        def solve(seed: int) -> EigenOutcome:
            before = H.matvecs
            res = curvkit.eigenvalues(H, k=K, which="largest", tol=tol, seed=seed, return_vectors=False)
            return EigenOutcome(
                res.values.tolist(), H.matvecs - before, res.converged, res.residuals.tolist(), res.matvecs
            )

        return solve

    return make


def pyhessian_eigen(max_iter: int, tol: float) -> Callable[[BenchProblem], Callable[[int], EigenOutcome]]:
    """PyHessian's ``eigenvalues(top_n=5, maxIter, tol)`` (deflated power iteration)."""

    def make(problem: BenchProblem) -> Callable[[int], EigenOutcome]:
        comp = pyhessian_computer(problem)

        def solve(seed: int) -> EigenOutcome:
            torch.manual_seed(seed)  # its start vectors come from the global generator
            with _count_pyhessian() as count, _quiet():
                values, _ = comp.eigenvalues(maxIter=max_iter, tol=tol, top_n=K)
            _clear_grads(problem)
            return EigenOutcome([float(v) for v in values], count.n)

        return solve

    return make


def _eigsh_solver(A: Any, products: Callable[[], int], tol: float) -> Callable[[int], EigenOutcome]:
    """``eigsh(A, k=5, which="LA", tol)`` from a seeded start vector; ``products()`` counts HVPs."""
    from scipy.sparse.linalg import eigsh

    def solve(seed: int) -> EigenOutcome:
        v0 = np.random.default_rng(seed).standard_normal(A.shape[0])
        before = products()
        values = eigsh(A, k=K, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
        return EigenOutcome([float(v) for v in values], products() - before, True)

    return solve


def curvlinops_eigsh(tol: float) -> Callable[[BenchProblem], Callable[[int], EigenOutcome]]:
    """curvlinops ``HessianLinearOperator(...).to_scipy()`` and ``scipy.sparse.linalg.eigsh``."""

    def make(problem: BenchProblem) -> Callable[[int], EigenOutcome]:
        op, count = _curvlinops(problem)
        return _eigsh_solver(op.to_scipy(), lambda: count.n, tol)

    return make


def curvkit_scipy_eigsh(problem: BenchProblem) -> Callable[[int], EigenOutcome]:
    """SciPy ``eigsh`` on curvkit's own operator (``H.to_scipy()``): curvkit's products, ARPACK's solver."""
    H = _curvkit_hessian(problem)
    return _eigsh_solver(H.to_scipy(), lambda: H.matvecs, EIGSH_TOL)


EIGEN_METHODS: tuple[SpectralMethod, ...] = (
    *(
        SpectralMethod(
            f"curvkit eigenvalues, tol {tol:g}",
            "curvkit",
            curvkit_eigen(tol),
            f"`curvkit.eigenvalues(H, k=5, which='largest', tol={tol:g})`: thick-restart Lanczos; "
            "the residual certificates come from the stored products (no extra product)",
            f"tol {tol:g}",
        )
        for tol in RESIDUAL_TOLS
    ),
    SpectralMethod(
        "PyHessian eigenvalues, defaults",
        "peer",
        pyhessian_eigen(*PYHESSIAN_DEFAULT),
        "`hessian(model, criterion, data=(X, y), cuda=False).eigenvalues(top_n=5)`: deflated "
        "power iteration, largest magnitude, in the order found",
        f"maxIter {PYHESSIAN_DEFAULT[0]}, tol {PYHESSIAN_DEFAULT[1]:g}",
    ),
    *(
        SpectralMethod(
            f"PyHessian eigenvalues, tol {tol:g}",
            "peer",
            pyhessian_eigen(PYHESSIAN_MAX_ITER, tol),
            f"the same with `maxIter={PYHESSIAN_MAX_ITER}, tol={tol:g}`",
            f"maxIter {PYHESSIAN_MAX_ITER}, tol {tol:g}",
        )
        for tol in PYHESSIAN_TOLS
    ),
    *(
        SpectralMethod(
            f"curvlinops + scipy eigsh, tol {tol:g}",
            "peer",
            curvlinops_eigsh(tol),
            f"`eigsh(HessianLinearOperator(...).to_scipy(), k=5, which='LA', tol={tol:g}, v0=...)` "
            "(ARPACK, implicitly restarted Lanczos, ncv=20), OPENBLAS_NUM_THREADS=1",
            f"tol {tol:g}",
        )
        for tol in RESIDUAL_TOLS
    ),
    SpectralMethod(
        "scipy eigsh on curvkit's H.to_scipy()",
        "curvkit",
        curvkit_scipy_eigsh,
        "`eigsh(curvkit.curvature('hessian', problem).to_scipy(), k=5, which='LA', tol=1e-4, v0=...)`: "
        "curvkit's products under ARPACK's solver, which separates the cost of the products from the "
        "cost of the eigensolver",
        f"tol {EIGSH_TOL:g}",
    ),
)
"""The top-5 rows; the first (curvkit) is the reference for the time ratios."""


# ------------------------------------------------------------------ traces
def curvkit_trace(method: str) -> Callable[[BenchProblem], Callable[[int], TraceOutcome]]:
    """``curvkit.linalg.trace.trace(H, method, matvecs=99, seed)``."""

    def make(problem: BenchProblem) -> Callable[[int], TraceOutcome]:
        from curvkit.linalg.trace import trace

        H = _curvkit_hessian(problem)

        def estimate(seed: int) -> TraceOutcome:
            before = H.matvecs
            res = trace(H, method=method, matvecs=TRACE_BUDGET, seed=seed)
            return TraceOutcome(res.estimate, H.matvecs - before)

        return estimate

    return make


def pyhessian_trace(max_iter: int, tol: float) -> Callable[[BenchProblem], Callable[[int], TraceOutcome]]:
    """PyHessian's ``trace(maxIter, tol)`` (Hutchinson, Rademacher probes, its own stopping rule)."""

    def make(problem: BenchProblem) -> Callable[[int], TraceOutcome]:
        comp = pyhessian_computer(problem)

        def estimate(seed: int) -> TraceOutcome:
            torch.manual_seed(seed)
            with _count_pyhessian() as count, _quiet():
                samples = comp.trace(maxIter=max_iter, tol=tol)
            _clear_grads(problem)
            return TraceOutcome(float(np.mean(samples)), count.n)

        return estimate

    return make


def curvlinops_trace(function: str, budget: int) -> Callable[[BenchProblem], Callable[[int], TraceOutcome]]:
    """curvlinops' ``hutchinson_trace`` / ``hutchpp_trace`` / ``xtrace`` on the Hessian operator."""

    def make(problem: BenchProblem) -> Callable[[int], TraceOutcome]:
        curvlinops = _require("curvlinops")
        estimator = getattr(curvlinops, function)
        op, count = _curvlinops(problem)

        def estimate(seed: int) -> TraceOutcome:
            torch.manual_seed(seed)  # its probes come from the global generator
            before = count.n
            value = estimator(op, num_matvecs=budget)
            return TraceOutcome(float(value), count.n - before)

        return estimate

    return make


TRACE_METHODS: tuple[SpectralMethod, ...] = (
    SpectralMethod(
        "curvkit Hutchinson",
        "curvkit",
        curvkit_trace("hutchinson"),
        "`trace(H, method='hutchinson', matvecs=99, seed=s)`: Rademacher probes, batched products",
        "99 probes",
    ),
    SpectralMethod(
        "curvkit Hutch++",
        "curvkit",
        curvkit_trace("hutch++"),
        "`trace(H, method='hutch++', matvecs=99, seed=s)`: 33-column sketch, 33 for `A Q`, 33 probes; "
        "adaptive (the default): when the sketch misses more than a third of `||H||_F^2` it falls back "
        "to Hutchinson with all 99 products",
        "budget 99",
    ),
    SpectralMethod(
        "curvkit XTrace",
        "curvkit",
        curvkit_trace("xtrace"),
        "`trace(H, method='xtrace', matvecs=99, seed=s)`: 49 test vectors, 98 products; adaptive (the "
        "default): when the sketch misses more than half of `||H||_F^2` it falls back to Hutchinson "
        "with all 99 products",
        "budget 99",
    ),
    SpectralMethod(
        "PyHessian trace, 99 probes",
        "peer",
        pyhessian_trace(TRACE_BUDGET, float("-inf")),
        "`hessian(...).trace(maxIter=99, tol=-inf)`: Hutchinson, its early stop disabled",
        "99 probes",
    ),
    SpectralMethod(
        "PyHessian trace, defaults",
        "peer",
        pyhessian_trace(100, 1e-3),
        "`hessian(...).trace()` (maxIter=100, tol=1e-3): stops when the running mean changes by "
        "less than 0.1%",
        "maxIter 100, tol 1e-3",
    ),
    SpectralMethod(
        "curvlinops hutchinson_trace",
        "peer",
        curvlinops_trace("hutchinson_trace", TRACE_BUDGET),
        "`curvlinops.hutchinson_trace(op, num_matvecs=99)`",
        "99 probes",
    ),
    SpectralMethod(
        "curvlinops hutchpp_trace",
        "peer",
        curvlinops_trace("hutchpp_trace", TRACE_BUDGET),
        "`curvlinops.hutchpp_trace(op, num_matvecs=99)`",
        "budget 99",
    ),
    SpectralMethod(
        "curvlinops xtrace",
        "peer",
        curvlinops_trace("xtrace", 2 * (TRACE_BUDGET // 2)),
        "`curvlinops.xtrace(op, num_matvecs=98)` (it needs an even count)",
        "budget 98",
    ),
)
"""The trace rows; the first (curvkit Hutchinson) is the baseline of the error ratios."""


# ------------------------------------------------------------------ densities
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def curvkit_density(runs: int) -> Callable[[BenchProblem], Callable[[int], DensityOutcome]]:
    """``curvkit.linalg.slq.density(H, steps=100, runs, seed)``."""

    def make(problem: BenchProblem) -> Callable[[int], DensityOutcome]:
        from curvkit.linalg.slq import density

        H = _curvkit_hessian(problem)

        def run(seed: int) -> DensityOutcome:
            before = H.matvecs
            res = density(H, steps=DENSITY_STEPS, runs=runs, seed=seed)
            nodes = res.nodes[res.weights > 0].tolist()
            return DensityOutcome(H.matvecs - before, nodes)

        return run

    return make


def pyhessian_density(problem: BenchProblem) -> Callable[[int], DensityOutcome]:
    """PyHessian's ``density(iter=100, n_v=1)``; on torch 2.x it raises at ``torch.eig``."""
    comp = pyhessian_computer(problem)

    def run(seed: int) -> DensityOutcome:
        torch.manual_seed(seed)
        with _count_pyhessian() as count, _quiet():
            try:
                nodes, weights = comp.density(iter=DENSITY_STEPS, n_v=1)
            except Exception as exc:  # torch.eig was removed in torch 2.0
                _clear_grads(problem)
                return DensityOutcome(count.n, error=_first_line(exc))
        _clear_grads(problem)
        flat = [
            float(x) for run_nodes, run_w in zip(nodes, weights) for x, w in zip(run_nodes, run_w) if w > 0
        ]
        return DensityOutcome(count.n, flat)

    return run


def eigenthings_density(problem: BenchProblem) -> Callable[[int], DensityOutcome]:
    """hessian-eigenthings ``spectral_density(HessianOperator(...), num_runs=1, lanczos_steps=100)``."""
    he = _require("hessian_eigenthings")
    op = he.HessianOperator(
        problem.model, [(problem.inputs, problem.targets)], he.supervised_loss(problem.criterion())
    )
    count = _Count()
    original = op.matvec

    def counted(v: torch.Tensor) -> torch.Tensor:
        count.n += 1
        return original(v)

    op.matvec = counted
    op.matvec(problem.random_vectors(1, seed=99)[0])

    def run(seed: int) -> DensityOutcome:
        before = count.n
        res = he.spectral_density(op, num_runs=1, lanczos_steps=DENSITY_STEPS, seed=seed)
        nodes = res.raw_eigenvalues[res.raw_weights > 0]
        return DensityOutcome(count.n - before, nodes[torch.isfinite(nodes)].tolist())

    return run


def curvlinops_density(problem: BenchProblem) -> Callable[[int], DensityOutcome]:
    """curvlinops ``lanczos_approximate_spectrum(op, ncv=100)`` (Papyan 2020; no reorthogonalisation)."""
    _require("curvlinops")
    from curvlinops.papyan2020traces.spectrum import lanczos_approximate_spectrum

    op, count = _curvlinops(problem)

    def run(seed: int) -> DensityOutcome:
        torch.manual_seed(seed)
        before = count.n
        lanczos_approximate_spectrum(op, ncv=DENSITY_STEPS, num_repeats=1)
        return DensityOutcome(count.n - before)

    return run


DENSITY_METHODS: tuple[SpectralMethod, ...] = (
    SpectralMethod(
        "curvkit density, runs=1",
        "curvkit",
        curvkit_density(1),
        "`density(H, steps=100, runs=1, seed=0)`: Lanczos with full reorthogonalisation",
        "100 steps x 1 run",
    ),
    SpectralMethod(
        "curvkit density, runs=5",
        "curvkit",
        curvkit_density(5),
        "`density(H, steps=100, runs=5, seed=0)` (curvkit's default runs): the 5 runs advance "
        "together, one `H.matmat` of 5 columns per step",
        "100 steps x 5 runs",
    ),
    SpectralMethod(
        "PyHessian density",
        "peer",
        pyhessian_density,
        "`hessian(...).density(iter=100, n_v=1)` (its defaults): Lanczos with reorthogonalisation, "
        "then `torch.eig`, which torch 2.x removed",
        "100 steps x 1 run",
    ),
    SpectralMethod(
        "hessian-eigenthings spectral_density",
        "peer",
        eigenthings_density,
        "`spectral_density(HessianOperator(model, [(X, y)], supervised_loss(CrossEntropyLoss())), "
        "num_runs=1, lanczos_steps=100)`",
        "100 steps x 1 run",
    ),
    SpectralMethod(
        "curvlinops lanczos_approximate_spectrum",
        "peer",
        curvlinops_density,
        "`lanczos_approximate_spectrum(op, ncv=100, num_repeats=1)` (Papyan 2020): spectral "
        "boundaries by `eigsh(k=2, which='BE', tol=1e-2)` first, then Lanczos without "
        "reorthogonalisation; returns a grid and density but no nodes",
        "100 steps x 1 run",
    ),
)
"""The density rows; the first (curvkit, runs=1) is the reference for the time ratios."""
