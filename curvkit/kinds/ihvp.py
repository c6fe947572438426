"""``ihvp/<vector>``: inverse-HVP solvers against a float64 reference (:func:`curvkit.ihvp_accuracy`).

Asked for with ``AnalysisPlan(options={"ihvp": {...}})`` (``curvkit analyze
--ihvp cg,neumann --damping 1e-3 --ihvp-vector gradient``). Options:

* ``solvers`` (required): registered solvers, e.g. ``["cg", "minres", "neumann"]``;
* ``damping`` (``1e-3``), ``tol`` (``1e-6``), ``maxiter`` (``100``);
* ``vector``: ``"gradient"`` (default), ``"random"``, or the path of a ``.pt``
  file holding a floating-point ``[P]`` tensor (read with ``weights_only=True``;
  its contents checked with the options, its size once ``P`` is known: before
  anything is written);
* ``reference``: ``"auto"`` (default), ``"exact"``, ``"minres"`` or ``"cg"``;
* ``solver_options``: by solver, its own options (``{"lissa": {"repeats": 4}}``).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from curvkit.arguments import integer, relative_tolerance
from curvkit.directions import DIRECTIONS
from curvkit.errors import CurvkitError, ShapeMismatchError
from curvkit.kinds import AnalysisContext, AnalysisKind, ResultTable, Row
from curvkit.kinds.hdf5 import attr, tensor
from curvkit.linalg.ihvp import CURVE_COLUMNS, REFERENCES, IhvpResult, SolverCurve, ihvp_accuracy
from curvkit.operator import check_damping

__all__ = ["DEFAULTS", "KIND"]

DEFAULTS: dict[str, Any] = {
    "damping": 1e-3,
    "tol": 1e-6,
    "maxiter": 100,
    "vector": "gradient",
    "reference": "auto",
    "solver_options": {},
}
"""The options of ``ihvp`` other than ``solvers``, with their defaults."""


def _options(plan: Any) -> dict[str, Any]:
    return {**DEFAULTS, **plan.options["ihvp"]}


def _vector_name(vector: str) -> str:
    if vector in DIRECTIONS:
        return vector
    stem = re.sub(r"[^A-Za-z0-9.+-]+", "-", Path(vector).stem).strip("-.") or "vector"
    return f"file-{stem}"


def _check(options: Mapping[str, Any]) -> None:
    """Every option known and in range (each solver's its own); a vector file that holds a vector."""
    from curvkit.linalg.solve import check_solver_options, solvers

    unknown = sorted(set(options) - {"solvers", *DEFAULTS})
    if unknown:
        raise CurvkitError(f"unknown ihvp option {', '.join(unknown)}; use solvers, {', '.join(DEFAULTS)}")
    given = {**DEFAULTS, **options}
    names = given.get("solvers")
    if isinstance(names, str) or not names or not all(isinstance(n, str) for n in names):
        raise CurvkitError("--ihvp needs solvers, e.g. --ihvp cg,minres,neumann (curvkit solvers lists them)")
    known = {spec.name for spec in solvers()}
    missing = [name for name in names if name not in known]
    if missing:
        raise CurvkitError(
            f"--ihvp: unknown solver {', '.join(missing)}; available: {', '.join(sorted(known))}"
        )
    # kept as given, in the run's request: plain Python numbers, not tensors or NumPy's
    check_damping(given["damping"], "--damping", plain=True)
    relative_tolerance(given["tol"], "the ihvp tol", plain=True)
    integer(given["maxiter"], "the ihvp maxiter", plain=True)
    if given["reference"] not in REFERENCES:
        raise CurvkitError(f"unknown ihvp reference {given['reference']!r}; use one of {list(REFERENCES)}")
    vector = given["vector"]
    if not isinstance(vector, str) or (vector not in DIRECTIONS and not Path(vector).is_file()):
        raise CurvkitError(f"--ihvp-vector must be gradient, random or an existing .pt file, got {vector!r}")
    if vector not in DIRECTIONS:
        _load_vector(vector)  # its contents: one floating-point tensor of one dimension (its size: P, later)
    extra = given["solver_options"]
    if not isinstance(extra, Mapping) or any(not isinstance(v, Mapping) for v in extra.values()):
        raise CurvkitError("ihvp solver_options must map solver names to option mappings")
    idle = sorted(set(extra) - set(names))
    if idle:
        raise CurvkitError(f"--ihvp-option for {', '.join(idle)}, which --ihvp does not run")
    for name, given in extra.items():  # names and values (SolverSpec.option_checks)
        check_solver_options(name, given, prefix=f"--ihvp-option {name}.")


def _check_dimension(options: Mapping[str, Any], dim: int, samples: int | None) -> None:
    """What depends on ``P`` or ``N``: a vector file's size, the solvers' options (``SolverSpec``'s
    ``dimension_checks`` and ``sample_checks``)."""
    from curvkit.linalg.solve import check_solver_options

    given = {**DEFAULTS, **options}
    vector = given["vector"]
    if vector not in DIRECTIONS:
        loaded = _load_vector(vector)
        if loaded.shape[0] != dim:
            raise ShapeMismatchError(
                f"--ihvp-vector {vector}: the vector must be a floating-point [P] tensor with P = {dim:,}, "
                f"got {tuple(loaded.shape)} {loaded.dtype}"
            )
    for name, solver_given in given["solver_options"].items():
        check_solver_options(name, solver_given, prefix=f"--ihvp-option {name}.", dim=dim, samples=samples)


def _keys(plan: Any, psd: bool, estimator: str | None) -> list[str]:
    if "ihvp" not in plan.options:
        return []
    return [f"ihvp/{_vector_name(_options(plan)['vector'])}"]


def _request(plan: Any, key: str) -> dict[str, Any]:
    options = _options(plan)
    request = {**options, "solvers": list(options["solvers"]), "seed": plan.seed}
    if options["vector"] not in DIRECTIONS:  # the file's content, not its name
        request["vector_sha256"] = hashlib.sha256(Path(options["vector"]).read_bytes()).hexdigest()
    return request


def _load_vector(path: str) -> torch.Tensor:
    """A vector file's tensor: read with ``weights_only=True``, floating-point, of one dimension.

    Raises:
        CurvkitError: The file cannot be read so, or holds something else than a tensor.
        ShapeMismatchError: A tensor that is not floating-point or not of one dimension.
    """
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's, reported in one line
        raise CurvkitError(f"--ihvp-vector {path}: cannot read a tensor ({type(exc).__name__})") from None
    if not isinstance(loaded, torch.Tensor):
        raise CurvkitError(f"--ihvp-vector {path} holds a {type(loaded).__name__}, not a tensor")
    if loaded.dim() != 1 or not loaded.is_floating_point():
        raise ShapeMismatchError(
            f"--ihvp-vector {path}: the vector must be a floating-point [P] tensor (one dimension), got "
            f"{tuple(loaded.shape)} {loaded.dtype}"
        )
    return loaded


def _compute(context: AnalysisContext, key: str) -> IhvpResult:
    options = _options(context.plan)
    vector = options["vector"]
    given = vector if vector in DIRECTIONS else _load_vector(vector)
    return ihvp_accuracy(
        context.op,
        options["solvers"],
        vector=given,
        damping=options["damping"],
        tol=options["tol"],
        maxiter=options["maxiter"],
        reference=options["reference"],
        precise=None if context.precise is None else context.precise(),
        seed=context.plan.seed,
        solver_options=options["solver_options"],
        vector_name=_vector_name(vector),
        progress=context.report(key),
    )


_NUMBERS = ("damping", "tol", "reference_residual", "reference_matvecs")


def _write(g: Any, result: IhvpResult) -> None:
    g.attrs["vector"] = result.vector
    g.attrs["reference"] = result.reference
    g.attrs["reference_converged"] = bool(result.reference_converged)
    for name in _NUMBERS:
        g.attrs[name] = getattr(result, name)
    solvers = g.create_group("solvers", track_order=True)
    for name, curve in result.curves.items():
        s = solvers.create_group(name)
        s.attrs["converged"] = bool(curve.converged)
        s.attrs["reason"] = curve.reason
        s.attrs["status"] = curve.status
        for column, values in curve.columns.items():
            s.create_dataset(column, data=values.numpy())


def _read(g: Any) -> IhvpResult:
    result = IhvpResult(
        vector=attr(g.attrs["vector"]),
        damping=float(attr(g.attrs["damping"])),
        tol=float(attr(g.attrs["tol"])),
        reference=attr(g.attrs["reference"]),
        reference_residual=float(attr(g.attrs["reference_residual"])),
        reference_converged=bool(attr(g.attrs["reference_converged"])),
        reference_matvecs=int(attr(g.attrs["reference_matvecs"])),
    )
    for name, s in g["solvers"].items():
        columns = {c: tensor(s[c]).to(torch.float64) for c in CURVE_COLUMNS if c in s}
        converged = bool(attr(s.attrs["converged"]))
        # a store written before statuses were recorded has none: only convergence is known
        status = attr(s.attrs["status"]) if "status" in s.attrs else ("converged" if converged else "unknown")
        result.curves[name] = SolverCurve(name, converged, attr(s.attrs["reason"]), columns, status)
    return result


def _rows(result: IhvpResult) -> Iterator[Row]:
    yield "reference_residual", None, result.reference_residual
    yield "reference_matvecs", None, result.reference_matvecs
    for name, curve in result.curves.items():
        yield "converged", name, int(curve.converged)
        for column in ("error", "cosine", "residual", "matvecs", "seconds"):
            value = curve.final(column)
            yield column, name, None if math.isnan(value) else value


def _summarize(result: IhvpResult) -> str:
    parts = []
    for name, curve in result.curves.items():
        if not curve.columns:
            parts.append(f"{name} {curve.reason}")
            continue
        status = "converged" if curve.converged else curve.reason
        parts.append(
            f"{name} error {curve.final('error'):.2e} cosine {curve.final('cosine'):.4f} "
            f"({int(curve.final('matvecs'))} products, {status})"
        )
    return (
        f"(A + {result.damping:g} I)^-1 {result.vector} vs {result.reference} "
        f"(residual {result.reference_residual:.1e}): " + "; ".join(parts)
    )


def _tables(items: Sequence[tuple[str, IhvpResult]]) -> list[ResultTable]:
    """The final row of each solver; why each that did not converge stopped, under the table."""
    columns = ("solver", "conv.", "iters", "products", "s", "residual", "error", "cosine")
    tables = []
    for key, result in items:
        rows = [
            [
                name,
                "yes" if curve.converged else "NO",
                f"{curve.final('iteration'):.0f}",
                f"{curve.final('matvecs'):.0f}",
                f"{curve.final('seconds'):.3g}",
                f"{curve.final('residual'):.1e}",
                f"{curve.final('error'):.1e}",
                f"{curve.final('cosine'):.4f}",
            ]
            for name, curve in result.curves.items()
        ]
        notes = [f"{name}: {curve.reason}" for name, curve in result.curves.items() if not curve.converged]
        title = (
            f"{key}: (A + {result.damping:g} I)^-1 v, v = {result.vector}; reference {result.reference}, "
            f"relative residual {result.reference_residual:.1e}"
        )
        tables.append(ResultTable(title, columns, rows, notes))
    return tables


def _figures(result: IhvpResult, title: str, log: bool) -> list[tuple[str, Any]]:
    from curvkit.plotting import plot_ihvp

    return [(x, plot_ihvp(result, x=x, title=title)) for x in ("matvecs", "seconds")]


KIND = AnalysisKind(
    name="ihvp",
    result_type=IhvpResult,
    keys=_keys,
    request=_request,
    compute=_compute,
    write=_write,
    read=_read,
    rows=_rows,
    summarize=_summarize,
    check=_check,
    check_dimension=_check_dimension,
    tables=_tables,
    figures=_figures,
)
