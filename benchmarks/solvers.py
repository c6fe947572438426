"""The linear-solver rows: products and time to a 1e-6 relative residual; accuracy on an indefinite system.

For the ``mlp`` and the ``cnn`` (``python -m benchmarks --only solvers``; the
``mlp`` only with ``--quick``), in **float64** on a copy of each problem (in
float32 the 1e-6 residual is out of reach on the CNN, and barely reached on the
MLP: the ``float32`` table below measures it), right-hand side ``g``, the
full-data gradient:

* ``psd``: ``(G + d I) x = g`` with ``G`` the GGN (curvkit ``ggn``; curvlinops
  ``GGNLinearOperator``) and ``d = 1e-3``. curvkit ``cg``, ``minres`` and
  ``neumann`` against curvlinops' ``CGInverseLinearOperator`` (GPyTorch's
  ``linear_cg``), ``NeumannInverseLinearOperator`` and
  ``LSMRInverseLinearOperator`` (SciPy's ``lsmr``) on ``GGNLinearOperator + d *
  IdentityLinearOperator``, every solver asked for a 1e-6 relative residual
  (where it has such a setting) within a cap of iterations. A row *reached* the
  target when the **true** relative residual ``||g - (G + d I) x|| / ||g||``,
  measured afterwards with one more product of curvkit's operator (not counted),
  is at most 1e-6.
* ``indefinite`` (the ``mlp``): ``(H + d' I) x = g`` with ``H`` the Hessian
  (curvkit ``hessian``; curvlinops ``HessianLinearOperator``) and a damping
  ``d'`` that keeps negative eigenvalues (``lambda_min(H) + d' < 0``), the same
  solvers and settings (without the context row); each answer is compared with a
  reference, curvkit ``minres`` to a 1e-10 relative residual: relative error,
  cosine, norm ratio and true residual, with what each solver said (curvkit's
  ``converged``/``reason``; the peers' warnings or exceptions, or nothing).
* ``float32``: curvkit ``cg`` and ``minres`` on the float32 GGN system, their
  claimed residual (the recurrence's) against the true residual of their answer
  in float64.

Products are counted at the operator (columns multiplied): curvkit's
``matvecs`` counter; for curvlinops, columns passed to the curvature operator's
``_matmat``, which ``op @ x``, the sum with the damping term and ``to_scipy()``
all reach (the identity term is free). Each library builds and warms its
operator untimed (curvkit: past its ``auto`` strategy's timed trials). The cap
is on iterations: ``maxiter`` (curvkit), ``max_iter`` (CG), ``num_terms``
(Neumann), half of it for LSMR (two products an iteration); products beyond it
are the solver's own (curvkit ``neumann``'s eigenvalue estimate, GPyTorch's
product with the zero initial guess, SciPy's first ``A^T b``). Default: 500 on
the MLP, 100 on the CNN (its float64 products cost about 0.2 s); ``--quick``: 200
and 50.

Timing: every solve is timed whole (the time to reach the target, or to stop).
Rows that reached the target are timed over more rounds, interleaved (median and
spread; 3 rounds on the MLP, 1 on the CNN, 1 with ``--quick``); the others run
once, their figure is the time to their cap.

Goals (per problem and system): for each curvlinops solver at its default
settings, the fewest products any curvkit solver needs to reach the accuracy
that peer returned (its true residual, or 1e-6 if it did better) against the
products the peer spent; curvkit's products come from its per-iteration history
(thinned, see :func:`products_to`) and count only when its answer's true
residual confirms the level. And curvkit's ``converged=True`` confirmed by the
true residual (within :data:`CLAIM_SLACK` x ``tol``) on every float64 system.

The indefinite damping is chosen so that the damped Hessian keeps negative
eigenvalues and the reference converges in a practical number of products:
``d' = 0.23`` on the MLP (``lambda_min(H)`` about -0.27; MINRES reached 1e-10 in
about 250 products when the suite was written). A smaller damping leaves the
MLP's Hessian nearly singular: MINRES needed 1000 products at ``d' = 0.2`` and was
still at a relative residual of 2e-3 after 3000 at ``d' = 1e-3`` (1.6e-2 after
1500 at 0.05), systems no solver answers within a budget. (On the CNN, ``d' = 1``
gave a reference in about 80 products, but at about 0.25 s a float64 product the
indefinite system would add minutes; it is solved on the MLP only.)
"""

from __future__ import annotations

import gc
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

import curvkit
from benchmarks.ggn import double_copy
from benchmarks.hvp import Goal, ProblemRecord
from benchmarks.methods import MethodUnavailableError
from benchmarks.peers import _require
from benchmarks.problems import PROBLEMS, BenchProblem
from benchmarks.timing import OtherLoad, Timing, time_interleaved
from curvkit.choice import AUTO_TRIALS

__all__ = [
    "GARBAGE",
    "SOLVER_METHODS",
    "SOLVER_PROBLEMS",
    "TARGET",
    "SolverResult",
    "SolverRow",
    "SolverSettings",
    "SolverSystem",
    "evaluate_solver_goals",
    "run_solvers",
]

SOLVER_PROBLEMS = ("mlp", "cnn")
TARGET = 1e-6
"""Relative residual every solver is asked for."""
PSD_DAMPING = 1e-3
INDEFINITE_DAMPING = {"mlp": 0.23, "cnn": 1.0}
"""``d'`` per problem: below ``|lambda_min(H)|`` (about 0.27 and 3.3), so the system stays indefinite."""
INDEFINITE_PROBLEMS = ("mlp",)
"""Where the indefinite system is solved: one system, and the CNN's float64 products (about 0.25 s
each) would add minutes."""
REFERENCE_TOL, REFERENCE_MAXITER = 1e-10, 5000
GARBAGE = 0.1
"""Relative error from the reference above which an answer is called garbage."""
CLAIM_SLACK = 2.0
"""``converged=True`` is confirmed when the true residual is within this factor of ``tol``."""
CG_EPS = 1e-20
"""GPyTorch's division guard for the context row (default 1e-10: see the notes)."""
WARM_PRODUCTS = 3 * AUTO_TRIALS + 1
"""Untimed products on each curvkit operator first: past its ``auto`` strategy's timed trials."""
HISTORY_STEP = 0.8
"""Kept history points: each a new minimum at least this factor below the previous kept one."""

LSMR_ISTOP = {
    0: "x = 0 solves it",
    1: "residual test met",
    2: "least-squares test met",
    3: "condition estimate above conlim",
    4: "residual test met at machine precision",
    5: "least-squares test met at machine precision",
    6: "condition too large for machine precision",
    7: "iteration limit",
}


# ------------------------------------------------------------------ records
@dataclass
class SolverSettings:
    """Caps and rounds of the solver section.

    Attributes:
        caps: Iteration cap per problem (``maxiter``, ``max_iter``,
            ``num_terms``; LSMR, two products an iteration, gets half).
        rounds: Timed rounds per problem for rows that reached the target.
        float32_check: Run the float32 table.
    """

    caps: dict[str, int] = field(default_factory=lambda: {"mlp": 500, "cnn": 100})
    rounds: dict[str, int] = field(default_factory=lambda: {"mlp": 3, "cnn": 1})
    float32_check: bool = True

    @classmethod
    def for_run(cls, quick: bool) -> SolverSettings:
        """Full run, or the ``--quick`` smoke settings."""
        if quick:
            return cls({"mlp": 200, "cnn": 50}, {"mlp": 1, "cnn": 1}, True)
        return cls()


@dataclass
class SolverRow:
    """One solver on one system (``None`` fields when skipped or when it raised).

    ``residual`` is the true relative residual of the answer; ``claimed_residual``
    what the solver reports (curvkit's ``residual``, LSMR's ``normr / ||g||``);
    ``history`` curvkit's ``[products, relative residual]`` per iteration, thinned
    to points at least :data:`HISTORY_STEP` below the previous kept one.
    """

    method: str
    family: str
    settings: str
    note: str
    headline: bool = True
    matvecs: int | None = None
    reported_matvecs: int | None = None
    median_s: float | None = None
    min_s: float | None = None
    max_s: float | None = None
    rounds: int | None = None
    residual: float | None = None
    claimed_residual: float | None = None
    converged: bool | None = None
    says: str = ""
    flagged: bool | None = None
    reached: bool | None = None
    rel_error: float | None = None
    cosine: float | None = None
    norm_ratio: float | None = None
    history: list[list[float]] = field(default_factory=list)
    skipped: str | None = None


@dataclass
class SolverSystem:
    """One linear system on one problem and the rows solving it."""

    kind: str
    operator: str
    dtype: str
    damping: float
    cap: int
    rounds: int = 1
    lambda_max: float | None = None
    lambda_min: float | None = None
    estimate_matvecs: int | None = None
    reference: str | None = None
    reference_matvecs: int | None = None
    reference_residual: float | None = None
    reference_converged: bool | None = None
    other_load: float | None = None
    rows: list[SolverRow] = field(default_factory=list)


@dataclass
class SolverResult(ProblemRecord):
    """The solver tables of one problem."""

    rhs_norm: float | None = None
    other_load: float | None = None
    systems: list[SolverSystem] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-ready dictionary."""
        return asdict(self)

    def system(self, kind: str) -> SolverSystem | None:
        """The system of that kind (``"psd"``, ``"indefinite"``, ``"float32"``), if measured."""
        return next((s for s in self.systems if s.kind == kind), None)


# ------------------------------------------------------------------ one system, as the solvers see it
@dataclass
class _Count:
    n: int = 0


@dataclass
class _Outcome:
    x: Tensor | None
    matvecs: int
    says: str
    flagged: bool
    converged: bool | None = None
    claimed: float | None = None
    reported_matvecs: int | None = None
    history: list[list[float]] = field(default_factory=list)


class _System:
    """A system ``(A + damping I) x = rhs`` with curvkit's operator and, on demand, curvlinops'."""

    def __init__(
        self, problem: BenchProblem, kind: str, name: str, A: Any, rhs: Tensor, damping: float, cap: int
    ):
        self.problem, self.kind, self.name, self.A, self.rhs = problem, kind, name, A, rhs
        self.damping, self.cap = damping, cap
        self.lambda_max: float | None = None
        self._peer: tuple[Any, _Count] | None = None

    def residual(self, x: Tensor) -> float:
        """The true relative residual (one product of curvkit's operator, not counted in any row)."""
        if not bool(torch.isfinite(x).all()):
            return math.inf
        r = self.rhs - (self.A @ x + self.damping * x)
        return (r.norm() / self.rhs.norm()).item()

    def curvlinops(self) -> tuple[Any, _Count]:
        """``<curvlinops operator> + damping * IdentityLinearOperator``, products counted and warm."""
        if self._peer is None:
            curvlinops = _require("curvlinops")
            try:
                from curvlinops.examples import IdentityLinearOperator
            except ImportError as exc:
                raise MethodUnavailableError(f"curvlinops has no IdentityLinearOperator: {exc}") from exc
            p = self.problem
            cls = {"ggn": "GGNLinearOperator", "hessian": "HessianLinearOperator"}[self.name]
            op = getattr(curvlinops, cls)(
                p.model, p.criterion(), p.params, [(p.inputs, p.targets)], check_deterministic=False
            )
            count = _Count()
            original = op._matmat

            def counted(M: list[Tensor]) -> list[Tensor]:
                count.n += M[0].shape[-1]
                return original(M)

            op._matmat = counted
            identity = IdentityLinearOperator([q.shape for q in p.params], self.rhs.device, self.rhs.dtype)
            damped = op + self.damping * identity
            damped @ self.rhs  # warm, untimed
            self._peer = (damped, count)
        return self._peer


def _first_line(text: object) -> str:
    text = str(text).strip()
    return text.splitlines()[0] if text else ""


def _sentence(text: object, limit: int = 160) -> str:
    """The first sentence of a message, at most ``limit`` characters."""
    first = _first_line(text).split(". ")[0]
    return first if len(first) <= limit else first[: limit - 3] + "..."


def _warned(caught: Sequence[warnings.WarningMessage]) -> str:
    seen = []
    for w in caught:
        line = f"{type(w.message).__name__}: {_sentence(w.message)}"
        if line not in seen:
            seen.append(line)
    return "; ".join(seen)


def _thin(history: Sequence[dict[str, float]]) -> list[list[float]]:
    """``[products, residual]`` at the start, at every new minimum ``HISTORY_STEP`` below the last kept
    one, and at the end."""
    kept: list[list[float]] = []
    for row in history:
        res = row.get("residual")
        if res is None or not math.isfinite(res):
            continue
        point = [int(row["matvecs"]), float(f"{res:.4g}")]
        if not kept or res <= HISTORY_STEP * kept[-1][1]:
            kept.append(point)
    if history and kept and kept[-1][0] != int(history[-1]["matvecs"]):
        last = history[-1].get("residual")
        if last is not None and math.isfinite(last):
            kept.append([int(history[-1]["matvecs"]), float(f"{last:.4g}")])
    return kept


# ------------------------------------------------------------------ the solvers
@dataclass(frozen=True)
class SolverMethod:
    """A solver as a row: ``make(system)`` sets it up (untimed) and returns the timed solve.

    Attributes:
        settings: How it is called, with ``{cap}``, ``{half}`` (half the cap) and ``{damping}``.
        headline: Held to the goals (context rows show a non-default setting).
        systems: The systems it runs on (``"psd"``, ``"indefinite"``).
    """

    name: str
    family: str
    make: Callable[[_System], Callable[[], _Outcome]]
    settings: str
    note: str
    headline: bool = True
    systems: tuple[str, ...] = ("psd", "indefinite")


def _curvkit(method: str) -> Callable[[_System], Callable[[], _Outcome]]:
    def make(system: _System) -> Callable[[], _Outcome]:
        def run() -> _Outcome:
            before = system.A.matvecs
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res = curvkit.solve(
                    system.A, system.rhs, method, damping=system.damping, tol=TARGET, maxiter=system.cap
                )
            says = "converged" if res.converged else f"not converged: {res.reason}"
            if caught:
                says += f" (warned: {_warned(caught)})"
            return _Outcome(
                res.x,
                system.A.matvecs - before,
                says,
                flagged=not res.converged,
                converged=res.converged,
                claimed=res.residual,
                reported_matvecs=res.matvecs,
                history=_thin(res.history),
            )

        return run

    return make


def _peer_call(
    system: _System, inverse: Any, count: _Count, info: Callable[[], str] | None = None
) -> _Outcome:
    """Apply a curvlinops inverse to the right-hand side; what it says is its warnings or exception."""
    before = count.n
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            x = inverse @ system.rhs
        except Exception as exc:  # a peer raising is a result, not a crash
            return _Outcome(None, count.n - before, f"raised {type(exc).__name__}: {_sentence(exc)}", True)
    said = _warned(caught)
    says = f"warned: {said}" if said else "returned, no warning"
    if info is not None:
        says += f" ({info()})"
    return _Outcome(x, count.n - before, says, flagged=bool(said))


def _warm_linear_cg() -> None:
    """Compile GPyTorch's scripted CG updates (on their first call) on a 2 x 2 system, untimed."""
    try:
        from linear_operator.utils.linear_cg import linear_cg
    except ImportError:
        return
    linear_cg(torch.eye(2, dtype=torch.float64).matmul, torch.ones(2, 1, dtype=torch.float64), max_iter=20)


def _curvlinops_cg(**options: Any) -> Callable[[_System], Callable[[], _Outcome]]:
    def make(system: _System) -> Callable[[], _Outcome]:
        curvlinops = _require("curvlinops")
        damped, count = system.curvlinops()
        _warm_linear_cg()
        inverse = curvlinops.CGInverseLinearOperator(damped, tolerance=TARGET, max_iter=system.cap, **options)
        return lambda: _peer_call(system, inverse, count)

    return make


def _curvlinops_lsmr(system: _System) -> Callable[[], _Outcome]:
    curvlinops = _require("curvlinops")
    damped, count = system.curvlinops()
    inverse = curvlinops.LSMRInverseLinearOperator(damped, atol=0.0, btol=TARGET, maxiter=system.cap // 2)

    def info() -> str:
        istop, itn, normr = inverse._lsmr_info[0][:3]
        reason = LSMR_ISTOP.get(int(istop), "?")
        claimed = normr / system.rhs.norm().item()
        return (
            f"SciPy istop={int(istop)}: {reason}, {itn} iterations, normr/normb {claimed:.1e}; "
            "only in the private `_lsmr_info`"
        )

    return lambda: _peer_call(system, inverse, count, info)


def _curvlinops_neumann(system: _System) -> Callable[[], _Outcome]:
    curvlinops = _require("curvlinops")
    damped, count = system.curvlinops()
    if system.lambda_max is None:
        raise MethodUnavailableError("no largest-eigenvalue estimate for the scale")
    scale = 1.0 / (system.lambda_max + system.damping)
    inverse = curvlinops.NeumannInverseLinearOperator(damped, num_terms=system.cap, scale=scale)
    return lambda: _peer_call(system, inverse, count)


SOLVER_METHODS: tuple[SolverMethod, ...] = (
    SolverMethod(
        "curvkit cg",
        "curvkit",
        _curvkit("cg"),
        "tol 1e-6, maxiter {cap}",
        "`curvkit.solve(A, g, 'cg', damping=d, tol=1e-6, maxiter=cap)`: stops at a non-positive curvature",
    ),
    SolverMethod(
        "curvkit minres",
        "curvkit",
        _curvkit("minres"),
        "tol 1e-6, maxiter {cap}",
        "`curvkit.solve(A, g, 'minres', ...)`: symmetric, possibly indefinite",
    ),
    SolverMethod(
        "curvkit neumann",
        "curvkit",
        _curvkit("neumann"),
        "tol 1e-6, maxiter {cap}",
        "`curvkit.solve(A, g, 'neumann', ...)`: scale 1 / (lambda_max + d) from its own estimate (those "
        "products counted); stops as diverging",
    ),
    SolverMethod(
        "curvlinops CG",
        "peer",
        _curvlinops_cg(),
        "tolerance 1e-6, max_iter {cap}",
        "`CGInverseLinearOperator(op + d * IdentityLinearOperator(...), tolerance=1e-6, max_iter=cap) @ g` "
        "(GPyTorch's `linear_cg` on the system scaled to `||g|| = 1`, default `eps=1e-10`: a step whose "
        "`p^T A p` is below `eps` is set to zero, and so is the next direction's `beta` when the previous "
        "`r^T r` is, so near a relative residual of 1e-5 it stops moving, and it skips steps of negative "
        "curvature and goes on)",
    ),
    SolverMethod(
        f"curvlinops CG, eps={CG_EPS:g}",
        "peer",
        _curvlinops_cg(eps=CG_EPS),
        f"tolerance 1e-6, max_iter {{cap}}, eps {CG_EPS:g}",
        "the same with GPyTorch's division guard lowered, so that it can reach 1e-6 (context: not a "
        "default setting; on the positive definite system only)",
        headline=False,
        systems=("psd",),
    ),
    SolverMethod(
        "curvlinops Neumann",
        "peer",
        _curvlinops_neumann,
        "num_terms {cap}, scale 1/(lambda_max + d)",
        "`NeumannInverseLinearOperator(op + d I, num_terms=cap, scale=1 / (lambda_max + d))`: the scale "
        "from curvkit's estimate, given free (its default scale 1.0 diverges where lambda_max + d > 2); "
        "no tolerance: it always runs `num_terms` terms",
    ),
    SolverMethod(
        "curvlinops LSMR",
        "peer",
        _curvlinops_lsmr,
        "atol 0, btol 1e-6, maxiter {half}",
        "`LSMRInverseLinearOperator(op + d I, atol=0, btol=1e-6, maxiter=cap // 2)` (SciPy's `lsmr` on "
        "`to_scipy()`, two products an iteration; `atol=0` makes its test `||r|| <= btol ||g||`; at its "
        "defaults `atol=btol=1e-6` it stops when `||r|| <= 1e-6 (||g|| + ||A|| ||x||)`)",
    ),
)
"""Every row of the ``psd`` and ``indefinite`` tables; curvkit's first."""


# ------------------------------------------------------------------ running
_START = time.perf_counter()


def _log(text: str) -> None:
    print(f"[solvers] {text} (at {time.perf_counter() - _START:.0f} s)", file=sys.stderr, flush=True)


def _warm(A: Any, v: Tensor) -> None:
    for _ in range(WARM_PRODUCTS):
        A @ v


def _fill(row: SolverRow, out: _Outcome, system: _System, reference: Tensor | None) -> None:
    row.matvecs, row.reported_matvecs = out.matvecs, out.reported_matvecs
    row.converged, row.claimed_residual, row.says = out.converged, out.claimed, out.says
    row.flagged, row.history = out.flagged, out.history
    if out.x is None:
        return
    x = out.x.detach().to(system.rhs.dtype).reshape(-1)
    row.residual = system.residual(x)
    row.reached = row.residual <= TARGET
    if reference is not None:
        if bool(torch.isfinite(x).all()):
            ref_norm = reference.norm()
            row.rel_error = ((x - reference).norm() / ref_norm).item()
            row.norm_ratio = (x.norm() / ref_norm).item()
            row.cosine = (x @ reference / (x.norm() * ref_norm).clamp_min(1e-300)).item()
        else:
            row.rel_error = row.norm_ratio = math.inf


def _run_rows(system: _System, rounds: int, reference: Tensor | None = None) -> list[SolverRow]:
    """Every solver once (the outcome, and its first time), then the rows that reached the target
    again, interleaved, for ``rounds - 1`` more rounds."""
    rows, runs, first = [], {}, {}
    settings = {"cap": system.cap, "half": system.cap // 2, "damping": system.damping}
    for m in [m for m in SOLVER_METHODS if system.kind in m.systems]:
        row = SolverRow(m.name, m.family, m.settings.format(**settings), m.note, m.headline)
        rows.append(row)
        try:
            run = m.make(system)
        except MethodUnavailableError as exc:
            row.skipped = str(exc)
            continue
        except Exception as exc:  # a library failing on a model is a result, not a crash
            row.skipped = f"failed at set-up: {type(exc).__name__}: {_first_line(exc)}"
            continue
        start = time.perf_counter()
        out = run()
        first[m.name] = time.perf_counter() - start
        _fill(row, out, system, reference)
        runs[m.name] = run
        _log(
            f"{system.name} {m.name}: {row.matvecs} products, residual {row.residual}, {first[m.name]:.1f} s"
        )
    again = {r.method: (lambda i, f=runs[r.method]: f()) for r in rows if r.reached and r.method in runs}
    more = time_interleaved(again, rounds - 1, warmup=0) if again and rounds > 1 else {}
    for row in rows:
        if row.method in first:
            t = Timing([first[row.method], *more.get(row.method, Timing()).samples])
            row.median_s, row.rounds = t.median_ms / 1e3, len(t.samples)
            row.min_s, row.max_s = t.spread_ms[0] / 1e3, t.spread_ms[1] / 1e3
    runs.clear()
    gc.collect()
    return rows


def _spectrum(A: Any, which: str) -> tuple[float | None, float | None, int]:
    """``lambda_max`` (and ``lambda_min`` for ``which="both_ends"``) to 1%, and the products used."""
    res = curvkit.eigenvalues(
        A, k=2 if which == "both_ends" else 1, which=which, tol=1e-2, return_vectors=False
    )
    values = res.values.tolist()
    return max(values), (min(values) if which == "both_ends" else None), res.matvecs


def _psd_system(p64: BenchProblem, G: Any, rhs: Tensor, cap: int, rounds: int) -> SolverSystem:
    system = _System(p64, "psd", "ggn", G, rhs, PSD_DAMPING, cap)
    out = SolverSystem("psd", "ggn", "float64", PSD_DAMPING, cap, rounds)
    out.lambda_max, _, out.estimate_matvecs = _spectrum(G, "largest")
    system.lambda_max = out.lambda_max
    load = OtherLoad().start()
    out.rows = _run_rows(system, rounds)
    out.other_load = load.stop()
    return out


def _indefinite_system(p64: BenchProblem, rhs: Tensor, damping: float, cap: int) -> SolverSystem:
    H = curvkit.curvature("hessian", p64.curvkit_problem())
    _warm(H, rhs)
    system = _System(p64, "indefinite", "hessian", H, rhs, damping, cap)
    out = SolverSystem("indefinite", "hessian", "float64", damping, cap, 1)
    out.lambda_max, out.lambda_min, out.estimate_matvecs = _spectrum(H, "both_ends")
    system.lambda_max = out.lambda_max
    before = H.matvecs
    ref = curvkit.solve(H, rhs, "minres", damping=damping, tol=REFERENCE_TOL, maxiter=REFERENCE_MAXITER)
    out.reference = f"curvkit minres, tol {REFERENCE_TOL:g}, maxiter {REFERENCE_MAXITER}"
    out.reference_matvecs, out.reference_converged = H.matvecs - before, ref.converged
    out.reference_residual = system.residual(ref.x)
    _log(f"hessian reference: {out.reference_matvecs} products, residual {out.reference_residual:.1e}")
    load = OtherLoad().start()
    out.rows = _run_rows(system, 1, reference=ref.x)
    out.other_load = load.stop()
    return out


def _float32_system(
    problem: BenchProblem, p64: BenchProblem, G64: Any, rhs64: Tensor, cap: int
) -> SolverSystem:
    """curvkit cg and minres on the float32 system; true residuals of their answers in float64."""
    cp = problem.curvkit_problem()
    _, rhs = cp.loss_and_gradient()
    G = curvkit.curvature("ggn", cp)
    _warm(G, rhs)
    check = _System(p64, "psd", "ggn", G64, rhs64, PSD_DAMPING, cap)
    system = _System(problem, "psd", "ggn", G, rhs, PSD_DAMPING, cap)
    out = SolverSystem("float32", "ggn", "float32", PSD_DAMPING, cap, 1)
    settings = {"cap": cap, "half": cap // 2, "damping": PSD_DAMPING}
    for m in SOLVER_METHODS[:2]:
        row = SolverRow(m.name, m.family, m.settings.format(**settings), m.note, m.headline)
        start = time.perf_counter()
        result = m.make(system)()
        row.median_s, row.rounds = time.perf_counter() - start, 1
        row.min_s = row.max_s = row.median_s
        _fill(row, result, check, None)  # the true residual of the float32 answer, in float64
        out.rows.append(row)
    return out


def run_solver_problem(problem: BenchProblem, settings: SolverSettings) -> SolverResult:
    """The solver tables of one problem."""
    res = SolverResult(problem.name, problem.description, problem.dim, problem.num_samples)
    load = OtherLoad().start()
    p64 = double_copy(problem)
    _, rhs = p64.curvkit_problem().loss_and_gradient()
    res.rhs_norm = rhs.norm().item()
    cap, rounds = settings.caps.get(problem.name, 100), settings.rounds.get(problem.name, 1)
    _log(f"{problem.name}: GGN + {PSD_DAMPING:g} I, cap {cap}")
    G = curvkit.curvature("ggn", p64.curvkit_problem())
    _warm(G, rhs)
    res.systems.append(_psd_system(p64, G, rhs, cap, rounds))
    gc.collect()
    if problem.name in INDEFINITE_PROBLEMS:
        damping = INDEFINITE_DAMPING[problem.name]
        _log(f"{problem.name}: Hessian + {damping:g} I")
        res.systems.append(_indefinite_system(p64, rhs, damping, cap))
        gc.collect()
    if settings.float32_check:
        _log(f"{problem.name}: float32")
        res.systems.append(_float32_system(problem, p64, G, rhs, cap))
    res.other_load = load.stop()
    del p64, G
    gc.collect()
    return res


def run_solvers(problems: Sequence[str] | None, quick: bool) -> tuple[list[SolverResult], SolverSettings]:
    """The solver section on :data:`SOLVER_PROBLEMS` among the selected problems (``None``: both,
    or the ``mlp`` only with ``quick``)."""
    settings = SolverSettings.for_run(quick)
    chosen = list(problems) if problems is not None else (["mlp"] if quick else list(SOLVER_PROBLEMS))
    results = []
    for name in [p for p in SOLVER_PROBLEMS if p in chosen]:
        results.append(run_solver_problem(PROBLEMS[name](), settings))
    return results, settings


# ------------------------------------------------------------------ goals
def products_to(row: SolverRow, level: float) -> int | None:
    """Products ``row`` needed to reach a relative residual ``level``: from its (thinned) history, when
    its answer's true residual confirms it got there; ``None`` otherwise."""
    if row.residual is None or row.residual > level or not row.history:
        return None
    return next((int(m) for m, r in row.history if r <= level), row.matvecs)


def _label(system: SolverSystem) -> str:
    what = "GGN" if system.operator == "ggn" else "Hessian"
    return f"{what} + {system.damping:g} I"


def _peer_goal(problem: str, system: SolverSystem, peer: SolverRow) -> Goal:
    what = f"fewer products than {peer.method} at equal accuracy ({_label(system)})"
    ours = [r for r in system.rows if r.family == "curvkit" and r.matvecs is not None]
    if peer.skipped:
        return Goal(what, problem, None, f"{peer.method}: {peer.skipped}")
    if peer.residual is None or not math.isfinite(peer.residual):
        best = min((r for r in ours if r.reached), key=lambda r: r.matvecs, default=None)
        if best is None:
            return Goal(what, problem, None, f"{peer.method} {peer.says}; no curvkit row reached {TARGET:g}")
        return Goal(
            what,
            problem,
            True,
            f"{peer.method} gave no usable answer ({peer.says}, after {peer.matvecs} products); "
            f"{best.method} reached {best.residual:.1e} in {best.matvecs}",
        )
    level = max(peer.residual, TARGET)
    if peer.residual >= 1:
        done = [r for r in ours if r.residual is not None and math.isfinite(r.residual)]
        best = min(done, key=lambda r: r.residual, default=None)
        ours_text = (
            "" if best is None else f"; curvkit's best: {best.method}, {best.residual:.1e} in {best.matvecs}"
        )
        return Goal(
            what,
            problem,
            True,
            f"{peer.method} returned a residual of {peer.residual:.1e} after {peer.matvecs} products: worse "
            f"than x = 0 (residual 1), which takes no product{ours_text}",
        )
    reach = [(products_to(r, level), r) for r in ours]
    reach = [(m, r) for m, r in reach if m is not None]
    peer_text = f"{peer.method}: {peer.matvecs} products to a residual of {peer.residual:.1e}" + (
        "" if peer.reached else f" (not {TARGET:g} within its cap)"
    )
    if not reach:
        return Goal(what, problem, False, f"no curvkit row reached {level:.1e}; {peer_text}")
    m, best = min(reach, key=lambda t: t[0])
    detail = f"{best.method}: {m} products to {level:.1e}; {peer_text}"
    if peer.method == "curvlinops CG":
        tuned = next((r for r in system.rows if r.method.startswith("curvlinops CG, eps")), None)
        to_target = [(products_to(r, TARGET), r) for r in ours]
        to_target = [(n, r) for n, r in to_target if n is not None]
        if tuned is not None and tuned.residual is not None:
            detail += (
                f". Context: with eps={CG_EPS:g} it reaches {tuned.residual:.1e} in {tuned.matvecs} products"
            )
            if to_target:
                n, r = min(to_target, key=lambda t: t[0])
                detail += f"; curvkit's fewest to {TARGET:g}: {r.method}, {n}"
    return Goal(what, problem, m < peer.matvecs, detail)


def _claim_goal(res: SolverResult) -> Goal | None:
    """curvkit's ``converged=True`` confirmed by the true residual, and every garbage answer flagged."""
    checked, wrong = [], []
    for system in res.systems:
        if system.kind == "float32":
            continue
        for r in system.rows:
            if r.family != "curvkit" or r.converged is None:
                continue
            checked.append(r)
            claim_ok = not r.converged or (r.residual is not None and r.residual <= CLAIM_SLACK * TARGET)
            garbage = r.rel_error is not None and r.rel_error > GARBAGE
            if not claim_ok or (garbage and not r.flagged):
                wrong.append(f"{r.method} on {_label(system)}: says {r.says}, residual {r.residual}")
    if not checked:
        return None
    flagged = [
        f"{r.method} ({_label(s)})"
        for s in res.systems
        if s.kind != "float32"
        for r in s.rows
        if r.family == "curvkit" and r.converged is False
    ]
    detail = (
        "; ".join(wrong)
        if wrong
        else (
            f"{len(checked)} curvkit answers in float64; every 'converged' confirmed by the true residual "
            f"(within {CLAIM_SLACK:g}x tol); flagged not converged: {', '.join(flagged) or 'none'}"
        )
    )
    return Goal("curvkit says converged only when the true residual confirms it", res.name, not wrong, detail)


def evaluate_solver_goals(results: Sequence[SolverResult]) -> list[Goal]:
    """Per problem and system: fewer products than each curvlinops solver at equal accuracy (the
    accuracy a peer returned, or the 1e-6 target if it did better), curvkit's best row; and curvkit's
    convergence claims confirmed."""
    goals = []
    for res in results:
        for system in res.systems:
            if system.kind == "float32":
                continue
            for peer in system.rows:
                if peer.family == "peer" and peer.headline:
                    goals.append(_peer_goal(res.name, system, peer))
        claim = _claim_goal(res)
        if claim is not None:
            goals.append(claim)
    return goals
